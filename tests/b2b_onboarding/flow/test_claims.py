"""Overlapping runs against the fakes, on one state store: each claims the prospects it writes, so
each lead is written once in total; a run that finds prospects claimed waits for the claims to end
and does what is still to do; a claimant killed mid-write holds its prospects no longer than its
lease, and a retry of the same task takes them back at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import D365Error
from b2b_onboarding.flow import sync
from b2b_onboarding.flow.claims import LEASE_FLOOR, lease
from b2b_onboarding.store.state import StateStore
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin

STEPS = Path(__file__).parents[1] / "steps_process.py"
PROSPECTS = [f"P-{n:06d}" for n in range(1, 13)]
KEYS = [("usrt", pid) for pid in PROSPECTS]
# A run's first write: a bulk upsert, or one lead's create. Held before it lands, it keeps the run
# between its read of Sales and its write while the other run comes: without claims, both would write.
FIRST_WRITE = {True: {"route": "UpsertMultiple", "method": "POST"}, False: {"route": r"leads\(", "method": "PATCH"}}
FIRE_TIMEOUT_S = 60


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def seed(admin: FakeAdmin, prospects: list[str]) -> None:
    admin.seed_prospects([{"dataAreaId": "usrt", "ProspectId": pid, "ProspectName": f"Ada Lovelace{n}",
                           "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example"}
                          for n, pid in enumerate(prospects, start=1)])  # fmt: skip


def seed_and_pull(world, admin: FakeAdmin, state_url: str) -> None:
    seed(admin, PROSPECTS)
    commerce, store = CommerceClient.connect(world.settings(world.endpoints.commerce)), StateStore(state_url)
    with commerce.odata:
        sync.pull_prospects(commerce, store, "usrt", "manual__pull")
    store.close()


def sales_of(world, **extra) -> SalesClient:
    return SalesClient.connect(world.settings(world.endpoints.dataverse, batch_size=3, **extra))


def lead_writes(admin: FakeAdmin) -> int:
    return admin.counts()["dataverse"]["writes"]["leads"]


def leads_per_prospect(seller) -> Counter:
    leads = seller.view("All Commerce B2B leads")
    return Counter((lead["msdyn_prospectid"], lead["_msdyn_company_value"]) for lead in leads)


def wait_until_fired(admin: FakeAdmin, running: Callable[[], bool]) -> None:
    deadline = time.monotonic() + FIRE_TIMEOUT_S
    while admin.faults()["rules"][0]["fired"] == 0:
        assert running(), "the run ended before its first write"
        assert time.monotonic() < deadline, "the run never reached its first write"
        time.sleep(0.02)


def in_thread(work: Callable[[], dict]) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_lease_outlasts_the_requests_it_guards_as_the_clients_timeouts_and_retries_bound_them(world):
    def sales(**extra) -> SalesClient:
        return SalesClient.connect(world.settings(world.endpoints.dataverse, **extra))

    backoffs = 0.5 + 1 + 2 + 4 + 8  # the longest waits before attempts 2 to 6
    assert lease(sales(), 2) == timedelta(seconds=2 * (6 * 60 + backoffs)), "6 attempts of 60 s by default"
    assert lease(sales(timeout_s=120, max_attempts=3), 1) == timedelta(seconds=3 * 120 + 0.5 + 1)
    assert lease(sales(timeout_s=5, max_attempts=1), 2) == LEASE_FLOOR


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "one by one"])
def test_two_runs_pushing_the_same_prospects_at_once_write_each_lead_once(world, admin, seller, state_url, bulk):
    seed_and_pull(world, admin, state_url)
    stores = [StateStore(state_url), StateStore(state_url)]  # an engine each, as two workers
    clients = [sales_of(world, bulk=bulk), sales_of(world, bulk=bulk)]
    admin.add_fault(system="dataverse", kind="slow", delay_s=3, phase="before", count=1, **FIRST_WRITE[bulk])

    first, outcome = in_thread(lambda: sync.push_leads(clients[0], stores[0], "usrt", "scheduled__first"))
    wait_until_fired(admin, first.is_alive)
    second = sync.push_leads(clients[1], stores[1], "usrt", "scheduled__second")  # while the first holds its write
    first.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    results = [outcome["result"], second]

    assert lead_writes(admin) == len(PROSPECTS), "every lead upserted exactly once in total"
    assert sum(result.get("created", 0) for result in results) == len(PROSPECTS)
    assert not any(result.get("adopted") or result.get("failed") for result in results), results
    assert second["claimed by another run"] >= 1, "the second run met the first one's claims and says so"
    assert leads_per_prospect(seller) == Counter((pid, company_id("usrt")) for pid in PROSPECTS)
    tracked = stores[0].frame()
    assert set(tracked["stage"]) == {"lead_open"} and tracked["lead_id"].notna().all()
    assert stores[0].claimed("push", KEYS) == {}, "no claim outlives its run"
    for client, store in zip(clients, stores):
        client.odata.close()
        store.close()


def kill_mid_write(world, admin: FakeAdmin, state_url: str, run_id: str) -> None:
    """The sync (pull, push) in a process of its own, SIGKILLed once the upsert of its first batch
    (one batch at a time) has landed and before it could record it: that batch's claims stay behind,
    the next batch was never claimed. Its requests time out after 5 s, in one attempt, so its lease
    is the floor's."""
    admin.add_fault(system="dataverse", kind="slow", delay_s=120, phase="after", count=1, **FIRST_WRITE[True])

    def settings(resource: str, **extra) -> dict:
        fields = world.settings(resource, **extra).model_dump(mode="json")
        return fields | {"client_secret": world.cast.integration["client_secret"]}

    connections = {"commerce": settings(world.endpoints.commerce), "state_url": state_url,
                   "sales": settings(world.endpoints.dataverse, batch_size=3, max_concurrency=1, timeout_s=5,
                                     max_attempts=1)}  # fmt: skip
    env = {**os.environ, "STEPS_CONNECTIONS": json.dumps(connections)}
    process = subprocess.Popen([sys.executable, str(STEPS), "sync", run_id], env=env, stderr=subprocess.PIPE)
    wait_until_fired(admin, lambda: process.poll() is None)
    process.send_signal(signal.SIGKILL)
    process.wait()
    admin.clear_faults()


