"""Both DAGs triggered with `{"dry_run": true}` (as `airflow dags test <dag> -c '{"dry_run": true}'`
does, through `dag.test(run_conf=...)`) against the fakes: nothing is written to Commerce or Sales
(the fakes' write counts), the store's prospects do not change, and the plan lists the writes the
real run then makes. Then a targeted rerun of a bad record fixed in HQ."""

from __future__ import annotations

import copy
import logging
from collections import Counter

import pytest

from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk, Seller
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import PLANNED_WRITE_TABLES, play_sellers, prospects, total_writes

pytestmark = pytest.mark.e2e



# Each DAG's params as declared, taken before its first run in this module.
DEFAULTS: dict[str, dict] = {}


def defaults(dag) -> dict:
    return {name: copy.deepcopy(param.value) for name, param in dag.params.items()}


def run(dags, dag_id: str, **conf):
    """One run with `conf` over the params' defaults, every param given: Airflow 3.3's in-process
    `dag.test()` keeps a run's conf in the DAG object's params for the next run of that object."""
    dag = dags.get_dag(dag_id)
    dag_run = dag.test(run_conf={**DEFAULTS.setdefault(dag_id, defaults(dag)), **conf})
    assert dag_run.state == "success", f"{dag_id} ended {dag_run.state}"
    return dag_run



def writes(admin: FakeAdmin) -> Counter:
    counts = admin.counts()
    return Counter({(system, name): n for system in ("commerce", "dataverse")
                    for name, n in counts[system]["writes"].items() if n})  # fmt: skip


def planned(plan) -> Counter:
    return Counter(PLANNED_WRITE_TABLES[operation] for operation in plan["operation"])


def prospect_rows(world) -> list[dict]:
    frame = StateStore(f"sqlite:///{world.state_db}").frame()
    return sorted(map(repr, frame.to_dict("records")))


def test_a_dry_run_of_each_dag_writes_nothing_and_plans_the_writes_the_real_run_then_makes(world, dags, caplog):
    caplog.set_level(logging.INFO, logger="b2b_onboarding")
    seeded, plan = prospects(20)
    for path in world.state_db.parent.glob(world.state_db.name + "*"):
        path.unlink()
    store = StateStore(f"sqlite:///{world.state_db}")
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    with FakeAdmin(world.endpoints) as admin:
        admin.reset()
        admin.seed_prospects(seeded)

        before = writes(admin)
        dry = run(dags, "b2b_prospect_sync", dry_run=True)
        assert writes(admin) == before and total_writes(admin.counts()) == 0
        assert store.frame().empty, "a dry run tracked prospects"
        sync_plan = store.planned_writes(dry.run_id)
        assert Counter(sync_plan["operation"]) == {"create lead": 18}  # 20 prospects, 2 bad records
        assert set(sync_plan["legal_entity"]) == {"usrt", "usmf"}
        logged = caplog.text
        assert "DRY RUN: the writes this task would make (9; none was sent)" in logged
        assert "DRY RUN: 18 writes planned, none sent" in logged

        run(dags, "b2b_prospect_sync")
        assert writes(admin) - before == planned(sync_plan)

        play_sellers(seller, plan)
        before, emails, tracked = writes(admin), len(admin.outbox()), prospect_rows(world)
        dry = run(dags, "b2b_outcome_reconciliation", dry_run=True)
        assert writes(admin) == before and len(admin.outbox()) == emails
        assert prospect_rows(world) == tracked, "a dry run changed the store's prospects"
        reconcile_plan = store.planned_writes(dry.run_id)
        operations = Counter(reconcile_plan["operation"])
        assert operations["approve prospect"] == operations["create customer hierarchy"] > 0
        assert operations["reject prospect"] > 0 and operations["create Person customer"] > 0

        run(dags, "b2b_outcome_reconciliation")
        assert writes(admin) - before == planned(reconcile_plan)
        assert len(admin.outbox()) - emails == operations["approve prospect"] + operations["reject prospect"]

        again = run(dags, "b2b_outcome_reconciliation", dry_run=True)
        assert store.planned_writes(again.run_id).empty
    seller.close()


def test_a_targeted_rerun_pulls_a_bad_record_fixed_in_hq_and_touches_nothing_else(world, dags):
    """usmf/P-000002 was kept as a bad record (an invalid email); a clerk fixes it in HQ."""
    store = StateStore(f"sqlite:///{world.state_db}")
    row = store.frame().set_index(["legal_entity", "prospect_id"]).loc[("usmf", "P-000002")]
    assert row["stage"] == "invalid" and "PrimaryEmailAddress" in row["last_error"]
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    clerk.call("PATCH", "Prospects(dataAreaId='usmf',ProspectId='P-000002')", params={"cross-company": "true"},
               json={"PrimaryEmailAddress": "fixed.partner@example.com"})  # fmt: skip
    clerk.close()
    with FakeAdmin(world.endpoints) as admin:
        before = writes(admin)
        dry = run(dags, "b2b_prospect_sync", dry_run=True, prospect_ids=["usmf/P-000002"])
        assert writes(admin) == before
        plan = store.planned_writes(dry.run_id)
        assert list(zip(plan["operation"], plan["legal_entity"], plan["prospect_id"])) == [
            ("create lead", "usmf", "P-000002")]  # fmt: skip

        targeted = run(dags, "b2b_prospect_sync", prospect_ids=["usmf/P-000002"])
        assert writes(admin) - before == {("dataverse", "leads"): 1}
    pulls = [ti for ti in targeted.get_task_instances() if ti.task_id == "pull_prospects"]
    assert len(pulls) == 1 and pulls[0].rendered_map_index == "usmf"  # only the named prospect's legal entity
    assert store.frame().set_index(["legal_entity", "prospect_id"]).loc[("usmf", "P-000002"), "stage"] == "lead_open"
