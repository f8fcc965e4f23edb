"""The DAG files: they import cleanly, stay light to parse, and wire the tasks the flow needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from b2b_onboarding.airflow.params import run_params, task_failed
from b2b_onboarding.airflow.pools import POOLS_FILE

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS.glob("*.py"))
# What parsing must not load: the product's working modules (they import the libraries below), those
# libraries, and the fakes. Airflow itself imports httpx and SQLAlchemy, so a probe counts only what
# is loaded after `import airflow.sdk`, as in the DAG processor.
HEAVY = ("b2b_onboarding.airflow.tasks", "b2b_onboarding.flow", "b2b_onboarding.clients", "b2b_onboarding.store",
         "b2b_onboarding.domain", "pandas", "httpx", "msal", "sqlalchemy", "d365_fakes")  # fmt: skip


MODES = ("events", "time")
# What a DAG file may load of the product: the shared params, and the schedules with their triggers.
LIGHT = ("b2b_onboarding.airflow.params", "b2b_onboarding.airflow.schedules", "b2b_onboarding.airflow.triggers")
SCHEDULING = "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING"


def in_mode(mode: str) -> dict[str, str]:
    return {**os.environ, SCHEDULING: mode}


def loaded_by(dag_file: Path, already: str = "import airflow.sdk", mode: str = "events") -> list[str]:
    """The modules that running `dag_file` loads beyond those `already` did."""
    probe = (f"import json, runpy, sys; {already}; before = set(sys.modules); runpy.run_path(sys.argv[1]); "
             "print(json.dumps(sorted(set(sys.modules) - before)))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe, str(dag_file)], capture_output=True, text=True, check=True,
                            env=in_mode(mode))  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def heavy(modules: list[str]) -> list[str]:
    return [name for name in modules if any(name == part or name.startswith(part + ".") for part in HEAVY)]


@pytest.fixture(scope="module")
def bag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def parsed(monkeypatch, **options: str) -> dict:
    """The DAGs as a DAG processor with these `[d365_b2b_onboarding]` options parses them: dag id → DAG."""
    from airflow.dag_processing.dagbag import DagBag

    for name, value in options.items():
        monkeypatch.setenv(f"AIRFLOW__D365_B2B_ONBOARDING__{name.upper()}", value)
    found = DagBag(dag_folder=str(DAGS))
    assert found.import_errors == {}
    return found.dags


def test_every_dag_file_imports_without_errors(bag):
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation", "b2b_preflight"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda path: path.name)
def test_parsing_a_dag_file_imports_nothing_heavy(dag_file, mode):
    loaded = loaded_by(dag_file, mode=mode)
    assert heavy(loaded) == []
    assert set(name for name in loaded if name.startswith("b2b_onboarding")) <= set(LIGHT)
    assert "b2b_onboarding.airflow.params" in loaded


def test_the_schedules_module_imports_only_the_triggers_of_the_product_and_nothing_heavy(tmp_path):
    importer = tmp_path / "importer.py"
    importer.write_text("import b2b_onboarding.airflow.schedules\n")
    loaded = loaded_by(importer)
    assert heavy(loaded) == []
    product = [name for name in loaded if name.split(".")[0] == "b2b_onboarding"]
    assert sorted(product) == ["b2b_onboarding.airflow.schedules", "b2b_onboarding.airflow.triggers"]


def test_the_probe_sees_a_dag_file_that_imports_the_tasks_at_its_top(tmp_path):
    careless = tmp_path / "careless_dag.py"
    careless.write_text("from b2b_onboarding.airflow import tasks\n")
    assert {"b2b_onboarding.airflow.tasks", "b2b_onboarding.flow", "pandas", "msal"} <= set(heavy(loaded_by(careless)))


def test_the_shared_params_module_imports_only_airflows_param_and_the_standard_library(tmp_path):
    importer = tmp_path / "importer.py"
    importer.write_text("import b2b_onboarding.airflow.params\n")
    loaded = loaded_by(importer, already="from airflow.sdk import Param")
    not_standard = [name for name in loaded if name.split(".")[0] not in sys.stdlib_module_names]
    assert not_standard == ["b2b_onboarding.airflow.params"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda path: path.name)
def test_a_dag_file_parses_in_well_under_a_second_with_the_task_sdk_loaded(dag_file, mode):
    """As the DAG processor parses it: Airflow already imported, the file itself run (best of three)."""
    probe = (
        "import runpy, sys, time; import airflow.sdk; timings = []\n"
        "for _ in range(3):\n"
        "    started = time.perf_counter(); runpy.run_path(sys.argv[1]); timings.append(time.perf_counter() - started)\n"
        "print(min(timings))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(dag_file)], capture_output=True, text=True, check=True,
                            env=in_mode(mode))  # fmt: skip
    assert float(result.stdout.strip().splitlines()[-1]) < 0.2


def test_in_events_mode_asset_watchers_start_the_sync_and_the_outcomes(monkeypatch):
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from b2b_onboarding.airflow.triggers import PendingProspectsTrigger, SellerOutcomesTrigger

    dags = parsed(monkeypatch, poll_interval_s="12.5")
    sync = dags["b2b_prospect_sync"].schedule
    assert isinstance(sync, AssetOrTimeSchedule)
    assert sync.timetable == CronTriggerTimetable("0 * * * *", timezone="UTC")  # the hourly safety net
    assert sync.asset_condition.name == "b2b_pending_prospects"
    [watcher] = sync.asset_condition.watchers
    assert isinstance(watcher.trigger, PendingProspectsTrigger)
    assert watcher.trigger.serialize()[1] == {"commerce_conn_id": "d365_commerce", "state_conn_id": "d365_state",
                                              "poll_interval_s": 12.5}  # fmt: skip
    outcomes = dags["b2b_outcomes"].schedule
    assert isinstance(outcomes, Asset) and outcomes.name == "b2b_seller_outcomes"
    [watcher] = outcomes.watchers
    assert isinstance(watcher.trigger, SellerOutcomesTrigger) and watcher.trigger.poll_interval_s == 12.5
    assert dags["b2b_outcome_reconciliation"].schedule == "0 2 * * *"


def test_events_is_the_default_mode_and_looks_every_30_s(monkeypatch):
    monkeypatch.delenv(SCHEDULING, raising=False)
    monkeypatch.delenv("AIRFLOW__D365_B2B_ONBOARDING__POLL_INTERVAL_S", raising=False)
    dags = parsed(monkeypatch)
    assert dags["b2b_outcomes"].schedule.watchers[0].trigger.poll_interval_s == 30.0
    assert dags["b2b_prospect_sync"].schedule.asset_condition.watchers[0].trigger.poll_interval_s == 30.0


def test_in_time_mode_the_dags_run_on_their_crons(monkeypatch):
    dags = parsed(monkeypatch, scheduling="time")
    assert dags["b2b_prospect_sync"].schedule == dags["b2b_outcomes"].schedule == "*/15 * * * *"
    assert dags["b2b_outcome_reconciliation"].schedule == "0 2 * * *"
    dags = parsed(monkeypatch, scheduling="Time", sync_schedule="*/5 * * * *", outcomes_schedule="*/10 * * * *",
                  reconciliation_schedule="30 1 * * *")  # fmt: skip
    schedules = [dags[dag_id].schedule for dag_id in ("b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation")]
    assert schedules == ["*/5 * * * *", "*/10 * * * *", "30 1 * * *"]


@pytest.mark.parametrize("option, value, message", [
    ("scheduling", "cron", "[d365_b2b_onboarding] scheduling = 'cron' is not a scheduling mode: set it (airflow.cfg, "
                           "or AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING) to one of events, time."),
    ("poll_interval_s", "0", "[d365_b2b_onboarding] poll_interval_s = '0' is not a number of seconds above 0"),
])  # fmt: skip
def test_a_wrong_scheduling_option_fails_the_parse_naming_it(monkeypatch, option, value, message):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv(f"AIRFLOW__D365_B2B_ONBOARDING__{option.upper()}", value)
    errors = DagBag(dag_folder=str(DAGS)).import_errors
    assert {Path(path).name for path in errors} == {"b2b_prospect_sync.py", "b2b_outcomes.py"}
    assert all(message in error for error in errors.values())


def test_the_provider_declares_the_scheduling_options_with_their_defaults():
    from b2b_onboarding.airflow import schedules
    from b2b_onboarding.airflow.provider_info import get_provider_info

    options = get_provider_info()["config"]["d365_b2b_onboarding"]["options"]
    assert {name: option["default"] for name, option in options.items()} == {
        "scheduling": "events", "poll_interval_s": "30", "sync_schedule": schedules.DEFAULT_CRON,
        "outcomes_schedule": schedules.DEFAULT_CRON,
        "reconciliation_schedule": schedules.DEFAULT_RECONCILIATION_CRON,
    }  # fmt: skip


def test_sync_maps_per_legal_entity_then_per_chunk(bag):
    dag = bag.get_dag("b2b_prospect_sync")
    assert dag.catchup is False
    assert set(dag.task_ids) == {"legal_entities", "pull_prospects", "plan_push", "push_leads", "plan_corrections",
                                 "correct_leads", "report", "all_tasks_succeeded"}  # fmt: skip
    assert dag.get_task("push_leads").upstream_task_ids == {"plan_push"}
    assert dag.get_task("correct_leads").upstream_task_ids == {"plan_corrections"}
    assert "pull_prospects" in dag.get_task("plan_push").upstream_task_ids
    assert "pull_prospects" in dag.get_task("plan_corrections").upstream_task_ids  # corrections are pulled first
    assert {"push_leads", "correct_leads"} <= dag.get_task("report").upstream_task_ids
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


OUTCOME_TASKS = {"legal_entities", "read_outcomes", "plan_customers", "write_customers", "plan_approvals",
                 "approve_won", "plan_rejections", "reject_lost", "report", "all_tasks_succeeded"}  # fmt: skip


def test_the_outcome_dag_runs_the_reconciliations_steps_without_its_checks(bag):
    outcomes, nightly = bag.get_dag("b2b_outcomes"), bag.get_dag("b2b_outcome_reconciliation")
    assert set(outcomes.task_ids) == OUTCOME_TASKS and outcomes.catchup is False
    assert set(nightly.task_ids) == OUTCOME_TASKS | {"check_drift", "check_sla"}
    for task_id in OUTCOME_TASKS - {"report", "all_tasks_succeeded"}:
        mine, theirs = outcomes.get_task(task_id), nightly.get_task(task_id)
        assert mine.upstream_task_ids == theirs.upstream_task_ids, task_id
        assert (mine.pool, mine.trigger_rule, mine.python_callable.__name__) == (
            theirs.pool, theirs.trigger_rule, theirs.python_callable.__name__), task_id  # fmt: skip
    assert outcomes.get_task("report").upstream_task_ids == {"read_outcomes", "write_customers", "approve_won",
                                                             "reject_lost"}  # fmt: skip
    assert "b2b_outcome_reconciliation" in outcomes.doc_md and "b2b_seller_outcomes" in outcomes.doc_md


def test_tasks_talking_to_a_system_use_its_pool_and_chunks_have_readable_names(bag):
    pools = json.loads(POOLS_FILE.read_text())
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
        if dag.dag_id == "b2b_preflight":  # test_the_preflight_is_one_manual_task_that_is_its_run_s_verdict
            continue
        assert all(task.retries >= 1 for task in dag.tasks if task.task_id not in ("check_sla", "all_tasks_succeeded"))


def test_the_preflight_is_one_manual_task_that_is_its_run_s_verdict(bag):
    """Triggered by hand; its one task is the run's only leaf, so its failure (any ✗) turns the run
    red without a watcher. It neither retries (it would read the same tenant again) nor alerts
    (whoever triggered it reads its table)."""
    dag = bag.get_dag("b2b_preflight")
    assert dag.schedule is None and dag.max_active_runs == 1
    assert dag.task_ids == ["preflight"]
    task = dag.get_task("preflight")
    assert task.retries == 0 and not task.on_failure_callback and task.pool == "default_pool"


# The Trigger form: the same run params on both DAGs, each with a type, a title and a description, and
# each optional: its type admits null, which is what keeps Airflow's form from marking it "required".
COMMON_PARAMS = {"dry_run": ("boolean", False), "legal_entities": ("array", []), "prospect_ids": ("array", []),
                 "chunk_size": ("integer", 5000)}  # fmt: skip


@pytest.mark.parametrize("dag_id", ["b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation"])
def test_the_dags_take_the_run_params_with_a_title_and_a_description(bag, dag_id):
    params = bag.get_dag(dag_id).params
    expected = {**COMMON_PARAMS, **({"qualified_without_opportunity_days": ("number", 2)}
                                    if dag_id != "b2b_prospect_sync" else {}),
                **({"sla_days": ("integer", 3)} if dag_id == "b2b_outcome_reconciliation" else {})}  # fmt: skip
    assert set(params.keys()) == set(expected)
    for name, (kind, default) in expected.items():
        param = params.get_param(name)
        assert param.schema["type"] == ["null", kind] and param.value == default, name
        assert param.schema.get("title") and len(param.description or "") > 20, name
    assert params.get_param("prospect_ids").schema["items"]["pattern"] == "^[^/]+/.+$"


def test_both_dags_take_the_shared_run_params_as_values_and_a_run_of_one_leaves_the_other_alone(bag):
    """One definition (params.run_params) for both Trigger forms; each DAG holds its own Param objects,
    since a run's values are kept in them."""
    sync, reconcile = (bag.get_dag(dag_id).params for dag_id in ("b2b_prospect_sync", "b2b_outcome_reconciliation"))
    for name, param in run_params().items():
        assert sync.get_param(name).dump() == reconcile.get_param(name).dump() == param.dump(), name
        assert sync.get_param(name) is not reconcile.get_param(name), name
    try:
        sync["dry_run"] = True
        assert reconcile["dry_run"] is False and run_params()["dry_run"].value is False
    finally:
        sync["dry_run"] = False


