"""The fake Dataverse Web API, driven over HTTP with real tokens from the fake tenant."""

from collections.abc import Callable, Iterator
from urllib.parse import quote

import httpx
import pytest
from starlette.testclient import TestClient

from d365_fakes.clients import ClientRegistration
from d365_fakes.dataverse import API_ROOT, DataverseState, company_id, create_app
from d365_fakes.tokens import TokenIssuer

ORG_URL = "https://contoso.crm.example"
TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
INTEGRATION = ClientRegistration("b2b-onboarding", "integration-secret", display_name="B2B onboarding")
SELLER = ClientRegistration("seller-app", "seller-secret", display_name="Seller")
MISSING_ID = "00000000-0000-0000-0000-0000000000aa"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer("https://login.example", TENANT_ID)


@pytest.fixture
def state() -> DataverseState:
    return DataverseState()


@pytest.fixture
def api(state: DataverseState, issuer: TokenIssuer) -> Iterator[TestClient]:
    """A client of the Web API root, signed in as the integration's application user."""
    clients = {client.client_id: client for client in (INTEGRATION, SELLER)}
    with TestClient(create_app(state, issuer, ORG_URL, clients), base_url=f"{ORG_URL}{API_ROOT}/") as client:
        client.headers["Authorization"] = bearer(issuer, INTEGRATION)
        yield client


def bearer(issuer: TokenIssuer, client: ClientRegistration, resource: str = ORG_URL) -> str:
    return "Bearer " + issuer.issue(client, resource)["access_token"]


def created_id(response: httpx.Response) -> str:
    assert response.status_code == 204, response.text
    return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


def create(api: TestClient, entity_set: str, body: dict) -> str:
    return created_id(api.post(entity_set, json=body))


def upserted_id(api: TestClient, key_url: str, body: dict) -> str:
    """PATCH a lead at its alternate-key URL: 204 naming the row by that key (as Dataverse answers
    an upsert by key, "Update and delete table rows using the Web API"); then its id, read by key."""
    response = api.patch(key_url, json=body)
    assert response.status_code == 204, response.text
    assert response.headers["OData-EntityId"] == f"{ORG_URL}{API_ROOT}/{key_url}"
    return api.get(key_url, params={"$select": "leadid"}).json()["leadid"]


def by_prospect_id(value: str, company: str | None = None) -> str:
    """The alternate-key URL segment, as a careful client writes it: quotes doubled, then the
    value percent-encoded (so `# '` and newlines travel as data); with `company` (a legal entity
    code) the key's company part too, else the key of a lead without a company."""
    company_part = f",_msdyn_company_value={company_id(company)}" if company else ""
    return "leads(msdyn_prospectid='" + quote(value.replace("'", "''"), safe="") + "'" + company_part + ")"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_who_am_i_names_the_calling_application_user(api: TestClient, state: DataverseState) -> None:
    response = api.get("WhoAmI")
    assert response.status_code == 200
    assert response.headers["OData-Version"] == "4.0"
    body = response.json()
    assert body["UserId"] == INTEGRATION.app_user_id
    assert body["OrganizationId"] == state.organization_id
    assert body["BusinessUnitId"] == state.business_unit_id
    user = api.get(f"systemusers({INTEGRATION.app_user_id})").json()
    assert (user["fullname"], user["applicationid"]) == ("B2B onboarding", "b2b-onboarding")


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt", "commerce audience"])
def test_requests_without_a_token_for_this_organization_get_401_with_a_challenge(
    api: TestClient, issuer: TokenIssuer, authorization: str | None
) -> None:
    del api.headers["Authorization"]
    if authorization == "commerce audience":
        authorization = bearer(issuer, INTEGRATION, resource="https://usmf.operations.example")
    response = api.get("leads", headers={"Authorization": authorization} if authorization else {})
    assert error_of(response, 401)["code"] == "0x80072243"
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer authorization_uri="https://login.example/{TENANT_ID}/oauth2/authorize", '
        f'resource_id="{ORG_URL}"'
    )


