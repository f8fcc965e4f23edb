"""Failure visibility end to end: the nightly reconciliation's `check_sla` fails (here, with
`sla_days` 0, every undecided prospect is late), and the DAGs' on_failure_callback logs one line,
records the failure in the state store and alerts through the connection `b2b_alerts`: an email
received by a local SMTP server, then a webhook received by a local HTTP server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from b2b_onboarding.store.state import StateStore
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import prospects

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "b2b_onboarding"))
from alert_receivers import smtp_connection, smtp_receiver, webhook_connection, webhook_receiver  # noqa: E402

pytestmark = pytest.mark.e2e


def reconcile(dags, **conf):
    """A reconciliation with `conf` over the params' defaults, every param given: Airflow 3.3's
    in-process `dag.test()` keeps a run's conf in the DAG object's params for the next run."""
    return dags.get_dag("b2b_outcome_reconciliation").test(run_conf={
        "dry_run": False, "legal_entities": [], "prospect_ids": [], "chunk_size": 5000, "sla_days": 3, **conf})


@pytest.fixture(scope="module")
def synced(world, dags):
    """A fresh store and 10 prospects pulled and pushed: 8 undecided leads, 2 bad records."""
    for path in world.state_db.parent.glob(world.state_db.name + "*"):
        path.unlink()
    with FakeAdmin(world.endpoints) as admin:
        admin.reset()
        admin.seed_prospects(prospects(10)[0])
    assert dags.get_dag("b2b_prospect_sync").test().state == "success"
    return StateStore(f"sqlite:///{world.state_db}")


def failed_tasks(dag_run) -> list[str]:
    return sorted(ti.task_id for ti in dag_run.get_task_instances() if ti.state == "failed")


def test_an_sla_breach_fails_the_last_task_and_is_emailed_and_recorded(synced, dags, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="b2b_onboarding")
    with smtp_receiver() as inbox:
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", smtp_connection(inbox, ["oncall@contoso.example"]))
        dag_run = reconcile(dags, sla_days=0)
    # the run is red through its last task, which names check_sla (and sends no second alert)
    assert dag_run.state == "failed" and failed_tasks(dag_run) == ["all_tasks_succeeded", "check_sla"]

    logged = caplog.text
    lines = [line for line in logged.splitlines() if "TASK FAILED" in line]
    assert len(lines) == 1, lines
    assert "This run failed: 1 tasks failed for good, 0 did not run because of them." in logged
    assert "check_sla failed: SlaBreached: SLA check failed: 8 prospects pending" in logged
    assert (f"TASK FAILED b2b_outcome_reconciliation.check_sla run {dag_run.run_id} try 1, no retries left: "
            "SlaBreached: SLA check failed: 8 prospects pending") in lines[0]
    assert "Traceback" not in logged  # an expected check's failure, not a crash
    assert logged.count("Pending longer than 0 days (first 8 of 8):") == 1  # the table, once, in the task's log

    failures = synced.task_failures("b2b_outcome_reconciliation", dag_run.run_id).to_dict("records")
    assert [(row["task_id"], row["map_index"], row["try_number"]) for row in failures] == [("check_sla", -1, 1)]
    assert failures[0]["error"].startswith("SlaBreached: SLA check failed: 8 prospects pending")
    assert "\n" not in failures[0]["error"]  # its one line; the table is in the task's log

    assert len(inbox.mails) == 1
    mail = inbox.mails[0]
    assert mail.recipients == ["oncall@contoso.example"]
    assert mail.subject == "[B2B onboarding] b2b_outcome_reconciliation.check_sla failed: SlaBreached"
    assert dag_run.run_id in mail.html and "8 prospects pending" in mail.html


def test_the_same_failure_is_posted_to_a_webhook_and_a_dry_run_only_lists_the_breach(synced, dags, monkeypatch):
    with webhook_receiver() as hook:
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", webhook_connection(hook))
        dag_run = reconcile(dags, sla_days=0)
        assert dag_run.state == "failed" and failed_tasks(dag_run) == ["all_tasks_succeeded", "check_sla"]
        assert len(hook.posts) == 1
        body = hook.posts[0].body
        assert (body["dag_id"], body["task_id"], body["run_id"], body["error_type"]) == (
            "b2b_outcome_reconciliation", "check_sla", dag_run.run_id, "SlaBreached")  # fmt: skip
        assert body["text"].startswith("TASK FAILED b2b_outcome_reconciliation.check_sla")

        dry = reconcile(dags, sla_days=0, dry_run=True)
        assert dry.state == "success" and len(hook.posts) == 1

        met = reconcile(dags)  # the default SLA: 3 days
        assert met.state == "success" and len(hook.posts) == 1
    assert len(synced.task_failures("b2b_outcome_reconciliation")) == 2
