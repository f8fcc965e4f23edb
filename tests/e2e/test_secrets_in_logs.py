"""No client secret and no bearer token in the logs of a full run, at DEBUG, with real MSAL, httpx and TLS.

Both DAGs run with `airflow dags test` (a process each, its own AIRFLOW_HOME, logging at DEBUG so that
httpcore, MSAL and the product log all they can) against the fakes: sync, the sellers decide,
reconciliation. Everything the runs wrote is then searched: each process's stdout and stderr and
every file under the run's AIRFLOW_HOME/logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from b2b_onboarding.airflow.pools import POOLS_FILE
from d365_fakes.actors import Seller
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import play_sellers, prospects

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
BEARER = re.compile(r"(?i)bearer\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]{20,}=*")


@dataclass(frozen=True)
class Logs:
    sources: dict[str, str]  # where (a process's stream, a log file) → what it holds
    secret: str
    counts: dict

    @property
    def text(self) -> str:
        return "\n".join(self.sources.values())

    def lines_with(self, value: str) -> list[tuple[str, str]]:
        return [(where, line) for where, text in self.sources.items() for line in text.splitlines() if value in line]


def _airflow(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,  # the world's AIRFLOW_CONN_* connections
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "DEBUG",
    }
    return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                          timeout=480)  # fmt: skip


@pytest.fixture(scope="module")
def logs(world, tmp_path_factory) -> Logs:
    home = tmp_path_factory.mktemp("airflow-debug")
    for setup in (("db", "migrate"), ("pools", "import", str(POOLS_FILE))):
        done = _airflow(home, *setup)
        assert done.returncode == 0, done.stderr[-3000:]

    sources: dict[str, str] = {}

    def run(dag_id: str) -> None:
        done = _airflow(home, "dags", "test", dag_id)
        sources[f"{dag_id} stdout"], sources[f"{dag_id} stderr"] = done.stdout, done.stderr
        assert done.returncode == 0, f"{dag_id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    seeded, plan = prospects(16)
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    with FakeAdmin(world.endpoints) as admin:
        admin.reset()
        admin.seed_prospects(seeded)
        run("b2b_prospect_sync")
        assert play_sellers(seller, plan)
        run("b2b_outcome_reconciliation")
        counts = admin.counts()
    seller.close()
    for path in sorted((home / "logs").rglob("*")):
        if path.is_file():
            sources[str(path.relative_to(home))] = path.read_text(errors="replace")
    return Logs(sources, world.cast.integration["client_secret"], counts)


# Airflow 3.3.2's in-process supervisor of `airflow dags test` logs every request a task sends it at
# DEBUG ("Sending request ... msg=..."), and Airflow's masker does not look inside those message
# objects: the `MaskSecret` request that Airflow itself sends to mask a connection's password carries
# that password. The real supervisor (scheduler-run tasks) logs "(body omitted)" for these. Outside the
# product's reach; allowed here only in exactly that form, and pinned by the strict xfail below.
def _airflow_echo_of_mask_request(line: str, secret: str) -> bool:
    return re.fullmatch(
        r".*\[debug\s*\] Sending request\s+loc=supervisor\.py:\d+ "
        rf"msg=MaskSecret\(value='{re.escape(secret)}', name=None, type='MaskSecret'\)\s*", line
    ) is not None


def test_the_run_really_used_tokens_at_debug_level(logs):
    """So that the searches below cannot pass for want of anything to find."""
    assert logs.counts["entra"]["tokens_issued"] > 0
    assert logs.counts["commerce"]["requests"] > 0 and logs.counts["dataverse"]["requests"] > 0
    text = logs.text
    commerce = sum(int(n) for n in re.findall(r"'commerce_requests': (\d+)", text))
    dataverse = sum(int(n) for n in re.findall(r"'dataverse_requests': (\d+)", text))
    assert commerce > 0 and dataverse > 0, "the tasks' request counts are missing from the logs"
    assert "[httpcore.http11]" in text and "send_request_headers" in text, "httpcore did not log at DEBUG"
    assert "[msal." in text, "MSAL did not log at DEBUG"
    # MSAL logs each token response with its own "********" in place of the token; the product's
    # filter turns that into "***": proof the filter sits on MSAL's loggers in the task.
    assert '"access_token": "***"' in text


def test_no_jwt_and_no_bearer_token_anywhere(logs):
    for where, text in logs.sources.items():
        assert not JWT.search(text), f"a JWT in {where}: …{text[JWT.search(text).start() - 200:][:400]}"
        assert not BEARER.search(text), f"a bearer token in {where}: …{text[BEARER.search(text).start() - 200:][:400]}"


def test_the_client_secret_appears_nowhere_but_in_airflows_own_echo_of_its_mask_request(logs):
    leaks = [(where, line) for where, line in logs.lines_with(logs.secret)
             if not _airflow_echo_of_mask_request(line, logs.secret)]  # fmt: skip
    assert leaks == []
    assert not any(where.startswith("logs") for where, _ in logs.lines_with(logs.secret))


@pytest.mark.xfail(strict=True, reason="Airflow 3.3.2 `dags test` echoes MaskSecret requests at DEBUG (see above)")
def test_the_client_secret_appears_nowhere_at_all(logs):
    assert logs.lines_with(logs.secret) == []


def test_the_searches_would_catch_a_real_token_and_the_secret(world):
    """The negative control: a token from these fakes, logged unredacted, is found by both patterns."""
    app = world.cast.seller  # not the product's app: its token never enters the run
    with httpx.Client(verify=world.endpoints.ca_bundle) as http:
        answer = http.post(f"{world.endpoints.authority}/oauth2/v2.0/token", data={
            "grant_type": "client_credentials", "client_id": app["client_id"], "client_secret": app["client_secret"],
            "scope": f"{world.endpoints.dataverse}/.default"})  # fmt: skip
    token = answer.json()["access_token"]
    leaked = f"send_request_headers headers=[(b'Authorization', b'Bearer {token}')]"
    assert JWT.search(leaked) and BEARER.search(leaked)

    from b2b_onboarding import redaction

    redaction.register_secret(app["client_secret"])
    cleaned = redaction.redact(f"{leaked} client_secret={app['client_secret']}")
    assert not JWT.search(cleaned) and not BEARER.search(cleaned) and app["client_secret"] not in cleaned
