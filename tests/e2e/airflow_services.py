"""Airflow for real, against the fakes: `airflow api-server`, `airflow scheduler` and
`airflow dag-processor` as processes (by default LocalExecutor, SQLite metadata database in a
temporary AIRFLOW_HOME), the product's connections as `AIRFLOW_CONN_*` variables, its pools
imported, both DAGs unpaused, and the Simple auth manager with one admin whose password the tests
know. A `Topology` chooses another executor, metadata database, state store, settings and more
processes (tests/distributed: CeleryExecutor on PostgreSQL and Redis with two Celery workers).

A pytest plugin: a test module asks for it with `pytest_plugins = ["airflow_services"]` and uses
the `airflow_services` fixture. Airflow starts once, for the first test that asks for it, and stops
after the last test in a row that does (so it does not idle beside the rest of the suite).
Each process's output is in `<AIRFLOW_HOME>/services/`, copied to `.artifacts/airflow-services/`
(the topology's `artifacts`) when Airflow stops.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from d365_fakes.actors import Seller
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import Cast, airflow_connections

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".artifacts"
POOLS = REPO / "plugins" / "b2b_onboarding" / "pools.json"
SYNC = "b2b_prospect_sync"
RECONCILIATION = "b2b_outcome_reconciliation"
DAG_IDS = (SYNC, RECONCILIATION)
LEGAL_ENTITIES = ["usrt", "usmf"]
USERNAME = "admin"
SERVICES = ("api-server", "scheduler", "dag-processor")  # started in this order, stopped in the reverse
STARTUP_TIMEOUT_S = 180
FINISHED = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_artifact_gitignore() -> None:
    """`.artifacts/` ignores itself, whatever the repository's `.gitignore` says."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")


class AirflowFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Process:
    """A long-running `airflow <args>` process of the deployment, with its own settings on top of the
    deployment's (`env`). The deployment is ready only once its log holds `ready_marker`, if any."""

    name: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    ready_marker: str | None = None


@dataclass(frozen=True)
class Topology:
    """How Airflow is deployed. The default is the end-to-end tests' one: LocalExecutor, SQLite
    metadata database and state store in the temporary directory, the three services."""

    executor: str = "LocalExecutor"
    metadata_url: str | None = None  # SQLAlchemy URL of Airflow's metadata database; None: SQLite in AIRFLOW_HOME
    state_connection: str | None = None  # AIRFLOW_CONN_D365_STATE (JSON); None: a SQLite file, `state_db`
    env: Mapping[str, str] = field(default_factory=dict)  # more settings, for every process and the CLI
    extra_processes: tuple[Process, ...] = ()  # started after the three services (e.g. Celery workers)
    artifacts: str = "airflow-services"  # where under .artifacts/ the processes' output is kept
    keep_task_logs: bool = False  # also keep the task logs (<AIRFLOW_HOME>/logs) there

    def processes(self) -> tuple[Process, ...]:
        return tuple(Process(name, (name,)) for name in SERVICES) + self.extra_processes


