"""The demo's story (`make demo`) on the production topology: CeleryExecutor with two workers,
PostgreSQL and Redis (deployment.py), both DAGs triggered through the REST API as the UI's Trigger
button does, with `chunk_size` 3 so that each step is mapped over many task instances.

50 prospects over two legal entities; the sync; the sellers decide; the reconciliation; both DAGs
again, which must write nothing. Then: every prospect's status in Commerce matches its seller's
decision with one email each (`observe`, as the demo judges), the state store in its PostgreSQL
database holds the same outcome, the mapped task instances ran on both workers (by the hostname
each task process recorded, checked against the workloads each worker logged), and the broker was
this run's Redis. Prints which task ran on which worker and each phase's time; both are also in
`.artifacts/distributed/` (`tasks.txt`, `summary.json`).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from contextlib import contextmanager

import pandas as pd
import pytest
import sqlalchemy as sa
from deployment import WORKERS, Distributed, postgres_url

from d365_fakes.scenario import observe, play_sellers, prospects, total_writes

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

SYNC = "b2b_prospect_sync"
RECONCILIATION = "b2b_outcome_reconciliation"
LEGAL_ENTITIES = ("usrt", "usmf")
PROSPECTS = 50
CHUNK_SIZE = 3
RUN_TIMEOUT_S = 420
# "Executing workload in Celery: dag_rel_path=... bundle_info=... log_path=... ti=TaskInstanceDTO(id=UUID('<ti id>'), ..."
WORKLOAD = re.compile(r"Executing workload in Celery: .*?\bti=\w*\(id=UUID\('([0-9a-f-]{36})'\)")


@contextmanager
def phase(timings: dict[str, float], name: str):
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started
    print(f"{name:<72} {timings[name]:7.1f} s")


def task_instances(distributed: Distributed, dag_id: str, run_id: str) -> list[dict]:
    found: list[dict] = []
    while True:
        page = distributed.services.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                                        params={"limit": 100, "offset": len(found)})  # fmt: skip
        found += page["task_instances"]
        if not page["task_instances"] or len(found) >= page["total_entries"]:
            return found


def workloads_by_worker(distributed: Distributed) -> dict[str, str]:
    """TaskInstance id → the worker whose log says it executed that workload."""
    executed: dict[str, str] = {}
    for worker in WORKERS:
        for ti_id in WORKLOAD.findall(distributed.services.log_path(worker).read_text(errors="replace")):
            assert executed.get(ti_id, worker) == worker, f"task instance {ti_id} executed by two workers"
            executed[ti_id] = worker
    return executed


def test_the_demo_story_runs_on_celery_with_two_workers_on_postgresql_and_redis(distributed: Distributed) -> None:
    services, timings = distributed.services, distributed.timings
    print("\n" + "\n".join(f"{name:<72} {seconds:7.1f} s" for name, seconds in timings.items()))  # the start
    conf = {"chunk_size": CHUNK_SIZE}
    runs: list[tuple[str, str, str]] = []  # (label, dag id, run id)

    def run(label: str, dag_id: str) -> None:
        with phase(timings, f"{label}: {dag_id} (REST trigger → success)"):
            services.wait_idle([dag_id], timeout=RUN_TIMEOUT_S)
            run_id = services.trigger(dag_id, conf)
            services.wait_for_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
        runs.append((label, dag_id, run_id))

    with services.admin() as admin:
        seeded, plan = prospects(PROSPECTS, LEGAL_ENTITIES)
        admin.seed_prospects(seeded)
        run("1st sync", SYNC)
        with phase(timings, "sellers decide (Dataverse Web API)"):
            seller = services.seller()
            try:
                decided = play_sellers(seller, plan)
            finally:
                seller.close()
        run("1st reconciliation", RECONCILIATION)
        writes_before = total_writes(admin.counts())
        run("2nd sync", SYNC)
        run("2nd reconciliation", RECONCILIATION)
        writes_in_second_round = total_writes(admin.counts()) - writes_before
    with phase(timings, "observe: Commerce, Sales, outbox, state store"):
        outcome = observe(services.endpoints, services.cast, plan)
        engine = sa.create_engine(postgres_url(distributed.databases.state))
        try:
            with engine.connect() as connection:
                stages = dict(connection.execute(sa.text("SELECT stage, count(*) FROM b2b_prospects GROUP BY stage")).all())
        finally:
            engine.dispose()

    # Which task ran where: the hostname each task process recorded, and each worker's own log.
    executed = workloads_by_worker(distributed)
    rows = []
    for label, dag_id, run_id in runs:
        for ti in task_instances(distributed, dag_id, run_id):
            rows.append({
                "run": label, "task": ti["task_id"],
                "chunk": ti.get("rendered_map_index") or ("" if ti["map_index"] < 0 else str(ti["map_index"])),
                "mapped": ti["map_index"] >= 0, "state": ti["state"], "worker (TI hostname)": ti["hostname"] or "",
                "worker (its log)": executed.get(ti["id"], ""), "pool": ti["pool"],
                "queued→start s": _seconds(ti.get("queued_when"), ti.get("start_date")),
                "duration s": round(ti["duration"], 1) if ti.get("duration") is not None else None,
                "started": ti.get("start_date") or "",
            })  # fmt: skip
    order = {label: index for index, (label, _, _) in enumerate(runs)}
    table = pd.DataFrame(rows).sort_values(["run", "started"], key=lambda column: column.map(order)
                                           if column.name == "run" else column, kind="stable")  # fmt: skip
    table = table.drop(columns="started").reset_index(drop=True)
    ran = table[table["state"] == "success"]
    mapped = ran[ran["mapped"]]
    report = _report(table, timings, decided, outcome, writes_in_second_round, stages)
    print(report)
    kept = services.log_path("tasks").parent  # copied to .artifacts/distributed/ when Airflow stops
    (kept / "tasks.txt").write_text(report)
    (kept / "summary.json").write_text(json.dumps({
        "timings_s": {name: round(seconds, 1) for name, seconds in timings.items()},
        "task_instances_by_worker": {worker: int(n) for worker, n in ran["worker (TI hostname)"].value_counts().items()},
        "mapped_task_instances_by_worker": {w: int(n) for w, n in mapped["worker (TI hostname)"].value_counts().items()},
        "prospects": len(outcome.rows), "leads": outcome.leads, "hierarchies": outcome.hierarchies,
        "emails_sent": outcome.emails, "writes_in_second_round": writes_in_second_round, "state_store_stages": stages,
    }, indent=2) + "\n")  # fmt: skip

    # The same end state as the demo.
    wrong = [row for row in outcome.rows if not row["ok"]]
    assert not wrong, f"{len(wrong)} prospects do not match their seller's decision: {wrong}"
    assert outcome.ok and len(outcome.rows) == PROSPECTS
    assert outcome.leads == PROSPECTS - 2  # the two bad records never become leads
    assert writes_in_second_round == 0, f"the second round wrote {writes_in_second_round} times"
    # ...also in the state store's own PostgreSQL database.
    statuses = Counter(row["status"] for row in outcome.rows)
    assert stages.get("approved") == statuses["Approved"] and stages.get("rejected") == statuses["Rejected"]
    assert stages.get("invalid") == 2 and sum(stages.values()) == PROSPECTS

    # Every task that ran, ran on one of the two workers, and the worker's log agrees.
    assert not ran.empty and set(ran["worker (TI hostname)"]) <= set(WORKERS), ran["worker (TI hostname)"].unique()
    disagree = ran[ran["worker (TI hostname)"] != ran["worker (its log)"]]
    assert disagree.empty, f"TI hostname and the workers' logs disagree:\n{disagree.to_string()}"
    # The first round's mapped steps (many chunks of 3 prospects) were shared by both workers.
    for label in ("1st sync", "1st reconciliation"):
        workers = set(mapped.loc[mapped["run"] == label, "worker (TI hostname)"])
        assert workers == set(WORKERS), f"{label}: mapped task instances ran on {workers} only"

    # The broker was this run's Redis keys (kombu's bindings, under the run's prefix), and each
    # workload's Celery result went to the metadata database. A worker stores it once the task
    # process has exited, a moment after the task reported success to the api-server: waited for.
    assert any("_kombu.binding" in key for key in distributed.broker.keys()), distributed.broker.keys()
    engine = sa.create_engine(postgres_url(distributed.databases.metadata))
    try:
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as connection:
                results = dict(connection.execute(sa.text("SELECT status, count(*) FROM celery_taskmeta "
                                                          "GROUP BY status")).all())  # fmt: skip
            if results.get("SUCCESS", 0) >= len(ran) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        engine.dispose()
    assert results == {"SUCCESS": len(ran)}, f"Celery results {results}, {len(ran)} task instances ran"


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((pd.Timestamp(end) - pd.Timestamp(start)).total_seconds(), 1)


def _report(table: pd.DataFrame, timings: dict, decided: Counter, outcome, writes: int, stages: dict) -> str:
    ran = table[table["state"] == "success"]
    lines = ["", "Task instances of the four runs, and the worker that ran each:", table.to_string(index=False), ""]
    lines.append("Task instances that ran, per run and worker (mapped ones in brackets):")
    for label, group in ran.groupby("run", sort=False):
        per = ", ".join(f"{worker} {n} ({int(group[(group['worker (TI hostname)'] == worker) & group['mapped']].shape[0])})"
                        for worker, n in group["worker (TI hostname)"].value_counts().sort_index().items())  # fmt: skip
        lines.append(f"  {label:<20} {per}")
    lines += ["", "Phases:"] + [f"  {name:<72} {seconds:7.1f} s" for name, seconds in timings.items()]
    lines.append(f"  {'total':<72} {sum(timings.values()):7.1f} s")
    lines += ["", "Sellers decided: " + ", ".join(f"{n} {d}" for d, n in sorted(decided.items())),
              f"Outcome: {len(outcome.rows)} prospects, {outcome.leads} leads, {outcome.hierarchies} hierarchies, "
              f"{outcome.emails} emails; second round wrote {writes}; state store stages {stages}", ""]  # fmt: skip
    return "\n".join(lines)
