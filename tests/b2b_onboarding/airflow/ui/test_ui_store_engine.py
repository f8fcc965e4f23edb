"""The pages' own read-only engine on the state store: a SQLite store is read as the file its path
names now, also after the file was replaced (a restore, or a test's fresh store), never through a
pooled handle on the old one; and it never writes."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from ui_data import prospect, pulled

from b2b_onboarding.airflow.ui.app import state_store_engine
from b2b_onboarding.store.state import StateStore


def tracked(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return [row[0] for row in connection.execute(sa.text("SELECT prospect_id FROM b2b_prospects ORDER BY 1"))]


def test_a_replaced_sqlite_store_is_read_anew_and_never_written(monkeypatch, tmp_path):
    path = tmp_path / "state.db"
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "generic", "schema": str(path),
                                                              "extra": {"driver": "sqlite"}}))  # fmt: skip
    StateStore(f"sqlite:///{path}").record_pulled(pulled(prospect("usrt", "P-1")), "run-1")
    engine = state_store_engine()
    assert tracked(engine) == ["P-1"]

    for leftover in tmp_path.glob("state.db*"):
        leftover.unlink()
    StateStore(f"sqlite:///{path}").record_pulled(pulled(prospect("usrt", "P-2")), "run-2")
    assert tracked(engine) == ["P-2"]

    with engine.connect() as connection, pytest.raises(sa.exc.OperationalError, match="readonly|query_only"):
        connection.execute(sa.text("DELETE FROM b2b_prospects"))
