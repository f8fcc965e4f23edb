"""The links into the Airflow UI: which DAG and task made a transition, and the UI's own routes."""

from __future__ import annotations

from pathlib import Path

import airflow
import pytest

from b2b_onboarding.airflow.ui import links
from b2b_onboarding.airflow.ui.links import RECONCILIATION_DAG_ID as NIGHT
from b2b_onboarding.airflow.ui.links import SYNC_DAG_ID as SYNC
from b2b_onboarding.airflow.ui.queries import STAGES


@pytest.mark.parametrize(
    ("from_stage", "to_stage", "step"),
    [
        (None, "pulled", (SYNC, "pull_prospects")),
        (None, "invalid", (SYNC, "pull_prospects")),
        ("invalid", "pulled", (SYNC, "pull_prospects")),  # a bad record fixed in Commerce
        ("pulled", "invalid", (SYNC, "pull_prospects")),
        ("invalid", "invalid", (SYNC, "pull_prospects")),  # another validation error
        ("pulled", "pulled", (SYNC, "push_leads")),  # a lead Sales refused, kept with its error
        ("pulled", "lead_open", (SYNC, "push_leads")),
        ("lead_open", "qualified", (NIGHT, "read_outcomes")),
        ("lead_open", "disqualified", (NIGHT, "read_outcomes")),
        ("qualified", "customers_created", (NIGHT, "write_customers")),
        ("customers_created", "won", (NIGHT, "read_outcomes")),
        ("qualified", "lost", (NIGHT, "read_outcomes")),
        ("won", "approved", (NIGHT, "approve_won")),
        ("lost", "rejected", (NIGHT, "reject_lost")),
        ("disqualified", "rejected", (NIGHT, "reject_lost")),
        # An error without a change of stage, where several tasks could have kept it: the run only.
        ("qualified", "qualified", (NIGHT, None)),
        ("lead_open", "lead_open", (NIGHT, None)),
        ("won", "won", (NIGHT, None)),
    ],
)
def test_each_transition_names_the_dag_and_task_that_made_it(from_stage, to_stage, step):
    assert links.step_of(from_stage, to_stage) == step


def test_every_task_named_is_a_task_of_its_dag(dags):
    stages = [None, "invalid", "pulled", "lead_open", "qualified", "customers_created", "disqualified", "won", "lost",
              "approved", "rejected"]  # fmt: skip
    named = {links.step_of(a, b) for a in stages for b in stages[1:]}
    for dag_id, task_id in named:
        if task_id:
            assert task_id in dags[dag_id].task_ids, f"{task_id} is not a task of {dag_id}"
            assert dags[dag_id].get_task(task_id).is_mapped == (task_id in links.MAPPED_TASKS), task_id


def test_run_ids_are_one_path_segment():
    url = links.run_url("", SYNC, "scheduled__2026-11-20T02:00:00+00:00")
    assert url == "/dags/b2b_prospect_sync/runs/scheduled__2026-11-20T02%3A00%3A00%2B00%3A00"
    assert links.run_url("/airflow", SYNC, "a/b?c#d") == "/airflow/dags/b2b_prospect_sync/runs/a%2Fb%3Fc%23d"
    assert links.task_url("", NIGHT, "r", "read_outcomes") == "/dags/b2b_outcome_reconciliation/runs/r/tasks/read_outcomes"
    assert links.task_url("", NIGHT, "r", "approve_won").endswith("/tasks/approve_won/mapped")
    assert links.run_links("", None, NIGHT, None)["run_url"] is None


def test_the_log_of_a_mapped_task_is_the_log_of_its_instance():
    base = "/dags/b2b_prospect_sync/runs/r/tasks"
    assert links.task_url("", SYNC, "r", "push_leads", 2) == f"{base}/push_leads/mapped/2"
    assert links.task_url("", SYNC, "r", "push_leads") == f"{base}/push_leads/mapped"  # which instance: unknown
    assert links.log_url("", SYNC, "r", "push_leads", 0, 3) == f"{base}/push_leads/mapped/0?try_number=3"
    assert links.log_url("", NIGHT, "r", "read_outcomes", -1, 1) == (
        "/dags/b2b_outcome_reconciliation/runs/r/tasks/read_outcomes?try_number=1")  # fmt: skip


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[4] / "dags"))
    return {dag_id: bag.get_dag(dag_id) for dag_id in links.DAG_IDS}


def test_each_waiting_stage_names_its_next_step_and_the_tasks_before_it_as_the_dags_wire_them(dags):
    """A prospect is held up by a failure of its next step, or of a task upstream of it (then the step
    does not run at all): both as the DAGs are wired."""
    assert set(links.NEXT_STEP) == set(STAGES) - {"approved", "rejected"}
    for dag_id, task_id in links.NEXT_STEP.values():
        upstream = dags[dag_id].get_task(task_id).get_flat_relative_ids(upstream=True)
        assert links.BEFORE_STEP[task_id] == upstream, task_id
    mapped = {task.task_id for dag in dags.values() for task in dag.tasks if task.is_mapped}
    assert mapped == links.MAPPED_TASKS


def test_the_routes_linked_to_are_routes_of_the_installed_airflow_ui():
    """The UI's router (in its bundle) has the run page, the task page, the mapped tasks page and the
    page of one mapped instance."""
    bundle = "".join(path.read_text(errors="ignore")
                     for path in (Path(airflow.__file__).parent / "ui" / "dist" / "assets").glob("index-*.js"))  # fmt: skip
    for route in ("dags/:dagId/runs/:runId", "dags/:dagId/runs/:runId/tasks/:taskId",
                  "dags/:dagId/runs/:runId/tasks/:taskId/mapped", "dags/:dagId/runs/:runId/tasks/:taskId/mapped/:mapIndex",
                  "dags/:dagId", "plugin/:page/*"):  # fmt: skip
        assert f"path:`{route}`" in bundle, route
