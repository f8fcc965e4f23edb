"""Dry runs and targeted reruns of the flow's steps against the fakes, without Airflow.

A dry run reads both systems and the store, writes nothing (the fakes count no write, the store's
tables do not change), and its plan lists exactly the writes the real run then makes. A targeted
run works on the named prospects alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.flow import reconcile, sync
from b2b_onboarding.flow.dry_run import DryRunCommerce, DryRunSales, Plan
from b2b_onboarding.store.state import DryRunStore, StateStore
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP, PLANNED_WRITE_TABLES

COMMERCE_PAGE_SIZE = 4  # every read crosses pages
STORE_TABLES = ("b2b_prospects", "b2b_transitions", "b2b_delta_links", "b2b_drift_findings", "b2b_anomalies")
OUTCOMES = ("won", "lost", "disqualified", "qualified", "won", None)


def writes(admin: FakeAdmin) -> Counter:
    counts = admin.counts()
    return Counter({(system, name): n for system in ("commerce", "dataverse")
                    for name, n in counts[system]["writes"].items() if n})  # fmt: skip


def planned(plan: Plan) -> Counter:
    return Counter(PLANNED_WRITE_TABLES[operation] for operation in plan.frame()["operation"])


def snapshot(store: StateStore) -> dict[str, list]:
    with store.engine.connect() as connection:
        return {name: sorted(map(repr, connection.execute(sa.text(f"SELECT * FROM {name}")).all()))
                for name in STORE_TABLES}  # fmt: skip


def seed(admin: FakeAdmin, count: int = 12) -> list[dict]:
    rows = [{"dataAreaId": "usrt", "ProspectId": f"P-{n:06d}", "ProspectName": f"Ada Lovelace {n}",
             "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example", "CurrencyCode": "USD"}
            for n in range(1, count + 1)]  # fmt: skip
    rows[2]["PrimaryEmailAddress"] = "not-an-email"  # kept as a bad record, never a lead
    admin.seed_prospects(rows)
    return rows


@pytest.fixture(params=["bulk", "one by one"])
def systems(request, world, admin) -> Iterator[tuple[CommerceClient, SalesClient]]:
    mode = {} if request.param == "bulk" else {"bulk": False, "change_tracking": False}
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce, **mode))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse, **mode))
    yield commerce, sales
    commerce.odata.close()
    sales.odata.close()


def dry_clients(systems, plan: Plan) -> tuple[DryRunCommerce, DryRunSales]:
    commerce, sales = systems
    return DryRunCommerce(commerce, plan, "usrt"), DryRunSales(sales, plan, "usrt")


def run_sync(commerce, sales, store, run_id: str, prospect_ids=None) -> dict:
    pulled = sync.pull_prospects(commerce, store, "usrt", run_id, prospect_ids)
    pushed = sync.push_leads(sales, store, "usrt", run_id)
    return {"pulled": pulled, "pushed": pushed}


def run_reconciliation(commerce, sales, store, run_id: str, keys=None) -> None:
    reconcile.read_outcomes(sales, store, run_id, keys)
    reconcile.write_customers(commerce, sales, store, "usrt", run_id, CUSTOMER_GROUP)
    reconcile.approve_won(commerce, store, "usrt", run_id)
    reconcile.reject_lost(commerce, store, "usrt", run_id)


def test_a_dry_run_writes_nothing_and_plans_exactly_the_writes_the_real_run_then_makes(
    admin, store, systems, clerk
):
    rows = seed(admin)
    url = str(store.engine.url)

    # The sync: a plan of one lead per valid prospect, nothing written anywhere.
    plan = Plan()
    commerce, sales = dry_clients(systems, plan)
    before, emails = writes(admin), len(admin.outbox())
    run_sync(commerce, sales, DryRunStore(url, "manual__dry_sync"), "manual__dry_sync")
    assert writes(admin) == before and snapshot(store) == snapshot(StateStore(url))
    assert store.frame().empty
    leads = plan.frame()
    assert list(leads["operation"].unique()) == ["create lead"] and len(leads) == len(rows) - 1
    assert set(leads["prospect_id"]) == {row["ProspectId"] for row in rows} - {"P-000003"}
    assert (leads["legal_entity"] == "usrt").all() and leads["what"].str.contains("Engines").all()

    run_sync(*systems, store, "manual__sync")
    assert writes(admin) - before == planned(plan)

    # The sellers decide; the reconciliation's dry run plans customers, account numbers,
    # hierarchies, Admin nodes, approvals and rejections.
    decided = admin.decide([{"msdyn_prospectid": f"usrt:{row['ProspectId']}", "outcome": outcome}
                            for row, outcome in zip(rows, OUTCOMES * 2) if outcome and row["ProspectId"] != "P-000003"])  # fmt: skip
    assert decided["errors"] == []
    plan = Plan()
    commerce, sales = dry_clients(systems, plan)
    before, real_before = writes(admin), snapshot(store)
    run_reconciliation(commerce, sales, DryRunStore(url, "manual__dry_reconcile"), "manual__dry_reconcile")
    assert writes(admin) == before and len(admin.outbox()) == emails
    assert snapshot(store) == real_before
    operations = Counter(plan.frame()["operation"])
    # 4 won, 2 lost and 1 disqualified; customers for the 8 qualified leads (won, lost or still open)
    assert operations["approve prospect"] == operations["create customer hierarchy"] == 4
    assert operations["add Admin node to customer hierarchy"] == 4 and operations["reject prospect"] == 3
    assert operations["create Organization customer"] == operations["create Person customer"] == 8
    assert operations["set account number"] == 8
    planned_by_prospect = Counter(zip(plan.frame()["legal_entity"], plan.frame()["prospect_id"]))
    assert all(legal_entity == "usrt" for legal_entity, _ in planned_by_prospect)

    run_reconciliation(*systems, store, "manual__reconcile")
    assert writes(admin) - before == planned(plan)
    assert len(admin.outbox()) == emails + 7

    # Nothing left to do: the next dry run plans nothing.
    plan = Plan()
    commerce, sales = dry_clients(systems, plan)
    run_sync(commerce, sales, DryRunStore(url, "manual__dry_again"), "manual__dry_again")
    run_reconciliation(commerce, sales, DryRunStore(url, "manual__dry_again"), "manual__dry_again")
    assert plan.frame().empty


TEMPLATE = "{legal_entity}-{prospect_id}-{role}"


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["numbered by HQ", "derived by template"])
def test_a_dry_run_plans_no_create_for_a_customer_an_interrupted_run_already_made(admin, store, systems, template):
    """The dry run reads first, as the real run's one-by-one path does: what exists is adopted (the
    organization an interrupted run made: by the prospect's email and the account's name when HQ
    numbered it, by its derived account with a template)."""
    seed(admin, 3)
    run_sync(*systems, store, "manual__sync")
    admin.decide([{"msdyn_prospectid": "usrt:P-000001", "outcome": "qualified"}])
    commerce, sales = systems
    reconcile.read_outcomes(sales, store, "manual__reconcile")
    row = store.work("customers", "usrt").iloc[0].to_dict()
    account = sales.get_by_ids("accounts", "accountid", [row["account_id"]], ["accountid", "name"])[0]
    derived = {"CustomerAccount": "USRT-P-000001-ORG"} if template else {}
    made = commerce.create_customer({"dataAreaId": "usrt", "PartyType": "Organization", "OrganizationName": account["name"],
                                     "PrimaryContactEmail": "p1@engines.example", "CustomerGroupId": CUSTOMER_GROUP,
                                     **derived})  # fmt: skip

    plan = Plan()
    dry_commerce, dry_sales = dry_clients(systems, plan)
    before = writes(admin)
    reconcile.write_customers(dry_commerce, dry_sales, DryRunStore(str(store.engine.url), "manual__dry"), "usrt",
                              "manual__dry", CUSTOMER_GROUP, account_template=template)  # fmt: skip
    assert writes(admin) == before
    assert Counter(plan.frame()["operation"]) == {"create Person customer": 1, "set account number": 1}
    reconcile.write_customers(commerce, sales, store, "usrt", "manual__reconcile", CUSTOMER_GROUP,
                              account_template=template)
    assert writes(admin) - before == planned(plan)
    tracked = store.frame().set_index("prospect_id").loc["P-000001"]
    assert (tracked["org_customer_account"], tracked["org_party_number"]) == (made["CustomerAccount"], made["PartyNumber"])
    if template:
        assert tracked["person_customer_account"] == "USRT-P-000001-ADM"


def test_a_dry_run_client_refuses_any_write_it_has_no_plan_for(world, admin, systems):
    commerce, sales = dry_clients(systems, Plan())
    with pytest.raises(RuntimeError, match="dry run: .* would write"):
        commerce.odata.request("DELETE", "Prospects(dataAreaId='usrt',ProspectId='P-1')", operation="delete")
    with pytest.raises(RuntimeError, match="dry run: .* would write"):
        sales.odata.request("POST", "leads", operation="create lead", json={})
    assert sales.whoami()["UserId"]  # reads go through


def test_a_targeted_sync_pulls_a_fixed_bad_record_by_its_key_and_nothing_else(admin, store, systems, clerk):
    seed(admin, 6)
    run_sync(*systems, store, "manual__sync")
    bad = store.frame().set_index("prospect_id").loc["P-000003"]
    assert bad["stage"] == "invalid" and "PrimaryEmailAddress" in bad["last_error"]
    clerk.call("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-000003')", params={"cross-company": "true"},
               json={"PrimaryEmailAddress": "fixed@engines.example"})  # fmt: skip
    admin.seed_prospects([{"dataAreaId": "usrt", "ProspectId": "P-000099", "ProspectName": "Not Named",
                           "CompanyName": "Elsewhere", "PrimaryEmailAddress": "p99@engines.example"}])  # fmt: skip
    clerk.set_status("usrt", "P-000005", "Rejected")  # decided by hand: named, but no longer Pending

    before = writes(admin)
    result = run_sync(*systems, store.scoped([("usrt", "P-000003"), ("usrt", "P-000005")]), "manual__targeted",
                      prospect_ids={"P-000003", "P-000005", "P-404"})  # fmt: skip
    assert result["pulled"]["pulled"] == 1 and result["pulled"]["refreshed"] == 1
    assert result["pulled"]["not pending"] == 1 and result["pulled"]["not found"] == 1
    assert result["pushed"]["created"] == 1
    assert writes(admin) - before == {("dataverse", "leads"): 1}
    tracked = store.scoped(None).frame().set_index("prospect_id")
    assert tracked.loc["P-000003", "stage"] == "lead_open" and "P-000099" not in tracked.index


def test_a_targeted_reconciliation_carries_only_the_named_decisions_and_keeps_the_delta_links(admin, store, systems, clerk):
    seed(admin, 6)
    run_sync(*systems, store, "manual__sync")
    commerce, sales = systems
    if sales.change_tracking:
        reconcile.read_outcomes(sales, store, "manual__first_read")  # the delta links exist
    links = {name: store.delta_link(name) for name in ("leads", "opportunities")}
    admin.decide([{"msdyn_prospectid": "usrt:P-000001", "outcome": "won"},
                  {"msdyn_prospectid": "usrt:P-000002", "outcome": "lost"}])  # fmt: skip

    keys = [("usrt", "P-000001")]
    run_reconciliation(commerce, sales, store.scoped(keys), "manual__targeted", keys)
    statuses = {row["ProspectId"]: row["B2BProspectStatus"] for row in clerk.all("Prospects")}
    assert statuses["P-000001"] == "Approved" and statuses["P-000002"] == "Pending"
    assert {name: store.delta_link(name) for name in ("leads", "opportunities")} == links

    run_reconciliation(commerce, sales, store.scoped(None), "manual__nightly")  # the next full run takes the rest
    statuses = {row["ProspectId"]: row["B2BProspectStatus"] for row in clerk.all("Prospects")}
    assert statuses["P-000001"] == "Approved" and statuses["P-000002"] == "Rejected"
    assert len(admin.outbox()) == 2
