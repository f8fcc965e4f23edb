"""The DAG files: they import cleanly, stay light to parse, and wire the tasks the flow needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS.glob("*.py"))
HEAVY = ("pandas", "msal", "b2b_onboarding", "d365_fakes")


@pytest.fixture(scope="module")
def bag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports_without_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"b2b_prospect_sync", "b2b_outcome_reconciliation"}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda path: path.name)
def test_parsing_a_dag_file_imports_nothing_heavy(dag_file):
    probe = (
        "import json, runpy, sys; runpy.run_path(sys.argv[1]); "
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(dag_file)], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_sync_runs_every_15_minutes_and_maps_per_legal_entity_then_per_chunk(bag):
    dag = bag.get_dag("b2b_prospect_sync")
    assert dag.schedule == "*/15 * * * *" and dag.catchup is False
    assert set(dag.task_ids) == {"legal_entities", "pull_prospects", "plan_push", "push_leads", "report"}
    assert dag.get_task("push_leads").upstream_task_ids == {"plan_push"}
    assert "pull_prospects" in dag.get_task("plan_push").upstream_task_ids
    assert dag.params["chunk_size"] == 5000


def test_reconciliation_is_nightly_and_approves_only_after_customers_exist(bag):
    dag = bag.get_dag("b2b_outcome_reconciliation")
    assert dag.schedule == "0 2 * * *"
    assert {"read_outcomes", "write_customers", "approve_won", "reject_lost", "check_drift", "report"} <= set(
        dag.task_ids
    )
    assert dag.get_task("approve_won").upstream_task_ids == {"plan_approvals"}
    assert "write_customers" in dag.get_task("plan_approvals").upstream_task_ids
    assert "read_outcomes" in dag.get_task("plan_customers").upstream_task_ids
    assert {"approve_won", "reject_lost"} <= dag.get_task("check_drift").upstream_task_ids


def test_tasks_talking_to_a_system_use_its_pool_and_chunks_have_readable_names(bag):
    pools = json.loads((DAGS.parent / "plugins" / "b2b_onboarding" / "pools.json").read_text())
    expected = {
        "pull_prospects": "d365_commerce", "push_leads": "d365_sales", "read_outcomes": "d365_sales",
        "write_customers": "d365_commerce", "approve_won": "d365_commerce", "reject_lost": "d365_commerce",
        "check_drift": "d365_sales",
    }  # fmt: skip
    for dag in bag.dags.values():
        for task in dag.tasks:
            if task.task_id in expected:
                assert task.pool == expected[task.task_id] and task.pool in pools
    template = bag.get_dag("b2b_prospect_sync").get_task("push_leads").map_index_template
    assert "legal_entity" in template and "first_id" in template and "last_id" in template


def test_tasks_retry_and_runs_do_not_pile_up(bag):
    for dag in bag.dags.values():
        assert dag.max_active_runs == 1
        assert all(task.retries >= 1 for task in dag.tasks)
