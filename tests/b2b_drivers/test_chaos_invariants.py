"""The chaos suite's invariant checks (`b2b_drivers.chaos`), on tiny hand-made end states: each holds
on a correct one and fails, naming the prospect, on one that breaks it."""

from __future__ import annotations

import sqlite3

from b2b_drivers.chaos import (
    OUT_OF,
    WatchCheck,
    _fresh,
    chaos_prospects,
    check_bad_records_kept,
    check_decisions,
    check_invariants,
    check_links_stored_by_dag_runs,
    check_no_lead_written_again,
    check_no_prospect_lost,
    check_one_customer_pair_per_qualified,
    check_one_email_per_decided,
    check_one_lead_per_prospect,
    check_watchers_moved_nothing,
    check_watchers_noticed_then_quiet,
    failure_of,
    fault_figures,
    lead_key,
    retries_from_results,
    stored_links,
    watch_figures,
)
from d365_fakes.dataverse import company_id

APPROVED, REJECTED = "B2B prospect approved", "B2B prospect rejected"
PLAN = {
    ("usrt", "P-1"): "won",
    ("usrt", "P/2"): "lost",
    ("usmf", "P-1"): "disqualified",
    ("usmf", "P'3"): "qualified",
    ("usmf", "P-4"): "untouched",
    ("usrt", "P-9"): "invalid",
}
BAD = {("usrt", "P-9"): "invalid email"}


def lead(key: tuple[str, str], leadid: str | None = None) -> dict:
    return {"leadid": leadid or f"id-{key[0]}-{key[1]}", "msdyn_prospectid": key[1], "_msdyn_company_value": company_id(key[0])}


def good_state() -> dict:
    """The end state a correct product leaves for PLAN."""
    status = {"won": "Approved", "lost": "Rejected", "disqualified": "Rejected", "qualified": "Pending",
              "untouched": "Pending", "invalid": "Pending"}  # fmt: skip
    stage = {"won": "approved", "lost": "rejected", "disqualified": "rejected", "qualified": "customers_created",
             "untouched": "lead_open", "invalid": "invalid"}  # fmt: skip
    template = {"won": APPROVED, "lost": REJECTED, "disqualified": REJECTED}
    return {
        "hq_prospects": [{"dataAreaId": le.upper() if le == "usmf" else le, "ProspectId": pid,
                          "B2BProspectStatus": status[plan]} for (le, pid), plan in PLAN.items()],  # fmt: skip
        "leads": [lead(key) for key, plan in PLAN.items() if plan != "invalid"],
        "outbox": [{"dataAreaId": le, "ProspectId": pid, "template": template[plan]}
                   for (le, pid), plan in PLAN.items() if plan in template],  # fmt: skip
        "store_rows": [{
            "legal_entity": le, "prospect_id": pid, "stage": stage[plan],
            "validation_error": f"prospect {le}/{pid}: PrimaryEmailAddress: not an email" if plan == "invalid" else None,
            "last_error": None, "lead_id": None if plan == "invalid" else f"id-{le}-{pid}",
            "decision": {"won": "approved", "lost": "rejected", "disqualified": "rejected"}.get(plan),
        } for (le, pid), plan in PLAN.items()],  # fmt: skip
        "customers": [{"dataAreaId": le, "PartyType": party, "OrganizationName": f"Org {pid}" if party == "Organization" else None,
                       "PrimaryContactEmail": f"{pid}@{le}.example"}
                      for (le, pid), plan in PLAN.items() if plan in ("won", "lost", "qualified")
                      for party in ("Organization", "Person")],  # fmt: skip
    }


def test_a_correct_end_state_passes_every_invariant():
    checks = check_invariants(PLAN, BAD, **good_state())
    assert [(check.name, check.violations) for check in checks if not check.ok] == []
    assert [check.checked for check in checks] == [6, 3, 6, 6, 1, 6]


def test_a_doubled_or_missing_customer_fails():
    state = good_state()
    doubled = state["customers"] + [dict(state["customers"][0], PrimaryContactEmail="again@usrt.example")]
    violations = check_one_customer_pair_per_qualified(doubled, PLAN, BAD).violations
    assert violations == ["usrt: 3 Organization customers, expected 2", "usrt: 2 customers named 'Org P-1'"]
    missing = [row for row in state["customers"] if row["PartyType"] == "Organization" or row["dataAreaId"] != "usmf"]
    assert check_one_customer_pair_per_qualified(missing, PLAN, BAD).violations == [
        "usmf: 0 Person customers, expected 1"]


