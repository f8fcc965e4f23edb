"""The tables the tasks log, read by a newcomer: within 120 columns whatever the counts, in words,
a dry run's writes as what it would do, and the SLA failure's times and ages as people write them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from b2b_onboarding.domain import report, rules
from b2b_onboarding.domain.rules import Stage

WIDTH = 120  # what a newcomer's log viewer shows without scrolling
PRODUCT = Path(report.__file__).parents[1]
LEGAL_ENTITIES = ("contosoretailusa", "fabrikamfurnitur")  # 16 characters each
NOW = datetime(2026, 12, 7, 2, 15, 33, 123456, tzinfo=UTC)
# The counts of each step that write (to Commerce, Sales or the store): a dry run words them as what it would do.
WRITES = {
    "pull": {"new", "refreshed", "corrected"},
    "push": {"created", "adopted", "tagged"},
    "correct leads": {"corrected"},
    "read outcomes": {"leads_changes", "opportunities_changes"},
    "write customers": {"written", "created", "existing customers reused", "created one by one"},
    "approve": {"written", "approved", "joined an existing hierarchy", "approved one by one"},
    "reject": {"written", "rejected", "rejected one by one"},
    "drift check": {"recorded as decided"},
}  # fmt: skip


def cost(commerce: bool = False, dataverse: bool = False, dry_run: bool = False) -> dict:
    """What `tasks._Step.measured` adds to a step's counts, at the scale of a big backlog."""
    sent = {}
    if commerce:
        sent |= {"commerce_requests": 123456, "commerce_throttled": 1234, "commerce_retries": 2345}
    if dataverse:
        sent |= {"dataverse_requests": 234567, "dataverse_throttled": 3456, "dataverse_retries": 4567}
    return sent | ({"planned_writes": 98765} if dry_run else {}) | {"cpu_s": 12345.67, "peak_rss_mb": 12345.6}


def widest_results(dry_run: bool = False) -> list[dict]:
    """Every step of both DAGs in two legal entities, every count a step returns, large numbers."""
    results = []
    for le in LEGAL_ENTITIES:
        results += [
            {"step": "pull", "legal_entity": le, "pulled": 123456, "invalid": 1234, "not found": 12, "not pending": 34,
             "new": 100000, "refreshed": 12345, "corrected": 2345, "unchanged": 9876, **cost(commerce=True, dry_run=dry_run)},
            {"step": "push", "legal_entity": le, "created": 100000, "adopted": 12345, "conflicts": 12, "failed": 123,
             "tagging failed": 3, "tagged": 1234, "claimed by another run": 56, **cost(dataverse=True, dry_run=dry_run)},
            {"step": "correct leads", "legal_entity": le, "not open": 123, "failed": 12, "corrected": 2345, "clashes": 23,
             "unchanged": 345, "claimed by another run": 7, **cost(dataverse=True, dry_run=dry_run)},
        ]  # fmt: skip
    results.append(
        {"step": "read outcomes", "legal_entity": "*", "leads_read": 123456, "leads_changes": 12345,
         "leads_changed_after_decision": 12, "leads_deleted": 23, "leads_full_reads": 1, "opportunities_read": 23456,
         "opportunities_changes": 3456, "opportunities_changed_after_decision": 4, "opportunities_deleted": 5,
         "opportunities_full_reads": 1, "qualified_without_opportunity": 67, **cost(dataverse=True, dry_run=dry_run)})  # fmt: skip
    bulk, one_by_one = LEGAL_ENTITIES  # Commerce's bulk mode (changesets) and its one-by-one mode, side by side
    results += [
        {"step": "write customers", "legal_entity": bulk, "already done": 123, "written": 12345, "conflicts": 12,
         "existing customers reused": 2345, "account_numbers_failed": 3, "created one by one": 4,
         "failed one by one": 5, "conflicts one by one": 6, **cost(True, True, dry_run)},
        {"step": "write customers", "legal_entity": one_by_one, "created": 12345, "conflicts": 12, "failed": 5,
         "existing customers reused": 2345, "account_numbers_failed": 3, **cost(True, True, dry_run)},
        {"step": "approve", "legal_entity": bulk, "already done": 123, "written": 12345, "conflicts": 12,
         "joined an existing hierarchy": 234, "approved one by one": 3, "failed one by one": 2,
         **cost(commerce=True, dry_run=dry_run)},
        {"step": "approve", "legal_entity": one_by_one, "approved": 12345, "conflicts": 12, "failed": 2,
         "joined an existing hierarchy": 234, **cost(commerce=True, dry_run=dry_run)},
        {"step": "reject", "legal_entity": bulk, "already done": 123, "written": 12345, "conflicts": 12,
         "rejected one by one": 3, **cost(commerce=True, dry_run=dry_run)},
        {"step": "reject", "legal_entity": one_by_one, "rejected": 12345, "conflicts": 12, "failed": 2,
         **cost(commerce=True, dry_run=dry_run)},
    ]  # fmt: skip
    results.append(
        {"step": "drift check", "legal_entity": "*", "prospects": 234567, "leads": 234560, "missing lead": 12,
         "lead without prospect": 3, "state disagreement": 4, "anomalies": 5, "recorded as decided": 6,
         **cost(True, True, dry_run)})  # fmt: skip
    return results