def test_a_claimant_killed_mid_write_blocks_another_run_no_longer_than_its_lease(world, admin, seller, state_url):
    prospects = PROSPECTS[:6]
    seed(admin, prospects)
    kill_mid_write(world, admin, state_url, "scheduled__killed")
    store = StateStore(state_url)
    keys = [("usrt", pid) for pid in prospects]
    held = store.claimed("push", keys)
    assert {owner for owner, _ in held.values()} == {"scheduled__killed"} and set(held) == set(keys[:3])
    until = max(until for _, until in held.values())
    assert until <= datetime.now(UTC) + LEASE_FLOOR, "the lease of a client with 5 s timeouts: the floor"
    assert lead_writes(admin) == 3, "the first batch landed, unrecorded"

    sales = sales_of(world)
    pushed = sync.push_leads(sales, store, "usrt", "scheduled__next")
    done = datetime.now(UTC)

    assert until <= done <= until + timedelta(seconds=10), f"waited until {done}, the lease ran out at {until}"
    # The free batch at once; the claimed one once its lease ran out: found in Sales and adopted.
    assert pushed == {"step": "push", "legal_entity": "usrt", "created": 3, "adopted": 3, "tagged": 0,
                      "claimed by another run": 3}  # fmt: skip
    assert lead_writes(admin) == len(prospects), "each lead written once"
    assert leads_per_prospect(seller) == Counter((pid, company_id("usrt")) for pid in prospects)
    assert store.claimed("push", keys) == {}
    sales.odata.close()
    store.close()


def test_a_retry_of_the_killed_task_takes_its_claims_back_at_once(world, admin, state_url):
    prospects = PROSPECTS[:6]
    seed(admin, prospects)
    kill_mid_write(world, admin, state_url, "scheduled__killed")
    store = StateStore(state_url)
    assert len(store.claimed("push", [("usrt", pid) for pid in prospects])) == 3

    sales = sales_of(world)
    started = time.monotonic()
    pushed = sync.push_leads(sales, store, "usrt", "scheduled__killed")  # outside Airflow the run names the task
    assert time.monotonic() - started < LEASE_FLOOR.total_seconds() / 3, "it did not wait for its own claims"
    assert pushed == {"step": "push", "legal_entity": "usrt", "created": 3, "adopted": 3, "tagged": 0}
    assert lead_writes(admin) == len(prospects)
    sales.odata.close()
    store.close()


def test_a_failed_push_leaves_no_claim_behind(world, admin, state_url):
    seed_and_pull(world, admin, state_url)
    store, sales = StateStore(state_url), sales_of(world)
    admin.add_fault(system="dataverse", status=403, route="UpsertMultiple", method="POST", count=100)
    with pytest.raises(D365Error, match="403"):
        sync.push_leads(sales, store, "usrt", "scheduled__denied")
    assert store.claimed("push", KEYS) == {}, "released at the end of the task, whatever happened"
    admin.clear_faults()
    assert sync.push_leads(sales, store, "usrt", "scheduled__next")["created"] == len(PROSPECTS)
    sales.odata.close()
    store.close()


def test_two_runs_correcting_the_same_leads_at_once_update_each_once(world, admin, clerk, state_url):
    seed_and_pull(world, admin, state_url)
    store = StateStore(state_url)
    sales = sales_of(world)
    sync.push_leads(sales, store, "usrt", "manual__push")
    corrected = PROSPECTS[:4]
    for pid in corrected:
        clerk.correct("usrt", pid, CompanyName=f"{pid} Renamed Ltd")
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    with commerce.odata:
        assert sync.pull_prospects(commerce, store, "usrt", "manual__pull")["corrected"] == len(corrected)
    writes = lead_writes(admin)
    admin.add_fault(system="dataverse", kind="slow", delay_s=3, phase="before", count=1, route="UpdateMultiple",
                    method="POST")  # fmt: skip

    other_store, other_sales = StateStore(state_url), sales_of(world)
    first, outcome = in_thread(lambda: sync.correct_leads(sales, store, "usrt", "scheduled__first"))
    wait_until_fired(admin, first.is_alive)
    second = sync.correct_leads(other_sales, other_store, "usrt", "scheduled__second")
    first.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")

    assert lead_writes(admin) - writes == len(corrected), "each lead updated once"
    assert outcome["result"]["corrected"] == len(corrected)
    assert second == {"step": "correct leads", "legal_entity": "usrt", "claimed by another run": len(corrected)}
    assert store.frame(keys=[("usrt", pid) for pid in corrected])["lead_outdated"].isna().all()
    for client in (sales, other_sales):
        client.odata.close()
    for each in (store, other_store):
        each.close()
