"""The fixtures of the distributed test (conftest.py imports them). Airflow as a production
deployment runs it, on this machine: a fresh PostgreSQL database for Airflow's metadata and one for
the product's state store (127.0.0.1:5432, user postgres), the CeleryExecutor with Redis (127.0.0.1:6379) as its broker and the metadata database as its result
backend, and api-server, scheduler, dag-processor and two Celery workers as separate processes,
against the fakes (`tests/e2e/airflow_services.py` with a CeleryExecutor `Topology`).

Skipped when PostgreSQL or Redis is not reachable, unless `CI` is set: then that is a failure.
Everything is removed afterwards, also when the test fails: the processes (their process groups),
both databases, the broker's keys (only this run's: its own key prefix in Redis DB
`B2B_E2E_REDIS_DB`, default 15), the temporary directories. The processes' output and the task
logs are kept in `.artifacts/distributed/`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))  # airflow_services lives beside the end-to-end tests

import airflow_services as af  # noqa: E402

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = int(os.environ.get("B2B_E2E_REDIS_DB", "15"))
WORKERS = ("worker-a", "worker-b")
WORKER_CONCURRENCY = 2  # task slots per worker: 4 in all, as many as each pool has


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI is set, so the distributed test may not be skipped.", pytrace=False)
    pytest.skip(f"{message}: start it to run the distributed test (with CI set this fails instead)")


def postgres_url(database: str, driver: str = "postgresql+psycopg2") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


@dataclass(frozen=True)
class Databases:
    metadata: str
    state: str


@dataclass(frozen=True)
class Broker:
    url: str
    prefix: str  # kombu's global_keyprefix: every key this run's Celery writes starts with it
    client: object  # redis.Redis on REDIS_DB

    def keys(self) -> list[str]:
        return sorted(key.decode() for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000))


@pytest.fixture(scope="module")
def databases() -> Iterator[Databases]:
    """Two new databases with random names; dropped at the end (their connections terminated first)."""
    import psycopg2
    from psycopg2 import sql

    try:
        admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as error:
        _unavailable(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} "
                     f"({str(error).strip().splitlines()[0]})")  # fmt: skip
    admin.autocommit = True
    token = secrets.token_hex(4)
    names = Databases(metadata=f"b2b_e2e_{token}_airflow", state=f"b2b_e2e_{token}_state")
    created: list[str] = []
    try:
        for name in (names.metadata, names.state):
            with admin.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            created.append(name)
        yield names
    finally:
        for name in created:
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                               "AND pid <> pg_backend_pid()", (name,))  # fmt: skip
                cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        with admin.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (created,))
            left = [row[0] for row in cursor.fetchall()]
        admin.close()
        assert not left, f"databases not dropped: {left}"


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """Redis DB `REDIS_DB` with a key prefix of this run; at the end its keys (and only those) go."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        _unavailable(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({error})")
    found = Broker(f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}", f"b2b-e2e-{secrets.token_hex(4)}:", client)
    try:
        yield found
    finally:
        keys = found.keys()
        if keys:
            client.delete(*keys)
        left = found.keys()
        client.close()
        assert not left, f"broker keys not deleted: {left}"


@dataclass
class Distributed:
    services: af.AirflowServices
    databases: Databases
    broker: Broker
    timings: dict[str, float] = field(default_factory=dict)  # phase → seconds, in order


def _worker(name: str) -> af.Process:
    """`airflow celery worker` named `name` (Celery node `celery@<name>`), whose task processes
    report `name` as their TaskInstance's hostname (worker_hostname.py)."""
    path = [str(HERE), os.environ.get("PYTHONPATH", "")]  # worker_hostname.py
    return af.Process(
        name=name,
        args=("celery", "worker", "--celery-hostname", name, "--concurrency", str(WORKER_CONCURRENCY)),
        env={
            "B2B_E2E_WORKER": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
            "PYTHONPATH": os.pathsep.join(filter(None, path)),
            # Each worker serves its logs on a port of its own (the default 8793 would be taken twice).
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(af.free_port()),
        },
        ready_marker=f"celery@{name} ready.",
    )


@pytest.fixture(scope="module")
def distributed(
    broker: Broker, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Distributed]:
    state = {"conn_type": "generic", "host": PG_HOST, "port": PG_PORT, "login": PG_USER, "schema": databases.state,
             "extra": {"driver": "postgresql+psycopg2"}}  # fmt: skip
    topology = af.Topology(
        executor="CeleryExecutor",
        metadata_url=postgres_url(databases.metadata),
        state_connection=json.dumps(state),
        env={
            "AIRFLOW__CELERY__BROKER_URL": broker.url,
            # The driver named: SQLAlchemy 2.1's default for postgresql:// is psycopg (3), not installed.
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres_url(databases.metadata),
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": broker.prefix,
            # Only the runs the test triggers: no scheduled run at unpausing or at a */15 boundary.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        },
        extra_processes=tuple(_worker(name) for name in WORKERS),
        artifacts="distributed",
        keep_task_logs=True,
    )
    started = time.monotonic()
    directory = tmp_path_factory.mktemp("distributed")
    try:
        services, stack = af.start(directory, topology)  # stops what it started when it fails
        with stack:  # stops the processes and keeps their logs in .artifacts/distributed/
            deployment = Distributed(services, databases, broker)
            deployment.timings["start: fakes, db migrate, 5 processes ready, DAGs parsed"] = time.monotonic() - started
            yield deployment
    finally:
        shutil.rmtree(directory, ignore_errors=True)
