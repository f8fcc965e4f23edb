"""
### B2B outcome reconciliation

Nightly: read what sellers decided in Sales and carry it into Commerce headquarters.
Qualified lead → the account and contact become Organization and Person customers;
won opportunity → customer hierarchy (contact as Admin) and the prospect Approved (HQ emails);
disqualified lead or lost opportunity → the prospect Rejected (HQ emails).
Outcomes are read with change tracking; Commerce writes go in `$batch` changesets, one atomic
changeset per prospect. Every write is checked against its target first: reruns, backfills and
overlapping runs write nothing twice. Last, a drift check compares all of Commerce with all of Sales.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, dag, task

CHUNK = "{{ task.op_kwargs['legal_entity'] }} {{ task.op_kwargs['first_id'] }}…{{ task.op_kwargs['last_id'] }}"


@dag(
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={"chunk_size": Param(5000, type="integer", minimum=1, description="Prospects per mapped task.")},
    tags=["dynamics365", "b2b-onboarding"],
    doc_md=__doc__,
)
def b2b_outcome_reconciliation():
    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding import tasks

        return tasks.legal_entities()

    @task(pool="d365_sales")
    def read_outcomes() -> dict:
        from b2b_onboarding import tasks

        return tasks.read_outcomes()

    # Planning runs even when an earlier mapped step had no chunks (and so was skipped).
    @task(trigger_rule="none_failed")
    def plan(step: str, entities: list[str]) -> list[dict]:
        from b2b_onboarding import tasks

        return tasks.plan(step, entities)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def write_customers(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.write_customers(legal_entity, first_id, last_id)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def approve_won(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.approve_won(legal_entity, first_id, last_id)

    @task(map_index_template=CHUNK, pool="d365_commerce")
    def reject_lost(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.reject_lost(legal_entity, first_id, last_id)

    @task(trigger_rule="none_failed", pool="d365_sales")
    def check_drift(entities: list[str]) -> dict:
        from b2b_onboarding import tasks

        return tasks.check_drift(entities)

    @task(trigger_rule="all_done")
    def report(outcomes, customers, approved, rejected, drift) -> None:
        from b2b_onboarding import tasks

        tasks.report_run(outcomes, customers[:], approved[:], rejected[:], drift)

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
    drift = check_drift(entities)
    [approved, rejected] >> drift
    report(outcomes, customers, approved, rejected, drift)


b2b_outcome_reconciliation()
