"""The nightly drift check: every B2B prospect in Commerce against every Commerce B2B lead in Sales,
whatever the state store believes, so that what the flow missed or someone changed by hand shows."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .commerce import CommerceClient
from .prospects import prospect_key
from .sales import DRIFT_LEAD_COLUMNS, SalesClient
from .store import DRIFT_COLUMNS, StateStore

# Lead states each prospect status allows: an approval needs a qualified lead; a rejection a lead
# that was disqualified, or qualified with its opportunity then lost.
_ALLOWED_LEAD_STATES = {"Approved": {1}, "Rejected": {1, 2}}
_LEAD_STATE_NAMES = {0: "open", 1: "qualified", 2: "disqualified"}


def find_drift(prospects: pd.DataFrame, leads: pd.DataFrame, invalid: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """Disagreements between Commerce and Sales, one row each with DRIFT_COLUMNS.

    `prospects`: legal_entity, prospect_id, status (HQ's B2BProspectStatus); `leads`: leadid,
    msdyn_prospectid, statecode; `invalid`: keys of prospects the sync keeps as bad records (they
    have no lead on purpose and are reported elsewhere)."""
    keyed = prospects.assign(
        key=[prospect_key(le, pid) for le, pid in zip(prospects["legal_entity"], prospects["prospect_id"])]
    )
    merged = keyed.merge(leads, left_on="key", right_on="msdyn_prospectid", how="outer", indicator=True)
    kept_invalid = set(invalid)
    missing = merged[merged["_merge"] == "left_only"]
    missing = missing.loc[pd.Series([(le, pid) not in kept_invalid for le, pid in
                                     zip(missing["legal_entity"], missing["prospect_id"])], index=missing.index, dtype=bool)]  # fmt: skip
    orphans = merged[merged["_merge"] == "right_only"]
    both = merged[merged["_merge"] == "both"]
    disagree = both.loc[pd.Series([int(state) not in _ALLOWED_LEAD_STATES.get(status, {0, 1, 2})
                                   for status, state in zip(both["status"], both["statecode"])], index=both.index, dtype=bool)]  # fmt: skip
    findings = [
        pd.DataFrame({"kind": "missing lead", "legal_entity": missing["legal_entity"],
                      "prospect_id": missing["prospect_id"], "lead_id": None,
                      "detail": "B2B prospect (" + missing["status"] + ") has no Commerce B2B lead in Sales"}),
        pd.DataFrame({"kind": "lead without prospect", "legal_entity": None, "prospect_id": None,
                      "lead_id": orphans["leadid"],
                      "detail": "lead " + orphans["msdyn_prospectid"] + " names no B2B prospect in Commerce"}),
        pd.DataFrame({"kind": "state disagreement", "legal_entity": disagree["legal_entity"],
                      "prospect_id": disagree["prospect_id"], "lead_id": disagree["leadid"],
                      "detail": [f"prospect is {status} in Commerce but its lead is {_LEAD_STATE_NAMES.get(int(s), s)}"
                                 for status, s in zip(disagree["status"], disagree["statecode"])]}),
    ]  # fmt: skip
    result = pd.concat([frame for frame in findings if len(frame)], ignore_index=True) if any(
        len(frame) for frame in findings) else pd.DataFrame(columns=list(DRIFT_COLUMNS))  # fmt: skip
    return result[list(DRIFT_COLUMNS)].astype(object).where(result[list(DRIFT_COLUMNS)].notna(), None)


def check_drift(
    commerce: CommerceClient, sales: SalesClient, store: StateStore, legal_entities: Iterable[str], run_id: str
) -> tuple[dict, pd.DataFrame]:
    """Reads both sides in full (a few columns, page by page), keeps the findings in the store
    under this run, and returns a summary and the findings."""
    prospects = pd.DataFrame(
        [{"legal_entity": row["dataAreaId"].lower(), "prospect_id": row["ProspectId"], "status": row["B2BProspectStatus"]}
         for legal_entity in legal_entities
         for page in commerce.iter_prospect_pages(legal_entity, status=None) for row in page],
        columns=["legal_entity", "prospect_id", "status"],
    )  # fmt: skip
    leads = pd.DataFrame(
        [row for page in sales.iter_commerce_lead_pages() for row in page], columns=list(DRIFT_LEAD_COLUMNS)
    )
    tracked = store.frame(columns=["stage"])
    invalid = tracked.loc[tracked["stage"] == "invalid", ["legal_entity", "prospect_id"]].itertuples(index=False, name=None)
    findings = find_drift(prospects, leads, invalid)
    store.record_drift(findings, run_id)
    summary = {"step": "drift check", "legal_entity": "*", "prospects": len(prospects), "leads": len(leads),
               **findings["kind"].value_counts().to_dict()}  # fmt: skip
    return summary, findings
