"""
### B2B outcome reconciliation

Nightly (`[d365_b2b_onboarding] reconciliation_schedule`, 02:00 UTC): read what sellers decided in
Sales and carry it into Commerce headquarters, as `b2b_outcomes` does all day, then check everything.
Qualified lead → the account and contact become Organization and Person customers;
won opportunity → customer hierarchy (contact as Admin) and the prospect Approved (HQ emails);
disqualified lead or lost opportunity → the prospect Rejected (HQ emails).
Outcomes are read with change tracking; Commerce writes go in `$batch` changesets, one atomic
changeset per prospect. Every write is checked against its target first: reruns, backfills and
overlapping runs write nothing twice. Then a drift check compares all of Commerce with all of Sales,
and `check_sla` fails while anomalies are open or prospects wait longer than `sla_days`.

Trigger form: `dry_run` logs every write the run would make and makes none; `legal_entities` and
`prospect_ids` narrow the run (a targeted rerun restricts every step to the named prospects).
A task that fails for good is logged in one line, kept in the state store and alerted
(connection `b2b_alerts`); the last task, `all_tasks_succeeded`, then turns the run red:
README, Runbook, "The run is red".
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

from b2b_onboarding.airflow.params import (
    DEFAULT_ARGS,
    START_DATE,
    TAGS,
    closing_tasks,
    outcome_params,
    outcome_steps,
)
from b2b_onboarding.airflow.schedules import reconciliation_schedule


@dag(
    schedule=reconciliation_schedule(),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=5)},
    params={
        **outcome_params(),
        "sla_days": Param(3, type=["null", "integer"], minimum=0, title="SLA (days)",
                          description="check_sla fails when a prospect has waited undecided (Pending in Commerce) "
                                      "longer than this many days since it was first pulled, or an anomaly is open."),
    },  # fmt: skip
    tags=TAGS,
    doc_md=__doc__,
)
def b2b_outcome_reconciliation():
    @task(trigger_rule="none_failed", pool="d365_sales")
    def check_drift(entities: list[str]) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.check_drift(entities)

    # Runs whatever happened before it; retrying would not change its answer.
    @task(trigger_rule="all_done", retries=0)
    def check_sla() -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.check_sla()

    steps = outcome_steps()
    drift = check_drift(steps.entities)
    [steps.approved, steps.rejected] >> drift
    report, all_tasks_succeeded = closing_tasks()
    reported = report()
    [steps.outcomes, steps.customers, steps.approved, steps.rejected, drift] >> reported
    checked = check_sla()
    reported >> checked
    [*steps, drift, reported, checked] >> all_tasks_succeeded()


b2b_outcome_reconciliation()
