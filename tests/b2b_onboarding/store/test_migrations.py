"""The state store's Alembic migrations, on SQLite and PostgreSQL: stores that releases before
migrations made (their DDL frozen in `schemas/`, captured once from those releases' code) are brought
under Alembic with every row; a new database is created at head; two processes opening a behind store
migrate it once; a store newer than the code is refused without a write; the command upgrades the
store of an Airflow connection; and the migrated schema is the model's (Alembic's autogenerate finds
nothing to do)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from b2b_onboarding.errors import ConfigurationError
from b2b_onboarding.store import migrations
from b2b_onboarding.store.state import StateStore, metadata, upgrade

SCHEMAS = Path(__file__).parent / "schemas"
# The last release without migrations, and the first release (fewer tables, columns and indexes).
RELEASES = ("last_release", "first_release")
ROWS_PER_TABLE = 3
FROM_A_NEWER_RELEASE = "0099_from_a_newer_release"
BEFORE_MIGRATIONS = "upgraded from a store of a release before migrations (no version table; every row kept)"


def create_release_store(url: str, release: str) -> None:
    """A store as `release` made it: the DDL that release's code emitted on this dialect."""
    engine = sa.create_engine(url)
    ddl = (SCHEMAS / f"{release}.{engine.dialect.name}.sql").read_text()
    with engine.begin() as connection:
        for statement in ddl.split(";"):
            if statement.strip():
                connection.exec_driver_sql(statement)
    engine.dispose()


def _value(column: sa.Column, n: int) -> Any:
    kind = column.type
    if isinstance(kind, sa.Boolean):
        return n % 2 == 0
    if isinstance(kind, sa.Integer):
        return n
    if isinstance(kind, sa.DateTime):
        return datetime(2026, 1, n, 12, 30, tzinfo=UTC)
    if isinstance(kind, sa.JSON):
        return {"n": n, "name": "Zoë"}
    return f"{n}-{column.name}"[: kind.length or None]


def fill_every_table(url: str) -> None:
    """ROWS_PER_TABLE rows in every table of the store, every column set but the ids the database gives."""
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        for table in tables.sorted_tables:
            if table.name == migrations.VERSION_TABLE:
                continue
            key = list(table.primary_key.columns)
            generated = key if len(key) == 1 and isinstance(key[0].type, sa.Integer) else []
            connection.execute(table.insert(), [
                {column.name: _value(column, n) for column in table.columns if column not in generated}
                for n in range(1, ROWS_PER_TABLE + 1)])  # fmt: skip
    engine.dispose()


