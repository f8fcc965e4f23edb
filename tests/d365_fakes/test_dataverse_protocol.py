"""What real Dataverse clients rely on beyond rows: `$count`, the entity id of an upsert by key,
`return=representation` on PATCH, conditional reads, request ids, rate-limit headers and the codes
of unknown names. Driven in-process, with service protection as the served fakes have it."""

import re
import uuid
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient
from test_dataverse import (  # noqa: F401 (api, issuer and state are fixtures)
    API_ROOT,
    INTEGRATION,
    MISSING_ID,
    ORG_URL,
    SELLER,
    api,
    bearer,
    by_prospect_id,
    create,
    error_of,
    issuer,
    state,
    upserted_id,
)

from d365_fakes.dataverse import DataverseState, company_id, create_app, fault_response
from d365_fakes.faults import Fault
from d365_fakes.limits import Limits, ServiceProtection, ServiceProtectionMiddleware
from d365_fakes.tokens import TokenIssuer

REQUEST_ID = "x-ms-service-request-id"
BURST = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME = "x-ms-ratelimit-time-remaining-xrm-requests"


@pytest.fixture
def protected(state: DataverseState, issuer: TokenIssuer) -> Iterator[TestClient]:
    """The Web API behind service protection (5 requests per window), as `serve` builds it."""
    clients = {client.client_id: client for client in (INTEGRATION, SELLER)}
    app = create_app(state, issuer, ORG_URL, clients)
    protection = ServiceProtection(Limits(dataverse_requests=5, dataverse_execution_s=1200))
    app.add_middleware(
        ServiceProtectionMiddleware, protection=protection, system="dataverse", path_prefix=API_ROOT + "/"
    )
    with TestClient(app, base_url=f"{ORG_URL}{API_ROOT}/") as client:
        client.headers["Authorization"] = bearer(issuer, INTEGRATION)
        yield client


def request_id(response) -> str:
    """The answer's request id: a GUID, the same as its REQ_ID."""
    value = response.headers[REQUEST_ID]
    assert str(uuid.UUID(value)) == value
    assert response.headers["REQ_ID"] == value
    return value


# --- $count ---------------------------------------------------------------------------------------


def test_count_segment_answers_the_number_of_rows_as_plain_text(api: TestClient) -> None:
    assert api.get("leads/$count").text == "0"
    for name in ("Ada", "Grace", "Alan"):
        create(api, "leads", {"lastname": name})
    response = api.get("leads/$count")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text == "3"
    assert api.get("leads/$count", params={"$filter": "startswith(lastname,'A')"}).text == "2"
    assert api.get("accounts/$count").text == "0"


def test_count_of_a_row_or_an_unknown_set_is_refused(api: TestClient) -> None:
    lead_id = create(api, "leads", {"lastname": "Ada"})
    on_a_row = error_of(api.get(f"leads({lead_id})/$count"), 400)
    assert on_a_row["code"] == "0x8006088a"
    assert "$count cannot be applied to the segment 'leads'" in on_a_row["message"]
    assert error_of(api.get("prospects/$count"), 404) == {
        "code": "0x8006088a",
        "message": "Resource not found for the segment 'prospects'.",
    }
    assert error_of(api.get("leads/$count", params={"$select": "lastname"}), 400)["code"] == "0x8006088a"


# --- OData-EntityId, return=representation ----------------------------------------------------


def test_upsert_names_the_row_by_the_key_it_was_addressed_by(api: TestClient) -> None:
    lead_id = upserted_id(api, by_prospect_id("O'Brien #1"), {"lastname": "Ada"})
    by_id = api.patch(f"leads({lead_id})", json={"lastname": "Grace"})
    assert by_id.status_code == 204
    assert by_id.headers["OData-EntityId"] == f"{ORG_URL}{API_ROOT}/leads({lead_id})"


def test_upsert_by_key_with_company_names_both_key_parts(api: TestClient, state: DataverseState) -> None:
    state.seed_companies(["usrt"])
    key_url = by_prospect_id("P-1", "usrt")
    response = api.patch(key_url, json={"lastname": "Ada"})
    assert response.headers["OData-EntityId"] == (
        f"{ORG_URL}{API_ROOT}/leads(msdyn_prospectid='P-1',_msdyn_company_value={company_id('usrt')})"
    )