def widest(text: str) -> int:
    return max(map(len, text.splitlines()))


def test_every_count_the_steps_return_is_among_the_widest_results():
    """A count a step starts returning must be worded here too (and so be looked at)."""
    returned = set()
    for module in ("flow/sync.py", "flow/reconcile.py", "flow/drift.py", "store/state.py", "flow/per_record.py"):
        source = (PRODUCT / module).read_text()
        for pattern in (r'counts\["([^"]+)"\]', r'return "(\w+)", ', r'"kind": "([^"]+)"', r'"(\w[\w ]*)": len\(',
                        r'"(\w[\w ]*)": recorded'):  # fmt: skip
            returned |= set(re.findall(pattern, source))
    worded = {name for result in widest_results() for name in result}
    assert returned - worded == set()


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_run_report_fits_120_columns_whatever_the_counts(dry_run):
    results = widest_results(dry_run)
    text = report.run_report(results, dry_run=dry_run)
    assert widest(text) <= WIDTH, text
    did, costs = text.split("\n\n")
    rows = did.splitlines()[2:]
    assert any(row.startswith(" " * 20) for row in rows)  # a long list of counts goes on below, not to the right
    for summary in report.run_summary(results, dry_run)["what it did"]:
        for count in summary.split(", "):  # each count whole on one line
            assert any(count in row for row in rows), count
    assert [line.split()[-1] for line in costs.splitlines()[2:]] == ["12345.6"] * 14  # one row per step and legal entity
    for result in results:
        assert widest(report.task_table(result, dry_run=dry_run).to_string()) <= WIDTH


def test_the_report_is_in_words_not_identifiers():
    for dry_run in (False, True):
        text = report.run_report(widest_results(dry_run), dry_run=dry_run)
        assert "_" not in text and "None" not in text and "nan" not in text, text
        for result in widest_results(dry_run):
            table = report.task_table(result, dry_run=dry_run)
            assert not [label for label in [*table.index, *table.columns] if "_" in label]
    text = report.run_report(widest_results())
    assert text.splitlines()[1].split("  ")[-1] == "what it did"
    for words in ("legal entity", "prospects pulled 123456", "leads created 100000", "full reads of leads 1",
                  "qualified leads without an opportunity 67", "prospects kept for the next run 123",
                  "prospects approved one by one 3", "Commerce requests", "Dataverse requests", "peak RSS MB"):
        assert words in text, words
    summary, costs = report.run_summary(widest_results()), report.run_costs(widest_results())
    assert list(summary.index.names) == list(costs.index.names) == ["step", "legal entity"]
    assert list(report.task_table({"step": "push", "legal_entity": "usrt", "some_new_count": 2}).index) == ["some new count"]


