"""The state store of a dry run: its steps see what the earlier ones would have recorded, and the
store's own tables (prospects, transitions, delta links, drift findings, anomalies) never change."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from b2b_onboarding.store.state import DryRunStore, StateStore

TABLES = ("b2b_prospects", "b2b_transitions", "b2b_opportunities", "b2b_delta_links", "b2b_drift_findings",
          "b2b_anomalies")  # fmt: skip


def pulled(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame.from_records([{"legal_entity": "usrt", "prospect": {"CompanyName": "Contoso"}, "error": None,
                                       "email": f"{row['prospect_id'].lower()}@contoso.example", **row}
                                      for row in rows])  # fmt: skip


def snapshot(store: StateStore) -> dict[str, list]:
    with store.engine.connect() as connection:
        return {name: sorted(map(repr, connection.execute(sa.text(f"SELECT * FROM {name}")).all())) for name in TABLES}


@pytest.fixture
def real(tmp_path) -> StateStore:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.record_pulled(pulled({"prospect_id": "P-1"}, {"prospect_id": "P-2"}), "manual__real")
    store.update("usrt", "P-1", "manual__real", lead_id="l-1", lead_state="open")
    store.set_delta_link("leads", "https://dv/leads?$deltatoken=1", "manual__real")
    return store


@pytest.fixture
def dry(real: StateStore) -> DryRunStore:
    return DryRunStore(str(real.engine.url), "manual__dry")


def test_a_dry_run_sees_its_own_planned_changes_and_the_store_keeps_none_of_them(real, dry):
    before = snapshot(real)
    assert dry.record_pulled(pulled({"prospect_id": "P-2"}, {"prospect_id": "P-3"}), "manual__dry") == {
        "new": 1, "refreshed": 0, "corrected": 0, "unchanged": 1}  # fmt: skip
    # P-1 has a lead: a correction in HQ is taken (and the lead then outdated), in the overlay only.
    corrected = pulled({"prospect_id": "P-1", "prospect": {"CompanyName": "Contoso Ltd"}})
    assert dry.record_pulled(corrected, "manual__dry") == {"new": 0, "refreshed": 0, "corrected": 1, "unchanged": 0}
    dry.record_opportunities(pd.DataFrame([{"opportunity_id": "o-1", "legal_entity": "usrt", "prospect_id": "P-1",
                                            "state": "open"}]), "manual__dry")  # fmt: skip
    dry.update("usrt", "P-2", "manual__dry", lead_id="l-2", lead_state="open")
    dry.update_many([(("usrt", "P-1"), {"lead_state": "qualified", "opportunity_id": "o-1"}, None)], "manual__dry")
    dry.set_delta_link("leads", "https://dv/leads?$deltatoken=2", "manual__dry")
    dry.record_drift(pd.DataFrame([{"kind": "missing lead", "legal_entity": "usrt", "prospect_id": "P-3",
                                    "lead_id": None, "detail": "x"}]), "manual__dry")  # fmt: skip
    assert dry.record_anomalies([(("usrt", "P-1"), "lead_deleted", "gone")], "manual__dry") == 1

    assert snapshot(real) == before
    seen = dry.frame().set_index("prospect_id")
    assert dict(seen["stage"]) == {"P-1": "qualified", "P-2": "lead_open", "P-3": "pulled"}
    assert (seen.at["P-1", "prospect"], seen.at["P-1", "lead_outdated"]) == ({"CompanyName": "Contoso Ltd"}, "yes")
    assert real.frame().set_index("prospect_id").at["P-1", "prospect"] == {"CompanyName": "Contoso"}
    assert real.tracked_opportunities().empty
    assert list(dry.work("push", "usrt")["prospect_id"]) == ["P-3"]
    assert list(dry.work("customers", "usrt")["prospect_id"]) == ["P-1"]
    assert list(dry.frame(lead_ids=["l-2"])["prospect_id"]) == ["P-2"]
    assert list(dry.frame(opportunity_ids=["o-1"])["prospect_id"]) == ["P-1"]
    assert list(dry.frame(keys=[("usrt", "P-3")])["prospect_id"]) == ["P-3"]
    assert dry.frame(keys=[]).empty
    assert dry.delta_link("leads") == "https://dv/leads?$deltatoken=1"
    assert dry.anomalies().empty and dry.drift("manual__dry").empty


def test_another_run_and_the_real_store_do_not_see_a_dry_runs_overlay(real, dry):
    dry.record_pulled(pulled({"prospect_id": "P-3"}), "manual__dry")
    assert set(DryRunStore(str(real.engine.url), "manual__other_dry").frame()["prospect_id"]) == {"P-1", "P-2"}
    assert set(real.frame()["prospect_id"]) == {"P-1", "P-2"}


def test_emails_held_in_a_dry_run_are_in_use_for_its_later_pages(real, dry):
    dry.record_pulled(pulled({"prospect_id": "P-3", "email": "shared@contoso.example"}), "manual__dry")
    assert dry.emails_in_use("usrt", ["shared@contoso.example", "p-2@contoso.example"]) == {
        "shared@contoso.example": "P-3", "p-2@contoso.example": "P-2"}  # fmt: skip
    assert real.emails_in_use("usrt", ["shared@contoso.example"]) == {}


def test_a_decision_recorded_in_a_dry_run_still_never_changes(real, dry):
    dry.update("usrt", "P-1", "manual__dry", decision="rejected")
    with pytest.raises(ValueError, match="never changes"):
        dry.update("usrt", "P-1", "manual__dry", decision="approved")
    assert real.frame().set_index("prospect_id").loc["P-1", "decision"] is None


def test_planned_writes_are_kept_per_task_a_retry_replaces_its_own_and_old_dry_runs_are_purged(real, dry):
    plan = pd.DataFrame([{"system": "Dataverse (Sales)", "operation": "create lead", "legal_entity": "usrt",
                          "prospect_id": f"P-{n}", "what": "lead"} for n in range(3)])  # fmt: skip
    dry.record_planned_writes("push_leads[0]", plan)
    dry.record_planned_writes("push_leads[0]", plan)  # the task retried
    dry.record_planned_writes("push_leads[1]", plan.head(1))
    assert len(real.planned_writes("manual__dry")) == 4
    assert list(real.planned_writes("manual__dry")["task"]) == ["push_leads[0]"] * 3 + ["push_leads[1]"]
    dry.record_pulled(pulled({"prospect_id": "P-3"}), "manual__dry")
    real.purge_dry_runs(older_than=timedelta(days=7))
    assert len(real.planned_writes("manual__dry")) == 4 and len(dry.frame()) == 3
    real.purge_dry_runs(older_than=timedelta(seconds=-1))
    assert real.planned_writes("manual__dry").empty and len(dry.frame()) == 2


def test_a_targeted_scope_limits_every_steps_work(real):
    real.record_pulled(pulled({"prospect_id": "P-3"}), "manual__real")
    assert list(real.work("push", "usrt")["prospect_id"]) == ["P-2", "P-3"]
    assert list(real.scoped([("usrt", "P-3")]).work("push", "usrt")["prospect_id"]) == ["P-3"]
    assert list(real.scoped(None).work("push", "usrt")["prospect_id"]) == ["P-2", "P-3"]


def test_resolved_anomalies_are_closed(real):
    real.record_anomalies([(("usrt", "P-1"), "lead_deleted", "gone"), (("usrt", "P-1"), "lead_reopened", "open"),
                           (("usrt", "P-2"), "lead_deleted", "gone")], "manual__real")  # fmt: skip
    assert real.resolve_anomalies([("usrt", "P-1")], kind="lead_deleted") == 1
    assert real.resolve_anomalies([("usrt", "P-2")]) == 1
    assert list(real.anomalies()["kind"]) == ["lead_reopened"]
