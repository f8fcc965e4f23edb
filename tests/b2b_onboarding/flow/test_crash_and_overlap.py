"""Crash safety and overlapping runs, with real processes against the fakes: a step SIGKILLed right
after one of its writes landed (before it could record it), then run again; and two or three runs
of the flow at once on one state store. Each ends exactly as an uninterrupted run does: one lead
per prospect, one customer of each kind, one hierarchy and one email per decided prospect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.flow import reconcile, sync
from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP, OUTCOMES

RUN = "manual__crash"
STEPS = Path(__file__).parents[1] / "steps_process.py"
PLAN = ("won", "lost", "disqualified", "qualified", "untouched", "won", "lost", "won")
FIRE_TIMEOUT_S = 60


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def clients(world, admin: FakeAdmin) -> Iterator[tuple[CommerceClient, SalesClient]]:
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse, batch_size=3))
    yield commerce, sales
    commerce.odata.close()
    sales.odata.close()


def seed_and_plan(admin: FakeAdmin) -> dict[str, str]:
    admin.seed_prospects([
        {"dataAreaId": "usrt", "ProspectId": f"P-{n:06d}", "ProspectName": f"Ada Lovelace{n}",
         "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example"}
        for n in range(1, len(PLAN) + 1)
    ])  # fmt: skip
    return {f"P-{n:06d}": outcome for n, outcome in enumerate(PLAN, start=1)}


def decide(admin: FakeAdmin, plan: dict[str, str]) -> None:
    answer = admin.decide([{"msdyn_prospectid": pid, "company": "usrt", "outcome": outcome}
                           for pid, outcome in plan.items() if outcome != "untouched"])  # fmt: skip
    assert answer["errors"] == []


def child(world, state_url: str, step: str, run_id: str) -> subprocess.Popen:
    """A process running `step` of the flow, as an Airflow worker would."""

    def settings(resource: str, **extra) -> dict:
        fields = world.settings(resource, **extra).model_dump(mode="json")
        return fields | {"client_secret": world.cast.integration["client_secret"]}

    connections = {"commerce": settings(world.endpoints.commerce),
                   "sales": settings(world.endpoints.dataverse, batch_size=3), "state_url": state_url}  # fmt: skip
    env = {**os.environ, "STEPS_CONNECTIONS": json.dumps(connections)}
    return subprocess.Popen([sys.executable, str(STEPS), step, run_id], env=env, stderr=subprocess.PIPE)


def finished(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-3000:]


def judge(world, admin: FakeAdmin, plan: dict[str, str], store: StateStore) -> None:
    """The end state of an uninterrupted run, and nothing twice."""
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    leads = Counter((lead["msdyn_prospectid"], lead["_msdyn_company_value"])
                    for lead in seller.view("All Commerce B2B leads"))  # fmt: skip
    assert leads == Counter((pid, company_id("usrt")) for pid in plan), "exactly one lead per prospect"
    statuses = {row["ProspectId"]: row["B2BProspectStatus"] for row in clerk.all("Prospects")}
    assert statuses == {pid: OUTCOMES[outcome][0] for pid, outcome in plan.items()}
    emails = Counter((mail["ProspectId"], mail["template"]) for mail in admin.outbox())
    assert emails == Counter({(pid, OUTCOMES[outcome][1]): 1 for pid, outcome in plan.items() if OUTCOMES[outcome][1]})
    qualified = [pid for pid, outcome in plan.items() if outcome in ("won", "lost", "qualified")]
    # HQ numbers the customers: one Organization and one Person per qualified prospect (found by its
    # email), each the one the store recorded, and the account in Sales carries the organization's number.
    customers = clerk.all("CustomersV3")
    email = {pid: f"p{int(pid[2:])}@engines.example" for pid in plan}
    assert Counter((row["dataAreaId"], row["PartyType"], row["PrimaryContactEmail"]) for row in customers) == Counter(
        [("usrt", "Organization", email[pid]) for pid in qualified] + [("usrt", "Person", email[pid]) for pid in qualified]
    )  # fmt: skip
    account_of = {(row["PartyType"], row["PrimaryContactEmail"]): row["CustomerAccount"] for row in customers}
    tracked = store.frame().set_index("prospect_id")
    assert {pid: (tracked.at[pid, "org_customer_account"], tracked.at[pid, "person_customer_account"])
            for pid in qualified} == {pid: (account_of[("Organization", email[pid])], account_of[("Person", email[pid])])
                                      for pid in qualified}  # fmt: skip
    approved = sorted(pid for pid, outcome in plan.items() if outcome == "won")
    assert sorted(row["CustomerHierarchyId"] for row in clerk.all("CustomerHiearchies")) == [f"USRT-{p}" for p in approved]
    nodes = [row for row in clerk.all("CustomerHierarchyNodes") if row["Role"] == "Admin"]
    assert len(nodes) == len(approved)
    clerk.close()
    seller.close()


def unnumbered_accounts(world, plan: dict[str, str], store: StateStore) -> dict[str, str | None]:
    """Qualified prospects whose account in Sales does not carry its organization's customer account
    (dual-write's mapping), as an uninterrupted run leaves it: prospect id -> the account's number."""
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    numbers = {row["accountid"].lower(): row.get("accountnumber") for row in seller.rows("accounts")}
    seller.close()
    tracked = store.frame().set_index("prospect_id")
    qualified = [pid for pid, outcome in plan.items() if outcome in ("won", "lost", "qualified")]
    return {pid: numbers.get(tracked.at[pid, "account_id"]) for pid in qualified
            if numbers.get(tracked.at[pid, "account_id"]) != tracked.at[pid, "org_customer_account"]}  # fmt: skip


def run_to_the_end(clients, store: StateStore, run_id: str) -> None:
    commerce, sales = clients
    sync.pull_prospects(commerce, store, "usrt", run_id)
    sync.push_leads(sales, store, "usrt", run_id)
    reconcile.read_outcomes(sales, store, run_id)
    reconcile.write_customers(commerce, sales, store, "usrt", run_id, CUSTOMER_GROUP)
    reconcile.approve_won(commerce, store, "usrt", run_id)
    reconcile.reject_lost(commerce, store, "usrt", run_id)


# Where the kill lands: right after the first write of a kind has been served (its answer is held,
# as if the worker died before it read it), with the steps before it already done.
KILL_POINTS = {
    "lead upsert": ("sync", "dataverse", "UpsertMultiple", ()),
    "customers changeset": ("reconcile", "commerce", r"\$batch", ()),
    "account numbers": ("reconcile", "dataverse", "UpdateMultiple", ()),
    "approvals changeset": ("reconcile", "commerce", r"\$batch", ("customers",)),
    "rejections changeset": ("reconcile", "commerce", r"\$batch", ("customers", "approvals")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_step_killed_right_after_a_write_ends_as_an_uninterrupted_run(world, admin, clients, state_url, point):
    step, system, route, done_before = KILL_POINTS[point]
    commerce, sales = clients
    store = StateStore(state_url)
    plan = seed_and_plan(admin)
    if step == "reconcile":
        sync.pull_prospects(commerce, store, "usrt", RUN)
        sync.push_leads(sales, store, "usrt", RUN)
        decide(admin, plan)
        reconcile.read_outcomes(sales, store, RUN)
    if "customers" in done_before:
        reconcile.write_customers(commerce, sales, store, "usrt", RUN, CUSTOMER_GROUP)
    if "approvals" in done_before:
        reconcile.approve_won(commerce, store, "usrt", RUN)
    writes_before = admin.counts()[system]["writes"]
    admin.add_fault(system=system, kind="slow", delay_s=120, phase="after", route=route, method="POST", count=1)

    process = child(world, state_url, step, "manual__killed")
    deadline = time.monotonic() + FIRE_TIMEOUT_S
    while admin.faults()["rules"][0]["fired"] == 0:
        if process.poll() is not None:
            pytest.fail(f"the step ended before the write: {process.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "the step never reached the write"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert admin.counts()[system]["writes"] != writes_before, "the write landed before the kill"
    admin.clear_faults()

    if step == "sync":  # the killed task's retry (it takes its claims back at once), then the sellers
        run_to_the_end(clients, store, "manual__killed")
        decide(admin, plan)
    run_to_the_end(clients, store, "manual__after_kill")
    run_to_the_end(clients, store, "manual__again")

    judge(world, admin, plan, store)
    assert store.anomalies().empty
    unnumbered = unnumbered_accounts(world, plan, store)
    store.close()
    assert unnumbered == {}, "every account carries its organization's customer account"


def test_overlapping_runs_and_a_backfill_end_as_one_run(world, admin, clients, state_url):
    plan = seed_and_plan(admin)
    admin.set_limits(latency_ms=40)  # long enough for the runs' requests to interleave
    try:
        runs = [child(world, state_url, "sync", f"scheduled__{n}") for n in range(2)]
        for run in runs:
            finished(run)
        assert admin.counts()["dataverse"]["writes"]["leads"] == len(plan), "each lead written once (claims)"
        decide(admin, plan)
        runs = [child(world, state_url, "reconcile", f"scheduled__{n}") for n in range(2)]
        runs.append(child(world, state_url, "sync", "backfill__2026-11-01"))  # a backfill of the sync alongside
        for run in runs:
            finished(run)
    finally:
        admin.set_limits(latency_ms=0)
    store = StateStore(state_url)
    run_to_the_end(clients, store, "manual__settle")  # whatever a loser of a race left for later

    judge(world, admin, plan, store)
    assert store.anomalies().empty
    assert unnumbered_accounts(world, plan, store) == {}, "every account carries its organization's customer account"
    decided = store.frame().set_index("prospect_id")["decision"].to_dict()
    assert decided == {pid: {"Approved": "approved", "Rejected": "rejected"}.get(OUTCOMES[outcome][0])
                       for pid, outcome in plan.items()}  # fmt: skip
    store.close()
