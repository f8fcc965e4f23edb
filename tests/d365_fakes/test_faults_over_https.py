"""Fault injection against the running fakes over real HTTPS, as a chaos suite uses it: status,
slow and reset faults seen by httpx and MSAL, token revocation, the statistics, the serve flags."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msal
import pytest

from d365_fakes.running import STDERR_FILE, Endpoints, FakeAdmin, running_fakes

SYNC = {"client_id": "onboarding-pipeline", "client_secret": "test-only-secret", "default_company": "usrt"}
REPORTS = {"client_id": "reports", "client_secret": "other-secret", "default_company": "usrt"}
STARTUP_FAULTS = [
    {"system": "commerce", "status": 503, "retry_after": 3, "route": "Prospects", "count": 2},
    {"system": "dataverse", "kind": "reset", "method": "DELETE", "share": 0.5},
]
WEB_API = "/api/data/v9.2"


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Endpoints, dict]]:
    """The fakes, started with fault flags, and the fault report they started with."""
    with running_fakes(
        tmp_path_factory.mktemp("fakes"), [SYNC, REPORTS], faults=STARTUP_FAULTS, fault_seed=42
    ) as endpoints, FakeAdmin(endpoints) as admin:
        yield endpoints, admin.faults()


@pytest.fixture
def fakes(started: tuple[Endpoints, dict]) -> Endpoints:
    return started[0]


@pytest.fixture
def admin(fakes: Endpoints) -> Iterator[FakeAdmin]:
    with FakeAdmin(fakes) as admin:
        admin.reset()
        yield admin


@pytest.fixture
def client(fakes: Endpoints) -> Iterator[httpx.Client]:
    with httpx.Client(verify=ssl.create_default_context(cafile=fakes.ca_bundle), timeout=10) as client:
        yield client


def token_request(client: httpx.Client, fakes: Endpoints, resource: str, app: dict = SYNC) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": app["client_id"],
            "client_secret": app["client_secret"], "scope": f"{resource}/.default"}  # fmt: skip
    return client.post(f"{fakes.authority}/oauth2/v2.0/token", data=form)


def bearer(client: httpx.Client, fakes: Endpoints, resource: str, app: dict = SYNC) -> dict[str, str]:
    answer = token_request(client, fakes, resource, app)
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def create_lead(client: httpx.Client, fakes: Endpoints, headers: dict, subject: str, **options) -> httpx.Response:
    return client.post(f"{fakes.dataverse}{WEB_API}/leads", json={"subject": subject, "lastname": "Lovelace"},
                       headers=headers, **options)  # fmt: skip


def lead_subjects(client: httpx.Client, fakes: Endpoints, headers: dict) -> list[str]:
    answer = client.get(f"{fakes.dataverse}{WEB_API}/leads?$select=subject", headers=headers)
    assert answer.status_code == 200, answer.text
    return sorted(lead["subject"] for lead in answer.json()["value"])


def assert_server_logged_no_error(fakes: Endpoints) -> None:
    log = (Path(fakes.ca_bundle).parent / STDERR_FILE).read_text()
    assert "Error" not in log and "Exception" not in log, log


def test_serve_flags_start_with_the_rules_and_the_seed(started):
    _, report = started

    assert report["seed"] == 42
    assert [
        {name: rule[name] for name in ("system", "kind", "status", "retry_after", "route", "method", "count", "share")}
        for rule in report["rules"]
    ] == [
        {"system": "commerce", "kind": "status", "status": 503, "retry_after": 3, "route": "Prospects",
         "method": None, "count": 2, "share": None},
        {"system": "dataverse", "kind": "reset", "status": None, "retry_after": None, "route": None,
         "method": "DELETE", "count": None, "share": 0.5},
    ]  # fmt: skip


def test_a_status_fault_answers_with_retry_after(fakes, admin, client):
    admin.add_fault(system="dataverse", status=429, retry_after=2, route="UpsertMultiple", method="POST")
    headers = bearer(client, fakes, fakes.dataverse)
    upsert = f"{fakes.dataverse}{WEB_API}/leads/Microsoft.Dynamics.CRM.UpsertMultiple"

    throttled = client.post(upsert, json={"Targets": []}, headers=headers)
    answered = client.post(upsert, json={"Targets": []}, headers=headers)

    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "2"
    assert throttled.json()["error"]["code"] == "0x80072322"
    assert answered.status_code != 429


def test_a_slow_fault_after_serving_times_the_client_out_but_the_write_lands(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", kind="slow", delay_s=1, method="POST")

    with pytest.raises(httpx.ReadTimeout):
        create_lead(client, fakes, headers, "written, answer held", timeout=0.3)

    assert lead_subjects(client, fakes, headers) == ["written, answer held"]
    assert admin.counts()["dataverse"]["writes"]["leads"] == 1


def test_a_slow_fault_before_serving_serves_nothing_once_the_client_gave_up(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", kind="slow", delay_s=0.5, phase="before", method="POST")
    started = time.monotonic()

    with pytest.raises(httpx.ReadTimeout):
        create_lead(client, fakes, headers, "never written", timeout=0.2)
    time.sleep(max(0.0, started + 0.7 - time.monotonic()))  # past the delay: it would have been served

    assert lead_subjects(client, fakes, headers) == []
    counts = admin.counts()["dataverse"]
    assert counts["writes"]["leads"] == 0 and counts["requests"] == 2  # the faulted request and the read


def test_a_slow_fault_before_serving_answers_a_patient_client_late(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", kind="slow", delay_s=0.4, phase="before")
    started = time.monotonic()

    answer = create_lead(client, fakes, headers, "written late")

    assert answer.status_code == 204 and time.monotonic() - started >= 0.4
    assert lead_subjects(client, fakes, headers) == ["written late"]


def test_a_reset_after_serving_drops_the_answer_but_the_write_lands(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", kind="reset", method="POST")

    with pytest.raises(httpx.TransportError):
        create_lead(client, fakes, headers, "written, connection reset")

    assert lead_subjects(client, fakes, headers) == ["written, connection reset"]
    assert admin.faults()["served"]["dataverse"] == {"reset": 1}
    assert_server_logged_no_error(fakes)


def test_a_reset_before_serving_writes_nothing(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", kind="reset", phase="before", method="POST")

    with pytest.raises(httpx.TransportError):
        create_lead(client, fakes, headers, "never written")

    assert lead_subjects(client, fakes, headers) == []
    counts = admin.counts()["dataverse"]
    assert counts["requests"] == 2 and counts["writes"]["leads"] == 0  # counted, though not served
    assert_server_logged_no_error(fakes)


def test_a_reset_is_a_tcp_rst_not_a_close(fakes, admin):
    """Below TLS: the client's socket sees ECONNRESET (an RST), not an orderly end of stream."""
    admin.add_fault(system="commerce", kind="reset", phase="before")
    host, port = fakes.commerce.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=fakes.ca_bundle)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=host)

    with socket.create_connection((host, int(port)), timeout=5) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        tls.write(b"GET /data/Prospects HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
        raw.sendall(outgoing.read())
        with pytest.raises(ConnectionResetError):
            while raw.recv(65536):  # TLS session tickets may come first; then the RST
                pass


def test_entra_token_faults_reach_httpx_and_msal(fakes, admin, client, msal_honours_verify):
    admin.add_fault(system="entra", status=503, retry_after=1)
    admin.add_fault(system="entra", kind="reset", phase="before")

    unavailable = token_request(client, fakes, fakes.commerce)
    with pytest.raises(httpx.TransportError):
        token_request(client, fakes, fakes.commerce)
    issued = msal.ConfidentialClientApplication(
        SYNC["client_id"], client_credential=SYNC["client_secret"], authority=fakes.authority,
        instance_discovery=False, verify=fakes.ca_bundle,
    ).acquire_token_for_client(scopes=[f"{fakes.commerce}/.default"])  # fmt: skip

    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "1"
    assert unavailable.json()["error"] == "temporarily_unavailable"
    assert "access_token" in issued, issued  # discovery (not faulted by default), then the token
    assert admin.faults()["served"]["entra"] == {"503": 1, "reset": 1}
    assert admin.counts()["entra"]["tokens_issued"] == 1


def test_msal_raises_on_an_entra_503(fakes, admin, msal_honours_verify):
    admin.add_fault(system="entra", status=503)
    app = msal.ConfidentialClientApplication(
        SYNC["client_id"], client_credential=SYNC["client_secret"], authority=fakes.authority,
        instance_discovery=False, verify=fakes.ca_bundle,
    )  # fmt: skip

    with pytest.raises(msal.exceptions.MsalServiceError, match="HTTP Error: 503"):
        app.acquire_token_for_client(scopes=[f"{fakes.dataverse}/.default"])  # MSAL raises on any 5xx


def test_a_revoked_token_is_refused_and_a_new_one_works(fakes, admin, client):
    old = bearer(client, fakes, fakes.dataverse)
    reports = bearer(client, fakes, fakes.dataverse, REPORTS)
    who_am_i = f"{fakes.dataverse}{WEB_API}/WhoAmI"
    assert client.get(who_am_i, headers=old).status_code == 200

    admin.revoke_tokens(SYNC["client_id"])
    refused = client.get(who_am_i, headers=old)
    new = bearer(client, fakes, fakes.dataverse)  # most likely within the same second

    assert refused.status_code == 401
    assert f'resource_id="{fakes.dataverse}"' in refused.headers["WWW-Authenticate"]
    assert refused.json()["error"]["message"] == "Unauthorized: The token has been revoked."
    assert client.get(who_am_i, headers=new).status_code == 200
    assert client.get(who_am_i, headers=reports).status_code == 200  # another client's token

    admin.revoke_tokens()

    assert client.get(who_am_i, headers=reports).status_code == 401
    assert client.get(who_am_i, headers=bearer(client, fakes, fakes.dataverse, REPORTS)).status_code == 200


def test_the_admin_surface_is_never_faulted(fakes, admin, client):
    for system in ("commerce", "dataverse", "entra"):
        admin.add_fault(system=system, kind="reset", phase="before", route=".", share=1)

    for base in (fakes.entra, fakes.commerce, fakes.dataverse):
        assert client.get(f"{base}/_admin/counts").status_code == 200
    with pytest.raises(httpx.TransportError):
        client.get(f"{fakes.commerce}/data/Prospects")
    assert admin.faults()["served"] == {"commerce": {"reset": 1}, "dataverse": {}, "entra": {}}


def test_statistics_count_each_kind_and_every_request_is_counted(fakes, admin, client):
    headers = bearer(client, fakes, fakes.dataverse)
    admin.add_fault(system="dataverse", status=503, count=2)
    admin.add_fault(system="dataverse", kind="slow", delay_s=0.05)
    admin.add_fault(system="dataverse", kind="reset")
    who_am_i = f"{fakes.dataverse}{WEB_API}/WhoAmI"

    statuses = []
    for _ in range(5):
        try:
            statuses.append(client.get(who_am_i, headers=headers).status_code)
        except httpx.TransportError:
            statuses.append("reset")

    assert statuses == [503, 503, 200, "reset", 200]
    report = admin.faults()
    assert report["served"]["dataverse"] == {"503": 2, "slow": 1, "reset": 1}
    assert [(rule["remaining"], rule["fired"]) for rule in report["rules"]] == [(0, 2), (0, 1), (0, 1)]
    assert admin.counts()["dataverse"]["requests"] == 5

    admin.clear_faults()

    assert admin.faults()["rules"] == [] and admin.faults()["served"]["dataverse"] == {}
