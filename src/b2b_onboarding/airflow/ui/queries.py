"""Read-only queries on the state store's tables, for the pages and the JSON API alike.

Only selects, never a write, and bounded: a list is read a page at a time, at most
`MAX_PER_PAGE` rows. Prospect data is hostile input: it is returned as it is and escaped where
it is shown.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from b2b_onboarding.airflow.ui import links
from b2b_onboarding.domain.prospects import Prospect
from b2b_onboarding.domain.rules import Stage
from b2b_onboarding.store.state import anomalies, drift_findings, prospects, step_results, task_failures, transitions

MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 50
MAX_QUERY_LENGTH = 200
# Legal entities shown side by side in the counts (there are a handful; the rest are summed).
MAX_LEGAL_ENTITY_COLUMNS = 20
STAGES = [stage.value for stage in Stage]
UNDECIDED = prospects.c.decision.is_(None)
KEPT = sa.or_(prospects.c.stage == Stage.INVALID.value, prospects.c.last_error.is_not(None))

# Shown from the prospect's own fields (the validated record from Commerce; none for a bad record).
PROSPECT_FIELDS = ("ProspectName", "CompanyName", "PrimaryEmailAddress")
# The tables the pages read, the prospects first.
TABLES = (prospects, transitions, anomalies, drift_findings, task_failures, step_results)
LIST_COLUMNS = (
    "legal_entity", "prospect_id", "stage", "lead_id", "lead_state", "opportunity_id", "opportunity_state",
    "decision", "last_error", "last_run_id", "updated_at",
)  # fmt: skip


class StoreNotReady(Exception):
    """The state store has no tables yet: no run has written to it (see `app._Store`)."""


@dataclass(frozen=True)
class Page:
    items: list[dict]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    def as_json(self) -> dict:
        return {"items": self.items, "page": self.page, "per_page": self.per_page, "total": self.total,
                "pages": self.pages}  # fmt: skip


def utc(value: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes; the store writes UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    value = utc(value)
    return value.isoformat() if value else None


def _json_ready(row: dict) -> dict:
    return {name: iso(value) if isinstance(value, datetime) else value for name, value in row.items()}


def like_pattern(text: str) -> str:
    """A case-insensitive substring pattern whose `%`, `_` and `\\` match themselves."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _field(name: str) -> sa.ColumnElement:
    return prospects.c.prospect[name].as_string()


def bad_fields(prospect: dict) -> list[dict]:
    """The fields a prospect's validation error names, in its order, each with the value Commerce sent
    (`received`) when the store keeps the record as received: a bad record's own (stage invalid),
    not the last valid record a tracked prospect keeps when a correction in Commerce is invalid."""
    error = prospect.get("validation_error") or ""
    # "prospect usrt/P-4: PrimaryEmailAddress: value is not …; CompanyName: …" (prospects.validate)
    named = sorted((found.start(), name) for name in Prospect.model_fields
                   if (found := re.search(rf"(?:: |; ){re.escape(name)}: ", error)))  # fmt: skip
    record = prospect.get("prospect")
    received = isinstance(record, dict) and prospect.get("stage") == Stage.INVALID.value
    return [{"field": name, "received": received, "value": record.get(name) if received else None}
            for _, name in named]  # fmt: skip


def first_line(error: str) -> tuple[str, int]:
    """A recorded failure's one line (its first, whole) and how many more lines its log holds."""
    lines = [line.strip() for line in error.splitlines() if line.strip()] or [""]
    return lines[0], len(lines) - 1


