"""The reconciliation rules: pure functions over pandas frames of tracked prospects and Sales rows.

A tracked-prospects frame has the state store's columns (see `store.PROSPECT_COLUMNS`).
Nothing here performs I/O, so every rule is tested on plain frames.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from enum import StrEnum

import pandas as pd


class Stage(StrEnum):
    INVALID = "invalid"
    PULLED = "pulled"
    LEAD_OPEN = "lead_open"
    QUALIFIED = "qualified"
    CUSTOMERS_CREATED = "customers_created"
    DISQUALIFIED = "disqualified"
    WON = "won"
    LOST = "lost"
    APPROVED = "approved"
    REJECTED = "rejected"


# The columns every rule below reads: enough to plan work without loading each prospect's fields.
RULE_COLUMNS = (
    "legal_entity", "prospect_id", "stage", "lead_id", "lead_state", "opportunity_id", "opportunity_state",
    "account_id", "contact_id", "person_party_number", "decision", "qualified_at", "lead_outdated",
)  # fmt: skip

LEAD_STATES = {0: "open", 1: "qualified", 2: "disqualified"}
OPPORTUNITY_STATES = {0: "open", 1: "won", 2: "lost"}


def _known(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def stage_of(facts: Mapping[str, object]) -> Stage:
    """The furthest step a prospect has reached, derived from what is known about it."""
    if _known(facts.get("decision")):
        return Stage(facts["decision"])
    if facts.get("opportunity_state") == "won":
        return Stage.WON
    if facts.get("opportunity_state") == "lost":
        return Stage.LOST
    if facts.get("lead_state") == "disqualified":
        return Stage.DISQUALIFIED
    if _known(facts.get("person_party_number")):
        return Stage.CUSTOMERS_CREATED
    if facts.get("lead_state") == "qualified":
        return Stage.QUALIFIED
    if _known(facts.get("lead_id")):
        return Stage.LEAD_OPEN
    if _known(facts.get("validation_error")):
        return Stage.INVALID
    return Stage.PULLED


def _changes(merged: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Rows whose new value (right column) differs from the tracked one (left column)."""
    keys = ["legal_entity", "prospect_id"]
    changed = pd.Series(False, index=merged.index)
    for tracked, seen in columns.items():
        changed |= merged[seen].notna() & (merged[tracked].astype("object") != merged[seen].astype("object"))
    result = merged.loc[changed, keys + list(columns.values())]
    return result.rename(columns={seen: tracked for tracked, seen in columns.items()}).reset_index(drop=True)


def lead_outcomes(tracked: pd.DataFrame, decided_leads: pd.DataFrame) -> pd.DataFrame:
    """What sellers did to the leads of undecided prospects: the new lead state and, for a
    qualified lead, the opportunity, account and contact that qualification created."""
    undecided = tracked[tracked["decision"].isna() & tracked["lead_id"].notna()]
    leads = decided_leads.assign(
        new_lead_state=decided_leads["statecode"].map(LEAD_STATES),
        leadid=decided_leads["leadid"].str.lower(),
    )
    merged = undecided.merge(leads, left_on="lead_id", right_on="leadid", how="inner")
    return _changes(
        merged,
        {
            "lead_state": "new_lead_state",
            "opportunity_id": "_qualifyingopportunityid_value",
            "account_id": "_parentaccountid_value",
            "contact_id": "_parentcontactid_value",
        },
    )


OPPORTUNITY_ROW_COLUMNS = ("opportunity_id", "legal_entity", "prospect_id", "state")