def test_the_lead_key_keeps_colons_and_quotes_of_the_prospect_id():
    assert lead_key({"msdyn_prospectid": "USRT:P'1:a"}) == ("usrt", "P'1:a")  # as earlier versions keyed leads
    assert lead_key({"msdyn_prospectid": "P'1:a", "_msdyn_company_value": company_id("usrt")}, ["usmf", "usrt"]) == (
        "usrt", "P'1:a")


def test_a_second_lead_for_a_prospect_fails():
    state = good_state()
    leads = state["leads"] + [lead(("usrt", "P/2"), "another")]
    check = check_one_lead_per_prospect(leads, PLAN, BAD)
    assert not check.ok
    assert check.violations == ["usrt/P/2: 2 leads"]


def test_a_missing_lead_a_lead_of_a_bad_record_and_a_stray_lead_fail():
    state = good_state()
    leads = [row for row in state["leads"] if lead_key(row, ["usmf", "usrt"]) != ("usmf", "P-4")]
    leads += [lead(("usrt", "P-9")), {"leadid": "y", "msdyn_prospectid": "frrt:P-1"}, {"leadid": "x", "msdyn_prospectid": None}]
    violations = check_one_lead_per_prospect(leads, PLAN, BAD).violations
    assert "usmf/P-4: 0 leads" in violations
    assert "usrt/P-9: a bad record has 1 lead(s)" in violations
    assert "frrt/P-1: 1 lead(s) of a prospect never seeded" in violations
    assert any("names no prospect" in violation for violation in violations)


def test_a_second_email_a_missing_one_or_one_to_an_undecided_prospect_fails():
    outbox = good_state()["outbox"]
    twice = outbox + [{"dataAreaId": "usrt", "ProspectId": "P-1", "template": APPROVED}]
    assert check_one_email_per_decided(twice, PLAN).violations == [
        "usrt/P-1 (won): emails {'B2B prospect approved': 2}, expected {'B2B prospect approved': 1}"
    ]
    missing = [mail for mail in outbox if mail["ProspectId"] != "P/2"]
    assert not check_one_email_per_decided(missing, PLAN).ok
    undecided = outbox + [{"dataAreaId": "usmf", "ProspectId": "P-4", "template": REJECTED}]
    assert check_one_email_per_decided(undecided, PLAN).violations == [
        "usmf/P-4 (untouched): emails {'B2B prospect rejected': 1}, expected none"
    ]


def test_the_wrong_template_fails():
    outbox = [{**mail, "template": REJECTED} if mail["ProspectId"] == "P-1" and mail["dataAreaId"] == "usrt" else mail
              for mail in good_state()["outbox"]]  # fmt: skip
    assert not check_one_email_per_decided(outbox, PLAN).ok


def test_a_status_in_commerce_or_a_stage_in_the_store_other_than_the_sellers_outcome_fails():
    state = good_state()
    hq = [{**row, "B2BProspectStatus": "Approved"} if row["ProspectId"] == "P/2" else row for row in state["hq_prospects"]]
    check = check_decisions(hq, state["store_rows"], PLAN, BAD)
    assert check.violations == ["usrt/P/2 (lost): Approved in Commerce, expected Rejected"]
    store = [{**row, "stage": "qualified"} if row["prospect_id"] == "P'3" else row for row in state["store_rows"]]
    check = check_decisions(state["hq_prospects"], store, PLAN, BAD)
    assert check.violations == ["usmf/P'3 (qualified): stage qualified in the state store, expected customers_created"]


def test_a_bad_record_without_error_with_an_anonymous_error_or_with_a_lead_fails():
    state = good_state()

    def with_bad(**changes):
        return [{**row, **changes} if row["prospect_id"] == "P-9" else row for row in state["store_rows"]]

    assert check_bad_records_kept(with_bad(validation_error=None, last_error="  "), state["leads"], BAD).violations == [
        "usrt/P-9 (invalid email): kept without an error"
    ]
    anonymous = check_bad_records_kept(with_bad(validation_error="not an email"), state["leads"], BAD)
    assert "does not name it" in anonymous.violations[0]
    kept_by_last_error = with_bad(validation_error=None, last_error="prospect usrt/P-9: refused")
    assert check_bad_records_kept(kept_by_last_error, state["leads"], BAD).ok
    assert check_bad_records_kept(with_bad(lead_id="abc"), state["leads"], BAD).violations == [
        "usrt/P-9 (invalid email): has a lead"
    ]
    in_sales = check_bad_records_kept(state["store_rows"], state["leads"] + [lead(("usrt", "P-9"))], BAD)
    assert in_sales.violations == ["usrt/P-9 (invalid email): has a lead"]
    untracked = [row for row in state["store_rows"] if row["prospect_id"] != "P-9"]
    assert check_bad_records_kept(untracked, state["leads"], BAD).violations == [
        "usrt/P-9 (invalid email): not in the state store"
    ]


