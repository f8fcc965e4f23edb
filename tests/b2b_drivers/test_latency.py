"""`make latency`'s pure parts (`b2b_drivers.latency`): the percentiles, the script drawn from a seed, the
censored latencies, the idle and cron-period rates, results.json's shape and the printed table. The run
itself (two Airflows for about 10 minutes) is `make latency`, not part of `make test`."""

from __future__ import annotations

import json

import pytest

from b2b_drivers.latency import (
    OUTCOME_WEIGHTS,
    TARGETS,
    Script,
    Side,
    build_results,
    count_delta,
    cron_minutes,
    cron_period_rate,
    per_min,
    percentiles,
    table,
)
from d365_fakes.commerce import PROSPECTS


def test_percentiles_are_nearest_rank_to_a_tenth_of_a_second() -> None:
    assert percentiles(range(1, 101)) == {"n": 100, "p50": 50, "p95": 95, "max": 100}
    assert percentiles([3.04, 1.0, 2.0]) == {"n": 3, "p50": 2.0, "p95": 3.0, "max": 3.0}
    assert percentiles([7.26]) == {"n": 1, "p50": 7.3, "p95": 7.3, "max": 7.3}
    # One slow case in 20 is the p95; a second one moves it.
    assert percentiles([1.0] * 19 + [90.0])["p95"] == 1.0
    assert percentiles([1.0] * 18 + [90.0, 90.0])["p95"] == 90.0


def test_percentiles_of_nothing_are_none() -> None:
    assert percentiles([]) == {"n": 0, "p50": None, "p95": None, "max": None}


def test_the_script_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    first = Script.draw(seed=7, duration_s=600, arrivals_per_min=6, decisions_per_min=5, backlog=20)
    assert first == Script.draw(seed=7, duration_s=600, arrivals_per_min=6, decisions_per_min=5, backlog=20)
    assert first != Script.draw(seed=8, duration_s=600, arrivals_per_min=6, decisions_per_min=5, backlog=20)


def test_the_script_draws_poisson_moments_within_the_window_and_valid_unique_prospects() -> None:
    script = Script.draw(seed=1, duration_s=600, arrivals_per_min=6, decisions_per_min=5, backlog=20)

    moments = [arrival.at_s for arrival in script.arrivals]
    assert moments == sorted(moments) and 0 < moments[0] and moments[-1] < 600
    assert 40 <= len(script.arrivals) <= 85  # about 60: 6 a minute for 10 minutes
    assert 30 <= len(script.decisions) <= 75  # about 50
    assert [decision.at_s for decision in script.decisions] == sorted(decision.at_s for decision in script.decisions)
    assert {decision.outcome for decision in script.decisions} == set(OUTCOME_WEIGHTS)
    assert len(script.backlog) == 20
    rows = [*script.backlog, *(arrival.row for arrival in script.arrivals)]
    keys = [(row["dataAreaId"], row["ProspectId"]) for row in rows]
    assert len(set(keys)) == len(keys)
    assert len({row["ProspectId"] for row in rows}) == len(rows)  # a lead's prospect id alone names its prospect
    assert {row["dataAreaId"] for row in rows} == {"usrt", "usmf"}
    assert all(row[field] for row in rows for field in PROSPECTS.keys)
    assert all("@" in row["PrimaryEmailAddress"] and row["CompanyName"] for row in rows)
    assert script.arrivals[0].key == (script.arrivals[0].row["dataAreaId"], script.arrivals[0].row["ProspectId"])


def test_a_zero_rate_draws_nothing() -> None:
    script = Script.draw(seed=1, duration_s=600, arrivals_per_min=0, decisions_per_min=0, backlog=0)
    assert script == Script((), (), ())


def test_latencies_leave_out_the_backlog_and_count_what_is_missing_at_its_wait_so_far() -> None:
    side = Side("events", endpoints=None, airflow=None, admin=None, observer=None)  # type: ignore[arg-type]
    side.seeded = {("usrt", "P-1"): 100.0, ("usrt", "P-2"): 200.0, ("usmf", "P-3"): 300.0, ("usmf", "P-4"): 350.0}
    side.backlog = {("usrt", "P-1")}
    side.leads = {("usrt", "P-1"): 400.0, ("usrt", "P-2"): 210.0, ("usmf", "P-3"): 330.0}
    side.decided = {("usrt", "P-1"): ("won", 500.0), ("usrt", "P-2"): ("lost", 600.0)}
    side.emails = {("usrt", "P-1"): ("B2B prospect approved", 540.0)}

    figures = side.latencies(now=700.0)

    # P-2 10 s, P-3 30 s, P-4 still missing after 350 s; P-1 was a backlog prospect.
    assert figures["prospect_to_lead_s"] == {"n": 3, "p50": 30.0, "p95": 350.0, "max": 350.0, "censored": 1}
    # P-1 emailed 40 s after its decision; P-2 waits for 100 s.
    assert figures["decision_to_email_s"] == {"n": 2, "p50": 40.0, "p95": 100.0, "max": 100.0, "censored": 1}
    assert side.unfinished() == 2
    assert side.progress() == "events: leads 3/4, emails 1/2"


