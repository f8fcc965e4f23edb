"""The tables a run logs: what each step did, where every prospect stands, what a dry run would
write, and what breaks the SLA."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .rules import Stage

# What a step sent and cost, after its outcome counts, with the names the tables show.
_COST = {
    "commerce_requests": "Commerce requests", "commerce_throttled": "Commerce 429s", "commerce_retries": "Commerce retries",
    "dataverse_requests": "Dataverse requests", "dataverse_throttled": "Dataverse 429s",
    "dataverse_retries": "Dataverse retries", "planned_writes": "planned writes (dry run)", "cpu_s": "CPU s",
    "peak_rss_mb": "peak RSS MB",
}  # fmt: skip
_KEYS = ["step", "legal_entity"]
# Rows of a logged table before it is cut (the rest are counted, and kept in the store where stated).
MAX_LOGGED_ROWS = 1000
# Prospects an SLA failure names in its message.
SLA_LISTED = 20


def run_table(results: Iterable[dict]) -> pd.DataFrame:
    """One row per step and legal entity (its chunks summed; peak memory the largest), one column
    per outcome count, then what the step sent and cost."""
    frame = pd.DataFrame.from_records(list(results))
    if frame.empty:
        return frame
    frame = frame.fillna(0)
    how = {name: "max" if name == "peak_rss_mb" else "sum" for name in frame.columns if name not in _KEYS}
    table = frame.groupby(_KEYS, sort=False).agg(how)
    whole = [name for name in table.columns if (table[name] % 1 == 0).all()]
    table = table.astype({name: int for name in whole})
    outcomes = [name for name in table.columns if name not in _COST]
    return table[outcomes + [name for name in _COST if name in table.columns]]


def run_summary(results: Iterable[dict]) -> pd.DataFrame:
    """`run_table` as the report logs it, one line per step and legal entity: what it did (its
    non-zero outcome counts, in words), then the requests it sent to each system, the 429s and
    retries of both, the planned writes of a dry run, CPU seconds and peak memory."""
    table = run_table(results)
    if table.empty:
        return table
    outcomes = [name for name in table.columns if name not in _COST]
    did = [", ".join(f"{name.replace('_', ' ')} {row[name]:g}" for name in outcomes if row[name]) or "nothing to do"
           for row in table[outcomes].to_dict("records")]  # fmt: skip
    summary = pd.DataFrame({"what it did": did}, index=table.index)
    for system in ("commerce", "dataverse"):
        if f"{system}_requests" in table.columns:
            summary[f"{system.capitalize()} requests"] = table[f"{system}_requests"]
    for label, suffix in (("429s", "throttled"), ("retries", "retries")):
        columns = [name for name in table.columns if name.endswith(f"_{suffix}")]
        if columns:
            summary[label] = table[columns].sum(axis=1)
    for name in ("planned_writes", "cpu_s", "peak_rss_mb"):
        if name in table.columns:
            summary[_COST[name]] = table[name]
    return summary


def text(frame: pd.DataFrame, index: bool = True) -> str:
    """A table as the log shows it: text columns left-aligned, so long descriptions read as lines."""
    texts = [name for name in frame.columns if frame[name].map(lambda value: isinstance(value, str)).any()]
    widths = {name: max([len(str(name)), *(len(str(value)) for value in frame[name])]) for name in texts}
    formatters = {name: (lambda value, width=widths[name]: f"{value!s:<{width}}") for name in texts}
    with pd.option_context("display.max_colwidth", None, "display.width", None):
        return frame.to_string(index=index, formatters=formatters, justify="left")


def task_table(result: dict) -> pd.DataFrame:
    """What one task did, one line each: its outcome counts (per outcome, for its legal entity),
    then the requests it sent to each system, the 429s and retries, CPU seconds and peak memory."""
    outcomes = {name.replace("_", " "): value for name, value in result.items() if name not in _KEYS and name not in _COST}
    cost = {label: result[name] for name, label in _COST.items() if name in result}
    column = f"{result.get('step', '')} {result.get('legal_entity', '')}".strip()
    values = {**(outcomes or {"(nothing to do)": 0}), **cost}
    return pd.DataFrame({column: pd.Series(values, dtype=object)})


def stage_counts(tracked: pd.DataFrame) -> pd.DataFrame:
    """Prospects per legal entity and stage, stages in flow order, with a total row."""
    order = [stage.value for stage in Stage]
    table = pd.crosstab(tracked["legal_entity"], pd.Categorical(tracked["stage"], categories=order))
    table = table.loc[:, (table != 0).any(axis=0)]
    table.loc["total"] = table.sum()
    table.columns.name = None
    table.index.name = "legal_entity"
    return table


def plan_summary(planned: pd.DataFrame) -> pd.DataFrame:
    """A dry run's planned writes counted per system, operation and legal entity, with a total."""
    if planned.empty:
        return pd.DataFrame({"writes": []})
    table = planned.fillna({"legal_entity": "*"}).groupby(["system", "operation", "legal_entity"]).size().to_frame("writes")
    table.loc[("total", "", ""), "writes"] = int(table["writes"].sum())
    return table.astype({"writes": int})


def plan_text(planned: pd.DataFrame, limit: int = MAX_LOGGED_ROWS) -> str:
    """The plan as the log shows it: every planned write (up to `limit` rows, then a count)."""
    if planned.empty:
        return "(no writes: Commerce and Sales are as this run would leave them)"
    shown = planned[["system", "operation", "legal_entity", "prospect_id", "what"]].head(limit).reset_index(drop=True)
    more = f"\n… and {len(planned) - limit} more" if len(planned) > limit else ""
    return text(shown.fillna(""), index=False) + more


class SlaBreached(Exception):
    """The nightly `check_sla` found open anomalies or prospects pending longer than the SLA."""


def sla_message(anomalies: pd.DataFrame, late: pd.DataFrame, sla_days: float) -> str:
    """Why the SLA check fails: the counts, then the first `SLA_LISTED` anomalies and late prospects."""
    parts = []
    if len(anomalies):
        parts.append(f"{len(anomalies)} open anomalies")
    if len(late):
        parts.append(f"{len(late)} prospects pending in Commerce longer than the SLA of {sla_days:g} days")
    lines = [f"SLA check failed: {' and '.join(parts)}. Next step: README, Runbook, \"check_sla failed\"."]
    with pd.option_context("display.max_colwidth", 120, "display.width", 250):
        if len(anomalies):
            shown = anomalies[["legal_entity", "prospect_id", "kind", "first_seen", "times_seen", "detail"]]
            lines += [f"Open anomalies (first {min(SLA_LISTED, len(anomalies))} of {len(anomalies)}):",
                      shown.head(SLA_LISTED).to_string(index=False)]  # fmt: skip
        if len(late):
            shown = late[["legal_entity", "prospect_id", "stage", "created_at", "age_days", "last_error"]]
            lines += [f"Pending longer than {sla_days:g} days (first {min(SLA_LISTED, len(late))} of {len(late)}):",
                      shown.head(SLA_LISTED).to_string(index=False)]  # fmt: skip
    return "\n".join(lines)
