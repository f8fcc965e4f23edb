"""How a task fails: its one line first and whole, at once when retrying cannot help, and the
always-run tasks (`report`, the run's verdict `all_tasks_succeeded`) working with whatever their
upstream left: failed, missing or partial.

The fakes refuse credentials as Entra ID does (a multi-line AADSTS description); Airflow's task
context is the one seam replaced here, with the task states Airflow's execution API would answer.
"""

from __future__ import annotations

import json
import logging
import uuid
from types import SimpleNamespace

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException
from pydantic import SecretStr

from b2b_onboarding.airflow import notifier as notify
from b2b_onboarding.airflow import tasks
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import AuthenticationError, ConfigurationError, D365Error, cures_itself, first_line
from b2b_onboarding.store.state import StateStore

RUN_ID = "scheduled__2026-12-07T02:00:00+00:00"
SYNC_TASKS = ["legal_entities", "pull_prospects", "plan_push", "push_leads", "plan_corrections", "correct_leads",
              "report", "all_tasks_succeeded"]  # fmt: skip


# --- the one line ----------------------------------------------------------------------------------


def test_a_refused_secret_fails_in_one_whole_line_naming_the_connection_status_and_next_step(world, admin):
    wrong = "wrong-" + uuid.uuid4().hex
    settings = world.settings(world.endpoints.dataverse).model_copy(update={"client_secret": SecretStr(wrong)})
    client = SalesClient.connect(settings)
    with client.odata, pytest.raises(AuthenticationError) as refused:
        client.whoami()

    line = str(refused.value)
    assert "\n" not in line and "\r" not in line  # Entra ID's description spans four lines; the failure is one
    assert line.startswith("Dataverse (Sales) via Airflow connection 'd365_test': Entra ID (")
    assert "with HTTP 401 invalid_client. Next step: check the connection's client id" in line
    # whole: the description's later lines (trace and correlation ids, for Microsoft's support) are kept
    assert "AADSTS7000215" in line and "Correlation ID: " in line and "Timestamp: " in line
    assert wrong not in line
    assert not cures_itself(refused.value)


def test_a_multi_line_service_message_stays_whole_on_the_first_line():
    error = D365Error(system="Commerce headquarters", operation="create customer", status=400, code="E1",
                      record="usrt/P-1", connection="d365_commerce",
                      message="Write failed for table row of type 'CustTable'.\r\nInfolog: Field 'Name' must be\n"
                              "filled in.\n\n  Update has been canceled.")  # fmt: skip
    assert str(error) == (
        "Commerce headquarters via Airflow connection 'd365_commerce': create customer for usrt/P-1 failed with HTTP "
        "400 E1: Write failed for table row of type 'CustTable'. Infolog: Field 'Name' must be filled in. Update has "
        "been canceled. Next step: fix the record or the request named above; the record is kept and retried on the "
        "next run."
    )
    assert first_line(error) == str(error)
    assert first_line(ValueError("first\nsecond")) == "ValueError: first"


@pytest.mark.parametrize(
    ("error", "curable"),
    [
        (AuthenticationError("refused"), False),
        (AuthenticationError("Entra ID unavailable", transient=True), True),
        (ConfigurationError("no legal entities"), False),
        (D365Error(system="Dataverse", operation="UpsertMultiple", status=403, message="no prvCreateLead"), False),
        (D365Error(system="Dataverse", operation="UpsertMultiple", status=401, message="still refused"), False),
        (D365Error(system="Dataverse", operation="UpsertMultiple", status=503, message="busy"), True),
        (D365Error(system="Dataverse", operation="UpsertMultiple", status=429, message="throttled"), True),
        (D365Error(system="Dataverse", operation="UpsertMultiple", status=0, message="connection reset"), True),
        (OSError("disk full"), True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_a_task_fails_at_once_only_when_retrying_cannot_help_and_logs_its_line_first(error, curable, caplog):
    @tasks.fails_clearly
    def step() -> None:
        raise error

    with caplog.at_level(logging.ERROR, logger=tasks.__name__), pytest.raises(Exception) as failed:
        step()

    logged = [record.getMessage() for record in caplog.records if record.name == tasks.__name__]
    assert logged and logged[0].startswith(first_line(error))
    if curable:
        assert failed.value is error  # Airflow retries it
    else:
        assert isinstance(failed.value, AirflowFailException) and failed.value.__cause__ is error
        assert str(failed.value) == first_line(error)
        assert logged[0].endswith("Not retried: this cannot cure itself.")


def test_the_alert_names_the_products_error_not_airflows_wrapper():
    cause = AuthenticationError("Dynamics 365 Sales (Airflow connection 'd365_sales'): refused")
    try:
        try:
            raise cause
        except AuthenticationError as error:
            raise AirflowFailException(str(error)) from error
    except AirflowFailException as wrapped:
        failure = notify.failure_of({"exception": wrapped, "ti": SimpleNamespace(dag_id="d", run_id="r", task_id="t",
                                                                                 map_index=-1, try_number=1)})  # fmt: skip
    assert failure.error_type == "AuthenticationError"
    assert failure.line().endswith("AuthenticationError: Dynamics 365 Sales (Airflow connection 'd365_sales'): refused")


# --- the always-run tasks ----------------------------------------------------------------------------


class FakeTaskInstance(SimpleNamespace):
    """What the tasks read of Airflow's task instance: its identity, and the run's task states as
    the execution API answers them (`task_id_mapindex` for a mapped instance)."""

    def get_task_states(self, dag_id: str, run_ids: list[str]) -> dict:
        assert dag_id == self.dag_id and run_ids == [self.run_id]
        return {self.run_id: self.states}


@pytest.fixture
def state(monkeypatch, tmp_path) -> StateStore:
    path = tmp_path / "state.db"
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "generic", "schema": str(path),
                                                              "extra": {"driver": "sqlite"}}))  # fmt: skip
    return StateStore(f"sqlite:///{path}")


