"""Bulk writes, change tracking, service protection and the drift check, against the fakes over
real MSAL, TLS and OData (no Airflow): the product's scale features doing their job."""

from __future__ import annotations

import dataclasses
import time

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient, lead_id_of
from b2b_onboarding.flow import drift, reconcile, sync
from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin, running_fakes
from d365_fakes.scenario import Cast

RUN = "manual__test"
COMMERCE_PAGE_SIZE = 4


def connect(world, client_class, resource: str, **extra):
    return client_class.connect(world.settings(resource, **extra))


def seed(admin: FakeAdmin, count: int, legal_entity: str = "usrt") -> None:
    admin.seed_prospects([
        {"dataAreaId": legal_entity, "ProspectId": f"P-{n:06d}", "ProspectName": f"Ada Lovelace{n}",
         "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example"}
        for n in range(1, count + 1)
    ])  # fmt: skip


def synced(world, admin: FakeAdmin, store: StateStore, count: int, **sales_extra) -> SalesClient:
    seed(admin, count)
    with connect(world, CommerceClient, world.endpoints.commerce).odata as odata:
        sync.pull_prospects(CommerceClient(odata), store, "usrt", RUN)
    sales = connect(world, SalesClient, world.endpoints.dataverse, **sales_extra)
    sync.push_leads(sales, store, "usrt", RUN)
    return sales


def test_a_lead_dataverse_refuses_is_isolated_the_rest_are_written_and_it_is_retried(world, admin, store):
    admin.reject_writes("leads", "msdyn_prospectid", "P-000007", "the duplicate detection plugin said no")
    sales = synced(world, admin, store, 25, batch_size=10)
    tracked = store.frame().set_index("prospect_id")
    assert tracked["lead_id"].notna().sum() == 24
    assert tracked.loc["P-000007", "stage"] == "pulled"
    assert "0x80040265" in tracked.loc["P-000007", "last_error"]
    assert "the duplicate detection plugin said no" in tracked.loc["P-000007", "last_error"]
    # 3 bulk writes and their reads, plus log2-many splits around the bad row; not 25 requests.
    assert sum(sales.odata.requests.values()) < 25
    assert admin.counts()["dataverse"]["writes"]["leads"] == 24

    admin.clear_rejections()
    result = sync.push_leads(sales, store, "usrt", RUN)
    assert result["created"] == 1 and store.frame()["lead_id"].notna().all()
    assert store.frame().set_index("prospect_id").loc["P-000007", "last_error"] is None


