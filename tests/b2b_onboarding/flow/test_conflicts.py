"""Conflicts are reported, never overwritten: a lead or opportunity reopened after the decision, a
prospect decided by hand in Commerce, a lead or prospect deleted. Each becomes an anomaly in the
state store (and the log); Commerce keeps what it shows, and nobody gets a second email."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.flow import drift, reconcile, sync
from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP

RUN = "manual__conflicts"


@pytest.fixture
def systems(world, admin: FakeAdmin) -> Iterator[tuple[CommerceClient, SalesClient]]:
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse))
    yield commerce, sales
    commerce.odata.close()
    sales.odata.close()


def onboard(admin: FakeAdmin, store: StateStore, systems, count: int = 3) -> None:
    """Prospects P-000001… in usrt, pulled and pushed to Sales as leads."""
    commerce, sales = systems
    admin.seed_prospects([
        {"dataAreaId": "usrt", "ProspectId": f"P-{n:06d}", "ProspectName": f"Ada Lovelace{n}",
         "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example"}
        for n in range(1, count + 1)
    ])  # fmt: skip
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.push_leads(sales, store, "usrt", RUN)


def reconcile_all(store: StateStore, systems, run_id: str = RUN) -> None:
    commerce, sales = systems
    reconcile.read_outcomes(sales, store, run_id)
    reconcile.write_customers(commerce, sales, store, "usrt", run_id, CUSTOMER_GROUP)
    reconcile.approve_won(commerce, store, "usrt", run_id)
    reconcile.reject_lost(commerce, store, "usrt", run_id)


def tracked(store: StateStore, prospect_id: str) -> dict:
    return store.frame().set_index("prospect_id").loc[prospect_id].to_dict()


def anomaly(store: StateStore, prospect_id: str) -> dict:
    found = store.anomalies()
    rows = found[found["prospect_id"] == prospect_id].to_dict("records")
    assert len(rows) == 1, f"expected one anomaly on {prospect_id}, found {rows}"
    return rows[0]


def statuses(clerk: Clerk) -> dict[str, str]:
    return {row["ProspectId"]: row["B2BProspectStatus"] for row in clerk.all("Prospects")}


def test_a_lead_reopened_after_the_rejection_is_an_anomaly_and_the_rejection_stands(
    admin, store, systems, seller, clerk
):
    onboard(admin, store, systems)
    admin.decide([{"msdyn_prospectid": "usrt:P-000001", "outcome": "disqualified"}])
    reconcile_all(store, systems)
    assert statuses(clerk)["P-000001"] == "Rejected" and len(admin.outbox()) == 1

    seller.call("PATCH", f"leads({tracked(store, 'P-000001')['lead_id']})", json={"statecode": 0},
                headers={"If-Match": "*"})  # fmt: skip
    reconcile_all(store, systems, "manual__after_reopen")

    found = anomaly(store, "P-000001")
    assert found["kind"] == "lead_reopened" and found["last_run_id"] == "manual__after_reopen"
    assert "usrt/P-000001" in found["detail"] and "open in Sales" in found["detail"]
    assert "rejected in Commerce" in found["detail"]
    assert statuses(clerk)["P-000001"] == "Rejected" and len(admin.outbox()) == 1
    assert tracked(store, "P-000001")["decision"] == "rejected"


def test_an_opportunity_reopened_after_it_was_won_is_an_anomaly_and_the_approval_stands(
    admin, store, systems, seller, clerk
):
    onboard(admin, store, systems)
    admin.decide([{"msdyn_prospectid": "usrt:P-000002", "outcome": "won"}])
    reconcile_all(store, systems)
    assert statuses(clerk)["P-000002"] == "Approved"

    seller.call("PATCH", f"opportunities({tracked(store, 'P-000002')['opportunity_id']})", json={"statecode": 0},
                headers={"If-Match": "*"})  # fmt: skip
    reconcile_all(store, systems)

    found = anomaly(store, "P-000002")
    assert found["kind"] == "opportunity_reopened" and "approved in Commerce" in found["detail"]
    assert statuses(clerk)["P-000002"] == "Approved"
    assert [mail["template"] for mail in admin.outbox()] == ["B2B prospect approved"]


def test_a_prospect_decided_by_hand_in_commerce_is_reported_then_never_flipped(admin, store, systems, clerk):
    onboard(admin, store, systems)
    commerce, sales = systems
    clerk.set_status("usrt", "P-000003", "Rejected")  # by hand, before any seller decided
    summary, _ = drift.check_drift(commerce, sales, store, ["usrt"], "manual__drift")
    assert summary["anomalies"] == 1
    found = anomaly(store, "P-000003")
    assert found["kind"] == "decided_in_commerce" and "Rejected in Commerce" in found["detail"]

    admin.decide([{"msdyn_prospectid": "usrt:P-000003", "outcome": "won"}])  # the seller disagrees
    reconcile_all(store, systems)

    found = anomaly(store, "P-000003")
    assert found["times_seen"] == 2 and "Sales decided Approved" in found["detail"]
    assert statuses(clerk)["P-000003"] == "Rejected"
    # The only email is the one HQ sent for the clerk's own rejection; no approval, no hierarchy.
    assert [mail["template"] for mail in admin.outbox()] == ["B2B prospect rejected"]
    assert clerk.all("CustomerHiearchies") == []
    assert tracked(store, "P-000003")["decision"] is None
    assert "conflict" in tracked(store, "P-000003")["last_error"]


def test_deleted_leads_and_prospects_are_anomalies(admin, store, systems, seller, clerk):
    onboard(admin, store, systems)
    commerce, sales = systems
    reconcile.read_outcomes(sales, store, RUN)  # the first delta link
    seller.delete_lead(tracked(store, "P-000001")["lead_id"])
    clerk.call("DELETE", "Prospects(dataAreaId='usrt',ProspectId='P-000002')", params={"cross-company": "true"})

    reconcile.read_outcomes(sales, store, RUN)
    drift.check_drift(commerce, sales, store, ["usrt"], RUN)

    assert anomaly(store, "P-000001")["kind"] == "lead_deleted"
    assert anomaly(store, "P-000002")["kind"] == "prospect_deleted"
    assert "no longer exists in Commerce" in anomaly(store, "P-000002")["detail"]
    assert set(store.anomalies()["prospect_id"]) == {"P-000001", "P-000002"}
