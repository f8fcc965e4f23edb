"""How the onboarding runs are doing: each DAG's recent runs (their state from Airflow's metadata
database, what they did from the results their step tasks record in the state store), what failed in
each DAG's last run, the prospects a failed task holds up, and the Airflow pools the tasks need.

Airflow's metadata database is read by `airflow_dag_runs` and `airflow_pool_names`, the defaults of
`app.create_app`, which takes others (a test's) in their place.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from b2b_onboarding.airflow.ui import links
from b2b_onboarding.airflow.ui.links import OUTCOMES_DAG_ID, RECONCILIATION_DAG_ID, SYNC_DAG_ID
from b2b_onboarding.airflow.ui.queries import Queries, iso

log = logging.getLogger(__name__)

# The pools the tasks run in: `airflow pools import` reads this file.
POOLS_FILE = Path(__file__).resolve().parents[1] / "pools.json"
RUN_HISTORY = 30  # the runs of each DAG shown, newest first
FINISHED = ("success", "failed")
# Pixels of the trend chart: the tallest bar, each bar and the gap after it, the room for a failed run's mark.
CHART_HEIGHT, BAR_WIDTH, BAR_GAP, MARK_HEIGHT = 60, 12, 4, 14

# A DAG's newest runs, newest first (run_id, state, started_at, ended_at, dry_run from its conf), at
# most the number given; None when Airflow's metadata database cannot be read.
DagRuns = Callable[[str, int], "list[dict] | None"]
# The names of Airflow's pools; None when its metadata database cannot be read.
PoolNames = Callable[[], "set[str] | None"]


@dataclass(frozen=True)
class Figure:
    """A column of the run history: counts of the results of some step tasks, summed."""

    key: str
    label: str
    tasks: tuple[str, ...]
    counts: tuple[str, ...]


STEP_TASKS = {
    SYNC_DAG_ID: ("pull_prospects", "push_leads", "correct_leads"),
    OUTCOMES_DAG_ID: ("read_outcomes", "write_customers", "approve_won", "reject_lost"),
    RECONCILIATION_DAG_ID: ("read_outcomes", "write_customers", "approve_won", "reject_lost", "check_drift"),
}
# Prospects a step kept with their error: a system refused the record, or a conflict (per_record.py).
_RECORD_ERRORS = ("failed", "conflicts", "failed one by one", "conflicts one by one")


def _written(outcome: str) -> tuple[str, ...]:
    """The counts of prospects a Commerce step wrote: in a changeset, one by one, or without `$batch`."""
    return ("written", f"{outcome} one by one", outcome)


def _cost(dag_id: str) -> tuple[Figure, ...]:
    steps = STEP_TASKS[dag_id]
    return (Figure("commerce_requests", "Commerce requests", steps, ("commerce_requests",)),
            Figure("dataverse_requests", "Dataverse requests", steps, ("dataverse_requests",)),
            Figure("throttled", "429s", steps, ("commerce_throttled", "dataverse_throttled")))  # fmt: skip


# The counts each step returns: sync.py, reconcile.py, drift.py.
FIGURES = {
    SYNC_DAG_ID: (
        Figure("pulled", "pulled", ("pull_prospects",), ("pulled",)),
        Figure("invalid", "invalid records", ("pull_prospects",), ("invalid",)),
        Figure("leads_created", "leads created", ("push_leads",), ("created",)),
        Figure("leads_adopted", "leads adopted", ("push_leads",), ("adopted",)),
        Figure("leads_corrected", "leads corrected", ("correct_leads",), ("corrected",)),
        Figure("record_errors", "record errors", ("push_leads", "correct_leads"), _RECORD_ERRORS),
        *_cost(SYNC_DAG_ID),
    ),
    **{dag_id: (
        Figure("customers_written", "customers written", ("write_customers",), _written("created")),
        Figure("approved", "approved", ("approve_won",), _written("approved")),
        Figure("rejected", "rejected", ("reject_lost",), _written("rejected")),
        Figure("record_errors", "record errors", ("write_customers", "approve_won", "reject_lost"), _RECORD_ERRORS),
        *_cost(dag_id),
    ) for dag_id in (OUTCOMES_DAG_ID, RECONCILIATION_DAG_ID)},
}  # fmt: skip


def airflow_dag_runs(dag_id: str, limit: int) -> list[dict] | None:
    """A DAG's newest runs in Airflow's metadata database, newest first, as the UI lists them."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.execute(
                sa.select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.conf)
                .where(DagRun.dag_id == dag_id)
                .order_by(DagRun.run_after.desc(), DagRun.id.desc())
                .limit(limit)
            ).all()
    except Exception:  # the pages still show what the store holds
        log.warning("could not read the runs of %s from Airflow's metadata database", dag_id, exc_info=True)
        return None
    return [{"run_id": row.run_id, "state": row.state, "started_at": iso(row.start_date), "ended_at": iso(row.end_date),
             "dry_run": isinstance(row.conf, dict) and bool(row.conf.get("dry_run"))} for row in rows]  # fmt: skip


def airflow_pool_names() -> set[str] | None:
    """The pools in Airflow's metadata database."""
    try:
        from airflow.models.pool import Pool
        from airflow.utils.session import create_session

        with create_session() as session:
            return set(session.scalars(sa.select(Pool.pool)))
    except Exception:
        log.warning("could not read the pools from Airflow's metadata database", exc_info=True)
        return None


def missing_pools(pool_names: PoolNames) -> list[str]:
    """The pools of POOLS_FILE that Airflow lacks: tasks of a missing pool wait "scheduled" forever."""
    present = pool_names()
    return [] if present is None else sorted(set(json.loads(POOLS_FILE.read_text())) - present)