def in_task(monkeypatch, task_id: str, states: dict, task_ids: list[str] = SYNC_TASKS) -> None:
    ti = FakeTaskInstance(dag_id="b2b_prospect_sync", run_id=RUN_ID, task_id=task_id, map_index=-1, states=states)
    context = {"ti": ti, "dag": SimpleNamespace(task_ids=task_ids), "run_id": RUN_ID, "params": {}}
    monkeypatch.setattr(tasks, "_context", lambda: context)


def pulled(legal_entity: str, count: int) -> dict:
    return {"step": "pull", "legal_entity": legal_entity, "pulled": count, "new": count, "commerce_requests": 2}


def test_report_with_a_failed_upstream_reports_what_ran_and_names_what_is_missing(state, monkeypatch, caplog):
    """The bad-secret night: Commerce pulled, every push failed on Sales' credentials."""
    state.record_step_result(dag_id="b2b_prospect_sync", run_id=RUN_ID, task_id="pull_prospects", map_index=0,
                             result=pulled("usrt", 3), dry_run=False)  # fmt: skip
    state.record_task_failure(dag_id="b2b_prospect_sync", run_id=RUN_ID, task_id="push_leads", map_index=0,
                              try_number=1, error="AuthenticationError: Dynamics 365 Sales (Airflow connection "
                              "'d365_sales'): refused\nmore detail")  # fmt: skip
    states = {"legal_entities": "success", "pull_prospects_0": "success", "plan_push": "success",
              "push_leads_0": "failed", "push_leads_1": "failed", "plan_corrections": "success",
              "correct_leads": "skipped", "report": "running", "all_tasks_succeeded": None}  # fmt: skip
    in_task(monkeypatch, "report", states)

    with caplog.at_level(logging.INFO, logger=tasks.__name__):
        tasks.report_run()

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "pulled 3" in text  # what did run is reported
    assert ("push_leads (2 of 2 mapped) failed: AuthenticationError: Dynamics 365 Sales (Airflow connection "
            "'d365_sales'): refused") in text  # fmt: skip
    assert "correct_leads" not in text.split("Missing from this report")[1]  # skipped: nothing to do, not missing


def test_report_with_nothing_upstream_says_so_instead_of_crashing(state, monkeypatch, caplog):
    states = {"legal_entities": "failed", "pull_prospects": "upstream_failed", "plan_push": "upstream_failed",
              "push_leads": "upstream_failed", "plan_corrections": "upstream_failed",
              "correct_leads": "upstream_failed", "report": "running"}  # fmt: skip
    in_task(monkeypatch, "report", states)
    with caplog.at_level(logging.INFO, logger=tasks.__name__):
        tasks.report_run()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "legal_entities failed: no failure recorded; read the task's log" in text
    assert "push_leads did not run: a task it depends on failed" in text


def test_a_partial_mapped_step_counts_its_failed_chunks_among_its_instances():
    states = {"push_leads_0": "success", "push_leads_1": "failed", "push_leads_2": "upstream_failed",
              "push_leads_3": "success", "plan_push": "success"}  # fmt: skip
    no_failures = pd.DataFrame(columns=["task_id", "error"])
    assert tasks.missing_results(states, SYNC_TASKS, no_failures) == [
        "push_leads (2 of 4 mapped) failed: no failure recorded; read the task's log"
    ]
    # a task id that itself ends in _<digits> is not taken for a mapped instance
    assert tasks.missing_results({"step_2": "failed"}, ["step_2"], no_failures) == [
        "step_2 failed: no failure recorded; read the task's log"
    ]


def test_the_run_verdict_fails_naming_each_failed_task_and_passes_when_all_succeeded(state, monkeypatch):
    state.record_task_failure(dag_id="b2b_prospect_sync", run_id=RUN_ID, task_id="pull_prospects", map_index=1,
                              try_number=3, error="D365Error: Commerce headquarters (Airflow connection "
                              "'d365_commerce'): read prospects failed after 5 attempts with HTTP 503")  # fmt: skip
    failed = {"legal_entities": "success", "pull_prospects_0": "success", "pull_prospects_1": "failed",
              "plan_push": "upstream_failed", "push_leads": "upstream_failed", "plan_corrections": "upstream_failed",
              "correct_leads": "upstream_failed", "report": "success", "all_tasks_succeeded": "running"}  # fmt: skip
    in_task(monkeypatch, "all_tasks_succeeded", failed)
    with pytest.raises(tasks.RunFailed) as verdict:
        tasks.all_tasks_succeeded()
    message = str(verdict.value)
    assert message.startswith("This run failed: 1 tasks failed for good, 4 did not run because of them. Next step: "
                              "README, Runbook, \"The run is red\".")  # fmt: skip
    assert "pull_prospects (1 of 2 mapped) failed: D365Error: Commerce headquarters (Airflow connection " in message
    assert isinstance(verdict.value, SystemExit)  # Airflow logs it as "Task exited", without a traceback

    fine = {"legal_entities": "success", "pull_prospects_0": "success", "plan_push": "success",
            "push_leads": "skipped", "plan_corrections": "success", "correct_leads": "skipped", "report": "success",
            "all_tasks_succeeded": "running"}  # fmt: skip
    in_task(monkeypatch, "all_tasks_succeeded", fine)
    assert tasks.all_tasks_succeeded() is None
