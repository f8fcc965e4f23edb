"""`make bench`: the flow at tenant scale against the fakes with latency and service protection on.

Seeds N prospects over several legal entities, runs the sync, applies sellers' decisions in bulk
through the fakes' admin surface, runs the reconciliation; each DAG run is one `airflow dags test`
process, measured from the kernel (wall, CPU seconds, peak RSS), its requests and 429s counted by the
fakes. In the same run, beside it:
- `--before REV`: the same flow with the product as it was at git revision REV (its `src/` and `dags/`
  from `git archive`, first on the path), so that CPU and requests per prospect compare side by side;
- `--executor`: the same flow on a real executor (api-server, scheduler and dag-processor,
  LocalExecutor with parallelism 2), each task's own CPU seconds and peak RSS reported by the task
  process (a listener, `task_usage.py`), and the wall of each DAG run from trigger to end;
- `--naive-n`: the whole flow at a small N in the product's bulk mode and in its naive mode (one
  request per record, no change tracking: the connections' `bulk`/`change_tracking` switches);
- `--profile` (`make profile`): every `dags test` sampled by py-spy, its top functions printed.
Then each DAG file's parse time, the targets, and everything in `.bench/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from b2b_drivers import profile
from b2b_drivers.airflow_processes import AirflowProcesses, admin_password, environment, free_port
from b2b_drivers.task_usage import USAGE_FILE
from b2b_onboarding.airflow.pools import POOLS_FILE
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import Cast, airflow_connections, prospects

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / ".bench"
DAGS = ("b2b_prospect_sync", "b2b_outcome_reconciliation")
SEED_BATCH = 10_000
RUN_TIMEOUT_S = 3600
# Targets (issue 17), judged on this run's figures.
WALL_TARGET_S = 150.0
CPU_RATIO_TARGET = 5.0
TASK_RSS_TARGET_MB = 500.0
NAIVE_WALL_RATIO_TARGET = 10.0
# On the real executor: runs start only when the bench triggers them (a schedule that fires once a year
# makes one run when the DAG is unpaused, on an empty world, which the bench lets end first).
QUIET_SCHEDULES = {
    "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING": "time",
    "AIRFLOW__D365_B2B_ONBOARDING__SYNC_SCHEDULE": "0 0 1 1 *",
    "AIRFLOW__D365_B2B_ONBOARDING__RECONCILIATION_SCHEDULE": "0 0 1 1 *",
}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b2b_drivers.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="prospects at scale (default 100000)")
    parser.add_argument("--naive-n", type=int, default=500,
                        help="prospects of the bulk-vs-naive run (default 500; 0: none)")  # fmt: skip
    parser.add_argument("--before", default="", metavar="REV",
                        help="also run the product of this git revision at N, for CPU per prospect side by side")  # fmt: skip
    parser.add_argument("--executor", action=argparse.BooleanOptionalAction, default=True,
                        help="also run at N on LocalExecutor with the scheduler, figures per task (default on)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="sample every `dags test` with py-spy and print its top functions (its CPU figures "
                             "are then the seconds sampled)")  # fmt: skip
    parser.add_argument("--legal-entities", default="usrt,usmf,frrt,dert", help="comma-separated")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request (default 20)")
    parser.add_argument("--dataverse-requests", type=int, default=600, help="per window (default 600)")
    parser.add_argument("--dataverse-window-s", type=float, default=30.0, help="(default 30)")
    return parser.parse_args(argv)


class Airflow:
    """`airflow` commands in the bench's own AIRFLOW_HOME; each DAG run is one `dags test` process,
    whose CPU time and peak RSS are read from the kernel when it ends. `source`: a checkout whose
    `src/` and `dags/` replace the product's (the `--before` revision)."""

    def __init__(self, home: Path, source: Path | None = None, profile_dir: Path | None = None) -> None:
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str((source or ROOT) / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        if source is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source / "src"), os.environ.get("PYTHONPATH")]))
            found = subprocess.run([sys.executable, "-c", "import b2b_onboarding; print(b2b_onboarding.__file__)"],
                                   env=self.env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
            if not found.startswith(str(source)):
                raise SystemExit(f"the product as of the --before revision is not the one imported: {found}")
        self.profile_dir = profile_dir
        self.logs = OUT / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, log_name: str, *args: str) -> dict:
        log = self.logs / f"{log_name}.log"
        command = [sys.executable, "-m", "airflow", *args]
        sampled = self.profile_dir is not None and args[0] == "dags"
        if sampled:
            command = profile.sampled(command, self.profile_dir / f"{log_name}.txt")
        started = time.monotonic()
        with open(log, "w") as output:
            process = subprocess.Popen(command, env=self.env, stdout=output, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        failed = process.returncode != 0 or (args[0] == "dags" and "state=success" not in log.read_text())
        if failed:
            print(log.read_text()[-4000:])
            raise SystemExit(f"airflow {' '.join(args)} failed; see {log}")
        cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        if sampled:  # the kernel's figures would be py-spy's: the CPU is what it sampled, the RSS unknown
            samples = profile.read_samples(self.profile_dir / f"{log_name}.txt")
            cpu, rss = sum(s.count for s in samples if s.process == profile.STARTED) / profile.RATE_HZ, float("nan")
        return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss, 1),
                "throttle_failures": _throttle_failures(log.read_text())}  # fmt: skip


