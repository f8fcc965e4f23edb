"""The nightly drift check: every B2B prospect in Commerce against every Commerce B2B lead in Sales,
whatever the state store believes, so that what the flow missed or someone changed by hand shows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import DRIFT_LEAD_COLUMNS, SalesClient, lead_prospect
from b2b_onboarding.domain import prospects as prospects_module
from b2b_onboarding.store.state import DRIFT_COLUMNS, StateStore

# Lead states each prospect status allows: an approval needs a qualified lead; a rejection a lead
# that was disqualified, or qualified with its opportunity then lost.
_ALLOWED_LEAD_STATES = {"Approved": {1}, "Rejected": {1, 2}}
_LEAD_STATE_NAMES = {0: "open", 1: "qualified", 2: "disqualified"}


def find_drift(
    prospects: pd.DataFrame, leads: pd.DataFrame, tracked: pd.DataFrame, company_codes: Mapping[str, str]
) -> pd.DataFrame:
    """Disagreements between Commerce and Sales, one row each with DRIFT_COLUMNS.

    `prospects`: legal_entity, prospect_id, status (HQ's B2BProspectStatus); `leads`: leadid,
    msdyn_prospectid, _msdyn_company_value, statecode, matched to prospects by key as Dataverse
    compares keys (`sales.lead_prospect`); `tracked`: the store's legal_entity, prospect_id, stage,
    lead_id. A prospect the sync keeps as a bad record has no lead on purpose, and one decided in HQ
    before it ever had a lead (by hand, or before a cut-over) needs none: neither is a missing lead."""
    fold = prospects_module.key_fold
    keyed = prospects.assign(key=pd.Series([(fold(le), fold(pid)) for le, pid in zip(prospects["legal_entity"],
                                                                                     prospects["prospect_id"])],
                                           index=prospects.index, dtype=object))  # fmt: skip
    leads = leads.assign(key=pd.Series([lead_prospect(lead, company_codes) for lead in leads.to_dict("records")],
                                       index=leads.index, dtype=object))  # fmt: skip
    merged = keyed.merge(leads, on="key", how="outer", indicator=True)
    invalid = {(fold(le), fold(pid)) for le, pid, stage in zip(tracked["legal_entity"], tracked["prospect_id"], tracked["stage"])
               if stage == "invalid"}  # fmt: skip
    had_lead = {(fold(le), fold(pid)) for le, pid, lead in zip(tracked["legal_entity"], tracked["prospect_id"], tracked["lead_id"])
                if isinstance(lead, str)}  # fmt: skip
    missing = merged[merged["_merge"] == "left_only"]
    missing = missing.loc[pd.Series([key not in invalid and (status == "Pending" or key in had_lead)
                                     for key, status in zip(missing["key"], missing["status"])], index=missing.index,
                                    dtype=bool)]  # fmt: skip
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
                      "detail": ["lead " + _lead_name(lead, company_codes) + " names no B2B prospect in Commerce"
                                 for lead in orphans.to_dict("records")]}),
        pd.DataFrame({"kind": "state disagreement", "legal_entity": disagree["legal_entity"],
                      "prospect_id": disagree["prospect_id"], "lead_id": disagree["leadid"],
                      "detail": [f"prospect is {status} in Commerce but its lead is {_LEAD_STATE_NAMES.get(int(s), s)}"
                                 for status, s in zip(disagree["status"], disagree["statecode"])]}),
    ]  # fmt: skip
    result = pd.concat([frame for frame in findings if len(frame)], ignore_index=True) if any(
        len(frame) for frame in findings) else pd.DataFrame(columns=list(DRIFT_COLUMNS))  # fmt: skip
    return result[list(DRIFT_COLUMNS)].astype(object).where(result[list(DRIFT_COLUMNS)].notna(), None)


def _lead_name(lead: Mapping, company_codes: Mapping[str, str]) -> str:
    company = lead.get("_msdyn_company_value")
    code = company_codes.get(str(company).lower(), str(company)) if isinstance(company, str) else None
    return f"{lead.get('msdyn_prospectid')!s}" + (f" (company {code})" if code else "")


def decided_before_tracking(prospects: pd.DataFrame, leads: pd.DataFrame, tracked: pd.DataFrame,
                            company_codes: Mapping[str, str]) -> pd.DataFrame:  # fmt: skip
    """Prospects HQ shows decided that the store never tracked (decided by dual-write before the
    cut-over, or by hand before any lead): legal_entity, prospect_id, decision, lead_id (its one lead)."""
    fold = prospects_module.key_fold
    known = {(fold(le), fold(pid)) for le, pid in zip(tracked["legal_entity"], tracked["prospect_id"])}
    lead_of: dict[tuple[str, str], list[str]] = {}
    for lead in leads.to_dict("records"):
        if (key := lead_prospect(lead, company_codes)) is not None:
            lead_of.setdefault(key, []).append(str(lead["leadid"]).lower())
    rows = [{"legal_entity": le, "prospect_id": pid, "decision": status.lower(),
             "lead_id": found[0] if len(found := lead_of.get((fold(le), fold(pid)), [])) == 1 else None}
            for le, pid, status in zip(prospects["legal_entity"], prospects["prospect_id"], prospects["status"])
            if status in ("Approved", "Rejected") and (fold(le), fold(pid)) not in known]  # fmt: skip
    return pd.DataFrame(rows, columns=["legal_entity", "prospect_id", "decision", "lead_id"], dtype=object)


# Stages of a prospect whose seller has not decided yet (a decision the flow is acting on is won,
# lost or disqualified: Commerce may already show it while the store catches up).
_SALES_UNDECIDED = {"pulled", "lead_open", "qualified", "customers_created"}


def find_anomalies(prospects: pd.DataFrame, tracked: pd.DataFrame) -> list[tuple[tuple[str, str], str, str]]:
    """Tracked prospects that Commerce shows decided although Sales has not decided them (approved or
    rejected by hand in HQ), or no longer shows at all: (key, kind, detail) for the anomaly log.

    `prospects`: legal_entity, prospect_id, status (all B2B prospects of the legal entities read);
    `tracked`: the store's legal_entity, prospect_id, stage, decision of those legal entities."""
    open_in_sales = tracked[tracked["decision"].isna() & tracked["stage"].isin(_SALES_UNDECIDED)]
    merged = open_in_sales.merge(prospects, on=["legal_entity", "prospect_id"], how="left")
    found = []
    for row in merged.to_dict("records"):
        key, record = (row["legal_entity"], row["prospect_id"]), f"prospect {row['legal_entity']}/{row['prospect_id']}"
        if not isinstance(row["status"], str):
            found.append((key, "prospect_deleted", f"{record} no longer exists in Commerce while Sales has not decided "
                                                   "it; delete or disqualify its lead in Sales"))  # fmt: skip
        elif row["status"] != "Pending":
            found.append((key, "decided_in_commerce",
                          f"{record} is {row['status']} in Commerce, decided by hand before Sales decided (its stage "
                          f"is {row['stage']}); Commerce is left as it is. Next step: close its lead in Sales to "
                          "match, or ask who decided it"))  # fmt: skip
    return found


def check_drift(
    commerce: CommerceClient, sales: SalesClient, store: StateStore, legal_entities: Iterable[str], run_id: str
) -> tuple[dict, pd.DataFrame]:
    """Reads both sides in full (a few columns, page by page), keeps the findings in the store
    under this run, and returns a summary and the findings."""
    legal_entities = list(legal_entities)
    prospects = pd.DataFrame(
        [{"legal_entity": row["dataAreaId"].lower(), "prospect_id": row["ProspectId"], "status": row["B2BProspectStatus"]}
         for legal_entity in legal_entities
         for page in commerce.iter_prospect_pages(legal_entity, status=None) for row in page],
        columns=["legal_entity", "prospect_id", "status"],
    )  # fmt: skip
    leads = pd.DataFrame(
        [row for page in sales.iter_commerce_lead_pages() for row in page], columns=list(DRIFT_LEAD_COLUMNS)
    )
    tracked = store.frame(columns=["stage", "decision", "lead_id"])
    codes = sales.company_codes()
    findings = find_drift(prospects, leads, tracked, codes)
    store.record_drift(findings, run_id)
    anomalies = find_anomalies(prospects, tracked[tracked["legal_entity"].isin({le.lower() for le in legal_entities})])
    if anomalies:
        store.record_anomalies(anomalies, run_id)
    recorded = store.track_decided(decided_before_tracking(prospects, leads, tracked, codes), run_id)
    summary = {"step": "drift check", "legal_entity": "*", "prospects": len(prospects), "leads": len(leads),
               **findings["kind"].value_counts().to_dict(), "anomalies": len(anomalies),
               "recorded as decided": recorded}  # fmt: skip
    return summary, findings
