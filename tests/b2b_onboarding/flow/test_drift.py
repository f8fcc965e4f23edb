"""The drift check finds every planted disagreement between Commerce and Sales, and nothing else."""

from __future__ import annotations

import pandas as pd

from b2b_onboarding.flow.drift import decided_before_tracking, find_drift

COMPANIES = {"c-usrt": "usrt", "c-usmf": "usmf"}


def prospects(*rows):
    return pd.DataFrame(rows, columns=["legal_entity", "prospect_id", "status"])


def leads(*rows):
    """(leadid, key, statecode, status): a key `usrt:P-1` as earlier versions wrote it, or
    (`P-1`, company id) as dual-write and this version key a lead."""
    return pd.DataFrame([(lead_id, *(key if isinstance(key, tuple) else (key, None)), state, status)
                         for lead_id, key, state, status in rows],
                        columns=["leadid", "msdyn_prospectid", "_msdyn_company_value", "statecode",
                                 "msdyn_b2bprospectstatus"])  # fmt: skip


def tracked(*rows):
    return pd.DataFrame(rows, columns=["legal_entity", "prospect_id", "stage", "lead_id"])


def test_planted_disagreements_are_found_and_agreement_is_silent():
    hq = prospects(
        ("usrt", "P-1", "Pending"), ("usrt", "P-2", "Approved"), ("usrt", "P-3", "Rejected"),
        ("usrt", "P-4", "Pending"),  # planted: no lead
        ("usmf", "P-1", "Approved"),  # planted: approved, but the lead was disqualified
        ("usmf", "P-2", "Rejected"),  # planted: rejected, but the lead is still open
        ("usmf", "P-9", "Pending"),  # kept as invalid by the sync: no lead on purpose
    )  # fmt: skip
    sales = leads(
        ("l1", ("P-1", "c-usrt"), 0, 0), ("l2", "USRT:P-2", 1, 1),  # a key typed in another case is the same key
        ("l3", ("p-3", "C-USRT"), 2, 2),
        ("l5", ("P-1", "c-usmf"), 2, 0), ("l6", "usmf:P-2", 0, 0),
        ("l7", ("P-404", "c-usrt"), 0, 0),  # planted: a lead whose prospect is gone
    )  # fmt: skip
    found = find_drift(hq, sales, tracked(("usmf", "P-9", "invalid", None)), COMPANIES)
    by_kind = {kind: sorted(map(tuple, rows[["legal_entity", "prospect_id", "lead_id"]].values.tolist()),
                            key=str) for kind, rows in found.groupby("kind")}  # fmt: skip
    assert by_kind == {
        "missing lead": [("usrt", "P-4", None)],
        "lead without prospect": [(None, None, "l7")],
        "state disagreement": [("usmf", "P-1", "l5"), ("usmf", "P-2", "l6")],
    }
    assert found.loc[found["lead_id"] == "l5", "detail"].item() == "prospect is Approved in Commerce but its lead is disqualified"
    assert "P-404 (company usrt)" in found.loc[found["lead_id"] == "l7", "detail"].item()


def test_a_prospect_decided_in_commerce_before_it_had_a_lead_is_not_a_missing_lead():
    hq = prospects(("usrt", "P-1", "Approved"), ("usrt", "P-2", "Rejected"), ("usrt", "P-3", "Approved"),
                   ("usrt", "P-4", "Pending"))  # fmt: skip
    # P-3 had a lead the store knows of: its loss is drift. P-4 is untracked but Pending: it needs one.
    found = find_drift(hq, leads(), tracked(("usrt", "P-3", "approved", "l3")), COMPANIES)
    assert sorted(found["prospect_id"]) == ["P-3", "P-4"]
    decided = decided_before_tracking(hq, leads(("l1", ("P-1", "c-usrt"), 1, 1)), tracked(("usrt", "P-3", "approved", "l3")),
                                      COMPANIES)  # fmt: skip
    assert decided.to_dict("records") == [
        {"legal_entity": "usrt", "prospect_id": "P-1", "decision": "approved", "lead_id": "l1"},
        {"legal_entity": "usrt", "prospect_id": "P-2", "decision": "rejected", "lead_id": None},
    ]


def test_no_drift_gives_an_empty_frame_with_the_columns():
    found = find_drift(prospects(("usrt", "P-1", "Pending")), leads(("l1", "usrt:P-1", 1, 0)), tracked(), COMPANIES)
    assert found.empty and list(found.columns) == ["kind", "legal_entity", "prospect_id", "lead_id", "detail"]


def test_an_empty_commerce_is_compared_without_failing():  # a fresh deployment's first night
    prospects = pd.DataFrame(columns=["legal_entity", "prospect_id", "status"])
    assert find_drift(prospects, leads(), tracked(), COMPANIES).empty
