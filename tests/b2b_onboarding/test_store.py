import pandas as pd
import pytest

from b2b_onboarding.store import StateStore


@pytest.fixture
def store(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.close()


def pulled(*rows):
    return pd.DataFrame.from_records(
        [{"legal_entity": "usrt", "prospect": {"CompanyName": "Contoso"}, "error": None, **row} for row in rows]
    )


def test_pulled_prospects_are_tracked_once(store):
    assert store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1") == {"new": 1, "refreshed": 0, "unchanged": 0}
    assert store.record_pulled(pulled({"prospect_id": "P-1"}), "run-2") == {"new": 0, "refreshed": 0, "unchanged": 1}
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


def test_a_prospect_with_a_lead_is_never_refreshed_from_commerce(store):
    store.record_pulled(pulled({"prospect_id": "P-1"}), "run-1")
    store.update("usrt", "P-1", "run-1", lead_id="l-1", lead_state="open")
    counts = store.record_pulled(pulled({"prospect_id": "P-1", "prospect": {"CompanyName": "Changed"}}), "run-2")
    assert counts["unchanged"] == 1
    assert store.frame().loc[0, "prospect"] == {"CompanyName": "Contoso"}


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
