"""A week's backfill of the sync, by a real Airflow (api-server, scheduler, dag-processor, LocalExecutor)
against the fakes: `airflow backfill create` over the last 7 days of its logical dates (hourly, the
safety net of the events mode, the default; `*/15` in time mode), and the UI's Backfill, create
nothing twice.

What one manual run does on 20 prospects is the yardstick. The same world is then built again and the
week is backfilled with `--max-active-runs 4` (a backfill has its own limit: the DAG's
`max_active_runs=1` does not hold its runs back, so four syncs overlap). All runs are created (168, or
~670 every 15 minutes), as the command creates them; running 672 took 39 minutes on this 2-core machine
(~20 runs a minute), so the test lets the first RUNS_TO_SEE of them succeed, then cancels the rest as
the UI's Cancel does,
and checks: every run that ran succeeded, one lead per prospect, exactly the leads of one run (same
ids, same contents), each upserted once (the writes of one run: overlapping runs claim the prospects
they push, and a run that finds them claimed leaves them to the claimant, `flow.claims`), Commerce
untouched, the state store of one run. Then the UI's Backfill re-runs the first few completed runs
one at a time, and a manual run follows: neither writes anything nor changes the state store.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest

from b2b_onboarding.airflow import schedules
from d365_fakes.scenario import prospects

pytestmark = pytest.mark.e2e
pytest_plugins = ["airflow_services"]

SYNC = "b2b_prospect_sync"
PROSPECTS = 20
RUNS_TO_SEE = 32  # backfill runs that must succeed before the rest is cancelled
# The period of the sync's cron as the services schedule it (the same settings as this process).
EVERY = timedelta(hours=1) if schedules.mode() == "events" else timedelta(minutes=15)
MAX_ACTIVE_RUNS = 4
BUDGET_S = 300


def _writes(admin) -> dict:
    counts = admin.counts()
    return {"commerce": counts["commerce"]["writes"], "dataverse": counts["dataverse"]["writes"]}


def _dump(state_db) -> dict[str, list[tuple]]:
    """The state store as it is: every prospect row and every transition, all columns."""
    tables = {"b2b_prospects": "legal_entity, prospect_id", "b2b_transitions": "id"}
    with sqlite3.connect(state_db) as connection:
        return {table: connection.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
                for table, order in tables.items()}  # fmt: skip


def _facts(state_db) -> dict:
    """What the state store knows, without the run ids and times that differ from world to world: each
    prospect's stage, facts and errors, and its transitions in order."""
    with sqlite3.connect(state_db) as connection:
        connection.row_factory = sqlite3.Row
        rows = {(row["legal_entity"], row["prospect_id"]): {key: row[key] for key in row.keys()
                if not re.search(r"(_at|run_id)$", key)}
                for row in connection.execute("SELECT * FROM b2b_prospects")}  # fmt: skip
        history: dict[tuple, list] = {}
        for row in connection.execute("SELECT * FROM b2b_transitions ORDER BY id"):
            history.setdefault((row["legal_entity"], row["prospect_id"]), []).append(
                (row["from_stage"], row["to_stage"], row["error"]))
    return {"prospects": rows, "transitions": history}


def _left_to_another_run(state_db) -> int:
    """How many prospects the push tasks found claimed by an overlapping run (their recorded results)."""
    with sqlite3.connect(state_db) as connection:
        results = [json.loads(text) for (text,) in connection.execute(
            "SELECT result FROM b2b_step_results WHERE task_id = 'push_leads'")]  # fmt: skip
    return sum(result.get("claimed by another run", 0) for result in results)


def _leads(services) -> list[dict]:
    seller = services.seller()
    try:
        return seller.view("All Commerce B2B leads")
    finally:
        seller.close()


def _lead_contents(services) -> list[dict]:
    """Every lead of the view, by id, without what the server stamps (ETag, created and modified on,
    version): those differ from world to world, and a re-upsert of the same contents changes them."""
    return sorted(({key: value for key, value in lead.items() if not key.startswith("@") and key not in
                    ("createdon", "modifiedon", "versionnumber")} for lead in _leads(services)),
                  key=lambda lead: lead["leadid"])  # fmt: skip


def _world(services) -> tuple[list[dict], dict]:
    services.fresh_world()
    seeded, plan = prospects(PROSPECTS)
    with services.admin() as admin:
        admin.seed_prospects(seeded)
    return seeded, plan