@dataclass
class AirflowServices:
    """What a test needs of the running Airflow and fakes."""

    base_url: str  # the api-server (UI, REST API, execution API)
    home: Path
    env: dict[str, str]
    username: str
    password: str
    endpoints: Endpoints
    cast: Cast
    state_db: Path | None  # the state store's SQLite file; None when the topology puts it elsewhere
    topology: Topology = field(default_factory=Topology)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None

    # --- the command line and the REST API -------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`airflow <args>` against this deployment (its metadata database and configuration)."""
        done = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if done.returncode != 0:
            raise AirflowFailed(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                                f"{done.stderr[-3000:]}")  # fmt: skip
        return done

    def backfill(self, dag_id: str, *flags: str) -> dict:
        """`airflow backfill create --dag-id <dag_id> <flags>`; the new backfill as `GET /backfills` shows it."""
        return self._create_backfill(dag_id, lambda: self.cli("backfill", "create", "--dag-id", dag_id, *flags,
                                                              timeout=300))  # fmt: skip

    def backfill_as_the_ui(self, dag_id: str, from_date: str, to_date: str, **fields: Any) -> dict:
        """`POST /api/v2/backfills` with the body the UI's Backfill form sends, its defaults included
        (`max_active_runs` 1, `reprocess_behavior` "none"); the new backfill."""
        body = {"dag_id": dag_id, "from_date": from_date, "to_date": to_date, "dag_run_conf": {},
                "max_active_runs": 1, "reprocess_behavior": "none", "run_backwards": False, **fields}  # fmt: skip
        return self._create_backfill(dag_id, lambda: self.api("POST", "/backfills", json=body))

    def _create_backfill(self, dag_id: str, create: Any, attempts: int = 5) -> dict:
        """SQLite only: Airflow 3.3.2 creates each run of a backfill in its own read-then-write
        transaction, which SQLite refuses at once ("database is locked", no busy wait) when another
        process commits meanwhile. The scheduler and the dag-processor commit every few seconds, so
        beside them a week of */15 runs (673 inserts, ~10 s) does not get through (measured: 0 of 8
        attempts; 2 of 10 beside the dag-processor alone; the REST API, hence the UI, answers 503 for
        the same reason). So both are stopped while the runs are created and started again after; the
        creation is repeated if it still meets a lock (Airflow removes a partial backfill itself).
        PostgreSQL needs none of this."""
        with self.writers_stopped():
            for attempt in range(1, attempts + 1):
                try:
                    create()
                    break
                except AirflowFailed as error:
                    locked = "database is locked" in str(error) or " answered 503" in str(error)
                    if not locked or attempt == attempts:
                        raise
                    print(f"backfill of {dag_id}: SQLite's 'database is locked' (attempt {attempt}), again")
                    time.sleep(1)
        backfills = self.api("GET", "/backfills", params={"dag_id": dag_id, "limit": 100})["backfills"]
        return max(backfills, key=lambda backfill: backfill["id"])

    def token(self) -> str:
        """A JWT for the admin, from `POST /auth/token` (as any REST client gets one)."""
        if self._token is None:
            answer = httpx.post(f"{self.base_url}/auth/token", json={"username": self.username, "password":
                                self.password}, timeout=30)  # fmt: skip
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """`/api/v2<path>` as the admin; the decoded JSON answer (None when empty)."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        answer = httpx.request(method, f"{self.base_url}/api/v2{path}", headers=headers, timeout=60, **kwargs)
        if answer.is_error:
            raise AirflowFailed(f"{method} /api/v2{path} answered {answer.status_code}: {answer.text[:2000]}")
        return answer.json() if answer.content else None

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """A manual run, as the UI's Trigger button makes it; its run id."""
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240) -> dict:
        """Waits for the run to end; fails with its task states when it did not succeed."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in FINISHED:
                break
            if time.monotonic() > deadline:
                raise AirflowFailed(f"{dag_id} {run_id} still {run['state']} after {timeout} s; "
                                    f"tasks: {self.task_states(dag_id, run_id)}\n{self.log_tails()}")  # fmt: skip
            self.check([dag_id])
            time.sleep(1)
        if run["state"] != "success":
            raise AirflowFailed(f"{dag_id} {run_id} ended {run['state']}; tasks: {self.task_states(dag_id, run_id)}")
        return run

    def run_dag(self, dag_id: str, conf: dict | None = None, timeout: float = 240) -> dict:
        """Triggers a run through the REST API and waits for its success."""
        self.wait_idle([dag_id], timeout=timeout)  # max_active_runs=1: a scheduled run would queue ours
        return self.wait_for_run(dag_id, self.trigger(dag_id, conf), timeout)

    def task_states(self, dag_id: str, run_id: str) -> list[tuple[str, int, str | None]]:
        instances = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return [(ti["task_id"], ti["map_index"], ti["state"]) for ti in instances["task_instances"]]

    def check(self, dag_ids: Iterable[str] = DAG_IDS) -> None:
        """Fails at once when a process died or a task of the DAGs failed or waits for a retry (the
        fakes inject no fault here: a failed task is a bug, and its retries would only take minutes)."""
        self.check_alive()
        errors = self.task_errors(dag_ids)
        if errors:
            raise AirflowFailed("tasks failed:\n" + "\n".join(errors))

    def task_errors(self, dag_ids: Iterable[str] = DAG_IDS) -> list[str]:
        """Each failed (or up-for-retry) task instance of the DAGs, with the errors its log holds."""
        errors = []
        for dag_id in dag_ids:
            found = self.api("GET", f"/dags/{dag_id}/dagRuns/~/taskInstances",
                             params={"state": ["failed", "up_for_retry"], "limit": 20})  # fmt: skip
            for ti in found["task_instances"]:
                where = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={ti['dag_run_id']}"
                where /= f"task_id={ti['task_id']}"
                if ti["map_index"] >= 0:
                    where /= f"map_index={ti['map_index']}"
                logged = []
                for log in sorted(where.glob("attempt=*.log")):
                    for line in log.read_text(errors="replace").splitlines():
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue
                        if event.get("level") in ("error", "critical"):
                            details = "; ".join(f"{detail.get('exc_type')}: {detail.get('exc_value')}"
                                                for detail in event.get("error_detail") or [])  # fmt: skip
                            logged.append(f"{event.get('event')} {details}".strip())
                index = f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""
                errors.append(f"{dag_id} {ti['dag_run_id']} {ti['task_id']}{index} {ti['state']}: "
                              + (" | ".join(logged) or "(no error in its log)"))  # fmt: skip
        return errors

    def runs(self, dag_id: str, **params: Any) -> list[dict]:
        """Every run of `dag_id` matching the `GET /dagRuns` filters, all pages."""
        found: list[dict] = []
        while True:
            page = self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "offset": len(found),
                                                                      "order_by": "id", **params})  # fmt: skip
            found += page["dag_runs"]
            if not page["dag_runs"] or len(found) >= page["total_entries"]:
                return found

    def active_runs(self, dag_ids: Iterable[str] = DAG_IDS) -> int:
        return sum(self.api("GET", f"/dags/{dag_id}/dagRuns", params={"state": state, "limit": 1})["total_entries"]
                   for dag_id in dag_ids for state in ("queued", "running"))  # fmt: skip

    def wait_idle(self, dag_ids: Iterable[str] = DAG_IDS, timeout: float = 240) -> None:
        """Waits until no run of the DAGs is queued or running (scheduled runs included)."""
        dag_ids = list(dag_ids)
        deadline = time.monotonic() + timeout
        while self.active_runs(dag_ids):
            if time.monotonic() > deadline:
                raise AirflowFailed(f"runs of {dag_ids} still active after {timeout} s\n{self.log_tails()}")
            self.check(dag_ids)
            time.sleep(1)

    # --- the world the product works on ----------------------------------------------------------

    def admin(self) -> FakeAdmin:
        return FakeAdmin(self.endpoints)

    def seller(self) -> Seller:
        return Seller(self.endpoints, self.cast.seller["client_id"], self.cast.seller["client_secret"])

    def fresh_world(self) -> None:
        """Empty fakes and no state store, once no run is active: each test tells its own story."""
        if self.state_db is None:
            raise NotImplementedError("fresh_world() empties a SQLite state store only")
        self.wait_idle()
        with self.admin() as admin:
            admin.reset()
        for path in self.state_db.parent.glob(self.state_db.name + "*"):
            path.unlink()

    # --- the processes -----------------------------------------------------------------------------

    def process_spec(self, name: str) -> Process:
        return next((spec for spec in self.topology.processes() if spec.name == name), Process(name, (name,)))

    def log_path(self, name: str) -> Path:
        return self.home / "services" / f"{name}.log"

    def start_process(self, name: str) -> None:
        """The topology's process `name` (by default `airflow <name>`) in its own session (stopping it
        stops what it started: LocalExecutor and Celery workers, uvicorn), its output appended to
        `services/<name>.log`."""
        spec = self.process_spec(name)
        with open(self.log_path(name), "ab") as log:
            command = [sys.executable, "-m", "airflow", *spec.args]
            self.processes[name] = subprocess.Popen(command, env=self.env | dict(spec.env), stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def stop_process(self, name: str) -> None:
        """SIGTERM to the process group this module started (SIGKILL after 30 s), then SIGKILL to
        whatever of the group is left."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @contextmanager
    def writers_stopped(self) -> Iterator[None]:
        """The scheduler and the dag-processor stopped (gracefully) for the block, then started again."""
        for name in ("scheduler", "dag-processor"):
            self.stop_process(name)
        try:
            yield
        finally:
            for name in ("dag-processor", "scheduler"):
                self.start_process(name)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AirflowFailed(f"airflow {name} exited with {process.returncode}\n{self.log_tails()}")

    def log_tails(self, limit: int = 3000) -> str:
        parts = []
        for name in [spec.name for spec in self.topology.processes()]:
            path = self.log_path(name)
            if path.exists():
                parts.append(f"--- {name} ({path}) ---\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)


def _environment(home: Path, port: int, password_file: Path, connections: dict[str, str],
                 topology: Topology) -> dict[str, str]:  # fmt: skip
    # Nothing Airflow-related leaks in from the test process (tests/conftest.py sets its own home).
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    base_url = f"http://127.0.0.1:{port}"
    # Three processes, their workers and the CLI share one SQLite file: a writer waits up to a
    # minute for another to finish, not the driver's default 5 s.
    metadata_url = topology.metadata_url or f"sqlite:///{home / 'airflow.db'}?timeout=60"
    return env | connections | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), env.get("PYTHONPATH")])),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": topology.executor,
        "AIRFLOW__CORE__PARALLELISM": "8",  # worker processes of the LocalExecutor, on a 2-core machine
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
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # unpaused through the API, as an operator does
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
    } | dict(topology.env)  # fmt: skip


