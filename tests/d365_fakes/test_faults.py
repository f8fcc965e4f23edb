"""Fault injection: the FaultPlan itself, the `/_admin/faults` routes, and how each fake answers."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from starlette.testclient import TestClient

from d365_fakes import admin, commerce, dataverse, entra
from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import Fault, FaultPlan
from d365_fakes.tokens import TokenIssuer

TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
ENTRA, COMMERCE, DATAVERSE = "https://login.test", "https://commerce.test", "https://org.crm.test"
APP = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
WEB_API = "/api/data/v9.2"


# --- the plan ------------------------------------------------------------------------------------


def test_empty_plan_has_no_fault():
    assert FaultPlan().take("dataverse") is None


def test_a_fault_applies_to_count_requests_then_the_next_one_in_order():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=2, retry_after=1)
    plan.add("dataverse", 503)

    taken = [plan.take("dataverse") for _ in range(4)]

    assert taken == [Fault(429, 1), Fault(429, 1), Fault(503), None]


def test_systems_have_their_own_queues():
    plan = FaultPlan()
    plan.add("commerce", 503)

    assert plan.take("dataverse") is None and plan.take("entra") is None
    assert plan.take("commerce") == Fault(503)


def test_clear_drops_every_queued_fault():
    plan = FaultPlan()
    plan.add("commerce", 503, count=3)
    plan.add("entra", 503)
    plan.clear()

    assert [plan.take(system) for system in ("commerce", "dataverse", "entra")] == [None, None, None]


def test_retry_after_becomes_the_header_only_when_given():
    assert Fault(429, 2).headers() == {"Retry-After": "2"}
    assert Fault(503).headers() == {}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (("sharepoint", 503), "system"),
        (("commerce", 399), "status"),
        (("commerce", 600), "status"),
        (("commerce", "503"), "status"),
        (("commerce", 503, 0), "count"),
        (("commerce", 503, 1, -1), "retry_after"),
        (("commerce", 503, 1, 1.5), "retry_after"),
    ],
)
def test_invalid_faults_are_refused_naming_the_field(arguments, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        FaultPlan().add(*arguments)


def test_concurrent_takes_hand_out_each_fault_exactly_once():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=500)

    with ThreadPoolExecutor(max_workers=8) as pool:
        taken = list(pool.map(lambda _: plan.take("dataverse"), range(800)))

    assert sum(fault is not None for fault in taken) == 500


# --- the routes and the fakes' answers -----------------------------------------------------------


@dataclass
class Fakes:
    entra: TestClient
    commerce: TestClient
    dataverse: TestClient
    commerce_state: commerce.CommerceState
    dataverse_state: dataverse.DataverseState

    @property
    def admin(self) -> TestClient:
        return self.entra  # /_admin is mounted on the Entra server here, as FakeAdmin uses it


@pytest.fixture
def fakes():
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    clients = {APP.client_id: APP}
    plan = FaultPlan()
    commerce_state, dataverse_state = commerce.CommerceState(), dataverse.DataverseState()
    entra_app = entra.create_app(issuer, clients, faults=plan)
    admin_router = admin.create_admin_router(commerce_state, dataverse_state, issuer, plan)
    entra_app.include_router(admin_router, prefix="/_admin")
    commerce_api = TestClient(commerce.create_app(commerce_state, issuer, COMMERCE, clients, faults=plan), COMMERCE)
    dataverse_api = TestClient(dataverse.create_app(dataverse_state, issuer, DATAVERSE, clients, faults=plan), DATAVERSE)
    commerce_api.headers["Authorization"] = "Bearer " + issuer.issue(APP, COMMERCE)["access_token"]
    dataverse_api.headers["Authorization"] = "Bearer " + issuer.issue(APP, DATAVERSE)["access_token"]
    return Fakes(TestClient(entra_app, ENTRA), commerce_api, dataverse_api, commerce_state, dataverse_state)


def inject(fakes, **fault):
    response = fakes.admin.post("/_admin/faults", json=fault)
    assert response.status_code == 204, response.text


def token_request(fakes):
    form = {"grant_type": "client_credentials", "client_id": APP.client_id, "client_secret": APP.client_secret,
            "scope": f"{COMMERCE}/.default"}  # fmt: skip
    return fakes.entra.post(f"/{TENANT_ID}/oauth2/v2.0/token", data=form)


def test_dataverse_throttles_with_service_protection_code_and_retry_after(fakes):
    inject(fakes, system="dataverse", status=429, count=2, retry_after=1)

    answers = [fakes.dataverse.get(f"{WEB_API}/WhoAmI") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "1" and answers[0].headers["OData-Version"] == "4.0"
    assert answers[0].json() == {"error": {"code": "0x80072322", "message": (
        "Number of requests exceeded the limit of 6000 over time window of 300 seconds.")}}  # fmt: skip
    assert fakes.dataverse_state.counts()["requests"] == 3  # faulted requests are counted too


def test_dataverse_fault_comes_before_the_auth_check(fakes):
    inject(fakes, system="dataverse", status=503)

    answer = fakes.dataverse.get(f"{WEB_API}/WhoAmI", headers={"Authorization": ""})

    assert answer.status_code == 503 and "Retry-After" not in answer.headers
    assert answer.json()["error"]["code"] == "0x80040216"


def test_commerce_answers_faults_in_the_finance_and_operations_shape(fakes):
    inject(fakes, system="commerce", status=503, retry_after=5)

    answer = fakes.commerce.get("/data/Prospects")

    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    error = answer.json()["error"]
    assert error["code"] == "" and error["message"] == "An error has occurred."
    assert "temporarily unavailable" in error["innererror"]["message"]
    assert fakes.commerce.get("/data/Prospects").status_code == 200
    assert fakes.commerce_state.counts()["requests"] == 2


def test_commerce_throttling_says_so(fakes):
    inject(fakes, system="commerce", status=429, retry_after=1)

    answer = fakes.commerce.get("/data/Prospects")

    assert answer.status_code == 429
    assert "throttled" in answer.json()["error"]["innererror"]["message"]


def test_entra_token_endpoint_answers_an_aadsts_error(fakes):
    inject(fakes, system="entra", status=503, retry_after=2)

    failed, issued = token_request(fakes), token_request(fakes)

    assert failed.status_code == 503 and failed.headers["Retry-After"] == "2"
    body = failed.json()
    assert body["error"] == "temporarily_unavailable" and body["error_codes"] == [90033]
    assert body["error_description"].startswith("AADSTS90033: ")
    assert issued.status_code == 200 and "access_token" in issued.json()


def test_entra_discovery_is_not_faulted(fakes):
    inject(fakes, system="entra", status=503)

    assert fakes.entra.get(f"/{TENANT_ID}/v2.0/.well-known/openid-configuration").status_code == 200
    assert token_request(fakes).status_code == 503


def test_count_defaults_to_one(fakes):
    inject(fakes, system="commerce", status=500)

    assert [fakes.commerce.get("/data/Prospects").status_code for _ in range(2)] == [500, 200]


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"system": "sharepoint", "status": 503}, "system"),
        ({"status": 503}, "system"),
        ({"system": "commerce", "status": 302}, "status"),
        ({"system": "commerce", "status": 600}, "status"),
        ({"system": "commerce", "status": 503, "count": 0}, "count"),
        ({"system": "commerce", "status": 503, "retry_after": "soon"}, "retry_after"),
        ({"system": "commerce", "status": 503, "times": 2}, "times"),
    ],
)
def test_invalid_faults_are_400_naming_the_field(fakes, fault, field):
    response = fakes.admin.post("/_admin/faults", json=fault)

    assert response.status_code == 400
    assert field in response.json()["error"]


def test_delete_clears_the_faults(fakes):
    inject(fakes, system="commerce", status=503, count=5)

    assert fakes.admin.delete("/_admin/faults").status_code == 204
    assert fakes.commerce.get("/data/Prospects").status_code == 200


def test_reset_clears_the_faults_too(fakes):
    inject(fakes, system="dataverse", status=429, count=5)

    assert fakes.admin.post("/_admin/reset").status_code == 204
    assert fakes.dataverse.get(f"{WEB_API}/WhoAmI").status_code == 200
