"""
### B2B prospect sync

Every 15 minutes: pull the Pending B2B prospects of each legal entity from Commerce headquarters,
validate them, and create one Commerce B2B lead per prospect in Sales (keyed by
`msdyn_prospectid`, owned by the integration's application user, so it shows in
"All Commerce B2B leads" and in no seller's "My open leads"). Safe to rerun and backfill.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import dag, task


@dag(
    schedule="*/15 * * * *",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["dynamics365", "b2b-onboarding"],
    doc_md=__doc__,
)
def b2b_prospect_sync():
    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding import tasks

        return tasks.legal_entities()

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}")
    def pull_prospects(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.pull_prospects(legal_entity)

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}")
    def push_leads(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.push_leads(legal_entity)

    @task
    def report(pulled, pushed) -> None:
        from b2b_onboarding import tasks

        tasks.report_run(pulled[:], pushed[:])

    entities = legal_entities()
    pulled = pull_prospects.expand(legal_entity=entities)
    pushed = push_leads.expand(legal_entity=entities)
    pulled >> pushed
    report(pulled, pushed)


b2b_prospect_sync()
