"""The nightly SLA check, the run params, and the tables the tasks log."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from b2b_onboarding.airflow import tasks
from b2b_onboarding.domain import report, rules
from b2b_onboarding.errors import ConfigurationError
from b2b_onboarding.store.state import StateStore, prospects

NOW = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)


def tracked(*rows: tuple[str, str, str | None, float]) -> pd.DataFrame:
    """(prospect id, stage, decision, age in days) → the store's columns the SLA reads."""
    return pd.DataFrame([{"legal_entity": "usrt", "prospect_id": pid, "stage": stage, "decision": decision,
                          "created_at": (NOW - timedelta(days=age)).replace(tzinfo=None), "last_error": None}
                         for pid, stage, decision, age in rows],
                        columns=["legal_entity", "prospect_id", "stage", "decision", "created_at", "last_error"],
                        dtype=object)  # fmt: skip


def test_only_undecided_prospects_in_a_pending_stage_older_than_the_sla_are_late():
    frame = tracked(("P-1", "pulled", None, 4), ("P-2", "lead_open", None, 3.5), ("P-3", "qualified", None, 1),
                    ("P-4", "customers_created", None, 10), ("P-5", "invalid", None, 30), ("P-6", "won", None, 30),
                    ("P-7", "approved", "approved", 30))  # fmt: skip
    late = rules.overdue(frame, NOW, 3)
    assert list(late["prospect_id"]) == ["P-4", "P-1", "P-2"]  # oldest first
    assert list(late["age_days"]) == [10.0, 4.0, 3.5]
    assert rules.overdue(frame, NOW, 0)["prospect_id"].tolist() == ["P-4", "P-1", "P-2", "P-3"]
    assert rules.overdue(tracked(), NOW, 3).empty


def test_the_sla_message_counts_everything_and_lists_the_first_twenty():
    late = rules.overdue(tracked(*((f"P-{n:03d}", "lead_open", None, 5 + n / 100) for n in range(25))), NOW, 3)
    anomalies = pd.DataFrame([{"legal_entity": "usrt", "prospect_id": "P-900", "kind": "decided_in_commerce",
                               "first_seen": NOW, "times_seen": 2, "detail": "prospect usrt/P-900 is Approved in "
                               "Commerce, decided by hand"}])  # fmt: skip
    message = report.sla_message(anomalies, late, 3)
    first = message.splitlines()[0]
    assert first == 'SLA check failed: 1 anomaly, 25 prospects pending over 3 days. Next step: README, Runbook, "check_sla failed".'
    assert "Pending longer than 3 days (first 20 of 25):" in message and "decided_in_commerce" in message
    assert "P-024" in message and "P-004" not in message  # the oldest 20 of 25


def test_check_sla_fails_with_the_table_passes_when_clear_and_only_looks_at_named_prospects(monkeypatch, tmp_path, caplog):
    path = tmp_path / "state.db"
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "generic", "schema": str(path),
                                                              "extra": {"driver": "sqlite"}}))  # fmt: skip
    store = StateStore(f"sqlite:///{path}")
    store.record_pulled(pd.DataFrame([{"legal_entity": "usrt", "prospect_id": f"P-{n}", "prospect": {}, "error": None}
                                      for n in (1, 2)]), "manual__pull")  # fmt: skip
    assert tasks.check_sla()["pending_too_long"] == 0

    with store.engine.begin() as connection:  # P-1 was first pulled a week ago
        connection.execute(sa.update(prospects).where(prospects.c.prospect_id == "P-1")
                           .values(created_at=datetime.now(UTC) - timedelta(days=7)))  # fmt: skip
    with pytest.raises(tasks.SlaBreached, match=r"^SLA check failed: 1 prospect pending over 3 days\. ") as failed:
        tasks.check_sla()
    listed = caplog.messages[-1].splitlines()  # the table, logged once above the failure's line
    assert listed[0] == str(failed.value) and listed[1] == "Pending longer than 3 days (first 1 of 1):"
    assert listed[3].split()[:3] == ["usrt", "P-1", "pulled"] and len(listed) == 4

    store.record_anomalies([(("usrt", "P-2"), "lead_deleted", "the lead of prospect usrt/P-2 was deleted")], "manual__r")
    monkeypatch.setattr(tasks, "_options", lambda: tasks.RunOptions(prospect_keys=frozenset({("usrt", "P-2")})))
    with pytest.raises(tasks.SlaBreached, match=r"^SLA check failed: 1 anomaly\. "):
        tasks.check_sla()
    assert "P-2" in caplog.messages[-1] and "P-1" not in caplog.messages[-1]
    store.resolve_anomalies([("usrt", "P-2")])
    assert tasks.check_sla()["open_anomalies"] == 0
    monkeypatch.setattr(tasks, "_options", lambda: tasks.RunOptions(dry_run=True))
    assert tasks.check_sla()["pending_too_long"] == 1  # a dry run lists, and does not fail