def test_create_answers_204_with_the_entity_id_and_server_managed_columns(api: TestClient) -> None:
    response = api.post("leads", json={"firstname": "Ada", "lastname": "Lovelace", "fullname": "x"})
    lead_id = created_id(response)
    assert response.headers["OData-EntityId"] == f"{ORG_URL}{API_ROOT}/leads({lead_id})"
    assert lead_id == lead_id.lower()
    lead = api.get(f"leads({lead_id.upper()})").json()
    assert lead["leadid"] == lead_id
    assert lead["fullname"] == "Ada Lovelace"  # computed: what the client wrote is ignored
    assert (lead["statecode"], lead["statuscode"]) == (0, 1)
    assert lead["_ownerid_value"] == INTEGRATION.app_user_id
    assert lead["@odata.etag"] == f'W/"{lead["versionnumber"]}"'
    assert lead["createdon"].endswith("Z") and lead["modifiedon"].endswith("Z")


def test_create_with_return_representation_answers_201_with_the_row(api: TestClient) -> None:
    prefer = {"Prefer": "return=representation"}
    response = api.post("accounts", json={"name": "Contoso"}, headers=prefer)
    assert response.status_code == 201
    assert response.headers["Preference-Applied"] == "return=representation"
    body = response.json()
    assert body["name"] == "Contoso" and body["@odata.etag"].startswith('W/"')
    assert response.headers["OData-EntityId"].endswith(f"/accounts({body['accountid']})")


def test_create_refuses_unknown_columns_and_wrong_types(api: TestClient) -> None:
    assert error_of(api.post("leads", json={"lastname": "X", "nickname": "Y"}), 400) == {
        "code": "0x80060888",
        "message": "Could not find a property named 'nickname' on type 'Microsoft.Dynamics.CRM.lead'.",
    }
    lookup_value = error_of(api.post("leads", json={"_parentaccountid_value": None}), 400)
    assert "'_parentaccountid_value'" in lookup_value["message"]  # lookups are written by binds
    assert error_of(api.post("leads", json={"leadsourcecode": "Web"}), 400)["code"] == "0x80040203"
    assert api.get("leads").json()["value"] == []


def test_missing_rows_are_not_found_in_dataverse_style(api: TestClient) -> None:
    assert error_of(api.get(f"leads({MISSING_ID})"), 404) == {
        "code": "0x80040217",
        "message": f"lead With Id = {MISSING_ID} Does Not Exist",
    }
    assert error_of(api.get(by_prospect_id("P-404")), 404) == {
        "code": "0x80040217",
        "message": "A record with the specified key values does not exist in lead entity",
    }
    unknown_set = error_of(api.get("prospects"), 404)
    assert unknown_set["message"] == "Resource not found for the segment 'prospects'."
    assert error_of(api.get("accounts(msdyn_prospectid='P-1')"), 400)["code"] == "0x8006088a"


def test_upsert_by_alternate_key_creates_then_updates_with_204(api: TestClient) -> None:
    lead_id = upserted_id(api, by_prospect_id("P-000123"), {"companyname": "Contoso"})
    no_op_condition = {"If-None-Match": "null"}
    again = api.patch(by_prospect_id("P-000123"), json={"companyname": "Fabrikam"}, headers=no_op_condition)
    assert again.status_code == 204 and again.headers["OData-EntityId"].endswith(by_prospect_id("P-000123"))
    lead = api.get(by_prospect_id("p-000123")).json()  # key values compare case-insensitively
    assert (lead["leadid"], lead["msdyn_prospectid"]) == (lead_id, "P-000123")
    assert lead["companyname"] == "Fabrikam"
    assert len(api.get("leads").json()["value"]) == 1


def test_upsert_preconditions(api: TestClient) -> None:
    def upsert(lastname: str, **headers: str) -> httpx.Response:
        return api.patch(by_prospect_id("P-1"), json={"lastname": lastname}, headers=headers)

    assert error_of(upsert("A", **{"If-Match": "*"}), 404)["code"] == "0x80040217"
    lead_id = created_id(upsert("A", **{"If-None-Match": "*"}))
    assert error_of(upsert("B", **{"If-None-Match": "*"}), 412) == {
        "code": "0x80040237",
        "message": "A record with matching key values already exists.",
    }
    etag = api.get(f"leads({lead_id})").json()["@odata.etag"]
    assert upsert("C", **{"If-Match": etag}).status_code == 204
    assert error_of(upsert("D", **{"If-Match": etag}), 412)["code"] == "0x80060882"  # stale
    assert upsert("E", **{"If-Match": "*"}).status_code == 204
    assert api.get(f"leads({lead_id})").json()["lastname"] == "E"


