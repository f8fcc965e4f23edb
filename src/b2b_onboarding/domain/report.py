"""The tables a run logs: what each step did, where every prospect stands, what a dry run would
write, and what breaks the SLA: lines that fit `MAX_LINE_WIDTH`, headers and counts in words."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import pandas as pd

from b2b_onboarding.domain.rules import Stage

# Columns of a logged line: a long text goes on in the lines below, or is cut (the store keeps it whole).
MAX_LINE_WIDTH = 120
# Columns a wrapped column keeps whatever the others take: a line too long reads better than a narrow column.
_NARROWEST = 20
# A space `textwrap` never breaks at: it holds the words of one count together.
_NO_BREAK = "\u00a0"
# Rows of a logged table before it is cut (the rest are counted, and kept in the store where stated).
MAX_LOGGED_ROWS = 1000
# Prospects an SLA failure names in its message.
SLA_LISTED = 20

# What a step sent and cost, after its outcome counts, with the names the tables show.
_COST = {
    "commerce_requests": "Commerce requests", "commerce_throttled": "Commerce 429s", "commerce_retries": "Commerce retries",
    "dataverse_requests": "Dataverse requests", "dataverse_throttled": "Dataverse 429s",
    "dataverse_retries": "Dataverse retries", "planned_writes": "writes planned (none sent)", "cpu_s": "CPU s",
    "peak_rss_mb": "peak RSS MB",
}  # fmt: skip
_KEYS = ["step", "legal_entity"]
# The store's column names as the tables head them.
_HEADERS = {
    "legal_entity": "legal entity", "prospect_id": "prospect", "first_seen": "first seen", "times_seen": "times seen",
    "created_at": "tracked since", "age_days": "age", "last_error": "last error",
}  # fmt: skip


class _Write(NamedTuple):
    """An outcome count that writes (to Commerce, Sales or the store), as a run did it and as a dry
    run, which writes nothing, would do it."""

    done: str
    planned: str


# Outcome counts in words, per step (the steps' own names: sync.py, reconcile.py, drift.py), where
# `name.replace("_", " ")` reads badly or a write needs its dry-run wording.
_OUTCOMES: dict[str, dict[str, str | _Write]] = {
    "pull": {
        "pulled": "prospects pulled", "invalid": "invalid records", "not found": "named prospects not in Commerce",
        "not pending": "named prospects not Pending", "unchanged": "prospects unchanged",
        "new": _Write("new prospects tracked", "new prospects that would be tracked"),
        "refreshed": _Write("prospects refreshed", "prospects that would be refreshed"),
        "corrected": _Write("corrections from Commerce noted", "corrections from Commerce that would be noted"),
    },
    "push": {
        "created": _Write("leads created", "leads that would be created"),
        "adopted": _Write("existing leads adopted", "existing leads that would be adopted"),
        "tagged": _Write("leads tagged Commerce B2B", "leads that would be tagged Commerce B2B"),
    },
    "correct leads": {
        "not open": "leads no longer open", "clashes": "clashes with sellers' edits", "unchanged": "leads up to date",
        "corrected": _Write("leads corrected", "leads that would be corrected"),
    },
    "read outcomes": {
        "leads_full_reads": "full reads of leads", "opportunities_full_reads": "full reads of opportunities",
        "leads_deleted": "leads deleted in Sales", "opportunities_deleted": "opportunities deleted in Sales",
        "leads_changed_after_decision": "leads changed after the decision",
        "opportunities_changed_after_decision": "opportunities changed after the decision",
        "qualified_without_opportunity": "qualified leads without an opportunity",
        "leads_changes": _Write("lead changes recorded", "lead changes that would be recorded"),
        "opportunities_changes": _Write("opportunity changes recorded", "opportunity changes that would be recorded"),
    },
    "write customers": {
        "created": _Write("prospects given customers", "prospects that would be given customers"),
        "written": _Write("prospects given customers", "prospects that would be given customers"),
        "existing customers reused": _Write("existing customers reused", "existing customers that would be reused"),
        "account_numbers_failed": "account numbers not set",
    },
    "approve": {
        "approved": _Write("prospects approved", "prospects that would be approved"),
        "written": _Write("prospects approved", "prospects that would be approved"),
        "joined an existing hierarchy": _Write("requesters added to an existing hierarchy",
                                               "requesters that would be added to an existing hierarchy"),
    },
    "reject": {
        "rejected": _Write("prospects rejected", "prospects that would be rejected"),
        "written": _Write("prospects rejected", "prospects that would be rejected"),
    },
    "drift check": {
        "prospects": "B2B prospects in Commerce", "leads": "Commerce B2B leads in Sales",
        "missing lead": "prospects without a lead", "lead without prospect": "leads without a prospect",
        "state disagreement": "state disagreements", "anomalies": "anomalies found",
        "recorded as decided": _Write("prospects recorded as decided", "prospects that would be recorded as decided"),
    },
}  # fmt: skip
# Outcome counts that read the same whatever the step (`per_record.for_each_prospect`, `reconcile._in_changesets`,
# `flow/claims.py`).
_ANY_STEP = {"failed": "prospects kept for the next run",
             "claimed by another run": "prospects another run was writing (left to it)"}  # fmt: skip
# What the one-by-one path of a changeset refused as a whole adds to its outcome's name.
_ONE_BY_ONE = " one by one"


def _words(step: str, name: str, dry_run: bool) -> str:
    """An outcome count's name in words; in a dry run, a write worded as what the run would do."""
    base = name.removesuffix(_ONE_BY_ONE)
    said = _OUTCOMES.get(step, {}).get(base) or _ANY_STEP.get(base) or base.replace("_", " ")
    if isinstance(said, _Write):
        said = said.planned if dry_run else said.done
    return said + (_ONE_BY_ONE if base != name else "")


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