def test_run_params_become_options_and_bad_ones_say_how_to_fix_them():
    options = tasks.RunOptions.from_params({"dry_run": True, "legal_entities": ["usrt", " "], "chunk_size": 10,
                                            "prospect_ids": ["USRT/P-000123", "usmf/P/1"], "sla_days": 0})  # fmt: skip
    assert options.dry_run and options.legal_entities == ("usrt",) and options.chunk_size == 10 and options.sla_days == 0
    assert options.prospect_keys == {("usrt", "P-000123"), ("usmf", "P/1")}
    assert options.prospect_ids("USRT") == {"P-000123"} and options.prospect_ids("usxx") == set()
    assert tasks.RunOptions.from_params({}) == tasks.RunOptions()
    assert tasks.RunOptions.from_params({}).prospect_ids("usrt") is None
    with pytest.raises(ConfigurationError, match=r"prospect_ids: 'P-000123': a prospect is named <legal entity>/<prospect id>"):
        tasks.RunOptions.from_params({"prospect_ids": ["P-000123"]})


def test_the_runs_legal_entities_are_a_subset_of_the_connections_narrowed_to_the_named_prospects():
    choose = tasks.choose_legal_entities
    assert choose("d365_commerce", ["usrt", "usmf"], tasks.RunOptions()) == ["usrt", "usmf"]
    assert choose("d365_commerce", ["usrt", "usmf"], tasks.RunOptions(legal_entities=("USMF",))) == ["usmf"]
    named = tasks.RunOptions(prospect_keys=frozenset({("usmf", "P-1")}))
    assert choose("d365_commerce", ["usrt", "usmf"], named) == ["usmf"]
    with pytest.raises(ConfigurationError, match=r"names \['demf'\], which Airflow connection 'd365_commerce' does not"):
        choose("d365_commerce", ["usrt", "usmf"], tasks.RunOptions(legal_entities=("demf",)))
    with pytest.raises(ConfigurationError, match=r"prospect_ids names prospects of \['usmf'\], outside"):
        choose("d365_commerce", ["usrt", "usmf"], tasks.RunOptions(legal_entities=("usrt",), prospect_keys=named.prospect_keys))
    with pytest.raises(ConfigurationError, match="names no legal entities"):
        choose("d365_commerce", [], tasks.RunOptions())


def test_a_task_logs_a_short_table_outcomes_first_then_requests_and_cost():
    table = report.task_table({"step": "push", "legal_entity": "usrt", "created": 12, "adopted": 3, "failed": 1,
                               "dataverse_requests": 4, "dataverse_throttled": 0, "dataverse_retries": 1,
                               "cpu_s": 0.42, "peak_rss_mb": 231.5})  # fmt: skip
    assert list(table.columns) == ["push usrt"]
    assert list(table.index) == ["leads created", "existing leads adopted", "prospects kept for the next run",
                                 "Dataverse requests", "Dataverse 429s", "Dataverse retries", "CPU s", "peak RSS MB"]  # fmt: skip
    text = table.to_string()
    assert text.splitlines()[1].split() == ["leads", "created", "12"] and "12.0" not in text and "0.42" in text
    assert list(report.task_table({"step": "plan", "legal_entity": "*"}).index) == ["(nothing to do)"]