def opportunities_of_leads(tracked: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The opportunities (Sales rows: opportunityid, statecode, _originatingleadid_value) that belong
    to tracked prospects: made from their lead (`originatingleadid`, at qualification or later), or
    named as the lead's qualifying opportunity. OPPORTUNITY_ROW_COLUMNS, state as a word."""
    if rows.empty:
        return pd.DataFrame(columns=list(OPPORTUNITY_ROW_COLUMNS), dtype=object)
    seen = pd.DataFrame({
        "opportunity_id": rows["opportunityid"].str.lower(),
        "origin": rows["_originatingleadid_value"].astype("object").map(lambda v: v.lower() if isinstance(v, str) else None),
        "state": rows["statecode"].map(OPPORTUNITY_STATES),
    })  # fmt: skip
    leads = tracked.loc[tracked["lead_id"].notna(), ["legal_entity", "prospect_id", "lead_id"]]
    by_lead = seen.merge(leads, left_on="origin", right_on="lead_id", how="inner")
    qualifying = tracked.loc[tracked["opportunity_id"].notna(), ["legal_entity", "prospect_id", "opportunity_id"]]
    by_qualifying = seen.merge(qualifying, on="opportunity_id", how="inner")
    found = pd.concat([by_lead, by_qualifying], ignore_index=True).drop_duplicates("opportunity_id")
    return found.reindex(columns=list(OPPORTUNITY_ROW_COLUMNS)).astype(object).reset_index(drop=True)


def opportunity_states(tracked: pd.DataFrame, opportunities: pd.DataFrame) -> pd.DataFrame:
    """Every tracked prospect that has opportunities, with the state that counts over all of them:
    any won → won (that one); else any open → open (wait); else all lost → lost. legal_entity,
    prospect_id, opportunity_id, opportunity_state."""
    columns = ["legal_entity", "prospect_id", "opportunity_id", "opportunity_state"]
    if opportunities.empty:
        return pd.DataFrame(columns=columns, dtype=object)
    rank = {"won": 0, "open": 1, "lost": 2}
    qualifying = dict(zip(zip(tracked["legal_entity"], tracked["prospect_id"]), tracked["opportunity_id"]))
    ordered = opportunities.assign(
        rank=opportunities["state"].map(rank),
        # Among equals, the lead's qualifying opportunity stands for the prospect.
        not_qualifying=[qualifying.get(key) != opportunity for key, opportunity in
                        zip(zip(opportunities["legal_entity"], opportunities["prospect_id"]), opportunities["opportunity_id"])],
    ).sort_values(["legal_entity", "prospect_id", "rank", "not_qualifying", "opportunity_id"])  # fmt: skip
    best = ordered.drop_duplicates(["legal_entity", "prospect_id"])
    return pd.DataFrame({"legal_entity": best["legal_entity"], "prospect_id": best["prospect_id"],
                         "opportunity_id": best["opportunity_id"], "opportunity_state": best["state"]},
                        columns=columns, dtype=object).reset_index(drop=True)  # fmt: skip


def opportunity_outcomes(tracked: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """Whether sellers won or lost the opportunities of undecided prospects (`states` from
    `opportunity_states`): the changes to record."""
    undecided = tracked[tracked["decision"].isna()]
    merged = undecided.merge(states.rename(columns={"opportunity_id": "new_opportunity_id",
                                                    "opportunity_state": "new_opportunity_state"}),
                             on=["legal_entity", "prospect_id"], how="inner")  # fmt: skip
    return _changes(merged, {"opportunity_id": "new_opportunity_id", "opportunity_state": "new_opportunity_state"})


def opportunities_changed_after_decision(tracked: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """Decided prospects whose opportunities, taken together, no longer say what the decision was
    made on (reopened, won after a loss...): legal_entity, prospect_id, decision, was, now."""
    decided = tracked[tracked["decision"].notna() & tracked["opportunity_state"].notna()]
    merged = decided.merge(states, on=["legal_entity", "prospect_id"], how="inner", suffixes=("", "_now"))
    moved = merged[merged["opportunity_state_now"] != merged["opportunity_state"]]
    return moved.rename(columns={"opportunity_state": "was", "opportunity_state_now": "now"})[
        ["legal_entity", "prospect_id", "decision", "was", "now"]]  # fmt: skip


def qualified_without_opportunity(tracked: pd.DataFrame, now: datetime, days: float) -> pd.DataFrame:
    """Undecided prospects whose lead was qualified more than `days` ago and that still have no
    opportunity: nothing can approve or reject them until a seller makes one."""
    waiting = tracked[(tracked["lead_state"] == "qualified") & tracked["decision"].isna()
                      & tracked["opportunity_state"].isna() & tracked["qualified_at"].notna()]  # fmt: skip
    since = pd.to_datetime(waiting["qualified_at"], utc=True, format="ISO8601")
    now = pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    return waiting[(now - since).dt.total_seconds() > days * 86400]


def leads_changed_after_decision(tracked: pd.DataFrame, leads: pd.DataFrame) -> pd.DataFrame:
    """Leads of decided prospects whose state is no longer the one the decision was made on:
    legal_entity, prospect_id, decision, was, now."""
    decided = tracked[tracked["decision"].notna() & tracked["lead_id"].notna() & tracked["lead_state"].notna()]
    seen = leads.assign(now=leads["statecode"].map(LEAD_STATES), seen_id=leads["leadid"].str.lower())
    merged = decided.merge(seen, left_on="lead_id", right_on="seen_id", how="inner")
    moved = merged[merged["now"].notna() & (merged["now"] != merged["lead_state"])]
    return moved.rename(columns={"lead_state": "was"})[["legal_entity", "prospect_id", "decision", "was", "now"]]


def needing_customers(tracked: pd.DataFrame) -> pd.DataFrame:
    """Qualified leads whose account and contact are not yet Commerce customers."""
    return tracked[(tracked["lead_state"] == "qualified") & tracked["person_party_number"].isna()]


def to_approve(tracked: pd.DataFrame) -> pd.DataFrame:
    """Won opportunities whose customers exist: ready for the hierarchy and the approval."""
    return tracked[
        (tracked["opportunity_state"] == "won") & tracked["decision"].isna() & tracked["person_party_number"].notna()
    ]


def to_reject(tracked: pd.DataFrame) -> pd.DataFrame:
    """Disqualified leads and lost opportunities not yet rejected in Commerce."""
    lost = (tracked["lead_state"] == "disqualified") | (tracked["opportunity_state"] == "lost")
    return tracked[lost & tracked["decision"].isna()]


def to_push(tracked: pd.DataFrame) -> pd.DataFrame:
    """Valid prospects without a lead."""
    return tracked[tracked["stage"] == Stage.PULLED]


def to_correct(tracked: pd.DataFrame) -> pd.DataFrame:
    """Open leads whose prospect was corrected in HQ since the lead was written."""
    return tracked[(tracked["lead_outdated"] == "yes") & (tracked["lead_state"] == "open") & tracked["decision"].isna()]


# Each step's work, by the name the DAGs plan and map it under.
STEPS = {"push": to_push, "correct": to_correct, "customers": needing_customers, "approve": to_approve,
         "reject": to_reject}  # fmt: skip


def chunks(work: pd.DataFrame, size: int) -> list[dict]:
    """Prospect-id ranges per legal entity holding at most `size` prospects of work each: the
    units the DAGs map over, small enough to list in a task name."""
    ranges = []
    for legal_entity, group in work.groupby("legal_entity", sort=True):
        ids = sorted(group["prospect_id"])
        for start in range(0, len(ids), size):
            part = ids[start : start + size]
            ranges.append({"legal_entity": legal_entity, "first_id": part[0], "last_id": part[-1]})
    return ranges


def in_range(work: pd.DataFrame, first_id: str | None, last_id: str | None) -> pd.DataFrame:
    """The rows of a chunk. Compared here, as `chunks` sorted them, not in SQL, whose collation
    may order ids differently and so drop a row from every chunk."""
    ids = work["prospect_id"]
    inside = pd.Series(True, index=work.index)
    if first_id is not None:
        inside &= ids.map(lambda value: value >= first_id)
    if last_id is not None:
        inside &= ids.map(lambda value: value <= last_id)
    return work[inside]


def only(work: pd.DataFrame, keys: Collection[tuple[str, str]] | None) -> pd.DataFrame:
    """The rows of the named (legal entity, prospect id) keys, in any case (as HQ and Dataverse
    compare keys); all rows when `keys` is None."""
    if keys is None:
        return work
    wanted = {(legal_entity.casefold(), prospect_id.casefold()) for legal_entity, prospect_id in keys}
    return work[[(le.casefold(), pid.casefold()) in wanted for le, pid in zip(work["legal_entity"], work["prospect_id"])]]


def prospect_keys(values: Iterable[str]) -> frozenset[tuple[str, str]]:
    """(legal entity, prospect id) keys from the DAG param `prospect_ids` ("usrt/P-000123"); the
    legal entity is lowercased, as the store keeps it. ValueError naming any value of another shape."""
    keys, bad = set(), []
    for value in values:
        legal_entity, _, prospect_id = str(value).strip().partition("/")
        if not legal_entity.strip() or not prospect_id.strip():
            bad.append(value)
            continue
        keys.add((legal_entity.strip().lower(), prospect_id.strip()))
    if bad:
        raise ValueError(f"{', '.join(repr(value) for value in bad)}: a prospect is named <legal entity>/<prospect id>, "
                         "e.g. usrt/P-000123")  # fmt: skip
    return frozenset(keys)


# Stages of a prospect still Pending in Commerce whose seller has not decided yet: what the SLA bounds.
PENDING_STAGES = (Stage.PULLED, Stage.LEAD_OPEN, Stage.QUALIFIED, Stage.CUSTOMERS_CREATED)


def overdue(tracked: pd.DataFrame, now: datetime, sla_days: float) -> pd.DataFrame:
    """Undecided prospects in a pending stage tracked for longer than `sla_days` (from the store's
    created_at): legal_entity, prospect_id, stage, created_at, age_days, last_error; oldest first."""
    columns = ["legal_entity", "prospect_id", "stage", "created_at", "age_days", "last_error"]
    pending = tracked[tracked["decision"].isna() & tracked["stage"].isin([stage.value for stage in PENDING_STAGES])]
    created = pd.to_datetime(pending["created_at"], utc=True)  # SQLite gives naive UTC times
    now = pd.Timestamp(now)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    age_days = (now - created).dt.total_seconds() / 86400
    late = pending.assign(created_at=created, age_days=age_days.round(1))[age_days > sla_days]
    late = late.reindex(columns=columns).sort_values(["age_days", "legal_entity", "prospect_id"],
                                                     ascending=[False, True, True])  # fmt: skip
    return late.reset_index(drop=True)
