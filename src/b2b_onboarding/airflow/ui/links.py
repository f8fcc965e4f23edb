"""Links into the Airflow UI: the DAG run (and task) that made a transition of a prospect, and the
log of a task's try; and which task of which DAG moves a prospect on from its stage.

The state store keeps the run id of each transition, not its DAG: run ids are unique per DAG only
(both DAGs have a `scheduled__…T02:00:00+00:00` run), so the DAG and the task are derived from the
step, as the DAGs divide the work: the sync pulls prospects and pushes leads; the reconciliation
does everything after. A `dag_id` (and `task_id`) column on `b2b_transitions`, when there is one,
is used instead.
"""

from __future__ import annotations

from urllib.parse import quote

SYNC_DAG_ID = "b2b_prospect_sync"
# The light outcome DAG: the reconciliation's steps, run as soon as sellers decide (or every 15 minutes).
OUTCOMES_DAG_ID = "b2b_outcomes"
RECONCILIATION_DAG_ID = "b2b_outcome_reconciliation"
DAG_IDS = (SYNC_DAG_ID, OUTCOMES_DAG_ID, RECONCILIATION_DAG_ID)

# Tasks mapped over legal entities or chunks: their run page lists the mapped instances.
MAPPED_TASKS = frozenset({"pull_prospects", "push_leads", "correct_leads", "write_customers", "approve_won",
                          "reject_lost"})  # fmt: skip
SYNC_STAGES = frozenset({"invalid", "pulled"})
# The stage a task moves a prospect to (a transition into another stage than its own).
_TASK_OF_STAGE = {
    "qualified": "read_outcomes", "disqualified": "read_outcomes", "won": "read_outcomes", "lost": "read_outcomes",
    "customers_created": "write_customers", "approved": "approve_won", "rejected": "reject_lost",
}  # fmt: skip
# The task that moves a prospect on from its stage (its next step), and its DAG. A bad record waits
# for a pull to validate it again; a decided prospect waits for nothing.
NEXT_STEP = {
    "invalid": (SYNC_DAG_ID, "pull_prospects"), "pulled": (SYNC_DAG_ID, "push_leads"),
    "lead_open": (RECONCILIATION_DAG_ID, "read_outcomes"), "qualified": (RECONCILIATION_DAG_ID, "write_customers"),
    "customers_created": (RECONCILIATION_DAG_ID, "read_outcomes"), "won": (RECONCILIATION_DAG_ID, "approve_won"),
    "disqualified": (RECONCILIATION_DAG_ID, "reject_lost"), "lost": (RECONCILIATION_DAG_ID, "reject_lost"),
}  # fmt: skip
# The tasks upstream of each next step in its DAG: when one of them fails, the step does not run at all.
BEFORE_STEP = {
    "pull_prospects": frozenset({"legal_entities"}),
    "push_leads": frozenset({"legal_entities", "pull_prospects", "plan_push"}),
    "read_outcomes": frozenset(),
    "write_customers": frozenset({"legal_entities", "read_outcomes", "plan_customers"}),
    "approve_won": frozenset({"legal_entities", "read_outcomes", "plan_customers", "write_customers", "plan_approvals"}),
    "reject_lost": frozenset({"legal_entities", "read_outcomes", "plan_rejections"}),
}


def step_of(from_stage: str | None, to_stage: str) -> tuple[str, str | None]:
    """(dag id, task id or None) of the task that recorded a transition.

    An error kept on a prospect without a change of stage names the DAG only where several tasks
    could have kept it (e.g. a qualified prospect: its customers refused, or its account deleted)."""
    if to_stage == "invalid" or (to_stage == "pulled" and from_stage != "pulled"):
        return SYNC_DAG_ID, "pull_prospects"
    if to_stage == "pulled" or (to_stage == "lead_open" and from_stage == "pulled"):
        return SYNC_DAG_ID, "push_leads"  # a lead written, or a lead Sales refused (kept with its error)
    if from_stage != to_stage and to_stage in _TASK_OF_STAGE:
        return RECONCILIATION_DAG_ID, _TASK_OF_STAGE[to_stage]
    return RECONCILIATION_DAG_ID, None


def dag_of_stage(stage: str | None) -> str:
    """The DAG that last wrote to a prospect at this stage (its last error, its last run)."""
    return SYNC_DAG_ID if stage in SYNC_STAGES else RECONCILIATION_DAG_ID


def _segment(value: str) -> str:
    return quote(value, safe="")


def run_url(base: str, dag_id: str, run_id: str) -> str:
    """The UI's page of a DAG run: its task instances, each with its logs."""
    return f"{base}/dags/{_segment(dag_id)}/runs/{_segment(run_id)}"


def task_url(base: str, dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> str:
    """The UI's page of a task in a run (its log): of one mapped instance when `map_index` names it,
    else, for a mapped task, the list of its mapped instances."""
    url = f"{run_url(base, dag_id, run_id)}/tasks/{_segment(task_id)}"
    if map_index is not None and map_index >= 0:
        return f"{url}/mapped/{map_index}"
    return f"{url}/mapped" if task_id in MAPPED_TASKS else url


def log_url(base: str, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """The UI's log of one try of a task instance (a mapped one's own, not the list of instances)."""
    return f"{task_url(base, dag_id, run_id, task_id, map_index)}?try_number={try_number}"


def run_links(base: str, run_id: str | None, dag_id: str | None, task_id: str | None,
              map_index: int | None = None) -> dict:  # fmt: skip
    """The links of one run id, for the pages and the JSON alike; a mapped task's own instance when
    the transition recorded it."""
    if not run_id or not dag_id:
        return {"dag_id": dag_id, "task_id": task_id, "run_url": None, "task_url": None}
    return {
        "dag_id": dag_id,
        "task_id": task_id,
        "run_url": run_url(base, dag_id, run_id),
        "task_url": task_url(base, dag_id, run_id, task_id, map_index) if task_id else None,
    }