def test_patch_with_return_representation_answers_the_row_201_created_200_updated(api: TestClient) -> None:
    prefer = {"Prefer": "return=representation"}
    created = api.patch(by_prospect_id("P-7"), json={"lastname": "Ada"}, headers=prefer)
    assert created.status_code == 201
    assert created.headers["Preference-Applied"] == "return=representation"
    assert created.json()["lastname"] == "Ada" and created.json()["msdyn_prospectid"] == "P-7"
    updated = api.patch(
        by_prospect_id("P-7"), params={"$select": "lastname"}, json={"lastname": "Lovelace"}, headers=prefer
    )
    assert updated.status_code == 200
    body = updated.json()
    assert set(body) == {"@odata.context", "@odata.etag", "leadid", "lastname"}
    assert body["lastname"] == "Lovelace" and body["leadid"] == created.json()["leadid"]
    assert body["@odata.context"] == f"{ORG_URL}{API_ROOT}/$metadata#leads(lastname)/$entity"
    assert body["@odata.etag"] != created.json()["@odata.etag"]
    assert updated.headers["OData-EntityId"].endswith(by_prospect_id("P-7"))


def test_patch_with_an_unknown_select_column_writes_nothing(api: TestClient) -> None:
    lead_id = create(api, "leads", {"lastname": "Ada"})
    prefer = {"Prefer": "return=representation"}
    refused = api.patch(f"leads({lead_id})", params={"$select": "nickname"}, json={"lastname": "X"}, headers=prefer)
    assert error_of(refused, 400)["code"] == "0x80060888"
    assert api.get(f"leads({lead_id})").json()["lastname"] == "Ada"


# --- If-None-Match ---------------------------------------------------------------------------------