def _throttle_failures(log: str) -> int:
    """Failures the product raised because a service kept throttling it beyond its retry budget
    (its errors read "... failed with HTTP 429 ...")."""
    return log.count("failed with HTTP 429")


def _snapshot(admin: FakeAdmin) -> dict:
    counts, limits = admin.counts(), admin.limits()
    return {
        system: {"requests": counts[system]["requests"],
                 "throttled": sum(limits.get(system, {}).get("throttled", {}).values())}
        for system in ("commerce", "dataverse")
    }  # fmt: skip


def _delta(before: dict, after: dict) -> dict:
    return {system: {name: after[system][name] - before[system][name] for name in after[system]} for system in after}


def _seed(admin: FakeAdmin, count: int, legal_entities: list[str]) -> list[dict]:
    """A clean world with `count` Pending prospects; the sellers' decisions to apply after the sync."""
    rows, plan = prospects(count, tuple(legal_entities))
    admin.reset()
    admin.reset_limits()
    for start in range(0, len(rows), SEED_BATCH):
        admin.seed_prospects(rows[start : start + SEED_BATCH])
    return [
        {"msdyn_prospectid": f"{row['dataAreaId']}:{row['ProspectId']}", "outcome": outcome}
        for row in rows if (outcome := plan[row["PrimaryEmailAddress"]]) in ("won", "lost", "disqualified", "qualified")
    ]  # fmt: skip


def _decide(admin: FakeAdmin, decisions: list[dict]) -> None:
    applied = admin.decide(decisions)
    if applied["errors"]:
        raise SystemExit(f"sellers' decisions failed: {applied['errors'][:5]}")


def _row(mode: str, count: int, dag_id: str, measured: dict, sent: dict) -> dict:
    return {
        "mode": mode, "n": count, "dag": dag_id, **measured,
        "commerce_requests": sent["commerce"]["requests"], "dataverse_requests": sent["dataverse"]["requests"],
        "requests_per_prospect": round((sent["commerce"]["requests"] + sent["dataverse"]["requests"]) / count, 4),
        "throttled_429": sent["commerce"]["throttled"] + sent["dataverse"]["throttled"],
    }  # fmt: skip


def run_flow(label: str, mode: str, endpoints: Endpoints, cast: Cast, count: int, legal_entities: list[str],
             naive: bool = False, source: Path | None = None, profile_dir: Path | None = None) -> list[dict]:  # fmt: skip
    """Seeds `count` prospects, then sync → sellers decide (bulk, admin) → reconcile, each DAG one
    `airflow dags test`; one row per DAG."""
    home = OUT / label
    shutil.rmtree(home, ignore_errors=True)
    airflow = Airflow(home / "airflow", source, profile_dir)
    airflow.run(f"{label}-db-migrate", "db", "migrate")
    airflow.run(f"{label}-pools", "pools", "import", str(POOLS_FILE))
    airflow.env.update(airflow_connections(endpoints, cast, legal_entities, home / "state.db", naive=naive))
    results = []
    with FakeAdmin(endpoints) as admin:
        decisions = _seed(admin, count, legal_entities)
        for dag_id in DAGS:
            if dag_id == "b2b_outcome_reconciliation":
                _decide(admin, decisions)
            before = _snapshot(admin)
            measured = airflow.run(f"{label}-{dag_id}", "dags", "test", dag_id)
            results.append(_row(mode, count, dag_id, measured, _delta(before, _snapshot(admin))))
            print(f"  {label:>8} {dag_id:<28} {measured['wall_s']:7.1f} s wall {measured['cpu_s']:7.1f} s CPU")
    return results


