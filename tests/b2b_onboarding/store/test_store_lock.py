"""The state store's write lock, on SQLite (the default) and PostgreSQL (production): writers of
different facts of the same prospects, from separate engines as separate workers would be, never
lose each other's facts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from b2b_onboarding.store.state import StateStore

KEYS = [("usrt", f"P-{n:06d}") for n in range(1, 201)]
# Facts each writer sets: disjoint columns of the same rows.
WRITERS = {
    "lead_id": lambda n: f"lead-{n}",
    "account_id": lambda n: f"account-{n}",
    "contact_id": lambda n: f"contact-{n}",
    "org_customer_account": lambda n: f"C-{n}-ORG",
}


def pulled() -> pd.DataFrame:
    return pd.DataFrame({"legal_entity": [k[0] for k in KEYS], "prospect_id": [k[1] for k in KEYS],
                         "prospect": [{"CompanyName": "X"}] * len(KEYS), "error": [None] * len(KEYS),
                         "email": [f"{k[1]}@x.example" for k in KEYS]}, dtype=object)  # fmt: skip


def test_concurrent_writers_of_the_same_prospects_lose_no_fact(url):
    stores = [StateStore(url) for _ in WRITERS]  # an engine each, as separate workers
    stores[0].record_pulled(pulled(), "manual__pull")

    def write(store: StateStore, column: str) -> None:
        value = WRITERS[column]
        for start in range(0, len(KEYS), 20):  # many small transactions, to interleave with the others
            keys = KEYS[start : start + 20]
            store.update_many([(key, {column: value(n)}, None) for n, key in enumerate(keys, start)], f"run_{column}")

    with ThreadPoolExecutor(len(WRITERS)) as pool:
        list(pool.map(write, stores, WRITERS))

    rows = stores[0].frame().sort_values("prospect_id")
    for column, value in WRITERS.items():
        assert list(rows[column]) == [value(n) for n in range(len(KEYS))], f"{column} lost by a concurrent writer"
    for store in stores:
        store.close()


def test_two_stores_starting_at_once_create_the_schema_once(url):
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: StateStore(url), range(4)))
    assert stores[0].frame().empty
    for store in stores:
        store.close()
