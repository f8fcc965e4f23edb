"""The three fakes as one process: `python -m d365_fakes serve`, via running_fakes and directly."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msal
import pytest

from d365_fakes.running import Endpoints, FakeAdmin, FakesFailedToStart, running_fakes

CLIENT = {
    "client_id": "onboarding-pipeline",
    "client_secret": "test-only-secret",
    "default_company": "usrt",
}
PROSPECT = {
    "dataAreaId": "usrt",
    "ProspectId": "P-000001",
    "ProspectName": "Ada Lovelace",
    "CompanyName": "Analytical Engines Ltd",
    "PrimaryEmailAddress": "ada@engines.example",
}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory):
    with running_fakes(tmp_path_factory.mktemp("fakes"), [CLIENT]) as endpoints:
        yield endpoints


@pytest.fixture
def admin(fakes: Endpoints):
    with FakeAdmin(fakes) as admin:
        admin.reset()
        yield admin


def msal_token(endpoints: Endpoints, resource: str) -> dict:
    app = msal.ConfidentialClientApplication(
        CLIENT["client_id"],
        client_credential=CLIENT["client_secret"],
        authority=endpoints.authority,
        instance_discovery=False,
        verify=endpoints.ca_bundle,
    )
    return app.acquire_token_for_client(scopes=[f"{resource}/.default"])


def https(endpoints: Endpoints) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=endpoints.ca_bundle), timeout=30)


def test_endpoints_are_printed_and_written(fakes: Endpoints) -> None:
    state_dir = Path(fakes.ca_bundle).parent
    written = json.loads((state_dir / "endpoints.json").read_text())

    assert written == vars(fakes)
    assert fakes.authority == f"{fakes.entra}/{fakes.tenant_id}"
    for url in (fakes.entra, fakes.commerce, fakes.dataverse):
        assert url.startswith("https://127.0.0.1:")
    assert len({fakes.entra, fakes.commerce, fakes.dataverse}) == 3
    assert Path(fakes.ca_bundle).is_absolute() and Path(fakes.ca_bundle).exists()
    os.kill(fakes.pid, 0)  # the server process is alive


def test_token_for_commerce_opens_commerce_only(fakes, admin, msal_honours_verify) -> None:
    token = msal_token(fakes, fakes.commerce)
    assert token.get("token_source") == "identity_provider", token
    headers = {"Authorization": f"Bearer {token['access_token']}"}

    with https(fakes) as client:
        commerce = client.get(f"{fakes.commerce}/data/Prospects", headers=headers)
        dataverse = client.get(f"{fakes.dataverse}/api/data/v9.2/leads", headers=headers)

    assert commerce.status_code == 200, commerce.text
    assert dataverse.status_code == 401
    assert f'resource_id="{fakes.dataverse}"' in dataverse.headers["WWW-Authenticate"]
    assert admin.counts()["entra"] == {"tokens_issued": 1}


def test_admin_seeds_counts_and_resets(fakes, admin) -> None:
    assert admin.seed_prospects([PROSPECT]) == 1
    assert admin.outbox() == []
    counts = admin.counts()
    assert set(counts) == {"commerce", "dataverse", "entra"}
    assert counts["commerce"]["requests"] == 0  # admin calls are not Commerce requests

    admin.reset()

    assert admin.seed_prospects([PROSPECT]) == 1  # the first one is gone


def test_admin_rejects_bad_seed_rows_with_the_reason(fakes, admin) -> None:
    with pytest.raises(RuntimeError, match="400.*ProspectId"):
        admin.seed_prospects([{"dataAreaId": "usrt"}])
    with https(fakes) as client:
        response = client.post(f"{fakes.commerce}/_admin/commerce/prospects", json=[PROSPECT])
    assert response.status_code == 400
    assert "prospects" in response.json()["error"]


def test_restart_keeps_tenant_ca_and_signing_key(tmp_path: Path, msal_honours_verify) -> None:
    with running_fakes(tmp_path, [CLIENT]) as first:
        access_token = msal_token(first, first.commerce)["access_token"]
        ca_bundle = Path(first.ca_bundle).read_bytes()
    assert not (tmp_path / "endpoints.json").exists()  # removed on a clean shutdown
    ports = {
        f"{name}_port": int(getattr(first, name).rsplit(":", 1)[1])
        for name in ("entra", "commerce", "dataverse")
    }

    with running_fakes(tmp_path, [CLIENT], **ports) as second:
        with https(second) as client:
            response = client.get(
                f"{second.commerce}/data/Prospects",
                headers={"Authorization": f"Bearer {access_token}"},
            )

    assert second.tenant_id == first.tenant_id
    assert Path(second.ca_bundle).read_bytes() == ca_bundle
    assert response.status_code == 200, response.text  # a cached token survives the restart


def test_a_second_instance_on_taken_ports_fails_with_the_reason(fakes: Endpoints) -> None:
    state_dir = Path(fakes.ca_bundle).parent
    port = int(fakes.entra.rsplit(":", 1)[1])

    with pytest.raises(FakesFailedToStart, match=f"cannot listen on 127.0.0.1:{port}"):
        with running_fakes(state_dir, [CLIENT], entra_port=port):
            pass

    written = json.loads((state_dir / "endpoints.json").read_text())
    assert written["pid"] == fakes.pid  # the running instance's endpoints file is left alone


def test_command_line_serves_until_sigint_then_exits_cleanly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "D365_FAKES_CLIENTS": json.dumps([CLIENT]),  # inline JSON instead of --clients
    }
    ports = ["--entra-port", "0", "--commerce-port", "0", "--dataverse-port", "0"]
    command = [sys.executable, "-m", "d365_fakes", "serve", "--state-dir", str(tmp_path), *ports]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as server:
        endpoints = json.loads(server.stdout.readline())
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=15) == 0

    assert endpoints["pid"] == server.pid
    assert not (tmp_path / "endpoints.json").exists()


def test_command_line_refuses_to_start_without_clients(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "D365_FAKES_CLIENTS"}

    result = subprocess.run(
        [sys.executable, "-m", "d365_fakes", "serve", "--state-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=30,
    )

    assert result.returncode == 2
    assert "--clients FILE or set D365_FAKES_CLIENTS" in result.stderr
    assert result.stdout == ""


def test_delta_token_lifetime_is_a_serve_flag(tmp_path: Path, msal_honours_verify) -> None:
    with running_fakes(tmp_path, [CLIENT], delta_token_ttl_s=1) as fakes, https(fakes) as client:
        token = msal_token(fakes, fakes.dataverse)["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Prefer": "odata.track-changes"}
        tracked = client.get(f"{fakes.dataverse}/api/data/v9.2/leads", headers=headers)
        assert tracked.status_code == 200, tracked.text
        time.sleep(2.1)  # tokens carry whole seconds
        expired = client.get(tracked.json()["@odata.deltaLink"], headers=headers)

    assert expired.status_code == 400
    assert expired.json()["error"]["code"] == "0x80044352"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--host", "0.0.0.0"], "--public-host is required with --host 0.0.0.0"),
        (["--host", "10.1.2.3", "--public-host", "fakes"], "neither a loopback address nor 0.0.0.0"),
    ],
)
def test_command_line_refuses_addresses_the_admin_surface_cannot_serve(tmp_path: Path, flags, message) -> None:
    env = {**os.environ, "D365_FAKES_CLIENTS": json.dumps([CLIENT])}

    result = subprocess.run([sys.executable, "-m", "d365_fakes", "serve", "--state-dir", str(tmp_path), *flags],
                            env=env, capture_output=True, text=True, timeout=30)  # fmt: skip

    assert result.returncode == 2
    assert message in result.stderr


def non_loopback_ipv4() -> str | None:
    """An address of this machine other than the loopback (the route to a documentation address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: nothing is sent
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_on_all_addresses_urls_name_the_public_host_and_admin_answers_loopback_only(
    tmp_path: Path, msal_honours_verify
) -> None:
    with running_fakes(tmp_path, [CLIENT], host="0.0.0.0", public_host="localhost") as fakes:
        for url in (fakes.entra, fakes.commerce, fakes.dataverse):
            assert url.startswith("https://localhost:")
        assert fakes.admin == f"https://127.0.0.1:{fakes.entra.rsplit(':', 1)[1]}/_admin"
        token = msal_token(fakes, fakes.commerce)["access_token"]  # issuer and audience: localhost
        with https(fakes) as client, FakeAdmin(fakes) as admin:
            assert admin.seed_prospects([PROSPECT]) == 1
            prospects = client.get(f"{fakes.commerce}/data/Prospects", headers={"Authorization": f"Bearer {token}"})
            assert prospects.status_code == 200, prospects.text
            address = non_loopback_ipv4()
            if address is None:
                pytest.skip("no non-loopback IPv4 address to call the admin surface from")
            port = fakes.entra.rsplit(":", 1)[1]
            with httpx.Client(verify=False, timeout=30) as outsider:  # the certificate does not name it
                refused = outsider.get(f"https://{address}:{port}/_admin/counts")
    assert refused.status_code == 403
    assert "loopback callers only" in refused.text
