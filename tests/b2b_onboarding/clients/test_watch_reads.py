"""The two cheap reads the event triggers make, against the fakes: HQ's Pending B2B prospects as keys
and etags in one cross-company request, and whether a Dataverse delta link shows any change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.errors import D365Error
from b2b_onboarding.flow import reconcile, sync

RUN = "manual__test"


def prospect(number: int, legal_entity: str = "usrt", **fields) -> dict:
    return {"dataAreaId": legal_entity, "ProspectId": f"P-{number:06d}", "ProspectName": f"Ada Lovelace{number}",
            "CompanyName": f"Engines {number}", "PrimaryEmailAddress": f"p{number}@engines.example", **fields}  # fmt: skip


@pytest.fixture
def commerce(world, admin) -> Iterator[CommerceClient]:
    client = CommerceClient.connect(world.settings(world.endpoints.commerce))
    yield client
    client.odata.close()


def test_pending_prospect_versions_are_the_keys_and_etags_of_pending_b2b_prospects_only(admin, commerce, clerk):
    admin.seed_prospects([prospect(1), prospect(2), prospect(3, IsB2BProspect="No"), prospect(4, "usmf"),
                          prospect(5, "demf")])  # fmt: skip
    clerk.set_status("usrt", "P-000002", "Approved")
    before = admin.counts()["commerce"]["requests"]
    rows = [row for page in commerce.pending_prospect_versions(["usrt", "USMF"]) for row in page]
    assert admin.counts()["commerce"]["requests"] - before == 1
    keys = sorted((row["dataAreaId"], row["ProspectId"]) for row in rows)
    assert keys == [("usmf", "P-000004"), ("usrt", "P-000001")]
    assert all(set(row) == {"dataAreaId", "ProspectId", "@odata.etag"} for row in rows)
    etag = next(row["@odata.etag"] for row in rows if row["ProspectId"] == "P-000001")
    assert etag == clerk.prospect("usrt", "P-000001")["@odata.etag"]


def test_pending_prospect_versions_refuse_a_wildcard_and_ask_nothing_for_no_legal_entity(admin, commerce):
    before = admin.counts()["commerce"]["requests"]
    with pytest.raises(ValueError, match=r"legal entity 'us\*': a '\*' would match other legal entities"):
        list(commerce.pending_prospect_versions(["usrt", "us*"]))
    assert list(commerce.pending_prospect_versions([])) == []
    assert admin.counts()["commerce"]["requests"] == before


def test_has_changes_reads_one_row_of_a_delta_link_and_takes_an_expired_one_for_a_change(
    admin, store, commerce, sales_client, seller
):  # fmt: skip
    admin.seed_prospects([prospect(1), prospect(2)])
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.push_leads(sales_client, store, "usrt", RUN)
    reconcile.read_outcomes(sales_client, store, RUN)
    link = store.delta_link("leads")
    assert sales_client.has_changes("leads", link) is False
    for lead_id in store.frame()["lead_id"]:
        seller.disqualify(lead_id)
    before = admin.counts()["dataverse"]["requests"]
    assert sales_client.has_changes("leads", link) is True
    assert admin.counts()["dataverse"]["requests"] - before == 1  # two leads changed: one page of one row
    assert sales_client.has_changes("opportunities", store.delta_link("opportunities")) is False
    seller.delete_lead(store.frame()["lead_id"][0])
    reconcile.read_outcomes(sales_client, store, RUN)
    assert sales_client.has_changes("leads", link) is True  # a tombstone is a change too
    assert sales_client.has_changes("leads", store.delta_link("leads")) is False
    admin.reset()
    assert sales_client.has_changes("leads", link) is True  # expired (0x80044352): only a full read follows it


def test_has_changes_raises_any_other_failure(admin, store, sales_client):
    garbled = f"{sales_client.odata.service_root}leads?$select=leadid&$deltatoken=not-a-token"
    with pytest.raises(D365Error) as raised:
        sales_client.has_changes("leads", garbled)
    assert raised.value.status == 400 and raised.value.operation == "look for leads changes"
