"""The drift check finds every planted disagreement between Commerce and Sales, and nothing else."""

from __future__ import annotations

import pandas as pd

from b2b_onboarding.drift import find_drift


def prospects(*rows):
    return pd.DataFrame(rows, columns=["legal_entity", "prospect_id", "status"])


def leads(*rows):
    return pd.DataFrame(rows, columns=["leadid", "msdyn_prospectid", "statecode", "msdyn_b2bprospectstatus"])


def test_planted_disagreements_are_found_and_agreement_is_silent():
    hq = prospects(
        ("usrt", "P-1", "Pending"), ("usrt", "P-2", "Approved"), ("usrt", "P-3", "Rejected"),
        ("usrt", "P-4", "Pending"),  # planted: no lead
        ("usmf", "P-1", "Approved"),  # planted: approved, but the lead was disqualified
        ("usmf", "P-2", "Rejected"),  # planted: rejected, but the lead is still open
        ("usmf", "P-9", "Pending"),  # kept as invalid by the sync: no lead on purpose
    )  # fmt: skip
    sales = leads(
        ("l1", "usrt:P-1", 0, 0), ("l2", "usrt:P-2", 1, 1), ("l3", "usrt:P-3", 2, 2),
        ("l5", "usmf:P-1", 2, 0), ("l6", "usmf:P-2", 0, 0),
        ("l7", "usrt:P-404", 0, 0),  # planted: a lead whose prospect is gone
    )  # fmt: skip
    found = find_drift(hq, sales, invalid=[("usmf", "P-9")])
    by_kind = {kind: sorted(map(tuple, rows[["legal_entity", "prospect_id", "lead_id"]].values.tolist()),
                            key=str) for kind, rows in found.groupby("kind")}  # fmt: skip
    assert by_kind == {
        "missing lead": [("usrt", "P-4", None)],
        "lead without prospect": [(None, None, "l7")],
        "state disagreement": [("usmf", "P-1", "l5"), ("usmf", "P-2", "l6")],
    }
    assert found.loc[found["lead_id"] == "l5", "detail"].item() == "prospect is Approved in Commerce but its lead is disqualified"
    assert "usrt:P-404" in found.loc[found["lead_id"] == "l7", "detail"].item()


def test_no_drift_gives_an_empty_frame_with_the_columns():
    found = find_drift(prospects(("usrt", "P-1", "Pending")), leads(("l1", "usrt:P-1", 1, 0)))
    assert found.empty and list(found.columns) == ["kind", "legal_entity", "prospect_id", "lead_id", "detail"]


def test_an_empty_commerce_is_compared_without_failing():  # a fresh deployment's first night
    prospects = pd.DataFrame(columns=["legal_entity", "prospect_id", "status"])
    leads = pd.DataFrame(columns=["leadid", "msdyn_prospectid", "statecode"])
    assert find_drift(prospects, leads).empty