def test_a_dry_run_says_what_it_would_write_never_that_it_wrote():
    one = [{"step": "push", "legal_entity": "usrt", "created": 1, "dataverse_requests": 2, "planned_writes": 1}]
    assert report.run_summary(one, dry_run=True)["what it did"].tolist() == [
        "leads that would be created 1, writes planned (none sent) 1"]  # fmt: skip
    assert report.run_report(one, dry_run=True).startswith("What each step would do (a dry run: nothing was written)")
    assert list(report.task_table(one[0], dry_run=True).index)[0] == "leads that would be created"
    text = report.run_report(widest_results(dry_run=True), dry_run=True).split("\n", 1)[1]  # below the title
    participles = r"\b(created|adopted|tagged|corrected|tracked|refreshed|noted|recorded|given|reused|approved|rejected|added|written)\b"
    for found in re.finditer(participles, text):
        assert text[: found.start()].endswith("would be "), text[found.start() - 40 : found.end()]
    assert "would" not in report.run_report(widest_results())


def test_exactly_the_writes_are_worded_as_what_a_dry_run_would_do():
    measured = {"step", "legal_entity", *cost(True, True, True)}
    for result in widest_results():
        done, planned = report.task_table(result).index, report.task_table(result, dry_run=True).index
        outcomes = [name for name in result if name not in measured]
        assert list(done[len(outcomes) :]) == list(planned[len(outcomes) :])  # what it sent and cost
        for name, said, would in zip(outcomes, done, planned):
            writes = name in WRITES[result["step"]]
            assert (said != would) == writes and ("would" in would) == writes, (result["step"], name, said, would)


def anomalies(count: int) -> pd.DataFrame:
    kinds = ["opportunity_changed_after_decision", "decided_in_commerce", "duplicate_leads", "lead_deleted"]
    long = ("the opportunity of prospect contosoretailusa/P-000000000000000003 is won in Sales (it was lost), but the "
            "prospect was already rejected in Commerce, which is left as it is; next step: decide with the seller")  # fmt: skip
    return pd.DataFrame([{"legal_entity": LEGAL_ENTITIES[n % 2], "prospect_id": f"P-{n:018d}", "kind": kinds[n % 4],
                          "detail": [long, "short detail", None][n % 3], "first_run_id": "scheduled__x", "last_run_id": "y",
                          "first_seen": NOW - timedelta(days=n, microseconds=7) if n % 2 else (NOW - timedelta(days=n)).replace(tzinfo=None),
                          "last_seen": NOW, "times_seen": n + 1} for n in range(count)], dtype=object)  # fmt: skip


def late(count: int, sla_days: float) -> pd.DataFrame:
    error = "Dataverse (Sales): create lead for prospect usrt/P-1 failed with HTTP 400 0x80040237: a record with\nmatching keys exists"
    tracked = pd.DataFrame([{"legal_entity": LEGAL_ENTITIES[n % 2], "prospect_id": f"P-{n:018d}", "decision": None,
                             "stage": ["pulled", "lead_open", "qualified", "customers_created"][n % 4],
                             "created_at": (NOW - timedelta(days=sla_days + 1 + n / 7, seconds=17.5)).replace(tzinfo=None),
                             "last_error": error if n % 2 else None} for n in range(count)],
                           columns=["legal_entity", "prospect_id", "decision", "stage", "created_at", "last_error"], dtype=object)  # fmt: skip
    return rules.overdue(tracked, NOW, sla_days)


def test_the_sla_message_reads_once_within_120_columns_with_times_to_the_minute_and_ages_in_days():
    message = report.sla_message(anomalies(99), late(999, 14), 14)
    lines = message.splitlines()
    assert lines[0] == ('SLA check failed: 99 anomalies, 999 prospects pending over 14 days. Next step: README, Runbook, '
                        '"check_sla failed".')  # fmt: skip
    assert widest(message) <= WIDTH, message
    assert lines[1:3] == ["Open anomalies (first 20 of 99):",
                          "legal entity      prospect              kind                                first seen"
                          "            times seen"]  # fmt: skip
    assert lines[3].split() == ["contosoretailusa", "P-000000000000000000", "opportunity_changed_after_decision",
                                "2026-12-07", "02:15", "UTC", "1"]  # fmt: skip
    assert message.count("Pending longer than 14 days (first 20 of 999):") == 1
    for bad in ("None", "NaN", "nan", "NaT", "+00:00", "T02", ".123", ":33"):
        assert bad not in message, bad
    times = re.findall(r"\d{4}-\d\d-\d\d[ T][\d:.]+(?: UTC)?", message)
    assert len(times) == 40 and all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", time) for time in times)
    ages = re.findall(r"\s(\S+ days)$", message, re.MULTILINE)
    assert len(ages) == 20 and all(re.fullmatch(r"\d+\.\d days", age) for age in ages)
    details = [line for line in lines if line.startswith("  detail: ")]
    assert "  detail: short detail" in details and len(details) == 14  # none for an anomaly without one
    assert all(len(line) == WIDTH and line.endswith("…") for line in details if "short" not in line)
    errors = [line for line in lines if line.startswith("  last error: ")]
    assert len(errors) == 10 and errors[0].startswith("  last error: Dataverse (Sales): create lead") and "\n" not in errors[0]


