"""`python -m d365_fakes demo-world`: the fakes, the demo's prospects seeded, and sellers at work
(the compose file's `fakes` service; tests/deploy runs it as that file gives it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import msal
from tests.deploy.test_compose import wait_for_line

INTEGRATION = {"client_id": "b2b-onboarding-airflow", "client_secret": "test-only-secret"}


def test_seeds_the_prospects_and_sellers_decide_the_open_leads_until_sigterm(tmp_path: Path, msal_honours_verify) -> None:
    env = {**os.environ, "D365_FAKES_CLIENTS": json.dumps([INTEGRATION])}
    ports = ["--entra-port=0", "--commerce-port=0", "--dataverse-port=0"]
    command = [sys.executable, "-m", "d365_fakes", "demo-world", f"--state-dir={tmp_path}", *ports,
               "--prospects=10", "--legal-entities=usrt", "--sellers-every-s=0.2"]  # fmt: skip
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as world:
        try:
            assert "seeded 10 Pending B2B prospects in usrt" in wait_for_line(world, "demo-world: seeded")
            endpoints = json.loads((tmp_path / "endpoints.json").read_text())
            # As the sync would: a Commerce B2B lead for the first prospect, which the demo plans as won.
            app = msal.ConfidentialClientApplication(INTEGRATION["client_id"], client_credential=INTEGRATION["client_secret"],
                                                     authority=endpoints["authority"], instance_discovery=False,
                                                     verify=endpoints["ca_bundle"])  # fmt: skip
            token = app.acquire_token_for_client(scopes=[f"{endpoints['dataverse']}/.default"])["access_token"]
            lead = {"lastname": "Lovelace", "companyname": "Lovelace Trading 0", "emailaddress1": "partner0000@example.com",
                    "msdyn_prospectid": "usrt:P-000001", "msdyn_b2bcommerceprospect": True}  # fmt: skip
            with httpx.Client(verify=endpoints["ca_bundle"], timeout=30) as client:
                created = client.post(f"{endpoints['dataverse']}/api/data/v9.2/leads", json=lead,
                                      headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert created.status_code == 204, created.text

            assert wait_for_line(world, "demo-world: sellers decided").strip() == "demo-world: sellers decided: 1 won"
        finally:
            world.send_signal(signal.SIGTERM)
            world.communicate(timeout=30)
    assert world.returncode == 0
    assert not (tmp_path / "endpoints.json").exists()  # the fakes were stopped with it


def test_refuses_a_registration_that_takes_the_sellers_client_id(tmp_path: Path) -> None:
    clients = [INTEGRATION, {"client_id": "demo-seller", "client_secret": "x"}]
    env = {**os.environ, "D365_FAKES_CLIENTS": json.dumps(clients)}

    result = subprocess.run([sys.executable, "-m", "d365_fakes", "demo-world", f"--state-dir={tmp_path}"],
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip

    assert result.returncode == 2
    assert "demo-seller is the demo's seller" in result.stderr
