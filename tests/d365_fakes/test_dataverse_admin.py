"""The Dataverse part of `/_admin`: record-level rejections and sellers' decisions in bulk."""

from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient
from test_dataverse import (  # noqa: F401 (issuer and state are fixtures)
    API_ROOT,
    INTEGRATION,
    ORG_URL,
    SELLER,
    bearer,
    by_prospect_id,
    create,
    error_of,
    issuer,
    qualify,
    state,
)

from d365_fakes.admin import create_admin_router
from d365_fakes.commerce import CommerceState
from d365_fakes.dataverse import DataverseState, company_id, create_app
from d365_fakes.faults import FaultPlan
from d365_fakes.tokens import TokenIssuer

ADMIN = f"{ORG_URL}/_admin"


@pytest.fixture
def api(state: DataverseState, issuer: TokenIssuer) -> Iterator[TestClient]:
    """The Web API with `/_admin` mounted alongside, as on each of the fakes' servers."""
    clients = {client.client_id: client for client in (INTEGRATION, SELLER)}
    app = create_app(state, issuer, ORG_URL, clients)
    app.include_router(create_admin_router(CommerceState(), state, issuer, FaultPlan()), prefix="/_admin")
    with TestClient(app, base_url=f"{ORG_URL}{API_ROOT}/") as client:
        client.headers["Authorization"] = bearer(issuer, INTEGRATION)
        yield client


def reject(api: TestClient, **rejection: object) -> httpx.Response:
    return api.post(f"{ADMIN}/dataverse/rejections", json=rejection)


def decide(api: TestClient, *decisions: tuple[str, str], **options: object) -> httpx.Response:
    items = [{"msdyn_prospectid": key, "outcome": outcome} for key, outcome in decisions]
    return api.post(f"{ADMIN}/dataverse/decisions", json={"decisions": items, **options})


def test_a_rejection_fails_every_write_of_that_record_as_a_plugin_would(
    api: TestClient, state: DataverseState
) -> None:
    state.seed_companies(["usrt"])
    blocked = "P-000007"
    usrt = {"msdyn_company@odata.bind": f"/cdm_companies({company_id('usrt')})"}
    existing = create(api, "leads", {"msdyn_prospectid": blocked, **usrt, "lastname": "A", "companyname": "A"})
    rejection = {"entity_set": "leads", "column": "msdyn_prospectid", "value": blocked}
    assert reject(api, **rejection, message="Prospect is under review").status_code == 204
    aborted = {"code": "0x80040265", "message": "ISV code aborted the operation: Prospect is under review"}
    assert error_of(api.patch(by_prospect_id(blocked, "usrt"), json={"lastname": "B"}), 400) == aborted
    assert error_of(api.patch(f"leads({existing})", json={"statecode": 2}), 400) == aborted
    assert error_of(qualify(api, existing), 400) == aborted
    assert api.get("accounts").json()["value"] == []  # the action rolled back whole
    assert api.get(f"leads({existing})").json()["lastname"] == "A"
    assert reject(api, **{**rejection, "value": "P-000009"}, message="No").status_code == 204
    created = api.patch(by_prospect_id("P-000009", "usrt"), json={"lastname": "New"})
    assert error_of(created, 400)["message"] == "ISV code aborted the operation: No"
    assert api.patch(by_prospect_id("P-000008", "usrt"), json={"lastname": "Fine"}).status_code == 204
    assert len(api.get("leads").json()["value"]) == 2

    assert api.delete(f"{ADMIN}/dataverse/rejections").status_code == 204
    assert api.patch(by_prospect_id(blocked, "usrt"), json={"lastname": "B"}).status_code == 204


def test_a_rejection_without_a_message_and_reset_clears_rejections(api: TestClient) -> None:
    assert reject(api, entity_set="accounts", column="name", value="Blocked Ltd").status_code == 204
    assert error_of(api.post("accounts", json={"name": "Blocked Ltd"}), 400) == {
        "code": "0x80040265",
        "message": "ISV code aborted the operation.",
    }
    assert api.post("accounts", json={"name": "blocked ltd"}).status_code == 204  # as compared
    assert api.post(f"{ADMIN}/reset").status_code == 204
    assert api.post("accounts", json={"name": "Blocked Ltd"}).status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        {"entity_set": "prospects", "column": "name", "value": "x"},
        {"entity_set": "systemusers", "column": "fullname", "value": "x"},
        {"entity_set": "leads", "column": "nickname", "value": "x"},
        {"entity_set": "leads", "column": "lastname", "value": None},
        {"entity_set": "leads", "column": "lastname", "value": ["x"]},
        {"entity_set": "leads", "column": "lastname", "value": "x", "message": 7},
        {"entity_set": "leads", "column": "lastname", "value": "x", "colour": "red"},
    ],
)
def test_malformed_rejections_are_refused(api: TestClient, body: dict) -> None:
    response = reject(api, **body)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert api.post("leads", json={"lastname": "x"}).status_code == 204


def seed_leads(api: TestClient, *keys: str) -> dict[str, str]:
    columns = {"firstname": "Ada", "lastname": "Lovelace"}
    return {
        key: create(api, "leads", {"msdyn_prospectid": key, "companyname": f"{key} Ltd", **columns})
        for key in keys
    }


def opportunity_of(api: TestClient, lead_id: str) -> dict:
    [opportunity] = api.get(f"opportunities?$filter=_originatingleadid_value eq {lead_id}").json()["value"]
    return opportunity