def test_sla_times_are_in_utc_whatever_zone_they_come_in():
    frame = anomalies(1).assign(first_seen=[datetime(2026, 12, 7, 3, 15, 59, 999999, tzinfo=timezone(timedelta(hours=1)))])
    assert "2026-12-07 02:15 UTC" in report.sla_message(frame, late(0, 3), 3)
    one = report.sla_message(anomalies(0), late(1, 1), 1).splitlines()
    assert one[0].startswith("SLA check failed: 1 prospect pending over 1 day. ")
    assert one[1] == "Pending longer than 1 day (first 1 of 1):"
    assert one[2:] == ["legal entity      prospect              stage   tracked since         age",
                       "contosoretailusa  P-000000000000000000  pulled  2026-12-05 02:15 UTC  2.0 days"]  # fmt: skip


def test_text_left_aligns_text_right_aligns_numbers_and_leaves_missing_values_blank():
    frame = pd.DataFrame({"what": ["a", "a longer text"], "count": [1, 22], "share": [None, 1.5],
                          "note": pd.Series([None, "n"], dtype=object)})  # as the store gives them
    assert report.text(frame, index=False).splitlines() == ["what           count  share  note",
                                                            "a                  1",
                                                            "a longer text     22    1.5  n"]  # fmt: skip


def test_stage_counts_keep_their_width_whatever_the_counts():
    tracked = pd.DataFrame([{"legal_entity": le, "stage": stage.value} for le in LEGAL_ENTITIES for stage in Stage])
    tracked = tracked.loc[tracked.index.repeat(50000)]
    table = report.stage_counts(tracked)
    assert list(table.index) == [stage.value for stage in Stage] and list(table.columns) == [*LEGAL_ENTITIES, "total"]
    assert table.loc["lead_open", "total"] == 2 * 50000 and table.index.name == "stage"
    assert widest(table.to_string()) <= WIDTH and widest(report.text(table)) <= WIDTH


def test_the_plan_fits_120_columns_and_keeps_every_word_of_what_it_writes():
    what = ("lead contosoretailusa:P-000123 (Ann Smith-Jones, Contoso Pharmaceuticals International Ltd, "
            "ann@contoso.example) in All Commerce B2B leads")  # fmt: skip
    planned = pd.DataFrame([
        {"system": "Dataverse (Sales)", "operation": "create lead", "legal_entity": LEGAL_ENTITIES[0],
         "prospect_id": "P-000123", "what": what},
        {"system": "Commerce headquarters", "operation": "add Admin node to customer hierarchy",
         "legal_entity": LEGAL_ENTITIES[1], "prospect_id": "P-000124", "what": "party 000000124 as Admin of hierarchy X"},
        {"system": "Dataverse (Sales)", "operation": "set account number", "legal_entity": None, "prospect_id": None,
         "what": "account 1: accountnumber = C1"},
    ])  # fmt: skip
    text = report.plan_text(planned)
    assert widest(text) <= WIDTH, text
    lines = text.splitlines()
    assert re.split(r" {2,}", lines[0]) == ["system", "operation", "legal entity", "prospect", "what"]
    column = lines[0].index("what")
    rows: list[list[str]] = []
    for line in lines[1:]:  # a long value goes on below, the other columns empty
        rows += [[line[column:]]] if line[:column].strip() else []
        rows[-1] += [] if line[:column].strip() else [line[column:]]
    assert [" ".join(row) for row in rows] == list(planned["what"]) and len(rows[0]) > 1
    assert "None" not in text
    assert list(report.plan_summary(planned).index.names) == ["system", "operation", "legal entity"]
