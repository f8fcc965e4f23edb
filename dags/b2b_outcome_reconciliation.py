"""
### B2B outcome reconciliation

Nightly: read what sellers decided in Sales and carry it into Commerce headquarters.
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

from b2b_onboarding.airflow.params import CHUNK, DEFAULT_ARGS, START_DATE, TAGS, run_params


@dag(
    schedule="0 2 * * *",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=5)},
    params={
        **run_params(),
        "sla_days": Param(3, type=["null", "integer"], minimum=0, title="SLA (days)",
                          description="check_sla fails when a prospect has waited undecided (Pending in Commerce) "
                                      "longer than this many days since it was first pulled, or an anomaly is open."),
        "qualified_without_opportunity_days": Param(
            2, type=["null", "number"], minimum=0, title="Qualified without opportunity (days)",
            description="A lead qualified this long ago with no opportunity (none created at qualification or "
                        "since) is reported as the anomaly qualified_without_opportunity."),
    },  # fmt: skip
    tags=TAGS,
    doc_md=__doc__,
)
def b2b_outcome_reconciliation():
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

    @task(trigger_rule="none_failed", pool="d365_sales")
    def check_drift(entities: list[str]) -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.check_drift(entities)

    # Runs whatever happened before it, and says what is missing.
    @task(trigger_rule="all_done")
    def report() -> None:
        from b2b_onboarding.airflow import tasks

        tasks.report_run()

    # Runs whatever happened before it; retrying would not change its answer.
    @task(trigger_rule="all_done", retries=0)
    def check_sla() -> dict:
        from b2b_onboarding.airflow import tasks

        return tasks.check_sla()

    # The run's last task: red when any task failed for good (README, Runbook, "The run is red").
    @task(trigger_rule="all_done", retries=0, on_failure_callback=[])
    def all_tasks_succeeded() -> None:
        from b2b_onboarding.airflow import tasks

        tasks.all_tasks_succeeded()

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
    reported = report()
    [outcomes, customers, approved, rejected, drift] >> reported
    checked = check_sla()
    reported >> checked
    steps = [entities, outcomes, customer_chunks, customers, approve_chunks, reject_chunks, approved, rejected, drift]
    [*steps, reported, checked] >> all_tasks_succeeded()


b2b_outcome_reconciliation()
