"""
### B2B prospect sync

Pull the Pending B2B prospects of each legal entity from Commerce headquarters, validate them, and
create one Commerce B2B lead per prospect in Sales (keyed by `msdyn_prospectid`, owned by the
integration's application user, so it shows in "All Commerce B2B leads" and in no seller's
"My open leads"). Safe to rerun and backfill.

When: with `[d365_b2b_onboarding] scheduling = events` (the default), as soon as the triggerer sees
the Pending prospects change in HQ (asset `b2b_pending_prospects`; one request a look, every
`poll_interval_s`), and hourly as a safety net; with `scheduling = time`, on `sync_schedule` (every
15 minutes). Each whole pull stores what it read as the legal entity's watermark, which the trigger
compares HQ with.

Leads are written with UpsertMultiple, about 1,000 a request; the work is mapped per legal entity
and per chunk of `chunk_size` prospects. Tasks run in the pools `d365_commerce` and `d365_sales`,
whose slots bound what the integration sends to each system at once (README, Performance).

Trigger form: `dry_run` logs every write the run would make and makes none; `legal_entities` and
`prospect_ids` narrow the run (a targeted rerun: a bad record fixed in HQ is pulled again by its key).
A task that fails for good is logged in one line, kept in the state store and alerted
(connection `b2b_alerts`); the last task, `all_tasks_succeeded`, then turns the run red:
README, Runbook, "The run is red".
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from b2b_onboarding.airflow.params import (
    CHUNK,
    DEFAULT_ARGS,
    START_DATE,
    TAGS,
    closing_tasks,
    run_params,
)
from b2b_onboarding.airflow.schedules import sync_schedule


@dag(
    schedule=sync_schedule(),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
    params=run_params(),
    tags=TAGS,
    doc_md=__doc__,
)
def b2b_prospect_sync():
    @task
    def legal_entities() -> list[str]:
        from b2b_onboarding.airflow import tasks

        return tasks.legal_entities()

    @task(map_index_template="{{ task.op_kwargs['legal_entity'] }}", pool="d365_commerce")
    def pull_prospects(legal_entity: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.pull_prospects(legal_entity)

    @task
    def plan_push(entities: list[str]) -> list[dict]:
        from b2b_onboarding.airflow import tasks

        return tasks.plan("push", entities)

    @task(map_index_template=CHUNK, pool="d365_sales")
    def push_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.push_leads(legal_entity, first_id, last_id)

    @task
    def plan_corrections(entities: list[str]) -> list[dict]:
        from b2b_onboarding.airflow import tasks

        return tasks.plan("correct", entities)

    @task(map_index_template=CHUNK, pool="d365_sales")
    def correct_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.correct_leads(legal_entity, first_id, last_id)

    entities = legal_entities()
    pulled = pull_prospects.expand(legal_entity=entities)
    chunks = plan_push(entities)
    corrections = plan_corrections(entities)
    pulled >> [chunks, corrections]
    pushed = push_leads.expand_kwargs(chunks)
    corrected = correct_leads.expand_kwargs(corrections)
    report, all_tasks_succeeded = closing_tasks()
    reported = report()
    [pushed, corrected] >> reported
    [entities, pulled, chunks, corrections, pushed, corrected, reported] >> all_tasks_succeeded()


b2b_prospect_sync()