def test_decisions_apply_each_outcome_through_the_web_api_actions(
    api: TestClient, state: DataverseState
) -> None:
    leads = seed_leads(api, "P-won", "P-lost", "P-disqualified", "P-qualified")
    requests = state.counts()["requests"]
    decisions = [("P-won", "won"), ("p-lost", "lost"), ("P-disqualified", "disqualified"), ("P-qualified", "qualified")]
    response = decide(api, *decisions)
    assert response.status_code == 200
    assert response.json() == {"applied": 4, "errors": []}
    assert state.counts()["requests"] == requests  # admin calls are not Web API requests
    assert state.counts()["writes"] == {"leads": 8, "opportunities": 2, "accounts": 0, "contacts": 0}

    def lead(key: str) -> dict:
        return api.get(f"leads({leads[key]})").json()

    assert (lead("P-disqualified")["statecode"], lead("P-disqualified")["statuscode"]) == (2, 6)
    not_qualified = f"opportunities?$filter=_originatingleadid_value eq {leads['P-disqualified']}"
    assert api.get(not_qualified).json()["value"] == []
    for key, opportunity_state in (("P-won", (1, 3)), ("P-lost", (2, 4)), ("P-qualified", (0, 1))):
        qualified = lead(key)
        assert (qualified["statecode"], qualified["statuscode"]) == (1, 3)
        opportunity = opportunity_of(api, leads[key])
        assert (opportunity["statecode"], opportunity["statuscode"]) == opportunity_state
        assert qualified["_qualifyingopportunityid_value"] == opportunity["opportunityid"]
        account = api.get(f"accounts({qualified['_parentaccountid_value']})").json()
        contact = api.get(f"contacts({qualified['_parentcontactid_value']})").json()
        assert (account["name"], account["_originatingleadid_value"]) == (f"{key} Ltd", leads[key])
        assert contact["_originatingleadid_value"] == leads[key]
        assert account["_ownerid_value"] == opportunity["_ownerid_value"] == state.system_user_id
    closes = api.get("opportunitycloses?$select=subject").json()["value"]
    assert sorted(row["subject"] for row in closes) == ["Lost", "Won"]
    system_user = api.get(f"systemusers({state.system_user_id})").json()
    assert (system_user["fullname"], system_user["applicationid"]) == ("SYSTEM", None)


def test_decisions_act_as_a_registered_client_when_asked(api: TestClient) -> None:
    leads = seed_leads(api, "P-1")
    assert decide(api, ("P-1", "won"), as_client_id=SELLER.client_id).json()["applied"] == 1
    assert opportunity_of(api, leads["P-1"])["_ownerid_value"] == SELLER.app_user_id
    unknown = decide(api, ("P-1", "won"), as_client_id="nobody")
    assert unknown.status_code == 400 and "as_client_id" in unknown.json()["error"]


def test_each_decision_stands_alone_and_failures_are_reported_by_index(api: TestClient) -> None:
    leads = seed_leads(api, "P-1", "P-2", "P-3", "P-blocked")
    assert decide(api, ("P-2", "qualified")).json() == {"applied": 1, "errors": []}
    assert reject(api, entity_set="leads", column="msdyn_prospectid", value="P-blocked").status_code == 204
    response = decide(
        api,
        ("P-1", "won"),
        ("P-404", "lost"),
        ("P-2", "won"),  # already qualified: its opportunity is closed, nothing is created again
        ("P-2", "qualified"),
        ("P-blocked", "won"),
        ("P-3", "disqualified"),
        ("P-3", "lost"),
    )
    assert response.status_code == 200
    assert response.json() == {
        "applied": 3,
        "errors": [
            {
                "index": 1,
                "msdyn_prospectid": "P-404",
                "code": "0x80040217",
                "error": "A record with the specified key values does not exist in lead entity",
            },
            {
                "index": 3,
                "msdyn_prospectid": "P-2",
                "code": "0x80040203",
                "error": "The lead is closed. You cannot convert or qualify a lead that is already closed.",
            },
            {
                "index": 4,
                "msdyn_prospectid": "P-blocked",
                "code": "0x80040265",
                "error": "ISV code aborted the operation.",
            },
            {
                "index": 6,
                "msdyn_prospectid": "P-3",
                "code": "0x80040203",
                "error": "The lead is closed. You cannot convert or qualify a lead that is already closed.",
            },
        ],
    }
    assert opportunity_of(api, leads["P-2"])["statecode"] == 1
    assert len(api.get("accounts").json()["value"]) == 2  # P-1 and P-2; none for the blocked lead
    assert api.get(f"leads({leads['P-blocked']})").json()["statecode"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"decisions": {"msdyn_prospectid": "P-1", "outcome": "won"}},
        {"decisions": [{"msdyn_prospectid": "P-1", "outcome": "won"}, {"msdyn_prospectid": "P-1", "outcome": "?"}]},
        {"decisions": [{"msdyn_prospectid": "P-1", "outcome": "won", "reason": "price"}]},
        {"decisions": [{"msdyn_prospectid": 1, "outcome": "won"}]},
        {"decisions": ["P-1"]},
        {"decisions": [], "as_client_id": 7},
        {"decisions": [], "colour": "red"},
    ],
)
def test_malformed_decisions_are_refused_and_nothing_is_applied(api: TestClient, body: dict) -> None:
    lead_id = seed_leads(api, "P-1")["P-1"]
    response = api.post(f"{ADMIN}/dataverse/decisions", json=body)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert api.get(f"leads({lead_id})").json()["statecode"] == 0