def start(directory: Path, topology: Topology | None = None) -> tuple[AirflowServices, ExitStack]:
    """Fakes, then the metadata database and pools, then the topology's processes; returns once they
    are ready, both DAGs are parsed, unpaused, and the runs the scheduler made at unpausing have ended.
    Closing the stack stops everything, also when starting failed half-way."""
    topology = topology or Topology()
    stack = ExitStack()
    try:
        cast = Cast.new()
        endpoints = stack.enter_context(running_fakes(directory / "fakes", cast.clients))
        home = directory / "airflow"
        (home / "services").mkdir(parents=True)
        password = secrets.token_urlsafe(16)
        password_file = home / "simple_auth_manager_passwords.json"
        password_file.write_text(json.dumps({USERNAME: password}))  # read, not regenerated, by the auth manager
        port = free_port()
        state_db = directory / "state.db" if topology.state_connection is None else None
        connections = airflow_connections(endpoints, cast, LEGAL_ENTITIES, state_db or directory / "unused.db")
        if topology.state_connection is not None:
            connections["AIRFLOW_CONN_D365_STATE"] = topology.state_connection
        env = _environment(home, port, password_file, connections, topology)
        services = AirflowServices(f"http://127.0.0.1:{port}", home, env, USERNAME, password, endpoints, cast,
                                   state_db, topology)  # fmt: skip
        stack.callback(_stop_all, services)
        services.cli("db", "migrate", timeout=300)
        services.cli("pools", "import", str(POOLS))
        for spec in topology.processes():
            services.start_process(spec.name)
        _wait_until_ready(services)
        return services, stack
    except BaseException:
        stack.close()
        raise