def test_a_prospect_missing_from_commerce_or_the_store_or_doubled_or_unseeded_fails():
    state = good_state()
    hq = [row for row in state["hq_prospects"] if row["ProspectId"] != "P'3"]
    assert check_no_prospect_lost(PLAN, hq, state["store_rows"]).violations == ["usmf/P'3: 0 times in Commerce"]
    store = state["store_rows"] + [state["store_rows"][0], {"legal_entity": "dert", "prospect_id": "X"}]
    assert check_no_prospect_lost(PLAN, state["hq_prospects"], store).violations == [
        "usrt/P-1: 2 times in the state store",
        "dert/X: in the state store, never seeded",
    ]


def test_the_faulted_share_counts_commerce_and_dataverse_only():
    served = {"commerce": {"503": 3, "reset": 1}, "dataverse": {"429": 2, "slow": 4}, "entra": {"503": 5}}
    figures = fault_figures(served, {"commerce": 60, "dataverse": 40, "entra_tokens": 9})
    assert figures["faulted"] == 10 and figures["requests"] == 100 and figures["share"] == 0.1
    assert figures["by_system"]["entra"] == {"503": 5}
    assert fault_figures({}, {})["share"] == 0.0


def test_retries_are_summed_from_task_results_or_not_available():
    results = [{"commerce_retries": 2, "dataverse_retries": 1}, {"dataverse_retries": 4}, ["usrt"], None, {"x": 1}]
    assert retries_from_results(results) == {"commerce": 2, "dataverse": 5, "total": 7}
    assert retries_from_results([{"commerce_requests": 3}, ["usrt"]]) is None


def test_a_failed_task_is_found_in_a_dags_test_log():
    log = "\n".join([
        "2026-01-01T00:00:00Z [info ] [DAG TEST] starting task_id=push_leads map_index=2 [x]",
        "2026-01-01T00:00:01Z [error ] Task failed with exception [task]",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "b2b_onboarding.errors.D365Error: dataverse: upsert failed with HTTP 502",
        "2026-01-01T00:00:02Z [info ] Task instance state updated new_state=up_for_retry rows_affected=1",
        "2026-01-01T00:00:03Z [warning] No tasks to run.",
    ])  # fmt: skip
    task, error, excerpt = failure_of(log)
    assert task == "push_leads[2]"
    assert error == "b2b_onboarding.errors.D365Error: dataverse: upsert failed with HTTP 502"
    assert excerpt[0].endswith("Task failed with exception [task]") and excerpt[-1].endswith("rows_affected=1")


def test_the_seeded_prospects_record_every_bad_one_and_keep_keys_unique():
    rows, plan, bad = chaos_prospects(40, ("usrt", "usmf", "frrt"))
    keys = [(row["dataAreaId"].lower(), row["ProspectId"]) for row in rows]
    assert len(keys) == len(set(keys)) == len(plan)
    assert set(bad) <= set(plan) and all(plan[key] == "invalid" for key in bad)
    assert {plan[key] for key in plan if key not in bad} <= {"won", "lost", "disqualified", "qualified", "untouched"}
    duplicate = next(key for key, reason in bad.items() if reason.startswith("same email"))
    holder = bad[duplicate].removeprefix("same email as ").split("/", 1)
    emails = {(row["dataAreaId"].lower(), row["ProspectId"]): row["PrimaryEmailAddress"].lower() for row in rows}
    assert emails[duplicate] == emails[(holder[0], holder[1])] and duplicate[1] > holder[1]


# --scheduling events: what the watchers and the harness recorded.
LINKS = {"leads": ("https://crm/api/data/v9.2/leads?$deltatoken=1", "manual__a"),
         "Prospects@usrt": ("fingerprint-1", "manual__a")}  # fmt: skip


def watched(phase="sync", started=10.0, ended=11.0, hq=(), sales=(), errors=(), before=LINKS,
            after=LINKS) -> WatchCheck:  # fmt: skip
    return WatchCheck(phase, started, ended, None if hq is None else list(hq), None if sales is None else list(sales),
                      list(errors), dict(before), dict(after))  # fmt: skip


def test_a_link_or_watermark_stored_by_a_run_the_harness_never_started_fails():
    assert check_links_stored_by_dag_runs([LINKS, {}], {"manual__a", "manual__b"}).ok
    by_trigger = {**LINKS, "opportunities": ("https://crm/api/data/v9.2/opportunities?$deltatoken=9", "trigger")}
    check = check_links_stored_by_dag_runs([LINKS, by_trigger], {"manual__a"})
    assert check.violations == ["opportunities: stored by run 'trigger', which the harness never started"]
    assert check.checked == 3