def test_a_rerun_and_a_lost_store_adopt_existing_leads_without_writing(world, admin, store, tmp_path):
    synced(world, admin, store, 12, batch_size=5)
    writes = admin.counts()["dataverse"]["writes"]["leads"]
    ids = dict(zip(store.frame()["prospect_id"], store.frame()["lead_id"]))
    rebuilt = StateStore(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    with connect(world, CommerceClient, world.endpoints.commerce).odata as odata:
        sync.pull_prospects(CommerceClient(odata), rebuilt, "usrt", RUN)
    result = sync.push_leads(connect(world, SalesClient, world.endpoints.dataverse, batch_size=5), rebuilt, "usrt", RUN)
    assert result["adopted"] == 12 and admin.counts()["dataverse"]["writes"]["leads"] == writes
    assert dict(zip(rebuilt.frame()["prospect_id"], rebuilt.frame()["lead_id"])) == ids
    rebuilt.close()


def test_leads_an_earlier_version_or_dual_write_wrote_are_adopted_in_bulk_whatever_their_case(world, admin, store):
    seed(admin, 12)
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    older = {}
    for n in (2, 5, 11):  # earlier versions: `usrt:P-…`, no company, at the id derived from the prospect
        older[f"P-{n:06d}"] = lead_id_of("usrt", f"P-{n:06d}")
        seller.call("PATCH", f"leads({older[f'P-{n:06d}']})", headers={"If-None-Match": "*"},
                    json={"msdyn_prospectid": f"usrt:P-{n:06d}", "lastname": "Older", "msdyn_b2bcommerceprospect": True})  # fmt: skip
    dual_write = {f"P-{n:06d}": seller.create_dual_write_lead({"ProspectId": f"p-{n:06d}", "ProspectName": "Ada Dual",
                                                               "CompanyName": f"Engines {n}"}, company_id("usrt"))
                  for n in (3, 8)}  # fmt: skip
    seller.close()
    writes = admin.counts()["dataverse"]["writes"]["leads"]

    with connect(world, CommerceClient, world.endpoints.commerce).odata as odata:
        sync.pull_prospects(CommerceClient(odata), store, "usrt", RUN)
    result = sync.push_leads(connect(world, SalesClient, world.endpoints.dataverse, batch_size=5), store, "usrt", RUN)

    assert (result["adopted"], result["created"]) == (5, 7)
    assert admin.counts()["dataverse"]["writes"]["leads"] == writes + 7  # one UpsertMultiple target per new lead
    lead_ids = store.frame().set_index("prospect_id")["lead_id"].to_dict()
    assert {pid: lead_ids[pid] for pid in [*older, *dual_write]} == {**older, **dual_write}
    assert len(set(lead_ids.values())) == 12 and store.anomalies().empty


def test_outcomes_are_read_as_changes_and_a_deleted_lead_becomes_an_anomaly(world, admin, store):
    sales = synced(world, admin, store, 6, page_size=2)
    first = reconcile.read_outcomes(sales, store, RUN)
    assert first["leads_read"] == 6 and first["leads_full_reads"] == 1
    link = store.delta_link("leads")
    assert "$deltatoken=" in link

    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    lead_ids = store.frame().set_index("prospect_id")["lead_id"]
    seller.qualify(lead_ids["P-000002"])
    seller.delete_lead(lead_ids["P-000005"])
    seller.close()
    second = reconcile.read_outcomes(sales, store, RUN)
    assert second["leads_read"] == 1 and second["leads_full_reads"] == 0  # only what changed
    assert second["leads_deleted"] == 1 and store.delta_link("leads") != link
    tracked = store.frame().set_index("prospect_id")
    assert tracked.loc["P-000002", "lead_state"] == "qualified" and tracked.loc["P-000002", "opportunity_id"]
    assert tracked.loc["P-000005", "last_error"].startswith("conflict: the lead of prospect usrt/P-000005 was deleted")
    third = reconcile.read_outcomes(sales, store, RUN)
    assert third["leads_read"] == 0 and third["opportunities_read"] == 0


def test_an_expired_delta_link_falls_back_to_a_full_read(world, tmp_path, store):
    cast = Cast.new()
    with running_fakes(tmp_path / "fakes", cast.clients, delta_token_ttl_s=1) as endpoints, FakeAdmin(endpoints) as admin:
        world = dataclasses.replace(world, endpoints=endpoints, cast=cast)
        sales = synced(world, admin, store, 3)
        reconcile.read_outcomes(sales, store, RUN)
        time.sleep(2.5)  # the fake's tokens carry whole seconds
        again = reconcile.read_outcomes(sales, store, RUN)
    assert again["leads_full_reads"] == 1 and again["leads_read"] == 3
    assert store.delta_link("leads") is not None


def test_the_client_waits_out_throttling_and_finishes_without_a_failure(world, admin, store):
    admin.set_limits(dataverse_requests=4, dataverse_window_s=1)
    try:
        sales = synced(world, admin, store, 20, batch_size=2, max_concurrency=3)
        limits = admin.limits()
    finally:
        admin.set_limits(dataverse_requests=6000, dataverse_window_s=300)
    assert store.frame()["lead_id"].notna().all() and store.frame()["last_error"].isna().all()
    assert limits["dataverse"]["throttled"]["0x80072322"] > 0 and sales.odata.throttled > 0
    assert admin.counts()["dataverse"]["writes"]["leads"] == 20


def test_commerce_writes_go_in_batches_of_atomic_changesets(world, admin, store):
    seed(admin, 9)
    commerce = connect(world, CommerceClient, world.endpoints.commerce, batch_size=4)
    with commerce.odata:
        sync.pull_prospects(commerce, store, "usrt", RUN)
        store.update_many([(("usrt", f"P-{n:06d}"), {"lead_id": f"{n:08d}-0000-0000-0000-000000000000",
                                                     "lead_state": "disqualified"}, None)
                           for n in range(1, 10)], RUN)  # fmt: skip
        clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
        clerk.set_status("usrt", "P-000004", "Approved")  # decided by hand in HQ: a conflict, never flipped
        clerk.close()
        before = admin.counts()["commerce"]["requests"]
        result = reconcile.reject_lost(commerce, store, "usrt", RUN)
        sent = admin.counts()["commerce"]["requests"] - before
    assert result["written"] == 8 and result["conflicts"] == 1
    assert sent <= 2 + 3  # the chunk's prospects in pages of 4, then 8 changesets in 2 $batch requests
    statuses = {row["ProspectId"]: row["B2BProspectStatus"] for row in clerk_rows(world)}
    assert statuses["P-000004"] == "Approved" and sum(status == "Rejected" for status in statuses.values()) == 8
    templates = [mail["template"] for mail in admin.outbox()]
    assert templates.count("B2B prospect rejected") == 8 and templates.count("B2B prospect approved") == 1  # the clerk's


def clerk_rows(world) -> list[dict]:
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    try:
        return clerk.all("Prospects")
    finally:
        clerk.close()


def test_the_drift_check_finds_what_was_changed_behind_the_flows_back(world, admin, store):
    sales = synced(world, admin, store, 5)
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    lead_ids = store.frame().set_index("prospect_id")["lead_id"]
    seller.delete_lead(lead_ids["P-000003"])
    seller.disqualify(lead_ids["P-000004"])
    seller.close()
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    clerk.set_status("usrt", "P-000004", "Approved")
    clerk.close()
    commerce = connect(world, CommerceClient, world.endpoints.commerce)
    summary, findings = drift.check_drift(commerce, sales, store, ["usrt"], RUN)
    assert summary["missing lead"] == 1 and summary["state disagreement"] == 1
    assert set(zip(findings["kind"], findings["prospect_id"])) == {("missing lead", "P-000003"),
                                                                   ("state disagreement", "P-000004")}  # fmt: skip
    assert len(store.drift(RUN)) == 2