def _did(step: str, counts: Mapping[str, float], dry_run: bool) -> str:
    """A step's non-zero outcome counts in words (a dry run's writes as what it would do), then the
    writes a dry run planned."""
    did = [f"{_words(step, name, dry_run)} {_cell(value)}" for name, value in counts.items() if value and name not in _COST]
    if counts.get("planned_writes"):
        did.append(f"{_COST['planned_writes']} {_cell(counts['planned_writes'])}")
    return ", ".join(did) or "nothing to do"


def run_summary(results: Iterable[dict], dry_run: bool = False) -> pd.DataFrame:
    """What each step did, one row per step and legal entity: its non-zero outcome counts in words;
    in a dry run, its writes as what it would do, and the writes it planned."""
    table = run_table(results)
    if table.empty:
        return table
    did = [_did(step, counts, dry_run) for (step, _), counts in zip(table.index, table.to_dict("records"))]
    return pd.DataFrame({"what it did": did}, index=table.index.rename(["step", "legal entity"]))


def run_costs(results: Iterable[dict]) -> pd.DataFrame:
    """What each step sent and cost, one row per step and legal entity: the requests it sent to
    each system, the 429s and retries of both, CPU seconds and peak memory."""
    table = run_table(results)
    if table.empty:
        return table
    costs = pd.DataFrame(index=table.index.rename(["step", "legal entity"]))
    for name in ("commerce_requests", "dataverse_requests"):
        if name in table.columns:
            costs[_COST[name]] = table[name]
    for label, suffix in (("429s", "throttled"), ("retries", "retries")):
        columns = [name for name in table.columns if name.endswith(f"_{suffix}")]
        if columns:
            costs[label] = table[columns].sum(axis=1)
    for name in ("cpu_s", "peak_rss_mb"):
        if name in table.columns:
            costs[_COST[name]] = table[name]
    return costs


def run_report(results: Iterable[dict], dry_run: bool = False) -> str:
    """The run's report as the log shows it: what each step did (a long list of counts goes on in
    the lines below), then what each step sent and cost."""
    results = list(results)
    summary = run_summary(results, dry_run)
    if summary.empty:
        return "(no step ran)"
    did = "What each step would do (a dry run: nothing was written)" if dry_run else "What each step did"
    return "\n".join([f"{did}, per legal entity:", text(_continued(summary.reset_index(), "what it did", ", "), index=False),
                      "", "What each step sent and cost:", text(run_costs(results))])  # fmt: skip


