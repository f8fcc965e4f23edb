from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CUSTOMER_GROUPS, CUSTOMERS, PROSPECTS, CommerceState, ODataError, create_app
from d365_fakes.tokens import TokenIssuer

COMMERCE = "https://commerce.test"
SYNC = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
OTHER = ClientRegistration("other-app", "other-secret", default_company="usmf")
ENUM = "Microsoft.Dynamics.DataEntities."


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("https://login.test", "11111111-2222-3333-4444-555555555555")


@pytest.fixture
def state():
    return CommerceState()


@pytest.fixture
def make_client(state, issuer):
    def make(registration=SYNC, page_size=10000):
        app = create_app(state, issuer, COMMERCE, {SYNC.client_id: SYNC, OTHER.client_id: OTHER}, page_size)
        client = TestClient(app, base_url=COMMERCE)
        token = issuer.issue(registration, COMMERCE)["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        return client

    return make


@pytest.fixture
def api(make_client):
    return make_client()


def prospect(prospect_id, company="usrt", **fields):
    return {"dataAreaId": company, "ProspectId": prospect_id, "ProspectName": "Ann Marie O'Brien",
            "CompanyName": "Contoso", "PrimaryEmailAddress": "ann@contoso.test", "AddressZipCode": "98052",
            "Note": "Wants net 30", "RetailChannelOperatingUnitPartyNumber": "000123", **fields}


def key_url(entity_set, **key):
    literal = ",".join(f"{name}='" + value.replace("'", "''") + "'" for name, value in key.items())
    return f"/data/{entity_set}({quote(literal, safe='')})"


def ids(response):
    assert response.status_code == 200, response.text
    return [row["ProspectId"] for row in response.json()["value"]]


def inner_message(response):
    return response.json()["error"]["innererror"]["message"]


# --- authentication ------------------------------------------------------------------------------


def test_missing_token_is_401_with_challenge(api):
    response = api.get("/data/Prospects", headers={"Authorization": ""})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        'Bearer authorization_uri="https://login.test/11111111-2222-3333-4444-555555555555/oauth2/authorize", '
        f'resource_id="{COMMERCE}"'
    )
    error = response.json()["error"]
    assert error["code"] == "" and error["innererror"]["message"] == "no Authorization header"


