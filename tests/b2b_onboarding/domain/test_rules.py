import pandas as pd

from b2b_onboarding.domain import rules
from b2b_onboarding.domain.rules import Stage
from b2b_onboarding.store.state import PROSPECT_COLUMNS


def tracked(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame.from_records([{"legal_entity": "usrt", "stage": "lead_open", **row} for row in rows],
                                     columns=list(PROSPECT_COLUMNS))  # fmt: skip


def test_stage_follows_the_flow():
    assert rules.stage_of({}) == Stage.PULLED
    assert rules.stage_of({"validation_error": "bad"}) == Stage.INVALID
    assert rules.stage_of({"lead_id": "l"}) == Stage.LEAD_OPEN
    assert rules.stage_of({"lead_id": "l", "lead_state": "qualified"}) == Stage.QUALIFIED
    assert rules.stage_of({"lead_state": "qualified", "person_party_number": "9"}) == Stage.CUSTOMERS_CREATED
    assert rules.stage_of({"lead_state": "qualified", "opportunity_state": "won"}) == Stage.WON
    assert rules.stage_of({"lead_state": "disqualified"}) == Stage.DISQUALIFIED
    assert rules.stage_of({"opportunity_state": "lost", "decision": "rejected"}) == Stage.REJECTED
    assert rules.stage_of({"opportunity_state": "won", "decision": "approved"}) == Stage.APPROVED


def test_lead_outcomes_report_only_changes_of_undecided_prospects():
    frame = tracked(
        {"prospect_id": "P-1", "lead_id": "a", "lead_state": "open"},
        {"prospect_id": "P-2", "lead_id": "b", "lead_state": "open"},
        {"prospect_id": "P-3", "lead_id": "c", "lead_state": "disqualified", "decision": "rejected"},
        {"prospect_id": "P-4", "lead_id": "d", "lead_state": "disqualified"},
    )
    leads = pd.DataFrame([
        {"leadid": "A", "statecode": 1, "_qualifyingopportunityid_value": "o1",
         "_parentaccountid_value": "acc1", "_parentcontactid_value": "con1"},
        {"leadid": "c", "statecode": 0, "_qualifyingopportunityid_value": None,
         "_parentaccountid_value": None, "_parentcontactid_value": None},
        {"leadid": "d", "statecode": 2, "_qualifyingopportunityid_value": None,
         "_parentaccountid_value": None, "_parentcontactid_value": None},
    ])  # fmt: skip
    changes = rules.lead_outcomes(frame, leads)
    assert changes.to_dict("records") == [
        {"legal_entity": "usrt", "prospect_id": "P-1", "lead_state": "qualified", "opportunity_id": "o1",
         "account_id": "acc1", "contact_id": "con1"},
    ]  # fmt: skip


def opportunity_rows(*rows: tuple[str, int, str | None]) -> pd.DataFrame:
    return pd.DataFrame([{"opportunityid": oid, "statecode": state, "_originatingleadid_value": origin}
                         for oid, state, origin in rows],
                        columns=["opportunityid", "statecode", "_originatingleadid_value"])  # fmt: skip


def test_every_opportunity_of_a_lead_counts_any_won_wins_any_open_waits_all_lost_rejects():
    frame = tracked(
        {"prospect_id": "won-late", "lead_id": "a", "lead_state": "qualified", "opportunity_id": "q1"},
        {"prospect_id": "one-open", "lead_id": "b", "lead_state": "qualified", "opportunity_id": "q2"},
        {"prospect_id": "all-lost", "lead_id": "c", "lead_state": "qualified", "opportunity_id": "q3"},
        {"prospect_id": "no-qualifying", "lead_id": "d", "lead_state": "qualified"},
        {"prospect_id": "untracked-lead", "lead_id": "e", "lead_state": "open"},
    )
    seen = rules.opportunities_of_leads(frame, opportunity_rows(
        ("Q1", 2, "A"), ("late1", 1, "a"),            # the qualifying one lost, one made later won
        ("q2", 2, "b"), ("late2", 0, "b"),            # one lost, one still open: wait
        ("q3", 2, None), ("late3", 2, "c"),           # the qualifying one (no origin) and a later one, both lost
        ("late4", 0, "d"),                            # qualified with none, then one made later
        ("stranger", 1, "z"),                         # another lead's: not ours
    ))  # fmt: skip
    assert sorted(seen["opportunity_id"]) == ["late1", "late2", "late3", "late4", "q1", "q2", "q3"]
    states = rules.opportunity_states(frame, seen).set_index("prospect_id")
    assert states["opportunity_state"].to_dict() == {"won-late": "won", "one-open": "open", "all-lost": "lost",
                                                     "no-qualifying": "open"}  # fmt: skip
    assert states.loc["won-late", "opportunity_id"] == "late1"
    assert states.loc["all-lost", "opportunity_id"] == "q3"  # the qualifying one stands for a lost prospect
    changes = rules.opportunity_outcomes(frame, rules.opportunity_states(frame, seen)).set_index("prospect_id")
    assert changes["opportunity_state"].to_dict() == {"won-late": "won", "one-open": "open", "all-lost": "lost",
                                                      "no-qualifying": "open"}  # fmt: skip
    assert set(rules.to_approve(frame.assign(person_party_number="9").set_index("prospect_id").assign(
        opportunity_state=changes["opportunity_state"]).reset_index())["prospect_id"]) == {"won-late"}  # fmt: skip


def test_a_decided_prospects_opportunities_moving_again_are_reported_not_applied():
    frame = tracked(
        {"prospect_id": "P-1", "lead_id": "a", "opportunity_id": "o1", "opportunity_state": "lost", "decision": "rejected"},
        {"prospect_id": "P-2", "lead_id": "b", "opportunity_id": "o2", "opportunity_state": "won", "decision": "approved"},
    )
    seen = rules.opportunities_of_leads(frame, opportunity_rows(("o1", 2, "a"), ("new", 0, "a"), ("o2", 1, "b")))
    states = rules.opportunity_states(frame, seen)
    assert rules.opportunity_outcomes(frame, states).empty
    moved = rules.opportunities_changed_after_decision(frame, states)
    assert moved.to_dict("records") == [{"legal_entity": "usrt", "prospect_id": "P-1", "decision": "rejected",
                                         "was": "lost", "now": "open"}]  # fmt: skip


def test_a_lead_qualified_without_opportunity_for_longer_than_the_limit_is_flagged():
    from datetime import UTC, datetime

    frame = tracked(
        {"prospect_id": "old", "lead_id": "a", "lead_state": "qualified", "qualified_at": "2026-12-01T00:00:00+00:00"},
        {"prospect_id": "recent", "lead_id": "b", "lead_state": "qualified", "qualified_at": "2026-12-05T12:00:00+00:00"},
        {"prospect_id": "has-one", "lead_id": "c", "lead_state": "qualified", "opportunity_state": "open",
         "qualified_at": "2026-12-01T00:00:00+00:00"},
        {"prospect_id": "decided", "lead_id": "d", "lead_state": "qualified", "decision": "rejected",
         "qualified_at": "2026-12-01T00:00:00+00:00"},
    )
    late = rules.qualified_without_opportunity(frame, datetime(2026, 12, 6, tzinfo=UTC), 2)
    assert list(late["prospect_id"]) == ["old"]
    assert list(rules.qualified_without_opportunity(frame, datetime(2026, 12, 6, tzinfo=UTC), 0.25)["prospect_id"]) == [
        "old", "recent"]  # fmt: skip


def test_only_open_leads_whose_prospect_was_corrected_are_corrected():
    frame = tracked(
        {"prospect_id": "fix", "lead_id": "a", "lead_state": "open", "lead_outdated": "yes"},
        {"prospect_id": "qualified", "lead_id": "b", "lead_state": "qualified", "lead_outdated": "yes"},
        {"prospect_id": "same", "lead_id": "c", "lead_state": "open"},
    )
    assert list(rules.to_correct(frame)["prospect_id"]) == ["fix"]


def test_work_lists_select_what_each_step_must_do():
    frame = tracked(
        {"prospect_id": "Q", "lead_state": "qualified"},
        {"prospect_id": "W", "lead_state": "qualified", "opportunity_state": "won", "person_party_number": "1"},
        {"prospect_id": "W-no-customers", "lead_state": "qualified", "opportunity_state": "won"},
        {"prospect_id": "L", "lead_state": "qualified", "opportunity_state": "lost", "person_party_number": "2"},
        {"prospect_id": "D", "lead_state": "disqualified"},
        {"prospect_id": "done", "lead_state": "disqualified", "decision": "rejected"},
    )
    assert set(rules.needing_customers(frame)["prospect_id"]) == {"Q", "W-no-customers"}
    assert set(rules.to_approve(frame)["prospect_id"]) == {"W"}
    assert set(rules.to_reject(frame)["prospect_id"]) == {"L", "D"}


def test_chunks_cover_each_legal_entitys_work_in_ranges_of_at_most_the_size():
    work = pd.DataFrame({"legal_entity": ["usrt"] * 5 + ["usmf"] * 2,
                         "prospect_id": ["P-5", "P-1", "P-3", "P-2", "P-4", "P-7", "P-6"]})  # fmt: skip
    assert rules.chunks(work, 2) == [
        {"legal_entity": "usmf", "first_id": "P-6", "last_id": "P-7"},
        {"legal_entity": "usrt", "first_id": "P-1", "last_id": "P-2"},
        {"legal_entity": "usrt", "first_id": "P-3", "last_id": "P-4"},
        {"legal_entity": "usrt", "first_id": "P-5", "last_id": "P-5"},
    ]
    usrt = work[work["legal_entity"] == "usrt"]
    covered = [rules.in_range(usrt, chunk["first_id"], chunk["last_id"]) for chunk in rules.chunks(usrt, 2)]
    assert sorted(pid for part in covered for pid in part["prospect_id"]) == sorted(usrt["prospect_id"])
    assert rules.chunks(work.iloc[0:0], 2) == []


def test_a_targeted_run_names_prospects_in_any_case():
    frame = tracked({"prospect_id": "P-000123"}, {"prospect_id": "P-000124"})
    assert list(rules.only(frame, rules.prospect_keys(["USRT/p-000123"]))["prospect_id"]) == ["P-000123"]
