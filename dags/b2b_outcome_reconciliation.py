"""
### B2B outcome reconciliation

Nightly: read what sellers decided in Sales and carry it into Commerce headquarters.
Qualified lead → the account and contact become Organization and Person customers;
won opportunity → customer hierarchy (contact as Admin) and the prospect Approved (HQ emails);
disqualified lead or lost opportunity → the prospect Rejected (HQ emails).
Every write reads its target first: reruns, backfills and overlapping runs write nothing twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import dag, task


@dag(
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    tags=["dynamics365", "b2b-onboarding"],
    doc_md=__doc__,
)
def b2b_outcome_reconciliation():
    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding import tasks

        return tasks.legal_entities()

    @task
    def read_outcomes() -> dict:
        from b2b_onboarding import tasks

        return tasks.read_outcomes()

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}")
    def write_customers(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.write_customers(legal_entity)

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}")
    def approve_won(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.approve_won(legal_entity)

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}")
    def reject_lost(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.reject_lost(legal_entity)

    @task
    def report(outcomes, customers, approved, rejected) -> None:
        from b2b_onboarding import tasks

        tasks.report_run(outcomes, customers[:], approved[:], rejected[:])

    entities = legal_entities()
    outcomes = read_outcomes()
    customers = write_customers.expand(legal_entity=entities)
    approved = approve_won.expand(legal_entity=entities)
    rejected = reject_lost.expand(legal_entity=entities)
    outcomes >> customers >> [approved, rejected]
    report(outcomes, customers, approved, rejected)


b2b_outcome_reconciliation()
