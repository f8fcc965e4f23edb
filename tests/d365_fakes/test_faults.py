"""Fault injection in process: the FaultPlan (matching, budgets, seeded shares, validation), the
`/_admin/faults` routes, and how each fake answers a status fault. The slow and reset kinds over
real HTTPS are in test_faults_over_https.py."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from starlette.testclient import TestClient

from d365_fakes import commerce, dataverse
from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import Fault, FaultPlan
from d365_fakes.limits import Limits, ServiceProtection
from d365_fakes.server import create_apps
from d365_fakes.tokens import TokenIssuer

TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
ENTRA, COMMERCE, DATAVERSE = "https://login.test", "https://commerce.test", "https://org.crm.test"
APP = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
WEB_API = "/api/data/v9.2"
TOKEN_PATH = f"/{TENANT_ID}/oauth2/v2.0/token"
UPSERT = f"{WEB_API}/leads/Microsoft.Dynamics.CRM.UpsertMultiple"


# --- the plan ------------------------------------------------------------------------------------


def test_empty_plan_has_no_fault():
    assert FaultPlan().take("dataverse", "GET", f"{WEB_API}/WhoAmI") is None


def test_a_fault_applies_to_count_requests_then_the_next_one_in_order():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=2, retry_after=1)
    plan.add("dataverse", 503)

    taken = [plan.take("dataverse", "GET", f"{WEB_API}/leads") for _ in range(4)]

    assert taken == [Fault(429, 1), Fault(429, 1), Fault(503), None]


def test_take_without_method_and_path_matches_only_rules_without_route_or_method():
    plan = FaultPlan()
    plan.add("dataverse", 500, route="UpsertMultiple")
    plan.add("dataverse", 502, method="POST")
    plan.add("dataverse", 503)

    assert plan.take("dataverse") == Fault(503)
    assert plan.take("dataverse") is None


def test_systems_have_their_own_rules():
    plan = FaultPlan()
    plan.add("commerce", 503)

    assert plan.take("dataverse", "GET", "/data/Prospects") is None
    assert plan.take("entra", "POST", TOKEN_PATH) is None
    assert plan.take("commerce", "GET", "/data/Prospects") == Fault(503)


def test_route_is_a_regex_searched_in_the_path():
    plan = FaultPlan()
    plan.add("dataverse", 503, count=5, route="UpsertMultiple")
    plan.add("commerce", 502, count=5, route=r"/\$batch$")

    assert plan.take("dataverse", "POST", f"{WEB_API}/leads") is None
    assert plan.take("dataverse", "POST", UPSERT) == Fault(503)
    assert plan.take("commerce", "POST", "/data/$batch/more") is None
    assert plan.take("commerce", "POST", "/data/$batch") == Fault(502)


def test_method_is_matched_case_insensitively():
    plan = FaultPlan()
    plan.add("commerce", 503, count=5, method="patch")

    assert plan.take("commerce", "GET", "/data/Prospects") is None
    assert plan.take("commerce", "PATCH", "/data/Prospects(dataAreaId='usrt',ProspectId='P-1')") == Fault(503)


def test_without_route_a_rule_applies_to_the_service_paths_and_only_entras_token_endpoint():
    plan = FaultPlan()
    for system in ("commerce", "dataverse", "entra"):
        plan.add(system, 503, count=10)

    assert plan.take("commerce", "GET", "/docs") is None
    assert plan.take("dataverse", "GET", "/data/Prospects") is None
    assert plan.take("entra", "GET", f"/{TENANT_ID}/v2.0/.well-known/openid-configuration") is None
    assert plan.take("entra", "GET", f"/{TENANT_ID}/discovery/v2.0/keys") is None
    assert plan.take("entra", "GET", TOKEN_PATH) is None
    assert plan.take("entra", "POST", TOKEN_PATH) == Fault(503)
    assert plan.take("commerce", "GET", "/data/Prospects") == Fault(503)
    assert plan.take("dataverse", "GET", f"{WEB_API}/WhoAmI") == Fault(503)


def test_a_route_can_reach_entras_other_endpoints():
    plan = FaultPlan()
    plan.add("entra", 503, route="openid-configuration")

    assert plan.take("entra", "POST", TOKEN_PATH) is None
    assert plan.take("entra", "GET", f"/{TENANT_ID}/v2.0/.well-known/openid-configuration") == Fault(503)


def test_admin_paths_are_never_faulted():
    plan = FaultPlan()
    for system in ("commerce", "dataverse", "entra"):
        plan.add(system, 503, count=10, route=".")

    for system in ("commerce", "dataverse", "entra"):
        assert plan.take(system, "GET", "/_admin/counts") is None
        assert plan.take(system, "POST", "/_admin") is None
    assert plan.take("commerce", "GET", "/_administrators") == Fault(503)  # only /_admin itself


def test_slow_and_reset_default_to_phase_after_and_status_is_always_before():
    plan = FaultPlan()
    plan.add("dataverse", kind="slow", delay_s=0.5)
    plan.add("dataverse", kind="reset")
    plan.add("dataverse", kind="reset", phase="before")
    plan.add("dataverse", 503, phase="before")

    taken = [plan.take("dataverse", "POST", UPSERT) for _ in range(4)]

    assert taken == [
        Fault(kind="slow", delay_s=0.5, phase="after"),
        Fault(kind="reset", phase="after"),
        Fault(kind="reset", phase="before"),
        Fault(503, phase="before"),
    ]


def test_first_matching_rule_that_fires_wins():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=1, route="UpsertMultiple")
    plan.add("dataverse", 503, count=1)
    plan.add("dataverse", kind="reset", share=1)

    assert plan.take("dataverse", "GET", f"{WEB_API}/leads") == Fault(503)  # the first does not match
    assert plan.take("dataverse", "POST", UPSERT) == Fault(429)
    assert plan.take("dataverse", "POST", UPSERT) == Fault(kind="reset", phase="after")  # the others are used up


def test_a_share_rule_that_does_not_fire_lets_the_next_rule_decide():
    plan = FaultPlan(seed=3)
    plan.add("commerce", 429, share=0.5)
    plan.add("commerce", 503, count=2000)

    taken = [plan.take("commerce", "GET", "/data/Prospects") for _ in range(2000)]

    assert None not in taken
    assert 900 < taken.count(Fault(429)) < 1100


def test_a_share_is_drawn_from_the_seed_so_a_run_repeats():
    def draws(seed: int) -> list[bool]:
        plan = FaultPlan(seed=seed)
        plan.add("dataverse", kind="reset", share=0.25)
        return [plan.take("dataverse", "POST", UPSERT) is not None for _ in range(2000)]

    first, again, other = draws(7), draws(7), draws(8)

    assert first == again
    assert first != other
    assert abs(sum(first) / 2000 - 0.25) < 0.03


def test_clear_restarts_the_draws_from_the_seed():
    plan = FaultPlan(seed=11)
    plan.add("dataverse", 503, share=0.5)
    before = [plan.take("dataverse", "GET", f"{WEB_API}/leads") for _ in range(50)]
    plan.clear()
    plan.add("dataverse", 503, share=0.5)

    assert [plan.take("dataverse", "GET", f"{WEB_API}/leads") for _ in range(50)] == before


def test_report_lists_rules_with_remaining_and_fired_and_the_faults_served_by_kind():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=3, retry_after=2, route="UpsertMultiple", method="POST")
    plan.add("dataverse", kind="slow", delay_s=1.5, share=1)
    plan.add("entra", kind="reset", phase="before")
    for _ in range(2):
        plan.take("dataverse", "POST", UPSERT)
    plan.take("dataverse", "GET", f"{WEB_API}/leads")
    plan.take("entra", "POST", TOKEN_PATH)

    report = plan.report()

    assert report["rules"] == [
        {"system": "dataverse", "kind": "status", "status": 429, "retry_after": 2, "delay_s": None,
         "phase": "before", "route": "UpsertMultiple", "method": "POST", "count": 3, "share": None,
         "remaining": 1, "fired": 2},
        {"system": "dataverse", "kind": "slow", "status": None, "retry_after": None, "delay_s": 1.5,
         "phase": "after", "route": None, "method": None, "count": None, "share": 1, "remaining": None,
         "fired": 1},
        {"system": "entra", "kind": "reset", "status": None, "retry_after": None, "delay_s": None,
         "phase": "before", "route": None, "method": None, "count": 1, "share": None, "remaining": 0,
         "fired": 1},
    ]  # fmt: skip
    assert report["served"] == {"dataverse": {"429": 2, "slow": 1}, "commerce": {}, "entra": {"reset": 1}}

    plan.clear()

    assert plan.report() == {"seed": 0, "rules": [], "served": {"commerce": {}, "dataverse": {}, "entra": {}}}


def test_retry_after_becomes_the_header_only_when_given():
    assert Fault(429, 2).headers() == {"Retry-After": "2"}
    assert Fault(503).headers() == {}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ((("sharepoint", 503), {}), "system"),
        ((("commerce", 399), {}), "status"),
        ((("commerce", 600), {}), "status"),
        ((("commerce", "503"), {}), "status"),
        ((("commerce",), {}), "status"),
        ((("commerce", 503, 0), {}), "count"),
        ((("commerce", 503, 1.5), {}), "count"),
        ((("commerce", 503, 1, -1), {}), "retry_after"),
        ((("commerce", 503, 1, 1.5), {}), "retry_after"),
        ((("commerce",), {"kind": "drop"}), "kind"),
        ((("commerce",), {"kind": "slow"}), "delay_s"),
        ((("commerce",), {"kind": "slow", "delay_s": 0}), "delay_s"),
        ((("commerce",), {"kind": "slow", "delay_s": float("inf")}), "delay_s"),
        ((("commerce",), {"kind": "slow", "delay_s": "1"}), "delay_s"),
        ((("commerce",), {"kind": "reset", "delay_s": 1}), "delay_s"),
        ((("commerce", 503), {"delay_s": 1}), "delay_s"),
        ((("commerce", 503), {"kind": "reset"}), "status"),
        ((("commerce", None, None, 1), {"kind": "slow", "delay_s": 1}), "retry_after"),
        ((("commerce", 503), {"phase": "after"}), "phase"),
        ((("commerce",), {"kind": "reset", "phase": "during"}), "phase"),
        ((("commerce", 503), {"route": ""}), "route"),
        ((("commerce", 503), {"route": "leads("}), "route"),
        ((("commerce", 503), {"route": 5}), "route"),
        ((("commerce", 503), {"method": "PO ST"}), "method"),
        ((("commerce", 503), {"share": 0}), "share"),
        ((("commerce", 503), {"share": 1.5}), "share"),
        ((("commerce", 503), {"share": True}), "share"),
        ((("commerce", 503, 2), {"share": 0.5}), "share"),
    ],
)
def test_invalid_rules_are_refused_naming_the_field(arguments, field):
    args, kwargs = arguments
    with pytest.raises(ValueError, match=f"^{field} "):
        FaultPlan().add(*args, **kwargs)


def test_a_rule_from_json_fields_refuses_unknown_fields_and_non_objects():
    plan = FaultPlan()
    with pytest.raises(ValueError, match="unknown field.*times"):
        plan.add_fields({"system": "commerce", "status": 503, "times": 2})
    with pytest.raises(ValueError, match="JSON object"):
        plan.add_fields([{"system": "commerce"}])
    with pytest.raises(ValueError, match="^system "):
        plan.add_fields({"status": 503})

    plan.add_fields({"system": "commerce", "kind": "slow", "delay_s": 1, "share": 0.5})

    assert plan.report()["rules"][0]["share"] == 0.5


def test_the_seed_must_be_an_integer():
    with pytest.raises(ValueError, match="^seed "):
        FaultPlan(seed="1")


def test_concurrent_takes_hand_out_each_fault_exactly_once():
    plan = FaultPlan()
    plan.add("dataverse", 429, count=500)

    with ThreadPoolExecutor(max_workers=8) as pool:
        taken = list(pool.map(lambda _: plan.take("dataverse", "GET", f"{WEB_API}/leads"), range(800)))

    assert sum(fault is not None for fault in taken) == 500
    assert plan.report()["served"]["dataverse"] == {"429": 500}


# --- the routes and the fakes' answers (in process, the apps as server.py builds them) ------------


@dataclass
class Fakes:
    entra: TestClient
    commerce: TestClient
    dataverse: TestClient
    commerce_state: commerce.CommerceState
    dataverse_state: dataverse.DataverseState

    @property
    def admin(self) -> TestClient:
        return self.entra  # /_admin on the Entra server, as FakeAdmin uses it


@pytest.fixture
def fakes():
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    commerce_state, dataverse_state = commerce.CommerceState(), dataverse.DataverseState()
    entra_app, commerce_app, dataverse_app = create_apps(
        issuer, {APP.client_id: APP}, COMMERCE, DATAVERSE, commerce_state, dataverse_state, FaultPlan(),
        ServiceProtection(Limits(enabled=False)),
    )  # fmt: skip
    commerce_api, dataverse_api = TestClient(commerce_app, COMMERCE), TestClient(dataverse_app, DATAVERSE)
    commerce_api.headers["Authorization"] = "Bearer " + issuer.issue(APP, COMMERCE)["access_token"]
    dataverse_api.headers["Authorization"] = "Bearer " + issuer.issue(APP, DATAVERSE)["access_token"]
    return Fakes(TestClient(entra_app, ENTRA), commerce_api, dataverse_api, commerce_state, dataverse_state)


def inject(fakes, **fault):
    response = fakes.admin.post("/_admin/faults", json=fault)
    assert response.status_code == 204, response.text


def token_request(fakes):
    form = {"grant_type": "client_credentials", "client_id": APP.client_id, "client_secret": APP.client_secret,
            "scope": f"{COMMERCE}/.default"}  # fmt: skip
    return fakes.entra.post(TOKEN_PATH, data=form)


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


def test_a_401_fault_answers_in_each_apis_401_shape_with_its_challenge(fakes):
    inject(fakes, system="dataverse", status=401)
    inject(fakes, system="commerce", status=401)

    refused_by_dataverse = fakes.dataverse.get(f"{WEB_API}/WhoAmI")
    refused_by_commerce = fakes.commerce.get("/data/Prospects")

    assert refused_by_dataverse.status_code == 401
    assert f'resource_id="{DATAVERSE}"' in refused_by_dataverse.headers["WWW-Authenticate"]
    assert refused_by_dataverse.json()["error"]["code"] == "0x80072243"
    assert refused_by_commerce.status_code == 401
    assert f'resource_id="{COMMERCE}"' in refused_by_commerce.headers["WWW-Authenticate"]
    error = refused_by_commerce.json()["error"]
    assert error["message"] == "Authorization has been denied for this request."
    assert error["innererror"]["type"] == "System.UnauthorizedAccessException"


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


def test_entra_answers_a_401_fault_as_a_refused_client(fakes):
    inject(fakes, system="entra", status=401)

    body = token_request(fakes).json()

    assert body["error"] == "invalid_client" and body["error_codes"] == [7000215]


def test_entra_discovery_is_not_faulted(fakes):
    inject(fakes, system="entra", status=503)

    assert fakes.entra.get(f"/{TENANT_ID}/v2.0/.well-known/openid-configuration").status_code == 200
    assert token_request(fakes).status_code == 503


def test_count_defaults_to_one(fakes):
    inject(fakes, system="commerce", status=500)

    assert [fakes.commerce.get("/data/Prospects").status_code for _ in range(2)] == [500, 200]


def test_a_route_and_method_pick_the_requests(fakes):
    inject(fakes, system="dataverse", status=503, count=5, route="UpsertMultiple", method="POST")

    assert fakes.dataverse.get(f"{WEB_API}/leads").status_code == 200
    upsert = fakes.dataverse.post(UPSERT, json={"Targets": []})

    assert upsert.status_code == 503


def test_the_admin_surface_is_never_faulted(fakes):
    for system in ("commerce", "dataverse", "entra"):
        inject(fakes, system=system, status=503, count=10, route=".")

    for client in (fakes.entra, fakes.commerce, fakes.dataverse):
        assert client.get("/_admin/counts").status_code == 200
        assert client.get("/_admin/faults").status_code == 200
    assert fakes.dataverse.get(f"{WEB_API}/WhoAmI").status_code == 503


def test_a_slow_fault_delays_the_answer(fakes):
    inject(fakes, system="commerce", kind="slow", delay_s=0.3, phase="before")
    inject(fakes, system="commerce", kind="slow", delay_s=0.3)

    for _ in range(2):
        started = time.monotonic()
        answer = fakes.commerce.get("/data/Prospects")
        assert answer.status_code == 200 and time.monotonic() - started >= 0.3
    assert fakes.commerce_state.counts()["requests"] == 2


def test_a_reset_needs_the_connection_of_a_uvicorn_server(fakes):
    inject(fakes, system="commerce", kind="reset")

    with pytest.raises(RuntimeError, match="outermost ASGI layer under uvicorn"):
        fakes.commerce.get("/data/Prospects")


def test_get_faults_reports_rules_and_statistics(fakes):
    inject(fakes, system="dataverse", status=429, count=2, retry_after=1)
    inject(fakes, system="commerce", kind="slow", delay_s=0.01, share=1)
    fakes.dataverse.get(f"{WEB_API}/WhoAmI")
    fakes.commerce.get("/data/Prospects")

    report = fakes.admin.get("/_admin/faults").json()

    assert [(rule["system"], rule["kind"], rule["remaining"], rule["fired"]) for rule in report["rules"]] == [
        ("dataverse", "status", 1, 1),
        ("commerce", "slow", None, 1),
    ]
    assert report["served"] == {"commerce": {"slow": 1}, "dataverse": {"429": 1}, "entra": {}}


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
        ({"system": "commerce", "kind": "slow", "delay_s": -1}, "delay_s"),
        ({"system": "commerce", "kind": "reset", "share": 2}, "share"),
        ({"system": "commerce", "kind": "reset", "route": "("}, "route"),
        ({"system": "commerce", "kind": "nap"}, "kind"),
    ],
)
def test_invalid_faults_are_400_naming_the_field(fakes, fault, field):
    response = fakes.admin.post("/_admin/faults", json=fault)

    assert response.status_code == 400
    assert response.json()["error"].startswith(field) or f"unknown field(s): {field}" in response.json()["error"]


def test_a_body_that_is_not_a_json_object_is_400(fakes):
    assert "not JSON" in fakes.admin.post("/_admin/faults", content=b"{").json()["error"]
    assert "JSON object" in fakes.admin.post("/_admin/faults", json=[1]).json()["error"]


def test_delete_clears_the_faults_and_statistics(fakes):
    inject(fakes, system="commerce", status=503, count=5)
    fakes.commerce.get("/data/Prospects")

    assert fakes.admin.delete("/_admin/faults").status_code == 204
    assert fakes.commerce.get("/data/Prospects").status_code == 200
    assert fakes.admin.get("/_admin/faults").json() == {
        "seed": 0, "rules": [], "served": {"commerce": {}, "dataverse": {}, "entra": {}}}  # fmt: skip


def test_reset_clears_the_faults_too(fakes):
    inject(fakes, system="dataverse", status=429, count=5)
    fakes.dataverse.get(f"{WEB_API}/WhoAmI")

    assert fakes.admin.post("/_admin/reset").status_code == 204
    assert fakes.dataverse.get(f"{WEB_API}/WhoAmI").status_code == 200
    assert fakes.admin.get("/_admin/faults").json()["served"]["dataverse"] == {}


# --- the serve flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault", '{"system": "dataverse", "kind": "slow"}'], "delay_s must be"),
        (["--fault", '{"system": "dataverse", "status": 503, "share": 0}'], "share must be"),
        (["--fault", '{"system": "dataverse"'], "not JSON"),
        (["--fault", "[]"], "JSON object"),
        (["--fault-seed", "x"], "--fault-seed: invalid int value"),
    ],
)
def test_bad_fault_flags_stop_the_command_naming_the_field(tmp_path, flags, message):
    env = dict(os.environ)
    clients = json.dumps([{"client_id": "app", "client_secret": "s"}])
    command = [sys.executable, "-m", "d365_fakes", "serve", "--state-dir", str(tmp_path), "--clients", clients]

    result = subprocess.run(command + flags, env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert message in result.stderr
