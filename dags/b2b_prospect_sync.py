"""
### B2B prospect sync

Every 15 minutes: pull the Pending B2B prospects of each legal entity from Commerce headquarters,
validate them, and create one Commerce B2B lead per prospect in Sales (keyed by
`msdyn_prospectid`, owned by the integration's application user, so it shows in
"All Commerce B2B leads" and in no seller's "My open leads"). Safe to rerun and backfill.

Leads are written with UpsertMultiple, about 1,000 a request; the work is mapped per legal entity
and per chunk of `chunk_size` prospects. Tasks run in the pools `d365_commerce` and `d365_sales`,
whose slots bound what the integration sends to each system at once (README, Performance).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, dag, task

CHUNK = "{{ task.op_kwargs['legal_entity'] }} {{ task.op_kwargs['first_id'] }}…{{ task.op_kwargs['last_id'] }}"


@dag(
    schedule="*/15 * * * *",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={"chunk_size": Param(5000, type="integer", minimum=1, description="Prospects per mapped push task.")},
    tags=["dynamics365", "b2b-onboarding"],
    doc_md=__doc__,
)
def b2b_prospect_sync():
    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding import tasks

        return tasks.legal_entities()

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}", pool="d365_commerce")
    def pull_prospects(legal_entity: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.pull_prospects(legal_entity)

    @task
    def plan_push(entities: list[str]) -> list[dict]:
        from b2b_onboarding import tasks

        return tasks.plan("push", entities)

    @task(map_index_template=CHUNK, pool="d365_sales")
    def push_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding import tasks

        return tasks.push_leads(legal_entity, first_id, last_id)

    @task(trigger_rule="all_done")
    def report(pulled, pushed) -> None:
        from b2b_onboarding import tasks

        tasks.report_run(pulled[:], pushed[:])

    entities = legal_entities()
    pulled = pull_prospects.expand(legal_entity=entities)
    chunks = plan_push(entities)
    pulled >> chunks
    report(pulled, push_leads.expand_kwargs(chunks))


b2b_prospect_sync()