def _wait_until_ready(services: AirflowServices) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def waiting(what: str) -> None:
        services.check_alive()
        if time.monotonic() > deadline:
            raise AirflowFailed(f"Airflow not ready after {STARTUP_TIMEOUT_S} s: {what}\n{services.log_tails()}")
        time.sleep(1)

    while True:  # api-server up, scheduler and dag-processor heartbeating
        try:
            health = httpx.get(f"{services.base_url}/api/v2/monitor/health", timeout=5).json()
            if all(health.get(part, {}).get("status") == "healthy" for part in ("metadatabase", "scheduler",
                                                                                   "dag_processor")):  # fmt: skip
                break
        except httpx.HTTPError:
            pass
        waiting("health")
    for spec in services.topology.processes():  # e.g. Celery workers: "celery@<name> ready."
        while spec.ready_marker and spec.ready_marker not in services.log_path(spec.name).read_text(errors="replace"):
            waiting(f"{spec.name} ready ({spec.ready_marker!r} in its log)")
    while True:  # both DAGs parsed
        errors = services.api("GET", "/importErrors")
        if errors["total_entries"]:
            raise AirflowFailed(f"DAG import errors: {errors['import_errors']}")
        found = {dag["dag_id"] for dag in services.api("GET", "/dags", params={"limit": 100})["dags"]}
        if set(DAG_IDS) <= found:
            break
        waiting(f"DAGs parsed (found {sorted(found)})")
    for dag_id in DAG_IDS:
        services.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    # Unpausing makes each DAG's latest scheduled run (catchup=False): let them end on an empty world.
    time.sleep(3)
    services.wait_idle(timeout=STARTUP_TIMEOUT_S)


def _stop_all(services: AirflowServices) -> None:
    for spec in reversed(services.topology.processes()):
        services.stop_process(spec.name)
    for name in list(services.processes):  # anything else a test started
        services.stop_process(name)
    write_artifact_gitignore()
    target = ARTIFACTS / services.topology.artifacts
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(services.home / "services", target)
    if services.topology.keep_task_logs and (services.home / "logs").is_dir():
        shutil.copytree(services.home / "logs", target / "task-logs")


# --- the pytest plugin -----------------------------------------------------------------------------

_running: tuple[AirflowServices, ExitStack] | None = None
_failed: str | None = None  # why Airflow did not start: the next test is told at once, not made to wait again


def _stop() -> None:
    global _running
    if _running is not None:
        _, stack = _running
        _running = None
        stack.close()


@pytest.fixture
def airflow_services(tmp_path_factory: pytest.TempPathFactory) -> AirflowServices:
    """The running Airflow and its fakes, started for the first test that asks (see the module)."""
    global _running, _failed
    if _failed is not None:
        pytest.fail(f"Airflow did not start for an earlier test: {_failed}", pytrace=False)
    if _running is None:
        started = time.monotonic()
        try:
            _running = start(tmp_path_factory.mktemp("airflow-services"))
        except Exception as error:
            _failed = str(error)[:4000]
            raise
        print(f"Airflow started in {time.monotonic() - started:.1f} s at {_running[0].base_url}")
    return _running[0]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or "airflow_services" not in getattr(nextitem, "fixturenames", ()):
        _stop()


def pytest_sessionfinish() -> None:
    _stop()
