"""The state store: one row per prospect and an append-only history of its transitions.

An audit trail and a cache, never the source of truth: every write to Commerce or Sales first
reads that system's current state. Any SQLAlchemy URL works; the default is a SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event

from .rules import stage_of

metadata = sa.MetaData()

KEY_COLUMNS = ("legal_entity", "prospect_id")
FACT_COLUMNS = (
    "prospect", "validation_error", "lead_id", "lead_state", "opportunity_id", "opportunity_state",
    "account_id", "contact_id", "org_customer_account", "person_customer_account", "org_party_number",
    "person_party_number", "hierarchy_id", "decision",
)  # fmt: skip
PROSPECT_COLUMNS = (*KEY_COLUMNS, "stage", *FACT_COLUMNS, "last_error", "last_run_id", "created_at", "updated_at")

prospects = sa.Table(
    "b2b_prospects",
    metadata,
    sa.Column("legal_entity", sa.String(16), primary_key=True),
    sa.Column("prospect_id", sa.String(255), primary_key=True),
    sa.Column("stage", sa.String(32), nullable=False, index=True),
    sa.Column("prospect", sa.JSON),
    sa.Column("validation_error", sa.Text),
    *(sa.Column(name, sa.String(64)) for name in FACT_COLUMNS[2:]),
    sa.Column("last_error", sa.Text),
    sa.Column("last_run_id", sa.String(250)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
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
    sa.Index("ix_b2b_transitions_prospect", "legal_entity", "prospect_id"),
)

# Keys per IN clause: far below every database's bound-parameter limit.
_KEYS_PER_QUERY = 400


def _now() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets mapped tasks read while one writes; the busy timeout queues writers instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class StateStore:
    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def frame(self, legal_entity: str | None = None) -> pd.DataFrame:
        """Tracked prospects (all, or of one legal entity) as a frame with PROSPECT_COLUMNS."""
        query = sa.select(prospects)
        if legal_entity is not None:
            query = query.where(prospects.c.legal_entity == legal_entity)
        with self.engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
        # dtype=object keeps None as None (pandas would turn it into NaN in string columns).
        return pd.DataFrame([dict(row) for row in rows], columns=list(PROSPECT_COLUMNS), dtype=object)

    def history(self, legal_entity: str, prospect_id: str) -> pd.DataFrame:
        query = (
            sa.select(transitions)
            .where(transitions.c.legal_entity == legal_entity, transitions.c.prospect_id == prospect_id)
            .order_by(transitions.c.id)
        )
        with self.engine.connect() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all())

    def record_pulled(self, pulled: pd.DataFrame, run_id: str) -> dict[str, int]:
        """Tracks newly pulled prospects; refreshes those without a lead yet (a fixed bad record
        becomes valid); leaves alone every prospect that already has a lead."""
        counts = {"new": 0, "refreshed": 0, "unchanged": 0}
        rows = pulled.to_dict("records")
        with self.engine.begin() as connection:
            for start in range(0, len(rows), _KEYS_PER_QUERY):
                chunk = rows[start : start + _KEYS_PER_QUERY]
                existing = self._rows(connection, [(row["legal_entity"], row["prospect_id"]) for row in chunk])
                for row in chunk:
                    facts = {"prospect": row["prospect"], "validation_error": row["error"]}
                    known = existing.get((row["legal_entity"], row["prospect_id"]))
                    if known is None:
                        self._insert(connection, row["legal_entity"], row["prospect_id"], facts, run_id)
                        counts["new"] += 1
                    elif known["lead_id"] is None and any(known[name] != value for name, value in facts.items()):
                        self._update(connection, known, facts, run_id, error=None)
                        counts["refreshed"] += 1
                    else:
                        counts["unchanged"] += 1
        return counts

    def update(
        self, legal_entity: str, prospect_id: str, run_id: str, *, error: str | None = None, **facts: Any
    ) -> None:
        """Records new facts (and clears the last error), or records an error for this prospect."""
        unknown = set(facts) - set(FACT_COLUMNS)
        if unknown:
            raise ValueError(f"not facts of a prospect: {sorted(unknown)}")
        with self.engine.begin() as connection:
            known = self._rows(connection, [(legal_entity, prospect_id)]).get((legal_entity, prospect_id))
            if known is None:
                raise KeyError(f"prospect {legal_entity}/{prospect_id} is not tracked")
            self._update(connection, known, facts, run_id, error=error)

    def apply_changes(self, changes: pd.DataFrame, run_id: str) -> int:
        """Applies a frame of (legal_entity, prospect_id, fact columns...) from the rules."""
        fact_names = [name for name in changes.columns if name in FACT_COLUMNS]
        for change in changes.to_dict("records"):
            facts = {name: change[name] for name in fact_names if pd.notna(change[name])}
            self.update(change["legal_entity"], change["prospect_id"], run_id, **facts)
        return len(changes)

    def _rows(self, connection: sa.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        keys = list(keys)
        if not keys:
            return {}
        query = sa.select(prospects).where(sa.tuple_(prospects.c.legal_entity, prospects.c.prospect_id).in_(keys))
        return {(row["legal_entity"], row["prospect_id"]): dict(row) for row in connection.execute(query).mappings()}

    def _insert(self, connection: sa.Connection, legal_entity: str, prospect_id: str, facts: Mapping, run_id: str):
        stage = stage_of(facts)
        now = _now()
        connection.execute(
            prospects.insert().values(
                legal_entity=legal_entity, prospect_id=prospect_id, stage=stage, last_run_id=run_id,
                last_error=facts.get("validation_error"), created_at=now, updated_at=now, **facts,
            )  # fmt: skip
        )
        self._log(connection, legal_entity, prospect_id, None, stage, run_id, facts.get("validation_error"), now)

    def _update(self, connection: sa.Connection, known: dict, facts: Mapping, run_id: str, error: str | None):
        merged = {**known, **facts}
        stage = stage_of(merged)
        error = error or merged.get("validation_error")
        if stage == known["stage"] and error == known["last_error"] and all(known[k] == v for k, v in facts.items()):
            return  # nothing new: keep the history free of repeats
        now = _now()
        connection.execute(
            prospects.update()
            .where(prospects.c.legal_entity == known["legal_entity"], prospects.c.prospect_id == known["prospect_id"])
            .values(stage=stage, last_error=error, last_run_id=run_id, updated_at=now, **facts)
        )
        if stage != known["stage"] or (error and error != known["last_error"]):
            self._log(connection, known["legal_entity"], known["prospect_id"], known["stage"], stage, run_id, error, now)

    @staticmethod
    def _log(connection, legal_entity, prospect_id, from_stage, to_stage, run_id, error, at) -> None:
        connection.execute(
            transitions.insert().values(
                legal_entity=legal_entity, prospect_id=prospect_id, from_stage=from_stage, to_stage=to_stage,
                run_id=run_id, error=error, at=at,
            )  # fmt: skip
        )