class Queries:
    """The store's tables, read through `engine` (a StateStore's, or one of the page's own)."""

    def __init__(self, engine: sa.Engine, airflow_base: str = "") -> None:
        self.engine = engine
        self.airflow_base = airflow_base  # the Airflow UI's path, '' at the root of the host

    def _connect(self) -> sa.Connection:
        return self.engine.connect()

    @staticmethod
    def _page(connection: sa.Connection, query: sa.Select, page: int, per_page: int) -> Page:
        """One page of the query's rows (at most MAX_PER_PAGE), and how many rows it has in all."""
        page, per_page = max(page, 1), max(1, min(per_page, MAX_PER_PAGE))
        total = connection.execute(sa.select(sa.func.count()).select_from(query.order_by(None).subquery())).scalar_one()
        rows = connection.execute(query.limit(per_page).offset((page - 1) * per_page)).mappings().all()
        return Page([dict(row) for row in rows], page, per_page, total)

    # The summary

    def summary(self, now: datetime | None = None) -> dict:
        """Prospects by stage (per legal entity and in all), the undecided ones (Pending in Commerce)
        and the oldest of them (first seen by the integration; and the oldest that is not a bad record),
        the prospects kept with an error, the anomalies, the latest drift findings."""
        now = now or datetime.now(UTC)
        with self._connect() as connection:
            counts = connection.execute(
                sa.select(prospects.c.legal_entity, prospects.c.stage, sa.func.count().label("n"))
                .group_by(prospects.c.legal_entity, prospects.c.stage)
            ).all()  # fmt: skip
            pending = connection.execute(
                sa.select(prospects.c.legal_entity, sa.func.count().label("n"),
                          sa.func.min(prospects.c.created_at).label("oldest"))
                .where(UNDECIDED).group_by(prospects.c.legal_entity)
            ).all()  # fmt: skip
            oldest, oldest_valid = (connection.execute(
                sa.select(prospects.c.legal_entity, prospects.c.prospect_id, prospects.c.stage, prospects.c.created_at)
                .where(UNDECIDED, *where)
                .order_by(prospects.c.created_at, prospects.c.legal_entity, prospects.c.prospect_id)
                .limit(1)
            ).mappings().first() for where in ([], [prospects.c.stage != Stage.INVALID.value]))  # fmt: skip
            kept = connection.execute(sa.select(sa.func.count()).select_from(prospects).where(KEPT)).scalar_one()
            anomaly_count = connection.execute(sa.select(sa.func.count()).select_from(anomalies)).scalar_one()
            drift = self._latest_drift_run(connection)

        by_entity: dict[str, dict[str, int]] = {}
        for legal_entity, stage, n in counts:
            by_entity.setdefault(legal_entity, {})[stage] = n
        stages = STAGES + sorted({stage for _, stage, _ in counts} - set(STAGES))  # a stage this page predates
        ordered = sorted(by_entity, key=lambda le: (-sum(by_entity[le].values()), le))
        shown, others = ordered[:MAX_LEGAL_ENTITY_COLUMNS], ordered[MAX_LEGAL_ENTITY_COLUMNS:]
        by_stage = {stage: sum(entity.get(stage, 0) for entity in by_entity.values()) for stage in stages}

        def aged(row: Any) -> dict | None:
            if row is None:
                return None
            first_seen = utc(row["created_at"])
            return {"legal_entity": row["legal_entity"], "prospect_id": row["prospect_id"], "stage": row["stage"],
                    "first_seen": iso(first_seen), "age_seconds": max(0, int((now - first_seen).total_seconds()))}  # fmt: skip

        return {
            "total": sum(by_stage.values()),
            "stages": stages,
            "by_stage": by_stage,
            "legal_entities": shown,
            "other_legal_entities": len(others),
            "by_legal_entity": {le: {stage: by_entity[le].get(stage, 0) for stage in stages} for le in shown},
            "pending": {
                "total": sum(n for _, n, _ in pending),
                "by_legal_entity": {le: {"count": n, "oldest_first_seen": iso(first)} for le, n, first in pending},
                "oldest": aged(oldest),
                "oldest_valid": aged(oldest_valid),  # bad records aside: they wait for a fix in Commerce
            },
            "empty_stages": [stage for stage in stages if not by_stage[stage]],  # folded away on the page
            "kept_with_error": kept,
            "anomalies": anomaly_count,
            "latest_drift": drift,
        }  # fmt: skip

    # Prospects

    def prospects(
        self, q: str = "", stage: str = "", legal_entity: str = "", page: int = 1, per_page: int = DEFAULT_PER_PAGE
    ) -> Page:
        """Prospects whose id, name, company, email, lead, opportunity, customer account, hierarchy or
        last error holds `q` (any case), of a stage and legal entity if given; by legal entity and id."""
        columns = [prospects.c[name] for name in LIST_COLUMNS]
        query = sa.select(*columns, prospects.c.prospect).order_by(prospects.c.legal_entity, prospects.c.prospect_id)
        q = q.strip()[:MAX_QUERY_LENGTH]
        if q:
            pattern = like_pattern(q)
            searched = [
                prospects.c.prospect_id, prospects.c.email, prospects.c.lead_id, prospects.c.opportunity_id,
                prospects.c.org_customer_account, prospects.c.person_customer_account, prospects.c.hierarchy_id,
                prospects.c.last_error, *(_field(name) for name in PROSPECT_FIELDS),
            ]  # fmt: skip
            query = query.where(sa.or_(*(sa.func.lower(column).like(pattern, escape="\\") for column in searched)))
        if stage:
            query = query.where(prospects.c.stage == stage)
        if legal_entity:
            query = query.where(prospects.c.legal_entity == legal_entity)
        with self._connect() as connection:
            found = self._page(connection, query, page, per_page)
        return replace(found, items=[self._listed(row) for row in found.items])

    @staticmethod
    def _listed(row: dict) -> dict:
        record = row.pop("prospect") or {}
        names = {"name": record.get("ProspectName"), "company": record.get("CompanyName")}
        return _json_ready({**row, **names})

    def prospect(self, legal_entity: str, prospect_id: str) -> dict | None:
        """Everything the store knows of one prospect, and the fields its validation error names, or None."""
        query = sa.select(prospects).where(prospects.c.legal_entity == legal_entity, prospects.c.prospect_id == prospect_id)
        with self._connect() as connection:
            row = connection.execute(query).mappings().first()
        return None if row is None else _json_ready({**row, "bad_fields": bad_fields(dict(row))})

    def timeline(self, legal_entity: str, prospect_id: str, page: int = 1, per_page: int = MAX_PER_PAGE) -> Page:
        """Its transitions, oldest first: from and to stage, when, the run that made it (with links to
        that run and its task in the Airflow UI), the error it kept, what changed without a change of
        stage (a correction carried to the lead, an adoption)."""
        query = (
            sa.select(transitions)
            .where(transitions.c.legal_entity == legal_entity, transitions.c.prospect_id == prospect_id)
            .order_by(transitions.c.id)
        )
        with self._connect() as connection:
            found = self._page(connection, query, page, per_page)
        items = []
        for row in found.items:
            dag_id, task_id = links.step_of(row["from_stage"], row["to_stage"])
            dag_id, task_id = row.get("dag_id") or dag_id, row.get("task_id") or task_id  # recorded, when it is
            items.append(_json_ready({
                "at": row["at"], "from_stage": row["from_stage"], "to_stage": row["to_stage"], "run_id": row["run_id"],
                "error": row["error"], "detail": row.get("detail"),
                **links.run_links(self.airflow_base, row["run_id"], dag_id, task_id, row.get("map_index")),
            }))  # fmt: skip
        return replace(found, items=items)

    # Anomalies and kept records

    def anomalies(
        self, page: int = 1, per_page: int = DEFAULT_PER_PAGE, legal_entity: str | None = None, prospect_id: str | None = None
    ) -> Page:
        """Conflicts reported and never overwritten, the most recently seen first."""
        query = sa.select(anomalies).order_by(
            anomalies.c.last_seen.desc(), anomalies.c.legal_entity, anomalies.c.prospect_id, anomalies.c.kind)
        if legal_entity is not None and prospect_id is not None:
            query = query.where(anomalies.c.legal_entity == legal_entity, anomalies.c.prospect_id == prospect_id)
        with self._connect() as connection:
            found = self._page(connection, query, page, per_page)
        items = []
        for row in found.items:
            # Anomalies are found by the reconciliation (outcomes, approvals, rejections, drift check).
            first = links.run_links(self.airflow_base, row["first_run_id"], links.RECONCILIATION_DAG_ID, None)
            last = links.run_links(self.airflow_base, row["last_run_id"], links.RECONCILIATION_DAG_ID, None)
            items.append(_json_ready({**row, "first_run_url": first["run_url"], "last_run_url": last["run_url"]}))
        return replace(found, items=items)

    def kept(self, page: int = 1, per_page: int = DEFAULT_PER_PAGE) -> Page:
        """Prospects kept with an error: bad records (invalid in Commerce, validated again each run)
        and records a system refused (retried each run); the most recently updated first."""
        query = (
            sa.select(prospects.c.legal_entity, prospects.c.prospect_id, prospects.c.stage, prospects.c.validation_error,
                      prospects.c.last_error, prospects.c.last_run_id, prospects.c.updated_at, prospects.c.prospect)
            .where(KEPT)
            .order_by(prospects.c.updated_at.desc(), prospects.c.legal_entity, prospects.c.prospect_id)
        )  # fmt: skip
        with self._connect() as connection:
            found = self._page(connection, query, page, per_page)
        items = []
        for row in found.items:
            record = row.pop("prospect") or {}
            dag_id = links.dag_of_stage(row["stage"])
            items.append(_json_ready({
                **row, "error": row["last_error"] or row["validation_error"],
                "name": record.get("ProspectName"), "company": record.get("CompanyName"),
                "last_run_url": links.run_links(self.airflow_base, row["last_run_id"], dag_id, None)["run_url"],
            }))  # fmt: skip
        return replace(found, items=items)

    # Runs: what their step tasks did, the tasks that failed for good

    def step_results(self, dag_id: str, run_ids: Iterable[str]) -> dict[str, list[dict]]:
        """The results the step tasks of these runs recorded (task_id, dry_run, result as a dict), per
        run id, in the order they ended."""
        query = (
            sa.select(step_results.c.run_id, step_results.c.task_id, step_results.c.dry_run, step_results.c.result)
            .where(step_results.c.dag_id == dag_id, step_results.c.run_id.in_(list(run_ids)))
            .order_by(step_results.c.recorded_at, step_results.c.task_id, step_results.c.map_index)
        )
        found: dict[str, list[dict]] = {}
        with self._connect() as connection:
            for row in connection.execute(query).mappings():
                found.setdefault(row["run_id"], []).append({**row, "result": json.loads(row["result"])})
        return found

    def dry_runs(self, dag_id: str, run_ids: Iterable[str]) -> set[str]:
        """Which of these runs recorded results of a dry run."""
        query = sa.select(step_results.c.run_id).distinct().where(
            step_results.c.dag_id == dag_id, step_results.c.run_id.in_(list(run_ids)), step_results.c.dry_run)
        with self._connect() as connection:
            return set(connection.execute(query).scalars())

    def failures(self, page: int = 1, per_page: int = DEFAULT_PER_PAGE, dag_id: str = "", run_id: str = "") -> Page:
        """Every recorded failure of a task that failed for good (one row per failed try), the latest
        first; of one DAG, and of one run, if given."""
        query = sa.select(task_failures).order_by(task_failures.c.failed_at.desc(), task_failures.c.id.desc())
        if dag_id:
            query = query.where(task_failures.c.dag_id == dag_id)
        if run_id:
            query = query.where(task_failures.c.run_id == run_id)
        with self._connect() as connection:
            found = self._page(connection, query, page, per_page)
        return replace(found, items=[self._failure(row) for row in found.items])

    def run_failures(self, dag_id: str, run_ids: Iterable[str]) -> dict[str, list[dict]]:
        """The task instances of these runs that failed for good, per run id, in the order they
        failed: the latest try of each, unless it has recorded its result since (cleared and rerun)."""
        rerun = sa.exists().where(
            step_results.c.dag_id == task_failures.c.dag_id, step_results.c.run_id == task_failures.c.run_id,
            step_results.c.task_id == task_failures.c.task_id, step_results.c.map_index == task_failures.c.map_index,
            step_results.c.recorded_at > task_failures.c.failed_at,
        )  # fmt: skip
        query = (
            sa.select(task_failures)
            .where(task_failures.c.dag_id == dag_id, task_failures.c.run_id.in_(list(run_ids)), ~rerun)
            .order_by(task_failures.c.failed_at, task_failures.c.id)
        )
        latest: dict[tuple[str, str, int], dict] = {}
        with self._connect() as connection:
            for row in connection.execute(query).mappings():
                latest.pop((row["run_id"], row["task_id"], row["map_index"]), None)  # a later try: in its place
                latest[(row["run_id"], row["task_id"], row["map_index"])] = self._failure(dict(row))
        found: dict[str, list[dict]] = {}
        for (run_id, _, _), failure in latest.items():
            found.setdefault(run_id, []).append(failure)
        return found

    def _failure(self, row: dict) -> dict:
        """A recorded failure as the pages show it: its one line, the chunk its task worked on, and
        links to its run and to the log of its try (the UI's own route, right whatever Airflow's
        `[api] base_url` says)."""
        message, more_lines = first_line(row["error"])
        log = links.log_url(self.airflow_base, row["dag_id"], row["run_id"], row["task_id"], row["map_index"],
                            row["try_number"])  # fmt: skip
        chunk = row["rendered_map_index"] or (str(row["map_index"]) if row["map_index"] >= 0 else None)
        return _json_ready({
            "dag_id": row["dag_id"], "run_id": row["run_id"], "task_id": row["task_id"], "map_index": row["map_index"],
            "chunk": chunk, "try_number": row["try_number"], "failed_at": row["failed_at"], "message": message,
            "more_lines": more_lines, "error": row["error"], "legal_entity": row["legal_entity"],
            "first_id": row["first_id"], "last_id": row["last_id"],
            "run_url": links.run_url(self.airflow_base, row["dag_id"], row["run_id"]), "log_url": log,
        })  # fmt: skip

    # Drift

    @staticmethod
    def _latest_drift_run(connection: sa.Connection) -> dict | None:
        latest = connection.execute(
            sa.select(drift_findings.c.run_id, sa.func.max(drift_findings.c.checked_at).label("checked_at"),
                      sa.func.count().label("findings"))
            .group_by(drift_findings.c.run_id)
            .order_by(sa.desc("checked_at"), drift_findings.c.run_id)
            .limit(1)
        ).mappings().first()  # fmt: skip
        return None if latest is None else {"run_id": latest["run_id"], "checked_at": iso(latest["checked_at"]),
                                            "findings": latest["findings"]}  # fmt: skip

    def drift_runs(self, limit: int = 20) -> list[dict]:
        """The latest drift checks that found something (a check that finds nothing stores no row)."""
        query = (
            sa.select(drift_findings.c.run_id, sa.func.max(drift_findings.c.checked_at).label("checked_at"),
                      sa.func.count().label("findings"))
            .group_by(drift_findings.c.run_id)
            .order_by(sa.desc("checked_at"), drift_findings.c.run_id)
            .limit(limit)
        )  # fmt: skip
        with self._connect() as connection:
            return [_json_ready(dict(row)) for row in connection.execute(query).mappings()]

    def drift(self, run_id: str | None = None, page: int = 1, per_page: int = MAX_PER_PAGE) -> dict:
        """One drift check's findings (the latest check that found something, by default): counts by
        kind, and a page of findings."""
        with self._connect() as connection:
            if run_id is None:
                latest = self._latest_drift_run(connection)
                run_id = latest["run_id"] if latest else None
            if run_id is None:
                empty = Page([], 1, max(1, min(per_page, MAX_PER_PAGE)), 0)
                return {"run_id": None, "checked_at": None, "by_kind": {}, **links.run_links(self.airflow_base, None, None, None),
                        "findings": empty}  # fmt: skip
            of_run = drift_findings.c.run_id == run_id
            by_kind = dict(connection.execute(
                sa.select(drift_findings.c.kind, sa.func.count()).where(of_run).group_by(drift_findings.c.kind)
                .order_by(drift_findings.c.kind)).all())  # fmt: skip
            checked_at = connection.execute(sa.select(sa.func.max(drift_findings.c.checked_at)).where(of_run)).scalar()
            query = (
                sa.select(*(drift_findings.c[name] for name in ("kind", "legal_entity", "prospect_id", "lead_id", "detail")))
                .where(of_run)
                .order_by(drift_findings.c.kind, drift_findings.c.legal_entity, drift_findings.c.prospect_id,
                          drift_findings.c.lead_id, drift_findings.c.id)
            )  # fmt: skip
            found = self._page(connection, query, page, per_page)
        run = links.run_links(self.airflow_base, run_id, links.RECONCILIATION_DAG_ID, "check_drift")
        return {
            "run_id": run_id, "checked_at": iso(checked_at), "by_kind": by_kind, **run,
            "findings": found,
        }  # fmt: skip


def json_value(value: Any) -> Any:
    """A Page (or a dict holding one) as JSON-ready data."""
    if isinstance(value, Page):
        return value.as_json()
    if isinstance(value, dict):
        return {key: json_value(item) for key, item in value.items()}
    return value
