"""What an update writes to a prospect's row, on SQLite (the default) and PostgreSQL (production):
the heavy `prospect` only where it changed."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from b2b_onboarding.store.state import StateStore, prospects

PROSPECT = {"CompanyName": "Contoso", "City": "Oslo"}
# The same prospect as stored text in another spelling than the store's own: a rewrite would respell it.
SPELLED_APART = '{"City":   "Oslo",   "CompanyName":   "Contoso"}'


def stored_text(store: StateStore, prospect_id: str) -> str:
    query = sa.select(sa.cast(prospects.c.prospect, sa.Text)).where(prospects.c.prospect_id == prospect_id)
    with store.engine.connect() as connection:
        return connection.execute(query).scalar_one()


def test_an_update_rewrites_the_prospect_only_where_it_changed(url):
    store = StateStore(url)
    ids = ["P-1", "P-2", "P-3", "P-4"]
    store.record_pulled(pd.DataFrame({"legal_entity": "usrt", "prospect_id": ids, "prospect": [PROSPECT] * 4,
                                      "email": None, "error": None}, dtype=object), "run-1")  # fmt: skip
    with store.engine.begin() as connection:
        connection.execute(prospects.update().values(prospect=sa.literal(SPELLED_APART, sa.Text)))  # as is, no JSON
    assert stored_text(store, "P-1") == SPELLED_APART

    changed = store.update_many([
        (("usrt", "P-1"), {"lead_id": "l-1"}, None),
        (("usrt", "P-2"), {"prospect": dict(PROSPECT), "lead_id": "l-2"}, None),  # the prospect as stored
        (("usrt", "P-3"), {"prospect": {"CompanyName": "Fabrikam"}, "lead_id": "l-3", "lead_outdated": "yes"}, None),
        # A later update of a key in the same call keeps the prospect an earlier one changed.
        (("usrt", "P-4"), {"prospect": {"CompanyName": "Northwind"}}, None),
        (("usrt", "P-4"), {"lead_id": "l-4"}, None),
    ], "run-2")  # fmt: skip

    assert changed == 5
    assert stored_text(store, "P-1") == SPELLED_APART and stored_text(store, "P-2") == SPELLED_APART
    frame = store.frame().set_index("prospect_id")
    assert frame.loc["P-1", "prospect"] == PROSPECT and frame.loc["P-2", "prospect"] == PROSPECT
    assert frame.loc["P-3", "prospect"] == {"CompanyName": "Fabrikam"} and frame.loc["P-3", "lead_outdated"] == "yes"
    assert frame.loc["P-4", "prospect"] == {"CompanyName": "Northwind"}
    assert dict(frame["lead_id"]) == {"P-1": "l-1", "P-2": "l-2", "P-3": "l-3", "P-4": "l-4"}
    assert (frame["stage"] == "lead_open").all() and (frame["last_run_id"] == "run-2").all()
    store.close()


def test_an_update_writes_only_the_columns_it_changes(url):
    store = StateStore(url)
    store.record_pulled(pd.DataFrame({"legal_entity": "usrt", "prospect_id": ["P-1", "P-2"], "prospect": [PROSPECT] * 2,
                                      "email": "a@example.com", "error": None}, dtype=object), "run-1")  # fmt: skip
    store.update_many([(("usrt", "P-1"), {"lead_fields": {"subject": "Contoso"}, "account_id": "a-1"}, None)], "run-1")
    before = store.frame().set_index("prospect_id").sort_index()
    sent: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def keep_updates(_connection, _cursor, statement, *_) -> None:
        if statement.startswith("UPDATE"):
            sent.append(statement)

    store.update_many([(("usrt", "P-1"), {"lead_id": "l-1", "lead_state": "open", "account_id": "a-1"}, None),
                       (("usrt", "P-2"), {"lead_id": "l-2", "lead_state": "open"}, None)], "run-2")  # fmt: skip

    # One statement for both rows (they change the same columns); account_id is given as stored: not written.
    assert len(sent) == 1
    assigned = sent[0].split(" SET ")[1].split(" WHERE ")[0]
    assert sorted(part.split("=")[0].strip() for part in assigned.split(",")) == [
        "last_error", "last_run_id", "lead_id", "lead_state", "stage", "updated_at"]  # fmt: skip
    after = store.frame().set_index("prospect_id").sort_index()
    changed = ("lead_id", "lead_state", "stage", "last_run_id", "updated_at")
    untouched = [name for name in after.columns if name not in changed]
    assert after[untouched].equals(before[untouched])
    assert after.loc["P-1", "lead_fields"] == {"subject": "Contoso"} and after.loc["P-1", "account_id"] == "a-1"
    assert dict(after["lead_id"]) == {"P-1": "l-1", "P-2": "l-2"} and (after["stage"] == "lead_open").all()
    assert (after["last_run_id"] == "run-2").all() and (after["updated_at"] > before["updated_at"]).all()
    store.close()


def test_times_and_history_written_past_sqlalchemy_read_and_compare_as_its_own(url):
    store = StateStore(url)
    store.writer = {"dag_id": "b2b_prospect_sync", "task_id": "pull", "map_index": 2}
    store.record_pulled(pd.DataFrame({"legal_entity": "usrt", "prospect_id": ["P-1", "P-2"], "prospect": [PROSPECT] * 2,
                                      "email": None, "error": None}, dtype=object), "run-1")  # fmt: skip
    store.writer = {}
    store.update("usrt", "P-1", "run-2", lead_id="l-1", lead_state="open")
    written = store.frame().set_index("prospect_id").loc["P-1", "updated_at"]
    # The same time written by SQLAlchemy itself into the other row: stored as the very same text.
    with store.engine.begin() as connection:
        connection.execute(prospects.update().where(prospects.c.prospect_id == "P-2").values(updated_at=written))
        as_text = sa.select(prospects.c.prospect_id, sa.cast(prospects.c.updated_at, sa.Text))
        stored = dict(connection.execute(as_text).all())
        later = connection.execute(sa.select(prospects.c.prospect_id).where(prospects.c.updated_at > written)).all()
        same = connection.execute(sa.select(sa.func.count()).where(prospects.c.updated_at == written)).scalar_one()
    assert stored["P-1"] == stored["P-2"] and later == [] and same == 2

    history = store.history("usrt", "P-1")
    assert list(history["to_stage"]) == ["pulled", "lead_open"] and list(history["run_id"]) == ["run-1", "run-2"]
    assert (history.loc[0, "dag_id"], history.loc[0, "task_id"], history.loc[0, "map_index"]) == (
        "b2b_prospect_sync", "pull", 2)  # fmt: skip
    assert history.loc[1, ["dag_id", "task_id", "map_index"]].isna().all()
    assert history.loc[1, "at"] == written
    store.close()