def test_requests_per_minute_between_two_counts() -> None:
    before = {"commerce": {"requests": 10, "writes": {}}, "dataverse": {"requests": 20, "writes": {}},
              "entra": {"tokens_issued": 3}}  # fmt: skip
    after = {"commerce": {"requests": 16, "writes": {"Prospects": 2}}, "dataverse": {"requests": 32, "writes": {}},
             "entra": {"tokens_issued": 3}}  # fmt: skip

    delta = count_delta(before, after)

    assert delta == {"commerce": 6, "dataverse": 12, "entra_tokens": 0}
    assert per_min(delta, 180) == {"commerce": 2.0, "dataverse": 4.0, "entra_tokens": 0.0}


def test_the_cron_period_rate_adds_one_run_of_each_dag_to_the_window_without_its_scheduled_runs() -> None:
    costs = {"b2b_prospect_sync": {"commerce": 6, "dataverse": 3}, "b2b_outcomes": {"commerce": 1, "dataverse": 9}}
    # A quiet window: nothing but the runs, 15 minutes apart.
    assert cron_period_rate({"commerce": 0, "dataverse": 0}, 180, {"b2b_prospect_sync": 0, "b2b_outcomes": 0},
                            costs, 15) == {"commerce": 0.47, "dataverse": 0.8}  # fmt: skip
    # A window that held a scheduled sync: its cost is taken out, not counted twice.
    assert cron_period_rate({"commerce": 6, "dataverse": 3}, 180, {"b2b_prospect_sync": 1, "b2b_outcomes": 0},
                            costs, 15) == {"commerce": 0.47, "dataverse": 0.8}  # fmt: skip
    # Requests beside the runs (3 a minute) stay.
    assert cron_period_rate({"commerce": 9, "dataverse": 12}, 180, {"b2b_prospect_sync": 1, "b2b_outcomes": 0},
                            costs, 15) == {"commerce": 1.47, "dataverse": 3.8}  # fmt: skip


@pytest.mark.parametrize(("summary", "minutes"), [("*/15 * * * *", 15.0), (" */5 * * * * ", 5.0),
                                                  ("0 2 * * *", None), (None, None), ("Asset or */15", None)])  # fmt: skip
def test_cron_minutes_reads_every_n_minutes_schedules_only(summary: str | None, minutes: float | None) -> None:
    assert cron_minutes(summary) == minutes


def side_figures(lead_p95: float | None, email_p95: float | None, idle: dict, censored: int = 0) -> dict:
    def latency(p95: float | None) -> dict:
        return {"n": 0 if p95 is None else 40, "p50": None if p95 is None else p95 / 2, "p95": p95, "max": p95,
                "censored": censored}  # fmt: skip

    return {
        "prospect_to_lead_s": latency(lead_p95), "decision_to_email_s": latency(email_p95),
        "arrived": 40, "backlog": 20, "leads": 60,
        "decisions": {"applied": 30, "skipped_no_lead": 2, "errors": [],
                      "by_outcome": {"won": 12, "lost": 10, "disqualified": 8}},
        "emails": 30, "emails_unexpected": 0, "active_requests": {"commerce": 120, "dataverse": 340},
        "idle": {"window_s": 180.0, "requests": {}, "requests_per_min": idle,
                 "runs_started": {"b2b_prospect_sync": 0, "b2b_outcomes": 1}, "scheduled_runs_started": {}},
        "runs_started": {"b2b_prospect_sync": {"asset_triggered": 9, "scheduled": 1}, "b2b_outcomes": {}},
        "failed_tasks": 0, "harness_dataverse_requests": 700,
    }  # fmt: skip


def results() -> dict:
    events = side_figures(24.6, 51.0, {"commerce": 2.0, "dataverse": 4.0, "entra_tokens": 0.0})
    time_based = side_figures(790.2, 860.0, {"commerce": 0.0, "dataverse": 0.0, "entra_tokens": 0.0}, censored=3)
    time_based["cron_period"] = {"period_min": 15.0, "run_cost": {}, "requests_per_min": {"commerce": 0.47,
                                                                                          "dataverse": 4.2}}  # fmt: skip
    return build_results({"seed": 1, "duration_s": 600}, {"events": events, "time": time_based})