def _grid(start: datetime, end: datetime) -> list[datetime]:
    """The logical dates, EVERY apart from the hour, from `start` to `end`, both included."""
    minutes = int(EVERY / timedelta(minutes=1))
    first = start.replace(second=0, microsecond=0) + timedelta(minutes=-start.minute % minutes)
    if first < start:
        first += EVERY
    return [first + EVERY * n for n in range(int((end - first) / EVERY) + 1)]


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_week_of_backfill_runs_creates_nothing_twice(airflow_services):
    services = airflow_services
    started = time.monotonic()

    # The yardstick: one manual run (REST API) on a fresh world of 20 prospects, two of them invalid.
    _, plan = _world(services)
    services.run_dag(SYNC)
    with services.admin() as admin:
        one_run_writes = _writes(admin)
    one_run_facts = _facts(services.state_db)
    one_run_leads = _lead_contents(services)  # lead ids derive from prospect keys: the same in the next world
    valid = sum(decision != "invalid" for decision in plan.values())
    assert one_run_writes["dataverse"]["leads"] == valid == PROSPECTS - 2
    print(f"\none run: {time.monotonic() - started:.0f} s, writes {one_run_writes}")

    # The same world again, and a week of backfill over it.
    _world(services)
    to_date = datetime.now(UTC).replace(second=0, microsecond=0)
    from_date = to_date - timedelta(days=7)
    clock = time.monotonic()
    backfill = services.backfill(SYNC, "--from-date", from_date.isoformat(), "--to-date", to_date.isoformat(),
                                 "--max-active-runs", str(MAX_ACTIVE_RUNS), "--reprocess-behavior", "none")  # fmt: skip
    print(f"backfill {backfill['id']} created in {time.monotonic() - clock:.0f} s: "
          f"{backfill['from_date']} .. {backfill['to_date']}")  # fmt: skip
    assert (_when(backfill["from_date"]), _when(backfill["to_date"])) == (from_date, to_date)
    assert backfill["max_active_runs"] == MAX_ACTIVE_RUNS
    created = services.runs(SYNC, run_type="backfill")
    # `--reprocess-behavior none`: the dates the schedule already ran are skipped.
    taken = {_when(run["logical_date"]) for run in services.runs(SYNC) if run["run_type"] != "backfill"}
    expected = [date for date in _grid(from_date, to_date) if date not in taken]
    assert sorted(_when(run["logical_date"]) for run in created) == expected
    assert len(expected) >= timedelta(days=7) / EVERY - 2, "a week of logical dates"

    # Let the first runs succeed (four at a time), then cancel the rest, as the UI's Cancel does.
    clock = time.monotonic()
    while True:
        states = {state: services.api("GET", f"/dags/{SYNC}/dagRuns", params={"run_type": "backfill",
                  "state": state, "limit": 1})["total_entries"] for state in ("success", "failed")}  # fmt: skip
        assert states["failed"] == 0, services.task_errors([SYNC])
        if states["success"] >= RUNS_TO_SEE:
            break
        assert time.monotonic() - clock < BUDGET_S, f"{states['success']} backfill runs in {BUDGET_S} s"
        services.check([SYNC])
        time.sleep(2)
    cancelled = services.api("PUT", f"/backfills/{backfill['id']}/cancel")
    assert cancelled["completed_at"]
    services.wait_idle([SYNC])
    runs = services.runs(SYNC, run_type="backfill")
    ran = [run for run in runs if run["state"] == "success"]
    never_ran = [run for run in runs if run["state"] == "failed" and run["end_date"] is None]
    assert len(ran) + len(never_ran) == len(runs), [run for run in runs if run not in ran + never_ran]
    failed_tasks = services.api("GET", f"/dags/{SYNC}/dagRuns/~/taskInstances",
                                params={"state": ["failed", "upstream_failed"], "limit": 1})  # fmt: skip
    assert failed_tasks["total_entries"] == 0
    print(f"backfill: {len(ran)} runs succeeded in {time.monotonic() - clock:.0f} s "
          f"({MAX_ACTIVE_RUNS} at a time), {len(never_ran)} cancelled before they started")  # fmt: skip

    # Nothing twice: one lead per prospect, the very leads of one run, each upserted once however the
    # runs overlapped, Commerce untouched, the state store of one run.
    leads = _leads(services)
    assert len(leads) == len({(lead["_msdyn_company_value"], lead["msdyn_prospectid"]) for lead in leads}) == valid
    assert _lead_contents(services) == one_run_leads
    with services.admin() as admin:
        backfill_writes = _writes(admin)
        pulls = admin.counts()["commerce"]["requests"]
    assert backfill_writes == one_run_writes, "the writes of one run: no lead upserted twice"
    print(f"prospects a push task found claimed by an overlapping run: {_left_to_another_run(services.state_db)}")
    assert pulls >= 2 * len(ran), "every backfill run pulled both legal entities from Commerce"
    assert _facts(services.state_db) == one_run_facts

    # The UI's Backfill (its REST call, its defaults: one run at a time) over the first logical dates of the
    # week, with "reprocess completed runs": the dates that ran are cleared and run again.
    before = _dump(services.state_db)
    first_to = from_date + 3 * EVERY
    clock = time.monotonic()
    again = services.backfill_as_the_ui(SYNC, from_date.isoformat(), first_to.isoformat(),
                                        reprocess_behavior="completed")  # fmt: skip
    while not services.api("GET", f"/backfills/{again['id']}")["completed_at"]:
        assert time.monotonic() - clock < BUDGET_S, f"the UI's backfill {again['id']} not done in {BUDGET_S} s"
        services.check([SYNC])
        time.sleep(2)
    first = sorted((run for run in services.runs(SYNC, run_type="backfill") if _when(run["logical_date"]) <= first_to),
                   key=lambda run: run["logical_date"])  # fmt: skip
    assert [_when(run["logical_date"]) for run in first] == _grid(from_date, first_to)
    assert all(run["state"] == "success" and _when(run["end_date"]) > _when(again["created_at"]) for run in first), first
    print(f"the UI's backfill: the first {len(first)} runs again in {time.monotonic() - clock:.0f} s")

    # Then a later run (manual, REST API). Neither wrote anything, nor changed one byte of the store.
    services.run_dag(SYNC)
    with services.admin() as admin:
        assert _writes(admin) == backfill_writes
    assert _dump(services.state_db) == before
    assert _lead_contents(services) == one_run_leads
    print(f"backfill test: {time.monotonic() - started:.0f} s")
