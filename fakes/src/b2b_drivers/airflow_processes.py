"""Airflow as separate processes on this machine (`airflow api-server`, `scheduler`, ...) with the
product's DAGs, plugins, connections and pools and the Simple auth manager's one user: the one way to
start, watch and stop it, for `make airflow` (local_airflow.py) and the end-to-end tests
(tests/e2e/airflow_services.py).

Each process runs in its own process group, its output in `<AIRFLOW_HOME>/services/<name>.log`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from b2b_onboarding.airflow.pools import POOLS_FILE

ROOT = Path(__file__).resolve().parents[3]
DAG_IDS = ("b2b_preflight", "b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation")
LEGAL_ENTITIES = ["usrt", "usmf"]
USERNAME = "admin"
PASSWORD_FILE = "simple_auth_manager_passwords.json"
# The part of `GET /monitor/health` each process heartbeats to, by the process's name.
HEALTH_PARTS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
STARTUP_TIMEOUT_S = 180
PRODUCT_SETTINGS = "AIRFLOW__D365_B2B_ONBOARDING__"  # the provider's config section (schedules.py)
STOP_TIMEOUT_S = 30


class AirflowFailed(RuntimeError):
    pass


@dataclass
class AirflowProcesses:
    """The processes of one deployment, its command line and its REST API (as USERNAME)."""

    home: Path  # AIRFLOW_HOME
    env: dict[str, str]  # of every process and the CLI (`environment`)
    base_url: str  # the api-server (UI, REST API, execution API)
    password: str
    username: str = USERNAME
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # by name, in the order of starting
    _token: str | None = None

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`airflow <args>` against this deployment (its metadata database and configuration); fails with its output."""
        done = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise AirflowFailed(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                f"{done.stderr[-3000:]}")  # fmt: skip
        return done

    def set_up_database(self, connections: Mapping[str, str]) -> None:
        """The metadata database migrated, the product's pools imported and `connections` (JSON by conn_id,
        `split_connections`) added to it, before any process starts."""
        self.cli("db", "migrate", timeout=300)
        self.cli("pools", "import", str(POOLS_FILE))
        for conn_id, value in connections.items():
            self.cli("connections", "add", conn_id, "--conn-json", value)

    def token(self) -> str:
        """A JWT for the admin, from `POST /auth/token` (as any REST client gets one)."""
        if self._token is None:
            answer = httpx.post(f"{self.base_url}/auth/token", json={"username": self.username, "password":
                                self.password}, timeout=30)  # fmt: skip
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """`/api/v2<path>` as the admin (with any more `headers`); the decoded JSON answer (None when empty)."""
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        answer = httpx.request(method, f"{self.base_url}/api/v2{path}", headers=headers, timeout=60, **kwargs)
        if answer.is_error:
            raise AirflowFailed(f"{method} /api/v2{path} answered {answer.status_code}: {answer.text[:2000]}")
        return answer.json() if answer.content else None

    def log_path(self, name: str) -> Path:
        return self.home / "services" / f"{name}.log"

    def start_process(self, name: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        """`airflow <args>` (by default `airflow <name>`), with `env` over the deployment's settings, in its own
        session: stopping its group stops what it started (LocalExecutor and Celery workers, uvicorn), and
        Ctrl-C reaches the starter alone. Its output is appended to `services/<name>.log`."""
        self.log_path(name).parent.mkdir(exist_ok=True)
        with open(self.log_path(name), "ab") as log:
            command = [sys.executable, "-m", "airflow", *(args or (name,))]
            self.processes[name] = subprocess.Popen(command, env=self.env | dict(env or {}), stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def stop_process(self, name: str) -> None:
        """SIGTERM to the process's group (SIGKILL after STOP_TIMEOUT_S), then SIGKILL to whatever of the
        group is left."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """Every process, in the reverse order of starting (the api-server last)."""
        for name in reversed(list(self.processes)):
            self.stop_process(name)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AirflowFailed(f"airflow {name} exited with {process.returncode}\n{self.log_tails()}")

    def log_tails(self, limit: int = 3000) -> str:
        """The end of each process's log, for a failure's message."""
        return "\n".join(f"--- {path.stem} ({path}) ---\n{path.read_text(errors='replace')[-limit:]}"
                         for path in sorted((self.home / "services").glob("*.log")))  # fmt: skip

    def wait_until_ready(self, ready_markers: Mapping[str, str] | None = None) -> None:
        """Until the api-server answers, every scheduler, dag-processor and triggerer started heartbeats, each
        process of `ready_markers` has logged its marker (a Celery worker: "celery@<name> ready."), and both
        DAGs are parsed. Fails at once when a process exits or a DAG does not import."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S

        def waiting(what: str) -> None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise AirflowFailed(f"Airflow not ready after {STARTUP_TIMEOUT_S} s: {what}\n{self.log_tails()}")
            time.sleep(1)

        while not self._healthy():
            waiting("health")
        for name, marker in (ready_markers or {}).items():
            while marker not in self.log_path(name).read_text(errors="replace"):
                waiting(f"{name} ready ({marker!r} in its log)")
        while not set(DAG_IDS) <= (parsed := self._parsed_dags()):
            waiting(f"DAGs parsed (found {sorted(parsed)})")

    def _healthy(self) -> bool:
        parts = ["metadatabase", *(HEALTH_PARTS[name] for name in self.processes if name in HEALTH_PARTS)]
        try:
            health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all((health.get(part) or {}).get("status") == "healthy" for part in parts)

    def _parsed_dags(self) -> set[str]:
        errors = self.api("GET", "/importErrors")
        if errors["total_entries"]:
            raise AirflowFailed(f"DAG import errors: {errors['import_errors']}")
        return {dag["dag_id"] for dag in self.api("GET", "/dags", params={"limit": 100})["dags"]}


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at this moment, for a deployment's api-server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def split_connections(connections: Mapping[str, str],
                      in_database: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:  # fmt: skip
    """The `AIRFLOW_CONN_*` variables of `connections` (scenario.airflow_connections) but those of the conn_ids
    `in_database`, and those by conn_id, for `set_up_database`: the UI and the REST API can change a connection
    in the metadata database, not a variable (which Airflow would read first)."""
    variables = dict(connections)
    return variables, {conn_id: variables.pop(f"AIRFLOW_CONN_{conn_id.upper()}") for conn_id in in_database}


def admin_password(home: Path) -> str:
    """USERNAME's password, made on the first start in `home` and kept (a saved login keeps working). The
    Simple auth manager reads this file; it generates one only where none is configured."""
    path = home / PASSWORD_FILE
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(json.dumps({USERNAME: secrets.token_urlsafe(16)}))
    return json.loads(path.read_text())[USERNAME]


def environment(home: Path, port: int, connections: Mapping[str, str], executor: str = "LocalExecutor",
                metadata_url: str | None = None) -> dict[str, str]:  # fmt: skip
    """The settings of every process and the CLI: the product with `connections` (`AIRFLOW_CONN_*`), the
    api-server on 127.0.0.1:`port`, the metadata database at `metadata_url` (default: SQLite in `home`)."""
    # Nothing Airflow-related leaks in from the caller: a user's own AIRFLOW_* settings (a real deployment's
    # database, say), the test process's home (tests/conftest.py); but the product's own section does
    # (`AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING=time make airflow`).
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("AIRFLOW") or name.startswith(PRODUCT_SETTINGS)}  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    # The processes, their workers and the CLI share one SQLite file: a writer waits up to a minute for
    # another to finish, not the driver's default 5 s.
    metadata_url = metadata_url or f"sqlite:///{home / 'airflow.db'}?timeout=60"
    return env | dict(connections) | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executor,
        # The LocalExecutor forks this many workers at once (Airflow's default: 32, too many for a 2-core
        # machine); the pools' 8 slots bound the tasks that do the work.
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__API__BASE_URL": base_url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
        # One secret for every process: the api-server must accept the JWTs the scheduler signs for tasks.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORD_FILE),
        # As in production: nothing runs until someone unpauses a DAG (the tests do, through the REST API).
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # The Connections form's Test button: the api-server runs the hook's test_connection itself
        # (POST /api/v2/connections/test), so it reaches the fakes with the connection's CA bundle.
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
    }  # fmt: skip