def run_on_executor(endpoints: Endpoints, cast: Cast, count: int,
                    legal_entities: list[str]) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The flow at `count` on a real executor: api-server, scheduler (LocalExecutor, parallelism 2) and
    dag-processor; each DAG run triggered through the REST API, its wall from trigger to end. Returns a
    row per DAG run and a row per task (as its own process reported it)."""
    home = OUT / "executor"
    shutil.rmtree(home, ignore_errors=True)
    (home / "airflow").mkdir(parents=True)
    plugins = home / "plugins"
    plugins.mkdir()
    (plugins / "bench_task_usage.py").write_text("from b2b_drivers.task_usage import TaskUsagePlugin  # noqa: F401\n")
    usage_file = home / "task_usage.jsonl"
    port = free_port()
    connections = airflow_connections(endpoints, cast, legal_entities, home / "state.db")
    env = environment(home / "airflow", port, connections) | QUIET_SCHEDULES | {
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        USAGE_FILE: str(usage_file),
    }  # fmt: skip
    airflow = AirflowProcesses(home / "airflow", env, f"http://127.0.0.1:{port}", admin_password(home / "airflow"))
    runs, tasks = [], []
    try:
        airflow.set_up_database({})
        for name in ("api-server", "scheduler", "dag-processor"):
            airflow.start_process(name)
        airflow.wait_until_ready()
        with FakeAdmin(endpoints) as admin:
            admin.reset()  # the runs made at unpausing find an empty world, not the last phase's
            for dag_id in DAGS:
                airflow.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
            _wait_idle(airflow)
            decisions = _seed(admin, count, legal_entities)
            for dag_id in DAGS:
                if dag_id == "b2b_outcome_reconciliation":
                    _decide(admin, decisions)
                before = _snapshot(admin)
                run_id, wall = _run_dag(airflow, dag_id)
                ran = [row for row in _read_usage(usage_file) if row["run_id"] == run_id]
                tasks += ran
                log = "".join(path.read_text(errors="replace") for path in (home / "airflow" / "logs").rglob("*.log")
                              if f"run_id={run_id}" in str(path))  # fmt: skip
                measured = {"wall_s": round(wall, 1), "cpu_s": round(sum(row["cpu_s"] for row in ran), 1),
                            "peak_rss_mb": max((row["peak_rss_mb"] for row in ran), default=0.0),
                            "throttle_failures": _throttle_failures(log)}  # fmt: skip
                runs.append(_row("executor", count, dag_id, measured, _delta(before, _snapshot(admin))))
                print(f"  {'executor':>8} {dag_id:<28} {wall:7.1f} s wall {measured['cpu_s']:7.1f} s CPU "
                      f"(summed over {len(ran)} task processes)")  # fmt: skip
    finally:
        airflow.stop_all()
    return runs, tasks


def _wait_idle(airflow: AirflowProcesses) -> None:
    """Until each of the bench's DAGs has had the run made at unpausing and none is queued or running."""
    deadline = time.monotonic() + RUN_TIMEOUT_S

    def runs(dag_id: str, **filters: str) -> int:
        return airflow.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 1, **filters})["total_entries"]

    while not all(runs(dag_id) for dag_id in DAGS) or any(
        runs(dag_id, state=state) for dag_id in DAGS for state in ("queued", "running")
    ):
        if time.monotonic() > deadline:
            raise SystemExit(f"runs made at unpausing did not end within {RUN_TIMEOUT_S} s")
        airflow.check_alive()
        time.sleep(1)


def _run_dag(airflow: AirflowProcesses, dag_id: str) -> tuple[str, float]:
    """Triggers `dag_id` and waits for its end; (run_id, seconds from trigger to end). A failed run stops
    the bench with its failed tasks."""
    started = time.monotonic()
    run_id = airflow.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})["dag_run_id"]
    while (state := airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
        if time.monotonic() - started > RUN_TIMEOUT_S:
            raise SystemExit(f"{dag_id} run {run_id} not done after {RUN_TIMEOUT_S} s")
        airflow.check_alive()
        time.sleep(0.5)
    wall = time.monotonic() - started
    if state == "failed":
        instances = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 200})
        failed = [f"{ti['task_id']}[{ti['map_index']}]: {ti['state']}" for ti in instances["task_instances"]
                  if ti["state"] not in ("success", "skipped")]  # fmt: skip
        raise SystemExit(f"{dag_id} run {run_id} failed: {failed}; logs in {airflow.home / 'logs'}")
    return run_id, wall


