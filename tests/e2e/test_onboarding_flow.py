"""Both DAGs, run by Airflow (`dag.test()`), against the fakes over real MSAL, TLS and OData."""

from __future__ import annotations

from collections import Counter

import pytest

from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import observe, play_sellers, prospects, total_writes

pytestmark = pytest.mark.e2e


def run(dags, dag_id: str, **conf):
    dag_run = dags.get_dag(dag_id).test(run_conf=conf or None)
    assert dag_run.state == "success", f"{dag_id} ended {dag_run.state}"
    return dag_run


def test_prospects_become_leads_then_decisions_reach_commerce_exactly_once(world, dags):
    seeded, plan = prospects(30)
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    with FakeAdmin(world.endpoints) as admin:
        admin.seed_prospects(seeded)

        sync_run = run(dags, "b2b_prospect_sync")
        # Each step task recorded what it did under its own task instance (the run history, the report),
        # and so did each transition it wrote (a timeline links to that task's own log).
        store = StateStore(f"sqlite:///{world.state_db}")
        recorded = store.step_results("b2b_prospect_sync", [sync_run.run_id])
        pulls = recorded[recorded["task_id"] == "pull_prospects"]
        assert sorted(pulls["map_index"]) == list(range(len(pulls))) and len(pulls) >= 1
        assert sum(result["pulled"] for result in pulls["result"]) == len(seeded)
        assert not recorded["dry_run"].any()
        first = store.history(seeded[0]["dataAreaId"].lower(), seeded[0]["ProspectId"]).iloc[0]
        assert (first["dag_id"], first["task_id"], first["map_index"] >= 0) == ("b2b_prospect_sync", "pull_prospects", True)
        valid = [row for row in seeded if plan[row["PrimaryEmailAddress"]] != "invalid"]
        leads = seller.view("All Commerce B2B leads")
        assert len(leads) == len(valid)
        assert len({(lead["_msdyn_company_value"], lead["msdyn_prospectid"]) for lead in leads}) == len(valid)
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


def test_a_lost_state_store_is_rebuilt_from_the_systems_without_writing(world, dags):
    """The state store is a cache: losing it costs reads, never a duplicate or a second email."""
    def pending_stages():
        frame = StateStore(f"sqlite:///{world.state_db}").frame()
        frame = frame[frame["decision"].isna()]  # decided prospects are no longer Pending in Commerce
        return dict(zip(frame["legal_entity"] + "/" + frame["prospect_id"], frame["stage"]))

    expected = pending_stages()
    assert set(expected.values()) == {"lead_open", "customers_created", "invalid"}
    with FakeAdmin(world.endpoints) as admin:
        before, emails = total_writes(admin.counts()), len(admin.outbox())
        for suffix in ("", "-wal", "-shm"):
            world.state_db.with_name(world.state_db.name + suffix).unlink(missing_ok=True)
        run(dags, "b2b_prospect_sync")
        run(dags, "b2b_outcome_reconciliation")
        assert total_writes(admin.counts()) == before
        assert len(admin.outbox()) == emails
    assert pending_stages() == expected


def test_a_prospect_decided_by_hand_in_commerce_is_reported_never_flipped(world, dags):
    from d365_fakes.actors import Clerk

    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    lead = next(lead for lead in seller.view("My open leads") + seller.view("All Commerce B2B leads")
                if lead["statecode"] == 0)  # fmt: skip
    legal_entity = next(code for code in ("usrt", "usmf") if company_id(code) == lead["_msdyn_company_value"])
    prospect_id = lead["msdyn_prospectid"]
    clerk.set_status(legal_entity, prospect_id, "Approved")
    seller.disqualify(lead["leadid"])
    with FakeAdmin(world.endpoints) as admin:
        dag_run = dags.get_dag("b2b_outcome_reconciliation").test()
        # The open anomaly fails the nightly SLA check and nothing else, and so the run (its last task).
        assert dag_run.state == "failed"
        failed = {ti.task_id for ti in dag_run.get_task_instances() if ti.state == "failed"}
        assert failed == {"check_sla", "all_tasks_succeeded"}
        mails = [mail for mail in admin.outbox() if (mail["dataAreaId"], mail["ProspectId"]) == (legal_entity, prospect_id)]
    assert [mail["template"] for mail in mails] == ["B2B prospect approved"]  # the clerk's, and no rejection
    prospect = clerk.call("GET", f"Prospects(dataAreaId='{legal_entity}',ProspectId='{prospect_id}')",
                          params={"cross-company": "true"}).json()  # fmt: skip
    assert prospect["B2BProspectStatus"] == "Approved"
    row = StateStore(f"sqlite:///{world.state_db}").frame().set_index(["legal_entity", "prospect_id"]).loc[(legal_entity, prospect_id)]
    assert row["last_error"].startswith("conflict: ") and "Rejected" in row["last_error"]
    assert row["decision"] is None
    clerk.close()
    seller.close()


def test_many_small_mapped_chunks_end_in_the_same_state_as_one_task_per_step(world, dags):
    def flow(chunk_size: int) -> tuple[list[dict], dict]:
        for path in world.state_db.parent.glob(world.state_db.name + "*"):
            path.unlink()  # a new store: no tracked prospects, no delta links
        with FakeAdmin(world.endpoints) as admin:
            admin.reset()
            seeded, plan = prospects(24)
            admin.seed_prospects(seeded)
            sync_run = run(dags, "b2b_prospect_sync", chunk_size=chunk_size)
            decided = admin.decide([{"msdyn_prospectid": f"{row['dataAreaId']}:{row['ProspectId']}", "outcome": outcome}
                                    for row in seeded if (outcome := plan[row["PrimaryEmailAddress"]])
                                    in ("won", "lost", "disqualified", "qualified")])  # fmt: skip
            assert decided["errors"] == []
            reconcile_run = run(dags, "b2b_outcome_reconciliation", chunk_size=chunk_size)
            outcome = observe(world.endpoints, world.cast, plan)
        mapped = {run.dag_id: Counter(ti.task_id for ti in run.get_task_instances() if ti.map_index >= 0)
                  for run in (sync_run, reconcile_run)}  # fmt: skip
        return sorted(outcome.rows, key=lambda row: (row["legal_entity"], row["prospect_id"])), mapped

    small_rows, small_mapped = flow(chunk_size=3)
    one_rows, one_mapped = flow(chunk_size=5000)
    assert small_rows == one_rows and all(row["ok"] for row in one_rows)
    assert small_mapped["b2b_prospect_sync"]["push_leads"] == 8  # 11 valid prospects per legal entity, 3 a chunk
    assert one_mapped["b2b_prospect_sync"]["push_leads"] == 2  # one per legal entity
    assert small_mapped["b2b_outcome_reconciliation"]["reject_lost"] > one_mapped["b2b_outcome_reconciliation"]["reject_lost"]