def test_upsert_refuses_the_alternate_key_repeated_in_the_body(api: TestClient) -> None:
    response = api.patch(by_prospect_id("P-2"), json={"msdyn_prospectid": "P-2", "lastname": "A"})
    assert error_of(response, 400)["code"] == "0x80040203"
    assert api.get("leads").json()["value"] == []


def test_alternate_key_values_stay_unique(api: TestClient) -> None:
    create(api, "leads", {"msdyn_prospectid": "P-3"})
    other = create(api, "leads", {"lastname": "Other"})
    duplicate_by_create = api.post("leads", json={"msdyn_prospectid": "p-3"})
    assert error_of(duplicate_by_create, 412)["code"] == "0x80040237"
    duplicate_by_update = api.patch(f"leads({other})", json={"msdyn_prospectid": "P-3"})
    assert error_of(duplicate_by_update, 412)["code"] == "0x80040237"


def test_patch_by_id_is_an_upsert_unless_if_match(api: TestClient) -> None:
    new_id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    update_only = api.patch(f"accounts({new_id})", json={"name": "A"}, headers={"If-Match": "*"})
    assert error_of(update_only, 404)["code"] == "0x80040217"
    assert created_id(api.patch(f"accounts({new_id.upper()})", json={"name": "A"})) == new_id
    assert api.patch(f"accounts({new_id})", json={"accountnumber": "US-001"}).status_code == 204
    account = api.get(f"accounts({new_id})").json()
    assert (account["name"], account["accountnumber"]) == ("A", "US-001")


def test_lookups_are_written_by_bind_and_read_as_value_properties(api: TestClient) -> None:
    account_id = create(api, "accounts", {"name": "Contoso"})
    account_ref = f"/accounts({account_id})"
    contact_id = create(api, "contacts", {"lastname": "Lovelace", "parentcustomerid_account@odata.bind": account_ref})
    lead_id = create(api, "leads", {"lastname": "Lovelace", "parentaccountid@odata.bind": account_ref})
    create(api, "leads", {"lastname": "Unrelated"})
    assert api.get(f"contacts({contact_id})").json()["_parentcustomerid_value"] == account_id

    query = f"leads?$filter=_parentaccountid_value eq {account_id}&$select=_parentaccountid_value,lastname"
    [lead] = api.get(query).json()["value"]
    assert set(lead) == {"@odata.etag", "leadid", "lastname", "_parentaccountid_value"}
    assert (lead["leadid"], lead["_parentaccountid_value"]) == (lead_id, account_id)
    assert api.patch(f"leads({lead_id})", json={"parentaccountid@odata.bind": None}).status_code == 204
    assert api.get(f"leads({lead_id})").json()["_parentaccountid_value"] is None


def test_binds_must_name_an_existing_row_of_the_right_table(api: TestClient) -> None:
    missing = api.post("leads", json={"parentaccountid@odata.bind": f"/accounts({MISSING_ID})"})
    assert error_of(missing, 404) == {
        "code": "0x80040217",
        "message": f"account With Id = {MISSING_ID} Does Not Exist",
    }
    contact_id = create(api, "contacts", {"lastname": "X"})
    wrong_table = api.post("leads", json={"parentaccountid@odata.bind": f"/contacts({contact_id})"})
    assert error_of(wrong_table, 400)["code"] == "0x80040203"
    plain_id = api.post("leads", json={"parentaccountid": contact_id})
    assert error_of(plain_id, 400)["code"] == "0x80060888"
    assert api.get("leads").json()["value"] == []


def qualify(api: TestClient, lead_id: str, **overrides: object) -> httpx.Response:
    params = {"CreateAccount": True, "CreateContact": True, "CreateOpportunity": True, "Status": 3}
    return api.post(f"leads({lead_id})/Microsoft.Dynamics.CRM.QualifyLead", json={**params, **overrides})