def test_token_for_another_resource_is_401(api, issuer):
    token = issuer.issue(SYNC, "https://dataverse.test")["access_token"]
    response = api.get("/data/Prospects", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "audience" in inner_message(response)


def test_token_of_an_unregistered_app_is_401(api, issuer):
    token = issuer.issue(ClientRegistration("stranger", "s"), COMMERCE)["access_token"]
    response = api.get("/data/Prospects", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "stranger" in inner_message(response)


# --- reading -------------------------------------------------------------------------------------


def test_collection_shape(api, state):
    state.seed_prospects([prospect("P-1")])
    body = api.get("/data/Prospects").json()
    assert body["@odata.context"] == f"{COMMERCE}/data/$metadata#Prospects"
    [row] = body["value"]
    assert row["@odata.etag"].startswith('W/"')
    assert (row["IsB2BProspect"], row["B2BProspectStatus"], row["AddressCity"]) == ("Yes", "Pending", "")


def test_paging_follows_next_links_in_key_order(make_client, state):
    state.seed_prospects([prospect(f"P-{n:02d}") for n in (5, 3, 7, 1, 6, 2, 4)])
    api = make_client(page_size=3)
    url, pages = "/data/Prospects?$count=true", []
    while url:
        body = api.get(url).json()
        pages.append([row["ProspectId"] for row in body["value"]])
        assert body["@odata.count"] == 7
        url = body.get("@odata.nextLink")
        assert url is None or url.startswith(f"{COMMERCE}/data/Prospects?")
    assert pages == [["P-01", "P-02", "P-03"], ["P-04", "P-05", "P-06"], ["P-07"]]


def test_next_link_keeps_the_query_and_honours_top(make_client, state):
    state.seed_prospects([prospect(f"P-{n:02d}") for n in range(1, 10)])
    api = make_client(page_size=3)
    body = api.get("/data/Prospects", params={"$filter": "ProspectId ne 'P-02'", "$orderby": "ProspectId desc", "$top": "5"}).json()
    assert [row["ProspectId"] for row in body["value"]] == ["P-09", "P-08", "P-07"]
    body = api.get(body["@odata.nextLink"]).json()
    assert [row["ProspectId"] for row in body["value"]] == ["P-06", "P-05"]
    assert "@odata.nextLink" not in body


def test_prefer_maxpagesize_is_capped_by_the_server_page_size(make_client, state):
    state.seed_prospects([prospect(f"P-{n}") for n in range(1, 6)])
    api = make_client(page_size=3)
    response = api.get("/data/Prospects", headers={"Prefer": "odata.maxpagesize=2"})
    assert len(response.json()["value"]) == 2
    assert response.headers["Preference-Applied"] == "odata.maxpagesize=2"
    assert len(api.get("/data/Prospects", headers={"Prefer": "odata.maxpagesize=50"}).json()["value"]) == 3


def test_select_projects_rows_and_context(api, state):
    state.seed_prospects([prospect("P-1")])
    body = api.get("/data/Prospects?$select=ProspectId,CompanyName").json()
    assert body["@odata.context"] == f"{COMMERCE}/data/$metadata#Prospects(ProspectId,CompanyName)"
    assert set(body["value"][0]) == {"@odata.etag", "ProspectId", "CompanyName"}


def test_filters_with_enums_wildcards_and_doubled_quotes(api, state):
    state.seed_prospects([
        prospect("P-1"),
        prospect("P-2", ProspectName="Bob Smith", B2BProspectStatus="Approved"),
        prospect("P-3", ProspectName="Carol Smithers", IsB2BProspect="No"),
    ])
    pending = f"B2BProspectStatus eq {ENUM}RetailB2BProspectStatus'Pending'"
    assert ids(api.get("/data/Prospects", params={"$filter": pending})) == ["P-1", "P-3"]
    b2b = f"IsB2BProspect eq {ENUM}NoYes'Yes' and ProspectName eq '*SMITH*'"
    assert ids(api.get("/data/Prospects", params={"$filter": b2b})) == ["P-2"]
    assert ids(api.get("/data/Prospects", params={"$filter": "ProspectName eq 'Ann Marie O''Brien'"})) == ["P-1"]


def test_hostile_values_never_widen_a_query(api, state):
    state.seed_prospects([prospect("P-1"), prospect("P-2")])
    hostile = "' or 1 eq 1"
    escaped = hostile.replace("'", "''")
    assert ids(api.get("/data/Prospects", params={"$filter": f"ProspectId eq '{escaped}'"})) == []
    unescaped = api.get("/data/Prospects", params={"$filter": f"ProspectId eq '{hostile}'"})
    assert unescaped.status_code == 400


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"$filter": "ProspectId in ('P-1')"}, "operator 'in' is not supported"),
        ({"$filter": "contains(ProspectName,'Ann')"}, "function 'contains' is not supported"),
        ({"$filter": "B2BProspectStatus eq 'Pending'"}, "is an enum"),
        ({"$filter": "Nope eq 'x'"}, "Could not find a property named 'Nope'"),
        ({"$select": "Nope"}, "Could not find a property named 'Nope'"),
        ({"$apply": "groupby((dataAreaId))"}, "The query parameter $apply is not supported"),
    ],
)
def test_bad_queries_answer_odata_exceptions(api, params, message):
    response = api.get("/data/Prospects", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "An error has occurred."
    assert response.json()["error"]["innererror"]["type"] == "Microsoft.OData.ODataException"
    assert message in inner_message(response)


def test_companies_limit_what_is_visible(api, state):
    state.seed_prospects([prospect("P-1", "usrt"), prospect("P-2", "usmf"), prospect("P-3", "USRT")])
    assert ids(api.get("/data/Prospects")) == ["P-1", "P-3"]
    assert ids(api.get("/data/Prospects?cross-company=TRUE")) == ["P-2", "P-1", "P-3"]  # key order: usmf < usrt
    narrowed = api.get("/data/Prospects", params={"cross-company": "true", "$filter": "dataAreaId eq 'usmf'"})
    assert ids(narrowed) == ["P-2"]
    other_company = key_url("Prospects", dataAreaId="usmf", ProspectId="P-2")
    assert api.get(other_company).status_code == 404
    assert api.patch(other_company, json={"Note": "x"}).status_code == 404
    assert api.get(other_company + "?cross-company=true").json()["ProspectId"] == "P-2"


def test_key_values_survive_percent_encoding(api, state):
    awkward = "A/B#C?D%20E+F 'é' ü,x=y)"
    state.seed_prospects([prospect(awkward)])
    response = api.get(key_url("Prospects", dataAreaId="usrt", ProspectId=awkward))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ProspectId"] == awkward
    assert body["@odata.context"] == f"{COMMERCE}/data/$metadata#Prospects/$entity"
    assert api.get(key_url("Prospects", dataAreaId="USRT", ProspectId=awkward.upper())).status_code == 200


def test_key_values_may_hold_newlines(api, state):
    state.seed_prospects([prospect("line\nbreak")])
    response = api.get(key_url("Prospects", dataAreaId="usrt", ProspectId="line\nbreak"))
    assert response.status_code == 200, response.text
    assert response.json()["ProspectId"] == "line\nbreak"


def test_key_access_errors(api, state):
    state.seed_prospects([prospect("P-1")])
    missing = api.get(key_url("Prospects", ProspectId="P-1"))
    assert missing.status_code == 400 and "dataAreaId missing" in inner_message(missing)
    assert api.get("/data/Prospects(dataAreaId='usrt',ProspectId=P-1)").status_code == 400
    assert api.get("/data/Prospects(dataAreaId='usrt',ProspectId='P-1',Extra='x')").status_code == 400
    unknown = api.get(key_url("Prospects", dataAreaId="usrt", ProspectId="P-404"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"].startswith("No HTTP resource was found that matches the request URI")
    assert api.get("/data/NoSuchEntities").status_code == 404
    assert api.get(key_url("Prospects", dataAreaId="usrt", ProspectId="P-1") + "?$top=1").status_code == 400


# --- writing -------------------------------------------------------------------------------------


def test_create_read_update_delete_a_prospect(api):
    created = api.post("/data/Prospects", json={"ProspectId": "P-9", "ProspectName": "Dana Lee"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["dataAreaId"], body["ProspectId"], body["IsB2BProspect"]) == ("usrt", "P-9", "No")
    url = created.headers["Location"]
    assert url == f"{COMMERCE}/data/Prospects(dataAreaId='usrt',ProspectId='P-9')"
    assert api.get(url).json()["ProspectName"] == "Dana Lee"
    assert api.patch(url, json={"Note": "hello"}).status_code == 204
    assert api.get(url).json()["Note"] == "hello"
    assert api.delete(url).status_code == 204
    assert api.get(url).status_code == 404


def test_create_assigns_a_missing_key(api):
    body = api.post("/data/Prospects", json={"ProspectName": "No Id"}).json()
    assert body["ProspectId"] == "P-000001"


def test_create_of_an_existing_key_is_400(api, state):
    state.seed_prospects([prospect("P-1")])
    response = api.post("/data/Prospects", json={"dataAreaId": "usrt", "ProspectId": "p-1"})
    assert response.status_code == 400
    assert response.json()["error"]["innererror"]["type"].endswith("AxODataWriteException")
    assert inner_message(response) == (
        "Cannot create a record in Prospects (smmBusRelTable). dataAreaId: usrt, ProspectId: p-1. The record already exists."
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ProspectId": "P-1", "Colour": "red"}, "The property 'Colour' does not exist"),
        ({"ProspectId": "P-1", "IsB2BProspect": "Maybe"}, "'Maybe' of property 'IsB2BProspect'"),
        ({"ProspectId": "P-1", "ProspectName": 7}, "of property 'ProspectName' is not a valid string"),
    ],
)
def test_invalid_fields_are_400(api, body, message):
    response = api.post("/data/Prospects", json=body)
    assert response.status_code == 400
    assert message in inner_message(response)


def test_patch_errors(api, state):
    state.seed_prospects([prospect("P-1")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    assert api.patch(key_url("Prospects", dataAreaId="usrt", ProspectId="P-2"), json={"Note": "x"}).status_code == 404
    assert "'Colour'" in inner_message(api.patch(url, json={"Colour": "red"}))
    assert api.patch(url, json={"ProspectId": "P-7"}).status_code == 400
    etag = api.get(url).json()["@odata.etag"]
    assert api.patch(url, json={"Note": "first"}, headers={"If-Match": etag}).status_code == 204
    stale = api.patch(url, json={"Note": "second"}, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert api.patch(url, json={"Note": "third"}, headers={"If-Match": "*"}).status_code == 204


# --- prospect approval ---------------------------------------------------------------------------


def test_approval_sends_the_approved_email_once(api, state):
    state.seed_prospects([prospect("P-1")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    assert api.patch(url, json={"B2BProspectStatus": "Approved"}).status_code == 204
    [email] = state.outbox
    assert (email["template"], email["to"], email["dataAreaId"], email["ProspectId"]) == (
        "B2B prospect approved", "ann@contoso.test", "usrt", "P-1")
    assert email["fields"] == {"firstname": "Ann", "lastname": "Marie O'Brien", "company": "Contoso",
                               "email": "ann@contoso.test", "zipcode": "98052", "comments": "Wants net 30",
                               "storename": "000123"}
    assert email["sent_at"]
    again = api.patch(url, json={"B2BProspectStatus": "Rejected"})
    assert again.status_code == 400
    assert "Prospect P-1 in company usrt has B2B prospect status Approved" in inner_message(again)
    assert api.patch(url, json={"Note": "still editable"}).status_code == 204
    assert len(state.outbox) == 1


def test_rejection_sends_the_rejected_email(api, state):
    state.seed_prospects([prospect("P-1")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    assert api.patch(url, json={"B2BProspectStatus": "Rejected"}).status_code == 204
    [email] = state.outbox
    assert email["template"] == "B2B prospect rejected"
    assert email["fields"] == {"firstname": "Ann", "lastname": "Marie O'Brien", "company": "Contoso"}


@pytest.mark.parametrize("status", ["Unknown", "Pending"])
def test_other_status_moves_are_400(api, state, status):
    state.seed_prospects([prospect("P-1", B2BProspectStatus="Rejected" if status == "Pending" else "Pending")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    response = api.patch(url, json={"B2BProspectStatus": status})
    assert response.status_code == 400
    assert "Prospect P-1 in company usrt" in inner_message(response)
    assert state.outbox == []


# --- customers and hierarchies -------------------------------------------------------------------


def organization(api, name="Contoso"):
    response = api.post("/data/CustomersV3", json={"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": name})
    assert response.status_code == 201, response.text
    return response.json()


def person(api, email="ann@contoso.test", **fields):
    return api.post("/data/CustomersV3", json={"CustomerGroupId": "10", "PartyType": "Person", "PersonFirstName": "Ann",
                                               "PersonLastName": "O'Brien", "PrimaryContactEmail": email, **fields})


def test_customers_get_accounts_and_party_numbers(api):
    first = organization(api)
    second = person(api, PartyNumber="999").json()
    assert (first["dataAreaId"], first["CustomerAccount"], first["PartyNumber"]) == ("usrt", "USRT-000001", "000000001")
    assert (second["CustomerAccount"], second["PartyNumber"]) == ("USRT-000002", "000000002")
    chosen = api.post("/data/CustomersV3", json={"CustomerAccount": "US-042", "CustomerGroupId": "10", "PartyType": "Organization",
                                                 "OrganizationName": "Fabrikam"}).json()
    assert chosen["CustomerAccount"] == "US-042"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"PartyType": "Organization"}, "OrganizationName must be filled in"),
        ({"PartyType": "Person", "PersonFirstName": ""}, "PersonFirstName or PersonLastName must be filled in"),
        ({"PartyType": "Robot", "OrganizationName": "X"}, "PartyType 'Robot' is not valid"),
    ],
)
def test_customer_party_rules(api, body, message):
    response = api.post("/data/CustomersV3", json={"CustomerGroupId": "10", **body})
    assert response.status_code == 400
    assert message in inner_message(response)


NOT_A_GROUP = ("Write failed for table row of type 'CustomerV3'. Infolog: Error: The value '{}' in field 'Customer "
               "group' is not found in the relating table 'Customer groups'.")


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (None, "Field 'CustomerGroupId' must be filled in."),
        ("", "Field 'CustomerGroupId' must be filled in."),
        ("NO-SUCH", NOT_A_GROUP.format("NO-SUCH")),
    ],
)
def test_a_customer_needs_a_customer_group_of_its_company(api, state, group, message):
    """CustTable requires a customer group, one of the customer's company (F&O's foreign key)."""
    body = {"PartyType": "Organization", "OrganizationName": "Contoso"} | ({} if group is None else {"CustomerGroupId": group})
    response = api.post("/data/CustomersV3", json=body)
    assert (response.status_code, inner_message(response)) == (400, message)
    assert state.visible_rows(CUSTOMERS, "usrt", True) == [] and state.counts()["writes"]["CustomersV3"] == 0


def test_a_customer_group_is_checked_in_the_customers_company_on_create_and_update(api, state):
    with state.transaction():  # usmf without group 90: the groups are per company
        state._store(CUSTOMER_GROUPS, ("usmf", "90"), None)
    refused = api.post("/data/CustomersV3", json={"dataAreaId": "usmf", "CustomerGroupId": "90", "PartyType": "Organization",
                                                  "OrganizationName": "Contoso"})  # fmt: skip
    assert (refused.status_code, inner_message(refused)) == (400, NOT_A_GROUP.format("90"))
    created = organization(api)  # usrt, group 10
    assert created["CustomerGroupId"] == "10"
    url = key_url("CustomersV3", dataAreaId="usrt", CustomerAccount=created["CustomerAccount"])
    assert api.patch(url, json={"CustomerGroupId": "90"}).status_code == 204  # usrt has 90
    assert inner_message(api.patch(url, json={"CustomerGroupId": "NO-SUCH"})) == NOT_A_GROUP.format("NO-SUCH")
    assert inner_message(api.patch(url, json={"CustomerGroupId": ""})) == "Field 'CustomerGroupId' must be filled in."
    assert api.get(url).json()["CustomerGroupId"] == "90"


def test_person_email_is_unique_per_legal_entity(api, make_client):
    existing = person(api).json()
    duplicate = person(api, email="ANN@contoso.test")
    assert duplicate.status_code == 400
    assert "ANN@contoso.test" in inner_message(duplicate) and existing["CustomerAccount"] in inner_message(duplicate)
    assert person(make_client(OTHER)).status_code == 201  # another legal entity
    other = person(api, email="bob@contoso.test").json()
    url = key_url("CustomersV3", dataAreaId="usrt", CustomerAccount=other["CustomerAccount"])
    assert api.patch(url, json={"PrimaryContactEmail": "ann@CONTOSO.test"}).status_code == 400
    assert api.patch(url, json={"PartyNumber": "1"}).status_code == 400


def test_customer_hierarchy_rules(api):
    org = organization(api)
    individual = person(api).json()
    created = api.post("/data/CustomerHiearchies", json={"Name": "Contoso", "OrganizationPartyNumber": org["PartyNumber"],
                                                         "CurrentVersion": 9})
    assert created.status_code == 201, created.text
    hierarchy = created.json()
    assert (hierarchy["CustomerHierarchyId"], hierarchy["Purpose"], hierarchy["CurrentVersion"]) == ("CH-000001", "B2BOrganization", 1)
    assert created.headers["Location"].endswith("/data/CustomerHiearchies(CustomerHierarchyId='CH-000001')")
    not_an_org = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": individual["PartyNumber"]})
    assert not_an_org.status_code == 400 and individual["PartyNumber"] in inner_message(not_an_org)
    bad_purpose = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": org["PartyNumber"], "Purpose": "Retail"})
    assert bad_purpose.status_code == 400 and "'Retail' of property 'Purpose'" in inner_message(bad_purpose)
    assert api.get("/data/CustomerHiearchies('CH-000001')").json()["Name"] == "Contoso"


def test_hierarchy_nodes_have_one_admin(api):
    org = organization(api)
    admin, user, second = (person(api, email=f"{n}@contoso.test").json() for n in ("a", "u", "s"))
    hierarchy = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": org["PartyNumber"]}).json()
    hierarchy_id = hierarchy["CustomerHierarchyId"]

    def node(party, role, hierarchy_id=hierarchy_id):
        return api.post("/data/CustomerHierarchyNodes", json={"CustomerHierarchyId": hierarchy_id,
                                                              "NodePartyNumber": party, "Role": role})

    first = node(admin["PartyNumber"], "Admin")
    assert first.status_code == 201, first.text
    assert (first.json()["NodeType"], first.json()["VersionAdded"], first.json()["VersionRemoved"]) == ("Customer", 1, 0)
    assert node(user["PartyNumber"], "User").status_code == 201
    duplicate = node(admin["PartyNumber"], "User")
    assert duplicate.status_code == 400 and "The record already exists" in inner_message(duplicate)
    second_admin = node(second["PartyNumber"], "Admin")
    assert second_admin.status_code == 400 and "only one Admin" in inner_message(second_admin)
    user_url = key_url("CustomerHierarchyNodes", CustomerHierarchyId=hierarchy_id, NodePartyNumber=user["PartyNumber"])
    assert api.patch(user_url, json={"Role": "Admin"}).status_code == 400
    admin_url = key_url("CustomerHierarchyNodes", CustomerHierarchyId=hierarchy_id, NodePartyNumber=admin["PartyNumber"])
    assert api.patch(admin_url, json={"VersionRemoved": 1}).status_code == 204
    assert node(second["PartyNumber"], "Admin").status_code == 201
    assert "does not exist" in inner_message(node(admin["PartyNumber"], "User", hierarchy_id="CH-404"))
    assert "not the party of a customer" in inner_message(node("000999999", "User"))
    assert node(admin["PartyNumber"], "Owner").status_code == 400


# --- state API -----------------------------------------------------------------------------------


def test_counts_requests_and_successful_writes(api, state):
    state.seed_prospects([prospect("P-1")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    api.get("/data/Prospects")
    api.patch(url, json={"B2BProspectStatus": "Approved"})
    api.patch(url, json={"B2BProspectStatus": "Approved"})  # 400: not a write
    organization(api)
    api.get("/data/Prospects", headers={"Authorization": ""})
    assert state.counts() == {"requests": 5, "writes": {"Prospects": 1, "CustomersV3": 1,
                                                        "CustomerHiearchies": 0, "CustomerHierarchyNodes": 0}}
    state.reset()
    assert state.counts()["requests"] == 0 and state.outbox == []
    assert state.visible_rows(PROSPECTS, "usrt", True) == []


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([prospect("P-1"), {"ProspectId": "P-2"}], r"prospects\[1\] \(ProspectId 'P-2'\): dataAreaId is required"),
        ([prospect("P-1", B2BProspectStatus="Done")], r"prospects\[0\] \(ProspectId 'P-1'\).*'Done' of property 'B2BProspectStatus'"),
        ([prospect("P-1", Shoe="9")], r"prospects\[0\].*'Shoe'"),
        ([prospect("P-1"), prospect("p-1")], r"prospects\[1\].*already exists"),
    ],
)
def test_seed_prospects_validates_every_row(state, rows, message):
    with pytest.raises(ValueError, match=message):
        state.seed_prospects(rows)
    assert state.visible_rows(PROSPECTS, "usrt", True) == []  # all or nothing


def test_select_projects_every_page_and_survives_next_links(make_client, state):
    state.seed_prospects([prospect(f"P-{n}") for n in range(1, 6)])
    api = make_client(page_size=2)
    url, pages = "/data/Prospects?$select=ProspectId&$filter=ProspectId ne 'P-3'", []
    while url:
        body = api.get(url).json()
        assert body["@odata.context"] == f"{COMMERCE}/data/$metadata#Prospects(ProspectId)"
        pages.append([sorted(row) for row in body["value"]])
        url = body.get("@odata.nextLink")
    assert pages == [[["@odata.etag", "ProspectId"]] * 2] * 2
    assert api.get("/data/Prospects?$select=Nope&$filter=ProspectId eq 'none'").status_code == 400


def test_rows_handed_out_do_not_change_under_later_writes(api, state):
    state.seed_prospects([prospect("P-1")])
    [before] = state.visible_rows(PROSPECTS, "usrt", False)
    api.patch(key_url("Prospects", dataAreaId="usrt", ProspectId="P-1"), json={"Note": "changed"})
    [after] = state.visible_rows(PROSPECTS, "usrt", False)
    assert (before["Note"], after["Note"]) == ("Wants net 30", "changed")


def test_the_indexed_rules_hold_on_large_tables(state):
    """Create rules use indexes, not scans (speed is `make bench`'s business); they still bite."""
    for n in range(20_000):
        state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Person", "PersonLastName": "Lee", "PrimaryContactEmail": f"p{n}@x.test"},
                     "usrt")
    with pytest.raises(ODataError, match="already the primary contact email of customer USRT-020000"):
        state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Person", "PersonLastName": "Lee", "PrimaryContactEmail": "P19999@x.test"},
                     "usrt")


# --- companies of writes, per-company number sequences -------------------------------------------


def customer_in(api, company=None, party_type="Organization", **fields):
    """A customer created in `company` (None: the payload names none, so the caller's default company)."""
    names = {"OrganizationName": "Contoso"} if party_type == "Organization" else {"PersonLastName": "Lee"}
    where = {} if company is None else {"dataAreaId": company}
    response = api.post("/data/CustomersV3", json={**where, "CustomerGroupId": "10", "PartyType": party_type, **names, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_customer_accounts_come_from_a_sequence_per_company(api, make_client):
    """F&O's customer account sequence is company-scoped; the party number (global address book) is not."""
    first_usrt = customer_in(api, "usrt")
    first_usmf = customer_in(api, "USMF")
    assert (first_usrt["dataAreaId"], first_usrt["CustomerAccount"], first_usrt["PartyNumber"]) == ("usrt", "USRT-000001", "000000001")
    assert (first_usmf["dataAreaId"], first_usmf["CustomerAccount"], first_usmf["PartyNumber"]) == ("usmf", "USMF-000001", "000000002")
    # A value a caller chose in a company is skipped by that company's sequence only.
    assert customer_in(api, "usrt", CustomerAccount="usrt-000002")["CustomerAccount"] == "usrt-000002"
    assert customer_in(api, "usrt")["CustomerAccount"] == "USRT-000003"
    assert customer_in(make_client(OTHER))["CustomerAccount"] == "USMF-000002"  # usmf, the caller's default company
    assert customer_in(api, "usrt", "Person", PrimaryContactEmail="a@b.test")["PartyNumber"] == "000000006"
    duplicate = api.post("/data/CustomersV3", json={"dataAreaId": "usmf", "CustomerAccount": "USMF-000001",
                                                    "CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "Again"})
    assert duplicate.status_code == 400 and "The record already exists" in inner_message(duplicate)


def test_a_sequence_skips_many_chosen_values_once(state):
    for n in range(1, 2001):
        state.create(CUSTOMERS, {"CustomerAccount": f"USRT-{n:06d}", "CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "X"}, "usrt")
    drawn = [state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "Y"}, "usrt")["CustomerAccount"]
             for _ in range(3)]
    assert drawn == ["USRT-002001", "USRT-002002", "USRT-002003"]
    assert state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "Z"}, "usmf")["CustomerAccount"] == "USMF-000001"


def test_a_hierarchy_is_created_in_the_company_its_payload_names(api, make_client):
    org_usmf = customer_in(api, "usmf")
    org_usrt = customer_in(api, "usrt")
    named = api.post("/data/CustomerHiearchies", json={"dataAreaId": "USMF", "OrganizationPartyNumber": org_usmf["PartyNumber"]})
    assert named.status_code == 201, named.text
    assert named.json()["dataAreaId"] == "usmf"
    defaulted = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": org_usrt["PartyNumber"]})
    assert defaulted.status_code == 201, defaulted.text
    assert defaulted.json()["dataAreaId"] == "usrt"  # the caller's default company
    # Without cross-company only the caller's company is visible, by key as in a collection.
    assert [row["dataAreaId"] for row in api.get("/data/CustomerHiearchies").json()["value"]] == ["usrt"]
    usmf_url = named.headers["Location"]
    assert api.get(usmf_url).status_code == 404
    assert api.get(usmf_url + "?cross-company=true").json()["dataAreaId"] == "usmf"
    assert make_client(OTHER).get(usmf_url).status_code == 200
    moved = api.patch(usmf_url + "?cross-company=true", json={"dataAreaId": "usrt"})
    assert moved.status_code == 400 and "'dataAreaId' of CustomerHiearchies cannot be changed" in inner_message(moved)


def test_a_hierarchy_organization_must_be_a_customer_of_its_company(api):
    org_usmf = customer_in(api, "usmf")
    org_usrt = customer_in(api, "usrt")
    wrong = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": org_usmf["PartyNumber"]})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["innererror"]["type"].endswith("AxODataWriteException")
    assert inner_message(wrong) == (
        f"OrganizationPartyNumber '{org_usmf['PartyNumber']}' is the party of customer USMF-000001 in company usmf, "
        "not of a customer in company usrt, the company of customer hierarchy CH-000001."
    )
    hierarchy = api.post("/data/CustomerHiearchies", json={"OrganizationPartyNumber": org_usrt["PartyNumber"]}).json()
    url = key_url("CustomerHiearchies", CustomerHierarchyId=hierarchy["CustomerHierarchyId"])
    repointed = api.patch(url, json={"OrganizationPartyNumber": org_usmf["PartyNumber"]})
    assert repointed.status_code == 400 and "in company usmf" in inner_message(repointed)
    assert api.patch(url, json={"Name": "Contoso B2B"}).status_code == 204


def test_a_node_takes_its_hierarchy_company_and_a_customer_of_it(api):
    org = customer_in(api, "usmf")
    admin_usmf = customer_in(api, "usmf", "Person", PrimaryContactEmail="ann@contoso.test")
    person_usrt = customer_in(api, "usrt", "Person", PrimaryContactEmail="ann@contoso.test")
    hierarchy_id = api.post("/data/CustomerHiearchies", json={"dataAreaId": "usmf",
                                                             "OrganizationPartyNumber": org["PartyNumber"]}).json()["CustomerHierarchyId"]

    def node(party, **fields):
        return api.post("/data/CustomerHierarchyNodes", json={"CustomerHierarchyId": hierarchy_id, "NodePartyNumber": party,
                                                              "Role": "Admin", **fields})

    other_company = node(person_usrt["PartyNumber"])
    assert other_company.status_code == 400
    assert inner_message(other_company) == (
        f"NodePartyNumber '{person_usrt['PartyNumber']}' is the party of customer {person_usrt['CustomerAccount']} in "
        f"company usrt, not of a customer in company usmf, the company of customer hierarchy {hierarchy_id}."
    )
    named_elsewhere = node(admin_usmf["PartyNumber"], dataAreaId="usrt")
    assert named_elsewhere.status_code == 400
    assert inner_message(named_elsewhere) == (
        f"Customer hierarchy {hierarchy_id} belongs to company usmf; its nodes cannot be created in company usrt."
    )
    created = node(admin_usmf["PartyNumber"])  # the caller's default company is usrt: the node goes to usmf
    assert created.status_code == 201, created.text
    assert created.json()["dataAreaId"] == "usmf"
    assert node(org["PartyNumber"], Role="User", dataAreaId="USMF").status_code == 201


# --- the reads the product makes -----------------------------------------------------------------


def values(response):
    assert response.status_code == 200, response.text
    return response.json()["value"]


def test_customers_by_company_and_email_across_companies(api):
    mine = customer_in(api, "usrt", "Person", PrimaryContactEmail="A@B.com")
    customer_in(api, "usmf", "Person", PrimaryContactEmail="a@b.com")
    customer_in(api, "usrt", "Person", PrimaryContactEmail="c@b.com")
    query = {"cross-company": "true", "$filter": "dataAreaId eq 'usrt' and PrimaryContactEmail eq 'a@b.com'"}
    assert [(row["dataAreaId"], row["CustomerAccount"]) for row in values(api.get("/data/CustomersV3", params=query))] == [
        ("usrt", mine["CustomerAccount"])]


def test_customer_account_across_companies(api):
    """Two companies may hold the same account (chosen by the caller here): the key is dataAreaId + CustomerAccount."""
    customer_in(api, "usrt", CustomerAccount="C000001")
    customer_in(api, "usmf", CustomerAccount="C000001")
    customer_in(api, "usmf")
    query = {"cross-company": "true", "$filter": "CustomerAccount eq 'c000001'"}
    assert [(row["dataAreaId"], row["CustomerAccount"]) for row in values(api.get("/data/CustomersV3", params=query))] == [
        ("usmf", "C000001"), ("usrt", "C000001")]
    assert [row["dataAreaId"] for row in values(api.get("/data/CustomersV3", params={"$filter": "CustomerAccount eq 'C000001'"}))] == ["usrt"]


def test_hierarchies_by_organization_and_purpose_and_nodes_by_party_across_companies(api, make_client):
    org = customer_in(api, "usmf")
    other = customer_in(api, "usmf", OrganizationName="Fabrikam")
    person_ = customer_in(api, "usmf", "Person", PrimaryContactEmail="ann@contoso.test")
    ours = api.post("/data/CustomerHiearchies", json={"dataAreaId": "usmf", "OrganizationPartyNumber": org["PartyNumber"],
                                                     "Name": "Contoso"}).json()
    api.post("/data/CustomerHiearchies", json={"dataAreaId": "usmf", "OrganizationPartyNumber": other["PartyNumber"]})
    api.post("/data/CustomerHierarchyNodes", json={"CustomerHierarchyId": ours["CustomerHierarchyId"],
                                                   "NodePartyNumber": person_["PartyNumber"], "Role": "Admin"})
    purpose = f"{ENUM}CustHierarchyPurpose'B2BOrganization'"
    query = {"cross-company": "true",
             "$filter": f"OrganizationPartyNumber eq '{org['PartyNumber']}' and Purpose eq {purpose}"}
    found = values(api.get("/data/CustomerHiearchies", params=query))
    assert [(row["CustomerHierarchyId"], row["dataAreaId"], row["Name"]) for row in found] == [
        (ours["CustomerHierarchyId"], "usmf", "Contoso")]
    assert values(api.get("/data/CustomerHiearchies", params={"$filter": query["$filter"]})) == []  # usrt, the default
    nodes = values(api.get("/data/CustomerHierarchyNodes", params={
        "cross-company": "true", "$filter": f"NodePartyNumber eq '{person_['PartyNumber']}'"}))
    assert [(row["CustomerHierarchyId"], row["Role"], row["dataAreaId"]) for row in nodes] == [
        (ours["CustomerHierarchyId"], "Admin", "usmf")]
    assert values(api.get("/data/CustomerHierarchyNodes", params={
        "cross-company": "true", "$filter": "NodePartyNumber eq '000000999'"})) == []


# --- a clerk corrects a prospect -----------------------------------------------------------------


def test_correcting_a_pending_prospect_changes_its_etag(api, state):
    state.seed_prospects([prospect("P-1")])
    url = key_url("Prospects", dataAreaId="usrt", ProspectId="P-1")
    before = api.get(url).json()
    corrected = {"PrimaryEmailAddress": "ann.obrien@contoso.test", "PrimaryPhoneNumber": "+1 425 555 0100",
                 "AddressCity": "Redmond", "CompanyName": "Contoso Ltd"}
    response = api.patch(url, json=corrected, headers={"If-Match": before["@odata.etag"]})
    assert response.status_code == 204, response.text
    after = api.get(url).json()
    assert {name: after[name] for name in corrected} == corrected
    assert after["B2BProspectStatus"] == "Pending"
    assert after["@odata.etag"] != before["@odata.etag"]
    assert api.patch(url, json={"Note": "late"}, headers={"If-Match": before["@odata.etag"]}).status_code == 412
    assert state.outbox == []


def test_a_rolled_back_write_frees_its_company_numbers(state):
    with pytest.raises(ODataError):
        with state.transaction():
            state.create(CUSTOMERS, {"dataAreaId": "usmf", "CustomerAccount": "USMF-000001", "CustomerGroupId": "10", "PartyType": "Organization",
                                     "OrganizationName": "X"}, "usrt")
            state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Robot"}, "usrt")
    assert state.visible_rows(CUSTOMERS, "usrt", True) == []
    assert state.create(CUSTOMERS, {"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "Y"}, "usmf")["CustomerAccount"] == "USMF-000001"