def test_a_link_that_changed_during_a_watcher_check_while_no_run_ran_fails():
    moved = {**LINKS, "leads": ("https://crm/api/data/v9.2/leads?$deltatoken=2", "manual__a")}
    watermark_gone = {"leads": LINKS["leads"]}
    checks = [watched("sync", 10, 11, before=LINKS, after=moved),  # a run (5 to 12) was running: its own write
              watched("idle", 20, 21), watched("idle", 22, 23, before=LINKS, after=watermark_gone)]
    check = check_watchers_moved_nothing(checks, [(5.0, 12.0)])
    assert check.checked == 2
    assert check.violations == ["idle: Prospects@usrt changed during a watcher check, no DAG run running"]
    assert check_watchers_moved_nothing(checks[:2], [(5.0, 12.0)]).ok
    # A check that overlaps a run, if only by the run's end, is not held against the watchers; with no check
    # that ran alone, nothing is proven.
    assert check_watchers_moved_nothing([watched("x", 12, 13, after=moved), watched("idle", 20, 21)], [(5.0, 12.0)]).ok
    assert check_watchers_moved_nothing([watched("sync", 10, 11)], [(5.0, 12.0)]).violations == [
        "no watcher check ran while no DAG run was running"]


def test_watchers_must_notice_the_work_and_be_quiet_at_the_end():
    chaos = [watched(hq=["usrt"]), watched(hq=None, errors=[{"watcher": "hq", "error": "D365Error", "message": "503"}]),
             watched(sales=["leads", "opportunities"])]  # fmt: skip
    assert check_watchers_noticed_then_quiet(chaos, watched("final")).ok
    assert check_watchers_noticed_then_quiet(chaos[1:], watched("final")).violations == [
        "HQ watcher (pending prospects): never reported a change"]
    still = check_watchers_noticed_then_quiet(chaos, watched("final", hq=["usmf"], sales=None, errors=[
        {"watcher": "sales", "error": "D365Error", "message": "dataverse: HTTP 503"}]))  # fmt: skip
    assert still.violations == [
        "HQ watcher (pending prospects): still reports usmf after the final runs",
        "Sales watcher (seller outcomes): failed at the end: dataverse: HTTP 503",
    ]
    assert check_watchers_noticed_then_quiet(chaos, None).violations == ["no final check"]


def test_a_lead_written_again_in_the_clean_phase_fails():
    assert check_no_lead_written_again(3, 3, 600).ok and check_no_lead_written_again(0, 0, 600).checked == 600
    assert check_no_lead_written_again(5, 3, 600).violations == [
        "5 lead writes by the flow for 3 leads created in the clean phase"]


def test_watch_figures_count_checks_changes_and_failures_by_watcher_and_type():
    def error(watcher: str, kind: str) -> dict:
        return {"watcher": watcher, "error": kind, "message": f"{watcher} failed"}

    checks = [watched(hq=["usrt"], sales=["leads"]),
              watched(hq=None, sales=None, errors=[error("hq", "D365Error"), error("sales", "D365Error")]),
              watched(hq=None, errors=[error("hq", "AuthenticationError")])]  # fmt: skip
    assert watch_figures(checks) == {
        "checks": 3, "hq_reported_changes": 1, "sales_reported_changes": 1, "failed": 2,
        "errors": {"hq: AuthenticationError": 1, "hq: D365Error": 1, "sales: D365Error": 1},
    }


def test_stored_links_reads_the_store_and_is_empty_before_it_exists(tmp_path):
    database = tmp_path / "state.db"
    assert stored_links(database) == {}
    sqlite3.connect(database).close()
    assert stored_links(database) == {}  # the file, not yet the table
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE b2b_delta_links (entity_set TEXT, delta_link TEXT, run_id TEXT, updated_at TEXT)")
    connection.execute("INSERT INTO b2b_delta_links VALUES ('leads', 'https://crm/x', 'manual__a', '2026-01-01')")
    connection.commit()
    connection.close()
    assert stored_links(database) == {"leads": ("https://crm/x", "manual__a")}


def test_each_scheduling_writes_its_own_output_and_keeps_the_others(tmp_path, monkeypatch):
    time_out, events_out = tmp_path / ".chaos", tmp_path / ".chaos" / "events"
    monkeypatch.setitem(OUT_OF, "time", time_out)
    monkeypatch.setitem(OUT_OF, "events", events_out)
    _fresh(events_out)
    (events_out / "results.json").write_text("{}")
    (time_out / "results.json").write_text("{}")
    (time_out / "homes").mkdir()
    _fresh(time_out)
    assert sorted(path.name for path in time_out.iterdir()) == ["events", "logs"]
    assert (events_out / "results.json").exists()
    _fresh(events_out)
    assert [path.name for path in events_out.iterdir()] == ["logs"]