def test_qualify_lead_creates_account_contact_and_opportunity_and_qualifies_the_lead(
    api: TestClient,
) -> None:
    lead_id = create(
        api,
        "leads",
        {
            "firstname": "Ada",
            "lastname": "Lovelace",
            "companyname": "Analytical Engines",
            "emailaddress1": "ada@example.com",
            "telephone1": "+1 555 0100",
            "address1_city": "London",
            "msdyn_prospectid": "P-7",
        },
    )
    response = qualify(api, lead_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"].endswith("$metadata#crmbaseentity")
    account_ref, contact_ref, opportunity_ref = body["value"]
    assert account_ref["@odata.type"] == "#Microsoft.Dynamics.CRM.account"
    assert contact_ref["@odata.type"] == "#Microsoft.Dynamics.CRM.contact"
    assert opportunity_ref["@odata.type"] == "#Microsoft.Dynamics.CRM.opportunity"

    account = api.get(f"accounts({account_ref['accountid']})").json()
    contact = api.get(f"contacts({contact_ref['contactid']})").json()
    opportunity = api.get(f"opportunities({opportunity_ref['opportunityid']})").json()
    lead = api.get(f"leads({lead_id})").json()
    assert account["name"] == "Analytical Engines"
    assert (account["emailaddress1"], account["address1_city"]) == ("ada@example.com", "London")
    assert (contact["firstname"], contact["lastname"]) == ("Ada", "Lovelace")
    assert contact["_parentcustomerid_value"] == account["accountid"]
    assert opportunity["name"] == "Analytical Engines"  # the lead has no subject
    assert (opportunity["statecode"], opportunity["statuscode"]) == (0, 1)
    assert opportunity["_parentaccountid_value"] == account["accountid"]
    assert opportunity["_parentcontactid_value"] == contact["contactid"]
    for row in (account, contact, opportunity):
        assert row["_originatingleadid_value"] == lead_id
    assert (lead["statecode"], lead["statuscode"]) == (1, 3)
    assert lead["_qualifyingopportunityid_value"] == opportunity["opportunityid"]
    assert lead["_parentaccountid_value"] == account["accountid"]
    assert lead["_parentcontactid_value"] == contact["contactid"]


def test_qualify_lead_refuses_a_closed_lead_and_a_wrong_status(api: TestClient) -> None:
    lead_id = create(api, "leads", {"lastname": "A", "companyname": "A Ltd"})
    assert error_of(qualify(api, lead_id, Status=4), 400)["code"] == "0x80040203"
    assert qualify(api, lead_id, CreateContact=False, CreateOpportunity=False).status_code == 200
    assert error_of(qualify(api, lead_id), 400) == {
        "code": "0x80040203",
        "message": "The lead is closed. You cannot convert or qualify a lead that is already closed.",
    }
    assert len(api.get("accounts").json()["value"]) == 1


def test_lead_state_changes_by_patch(api: TestClient) -> None:
    lead_id = create(api, "leads", {"lastname": "A"})

    def patch(body: dict) -> httpx.Response:
        return api.patch(f"leads({lead_id})", json=body)

    mismatch = error_of(patch({"statecode": 2, "statuscode": 1}), 400)
    assert mismatch["code"] == "0x80040203"
    assert "1 is not a valid status code for state code LeadState.Disqualified" in mismatch["message"]
    assert "QualifyLead" in error_of(patch({"statecode": 1, "statuscode": 3}), 400)["message"]
    assert patch({"statecode": 2, "statuscode": 6}).status_code == 204
    assert patch({"telephone1": "+1 555 0101"}).status_code == 204  # closed rows stay editable
    assert patch({"statecode": 0, "statuscode": 2}).status_code == 204
    lead = api.get(f"leads({lead_id})").json()
    assert (lead["statecode"], lead["statuscode"], lead["telephone1"]) == (0, 2, "+1 555 0101")

    nothing = {"CreateAccount": False, "CreateContact": False, "CreateOpportunity": False}
    assert qualify(api, lead_id, **nothing).status_code == 200
    disqualify_qualified = error_of(patch({"statecode": 2, "statuscode": 4}), 400)
    assert disqualify_qualified["code"] == "0x80040203"
    assert patch({"statecode": 0}).status_code == 204  # reactivated, with the default status
    assert api.get(f"leads({lead_id})").json()["statuscode"] == 1


def close(api: TestClient, action: str, opportunity_id: str, status: int) -> httpx.Response:
    closing = {
        "subject": f"{action} by test",
        "opportunityid@odata.bind": f"/opportunities({opportunity_id})",
    }
    return api.post(action, json={"Status": status, "OpportunityClose": closing})


def test_win_and_lose_close_the_opportunity_and_record_an_opportunityclose(api: TestClient) -> None:
    won_id = create(api, "opportunities", {"name": "Won deal"})
    lost_id = create(api, "opportunities", {"name": "Lost deal"})
    assert close(api, "WinOpportunity", won_id, 3).status_code == 204
    assert close(api, "LoseOpportunity", lost_id, 5).status_code == 204
    won, lost = (api.get(f"opportunities({row_id})").json() for row_id in (won_id, lost_id))
    assert (won["statecode"], won["statuscode"]) == (1, 3)
    assert (lost["statecode"], lost["statuscode"]) == (2, 5)
    closes = api.get("opportunitycloses?$select=subject,_opportunityid_value").json()["value"]
    assert sorted((row["subject"], row["_opportunityid_value"]) for row in closes) == sorted(
        [("WinOpportunity by test", won_id), ("LoseOpportunity by test", lost_id)]
    )


def test_win_and_lose_refuse_wrong_status_missing_bind_and_closed_opportunities(
    api: TestClient,
) -> None:
    opportunity_id = create(api, "opportunities", {"name": "Deal"})
    assert error_of(close(api, "WinOpportunity", opportunity_id, 4), 400)["code"] == "0x80040203"
    assert error_of(close(api, "LoseOpportunity", opportunity_id, 3), 400)["code"] == "0x80040203"
    no_bind = api.post("WinOpportunity", json={"Status": 3, "OpportunityClose": {"subject": "Won"}})
    assert error_of(no_bind, 400)["code"] == "0x80040203"
    assert error_of(close(api, "WinOpportunity", MISSING_ID, 3), 404)["code"] == "0x80040217"
    assert close(api, "WinOpportunity", opportunity_id, 3).status_code == 204
    assert error_of(close(api, "LoseOpportunity", opportunity_id, 4), 400) == {
        "code": "0x80040203",
        "message": "Cannot close the entity because it is not in the correct state.",
    }
    assert len(api.get("opportunitycloses").json()["value"]) == 1


def test_opportunities_reopen_by_patch_but_close_only_by_action(api: TestClient) -> None:
    opportunity_id = create(api, "opportunities", {"name": "Deal"})

    def patch(body: dict) -> httpx.Response:
        return api.patch(f"opportunities({opportunity_id})", json=body)

    assert "WinOpportunity" in error_of(patch({"statecode": 1}), 400)["message"]
    assert "LoseOpportunity" in error_of(patch({"statecode": 2, "statuscode": 4}), 400)["message"]
    assert close(api, "LoseOpportunity", opportunity_id, 4).status_code == 204
    assert patch({"statecode": 0, "statuscode": 2}).status_code == 204
    opportunity = api.get(f"opportunities({opportunity_id})").json()
    assert (opportunity["statecode"], opportunity["statuscode"]) == (0, 2)


def read_all_pages(
    api: TestClient, url: str, page_size: int, between_pages: Callable[[list[dict]], None]
) -> list[dict]:
    """Follow @odata.nextLink unchanged, calling `between_pages` with each page that has a next."""
    rows: list[dict] = []
    while url:
        response = api.get(url, headers={"Prefer": f"odata.maxpagesize={page_size}"})
        assert response.status_code == 200, response.text
        assert response.headers["Preference-Applied"] == f"odata.maxpagesize={page_size}"
        body = response.json()
        assert len(body["value"]) <= page_size
        rows += body["value"]
        url = body.get("@odata.nextLink")
        if url:
            between_pages(body["value"])
    return rows


def test_paging_is_keyset_so_rows_changing_between_pages_are_neither_skipped_nor_repeated(
    api: TestClient,
) -> None:
    ids = sorted(create(api, "leads", {"lastname": f"L{number}"}) for number in range(7))
    query = "leads?$filter=statecode eq 0&$select=lastname&$count=true"
    first = api.get(query, headers={"Prefer": "odata.maxpagesize=3"})
    assert first.json()["@odata.count"] == 7
    assert first.json()["@odata.nextLink"].startswith(f"{first.request.url}&$skiptoken=")

    def disqualify_what_was_read(page: list[dict]) -> None:  # shifts what an offset would address
        for row in page:
            response = api.patch(f"leads({row['leadid']})", json={"statecode": 2, "statuscode": 7})
            assert response.status_code == 204

    rows = read_all_pages(api, query, 3, disqualify_what_was_read)
    assert [row["leadid"] for row in rows] == ids


def test_paging_with_orderby_resumes_after_the_last_row_even_if_it_no_longer_matches(
    api: TestClient,
) -> None:
    names = ["Avery", "Blake", "Casey", "Devon", "Emery", "Finley"]
    for name in names:
        create(api, "leads", {"lastname": name, "companyname": "Same Co"})

    def disqualify_last(page: list[dict]) -> None:
        assert api.patch(f"leads({page[-1]['leadid']})", json={"statecode": 2}).status_code == 204

    query = "leads?$filter=statecode eq 0&$orderby=companyname,lastname desc&$select=lastname"
    rows = read_all_pages(api, query, 2, disqualify_last)
    assert [row["lastname"] for row in rows] == names[::-1]


def test_unsupported_query_options_are_refused(api: TestClient) -> None:
    for query in (
        "leads?$skip=1",
        "leads?$expand=parentaccountid",
        "leads?$filter=lastname eq",
        "leads?$skiptoken=garbage",
        "leads?userQuery=1",
    ):
        assert error_of(api.get(query), 400)["code"] == "0x8006088a", query


def test_the_all_commerce_b2b_leads_view(api: TestClient) -> None:
    views = "savedqueries?$filter=name eq 'All Commerce B2B leads'&$select=savedqueryid,name,returnedtypecode"
    [view] = api.get(views).json()["value"]
    assert (view["name"], view["returnedtypecode"]) == ("All Commerce B2B leads", "lead")
    b2b_id = create(api, "leads", {"lastname": "B2B", "msdyn_b2bcommerceprospect": True})
    create(api, "leads", {"lastname": "Retail", "msdyn_b2bcommerceprospect": False})
    rows = api.get(f"leads?savedQuery={view['savedqueryid']}&$select=lastname").json()["value"]
    assert [row["leadid"] for row in rows] == [b2b_id]


def test_my_open_leads_depends_on_the_caller(api: TestClient, issuer: TokenIssuer) -> None:
    [view] = api.get("savedqueries?$filter=name eq 'My open leads'").json()["value"]
    my_open_leads = f"leads?savedQuery={view['savedqueryid']}&$select=lastname,_ownerid_value"
    as_seller = {"Authorization": bearer(issuer, SELLER)}

    def leads_in_view(**headers: str) -> list[str]:
        return [row["leadid"] for row in api.get(my_open_leads, headers=headers).json()["value"]]

    lead_id = create(api, "leads", {"lastname": "Imported"})
    assert leads_in_view() == [lead_id]
    assert leads_in_view(**as_seller) == []

    [seller] = api.get("systemusers?$filter=applicationid eq 'seller-app'").json()["value"]
    assign = {"ownerid@odata.bind": f"/systemusers({seller['systemuserid']})"}
    assert api.patch(f"leads({lead_id})", json=assign).status_code == 204
    assert leads_in_view() == []
    assert leads_in_view(**as_seller) == [lead_id]
    disqualify = {"statecode": 2, "statuscode": 4}
    assert api.patch(f"leads({lead_id})", json=disqualify, headers=as_seller).status_code == 204
    assert leads_in_view(**as_seller) == []


HOSTILE_KEYS = [  # hostile to a URL parser, yet usable in a URL key
    "O'Brien",
    "' or 1 eq 1",
    "x') or (1 eq 1",
    "x',_msdyn_company_value=00000000-0000-0000-0000-0000000000aa",
    "''",
    "a#b",
    "a=b, c",
    "two\nlines",
    "Zoë ✓ 東京",
]
# Each holds a character of / < > * % & : \ ? + : stored, but never usable in a URL key.
UNUSABLE_IN_URL_KEYS = {
    "%27": "%",
    "%2F": "%",
    "a/b": "/",
    "a?b=c&d=e": "?",
    "P-1')/Microsoft.Dynamics.CRM.QualifyLead": "/",
    "usrt:P-000001": ":",
    "<b>": "<",
    "a>b": ">",
    "a*": "*",
    "R&D": "&",
    "C:\\temp": ":",
    "back\\slash": "\\",
    "1+1": "+",
}


def test_hostile_alternate_key_values_address_exactly_one_row(api: TestClient) -> None:
    decoy = create(api, "leads", {"msdyn_prospectid": "decoy", "lastname": "Decoy"})
    ids = {}
    for value in HOSTILE_KEYS:
        ids[value] = upserted_id(api, by_prospect_id(value), {"lastname": "created"})
    assert len(set(ids.values()) | {decoy}) == len(HOSTILE_KEYS) + 1
    for value, lead_id in ids.items():
        # subject (300 characters) holds every value; lastname holds 50
        update = api.patch(by_prospect_id(value), json={"subject": value}, headers={"If-Match": "*"})
        assert update.status_code == 204
        lead = api.get(by_prospect_id(value)).json()
        assert (lead["leadid"], lead["msdyn_prospectid"], lead["subject"]) == (lead_id, value, value)
    assert len(api.get("leads").json()["value"]) == len(HOSTILE_KEYS) + 1
    assert api.get(f"leads({decoy})").json()["lastname"] == "Decoy"


def test_key_values_with_characters_unusable_in_a_url_are_refused_there_but_stored(
    api: TestClient, state: DataverseState
) -> None:
    for value, character in UNUSABLE_IN_URL_KEYS.items():
        lead_id = create(api, "leads", {"msdyn_prospectid": value, "lastname": "Stored"})  # a body may hold it
        writes = state.counts()["writes"]["leads"]
        for response in (
            api.get(by_prospect_id(value)),
            api.patch(by_prospect_id(value), json={"lastname": "Changed"}),
            api.delete(by_prospect_id(value)),
            api.post(by_prospect_id(value) + "/Microsoft.Dynamics.CRM.QualifyLead", json={}),
        ):
            refused = error_of(response, 400)
            assert refused["code"] == "0x80040203", value
            assert f"holds the character '{character}'" in refused["message"], value
            assert "cannot be used in an alternate key in a URL" in refused["message"]
        assert state.counts()["writes"]["leads"] == writes
        lead = api.get(f"leads({lead_id})").json()  # by id it is an ordinary row
        assert (lead["msdyn_prospectid"], lead["lastname"]) == (value, "Stored")
        escaped = value.replace("'", "''")
        [found] = api.get("leads", params={"$filter": f"msdyn_prospectid eq '{escaped}'"}).json()["value"]
        assert found["leadid"] == lead_id
    refused = error_of(api.get("leads(msdyn_prospectid='usrt%3AP-000001')"), 400)  # decoded first
    assert refused["message"].startswith("The key value 'usrt:P-000001' of 'msdyn_prospectid' holds the character ':'")


def test_counts_requests_and_writes_and_reset_keeps_views_and_users(
    api: TestClient, state: DataverseState
) -> None:
    lead_id = create(api, "leads", {"lastname": "A", "companyname": "A Ltd"})
    assert qualify(api, lead_id).status_code == 200
    [opportunity] = api.get("opportunities").json()["value"]
    assert close(api, "WinOpportunity", opportunity["opportunityid"], 3).status_code == 204
    assert api.post("leads", json={"bogus": 1}).status_code == 400
    assert state.counts() == {
        "requests": 5,
        "writes": {"leads": 2, "opportunities": 1, "accounts": 0, "contacts": 0},
    }
    state.reset()
    assert state.counts()["requests"] == 0
    assert api.get("leads").json()["value"] == []
    assert len(api.get("savedqueries").json()["value"]) == 2
    assert api.get(f"systemusers({SELLER.app_user_id})").status_code == 200


def test_delete_by_id_or_alternate_key_answers_204_then_the_row_is_gone(
    api: TestClient, state: DataverseState
) -> None:
    by_id = create(api, "leads", {"lastname": "A", "msdyn_prospectid": "P-1"})
    by_key = create(api, "leads", {"lastname": "B", "msdyn_prospectid": "P-2"})
    assert api.delete(f"leads({by_id.upper()})").status_code == 204
    assert api.delete(by_prospect_id("p-2")).status_code == 204
    assert error_of(api.get(f"leads({by_id})"), 404)["code"] == "0x80040217"
    assert error_of(api.delete(f"leads({by_id})"), 404) == {
        "code": "0x80040217",
        "message": f"lead With Id = {by_id} Does Not Exist",
    }
    assert error_of(api.delete(by_prospect_id("P-2")), 404)["code"] == "0x80040217"
    assert api.get("leads").json()["value"] == []
    again = upserted_id(api, by_prospect_id("P-2"), {"lastname": "B again"})
    assert again != by_key  # the key is free again: a new row
    assert state.counts()["writes"]["leads"] == 5


def test_delete_needs_a_row_of_a_writable_set(api: TestClient) -> None:
    create(api, "leads", {"lastname": "A"})
    assert error_of(api.delete("leads"), 405)["code"] == "0x80040203"
    assert error_of(api.delete(f"systemusers({SELLER.app_user_id})"), 405)["code"] == "0x80040203"
    assert len(api.get("leads").json()["value"]) == 1