def _seconds(run: dict, now: datetime) -> int | None:
    """How long a run took, or has been running."""
    if not run["started_at"]:
        return None
    ended = datetime.fromisoformat(run["ended_at"]) if run["ended_at"] else now
    return max(0, int((ended - datetime.fromisoformat(run["started_at"])).total_seconds()))


def run_history(queries: Queries, dag_id: str, runs: list[dict], now: datetime) -> list[dict]:
    """The runs (Airflow's, newest first) with their figures summed from the results their step tasks
    recorded, and their failures. Where a run did not succeed (or recorded no result at all: a run
    older than the results), a figure whose steps recorded nothing is missing (None), not zero, and
    one that lacks some of its steps' results is `partial`."""
    run_ids = [run["run_id"] for run in runs]
    results, failures = queries.step_results(dag_id, run_ids), queries.run_failures(dag_id, run_ids)
    history = []
    for run in runs:
        recorded, failed = results.get(run["run_id"], []), failures.get(run["run_id"], [])
        done, failed_tasks = {row["task_id"] for row in recorded}, {failure["task_id"] for failure in failed}
        complete = run["state"] == "success" and bool(recorded)
        figures, partial = {}, []
        for figure in FIGURES[dag_id]:
            of_figure = [row["result"] for row in recorded if row["task_id"] in figure.tasks]
            if not of_figure and not complete:
                figures[figure.key] = None
                continue
            figures[figure.key] = sum(result.get(count, 0) for result in of_figure for count in figure.counts)
            if failed_tasks & set(figure.tasks) or (not complete and not set(figure.tasks) <= done):
                partial.append(figure.key)
        history.append({
            **run, "run_url": links.run_url(queries.airflow_base, dag_id, run["run_id"]),
            "dry_run": run["dry_run"] or any(row["dry_run"] for row in recorded),
            "duration_seconds": _seconds(run, now), "figures": figures, "partial": partial,
            "missing_steps": [] if complete else [task for task in STEP_TASKS[dag_id] if task not in done],
            "failures": failed,
        })  # fmt: skip
    return history


def chart(history: list[dict]) -> dict:
    """The run history as the bars of an inline SVG: one a run, the oldest on the left, as tall as the
    run took (at least a sliver), classed by its state; a failed run is also marked above its bar."""
    runs = history[::-1]
    longest = max((run["duration_seconds"] or 0 for run in runs), default=0) or 1
    bars = []
    for position, run in enumerate(runs):
        height = max(2, round(CHART_HEIGHT * (run["duration_seconds"] or 0) / longest))
        x = position * (BAR_WIDTH + BAR_GAP)
        bars.append({"run": run, "x": x, "y": MARK_HEIGHT + CHART_HEIGHT - height, "width": BAR_WIDTH,
                     "height": height, "middle": x + BAR_WIDTH // 2})  # fmt: skip
    return {"width": len(runs) * (BAR_WIDTH + BAR_GAP) - BAR_GAP, "height": MARK_HEIGHT + CHART_HEIGHT,
            "mark_y": MARK_HEIGHT - 3, "bars": bars, "states": dict(Counter(run["state"] for run in runs))}  # fmt: skip


def latest_runs(queries: Queries, dag_runs: DagRuns) -> list[dict]:
    """Per DAG: whether Airflow could be read, and its latest finished run that is not a dry run (a
    dry run moves no prospect), with the task failures recorded for it when it failed."""
    latest = []
    for dag_id in links.DAG_IDS:
        runs = dag_runs(dag_id, RUN_HISTORY)
        finished = [run for run in runs or [] if run["state"] in FINISHED and not run["dry_run"]]
        dry = queries.dry_runs(dag_id, [run["run_id"] for run in finished])
        run = next((run for run in finished if run["run_id"] not in dry), None)
        if run is not None:
            failures = queries.run_failures(dag_id, [run["run_id"]]) if run["state"] == "failed" else {}
            run = {**run, "run_url": links.run_url(queries.airflow_base, dag_id, run["run_id"]),
                   "failures": failures.get(run["run_id"], [])}  # fmt: skip
        latest.append({"dag_id": dag_id, "readable": runs is not None, "run": run})
    return latest


def _holds(failure: dict, prospect: dict) -> bool:
    """Whether the chunk a failed task worked on holds the prospect: its legal entity and id range,
    ids compared as the chunks were cut (`rules.in_range`); a task of no chunk (unmapped, or one
    recorded without its chunk) concerns every prospect."""
    legal_entity, first_id, last_id = failure["legal_entity"], failure["first_id"], failure["last_id"]
    prospect_id = prospect["prospect_id"]
    return ((legal_entity is None or legal_entity.lower() == prospect["legal_entity"].lower())
            and (first_id is None or first_id <= prospect_id) and (last_id is None or prospect_id <= last_id))  # fmt: skip


def held_up(prospect: dict, latest: list[dict]) -> dict | None:
    """The failure that holds a prospect up, if any: in the latest run of the DAG that moves it on
    from its stage, its next step's task failed for the chunk holding it, or a task before that step
    failed (and so the step did not run at all)."""
    if prospect["stage"] not in links.NEXT_STEP:
        return None
    dag_id, task_id = links.NEXT_STEP[prospect["stage"]]
    run = next(entry["run"] for entry in latest if entry["dag_id"] == dag_id)
    failures = run["failures"] if run else []
    return next((failure for failure in failures if failure["task_id"] in links.BEFORE_STEP[task_id]
                 or (failure["task_id"] == task_id and _holds(failure, prospect))), None)  # fmt: skip