def test_read_with_the_current_etag_is_not_modified(api: TestClient) -> None:
    lead_id = create(api, "leads", {"lastname": "Ada"})
    etag = api.get(f"leads({lead_id})").json()["@odata.etag"]
    unchanged = api.get(f"leads({lead_id})", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    api.patch(f"leads({lead_id})", json={"lastname": "Lovelace"})
    changed = api.get(f"leads({lead_id})", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["lastname"] == "Lovelace" and changed.json()["@odata.etag"] != etag
    assert api.get(f"leads({lead_id})", headers={"If-None-Match": "null"}).status_code == 200


# --- request ids and rate-limit headers -------------------------------------------------------------


def test_every_answer_carries_a_new_request_id(api: TestClient, issuer: TokenIssuer) -> None:
    answers = [
        api.get("leads"),
        api.post("leads", json={"lastname": "Ada"}),
        api.get(f"leads({MISSING_ID})"),
        api.get("nosuchset"),
        api.get("leads", headers={"Authorization": "Bearer not-a-jwt"}),
    ]
    assert [answer.status_code for answer in answers] == [200, 204, 404, 404, 401]
    ids = [request_id(answer) for answer in answers]
    assert len(set(ids)) == len(ids)


def test_faults_and_429s_carry_a_request_id_and_rate_limit_headers(protected: TestClient) -> None:
    fault = fault_response(Fault(status=503), challenge="Bearer").headers
    assert str(uuid.UUID(fault["x-ms-service-request-id"])) == fault["req_id"]
    answers = [protected.get("leads") for _ in range(6)]
    assert [answer.status_code for answer in answers] == [200] * 5 + [429]
    assert [answer.headers[BURST] for answer in answers] == ["4", "3", "2", "1", "0", "0"]
    assert answers[-1].json()["error"]["code"] == "0x80072322"
    assert len({request_id(answer) for answer in answers}) == 6
    for answer in answers:
        assert re.fullmatch(r"\d{1,3}(,\d{3})*\.\d\d", answer.headers[TIME])
    assert float(answers[0].headers[TIME].replace(",", "")) <= 1200


# --- unknown names -----------------------------------------------------------------------------------


def test_unknown_entity_set_and_property_codes(api: TestClient) -> None:
    assert error_of(api.get("nosuchset"), 404) == {
        "code": "0x8006088a",
        "message": "Resource not found for the segment 'nosuchset'.",
    }
    unknown = {"code": "0x80060888", "message": "Could not find a property named 'nickname' on type 'Microsoft.Dynamics.CRM.lead'."}
    assert error_of(api.get("leads", params={"$select": "lastname,nickname"}), 400) == unknown
    assert error_of(api.get("leads", params={"$filter": "nickname eq 'x'"}), 400) == unknown
    assert error_of(api.get("leads", params={"$orderby": "nickname desc"}), 400) == unknown
    assert error_of(api.post("leads", json={"nickname": "x"}), 400) == unknown
    lead_id = create(api, "leads", {"lastname": "Ada"})
    assert error_of(api.get(f"leads({lead_id})", params={"$select": "nickname"}), 400) == unknown
    assert error_of(api.get("accounts", params={"$select": "nickname"}), 400)["message"].endswith(
        "on type 'Microsoft.Dynamics.CRM.account'."
    )


# --- formatted values ----------------------------------------------------------------------------------


FORMATTED = "@OData.Community.Display.V1.FormattedValue"


def test_formatted_values_name_choices_booleans_dates_and_lookups(api: TestClient) -> None:
    account_id = create(api, "accounts", {"name": "Contoso"})
    lead_id = create(api, "leads", {
        "lastname": "Ada", "leadsourcecode": 8, "msdyn_b2bcommerceprospect": True,
        "parentaccountid@odata.bind": f"accounts({account_id})",
    })  # fmt: skip
    prefer = {"Prefer": 'odata.include-annotations="*"'}
    response = api.get(f"leads({lead_id})", headers=prefer)
    assert response.headers["Preference-Applied"] == 'odata.include-annotations="*"'
    lead = response.json()
    assert (lead["statecode" + FORMATTED], lead["statuscode" + FORMATTED]) == ("Open", "New")
    assert lead["leadsourcecode" + FORMATTED] == "Web"
    assert lead["msdyn_b2bcommerceprospect" + FORMATTED] == "Yes"
    assert lead["_parentaccountid_value" + FORMATTED] == "Contoso"
    assert lead["_parentaccountid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "account"
    assert lead["_parentaccountid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == "parentaccountid"
    assert lead["_ownerid_value" + FORMATTED] == "B2B onboarding"
    assert lead["_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "systemuser"
    assert re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d\d [AP]M", lead["createdon" + FORMATTED])
    assert "lastname" + FORMATTED not in lead and "_parentcontactid_value" + FORMATTED not in lead  # text, empty lookup
    plain = api.get(f"leads({lead_id})").json()
    assert not [name for name in plain if "@" in name and name != "@odata.context" and name != "@odata.etag"]


def test_only_the_annotations_asked_for_are_included(api: TestClient) -> None:
    account_id = create(api, "accounts", {"name": "Contoso"})
    create(api, "leads", {"lastname": "Ada", "parentaccountid@odata.bind": f"accounts({account_id})"})
    prefer = {"Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue",odata.maxpagesize=5'}
    response = api.get("leads", params={"$select": "statecode,_parentaccountid_value"}, headers=prefer)
    assert response.headers["Preference-Applied"] == (
        'odata.include-annotations="OData.Community.Display.V1.FormattedValue", odata.maxpagesize=5'
    )
    [lead] = response.json()["value"]
    assert lead["statecode" + FORMATTED] == "Open" and lead["_parentaccountid_value" + FORMATTED] == "Contoso"
    assert not [name for name in lead if name.endswith("lookuplogicalname")]
    updated = api.patch(
        "leads(" + lead["leadid"] + ")", params={"$select": "statecode"}, json={"firstname": "A"},
        headers={"Prefer": 'return=representation,odata.include-annotations="*"'},
    )  # fmt: skip
    assert updated.status_code == 200 and updated.json()["statecode" + FORMATTED] == "Open"
    assert updated.headers["Preference-Applied"] == 'return=representation, odata.include-annotations="*"'


def test_create_with_return_representation_honours_select_and_annotations(api: TestClient) -> None:
    prefer = {"Prefer": 'return=representation,odata.include-annotations="OData.Community.Display.V1.FormattedValue"'}
    created = api.post("leads", params={"$select": "lastname,statecode"}, json={"lastname": "Ada"}, headers=prefer)
    assert created.status_code == 201
    assert set(created.json()) == {
        "@odata.context", "@odata.etag", "leadid", "lastname", "statecode", "statecode" + FORMATTED,
    }  # fmt: skip
    assert created.json()["@odata.context"].endswith("$metadata#leads(lastname,statecode)/$entity")
    refused = api.post("leads", params={"$select": "nickname"}, json={"lastname": "Grace"}, headers=prefer)
    assert error_of(refused, 400)["code"] == "0x80060888"
    assert api.get("leads/$count").text == "1"  # the refused create wrote nothing
