"""The state store: one row per prospect and an append-only history of its transitions.

An audit trail and a cache, never the source of truth: every write to Commerce or Sales first
reads that system's current state. Any SQLAlchemy URL works; the default is a SQLite file. Its
schema is under Alembic (`migrations`): opening a store brings it to this code's revision.
"""

from __future__ import annotations

import json
import logging
import operator
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from typing import Any

import pandas as pd
import sqlalchemy as sa
import tenacity
from sqlalchemy import event

from b2b_onboarding.domain import rules
from b2b_onboarding.domain.rules import stage_of
from b2b_onboarding.store import migrations

log = logging.getLogger(__name__)
metadata = sa.MetaData()

KEY_COLUMNS = ("legal_entity", "prospect_id")
FACT_COLUMNS = (
    "prospect", "validation_error", "lead_fields", "lead_id", "lead_state", "opportunity_id", "opportunity_state",
    "account_id", "contact_id", "org_customer_account", "person_customer_account", "org_party_number",
    "person_party_number", "hierarchy_id", "decision", "qualified_at", "lead_outdated",
)  # fmt: skip
# Facts held as JSON; the others are short strings (ids, states, a time in ISO form).
_JSON_FACTS = ("prospect", "lead_fields")
PROSPECT_COLUMNS = (*KEY_COLUMNS, "stage", *FACT_COLUMNS, "last_error", "last_run_id", "created_at", "updated_at")
_FACT_NAMES = frozenset(FACT_COLUMNS)

