"""Service protection: per-caller sliding-window limits (429 + Retry-After), latency, and their
admin surface, in process and through `python -m d365_fakes serve`."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CommerceState
from d365_fakes.dataverse import DataverseState
from d365_fakes.faults import FaultPlan
from d365_fakes.limits import CONCURRENT, EXECUTION, REQUESTS, Limits, Refusal, ServiceProtection, caller_of
from d365_fakes.running import FakeAdmin, running_fakes
from d365_fakes.server import create_apps
from d365_fakes.tokens import TokenIssuer

ENTRA, COMMERCE, DATAVERSE = "https://login.test", "https://commerce.test", "https://org.crm.test"
WHO_AM_I = "/api/data/v9.2/WhoAmI"
APP = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
OTHER = ClientRegistration("other-app", "other-secret", default_company="usrt")


# --- the limits themselves (explicit clock) ------------------------------------------------------


def test_requests_limit_refuses_until_the_oldest_request_leaves_the_window():
    protection = ServiceProtection(Limits(dataverse_requests=2, dataverse_window_s=10))

    assert protection.admit("dataverse", "u", 0) is None
    assert protection.admit("dataverse", "u", 4) is None
    assert protection.admit("dataverse", "u", 5.5) == Refusal(REQUESTS, 5)  # at 10 the request of 0 leaves
    assert protection.admit("dataverse", "other user", 5.5) is None
    assert protection.admit("dataverse", "u", 10.01) is None
    assert protection.report()["dataverse"]["throttled"] == {"0x80072322": 1, "0x80072321": 0, "0x80072326": 0}


def test_a_caller_that_keeps_sending_while_told_to_wait_waits_longer_each_time():
    protection = ServiceProtection(Limits(dataverse_requests=1, dataverse_window_s=10))
    assert protection.admit("dataverse", "u", 0) is None

    told = []
    for now in (1, 1.5, 2, 2.5):
        refusal = protection.admit("dataverse", "u", now)
        assert refusal is not None and refusal.limit == REQUESTS
        told.append((now, now + refusal.retry_after))

    assert told[0] == (1, 10)  # the window admits again at 10
    free_at = [until for _, until in told]
    assert free_at == sorted(free_at) and len(set(free_at)) == 4  # every early retry pushes it out
    assert protection.admit("dataverse", "u", free_at[-1]) is None  # once it waits, it is served
    assert protection.report()["dataverse"]["throttled"]["0x80072322"] == 4


def test_execution_time_limit_counts_handler_seconds_in_the_window():
    protection = ServiceProtection(Limits(dataverse_execution_s=3, dataverse_window_s=10))
    for now in (0, 1):
        assert protection.admit("dataverse", "u", now) is None
        protection.finish("dataverse", "u", now + 2, 2)  # finished at 2 and 3, two seconds each

    assert protection.admit("dataverse", "u", 4) == Refusal(EXECUTION, 8)  # under 3 s once 2 leaves, at 12
    assert protection.admit("dataverse", "u", 12.5) is None


def test_concurrent_limit_refuses_at_once_without_making_the_caller_wait():
    protection = ServiceProtection(Limits(dataverse_concurrent=2))
    assert protection.admit("dataverse", "u", 0) is None
    assert protection.admit("dataverse", "u", 0) is None

    assert protection.admit("dataverse", "u", 0.1) == Refusal(CONCURRENT, 1)
    protection.finish("dataverse", "u", 0.2, 0.2)
    assert protection.admit("dataverse", "u", 0.3) is None  # a slot is free again: no penalty


def test_commerce_has_only_its_optional_request_limit():
    protection = ServiceProtection()
    assert all(protection.admit("commerce", "u", 0) is None for _ in range(10_000))  # off by default

    protection.configure({"commerce_requests": 1, "commerce_window_s": 60})
    protection.reset()
    assert protection.admit("commerce", "u", 0) is None
    assert protection.admit("commerce", "u", 1) == Refusal(REQUESTS, 59)
    assert protection.report()["commerce"]["throttled"] == {"requests": 1}


def test_disabled_limits_admit_everything():
    protection = ServiceProtection(Limits(enabled=False, dataverse_requests=1, dataverse_concurrent=1))

    assert all(protection.admit("dataverse", "u", 0) is None for _ in range(100))


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"dataverse_requests": -1}, "dataverse_requests"),
        ({"dataverse_requests": 1.5}, "dataverse_requests"),
        ({"dataverse_window_s": 0}, "dataverse_window_s"),
        ({"latency_ms": "fast"}, "latency_ms"),
        ({"enabled": "yes"}, "enabled"),
        ({"commerce_concurrent": 3}, "commerce_concurrent"),
    ],
)
def test_invalid_limits_are_refused_naming_the_field(values, field):
    protection = ServiceProtection()

    with pytest.raises(ValueError, match=field):
        protection.configure(values)
    assert protection.limits == Limits()


def test_callers_are_told_apart_by_the_user_their_token_names():
    issuer = TokenIssuer(ENTRA, "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11")
    token = issuer.issue(APP, DATAVERSE)["access_token"]

    assert caller_of(f"Bearer {token}") == APP.app_user_id
    assert caller_of("Bearer not-a-jwt") == caller_of("") == caller_of("Basic abc") == ""


# --- the apps (in process) -----------------------------------------------------------------------


@dataclass
class Fakes:
    protection: ServiceProtection
    commerce: TestClient
    dataverse: TestClient
    issuer: TokenIssuer
    dataverse_app: object
    commerce_state: CommerceState

    def configure(self, **values: object) -> None:
        response = self.dataverse.post("/_admin/limits", json=values)
        assert response.status_code == 200, response.text


@pytest.fixture
def fakes() -> Fakes:
    issuer = TokenIssuer(ENTRA, "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11")
    clients = {APP.client_id: APP, OTHER.client_id: OTHER}
    protection = ServiceProtection()
    commerce_state = CommerceState()
    _, commerce_app, dataverse_app = create_apps(
        issuer, clients, COMMERCE, DATAVERSE, commerce_state, DataverseState(), FaultPlan(), protection
    )
    commerce = TestClient(commerce_app, base_url=COMMERCE)
    dataverse = TestClient(dataverse_app, base_url=DATAVERSE)
    commerce.headers["Authorization"] = "Bearer " + issuer.issue(APP, COMMERCE)["access_token"]
    dataverse.headers["Authorization"] = "Bearer " + issuer.issue(APP, DATAVERSE)["access_token"]
    return Fakes(protection, commerce, dataverse, issuer, dataverse_app, commerce_state)


def test_dataverse_answers_the_requests_limit_in_its_own_words(fakes):
    fakes.configure(dataverse_requests=2, dataverse_window_s=60)

    answers = [fakes.dataverse.get(WHO_AM_I) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert 58 <= int(answers[2].headers["Retry-After"]) <= 60
    assert answers[2].headers["OData-Version"] == "4.0"
    assert answers[2].json() == {"error": {"code": "0x80072322", "message": (
        "Number of requests exceeded the limit of 2 over time window of 60 seconds.")}}  # fmt: skip
    other = "Bearer " + fakes.issuer.issue(OTHER, DATAVERSE)["access_token"]
    assert fakes.dataverse.get(WHO_AM_I, headers={"Authorization": other}).status_code == 200  # per user


def test_dataverse_answers_the_execution_time_limit(fakes):
    fakes.configure(dataverse_execution_s=0.000001, dataverse_window_s=30)

    first, second = fakes.dataverse.get(WHO_AM_I), fakes.dataverse.get(WHO_AM_I)

    assert (first.status_code, second.status_code) == (200, 429)
    assert 28 <= int(second.headers["Retry-After"]) <= 30
    error = second.json()["error"]
    assert error["code"] == "0x80072321"
    assert error["message"].startswith(
        "Combined execution time of incoming requests exceeded limit of 0 milliseconds over time window of 30 seconds.")


def test_dataverse_answers_the_concurrency_limit_at_once(fakes):
    fakes.configure(dataverse_concurrent=2, latency_ms=300)
    token = fakes.dataverse.headers["Authorization"]

    async def four_at_once() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=fakes.dataverse_app)
        async with httpx.AsyncClient(transport=transport, base_url=DATAVERSE, headers={"Authorization": token}) as client:
            return await asyncio.gather(*(client.get(WHO_AM_I) for _ in range(4)))

    answers = asyncio.run(four_at_once())

    assert sorted(answer.status_code for answer in answers) == [200, 200, 429, 429]
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json() == {"error": {"code": "0x80072326", "message": "Number of concurrent requests exceeded the limit of 2."}}
    assert fakes.dataverse.get(WHO_AM_I).status_code == 200  # the others are done: served again


def test_a_dataverse_client_that_keeps_sending_is_told_to_wait_longer(fakes):
    fakes.configure(dataverse_requests=1, dataverse_window_s=5)
    fakes.dataverse.get(WHO_AM_I)

    waits = [int(fakes.dataverse.get(WHO_AM_I).headers["Retry-After"]) for _ in range(3)]

    assert waits == sorted(waits) and waits[0] < waits[-1]


def test_commerce_throttles_in_the_finance_and_operations_shape(fakes):
    fakes.configure(commerce_requests=2, commerce_window_s=60)

    answers = [fakes.commerce.get("/data/Prospects") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert 58 <= int(answers[2].headers["Retry-After"]) <= 60
    error = answers[2].json()["error"]
    assert (error["code"], error["message"]) == ("", "An error has occurred.")
    assert "exceeded the limit of 2 requests over a time window of 60 seconds" in error["innererror"]["message"]
    assert fakes.commerce_state.counts()["requests"] == 2  # a refused request never reached HQ


def test_latency_is_added_but_not_counted_as_execution_time(fakes):
    fakes.configure(latency_ms=150, dataverse_execution_s=0.1)

    started = time.perf_counter()
    statuses = [fakes.dataverse.get(WHO_AM_I).status_code, fakes.commerce.get("/data/Prospects").status_code,
                fakes.dataverse.get(WHO_AM_I).status_code]

    assert statuses == [200, 200, 200]
    assert time.perf_counter() - started >= 0.45


def test_admin_routes_are_never_limited(fakes):
    fakes.configure(dataverse_requests=1, commerce_requests=1)
    fakes.dataverse.get(WHO_AM_I)
    fakes.commerce.get("/data/Prospects")

    assert all(fakes.dataverse.get("/_admin/counts").status_code == 200 for _ in range(3))
    assert all(fakes.commerce.get("/_admin/limits").status_code == 200 for _ in range(3))


def test_admin_reports_changes_and_resets_the_limits(fakes):
    report = fakes.dataverse.get("/_admin/limits").json()
    assert report == {
        "enabled": True,
        "latency_ms": 0,
        "dataverse": {"requests": 6000, "window_s": 300, "execution_s": 1200, "concurrent": 52,
                      "throttled": {"0x80072322": 0, "0x80072321": 0, "0x80072326": 0}},
        "commerce": {"requests": 0, "window_s": 300, "throttled": {"requests": 0}},
    }

    changed = fakes.commerce.post("/_admin/limits", json={"dataverse_requests": 1, "latency_ms": 5}).json()
    assert (changed["dataverse"]["requests"], changed["latency_ms"]) == (1, 5)
    fakes.dataverse.get(WHO_AM_I)
    assert fakes.dataverse.get(WHO_AM_I).status_code == 429
    assert fakes.dataverse.get("/_admin/limits").json()["dataverse"]["throttled"]["0x80072322"] == 1

    assert fakes.dataverse.post("/_admin/limits/reset").status_code == 204
    assert fakes.dataverse.get("/_admin/limits").json()["dataverse"]["throttled"]["0x80072322"] == 0
    assert fakes.dataverse.get(WHO_AM_I).status_code == 200  # the window is forgotten too
    assert fakes.dataverse.get("/_admin/limits").json()["dataverse"]["requests"] == 1  # the limits stay

    assert fakes.dataverse.post("/_admin/limits", json={"enabled": False}).status_code == 200
    assert fakes.dataverse.get(WHO_AM_I).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [({"dataverse_window_s": -1}, "dataverse_window_s"), ({"speed": 1}, "speed"), (["x"], "must be an object")],
)
def test_admin_refuses_bad_limits_naming_the_field(fakes, body, field):
    response = fakes.dataverse.post("/_admin/limits", json=body)

    assert response.status_code == 400
    assert field in response.json()["error"]


# --- configured through the command line ---------------------------------------------------------


CLIENT = {"client_id": "onboarding-pipeline", "client_secret": "test-only-secret", "default_company": "usrt"}


def token(client: httpx.Client, fakes, resource: str) -> dict[str, str]:
    form = {"grant_type": "client_credentials", "client_id": CLIENT["client_id"],
            "client_secret": CLIENT["client_secret"], "scope": f"{resource}/.default"}  # fmt: skip
    answer = client.post(f"{fakes.authority}/oauth2/v2.0/token", data=form)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def test_running_fakes_passes_the_limits_and_fake_admin_drives_them(tmp_path: Path) -> None:
    flags = {"latency_ms": 20, "dataverse_requests": 2, "dataverse_window_s": 120, "dataverse_execution_s": 60,
             "dataverse_concurrent": 7, "commerce_requests": 1, "commerce_window_s": 30}
    with running_fakes(tmp_path, [CLIENT], **flags) as fakes, FakeAdmin(fakes) as admin, httpx.Client(
        verify=ssl.create_default_context(cafile=fakes.ca_bundle), timeout=30
    ) as client:
        report = admin.limits()
        assert report["latency_ms"] == 20 and report["enabled"] is True
        assert {name: report["dataverse"][name] for name in ("requests", "window_s", "execution_s", "concurrent")} == {
            "requests": 2, "window_s": 120, "execution_s": 60, "concurrent": 7}
        assert (report["commerce"]["requests"], report["commerce"]["window_s"]) == (1, 30)

        dataverse = token(client, fakes, fakes.dataverse)
        statuses = [client.get(fakes.dataverse + WHO_AM_I, headers=dataverse).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        commerce = token(client, fakes, fakes.commerce)
        assert [client.get(f"{fakes.commerce}/data/Prospects", headers=commerce).status_code for _ in range(2)] == [200, 429]
        throttled = admin.limits()
        assert throttled["dataverse"]["throttled"]["0x80072322"] == 1
        assert throttled["commerce"]["throttled"] == {"requests": 1}

        assert admin.set_limits(dataverse_requests=100)["dataverse"]["requests"] == 100
        assert client.get(fakes.dataverse + WHO_AM_I, headers=dataverse).status_code == 429  # still told to wait
        admin.reset()  # also forgets the windows
        assert admin.limits()["dataverse"]["throttled"]["0x80072322"] == 0
        assert client.get(fakes.dataverse + WHO_AM_I, headers=dataverse).status_code == 200


def test_running_fakes_can_switch_the_limits_off(tmp_path: Path) -> None:
    with running_fakes(tmp_path, [CLIENT], limits=False, dataverse_requests=1) as fakes, FakeAdmin(fakes) as admin:
        with httpx.Client(verify=ssl.create_default_context(cafile=fakes.ca_bundle), timeout=30) as client:
            dataverse = token(client, fakes, fakes.dataverse)
            assert [client.get(fakes.dataverse + WHO_AM_I, headers=dataverse).status_code for _ in range(3)] == [200] * 3
        assert admin.limits()["enabled"] is False


def test_command_line_refuses_bad_limits(tmp_path: Path) -> None:
    env = {**os.environ, "D365_FAKES_CLIENTS": json.dumps([CLIENT])}
    command = [sys.executable, "-m", "d365_fakes", "serve", "--state-dir", str(tmp_path), "--dataverse-window-s", "0"]

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert "--dataverse-window-s must be more than 0" in result.stderr
