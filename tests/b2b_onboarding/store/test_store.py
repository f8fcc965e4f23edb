import pandas as pd
import pytest


def pulled(*rows):
    return pd.DataFrame.from_records(
        [{"legal_entity": "usrt", "prospect": {"CompanyName": "Contoso"}, "error": None, **row} for row in rows]
    )


def test_pulled_prospects_are_tracked_once(store):
    assert store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1") == {"new": 1, "refreshed": 0, "corrected": 0,
                                                                            "unchanged": 0}  # fmt: skip
    assert store.record_pulled(pulled({"prospect_id": "P-1"}), "run-2") == {"new": 0, "refreshed": 0, "corrected": 0,
                                                                            "unchanged": 1}  # fmt: skip
    frame = store.frame()
    assert len(frame) == 1 and frame.loc[0, "stage"] == "pulled" and frame.loc[0, "last_run_id"] == "run-1"


def test_a_fixed_bad_record_becomes_valid_and_its_history_shows_both(store):
    store.record_pulled(pulled({"prospect_id": "P-1", "prospect": None, "error": "P-1: email bad"}), "run-1")
    assert store.frame().loc[0, "stage"] == "invalid"
    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-2")
    row = store.frame().loc[0]
    assert row["stage"] == "pulled" and row["last_error"] is None
    history = store.history("usrt", "P-1")
    assert list(history["to_stage"]) == ["invalid", "pulled"]
    assert list(history["run_id"]) == ["run-1", "run-2"]
    assert history.loc[0, "error"] == "P-1: email bad"


def test_a_correction_in_commerce_of_a_prospect_with_a_lead_is_taken_flagged_and_in_its_history(store):
    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1")
    store.update("usrt", "P-1", "run-1", lead_id="l-1", lead_state="open")
    assert store.record_pulled(pulled({"prospect_id": "P-1"}), "run-2")["unchanged"] == 1
    counts = store.record_pulled(pulled({"prospect_id": "P-1", "prospect": {"CompanyName": "Changed"}}), "run-3")
    assert counts["corrected"] == 1
    row = store.frame().loc[0]
    assert row["prospect"] == {"CompanyName": "Changed"} and row["lead_outdated"] == "yes" and row["stage"] == "lead_open"
    assert store.history("usrt", "P-1")["detail"].iloc[-1] == "corrected in Commerce: CompanyName"
    # An invalid correction keeps the last valid record, and says why.
    store.record_pulled(pulled({"prospect_id": "P-1", "prospect": None, "error": "P-1: email bad"}), "run-4")
    row = store.frame().loc[0]
    assert row["prospect"] == {"CompanyName": "Changed"} and row["last_error"] == "P-1: email bad"
    # A decided prospect is never changed again.
    store.update("usrt", "P-1", "run-5", lead_state="disqualified", decision="rejected")
    assert store.record_pulled(pulled({"prospect_id": "P-1", "prospect": {"CompanyName": "Late"}}), "run-6")["unchanged"] == 1


def test_prospects_decided_before_the_store_saw_them_are_recorded_as_decided_once(store):
    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1")
    decided = pd.DataFrame([{"legal_entity": "usrt", "prospect_id": "P-1", "decision": "approved", "lead_id": None},
                            {"legal_entity": "usrt", "prospect_id": "P-2", "decision": "approved", "lead_id": "l-2"},
                            {"legal_entity": "usmf", "prospect_id": "P-3", "decision": "rejected", "lead_id": None}])  # fmt: skip
    assert store.track_decided(decided, "run-2") == 2
    assert store.track_decided(decided, "run-3") == 0
    frame = store.frame().set_index("prospect_id")
    assert frame.loc["P-1", "stage"] == "pulled"  # tracked already: left to the flow
    assert (frame.loc["P-2", "stage"], frame.loc["P-2", "lead_id"]) == ("approved", "l-2")
    assert frame.loc["P-3", "stage"] == "rejected"


def test_opportunities_are_kept_per_prospect_and_forgotten_when_deleted(store):
    seen = pd.DataFrame([{"opportunity_id": "o1", "legal_entity": "usrt", "prospect_id": "P-1", "state": "lost"},
                         {"opportunity_id": "o2", "legal_entity": "usrt", "prospect_id": "P-1", "state": "open"}])  # fmt: skip
    store.record_opportunities(seen, "run-1")
    store.record_opportunities(seen.iloc[[1]].assign(state="won"), "run-2")
    kept = store.tracked_opportunities(keys=[("usrt", "P-1")]).set_index("opportunity_id")["state"].to_dict()
    assert kept == {"o1": "lost", "o2": "won"}
    store.record_opportunities(seen.iloc[0:0], "run-3", gone=["o1"])
    assert list(store.tracked_opportunities()["opportunity_id"]) == ["o2"]


def test_updates_derive_the_stage_and_append_only_real_transitions(store):
    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1")
    store.update("usrt", "P-1", "run-1", lead_id="l-1", lead_state="open")
    store.update("usrt", "P-1", "run-2", lead_id="l-1", lead_state="open")  # nothing new
    store.update("usrt", "P-1", "run-3", error="Dataverse: boom")
    store.update("usrt", "P-1", "run-4", lead_state="disqualified")
    history = store.history("usrt", "P-1")
    assert list(history["to_stage"]) == ["pulled", "lead_open", "lead_open", "disqualified"]
    assert list(history["run_id"]) == ["run-1", "run-1", "run-3", "run-4"]
    row = store.frame().loc[0]
    assert row["stage"] == "disqualified" and row["last_error"] is None