def test_the_run_table_puts_outcomes_before_cost_and_sums_chunks():
    table = report.run_table([
        {"step": "push", "legal_entity": "usrt", "dataverse_requests": 2, "created": 5, "cpu_s": 0.5, "peak_rss_mb": 200},
        {"step": "push", "legal_entity": "usrt", "dataverse_requests": 3, "created": 4, "failed": 1, "cpu_s": 0.25,
         "peak_rss_mb": 210},
    ])  # fmt: skip
    assert list(table.columns) == ["created", "failed", "dataverse_requests", "cpu_s", "peak_rss_mb"]
    assert table.loc[("push", "usrt"), "created"] == 9 and table.loc[("push", "usrt"), "peak_rss_mb"] == 210


def test_the_plan_is_summarised_per_system_operation_and_legal_entity():
    planned = pd.DataFrame([
        {"system": "Dataverse (Sales)", "operation": "create lead", "legal_entity": "usrt", "prospect_id": "P-1", "what": "a"},
        {"system": "Dataverse (Sales)", "operation": "create lead", "legal_entity": "usrt", "prospect_id": "P-2", "what": "b"},
        {"system": "Commerce headquarters", "operation": "approve prospect", "legal_entity": "usmf", "prospect_id": "P-1",
         "what": "c"},
    ])  # fmt: skip
    summary = report.plan_summary(planned)
    assert summary.loc[("Dataverse (Sales)", "create lead", "usrt"), "writes"] == 2
    assert summary.loc[("total", "", ""), "writes"] == 3
    text = report.plan_text(planned, limit=2)
    assert re.split(r" {2,}", text.splitlines()[0]) == ["system", "operation", "legal entity", "prospect", "what"]
    assert text.endswith("… and 1 more")
    assert "no writes" in report.plan_text(planned.head(0))


def test_the_reports_run_summary_says_what_each_step_did_and_its_costs_apart():
    results = [
        {"step": "read outcomes", "legal_entity": "*", "leads_read": 18, "leads_deleted": 0, "dataverse_requests": 4,
         "dataverse_throttled": 0, "dataverse_retries": 0, "cpu_s": 0.12, "peak_rss_mb": 284.6},
        {"step": "approve", "legal_entity": "usrt", "written": 4, "already done": 1, "commerce_requests": 3,
         "commerce_throttled": 1, "commerce_retries": 2, "cpu_s": 0.05, "peak_rss_mb": 285.0},
        {"step": "reject", "legal_entity": "usrt", "commerce_requests": 0, "commerce_throttled": 0,
         "commerce_retries": 0, "cpu_s": 0.01, "peak_rss_mb": 285.0},
    ]  # fmt: skip
    summary = report.run_summary(results)
    assert list(summary["what it did"]) == ["leads read 18", "prospects approved 4, already done 1", "nothing to do"]
    assert list(summary.columns) == ["what it did"] and list(summary.index.names) == ["step", "legal entity"]
    costs = report.run_costs(results)
    assert list(costs.columns) == ["Commerce requests", "Dataverse requests", "429s", "retries", "CPU s", "peak RSS MB"]
    assert list(costs["429s"]) == [0, 1, 0] and list(costs["retries"]) == [0, 2, 0]
    lines = report.run_report(results).splitlines()
    assert lines[:2] == ["What each step did, per legal entity:", "step           legal entity  what it did"]
    assert lines[2] == "read outcomes  *             leads read 18"  # text left-aligned
    assert lines[6] == "What each step sent and cost:"
    assert lines[8].split() == ["read", "outcomes", "*", "0", "4", "0", "0", "0.12", "284.6"]