def _cell(value: object) -> str:
    """A value as a table shows it: empty when missing, a float without trailing zeros."""
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.2f}".rstrip("0").rstrip(".")
    return "" if value is None or value is pd.NaT else str(value)


def text(frame: pd.DataFrame, index: bool = True) -> str:
    """A table as the log shows it: text columns left-aligned, so long descriptions read as lines,
    numbers right-aligned, missing values blank, two spaces between columns."""
    if index:
        frame = frame.rename_axis([name or "" for name in frame.index.names]).reset_index()
    cells = {name: [_cell(value) for value in frame[name]] for name in frame.columns}
    left = {name: frame[name].map(lambda value: isinstance(value, str)).any() for name in frame.columns}
    widths = {name: _width(frame, name) for name in frame.columns}

    def line(values: Iterable[str]) -> str:
        return "  ".join(value.ljust(widths[name]) if left[name] else value.rjust(widths[name])
                         for name, value in zip(frame.columns, values)).rstrip()  # fmt: skip

    return "\n".join([line(map(str, frame.columns)), *(line(row) for row in zip(*cells.values()))])


def _width(frame: pd.DataFrame, name: str) -> int:
    """Characters a column takes in `text`: its header's or its widest value's."""
    return max([len(str(name)), *(len(_cell(value)) for value in frame[name])])


def _continued(frame: pd.DataFrame, column: str, between: str) -> pd.DataFrame:
    """The frame with `column` wrapped to the room the other columns leave on a line: a long value
    goes on in the rows below (the other columns empty there), broken after a `between`."""
    others = sum(_width(frame, name) + 2 for name in frame.columns if name != column)
    width = max(MAX_LINE_WIDTH - others, _NARROWEST)
    rows = []
    for row in frame.to_dict("records"):
        first, *rest = _wrapped(row[column], width, between)
        rows += [row | {column: first}, *({column: line} for line in rest)]
    return pd.DataFrame(rows, columns=frame.columns)


def _wrapped(value: str, width: int, between: str) -> list[str]:
    """`value` on lines of at most `width`, broken only after a `between` (a part longer than a line,
    where it must): within a part, spaces are no-break spaces, which `textwrap` never breaks at."""
    glued = between.join(part.replace(" ", _NO_BREAK) for part in value.split(between))
    return [line.replace(_NO_BREAK, " ") for line in textwrap.wrap(glued, width, break_on_hyphens=False)] or [""]


def task_table(result: dict, dry_run: bool = False) -> pd.DataFrame:
    """What one task did, one line each: its outcome counts in words (per outcome, for its legal
    entity; in a dry run, its writes as what it would do), then the requests it sent to each
    system, the 429s and retries, the writes a dry run planned, CPU seconds and peak memory."""
    step = result.get("step", "")
    outcomes = {_words(step, name, dry_run): value for name, value in result.items() if name not in _KEYS and name not in _COST}
    cost = {label: result[name] for name, label in _COST.items() if name in result}
    column = f"{step} {result.get('legal_entity', '')}".strip()
    values = {**(outcomes or {"(nothing to do)": 0}), **cost}
    return pd.DataFrame({column: pd.Series(values, dtype=object)})


def stage_counts(tracked: pd.DataFrame) -> pd.DataFrame:
    """Prospects per stage and legal entity, with a total column: one row per stage that has any,
    in flow order and named as the store and the runbook name them (as rows, the table keeps its
    width whatever the counts)."""
    order = [stage.value for stage in Stage]
    table = pd.crosstab(pd.Categorical(tracked["stage"], categories=order), tracked["legal_entity"])
    table = table.loc[(table != 0).any(axis=1)]
    table["total"] = table.sum(axis=1)
    table.columns.name = None
    table.index.name = "stage"
    return table