def contents(url: str, like: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every table's columns and rows (in key order); with `like`, only its tables and columns."""
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    found = {}
    with engine.connect() as connection:
        for name, table in tables.tables.items():
            if like is not None and name not in like:
                continue
            columns = like[name]["columns"] if like is not None else table.c.keys()
            query = sa.select(*(table.c[column] for column in columns)).order_by(*table.primary_key.columns)
            rows = [tuple(row) for row in connection.execute(query)]
            found[name] = {"columns": list(columns), "rows": rows}
    engine.dispose()
    return found


def schema(url: str) -> dict[str, dict]:
    """The tables as the database describes them: columns in order (type, nullable), primary key, indexes."""
    engine = sa.create_engine(url)
    inspector = sa.inspect(engine)
    found = {
        name: {
            "columns": [(column["name"], str(column["type"]), column["nullable"])
                        for column in inspector.get_columns(name)],
            "primary_key": inspector.get_pk_constraint(name)["constrained_columns"],
            "indexes": sorted((index["name"], tuple(index["column_names"]), bool(index["unique"]))
                              for index in inspector.get_indexes(name)),
        }
        for name in inspector.get_table_names()
    }  # fmt: skip
    engine.dispose()
    return found


def version(url: str) -> list[str]:
    return [row[0] for row in contents(url)[migrations.VERSION_TABLE]["rows"]]


def differences(url: str, model: sa.MetaData = metadata) -> list:
    """What Alembic's autogenerate would write to bring the database to `model`: nothing, as long as
    every change of the model comes with its revision."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        options = {"compare_type": True, "version_table": migrations.VERSION_TABLE,
                   "include_name": migrations.store_objects}  # fmt: skip
        context = MigrationContext.configure(connection, opts=options)
        found = compare_metadata(context, model)
    engine.dispose()
    return found


def assert_usable(url: str) -> None:
    """A write and a read through the store, of the columns the last releases added too."""
    store = StateStore(url)
    pulled = pd.DataFrame([{"legal_entity": "usrt", "prospect_id": "P-NEW", "prospect": {"CompanyName": "Contoso"},
                            "error": None, "email": "ann@contoso.example"}], dtype=object)  # fmt: skip
    assert store.record_pulled(pulled, "manual__after_upgrade")["new"] == 1
    store.update("usrt", "P-NEW", "manual__after_upgrade", lead_id="l-1", lead_state="open",
                 lead_fields={"telephone1": "1"})  # fmt: skip
    row = store.frame(keys=[("usrt", "P-NEW")]).iloc[0]
    assert (row["stage"], row["lead_fields"]) == ("lead_open", {"telephone1": "1"})
    assert list(store.history("usrt", "P-NEW")["to_stage"]) == ["pulled", "lead_open"]
    store.close()


@pytest.mark.parametrize("release", RELEASES)
def test_a_store_of_a_release_before_migrations_is_brought_to_head_with_every_row(url, release):
    create_release_store(url, release)
    fill_every_table(url)
    before = contents(url)

    done = upgrade(url)

    assert (done.before, done.after, done.unversioned_store) == (None, migrations.head(), True)
    assert str(done) == f"{BEFORE_MIGRATIONS} to revision {migrations.head()}"
    assert contents(url, like=before) == before
    assert version(url) == [migrations.head()]
    assert "alembic_version" not in schema(url)  # Airflow's version table is not the store's
    assert differences(url) == []
    assert_usable(url)


def test_the_baseline_is_exactly_the_schema_of_the_last_release(url):
    create_release_store(url, "last_release")
    last_release = schema(url)
    engine = sa.create_engine(url)
    tables = sa.MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        tables.drop_all(connection)
        command.upgrade(migrations.config(connection), migrations.BASELINE)
    engine.dispose()
    baseline = schema(url)
    assert version(url) == [migrations.BASELINE]
    del baseline[migrations.VERSION_TABLE]
    assert baseline == last_release


def test_a_new_database_is_created_at_head_and_a_second_open_changes_nothing_nor_waits_for_the_lock(url):
    first = StateStore(url)
    assert (first.migration.before, first.migration.after, first.migration.unversioned_store) == (
        None, migrations.head(), False)  # fmt: skip
    assert str(first.migration) == f"upgraded from an empty database to revision {migrations.head()}"
    assert version(url) == [migrations.head()]
    assert differences(url) == []
    created = schema(url), contents(url)

    # Another writer holds the store's lock: a store at head opens without it.
    with ThreadPoolExecutor(1) as pool, first._write():
        second = pool.submit(StateStore, url).result(timeout=30)
    assert second.migration == migrations.Migration(migrations.head(), migrations.head())
    assert str(second.migration) == f"already at revision {migrations.head()}, this code's head: nothing to do"
    assert (schema(url), contents(url)) == created
    for store in (first, second):
        store.close()


# Opens the store when told to (a line on stdin), so that two of them open it at once.
OPEN_WHEN_TOLD = """
import sys
from b2b_onboarding.store.state import upgrade
print("ready", flush=True)
sys.stdin.readline()
print(upgrade(sys.argv[1]), flush=True)
"""


def test_two_processes_opening_a_behind_store_at_once_migrate_it_once_and_both_succeed(url):
    create_release_store(url, "last_release")
    fill_every_table(url)
    before = contents(url)
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_WHEN_TOLD, url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    outcomes = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], [stderr for _, stderr in outcomes]
    said = sorted(stdout.strip() for stdout, _ in outcomes)
    assert said == [f"already at revision {migrations.head()}, this code's head: nothing to do",
                    f"{BEFORE_MIGRATIONS} to revision {migrations.head()}"]  # fmt: skip
    assert version(url) == [migrations.head()]
    assert contents(url, like=before) == before


def test_a_store_newer_than_the_code_is_refused_at_once_and_nothing_is_written(url):
    StateStore(url).close()
    fill_every_table(url)
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = :newer"),
                           {"newer": FROM_A_NEWER_RELEASE})  # fmt: skip
    engine.dispose()
    before = schema(url), contents(url)

    with pytest.raises(ConfigurationError) as refused:
        StateStore(url)

    message = str(refused.value)
    assert message.startswith(f"State store {url}: its schema is at revision {FROM_A_NEWER_RELEASE}, which this code "
                              f"does not know (it knows revisions up to {migrations.head()})")  # fmt: skip
    assert "Nothing was written. Next step: install that release (or a newer one)" in message
    assert "on every worker" in message
    assert (schema(url), contents(url)) == before


def test_a_column_added_to_the_model_without_a_revision_is_found_by_the_comparison(url):
    StateStore(url).close()
    model = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(model)
    model.tables["b2b_prospects"].append_column(sa.Column("colour", sa.String(16)))
    assert [(difference[0], difference[2], difference[3].name) for difference in differences(url, model)] == [
        ("add_column", "b2b_prospects", "colour")]  # fmt: skip


def test_a_downgrade_to_base_drops_the_store_and_the_next_open_creates_it_again(url):
    StateStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        command.downgrade(migrations.config(connection), "base")
    engine.dispose()
    assert list(schema(url)) == [migrations.VERSION_TABLE] and version(url) == []
    assert str(upgrade(url)) == f"upgraded from an empty database to revision {migrations.head()}"
    assert differences(url) == []


def store_migrate(*args: str, **connections: dict) -> subprocess.CompletedProcess:
    """`python -m b2b_onboarding.airflow.store_migrate` with Airflow connections given as environment variables."""
    env = {**os.environ, **{f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(connection)
                            for conn_id, connection in connections.items()}}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "b2b_onboarding.airflow.store_migrate", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def connection_of(url: str, **fields: Any) -> dict:
    """An Airflow connection (JSON form) of the state store at `url`, as README, Connections, describes it."""
    parsed = sa.make_url(url)
    connection = {"conn_type": "generic", "host": parsed.host, "port": parsed.port, "login": parsed.username,
                  "schema": parsed.database, "extra": {"driver": parsed.drivername}, **fields}  # fmt: skip
    return {name: value for name, value in connection.items() if value is not None}


def test_the_command_upgrades_the_store_of_an_airflow_connection_and_prints_the_revisions(url):
    create_release_store(url, "last_release")
    # PostgreSQL here trusts the login, so a password is accepted and must never be printed.
    state = connection_of(url, password="s3cret-password" if url.startswith("postgresql") else None)
    shown = sa.make_url(url).set(password=state.get("password")).render_as_string(hide_password=True)

    first = store_migrate(d365_state=state)
    assert first.returncode == 0, first.stderr
    assert f"Airflow connection 'd365_state': state store {shown}: {BEFORE_MIGRATIONS} to revision " \
           f"{migrations.head()}.\n" in first.stdout  # fmt: skip
    second = store_migrate(d365_state=state)
    assert second.returncode == 0, second.stderr
    assert second.stdout.endswith(f"Airflow connection 'd365_state': state store {shown}: already at revision "
                                  f"{migrations.head()}, this code's head: nothing to do.\n")  # fmt: skip
    assert version(url) == [migrations.head()]
    assert not any("s3cret-password" in output for output in (first.stdout, first.stderr, second.stdout, second.stderr))

    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = :newer"),
                           {"newer": FROM_A_NEWER_RELEASE})  # fmt: skip
    engine.dispose()
    refused = store_migrate("--conn-id", "other_state", other_state=state)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"Airflow connection 'other_state': State store {shown}: its schema is at "
                                     f"revision {FROM_A_NEWER_RELEASE}, which this code does not know")  # fmt: skip


def test_the_command_fails_readably_when_the_database_cannot_be_reached():
    unreachable = {"conn_type": "generic", "host": "127.0.0.1", "port": 1, "login": "b2b",
                   "password": "s3cret-password", "schema": "b2b_state", "extra": {"driver": "postgresql+psycopg2"}}
    failed = store_migrate(d365_state=unreachable)
    assert failed.returncode == 1
    first_line = failed.stderr.splitlines()[0]
    shown = "postgresql+psycopg2://b2b:***@127.0.0.1:1/b2b_state"
    assert first_line.startswith(f"Airflow connection 'd365_state': state store {shown}: the upgrade failed: ")
    assert "OperationalError" in first_line
    assert first_line.endswith("Next step: check the connection's host, port, login, password and schema (the "
                               "database), and that the database exists, then run this again.")  # fmt: skip
    assert "s3cret-password" not in failed.stdout + failed.stderr
