"""
### B2B outcomes

What sellers decided in Sales, carried into Commerce headquarters soon after they decide: with
`[d365_b2b_onboarding] scheduling = events` (the default) a run starts as soon as the triggerer sees
leads or opportunities change in Dataverse (asset `b2b_seller_outcomes`; two requests a look, every
`poll_interval_s`); with `scheduling = time`, on `outcomes_schedule` (every 15 minutes).
Qualified lead → Organization and Person customers; won opportunity → customer hierarchy and the
prospect Approved; disqualified lead or lost opportunity → the prospect Rejected (HQ emails).

The light half of `b2b_outcome_reconciliation`: the same steps, reading only what changed (change
tracking), without the drift check and the SLA, which the nightly reconciliation keeps (and with
them the safety net for anything missed here). Every write is checked against its target first:
overlapping runs of either DAG write nothing twice.

Trigger form: `dry_run`, `legal_entities`, `prospect_ids`, `chunk_size`, as the other DAGs. A task
that fails for good is logged in one line, kept in the state store and alerted (connection
`b2b_alerts`); the last task, `all_tasks_succeeded`, then turns the run red: README, Runbook,
"The run is red".
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag

from b2b_onboarding.airflow.params import (
    DEFAULT_ARGS,
    START_DATE,
    TAGS,
    closing_tasks,
    outcome_params,
    outcome_steps,
)
from b2b_onboarding.airflow.schedules import outcomes_schedule


@dag(
    schedule=outcomes_schedule(),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
    params=outcome_params(),
    tags=TAGS,
    doc_md=__doc__,
)
def b2b_outcomes():
    steps = outcome_steps()
    report, all_tasks_succeeded = closing_tasks()
    reported = report()
    [steps.outcomes, steps.customers, steps.approved, steps.rejected] >> reported
    [*steps, reported] >> all_tasks_succeeded()


b2b_outcomes()
