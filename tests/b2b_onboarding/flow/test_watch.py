"""What the event triggers ask on each look (flow/watch.py), against the fakes: HQ's Pending prospects
against the watermark of the last pull, Dataverse's outcome tables against the last outcome read's
delta links; one request to HQ and two to Dataverse a look; never a write to the state store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.domain.prospects import watermark_name
from b2b_onboarding.flow import reconcile, sync, watch
from b2b_onboarding.store.state import DryRunStore, StateStore, metadata

RUN = "manual__test"
# Pages of 3 rows: a pull and a look read the same prospects in different pages.
COMMERCE_PAGE_SIZE = 3


def request(number: int, legal_entity: str = "usrt", **fields) -> dict:
    return {"dataAreaId": legal_entity, "ProspectId": f"P-{number:06d}", "ProspectName": f"Ada Lovelace{number}",
            "CompanyName": f"Engines {number}", "PrimaryEmailAddress": f"p{number}@engines.example", **fields}  # fmt: skip


@pytest.fixture
def commerce(world, admin) -> Iterator[CommerceClient]:
    client = CommerceClient.connect(world.settings(world.endpoints.commerce))
    yield client
    client.odata.close()


def rows_of(store: StateStore) -> dict[str, list[tuple]]:
    """Every row of every table of the store."""
    with store.engine.connect() as connection:
        return {table.name: sorted(map(tuple, connection.execute(sa.select(table))), key=repr)
                for table in metadata.sorted_tables}  # fmt: skip


def requests(admin, system: str) -> int:
    return admin.counts()[system]["requests"]


def test_new_prospects_are_work_until_a_pull_has_read_them(admin, store, commerce):
    admin.seed_prospects([request(n) for n in range(1, 8)])
    # never pulled: usrt has Pending prospects, usmf none (nothing to do there)
    assert watch.hq_changes(commerce, store, ["usrt", "usmf"]) == ["usrt"]
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.pull_prospects(commerce, store, "usmf", RUN)
    assert watch.hq_changes(commerce, store, ["usrt", "usmf"]) == []
    admin.seed_prospects([request(8, "usmf")])
    assert watch.hq_changes(commerce, store, ["usrt", "usmf"]) == ["usmf"]


def test_a_clerks_correction_and_a_decision_are_work(admin, store, commerce, clerk):
    admin.seed_prospects([request(1), request(2)])
    sync.pull_prospects(commerce, store, "usrt", RUN)
    clerk.correct("usrt", "P-000001", AddressCity="Redmond")  # a write: a new etag, the same keys
    assert watch.hq_changes(commerce, store, ["usrt"]) == ["usrt"]
    sync.pull_prospects(commerce, store, "usrt", RUN)
    assert watch.hq_changes(commerce, store, ["usrt"]) == []
    # Decided: it leaves the Pending set, and the fingerprint with it (a sync that finds nothing new).
    clerk.set_status("usrt", "P-000002", "Approved")
    assert watch.hq_changes(commerce, store, ["usrt"]) == ["usrt"]
    sync.pull_prospects(commerce, store, "usrt", RUN)
    clerk.set_status("usrt", "P-000001", "Rejected")
    assert watch.hq_changes(commerce, store, ["usrt"]) == ["usrt"]
    sync.pull_prospects(commerce, store, "usrt", RUN)
    assert watch.hq_changes(commerce, store, ["usrt"]) == []  # an emptied legal entity, once pulled, is quiet


def test_a_legal_entity_is_named_as_the_connection_names_it(admin, store, commerce):
    admin.seed_prospects([request(1)])
    assert watch.hq_changes(commerce, store, ["USRT"]) == ["USRT"]
    sync.pull_prospects(commerce, store, "USRT", RUN)
    assert store.delta_link(watermark_name("usrt")) is not None
    assert watch.hq_changes(commerce, store, ["USRT", "usmf"]) == []


def test_only_a_whole_real_pull_stores_the_watermark(admin, store, commerce, tmp_path):
    admin.seed_prospects([request(1), request(2)])
    sync.pull_prospects(commerce, store, "usrt", RUN, prospect_ids={"P-000001"})  # targeted: read only some
    assert store.delta_link(watermark_name("usrt")) is None
    dry = DryRunStore(str(store.engine.url), "manual__dry")
    try:
        sync.pull_prospects(commerce, dry, "usrt", "manual__dry")
    finally:
        dry.close()
    assert store.delta_link(watermark_name("usrt")) is None
    assert watch.hq_changes(commerce, store, ["usrt"]) == ["usrt"]
    sync.pull_prospects(commerce, store, "usrt", RUN)
    assert watch.hq_changes(commerce, store, ["usrt"]) == []


def test_a_look_at_hq_is_one_request_whatever_the_legal_entities(admin, store, commerce):
    admin.seed_prospects([request(1), request(2, "usmf")])
    before = requests(admin, "commerce")
    assert watch.hq_changes(commerce, store, ["usrt", "usmf", "demf"]) == ["usrt", "usmf"]
    assert requests(admin, "commerce") - before == 1
    # past a server page, the next pages follow
    admin.seed_prospects([request(n) for n in range(3, 9)])
    before = requests(admin, "commerce")
    assert watch.hq_changes(commerce, store, ["usrt", "usmf"]) == ["usrt", "usmf"]
    assert requests(admin, "commerce") - before == 3  # 8 Pending prospects, 3 a page


@pytest.fixture
def outcomes_read(admin, store, commerce, sales_client):
    """Two prospects with their leads, and the outcome read that stored the delta links: lead id by prospect."""
    admin.seed_prospects([request(1), request(2)])
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.push_leads(sales_client, store, "usrt", RUN)
    reconcile.read_outcomes(sales_client, store, RUN)
    return store.frame().set_index("prospect_id")["lead_id"].to_dict()


def test_without_delta_links_both_tables_are_work_without_a_request(admin, store, sales_client):
    before = requests(admin, "dataverse")
    assert watch.sales_changes(sales_client, store) == ["leads", "opportunities"]
    assert requests(admin, "dataverse") == before


def test_after_an_outcome_read_dataverse_is_quiet_for_two_requests_a_look(admin, store, sales_client, outcomes_read):
    before = requests(admin, "dataverse")
    assert watch.sales_changes(sales_client, store) == []
    assert requests(admin, "dataverse") - before == 2


def test_a_qualified_lead_and_a_won_opportunity_are_work(admin, store, sales_client, seller, outcomes_read):
    opportunity = seller.qualify(outcomes_read["P-000001"])
    assert watch.sales_changes(sales_client, store) == ["leads", "opportunities"]
    reconcile.read_outcomes(sales_client, store, RUN)
    assert watch.sales_changes(sales_client, store) == []
    seller.close_opportunity(opportunity, won=True)
    assert "opportunities" in watch.sales_changes(sales_client, store)
    reconcile.read_outcomes(sales_client, store, RUN)
    assert watch.sales_changes(sales_client, store) == []
    seller.disqualify(outcomes_read["P-000002"])
    assert watch.sales_changes(sales_client, store) == ["leads"]


def test_an_expired_delta_link_is_work(admin, store, sales_client, outcomes_read):
    admin.reset()  # a link issued before the reset is expired (0x80044352)
    assert watch.sales_changes(sales_client, store) == ["leads", "opportunities"]


def test_a_look_never_writes_to_the_store(admin, store, commerce, sales_client, seller, clerk, outcomes_read):
    seller.qualify(outcomes_read["P-000001"])
    clerk.correct("usrt", "P-000002", AddressCity="Redmond")
    admin.seed_prospects([request(3, "usmf")])
    before = rows_of(store)
    assert watch.hq_changes(commerce, store, ["usrt", "usmf"]) == ["usrt", "usmf"]
    assert watch.sales_changes(sales_client, store) == ["leads", "opportunities"]
    assert rows_of(store) == before
    assert before["b2b_delta_links"]  # the links and the watermark were there to be read, and are unchanged
