"""Both DAGs, run by Airflow (`dag.test()`), against the fakes over real MSAL, TLS and OData."""

from __future__ import annotations

import pytest

from b2b_onboarding.store import StateStore
from d365_fakes.actors import Seller
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import observe, play_sellers, prospects, total_writes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors
    return bag


def run(dags, dag_id: str) -> None:
    dag_run = dags.get_dag(dag_id).test()
    assert dag_run.state == "success", f"{dag_id} ended {dag_run.state}"


def test_prospects_become_leads_then_decisions_reach_commerce_exactly_once(world, dags):
    seeded, plan = prospects(30)
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    with FakeAdmin(world.endpoints) as admin:
        admin.seed_prospects(seeded)

        run(dags, "b2b_prospect_sync")
        valid = [row for row in seeded if plan[row["PrimaryEmailAddress"]] != "invalid"]
        leads = seller.view("All Commerce B2B leads")
        assert len(leads) == len(valid)
        assert len({lead["msdyn_prospectid"] for lead in leads}) == len(valid)
        assert seller.view("My open leads") == []  # owned by the integration's app user, not the seller
        owners = {lead["_ownerid_value"] for lead in leads}
        integration_user = seller.rows("systemusers", {
            "$filter": f"applicationid eq '{world.cast.integration['client_id']}'"})[0]["systemuserid"]  # fmt: skip
        assert owners == {integration_user}

        play_sellers(seller, plan)
        run(dags, "b2b_outcome_reconciliation")
        outcome = observe(world.endpoints, world.cast, plan)
        wrong = [row for row in outcome.rows if not row["ok"]]
        assert not wrong, wrong
        assert outcome.ok
        decided = sum(row["expected"] != "Pending" for row in outcome.rows)
        assert outcome.emails == decided > 0

        before = total_writes(admin.counts())
        run(dags, "b2b_prospect_sync")
        run(dags, "b2b_outcome_reconciliation")
        assert total_writes(admin.counts()) == before, "a second run wrote again"
        assert observe(world.endpoints, world.cast, plan).rows == outcome.rows
    seller.close()

    store = StateStore(f"sqlite:///{world.state_db}")
    tracked = store.frame().set_index(["legal_entity", "prospect_id"])
    for row in outcome.rows:
        stage = tracked.loc[(row["legal_entity"], row["prospect_id"]), "stage"]
        expected = {"won": "approved", "lost": "rejected", "disqualified": "rejected", "qualified":
                    "customers_created", "untouched": "lead_open", "invalid": "invalid"}[row["plan"]]  # fmt: skip
        assert stage == expected, (row, stage)
    won = next(row for row in outcome.rows if row["plan"] == "won")
    history = store.history(won["legal_entity"], won["prospect_id"])
    assert list(history["to_stage"]) == ["pulled", "lead_open", "qualified", "won", "approved"]
    assert history["run_id"].str.startswith("manual__").all()