def test_unknown_facts_and_untracked_prospects_are_refused(store):
    with pytest.raises(ValueError, match="not facts"):
        store.update("usrt", "P-1", "run", colour="red")
    with pytest.raises(KeyError, match="usrt/P-404"):
        store.update("usrt", "P-404", "run", lead_id="x")


def test_the_same_prospect_id_in_two_legal_entities_is_two_prospects(store):
    store.record_pulled(pulled({"prospect_id": "P-1"}, {"prospect_id": "P-1", "legal_entity": "usmf"}), "run-1")
    assert sorted(store.frame()["legal_entity"]) == ["usmf", "usrt"]


def test_many_updates_apply_in_one_call_and_log_only_stage_changes(store):
    store.record_pulled(pulled(*({"prospect_id": f"P-{n}"} for n in range(500))), "run-1")
    changed = store.update_many(
        [(("usrt", f"P-{n}"), {"lead_id": f"l-{n}", "lead_state": "open"}, None) for n in range(500)]
        + [(("usrt", "P-7"), {}, "Dataverse: refused")],
        "run-2",
    )
    assert changed == 501
    frame = store.frame().set_index("prospect_id")
    assert (frame["stage"] == "lead_open").all() and frame.loc["P-7", "last_error"] == "Dataverse: refused"
    assert list(store.history("usrt", "P-7")["to_stage"]) == ["pulled", "lead_open", "lead_open"]
    assert store.update_many([(("usrt", "P-1"), {"lead_id": "l-1"}, None)], "run-3") == 0
    with pytest.raises(KeyError, match="usrt/P-9999"):
        store.update_many([(("usrt", "P-9999"), {"lead_id": "x"}, None)], "run-3")


def test_frames_select_by_keys_lead_ids_and_columns(store):
    store.record_pulled(pulled(*({"prospect_id": f"P-{n}"} for n in range(1000))), "run-1")
    store.update_many([(("usrt", f"P-{n}"), {"lead_id": f"l-{n}"}, None) for n in range(0, 1000, 2)], "run-1")
    light = store.frame(columns=["stage"])
    assert list(light.columns) == ["legal_entity", "prospect_id", "stage"] and len(light) == 1000
    by_lead = store.frame(lead_ids=[f"l-{n}" for n in range(0, 1000, 2)] + ["l-unknown"])
    assert len(by_lead) == 500
    assert sorted(store.frame(keys=[("usrt", "P-3"), ("usmf", "P-3")])["prospect_id"]) == ["P-3"]
    work = store.work("push", "usrt", "P-10", "P-19")
    assert sorted(work["prospect_id"]) == sorted(f"P-{n}" for n in range(1, 1000, 2) if "P-10" <= f"P-{n}" <= "P-19")
    assert work.loc[0, "prospect"] == {"CompanyName": "Contoso"}


def test_delta_links_are_kept_per_table_and_replaced(store):
    assert store.delta_link("leads") is None
    store.set_delta_link("leads", "https://org/api/data/v9.2/leads?$deltatoken=1", "run-1")
    store.set_delta_link("opportunities", "https://org/api/data/v9.2/opportunities?$deltatoken=9", "run-1")
    store.set_delta_link("leads", "https://org/api/data/v9.2/leads?$deltatoken=2", "run-2")
    assert store.delta_link("leads").endswith("=2") and store.delta_link("opportunities").endswith("=9")


def test_drift_findings_are_kept_per_run_and_a_rerun_replaces_its_own(store):
    findings = pd.DataFrame([{"kind": "missing lead", "legal_entity": "usrt", "prospect_id": "P-1", "lead_id": None,
                              "detail": "no lead"}])  # fmt: skip
    store.record_drift(findings, "run-1")
    store.record_drift(findings, "run-1")
    store.record_drift(findings.iloc[0:0], "run-2")
    assert len(store.drift("run-1")) == 1 and store.drift("run-1").loc[0, "detail"] == "no lead"
    assert store.drift("run-2").empty


def test_a_dry_run_keeps_no_opportunity_note_decided_prospect_nor_closes_an_anomaly(store):
    from b2b_onboarding.store.state import DryRunStore

    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1")
    store.record_anomalies([(("usrt", "P-1"), "qualified_without_opportunity", "waits")], "run-1")
    dry = DryRunStore(str(store.engine.url), "manual__dry")
    dry.record_opportunities(pd.DataFrame([{"opportunity_id": "o1", "legal_entity": "usrt", "prospect_id": "P-1",
                                            "state": "won"}]), "manual__dry")  # fmt: skip
    dry.note([(("usrt", "P-1"), "adopted")], "manual__dry")
    assert dry.resolve_anomalies([("usrt", "P-1")], "qualified_without_opportunity") == 0
    decided = pd.DataFrame([{"legal_entity": "usrt", "prospect_id": "P-9", "decision": "approved", "lead_id": None}])
    assert dry.track_decided(decided, "manual__dry") == 1
    assert set(dry.frame()["prospect_id"]) == {"P-1", "P-9"}  # the dry run sees what it would record
    assert store.tracked_opportunities().empty and list(store.anomalies()["kind"]) == ["qualified_without_opportunity"]
    assert list(store.frame()["prospect_id"]) == ["P-1"] and len(store.history("usrt", "P-1")) == 1
