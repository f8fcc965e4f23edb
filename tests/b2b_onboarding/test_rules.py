import pandas as pd

from b2b_onboarding import rules
from b2b_onboarding.rules import Stage
from b2b_onboarding.store import PROSPECT_COLUMNS


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


def test_opportunity_outcomes_map_state_codes():
    frame = tracked(
        {"prospect_id": "P-1", "lead_id": "a", "opportunity_id": "o1", "opportunity_state": None},
        {"prospect_id": "P-2", "lead_id": "b", "opportunity_id": "o2", "opportunity_state": None},
        {"prospect_id": "P-3", "lead_id": "c", "opportunity_id": "o3", "opportunity_state": None},
    )
    opportunities = pd.DataFrame([
        {"opportunityid": "o1", "statecode": 1}, {"opportunityid": "o2", "statecode": 2},
        {"opportunityid": "o3", "statecode": 0},
    ])  # fmt: skip
    changes = rules.opportunity_outcomes(frame, opportunities).set_index("prospect_id")["opportunity_state"]
    assert changes.to_dict() == {"P-1": "won", "P-2": "lost", "P-3": "open"}


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