def _read_usage(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _task_table(tasks: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(tasks)
    frame["task"] = frame["task_id"] + frame["map_index"].map(lambda index: f"[{index}]" if index >= 0 else "")
    return frame[["dag_id", "task", "state", "wall_s", "cpu_s", "peak_rss_mb"]].rename(columns={"dag_id": "dag"})


def _before_source(revision: str) -> Path:
    """The product's `src/` and `dags/` at `revision`, extracted under .bench/."""
    target = OUT / "before-src"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src", "dags"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--before {revision}: git archive failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def parse_times() -> dict[str, float]:
    """Seconds to parse each DAG file in a process that has Airflow's Task SDK loaded (as the DAG
    processor has), best of five."""
    probe = (
        "import runpy, sys, time; import airflow.sdk; best = min("
        "(lambda t: (runpy.run_path(sys.argv[1]), time.perf_counter() - t)[1])(time.perf_counter()) "
        "for _ in range(5)); print(best)"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(OUT / "parse-airflow")}
    return {
        path.name: round(float(subprocess.run([sys.executable, "-c", probe, str(path)], env=env, check=True,
                                              capture_output=True, text=True).stdout.split()[-1]), 4)
        for path in sorted((ROOT / "dags").glob("*.py"))
    }  # fmt: skip


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def targets(scale: list[dict], before: list[dict], executor: list[dict], tasks: list[dict], small: list[dict],
            n: int, naive_n: int) -> tuple[list[str], dict]:  # fmt: skip
    """The issue's targets as lines and as figures, from what ran (a target whose run was left out is not judged)."""
    lines, figures = [], {}
    wall = sum(row["wall_s"] for row in scale)
    cpu = sum(row["cpu_s"] for row in scale)
    requests = sum(row["commerce_requests"] + row["dataverse_requests"] for row in scale)
    failures = sum(row["throttle_failures"] for row in scale + executor)
    figures |= {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_ms_per_prospect": round(1000 * cpu / n, 3),
                "requests_per_prospect": round(requests / n, 4), "throttle_failures": failures}  # fmt: skip
    lines.append(f"{_verdict(wall <= WALL_TARGET_S)}  {n} prospects end to end (dags test): {wall:.1f} s "
                 f"(target <= {WALL_TARGET_S:g} s)")  # fmt: skip
    if executor:
        executor_wall = sum(row["wall_s"] for row in executor)
        figures["executor_wall_s"] = round(executor_wall, 1)
        lines.append(f"{_verdict(executor_wall <= WALL_TARGET_S)}  {n} prospects end to end (LocalExecutor, "
                     f"parallelism 2): {executor_wall:.1f} s (target <= {WALL_TARGET_S:g} s)")  # fmt: skip
    lines.append(f"{_verdict(failures == 0)}  throttling failures: {failures} "
                 f"(429s received and waited out: {sum(row['throttled_429'] for row in scale + executor)})")  # fmt: skip
    if before:
        before_cpu = sum(row["cpu_s"] for row in before)
        before_requests = sum(row["commerce_requests"] + row["dataverse_requests"] for row in before)
        ratio = before_cpu / cpu if cpu else float("inf")
        figures |= {"before_cpu_s": round(before_cpu, 1), "before_cpu_ms_per_prospect": round(1000 * before_cpu / n, 3),
                    "before_requests_per_prospect": round(before_requests / n, 4), "cpu_ratio": round(ratio, 1),
                    "before_wall_s": round(sum(row["wall_s"] for row in before), 1)}  # fmt: skip
        lines.append(f"{_verdict(ratio >= CPU_RATIO_TARGET)}  CPU per prospect: {1000 * before_cpu / n:.2f} ms before, "
                     f"{1000 * cpu / n:.2f} ms now: {ratio:.1f}x lower (target >= {CPU_RATIO_TARGET:g}x)")  # fmt: skip
        lines.append(f"{_verdict(requests <= before_requests)}  requests per prospect: {before_requests / n:.4f} before, "
                     f"{requests / n:.4f} now ({before_requests} and {requests})")  # fmt: skip
    if tasks:
        largest = max(tasks, key=lambda row: row["peak_rss_mb"])
        name = f"{largest['dag_id']}.{largest['task_id']}" + (f"[{largest['map_index']}]" if largest["map_index"] >= 0 else "")
        figures |= {"largest_task_rss_mb": largest["peak_rss_mb"], "largest_task": name}
        lines.append(f"{_verdict(largest['peak_rss_mb'] <= TASK_RSS_TARGET_MB)}  largest task's peak RSS: "
                     f"{largest['peak_rss_mb']:.0f} MB, {name} (target <= {TASK_RSS_TARGET_MB:g} MB)")  # fmt: skip
    if small:
        by_mode = pd.DataFrame(small).groupby("mode")["wall_s"].sum()
        ratio = by_mode["naive"] / by_mode["bulk"]
        figures |= {"naive_n": naive_n, "naive_wall_ratio": round(float(ratio), 1)}
        lines.append(f"{_verdict(ratio >= NAIVE_WALL_RATIO_TARGET)}  at N = {naive_n}, naive / bulk wall: "
                     f"{by_mode['naive']:.1f} s / {by_mode['bulk']:.1f} s = {ratio:.1f}x "
                     f"(target >= {NAIVE_WALL_RATIO_TARGET:g}x)")  # fmt: skip
    return lines, figures


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    legal_entities = [part.strip() for part in args.legal_entities.split(",") if part.strip()]
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    profile_dir = OUT / "profiles" if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir()
    source = _before_source(args.before) if args.before else None
    cast = Cast.new()
    limits = {"latency_ms": args.latency_ms, "dataverse_requests": args.dataverse_requests,
              "dataverse_window_s": args.dataverse_window_s}  # fmt: skip
    print(f"Fakes with {args.latency_ms:g} ms latency per request; Dataverse limit {args.dataverse_requests} "
          f"requests / {args.dataverse_window_s:g} s")  # fmt: skip
    before, executor, tasks, small = [], [], [], []
    with running_fakes(OUT / "fakes", cast.clients, **limits) as endpoints:
        print(f"At scale: {args.n} prospects over {', '.join(legal_entities)}, `airflow dags test`")
        scale = run_flow("scale", "bulk", endpoints, cast, args.n, legal_entities, profile_dir=profile_dir)
        if source is not None:
            print(f"The same with the product as of {args.before}")
            before = run_flow("before", f"before {args.before}", endpoints, cast, args.n, legal_entities,
                              source=source, profile_dir=profile_dir)  # fmt: skip
        if args.executor:
            print("The same on LocalExecutor with the scheduler (parallelism 2)")
            executor, tasks = run_on_executor(endpoints, cast, args.n, legal_entities)
        if args.naive_n:
            print(f"Side by side: {args.naive_n} prospects, bulk then naive")
            small = run_flow("bulk", "bulk", endpoints, cast, args.naive_n, legal_entities)
            small += run_flow("naive", "naive", endpoints, cast, args.naive_n, legal_entities, naive=True)
    parse = parse_times()

    print("\nPer DAG run (executor: CPU summed over its task processes, RSS of the largest)\n"
          + pd.DataFrame(scale + before + executor + small).set_index(["mode", "n", "dag"]).to_string())
    if tasks:
        print(f"\nPer task on LocalExecutor, {args.n} prospects (each task's own process)\n"
              + _task_table(tasks).to_string(index=False))
    print("\nDAG file parse time (s): " + ", ".join(f"{name} {seconds}" for name, seconds in parse.items()))
    if profile_dir is not None:
        for path in sorted(profile_dir.glob("*.txt")):
            # The tasks run in the `dags test` process itself, the one py-spy started.
            samples = [sample for sample in profile.read_samples(path) if sample.process == profile.STARTED]
            print("\n" + profile.table(samples, path.stem))
    lines, figures = targets(scale, before, executor, tasks, small, args.n, args.naive_n)
    print("\nTargets\n" + "\n".join(lines))

    results = {
        "n": args.n,
        "legal_entities": legal_entities,
        "latency_ms": args.latency_ms,
        "dataverse_limit": {"requests": args.dataverse_requests, "window_s": args.dataverse_window_s},
        "before": args.before or None,
        **figures,
        "dag_parse_s": parse,
        "runs": scale + before + executor + small,
        "tasks": tasks,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + json.dumps({key: value for key, value in results.items() if key not in ("runs", "tasks")}))
    print("(written to .bench/results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
