"""Claims in the state store, on SQLite (the default) and PostgreSQL (production): one claimant at a
time holds a prospect for a step, until it releases it (with the record of its outcome, or at the end
of its task) or its lease runs out; a retry of the same task instance takes its claims back at once;
a dry run writes none."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from b2b_onboarding.store.state import DryRunStore, StateStore

KEYS = [("usrt", f"P-{n:06d}") for n in range(1, 41)]
LEASE = timedelta(minutes=5)


def pulled(keys: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame({"legal_entity": [k[0] for k in keys], "prospect_id": [k[1] for k in keys],
                         "prospect": [{"CompanyName": "X"}] * len(keys), "error": [None] * len(keys),
                         "email": [f"{k[1]}@x.example" for k in keys]}, dtype=object)  # fmt: skip


def claim_rows(store: StateStore) -> list[tuple]:
    with store.engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(sa.text(
            "SELECT legal_entity, prospect_id, step, owner FROM b2b_claims")))  # fmt: skip


@pytest.fixture
def store(url):
    store = StateStore(url)
    yield store
    store.close()


def test_a_prospect_is_held_by_one_claimant_until_it_lets_go(store):
    first, second, third = KEYS[:3]
    before = datetime.now(UTC)
    assert store.claim("push", [first, second], "run_a", LEASE) == {first, second}
    assert store.claim("push", [second, third], "run_b", LEASE) == {third}, "run_a holds the second"
    assert store.claim("correct", [first], "run_b", LEASE) == {first}, "a claim is per step"

    held = store.claimed("push", [first, second, third])
    assert {key: owner for key, (owner, _) in held.items()} == {first: "run_a", second: "run_a", third: "run_b"}
    assert all(before + LEASE <= until <= datetime.now(UTC) + LEASE for _, until in held.values())

    # Its own claim again (a retry of the same task): taken back at once, for a new lease.
    time.sleep(0.01)
    assert store.claim("push", [first, second], "run_a", LEASE) == {first, second}
    assert store.claimed("push", [first])[first][1] > held[first][1]

    store.release("push", "run_a", [first])
    assert store.claim("push", [first, second], "run_b", LEASE) == {first}
    store.release("push", "run_b")
    assert claim_rows(store) == [(*first, "correct", "run_b"), (*second, "push", "run_a")]


def test_a_claim_whose_lease_ran_out_is_nobodys(store):
    first, second = KEYS[:2]
    assert store.claim("push", [first, second], "run_killed", timedelta(milliseconds=300)) == {first, second}
    assert store.claim("push", [first], "run_b", LEASE) == set()
    time.sleep(0.4)
    assert store.claimed("push", [first, second]) == {}, "a claim that ran out holds nothing"
    assert store.claim("push", [first], "run_b", LEASE) == {first}
    assert claim_rows(store) == [(*first, "push", "run_b")], "claims that ran out are dropped"


def test_recording_the_outcomes_ends_the_claims_in_the_same_transaction(store):
    first, second = KEYS[:2]
    store.record_pulled(pulled([first]), "manual__pull")
    store.claim("push", [first, second], "run_a", LEASE)
    store.claim("correct", [first], "run_a", LEASE)
    with pytest.raises(KeyError, match="P-000002 is not tracked"):
        store.update_many([(first, {"lead_id": "lead-1"}, None), (second, {"lead_id": "lead-2"}, None)], "run_a",
                          release=("push", "run_a"))  # fmt: skip
    assert set(store.claimed("push", [first, second])) == {first, second}, "nothing recorded: the claims stand"

    store.update_many([(first, {"lead_id": "lead-1"}, None)], "run_a", release=("push", "run_a"))
    assert store.frame()["lead_id"].tolist() == ["lead-1"]
    assert store.claimed("push", [first, second]) == {}, "every claim of the claimant on the step ended"
    assert set(store.claimed("correct", [first])) == {first}, "its claims of another step stand"


def test_the_claimant_is_the_task_instance(url):
    stores = [StateStore(url) for _ in range(3)]
    task = {"dag_id": "b2b_prospect_sync", "task_id": "push_leads", "map_index": 3}
    stores[0].writer = dict(task)
    stores[1].writer = dict(task)  # its retry, in another process
    stores[2].writer = {**task, "map_index": 4}
    run = "scheduled__2026-11-01T00:15:00+00:00"
    assert stores[0].claimant(run) == stores[1].claimant(run) == f"b2b_prospect_sync/{run}/push_leads/3"
    assert stores[2].claimant(run) != stores[0].claimant(run)
    assert stores[0].claimant("backfill__2026-11-01T00:30:00+00:00") != stores[0].claimant(run)

    assert stores[0].claim("push", KEYS[:2], stores[0].claimant(run), LEASE) == set(KEYS[:2])
    assert stores[1].claim("push", KEYS[:2], stores[1].claimant(run), LEASE) == set(KEYS[:2]), "the retry's"
    assert stores[2].claim("push", KEYS[:2], stores[2].claimant(run), LEASE) == set()
    stores.append(StateStore(url))
    assert stores[-1].claimant(run) == run, "outside Airflow (no task instance): the run"
    for store in stores:
        store.close()


def test_claimants_at_once_never_hold_the_same_prospect(url):
    stores = [StateStore(url) for _ in range(6)]  # an engine each, as separate workers

    def claim_all(n: int) -> set[tuple[str, str]]:
        chooser, held = random.Random(n), set()
        for _ in range(15):  # many small claims of overlapping prospects, to interleave with the others
            held |= stores[n].claim("push", chooser.sample(KEYS, 8), f"run_{n}", LEASE)
        return held

    with ThreadPoolExecutor(len(stores)) as pool:
        held = list(pool.map(claim_all, range(len(stores))))

    owners = {key: owner for key, (owner, _) in stores[0].claimed("push", KEYS).items()}
    for n, keys in enumerate(held):
        assert {key: owners[key] for key in keys} == dict.fromkeys(keys, f"run_{n}"), "held by one claimant only"
    assert sum(map(len, held)) == len(owners)
    for store in stores:
        store.close()


def test_a_dry_run_writes_no_claim(store):
    first, second = KEYS[:2]
    store.record_pulled(pulled([first, second]), "manual__pull")
    store.claim("push", [first], "manual__dry", LEASE)  # a real run of the same name holds one
    dry = DryRunStore(store.engine.url.render_as_string(hide_password=False), "manual__dry")
    assert dry.claim("push", [first, second], "manual__dry", LEASE) == {first, second}
    dry.update_many([(second, {"lead_id": "lead-2"}, None)], "manual__dry", release=("push", "manual__dry"))
    dry.release("push", "manual__dry")
    assert claim_rows(store) == [(*first, "push", "manual__dry")]
    dry.close()
