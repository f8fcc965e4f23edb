"""What the onboarding DAGs share: their run params (the Trigger form), their task defaults, the
name of a chunk's task, the outcome steps both outcome DAGs run (`outcome_steps`), and the tasks every
DAG ends with (`closing_tasks`).

Imported by the DAG processor with every parse of a DAG file, so it imports Airflow's `Param` and the
standard library alone; the failure callback imports the notifier only once a task has failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from airflow.sdk import Param

START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
TAGS = ["dynamics365", "b2b-onboarding"]
# A mapped chunk's name in the UI, e.g. "usrt P-000001…P-005000".
CHUNK = "{{ task.op_kwargs['legal_entity'] }} {{ task.op_kwargs['first_id'] }}…{{ task.op_kwargs['last_id'] }}"


def task_failed(context: Mapping[str, Any]) -> None:
    """The DAGs' on_failure_callback: the product's notifier logs, records and alerts the failure."""
    from b2b_onboarding.airflow.notifier import TaskFailureNotifier

    TaskFailureNotifier()(context)


# Each DAG adds its retry_delay.
DEFAULT_ARGS = {"retries": 2, "on_failure_callback": task_failed}


def run_params() -> dict[str, Param]:
    """The run params both DAGs take, each optional: its type admits null, which keeps the Trigger form
    from marking it "required". New objects on each call: a run's values are kept in its DAG's Param
    objects (`Param.resolve`), which two DAGs must not share."""
    return {
        "dry_run": Param(False, type=["null", "boolean"], title="Dry run",
                         description="Read Commerce, Sales and the state store, and log every write this run would "
                                     "make (system, operation, legal entity, prospect, what) without making any."),
        "legal_entities": Param([], type=["null", "array"], items={"type": "string"}, title="Legal entities",
                                description="Only these legal entities (dataAreaId, e.g. usrt), one per line. "
                                            "Empty: those of the connection d365_commerce."),
        "prospect_ids": Param([], type=["null", "array"], items={"type": "string", "pattern": "^[^/]+/.+$"},
                              title="Prospects (targeted rerun)",
                              description="Only these prospects, as <legal entity>/<prospect id> (e.g. usrt/P-000123), "
                                          "one per line: every step works on them alone, each read by its key (a bad "
                                          "record fixed in HQ is pulled again while it is a Pending B2B prospect). "
                                          "Empty: every prospect."),
        "chunk_size": Param(5000, type=["null", "integer"], minimum=1, title="Chunk size",
                            description="Prospects per mapped task (a chunk of leads to push or correct, or of "
                                        "Commerce writes)."),
    }  # fmt: skip


def outcome_params() -> dict[str, Param]:
    """The run params of the DAGs that read sellers' outcomes: the shared ones, and when a lead
    qualified without an opportunity becomes an anomaly."""
    return {
        **run_params(),
        "qualified_without_opportunity_days": Param(
            2, type=["null", "number"], minimum=0, title="Qualified without opportunity (days)",
            description="A lead qualified this long ago with no opportunity (none created at qualification or "
                        "since) is reported as the anomaly qualified_without_opportunity."),
    }  # fmt: skip


class OutcomeSteps(NamedTuple):
    """The tasks `outcome_steps` adds to a DAG, for the DAG to wire what follows them."""

    entities: Any
    outcomes: Any
    customer_chunks: Any
    customers: Any
    approve_chunks: Any
    reject_chunks: Any
    approved: Any
    rejected: Any


def outcome_steps() -> OutcomeSteps:
    """Adds, to the DAG being defined, the steps that carry sellers' outcomes into Commerce (as
    `b2b_outcomes` and `b2b_outcome_reconciliation` both run them): legal_entities, read_outcomes,
    plan_customers → write_customers → plan_approvals → approve_won, plan_rejections → reject_lost."""
    from airflow.sdk import task  # the decorators load only where a DAG is defined

    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding.airflow import tasks

        return tasks.legal_entities()

    @task(pool="d365_sales")
    def read_outcomes() -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.read_outcomes()

    # Planning runs even when an earlier mapped step had no chunks (and so was skipped).
    @task(trigger_rule="none_failed")
    def plan(step: str, entities: list[str]) -> list[dict]:
        from b2b_onboarding.airflow import tasks

        return tasks.plan(step, entities)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def write_customers(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.write_customers(legal_entity, first_id, last_id)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def approve_won(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.approve_won(legal_entity, first_id, last_id)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def reject_lost(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.reject_lost(legal_entity, first_id, last_id)

    entities = legal_entities()
    outcomes = read_outcomes()
    customer_chunks = plan.override(task_id="plan_customers")("customers", entities)
    customers = write_customers.expand_kwargs(customer_chunks)
    approve_chunks = plan.override(task_id="plan_approvals")("approve", entities)
    reject_chunks = plan.override(task_id="plan_rejections")("reject", entities)
    outcomes >> [customer_chunks, reject_chunks]
    customers >> approve_chunks
    approved = approve_won.expand_kwargs(approve_chunks)
    rejected = reject_lost.expand_kwargs(reject_chunks)
    return OutcomeSteps(entities, outcomes, customer_chunks, customers, approve_chunks, reject_chunks, approved,
                        rejected)


class ClosingTasks(NamedTuple):
    """The two tasks every onboarding DAG ends with (`closing_tasks`), for the DAG to call and wire."""

    report: Any
    all_tasks_succeeded: Any


def closing_tasks() -> ClosingTasks:
    """`report`, which runs whatever happened before it and says what is missing, and the run's last
    task `all_tasks_succeeded`, red when any task failed for good (README, Runbook, "The run is red")."""
    from airflow.sdk import task  # the decorators load only where a DAG is defined

    @task(trigger_rule="all_done")
    def report() -> None:
        from b2b_onboarding.airflow import tasks

        tasks.report_run()

    @task(trigger_rule="all_done", retries=0, on_failure_callback=[])
    def all_tasks_succeeded() -> None:
        from b2b_onboarding.airflow import tasks

        tasks.all_tasks_succeeded()

    return ClosingTasks(report, all_tasks_succeeded)
