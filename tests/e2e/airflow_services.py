"""Airflow for real, against the fakes: `airflow api-server`, `airflow scheduler` and
`airflow dag-processor` as processes (b2b_drivers.airflow_processes, as `make airflow` starts them; by
default LocalExecutor, SQLite metadata database in a temporary AIRFLOW_HOME), the product's
connections as `AIRFLOW_CONN_*` variables (`d365_sales` in the metadata database instead), its pools
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
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from b2b_drivers.airflow_processes import (
    DAG_IDS,
    LEGAL_ENTITIES,
    STARTUP_TIMEOUT_S,
    AirflowFailed,
    AirflowProcesses,
    admin_password,
    environment,
    split_connections,
)
from d365_fakes.actors import Seller
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import Cast, airflow_connections

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".artifacts"
SERVICES = ("api-server", "scheduler", "dag-processor")  # started in this order, stopped in the reverse
FINISHED = {"success", "failed"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_artifact_gitignore() -> None:
    """`.artifacts/` ignores itself, whatever the repository's `.gitignore` says."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")


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
    # Connections kept in Airflow's metadata database (added with `airflow connections add`), where the
    # UI and the REST API can change them, instead of AIRFLOW_CONN_* variables, which they cannot.
    connections_in_database: tuple[str, ...] = ("d365_sales",)

    def processes(self) -> tuple[Process, ...]:
        return tuple(Process(name, (name,)) for name in SERVICES) + self.extra_processes


@dataclass(kw_only=True)
class AirflowServices(AirflowProcesses):
    """What a test needs of the running Airflow and fakes: its processes, CLI and REST API
    (AirflowProcesses), and runs, backfills and the world, as the tests use them."""

    endpoints: Endpoints
    cast: Cast
    state_db: Path | None  # the state store's SQLite file; None when the topology puts it elsewhere
    topology: Topology = field(default_factory=Topology)

    # --- the command line and the REST API -------------------------------------------------------

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

    def no_scheduled_run_within(self, dag_id: str, seconds: float) -> None:
        """Waits out the DAG's next scheduled run (and the runs active then) if the scheduler would make
        it within `seconds`: a run triggered next stays the DAG's latest, the one its list shows, that long."""
        run_after = self.api("GET", f"/dags/{dag_id}")["next_dagrun_run_after"]
        if run_after is None:
            return
        wait = (datetime.fromisoformat(run_after) - datetime.now(timezone.utc)).total_seconds()
        if wait < seconds:
            time.sleep(max(wait, 0) + 5)  # the scheduler makes the run shortly after its time
            self.wait_idle([dag_id])

    def watch(self, dag_ids: Iterable[str], assets: Iterable[str], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Has the (unpaused) DAGs' files parsed again and waits until each asset has a watcher: Airflow
        registers an asset's watchers, whose triggers the triggerer then runs, only when it parses the file
        of an unpaused DAG scheduled on it; `start` unpauses the DAGs after their first parse."""
        assets = set(assets)
        for dag_id in dag_ids:
            self.api("PUT", f"/parseDagFile/{self.api('GET', f'/dags/{dag_id}')['file_token']}")
        deadline = time.monotonic() + timeout
        while True:
            found = self.api("GET", "/assets", params={"limit": 100})["assets"]
            watched = {asset["name"] for asset in found if asset.get("watchers")}
            if assets <= watched:
                return
            if time.monotonic() > deadline:
                raise AirflowFailed(f"no watcher on {sorted(assets - watched)} after {timeout} s\n"
                                    f"{self.log_tails()}")  # fmt: skip
            self.check_alive()
            time.sleep(1)

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """A manual run, as the UI's Trigger button makes it; its run id."""
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def set_password(self, conn_id: str, password: str) -> None:
        """Changes a connection's password (secret) through the REST API, as an operator does in the UI."""
        self.api("PATCH", f"/connections/{conn_id}", params={"update_mask": ["password"]},
                 json={"connection_id": conn_id, "conn_type": "generic", "password": password})  # fmt: skip

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240, expected: str = "success") -> dict:
        """Waits for the run to end; fails with its task states when it did not end `expected`
        (a failed task fails the wait at once unless the run is expected to fail)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in FINISHED:
                break
            if time.monotonic() > deadline:
                raise AirflowFailed(f"{dag_id} {run_id} still {run['state']} after {timeout} s; "
                                    f"tasks: {self.task_states(dag_id, run_id)}\n{self.log_tails()}")  # fmt: skip
            if expected == "success":
                self.check([dag_id])
            else:
                self.check_alive()
            time.sleep(1)
        if run["state"] != expected:
            raise AirflowFailed(f"{dag_id} {run_id} ended {run['state']}, not {expected}; tasks: "
                                f"{self.task_states(dag_id, run_id)}")  # fmt: skip
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


def start(directory: Path, topology: Topology | None = None) -> tuple[AirflowServices, ExitStack]:
    """Fakes, then the metadata database, pools and connections, then the topology's processes; returns
    once they are ready, both DAGs are parsed, unpaused, and the runs the scheduler made at unpausing
    have ended. Closing the stack stops everything, also when starting failed half-way."""
    topology = topology or Topology()
    stack = ExitStack()
    try:
        cast = Cast.new()
        endpoints = stack.enter_context(running_fakes(directory / "fakes", cast.clients))
        home = directory / "airflow"
        (home / "services").mkdir(parents=True)
        port = free_port()
        state_db = directory / "state.db" if topology.state_connection is None else None
        connections = airflow_connections(endpoints, cast, LEGAL_ENTITIES, state_db or directory / "unused.db")
        if topology.state_connection is not None:
            connections["AIRFLOW_CONN_D365_STATE"] = topology.state_connection
        variables, in_database = split_connections(connections, topology.connections_in_database)
        env = environment(home, port, variables, topology.executor, topology.metadata_url) | dict(topology.env)
        services = AirflowServices(home, env, f"http://127.0.0.1:{port}", admin_password(home), endpoints=endpoints,
                                   cast=cast, state_db=state_db, topology=topology)  # fmt: skip
        stack.callback(_stop_all, services)
        services.set_up_database(in_database)
        for spec in topology.processes():
            services.start_process(spec.name, spec.args, spec.env)
        services.wait_until_ready({spec.name: spec.ready_marker for spec in topology.processes() if spec.ready_marker})
        for dag_id in DAG_IDS:
            services.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        # Unpausing makes each DAG's latest scheduled run (catchup=False): let them end on an empty world.
        time.sleep(3)
        services.wait_idle(timeout=STARTUP_TIMEOUT_S)
        return services, stack
    except BaseException:
        stack.close()
        raise


def _stop_all(services: AirflowServices) -> None:
    """Every process, then their output (and the task logs, if the topology says so) kept in .artifacts/."""
    services.stop_all()
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