prospects = sa.Table(
    "b2b_prospects",
    metadata,
    sa.Column("legal_entity", sa.String(16), primary_key=True),
    sa.Column("prospect_id", sa.String(255), primary_key=True),
    sa.Column("stage", sa.String(32), nullable=False, index=True),
    sa.Column("prospect", sa.JSON),
    sa.Column("validation_error", sa.Text),
    # The mapped lead columns as the product last wrote or found them on the lead: a correction in HQ
    # updates only columns a seller has not changed since (README, "Sellers, clerks and the cut-over").
    sa.Column("lead_fields", sa.JSON),
    *(sa.Column(name, sa.String(64)) for name in FACT_COLUMNS if name not in (*_JSON_FACTS, "validation_error")),
    # The email of a valid prospect, as prospects.email_key compares it (null otherwise): one
    # undecided prospect per legal entity may hold it.
    sa.Column("email", sa.String(320)),
    sa.Column("last_error", sa.Text),
    sa.Column("last_run_id", sa.String(250)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_b2b_prospects_lead", "lead_id"),
    sa.Index("ix_b2b_prospects_opportunity", "opportunity_id"),
    sa.Index("ix_b2b_prospects_email", "legal_entity", "email"),
)

transitions = sa.Table(
    "b2b_transitions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("legal_entity", sa.String(16), nullable=False),
    sa.Column("prospect_id", sa.String(255), nullable=False),
    sa.Column("from_stage", sa.String(32)),
    sa.Column("to_stage", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(250)),
    sa.Column("error", sa.Text),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    # What changed without a change of stage (a correction in HQ carried to the lead, an adoption).
    sa.Column("detail", sa.Text),
    # The task instance that wrote it (StateStore.writer), so a timeline links to that very log.
    sa.Column("dag_id", sa.String(250)),
    sa.Column("task_id", sa.String(250)),
    sa.Column("map_index", sa.Integer),
    sa.Index("ix_b2b_transitions_prospect", "legal_entity", "prospect_id"),
)

# Every opportunity of a tracked lead (its originating lead, or the lead's qualifying opportunity):
# a prospect's opportunity state is decided over all of them (rules.opportunity_states).
opportunities = sa.Table(
    "b2b_opportunities",
    metadata,
    sa.Column("opportunity_id", sa.String(64), primary_key=True),
    sa.Column("legal_entity", sa.String(16), nullable=False),
    sa.Column("prospect_id", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(250)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_b2b_opportunities_prospect", "legal_entity", "prospect_id"),
)
OPPORTUNITY_ROW_COLUMNS = ("opportunity_id", "legal_entity", "prospect_id", "state")

# Dataverse's delta links, and HQ's watermarks beside them (the fingerprint of a legal entity's Pending
# prospects as the sync last pulled them, under `Prospects@<legal entity>`): only the task that applied
# the changes a link or watermark covers moves it, never a trigger.
delta_links = sa.Table(
    "b2b_delta_links",
    metadata,
    sa.Column("entity_set", sa.String(64), primary_key=True),
    sa.Column("delta_link", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(250)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Who is writing a prospect right now (`StateStore.claim`): overlapping runs skip or wait for a prospect
# another live task holds, so each lead is written once. A claim ends with its task's record, or at
# `claimed_until` when its task died.
claims = sa.Table(
    "b2b_claims",
    metadata,
    sa.Column("legal_entity", sa.String(16), primary_key=True),
    sa.Column("prospect_id", sa.String(255), primary_key=True),
    sa.Column("step", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(800), nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
)

# MSAL's token cache of each app registration (authority and client), serialized and encrypted with
# Airflow's Fernet key, so that tasks and triggers share one token per client.
token_caches = sa.Table(
    "b2b_token_caches",
    metadata,
    sa.Column("name", sa.String(400), primary_key=True),
    sa.Column("cache", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

drift_findings = sa.Table(
    "b2b_drift_findings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False, index=True),
    sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("legal_entity", sa.String(16)),
    sa.Column("prospect_id", sa.String(255)),
    sa.Column("lead_id", sa.String(64)),
    sa.Column("detail", sa.Text, nullable=False),
)
DRIFT_COLUMNS = ("kind", "legal_entity", "prospect_id", "lead_id", "detail")

# Conflicts between what Sales decided and what the systems show, reported and never overwritten:
# one row per prospect and kind, seen again on later runs until a person resolves it.
anomalies = sa.Table(
    "b2b_anomalies",
    metadata,
    sa.Column("legal_entity", sa.String(16), primary_key=True),
    sa.Column("prospect_id", sa.String(255), primary_key=True),
    sa.Column("kind", sa.String(48), primary_key=True),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("first_run_id", sa.String(250)),
    sa.Column("last_run_id", sa.String(250)),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("times_seen", sa.Integer, nullable=False),
)
ANOMALY_COLUMNS = ("legal_entity", "prospect_id", "kind", "detail", "first_run_id", "last_run_id", "first_seen",
                   "last_seen", "times_seen")  # fmt: skip

# Task failures, recorded by the DAGs' on_failure_callback (notify.py): one row per failed try.
task_failures = sa.Table(
    "b2b_task_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("task_id", sa.String(250), nullable=False),
    sa.Column("map_index", sa.Integer, nullable=False),
    sa.Column("rendered_map_index", sa.String(250)),
    sa.Column("try_number", sa.Integer, nullable=False),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    # The chunk a mapped step task worked on (its op_kwargs), so the prospects it held up are known.
    sa.Column("legal_entity", sa.String(16)),
    sa.Column("first_id", sa.String(255)),
    sa.Column("last_id", sa.String(255)),
    sa.Index("ix_b2b_task_failures_run", "dag_id", "run_id"),
)
TASK_FAILURE_COLUMNS = ("dag_id", "run_id", "task_id", "map_index", "rendered_map_index", "try_number", "failed_at",
                        "error", "legal_entity", "first_id", "last_id")  # fmt: skip

# What each step task of a run did and cost (its result: counts, requests, 429s, CPU), recorded as
# the task ends, so a run's history shows its figures also when a later task failed.
step_results = sa.Table(
    "b2b_step_results",
    metadata,
    sa.Column("dag_id", sa.String(250), primary_key=True),
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("task_id", sa.String(250), primary_key=True),
    sa.Column("map_index", sa.Integer, primary_key=True),
    sa.Column("step", sa.String(64), nullable=False),
    sa.Column("legal_entity", sa.String(16), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("result", sa.Text, nullable=False),  # the task's result dict, as JSON
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)
STEP_RESULT_COLUMNS = ("dag_id", "run_id", "task_id", "map_index", "step", "legal_entity", "dry_run", "result",
                       "recorded_at")  # fmt: skip

# Dry runs (DAG param `dry_run`) never write the tables above. What a dry run would change in the
# store lives in its overlay, per run and prospect (the whole row, as JSON), so that its later steps
# plan on what the earlier ones would have recorded; the writes it would send to Commerce and Sales
# are its plan. Both are kept `DRY_RUN_RETENTION` and then purged by the next dry run.
dry_run_rows = sa.Table(
    "b2b_dry_run_rows",
    metadata,
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("legal_entity", sa.String(16), primary_key=True),
    sa.Column("prospect_id", sa.String(255), primary_key=True),
    sa.Column("row", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

planned_writes = sa.Table(
    "b2b_planned_writes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False, index=True),
    sa.Column("task", sa.String(250), nullable=False),
    sa.Column("system", sa.String(64), nullable=False),
    sa.Column("operation", sa.String(64), nullable=False),
    sa.Column("legal_entity", sa.String(16)),
    sa.Column("prospect_id", sa.String(255)),
    sa.Column("what", sa.Text, nullable=False),
    sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
)
PLAN_COLUMNS = ("system", "operation", "legal_entity", "prospect_id", "what")
DRY_RUN_RETENTION = timedelta(days=7)

# The tenant's table models (`tenant.py`) as a run read them from its metadata, per run and Airflow
# connection: read once per run, reused by every task of it (each in its own process); a dry run's
# too, as reading metadata is no write to Commerce or Sales.
tenant_models = sa.Table(
    "b2b_tenant_models",
    metadata,
    sa.Column("run_id", sa.String(250), primary_key=True),
    sa.Column("connection", sa.String(250), primary_key=True),
    sa.Column("model", sa.Text, nullable=False),  # JSON
    sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
)
TENANT_MODEL_RETENTION = timedelta(days=7)

# Keys per IN clause: far below every database's bound-parameter limit.
_KEYS_PER_QUERY = 400


def _batches(column: sa.ColumnElement, values: Iterable | None) -> list[sa.ColumnElement] | None:
    """`column IN (...)` conditions of at most _KEYS_PER_QUERY values each; None when `values` is (no selection)."""
    if values is None:
        return None
    values = list(values)
    return [column.in_(values[start : start + _KEYS_PER_QUERY]) for start in range(0, len(values), _KEYS_PER_QUERY)]


def _key_batches(table: sa.Table, keys: Iterable[tuple[str, str]] | None) -> list[sa.ColumnElement] | None:
    """Conditions selecting (legal_entity, prospect_id) keys of `table`, at most _KEYS_PER_QUERY a
    condition, as `legal_entity = ? AND prospect_id IN (...)`: every database finds those through
    the key's index, where SQLite scans the whole table for a row-value IN. None when `keys` is (no selection)."""
    if keys is None:
        return None
    ids: dict[str, list[str]] = {}
    for legal_entity, prospect_id in dict.fromkeys(keys):
        ids.setdefault(legal_entity, []).append(prospect_id)
    return [sa.and_(table.c.legal_entity == legal_entity, condition)
            for legal_entity, some in ids.items() for condition in _batches(table.c.prospect_id, some)]  # fmt: skip


def _any_of(*selections: list[sa.ColumnElement] | None) -> list[sa.ColumnElement] | None:
    """The conditions of the selections given; None (no selection: all rows) when none is."""
    given = [conditions for conditions in selections if conditions is not None]
    return None if not given else [condition for conditions in given for condition in conditions]


def _now() -> datetime:
    return datetime.now(UTC)


# The advisory lock that makes PostgreSQL writers of the store take turns (any constant will do).
_WRITE_LOCK_KEY = 0x62326270


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets mapped tasks read while one writes; the busy timeout queues writers instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=60000")
    _use_wal(cursor)
    cursor.close()
    dbapi_connection.isolation_level = None  # transactions begin in `_sqlite_begin`, not in the driver


@tenacity.retry(retry=tenacity.retry_if_exception(lambda error: isinstance(error, sqlite3.OperationalError)
                                                  and "locked" in str(error)),
                wait=tenacity.wait_random(0.05, 0.25), stop=tenacity.stop_after_delay(60), reraise=True)  # fmt: skip
def _use_wal(cursor: Any) -> None:
    """Switches a new database file to WAL (it stays so). The switch answers "database is locked" at
    once, without SQLite's busy handler, while another connection opening the same new file holds a
    lock: it is tried again until it goes through."""
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")


def _sqlite_begin(connection: sa.Connection) -> None:
    """A write transaction takes SQLite's write lock when it begins, so it reads the rows it updates
    only once no other writer can change them (a deferred BEGIN would read, then race)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get("store_write") else "BEGIN")


def upgrade(url: str) -> migrations.Migration:
    """Brings the store at `url` to this code's schema, creating it in an empty database, and says what
    it did. A store newer than this code is a ConfigurationError, and nothing is written."""
    store = StateStore(url)
    store.close()
    return store.migration


class StateStore:
    def __init__(self, url: str) -> None:
        # The prospects a targeted run (DAG param `prospect_ids`) works on; None: all of them.
        self.scope: frozenset[tuple[str, str]] | None = None
        # Who writes: the orchestrator's task instance (dag_id, task_id, map_index), kept on each transition.
        self.writer: dict[str, Any] = {}
        # psycopg2's own executemany takes a round trip a row; its execute_batch sends them a page at a time.
        psycopg2 = sa.make_url(url).get_dialect().driver == "psycopg2"
        batched = {"executemany_mode": "values_plus_batch"} if psycopg2 else {}
        self.engine = sa.create_engine(url, pool_pre_ping=True, **batched)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self.migration = self._migrate()

    def _migrate(self) -> migrations.Migration:
        """Brings the store to this code's schema (`migrations.upgrade`); a store already there is only read,
        and a newer release's fails here, before any write."""
        with self.engine.connect() as connection:
            found = migrations.revision(connection)
        if found == migrations.head():
            return migrations.Migration(found, found)
        with self._write() as connection:  # under the lock: of two workers opening a behind store, one upgrades
            return migrations.upgrade(connection)

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One transaction of one writer at a time, across tasks, runs and workers: each update reads
        the rows it changes inside the lock, so two overlapping runs never lose each other's facts."""
        with self.engine.connect().execution_options(store_write=True) as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _WRITE_LOCK_KEY})
            yield connection

    def close(self) -> None:
        self.engine.dispose()

    def scoped(self, keys: Iterable[tuple[str, str]] | None) -> StateStore:
        """Limits every step's `work` to these (legal entity, prospect id) keys; None lifts the limit."""
        self.scope = None if keys is None else frozenset(keys)
        return self

    def frame(
        self,
        legal_entity: str | None = None,
        *,
        columns: Iterable[str] = PROSPECT_COLUMNS,
        keys: Iterable[tuple[str, str]] | None = None,
        lead_ids: Iterable[str] | None = None,
        opportunity_ids: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Tracked prospects as a frame of `columns`: all, or of one legal entity, of given keys, or
        of given lead or opportunity ids. Ask for few columns where many
        rows are read: the `prospect` column is the heavy one."""
        columns = list(dict.fromkeys([*KEY_COLUMNS, *columns]))
        query = sa.select(*(prospects.c[name] for name in columns))
        if legal_entity is not None:
            query = query.where(prospects.c.legal_entity == legal_entity)
        rows = self._selected(query, _any_of(_key_batches(prospects, keys), _batches(prospects.c.lead_id, lead_ids),
                                             _batches(prospects.c.opportunity_id, opportunity_ids)))  # fmt: skip
        # dtype=object keeps None as None (pandas would turn it into NaN in string columns).
        return pd.DataFrame(rows, columns=columns, dtype=object)

    def _selected(self, query: sa.Select, conditions: list[sa.ColumnElement] | None) -> list[tuple]:
        """The rows of `query` (as tuples) meeting any of `conditions`, one statement each; all rows when
        there are no conditions (None), none when the list is empty. Where every column is a string
        (the rules' columns), the rows are the driver's own: SQLAlchemy's rows would only copy them."""
        statements = [query] if conditions is None else [query.where(condition) for condition in conditions]
        as_fetched = all(isinstance(column.type, sa.String) for column in query.selected_columns)
        rows: list[tuple] = []
        with self.engine.connect() as connection:
            for statement in statements:
                result = connection.execute(statement)
                rows.extend(result.cursor.fetchall() if as_fetched else map(tuple, result.all()))
                result.close()
        return rows

    def work(self, step: str, legal_entity: str, first_id: str | None = None, last_id: str | None = None) -> pd.DataFrame:
        """The full rows of one step's work (see `rules.STEPS`) in a chunk: the rule runs on light
        columns first, so only the rows worked on are read with their prospect."""
        light = rules.in_range(self.frame(legal_entity, columns=rules.RULE_COLUMNS), first_id, last_id)
        light = rules.only(light, self.scope)
        keys = rules.STEPS[step](light)[["legal_entity", "prospect_id"]].itertuples(index=False, name=None)
        return self.frame(keys=list(keys)).sort_values("prospect_id", ignore_index=True)

    def history(self, legal_entity: str, prospect_id: str) -> pd.DataFrame:
        query = (
            sa.select(transitions)
            .where(transitions.c.legal_entity == legal_entity, transitions.c.prospect_id == prospect_id)
            .order_by(transitions.c.id)
        )
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all())

    def record_pulled(self, pulled: pd.DataFrame, run_id: str) -> dict[str, int]:
        """Tracks newly pulled prospects (a frame of `prospects.PAGE_COLUMNS`; `email` optional);
        refreshes those without a lead yet (a fixed bad record becomes valid); takes a correction made
        in HQ to an undecided prospect that has a lead (its history names the changed fields; the sync
        then carries it to the lead), keeping the last valid record when the correction is invalid.
        Keeps the email of valid prospects only. One transaction."""
        counts = {"new": 0, "refreshed": 0, "corrected": 0, "unchanged": 0}
        rows = pulled.to_dict("records")
        now = _now()
        with self._write() as connection:
            for start in range(0, len(rows), _KEYS_PER_QUERY):
                chunk = rows[start : start + _KEYS_PER_QUERY]
                existing = self._rows(connection, [(row["legal_entity"], row["prospect_id"]) for row in chunk],
                                      with_prospect=True)
                inserts, history, updates, details = [], [], [], {}
                for row in chunk:
                    facts = {"prospect": row["prospect"], "validation_error": row["error"]}
                    email = row.get("email") if row["error"] is None else None
                    key = (row["legal_entity"], row["prospect_id"])
                    known = existing.get(key)
                    if known is None:
                        stage = stage_of(facts)
                        inserts.append({
                            "legal_entity": key[0], "prospect_id": key[1], "stage": stage, "last_run_id": run_id,
                            "last_error": row["error"], "created_at": now, "updated_at": now, **facts,
                            **{name: None for name in FACT_COLUMNS[2:]}, "email": email,
                        })  # fmt: skip
                        history.append(_transition(key, None, stage, run_id, row["error"], now))
                        existing[key] = inserts[-1]  # a page repeating a key counts once
                        counts["new"] += 1
                    elif known["lead_id"] is None and (
                        known["email"] != email or any(known[name] != value for name, value in facts.items())
                    ):
                        updates.append((key, {**facts, "email": email}, None))
                        counts["refreshed"] += 1
                    elif known["decision"] is None and (correction := _correction(known, row, email)) is not None:
                        updates.append((key, correction[0], None))
                        details[key] = correction[1]
                        counts["corrected"] += 1
                    else:
                        counts["unchanged"] += 1
                if inserts:
                    self._insert_rows(connection, inserts, history)
                self._apply(connection, existing, updates, run_id, now, details)
        return counts

    def emails_in_use(self, legal_entity: str, emails: Iterable[str]) -> dict[str, str]:
        """Which of `emails` (as `prospects.email_key` gives them) valid prospects of the legal entity
        hold while undecided, or for good once their Person customer exists (HQ keeps a person's
        email unique per legal entity): email → prospect id (the lowest, should two hold one)."""
        held: dict[str, str] = {}
        for email, prospect_id in self._email_holders(legal_entity, sorted(set(emails))):
            if email not in held or prospect_id < held[email]:
                held[email] = prospect_id
        return held

    def _email_holders(self, legal_entity: str, emails: list[str]) -> Iterator[tuple[str, str]]:
        with self.engine.connect() as connection:
            for start in range(0, len(emails), _KEYS_PER_QUERY):
                query = sa.select(prospects.c.email, prospects.c.prospect_id).where(
                    prospects.c.legal_entity == legal_entity,
                    sa.or_(prospects.c.decision.is_(None), prospects.c.person_customer_account.is_not(None)),
                    prospects.c.email.in_(emails[start : start + _KEYS_PER_QUERY]),
                )
                yield from ((email, prospect_id) for email, prospect_id in connection.execute(query))

    def update(
        self, legal_entity: str, prospect_id: str, run_id: str, *, error: str | None = None, **facts: Any
    ) -> None:
        """Records new facts (and clears the last error), or records an error for this prospect."""
        self.update_many([((legal_entity, prospect_id), facts, error)], run_id)

    def update_many(self, updates: Iterable[tuple[tuple[str, str], Mapping[str, Any], str | None]], run_id: str,
                    release: tuple[str, str] | None = None) -> int:  # fmt: skip
        """Applies (key, facts, error) updates in one transaction; returns how many rows changed. With
        `release` (step, claimant), that claimant's claims of the step end in the same transaction:
        the outcomes they guarded are recorded."""
        updates = list(updates)
        for key, facts, _ in updates:
            unknown = facts.keys() - _FACT_NAMES
            if unknown:
                raise ValueError(f"not facts of a prospect: {sorted(unknown)}")
        changed = 0
        now = _now()
        with self._write() as connection:
            for start in range(0, len(updates), _KEYS_PER_QUERY):
                chunk = updates[start : start + _KEYS_PER_QUERY]
                with_prospect = any("prospect" in facts for _, facts, _ in chunk)
                known = self._rows(connection, [key for key, _, _ in chunk], with_prospect=with_prospect)
                for key, _, _ in chunk:
                    if key not in known:
                        raise KeyError(f"prospect {key[0]}/{key[1]} is not tracked")
                changed += self._apply(connection, known, chunk, run_id, now)
            if release is not None:
                self._release(connection, *release)
        return changed

    def apply_changes(self, changes: pd.DataFrame, run_id: str) -> int:
        """Applies a frame of (legal_entity, prospect_id, fact columns...) from the rules."""
        fact_names = [name for name in changes.columns if name in _FACT_NAMES]
        facts = changes[fact_names]
        updates = [
            (key, {name: value for name, value, given in zip(fact_names, values, present) if given}, None)
            for key, values, present in zip(zip(changes["legal_entity"], changes["prospect_id"]),
                                            facts.to_numpy(dtype=object).tolist(), facts.notna().to_numpy().tolist())
        ]  # fmt: skip
        self.update_many(updates, run_id)
        return len(changes)

    def note(self, notes: Iterable[tuple[tuple[str, str], str]], run_id: str) -> None:
        """Adds (key, detail) lines to prospects' histories without changing their facts."""
        rows, now = [], _now()
        with self._write() as connection:
            known = self._rows(connection, [key for key, _ in notes], with_prospect=False)
            for key, detail in notes:
                stage = known[key]["stage"]
                rows.append(_transition(key, stage, stage, run_id, None, now, detail))
            self._insert_history(connection, rows)

    def tracked_opportunities(
        self, keys: Iterable[tuple[str, str]] | None = None, opportunity_ids: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """The opportunities of tracked leads (OPPORTUNITY_ROW_COLUMNS): of some prospects, some ids, or all."""
        query = sa.select(*(opportunities.c[name] for name in OPPORTUNITY_ROW_COLUMNS))
        rows = self._selected(query, _any_of(_key_batches(opportunities, keys),
                                             _batches(opportunities.c.opportunity_id, opportunity_ids)))  # fmt: skip
        return pd.DataFrame(rows, columns=list(OPPORTUNITY_ROW_COLUMNS), dtype=object).drop_duplicates("opportunity_id")

    def record_opportunities(self, seen: pd.DataFrame, run_id: str, gone: Iterable[str] = ()) -> None:
        """Keeps the opportunities seen (OPPORTUNITY_ROW_COLUMNS) and forgets those `gone` (deleted)."""
        now, gone = _now(), list(gone)
        with self._write() as connection:
            ids = list(seen["opportunity_id"]) + gone
            for start in range(0, len(ids), _KEYS_PER_QUERY):
                connection.execute(opportunities.delete().where(
                    opportunities.c.opportunity_id.in_(ids[start : start + _KEYS_PER_QUERY])))  # fmt: skip
            rows = [{**{name: row[name] for name in OPPORTUNITY_ROW_COLUMNS}, "run_id": run_id, "updated_at": now}
                    for row in seen.to_dict("records")]  # fmt: skip
            _executemany(connection, _insert_statement(opportunities), rows)

    def track_decided(self, decided: pd.DataFrame, run_id: str) -> int:
        """Tracks prospects that HQ shows decided and the store never saw (a cut-over from dual-write,
        or a decision made by hand in HQ): legal_entity, prospect_id, decision, lead_id. They are
        recorded as decided, so nothing is ever written for them. Returns how many were new."""
        rows = decided.to_dict("records")
        now, new = _now(), 0
        with self._write() as connection:
            for start in range(0, len(rows), _KEYS_PER_QUERY):
                chunk = rows[start : start + _KEYS_PER_QUERY]
                existing = self._rows(connection, [(row["legal_entity"], row["prospect_id"]) for row in chunk],
                                      with_prospect=False)
                inserts, history = [], []
                for row in chunk:
                    key = (row["legal_entity"], row["prospect_id"])
                    if key in existing:
                        continue
                    facts = {name: None for name in FACT_COLUMNS} | {"decision": row["decision"], "lead_id": row["lead_id"]}
                    stage = stage_of(facts)
                    inserts.append({"legal_entity": key[0], "prospect_id": key[1], "stage": stage, **facts,
                                    "email": None, "last_error": None, "last_run_id": run_id, "created_at": now,
                                    "updated_at": now})  # fmt: skip
                    history.append(_transition(key, None, stage, run_id, None, now,
                                               "found decided in Commerce; recorded as decided, nothing written"))  # fmt: skip
                    existing[key] = inserts[-1]
                if inserts:
                    self._insert_rows(connection, inserts, history)
                    new += len(inserts)
        return new

    def delta_link(self, entity_set: str) -> str | None:
        with self.engine.connect() as connection:
            query = sa.select(delta_links.c.delta_link).where(delta_links.c.entity_set == entity_set)
            return connection.execute(query).scalar_one_or_none()

    def set_delta_link(self, entity_set: str, delta_link: str | None, run_id: str) -> None:
        """Kept only after every change it covers is recorded: a crash re-reads, never skips."""
        with self._write() as connection:
            connection.execute(delta_links.delete().where(delta_links.c.entity_set == entity_set))
            if delta_link:
                connection.execute(delta_links.insert().values(
                    entity_set=entity_set, delta_link=delta_link, run_id=run_id, updated_at=_now()
                ))  # fmt: skip

    def token_cache(self, name: str) -> tuple[str, datetime] | None:
        """A token cache as `save_token_cache` kept it (encrypted by its caller), and when it was saved."""
        with self.engine.connect() as connection:
            query = sa.select(token_caches.c.cache, token_caches.c.updated_at).where(token_caches.c.name == name)
            row = connection.execute(query).first()
        return None if row is None else (row.cache, row.updated_at)

    def save_token_cache(self, name: str, cache: str) -> None:
        """Replaces the token cache `name` (already encrypted: the store never sees a token in clear)."""
        with self._write() as connection:
            connection.execute(token_caches.delete().where(token_caches.c.name == name))
            connection.execute(token_caches.insert().values(name=name, cache=cache, updated_at=_now()))

    def record_drift(self, findings: pd.DataFrame, run_id: str) -> None:
        """Replaces this run's drift findings (a rerun of the check does not double them)."""
        now = _now()
        rows = [{"run_id": run_id, "checked_at": now, **{name: row.get(name) for name in DRIFT_COLUMNS}}
                for row in findings.to_dict("records")]  # fmt: skip
        with self._write() as connection:
            connection.execute(drift_findings.delete().where(drift_findings.c.run_id == run_id))
            if rows:
                connection.execute(drift_findings.insert(), rows)

    def drift(self, run_id: str) -> pd.DataFrame:
        query = sa.select(*(drift_findings.c[name] for name in DRIFT_COLUMNS)).where(drift_findings.c.run_id == run_id)
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all(), columns=list(DRIFT_COLUMNS), dtype=object)

    def record_anomalies(self, found: Iterable[tuple[tuple[str, str], str, str]], run_id: str) -> int:
        """Records (key, kind, detail) anomalies, each also logged; one seen before gets its new
        detail, run and time, and counts once more. Returns how many were new."""
        found = list(found)
        now = _now()
        new = 0
        with self._write() as connection:
            for (legal_entity, prospect_id), kind, detail in found:
                log.warning("anomaly %s on prospect %s/%s: %s", kind, legal_entity, prospect_id, detail)
                where = (anomalies.c.legal_entity == legal_entity, anomalies.c.prospect_id == prospect_id,
                         anomalies.c.kind == kind)  # fmt: skip
                seen = connection.execute(anomalies.update().where(*where).values(
                    detail=detail, last_run_id=run_id, last_seen=now, times_seen=anomalies.c.times_seen + 1,
                )).rowcount  # fmt: skip
                if not seen:
                    connection.execute(anomalies.insert().values(
                        legal_entity=legal_entity, prospect_id=prospect_id, kind=kind, detail=detail,
                        first_run_id=run_id, last_run_id=run_id, first_seen=now, last_seen=now, times_seen=1,
                    ))  # fmt: skip
                    new += 1
        return new

    def anomalies(self) -> pd.DataFrame:
        query = sa.select(*(anomalies.c[name] for name in ANOMALY_COLUMNS)).order_by(
            anomalies.c.legal_entity, anomalies.c.prospect_id, anomalies.c.kind)  # fmt: skip
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all(), columns=list(ANOMALY_COLUMNS), dtype=object)

    # --- claims: which task is writing a prospect right now (`claims`) --------------------------------

    def claimant(self, run_id: str) -> str:
        """Who claims prospects through this store in run `run_id`: the task instance (its DAG, run, task
        and map index, from `writer`), so that a retry of a task is the same claimant and takes its
        claims back at once; outside Airflow (no writer), the run."""
        if not self.writer:
            return run_id
        return f"{self.writer['dag_id']}/{run_id}/{self.writer['task_id']}/{self.writer['map_index']}"

    def claim(
        self, step: str, keys: Iterable[tuple[str, str]], claimant: str, lease: timedelta
    ) -> set[tuple[str, str]]:
        """Claims prospects for one step until `lease` from now, and returns those the claimant now
        holds: the unclaimed ones, those whose claim ran out (its task died), and its own (renewed).
        A prospect another claimant holds stays with it. Under the store's write lock, so that two
        claimants never hold one prospect at once; claims that ran out (of any step) go on the way."""
        keys = list(dict.fromkeys(keys))
        now = _now()
        until = now + lease
        held: set[tuple[str, str]] = set()
        with self._write() as connection:
            connection.execute(claims.delete().where(claims.c.claimed_until <= now))
            for start in range(0, len(keys), _KEYS_PER_QUERY):
                chunk = keys[start : start + _KEYS_PER_QUERY]
                others = sa.select(claims.c.legal_entity, claims.c.prospect_id).where(
                    claims.c.step == step, claims.c.owner != claimant,
                    sa.or_(*_key_batches(claims, chunk)))  # fmt: skip
                taken = {tuple(row) for row in connection.execute(others)}
                mine = [pair for pair in chunk if pair not in taken]
                if mine:
                    connection.execute(claims.delete().where(claims.c.step == step,
                                                             sa.or_(*_key_batches(claims, mine))))  # fmt: skip
                    _executemany(connection, _insert_statement(claims), [
                        {"legal_entity": legal_entity, "prospect_id": prospect_id, "step": step, "owner": claimant,
                         "claimed_at": now, "claimed_until": until}
                        for legal_entity, prospect_id in mine])  # fmt: skip
                held.update(mine)
        return held

    def release(self, step: str, claimant: str, keys: Iterable[tuple[str, str]] | None = None) -> None:
        """Ends the claimant's claims of one step: on these prospects, or all of them."""
        with self._write() as connection:
            self._release(connection, step, claimant, keys)

    def _release(
        self, connection: sa.Connection, step: str, claimant: str, keys: Iterable[tuple[str, str]] | None = None
    ) -> None:
        mine = (claims.c.step == step, claims.c.owner == claimant)
        if keys is None:
            connection.execute(claims.delete().where(*mine))
            return
        for condition in _key_batches(claims, keys):
            connection.execute(claims.delete().where(*mine, condition))

    def claimed(self, step: str, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, datetime]]:
        """The live claims of one step on these prospects: key → (claimant, claimed until, in UTC)."""
        query = sa.select(claims.c.legal_entity, claims.c.prospect_id, claims.c.owner, claims.c.claimed_until).where(
            claims.c.step == step, claims.c.claimed_until > _now())  # fmt: skip
        live = {}
        for legal_entity, prospect_id, owner, until in self._selected(query, _key_batches(claims, keys)):
            # SQLite hands back naive times (stored in UTC), PostgreSQL aware ones.
            live[(legal_entity, prospect_id)] = owner, until.replace(tzinfo=until.tzinfo or UTC)
        return live

    def _rows(
        self, connection: sa.Connection, keys: Iterable[tuple[str, str]], *, with_prospect: bool
    ) -> dict[tuple[str, str], dict]:
        """The rows of these keys as dicts; without the heavy `prospect` unless asked for it."""
        columns = [column for column in prospects.c if with_prospect or column.name != "prospect"]
        names = [column.name for column in columns]
        found: dict[tuple[str, str], dict] = {}
        for condition in _key_batches(prospects, keys):
            for row in connection.execute(sa.select(*columns).where(condition)):
                found[(row[0], row[1])] = dict(zip(names, row))
        return found

    def _apply(
        self,
        connection: sa.Connection,
        known: Mapping[tuple[str, str], dict],
        updates: Iterable[tuple[tuple[str, str], Mapping[str, Any], str | None]],
        run_id: str,
        now: datetime,
        details: Mapping[tuple[str, str], str] | None = None,
    ) -> int:
        """Writes the updates that change something, and a transition where the stage changed, a new
        error appeared or `details` says what changed (the history stays free of repeats)."""
        # The last row of each key changed, and the columns its updates changed.
        written: dict[tuple[str, str], tuple[dict, frozenset[str]]] = {}
        history, changed = [], 0
        for key, facts, error in updates:
            before = known[key]
            if before["decision"] is not None and facts.get("decision", before["decision"]) != before["decision"]:
                raise ValueError(f"prospect {key[0]}/{key[1]} was decided {before['decision']}; a decision never "
                                 f"changes (refused: {facts['decision']})")  # fmt: skip
            merged = {**before, **facts}
            stage = stage_of(merged)
            error = error or merged.get("validation_error")
            changed_facts = [name for name, value in facts.items() if before[name] != value]
            if stage == before["stage"] and error == before["last_error"] and not changed_facts:
                continue
            after = {**merged, "stage": stage, "last_error": error, "last_run_id": run_id, "updated_at": now}
            known[key] = after  # type: ignore[index]  # a second update of the key in this batch builds on this one
            columns = written[key][1] if key in written else _MAINTAINED_COLUMNS
            written[key] = after, columns.union(changed_facts)
            changed += 1
            detail = (details or {}).get(key)
            if stage != before["stage"] or (error and error != before["last_error"]) or detail:
                history.append(_transition(key, before["stage"], stage, run_id, error, now, detail))
        self._update_rows(connection, list(written.values()), history)
        return changed

    # The two ways prospect rows change; a dry run's store sends both to its overlay instead.
    def _insert_rows(self, connection: sa.Connection, rows: list[dict], history: list[dict]) -> None:
        _executemany(connection, _insert_statement(prospects), rows)
        self._insert_history(connection, history)

    def _insert_history(self, connection: sa.Connection, history: list[dict]) -> None:
        writer = {"dag_id": None, "task_id": None, "map_index": None, **self.writer}
        _executemany(connection, _insert_statement(transitions), [{**row, **writer} for row in history])

    def _update_rows(
        self, connection: sa.Connection, rows: list[tuple[dict, frozenset[str]]], history: list[dict]
    ) -> None:
        """Writes rows (whole, as `_apply` merged them) in the columns each names, one statement per
        set of columns, and their transitions."""
        groups: dict[frozenset[str], list[dict]] = {}
        for row, columns in rows:
            groups.setdefault(columns, []).append(row)
        for columns, group in groups.items():
            ordered = tuple(name for name in _WRITTEN_COLUMNS if name in columns)
            _executemany(connection, _update_statement(ordered), group)
        self._insert_history(connection, history)

    # --- resolving anomalies, task failures, dry runs' plans ------------------------------------------

    def resolve_anomalies(self, keys: Iterable[tuple[str, str]], kind: str | None = None) -> int:
        """Closes the anomalies of these prospects (of one kind, or all): once a person has settled
        them, the nightly `check_sla` stops failing on them. Returns how many were closed."""
        closed = 0
        with self._write() as connection:
            for condition in _key_batches(anomalies, keys):
                where = [condition] if kind is None else [condition, anomalies.c.kind == kind]
                closed += connection.execute(anomalies.delete().where(*where)).rowcount
        return closed

    def record_task_failure(
        self, *, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int, error: str,
        rendered_map_index: str | None = None, failed_at: datetime | None = None, legal_entity: str | None = None,
        first_id: str | None = None, last_id: str | None = None,
    ) -> None:  # fmt: skip
        """One failed try of a task; recording the same try again (a callback run twice) replaces it."""
        row = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index,
               "rendered_map_index": rendered_map_index, "try_number": try_number,
               "failed_at": failed_at or _now(), "error": error, "legal_entity": legal_entity, "first_id": first_id,
               "last_id": last_id}  # fmt: skip
        with self._write() as connection:
            same_try = (task_failures.c[name] == row[name] for name in ("dag_id", "run_id", "task_id", "map_index",
                                                                            "try_number"))  # fmt: skip
            connection.execute(task_failures.delete().where(*same_try))
            connection.execute(task_failures.insert().values(**row))

    def task_failures(self, dag_id: str | None = None, run_id: str | None = None) -> pd.DataFrame:
        """Recorded task failures, newest first, of one DAG and run or all."""
        query = sa.select(*(task_failures.c[name] for name in TASK_FAILURE_COLUMNS)).order_by(task_failures.c.id.desc())
        if dag_id is not None:
            query = query.where(task_failures.c.dag_id == dag_id)
        if run_id is not None:
            query = query.where(task_failures.c.run_id == run_id)
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all(), columns=list(TASK_FAILURE_COLUMNS), dtype=object)

    def record_step_result(self, *, dag_id: str, run_id: str, task_id: str, map_index: int, result: Mapping[str, Any],
                           dry_run: bool) -> None:  # fmt: skip
        """What one step task did (its result dict); a retry that succeeds replaces its earlier try's."""
        row = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index,
               "step": str(result.get("step", task_id)), "legal_entity": str(result.get("legal_entity", "*")),
               "dry_run": dry_run, "result": json.dumps(dict(result), default=str), "recorded_at": _now()}  # fmt: skip
        with self._write() as connection:
            same = (step_results.c[name] == row[name] for name in ("dag_id", "run_id", "task_id", "map_index"))
            connection.execute(step_results.delete().where(*same))
            connection.execute(step_results.insert().values(**row))

    def step_results(self, dag_id: str | None = None, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Recorded step results (STEP_RESULT_COLUMNS, `result` as a dict), of one DAG and some runs or all."""
        query = sa.select(*(step_results.c[name] for name in STEP_RESULT_COLUMNS)).order_by(step_results.c.recorded_at)
        if dag_id is not None:
            query = query.where(step_results.c.dag_id == dag_id)
        if run_ids is not None:
            query = query.where(step_results.c.run_id.in_(list(run_ids)))
        with self.engine.connect() as connection:
            rows = [dict(row) for row in connection.execute(query).mappings()]
        for row in rows:
            row["result"] = json.loads(row["result"])
        return pd.DataFrame(rows, columns=list(STEP_RESULT_COLUMNS), dtype=object)

    def record_tenant_model(self, run_id: str, conn_id: str, model: Any) -> None:
        """The model (JSON-able) a run read through an Airflow connection; models older than
        TENANT_MODEL_RETENTION go (their runs are over)."""
        row = {"run_id": run_id, "connection": conn_id, "model": json.dumps(model), "read_at": _now()}
        this_one = (tenant_models.c.run_id == run_id) & (tenant_models.c.connection == conn_id)
        with self._write() as connection:
            connection.execute(tenant_models.delete().where(
                this_one | (tenant_models.c.read_at < row["read_at"] - TENANT_MODEL_RETENTION)))  # fmt: skip
            connection.execute(tenant_models.insert().values(**row))

    def tenant_model(self, run_id: str, conn_id: str) -> Any | None:
        """The model a run read through an Airflow connection (`record_tenant_model`); None before it did."""
        query = sa.select(tenant_models.c.model).where(tenant_models.c.run_id == run_id,
                                                       tenant_models.c.connection == conn_id)  # fmt: skip
        with self.engine.connect() as connection:
            found = connection.execute(query).scalar()
        return None if found is None else json.loads(found)

    def planned_writes(self, run_id: str) -> pd.DataFrame:
        """What a dry run would have written to Commerce and Sales: PLAN_COLUMNS plus the task that planned it."""
        columns = ("task", *PLAN_COLUMNS)
        query = sa.select(*(planned_writes.c[name] for name in columns)).where(
            planned_writes.c.run_id == run_id).order_by(planned_writes.c.id)  # fmt: skip
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all(), columns=list(columns), dtype=object)

    def purge_dry_runs(self, older_than: timedelta = DRY_RUN_RETENTION) -> None:
        """Drops the overlays and plans of dry runs last touched longer ago than `older_than`."""
        cutoff = _now() - older_than
        with self._write() as connection:
            connection.execute(dry_run_rows.delete().where(dry_run_rows.c.updated_at < cutoff))
            connection.execute(planned_writes.delete().where(planned_writes.c.planned_at < cutoff))


_WRITTEN_COLUMNS = ("stage", *FACT_COLUMNS, "email", "last_error", "last_run_id", "updated_at")
# What every update writes beside the facts it changes.
_MAINTAINED_COLUMNS = frozenset(("stage", "last_error", "last_run_id", "updated_at"))


@cache
def _update_statement(columns: tuple[str, ...]) -> sa.Update:
    """The update of one prospect row's `columns`, its key and values bound per row by column name."""
    return (
        prospects.update()
        .where(prospects.c.legal_entity == sa.bindparam("legal_entity"),
               prospects.c.prospect_id == sa.bindparam("prospect_id"))
        .values({name: sa.bindparam(name) for name in columns})
    )  # fmt: skip


@cache
def _insert_statement(table: sa.Table) -> sa.Insert:
    """The insert of a row of `table` (all columns but an autoincremented id), bound by column name."""
    return table.insert().values({column.name: sa.bindparam(column.name) for column in table.c
                                  if not (column.primary_key and column.autoincrement is True)})  # fmt: skip


@lru_cache(maxsize=64)
def _driver_form(statement: sa.Insert | sa.Update, dialect: sa.Dialect) -> tuple[str, Callable[[Mapping], Any]]:
    """`statement` as the dialect's SQL, and what turns a row (a mapping of its bound names) into the
    driver's parameters: a tuple for a positional paramstyle (SQLite's), else a dict (psycopg2's), its
    values converted by the columns' own bind processors, as SQLAlchemy would store them."""
    compiled = statement.compile(dialect=dialect)
    names = list(compiled.positiontup if compiled.positional else compiled.binds)
    processors = []
    for index, name in enumerate(names):
        kind = compiled.binds[name].type
        if process := kind.dialect_impl(dialect).bind_processor(dialect):
            processors.append((index, _remembering_last(process) if isinstance(kind, sa.DateTime) else process))
    values_of = operator.itemgetter(*names)

    def parameters(row: Mapping) -> Any:
        values = list(values_of(row))
        for index, process in processors:
            values[index] = process(values[index])
        return tuple(values) if compiled.positional else dict(zip(names, values))

    return compiled.string, parameters


def _remembering_last(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`process`, converting its last value once: the rows of a batch mostly carry one time, its `now`."""
    last: list[tuple[Any, Any]] = [(object(), None)]

    def remembered(value: Any) -> Any:
        seen, result = last[0]  # one read: threads sharing the statement each see a consistent pair
        if seen is not value:
            result = process(value)
            last[0] = value, result
        return result

    return remembered


def _executemany(connection: sa.Connection, statement: sa.Insert | sa.Update, rows: list[Mapping]) -> None:
    """Runs `statement` once for each row, straight through the driver's executemany: SQLAlchemy's
    preparation of each row's parameters cost more than the database's work. Inserts the dialect
    sends as multi-row VALUES (PostgreSQL's) stay with SQLAlchemy: they beat any executemany."""
    if not rows:
        return
    if statement.is_insert and connection.dialect.use_insertmanyvalues_wo_returning:
        connection.execute(statement, rows)
        return
    sql, parameters = _driver_form(statement, connection.dialect)
    connection.exec_driver_sql(sql, [parameters(row) for row in rows])


def _transition(
    key: tuple[str, str], from_stage, to_stage, run_id: str, error: str | None, at: datetime, detail: str | None = None
) -> dict:
    return {"legal_entity": key[0], "prospect_id": key[1], "from_stage": from_stage, "to_stage": to_stage,
            "run_id": run_id, "error": error, "at": at, "detail": detail}  # fmt: skip


def _correction(known: Mapping[str, Any], pulled: Mapping[str, Any], email: str | None) -> tuple[dict, str] | None:
    """(facts, what changed) when HQ shows a tracked prospect with a lead otherwise than the store
    has it; None when nothing changed. An invalid correction keeps the last valid record and names
    the error (the lead is not touched until HQ has it right)."""
    if pulled["error"] is not None:
        if pulled["error"] == known["validation_error"]:
            return None
        return {"validation_error": pulled["error"]}, "corrected in Commerce, but invalid: the lead keeps the last valid values"
    before, after = known["prospect"] or {}, pulled["prospect"]
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    if not changed and known["validation_error"] is None:
        return None
    facts = {"prospect": after, "validation_error": None, "email": email, "lead_outdated": "yes" if changed else None}
    return facts, "corrected in Commerce: " + (", ".join(changed) or "valid again")


_DATETIME_COLUMNS = ("created_at", "updated_at")


def _to_json(row: Mapping[str, Any]) -> str:
    return json.dumps(dict(row), default=lambda value: value.isoformat() if isinstance(value, datetime) else str(value))


def _from_json(text: str) -> dict:
    row = json.loads(text)
    for name in _DATETIME_COLUMNS:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    return row


class DryRunStore(StateStore):
    """The state store as a dry run (DAG param `dry_run`) sees it.

    Reads show the store with what this run's earlier steps would have recorded on top (its overlay,
    `b2b_dry_run_rows`); every change of a prospect goes to that overlay, never to `b2b_prospects` or
    `b2b_transitions`. Delta links are not advanced, and drift findings and anomalies are logged, not
    kept. The writes the run would send to Commerce and Sales are its plan (`b2b_planned_writes`).
    """

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(url)
        self.run_id = run_id

    def _overlay(
        self, connection: sa.Connection | None = None, *, legal_entity: str | None = None,
        keys: Iterable[tuple[str, str]] | None = None,
    ) -> dict[tuple[str, str], dict]:  # fmt: skip
        """This run's planned rows: all, of one legal entity, or of some keys."""
        query = sa.select(dry_run_rows.c.legal_entity, dry_run_rows.c.prospect_id, dry_run_rows.c.row).where(
            dry_run_rows.c.run_id == self.run_id)  # fmt: skip
        if legal_entity is not None:
            query = query.where(dry_run_rows.c.legal_entity == legal_entity)
        conditions = _key_batches(dry_run_rows, keys)
        found: dict[tuple[str, str], dict] = {}

        def read(into: sa.Connection) -> None:
            for chosen in [query] if conditions is None else [query.where(condition) for condition in conditions]:
                for legal_entity_, prospect_id, row in into.execute(chosen):
                    found[(legal_entity_, prospect_id)] = _from_json(row)

        if connection is not None:
            read(connection)
        else:
            with self.engine.connect() as own:
                read(own)
        return found

    def _put_overlay(self, connection: sa.Connection, rows: list[dict]) -> None:
        if not rows:
            return
        for condition in _key_batches(dry_run_rows, [(row["legal_entity"], row["prospect_id"]) for row in rows]):
            connection.execute(dry_run_rows.delete().where(dry_run_rows.c.run_id == self.run_id, condition))
        now = _now()
        _executemany(connection, _insert_statement(dry_run_rows), [
            {"run_id": self.run_id, "legal_entity": row["legal_entity"], "prospect_id": row["prospect_id"],
             "row": _to_json(row), "updated_at": now} for row in rows])  # fmt: skip

    # Writes of prospects: to the overlay.
    def _rows(
        self, connection: sa.Connection, keys: Iterable[tuple[str, str]], *, with_prospect: bool
    ) -> dict[tuple[str, str], dict]:
        """Whole rows, `prospect` always: the overlay keeps whole rows."""
        keys = list(keys)
        return {**super()._rows(connection, keys, with_prospect=True), **self._overlay(connection, keys=keys)}

    def _insert_rows(self, connection: sa.Connection, rows: list[dict], history: list[dict]) -> None:
        self._put_overlay(connection, rows)

    def _update_rows(
        self, connection: sa.Connection, rows: list[tuple[dict, frozenset[str]]], history: list[dict]
    ) -> None:
        self._put_overlay(connection, [row for row, _ in rows])

    # Reads of prospects: the store, with the overlay on top.
    def frame(
        self,
        legal_entity: str | None = None,
        *,
        columns: Iterable[str] = PROSPECT_COLUMNS,
        keys: Iterable[tuple[str, str]] | None = None,
        lead_ids: Iterable[str] | None = None,
        opportunity_ids: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        columns = list(dict.fromkeys([*KEY_COLUMNS, *columns]))
        keys, lead_ids, opportunity_ids = (None if values is None else list(values)
                                           for values in (keys, lead_ids, opportunity_ids))  # fmt: skip
        real = super().frame(legal_entity, columns=columns, keys=keys, lead_ids=lead_ids, opportunity_ids=opportunity_ids)
        overlay = self._overlay(legal_entity=legal_entity)
        if not overlay:
            return real
        selections = [(None, keys), ("lead_id", lead_ids), ("opportunity_id", opportunity_ids)]
        chosen = [(column, set(values)) for column, values in selections if values is not None]

        def selected(key: tuple[str, str], row: dict) -> bool:
            return not chosen or any((key if column is None else row.get(column)) in values for column, values in chosen)

        kept = real[[key not in overlay for key in zip(real["legal_entity"], real["prospect_id"])]]
        planned = pd.DataFrame([{name: row.get(name) for name in columns} for key, row in overlay.items()
                                if selected(key, row)], columns=columns, dtype=object)  # fmt: skip
        return pd.concat([frame for frame in (kept, planned) if len(frame)] or [real.iloc[0:0]], ignore_index=True)

    def _email_holders(self, legal_entity: str, emails: list[str]) -> Iterator[tuple[str, str]]:
        overlay = self._overlay(legal_entity=legal_entity)
        wanted = set(emails)
        yield from ((email, prospect_id) for email, prospect_id in super()._email_holders(legal_entity, emails)
                    if (legal_entity, prospect_id) not in overlay)  # fmt: skip
        for (_, prospect_id), row in overlay.items():
            if row.get("email") in wanted and (row["decision"] is None or row["person_customer_account"] is not None):
                yield row["email"], prospect_id

    # What a dry run never keeps.
    def _insert_history(self, connection: sa.Connection, history: list[dict]) -> None:
        pass

    def claim(
        self, step: str, keys: Iterable[tuple[str, str]], claimant: str, lease: timedelta
    ) -> set[tuple[str, str]]:
        """Every prospect, claimed by nobody: a dry run writes nothing to guard (its plan is its own)."""
        return set(keys)

    def _release(
        self, connection: sa.Connection, step: str, claimant: str, keys: Iterable[tuple[str, str]] | None = None
    ) -> None:
        pass

    def record_opportunities(self, seen: pd.DataFrame, run_id: str, gone: Iterable[str] = ()) -> None:
        log.info("dry run: %d opportunities seen, not kept (the prospects' states are in this run's overlay)", len(seen))

    def resolve_anomalies(self, keys: Iterable[tuple[str, str]], kind: str | None = None) -> int:
        log.info("dry run: anomalies%s of %d prospects would be closed, not closed", f" {kind}" if kind else "",
                 len(list(keys)))  # fmt: skip
        return 0

    def set_delta_link(self, entity_set: str, delta_link: str | None, run_id: str) -> None:
        log.info("dry run: the delta link of %s is not advanced (the next real run reads these changes)", entity_set)

    def record_drift(self, findings: pd.DataFrame, run_id: str) -> None:
        log.info("dry run: %d drift findings logged, not kept", len(findings))

    def record_anomalies(self, found: Iterable[tuple[tuple[str, str], str, str]], run_id: str) -> int:
        found = list(found)
        for (legal_entity, prospect_id), kind, detail in found:
            log.warning("dry run: anomaly %s on prospect %s/%s (not recorded): %s", kind, legal_entity, prospect_id, detail)
        return len(found)

    def record_planned_writes(self, task: str, planned: pd.DataFrame) -> None:
        """The writes one task of this run would make (PLAN_COLUMNS); a retried task replaces its own."""
        now = _now()
        rows = [{"run_id": self.run_id, "task": task, "planned_at": now, **{name: row.get(name) for name in PLAN_COLUMNS}}
                for row in planned.to_dict("records")]  # fmt: skip
        with self._write() as connection:
            connection.execute(planned_writes.delete().where(planned_writes.c.run_id == self.run_id,
                                                             planned_writes.c.task == task))  # fmt: skip
            if rows:
                connection.execute(planned_writes.insert(), rows)