def test_results_json_has_the_issue_s_keys_for_both_setups_and_every_figure() -> None:
    found = json.loads(json.dumps(results()))  # as written: plain JSON

    assert found["p95_prospect_to_lead_s"] == 24.6
    assert found["p95_decision_to_email_s"] == 51.0
    assert found["idle_requests_per_min"] == {"commerce": 2.0, "dataverse": 4.0}
    assert found["time_based"] == {
        "p95_prospect_to_lead_s": 790.2, "p95_decision_to_email_s": 860.0,
        "idle_requests_per_min": {"commerce": 0.0, "dataverse": 0.0}, "idle_tokens_per_min": 0.0,
        "idle_requests_per_min_over_cron_period": {"commerce": 0.47, "dataverse": 4.2}, "cron_period_min": 15.0,
    }  # fmt: skip
    assert found["targets"] == TARGETS
    assert found["verdicts"]["events"] == {"p95_prospect_to_lead_s": "PASS", "p95_decision_to_email_s": "PASS",
                                           "idle_requests_per_min.commerce": "PASS",
                                           "idle_requests_per_min.dataverse": "PASS"}  # fmt: skip
    assert found["verdicts"]["time"]["p95_prospect_to_lead_s"] == "FAIL"
    assert found["settings"] == {"seed": 1, "duration_s": 600}
    assert found["deployments"]["time"]["prospect_to_lead_s"]["censored"] == 3
    assert found["deployments"]["events"]["decisions"]["by_outcome"]["won"] == 12


def test_a_target_above_its_limit_fails_and_nothing_measured_is_not_a_pass() -> None:
    events = side_figures(60.0, 120.1, {"commerce": 4.0, "dataverse": 4.5, "entra_tokens": 0.0})
    time_based = side_figures(None, None, {"commerce": 0.0, "dataverse": 0.0, "entra_tokens": 0.0})

    found = build_results({}, {"events": events, "time": time_based})

    assert found["verdicts"]["events"] == {"p95_prospect_to_lead_s": "PASS", "p95_decision_to_email_s": "FAIL",
                                           "idle_requests_per_min.commerce": "PASS",
                                           "idle_requests_per_min.dataverse": "FAIL"}  # fmt: skip
    assert found["verdicts"]["time"]["p95_prospect_to_lead_s"] == "n/a"
    assert found["time_based"]["idle_requests_per_min_over_cron_period"] is None


def test_the_table_puts_events_and_time_side_by_side_with_targets_and_verdicts() -> None:
    printed = table(results())
    lines = printed.splitlines()

    header = lines[0].split()
    assert header == ["events", "time", "target"]
    events_column, time_column = lines[0].index("events"), lines[0].index("time")

    def cells(label: str) -> tuple[str, str, str]:
        line = next(line for line in lines if line.startswith(label))
        target_column = lines[0].index("target")
        return (line[events_column:time_column].strip(), line[time_column:target_column].strip(),
                line[target_column:].strip())  # fmt: skip

    assert cells("prospect -> lead p50/p95/max s") == ("12.3 / 24.6 / 24.6  PASS", "395.1 / 790.2 / 790.2  FAIL",
                                                       "p95 <= 60 s")  # fmt: skip
    assert cells("decision -> email p50/p95/max s")[2] == "p95 <= 120 s"
    assert cells("  measured, censored")[:2] == ("40, 0", "37, 3")
    assert cells("idle req/min commerce") == ("2.0  PASS", "0.0  PASS", "<= 4")
    assert cells("idle req/min dataverse") == ("4.0  PASS", "0.0  PASS", "<= 4")
    assert cells("idle req/min over a 15-min cron period commerce") == ("-", "0.47  PASS", "<= 4")
    assert cells("idle req/min over a 15-min cron period dataverse") == ("-", "4.2  FAIL", "<= 4")
    assert cells("product requests window+drain c / d")[:2] == ("120 / 340", "120 / 340")
    assert cells("decisions applied, skipped")[:2] == ("30, 2", "30, 2")
    assert cells("  won / lost / disqualified")[0] == "12 / 10 / 8"
    assert cells("runs started b2b_prospect_sync")[0] == "9 asset_triggered, 1 scheduled"
    assert cells("runs started b2b_outcomes")[0] == "0"
    assert cells("failed task instances")[:2] == ("0", "0")


def test_the_table_says_none_where_nothing_was_measured() -> None:
    found = build_results({}, {"events": side_figures(None, None, {"commerce": 0.0, "dataverse": 0.0,
                                                                   "entra_tokens": 0.0}),
                               "time": side_figures(None, None, {"commerce": 0.0, "dataverse": 0.0,
                                                                 "entra_tokens": 0.0})})  # fmt: skip
    line = next(line for line in table(found).splitlines() if line.startswith("prospect -> lead"))
    assert line.split()[-6:] == ["none", "none", "p95", "<=", "60", "s"]