@pytest.mark.parametrize("conf", [{"prospect_ids": ["P-000123"]}, {"dry_run": "yes"}, {"legal_entities": "usrt"},
                                  {"chunk_size": 0}])  # fmt: skip
def test_the_trigger_form_refuses_malformed_params(bag, conf):
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(bag.get_dag("b2b_prospect_sync").params)
    with pytest.raises(ParamValidationError):
        params.update(conf)
    params.update({"prospect_ids": ["usrt/P-000123", "usmf/P/with/slashes"], "legal_entities": ["usrt"],
                   "dry_run": True})  # fmt: skip
    assert params.validate()["prospect_ids"] == ["usrt/P-000123", "usmf/P/with/slashes"]


def test_every_task_reports_its_failure_through_the_product_callback(bag):
    for dag in bag.dags.values():
        if dag.dag_id == "b2b_preflight":  # test_the_preflight_is_one_manual_task_that_is_its_run_s_verdict
            continue
        for task in dag.tasks:
            if task.task_id == "all_tasks_succeeded":  # it names the failures the others reported: no second alert
                assert not task.on_failure_callback
                continue
            callbacks = task.on_failure_callback if isinstance(task.on_failure_callback, list) else [task.on_failure_callback]
            assert callbacks == [task_failed], (dag.dag_id, task.task_id)


def test_the_sla_check_runs_after_the_report_whatever_failed_and_never_retries(bag):
    dag = bag.get_dag("b2b_outcome_reconciliation")
    check = dag.get_task("check_sla")
    assert check.upstream_task_ids == {"report"} and check.downstream_task_ids == {"all_tasks_succeeded"}
    assert check.trigger_rule == "all_done" and check.retries == 0


@pytest.mark.parametrize("dag_id", ["b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation"])
def test_the_run_state_is_the_verdict_of_a_last_task_that_sees_every_other_task(bag, dag_id):
    """Airflow sets a run's state from its leaf tasks; `report` and `check_sla` run whatever failed
    before them, so they must not be leaves: the only leaf is the watcher, directly downstream of
    every task (its trigger rule sees only direct upstreams), running whatever happened."""
    dag = bag.get_dag(dag_id)
    watcher = dag.get_task("all_tasks_succeeded")
    assert [task.task_id for task in dag.tasks if not task.downstream_task_ids] == ["all_tasks_succeeded"]
    assert watcher.upstream_task_ids == set(dag.task_ids) - {"all_tasks_succeeded"}
    assert watcher.trigger_rule == "all_done" and watcher.retries == 0
    assert dag.get_task("report").trigger_rule == "all_done"