def plan_summary(planned: pd.DataFrame) -> pd.DataFrame:
    """A dry run's planned writes counted per system, operation and legal entity, with a total."""
    if planned.empty:
        return pd.DataFrame({"writes": []})
    table = planned.fillna({"legal_entity": "*"}).groupby(["system", "operation", "legal_entity"]).size().to_frame("writes")
    table.loc[("total", "", ""), "writes"] = int(table["writes"].sum())
    return table.astype({"writes": int}).rename_axis(["system", "operation", "legal entity"])


def plan_text(planned: pd.DataFrame, limit: int = MAX_LOGGED_ROWS) -> str:
    """The plan as the log shows it: every planned write (up to `limit` rows, then a count), what it
    writes going on in the lines below when long."""
    if planned.empty:
        return "(no writes: Commerce and Sales are as this run would leave them)"
    shown = planned[["system", "operation", "legal_entity", "prospect_id", "what"]].head(limit).reset_index(drop=True)
    more = f"\n… and {len(planned) - limit} more" if len(planned) > limit else ""
    return text(_continued(shown.fillna("").rename(columns=_HEADERS), "what", " "), index=False) + more


def _count(number: float, one: str, many: str) -> str:
    return f"{number:g} {one if number == 1 else many}"


def _minute(value: object) -> str:
    """A time to the minute in UTC (the store's naive times are UTC); empty when missing."""
    if value is None or pd.isna(value):
        return ""
    moment = pd.Timestamp(value)
    return (moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")).strftime("%Y-%m-%d %H:%M UTC")


def _ages(days: pd.Series) -> list[str]:
    """Ages in days with one decimal, right-aligned among themselves; empty when missing."""
    ages = ["" if pd.isna(age) else f"{age:.1f} days" for age in days]
    width = max(map(len, ages))
    return [age.rjust(width) for age in ages]


def _with_notes(table: pd.DataFrame, notes: Iterable[object], label: str) -> list[str]:
    """The table's lines, each row followed by its note on one line when it has one, cut with "…"
    at the line's width (the store keeps it whole)."""
    header, *rows = text(table, index=False).splitlines()
    lines = [header]
    for row, note in zip(rows, notes):
        lines.append(row)
        if isinstance(note, str) and note.strip():
            noted = f"  {label}: {' '.join(note.split())}"
            lines.append(noted if len(noted) <= MAX_LINE_WIDTH else noted[: MAX_LINE_WIDTH - 1] + "…")
    return lines


def sla_message(anomalies: pd.DataFrame, late: pd.DataFrame, sla_days: float) -> str:
    """Why the SLA check fails: the counts and the next step on the first line, then the first
    `SLA_LISTED` anomalies and late prospects, each with its detail or last error below it; times
    to the minute in UTC, ages in days."""
    counts = []
    if len(anomalies):
        counts.append(_count(len(anomalies), "anomaly", "anomalies"))
    if len(late):
        counts.append(f"{_count(len(late), 'prospect', 'prospects')} pending over {_count(sla_days, 'day', 'days')}")
    lines = [f"SLA check failed: {', '.join(counts)}. Next step: README, Runbook, \"check_sla failed\"."]
    if len(anomalies):
        shown = anomalies.head(SLA_LISTED)
        table = shown[["legal_entity", "prospect_id", "kind", "first_seen", "times_seen"]].assign(
            first_seen=shown["first_seen"].map(_minute))  # fmt: skip
        lines += [f"Open anomalies (first {len(shown)} of {len(anomalies)}):",
                  *_with_notes(table.rename(columns=_HEADERS), shown["detail"], "detail")]  # fmt: skip
    if len(late):
        shown = late.head(SLA_LISTED)
        table = shown[["legal_entity", "prospect_id", "stage", "created_at"]].assign(
            created_at=shown["created_at"].map(_minute), age_days=_ages(shown["age_days"]))  # fmt: skip
        lines += [f"Pending longer than {_count(sla_days, 'day', 'days')} (first {len(shown)} of {len(late)}):",
                  *_with_notes(table.rename(columns=_HEADERS), shown["last_error"], "last error")]  # fmt: skip
    return "\n".join(lines)
