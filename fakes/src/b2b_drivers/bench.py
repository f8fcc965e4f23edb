"""`make bench`: the flow at tenant scale against the fakes with latency and service protection on.

Seeds N prospects over several legal entities, runs the sync, applies sellers' decisions in bulk
through the fakes' admin surface, runs the reconciliation, and prints per DAG: wall time, requests
per system, requests per prospect, 429s, CPU seconds and peak RSS of the process that ran the tasks.
Then the same flow at a small N in the product's bulk mode and in its naive mode (one request per
record, no change tracking: the connections' `bulk`/`change_tracking` switches), side by side, and
each DAG file's parse time. Figures also go to `.bench/results.json`.
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

from b2b_onboarding.airflow.pools import POOLS_FILE
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import Cast, airflow_connections, prospects

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / ".bench"
DAGS = ("b2b_prospect_sync", "b2b_outcome_reconciliation")
SEED_BATCH = 10_000


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b2b_drivers.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="prospects at scale (default 100000)")
    parser.add_argument("--naive-n", type=int, default=500, help="prospects of the side-by-side run (default 500)")
    parser.add_argument("--legal-entities", default="usrt,usmf,frrt,dert", help="comma-separated")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request (default 20)")
    parser.add_argument("--dataverse-requests", type=int, default=600, help="per window (default 600)")
    parser.add_argument("--dataverse-window-s", type=float, default=30.0, help="(default 30)")
    return parser.parse_args(argv)


class Airflow:
    """`airflow` commands in the bench's own AIRFLOW_HOME; each DAG run is one `dags test` process,
    whose CPU time and peak RSS are read from the kernel when it ends."""

    def __init__(self, home: Path) -> None:
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        self.logs = OUT / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, log_name: str, *args: str) -> dict:
        log = self.logs / f"{log_name}.log"
        started = time.monotonic()
        with open(log, "w") as output:
            process = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=output,
                                       stderr=subprocess.STDOUT)  # fmt: skip
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        failed = process.returncode != 0 or (args[0] == "dags" and "state=success" not in log.read_text())
        if failed:
            print(log.read_text()[-4000:])
            raise SystemExit(f"airflow {' '.join(args)} failed; see {log}")
        return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "throttle_failures": _throttle_failures(log)}  # fmt: skip


def _throttle_failures(log: Path) -> int:
    """Failures the product raised because a service kept throttling it beyond its retry budget
    (its errors read "... failed with HTTP 429 ...")."""
    return log.read_text().count("failed with HTTP 429")


def _snapshot(admin: FakeAdmin) -> dict:
    counts, limits = admin.counts(), admin.limits()
    return {
        system: {"requests": counts[system]["requests"],
                 "throttled": sum(limits.get(system, {}).get("throttled", {}).values())}
        for system in ("commerce", "dataverse")
    }  # fmt: skip


def _delta(before: dict, after: dict) -> dict:
    return {system: {name: after[system][name] - before[system][name] for name in after[system]} for system in after}


def run_flow(
    label: str, endpoints: Endpoints, cast: Cast, count: int, legal_entities: list[str], naive: bool
) -> list[dict]:
    """Seeds `count` prospects, then sync → sellers decide (bulk, admin) → reconcile; one row per DAG."""
    home = OUT / label
    shutil.rmtree(home, ignore_errors=True)
    airflow = Airflow(home / "airflow")
    airflow.run(f"{label}-db-migrate", "db", "migrate")
    airflow.run(f"{label}-pools", "pools", "import", str(POOLS_FILE))
    airflow.env.update(airflow_connections(endpoints, cast, legal_entities, home / "state.db", naive=naive))
    rows, plan = prospects(count, tuple(legal_entities))
    with FakeAdmin(endpoints) as admin:
        admin.reset()
        admin.reset_limits()
        for start in range(0, len(rows), SEED_BATCH):
            admin.seed_prospects(rows[start : start + SEED_BATCH])
        results = []
        for dag_id in DAGS:
            if dag_id == "b2b_outcome_reconciliation":
                decisions = [
                    {"msdyn_prospectid": f"{row['dataAreaId']}:{row['ProspectId']}", "outcome": outcome}
                    for row in rows if (outcome := plan[row["PrimaryEmailAddress"]]) in
                    ("won", "lost", "disqualified", "qualified")
                ]  # fmt: skip
                applied = admin.decide(decisions)
                if applied["errors"]:
                    raise SystemExit(f"sellers' decisions failed: {applied['errors'][:5]}")
            before = _snapshot(admin)
            measured = airflow.run(f"{label}-{dag_id}", "dags", "test", dag_id)
            sent = _delta(before, _snapshot(admin))
            results.append({
                "mode": "naive" if naive else "bulk", "n": count, "dag": dag_id, **measured,
                "commerce_requests": sent["commerce"]["requests"], "dataverse_requests": sent["dataverse"]["requests"],
                "dataverse_requests_per_prospect": round(sent["dataverse"]["requests"] / count, 4),
                "commerce_requests_per_prospect": round(sent["commerce"]["requests"] / count, 4),
                "throttled_429": sent["commerce"]["throttled"] + sent["dataverse"]["throttled"],
            })  # fmt: skip
            print(f"  {label:>6} {dag_id:<28} {measured['wall_s']:7.1f} s wall")
    return results


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


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    legal_entities = [part.strip() for part in args.legal_entities.split(",") if part.strip()]
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    cast = Cast.new()
    limits = {"latency_ms": args.latency_ms, "dataverse_requests": args.dataverse_requests,
              "dataverse_window_s": args.dataverse_window_s}  # fmt: skip
    print(f"Fakes with {args.latency_ms:g} ms latency per request; Dataverse limit {args.dataverse_requests} "
          f"requests / {args.dataverse_window_s:g} s")  # fmt: skip
    with running_fakes(OUT / "fakes", cast.clients, **limits) as endpoints:
        print(f"At scale: {args.n} prospects over {', '.join(legal_entities)}")
        scale = run_flow("scale", endpoints, cast, args.n, legal_entities, naive=False)
        print(f"Side by side: {args.naive_n} prospects, bulk then naive")
        small = run_flow("bulk", endpoints, cast, args.naive_n, legal_entities, naive=False)
        small += run_flow("naive", endpoints, cast, args.naive_n, legal_entities, naive=True)
    parse = parse_times()

    table = pd.DataFrame(scale + small).set_index(["mode", "n", "dag"])
    print("\nPer DAG run\n" + table.to_string())
    by_mode = pd.DataFrame(small).groupby("mode")[["wall_s", "commerce_requests", "dataverse_requests"]].sum()
    by_mode["requests"] = by_mode["commerce_requests"] + by_mode["dataverse_requests"]
    requests_ratio = by_mode.loc["naive", "requests"] / by_mode.loc["bulk", "requests"]
    wall_ratio = by_mode.loc["naive", "wall_s"] / by_mode.loc["bulk", "wall_s"]
    print(f"\nAt N = {args.naive_n}, whole flow (sync + reconciliation)\n{by_mode.to_string()}")
    print(f"naive / bulk: {requests_ratio:.1f}x the requests, {wall_ratio:.1f}x the wall time")
    print("\nDAG file parse time (s): " + ", ".join(f"{name} {seconds}" for name, seconds in parse.items()))

    sync = next(row for row in scale if row["dag"] == "b2b_prospect_sync")
    results = {
        "n": args.n,
        "legal_entities": legal_entities,
        "latency_ms": args.latency_ms,
        "dataverse_limit": {"requests": args.dataverse_requests, "window_s": args.dataverse_window_s},
        "wall_s": round(sum(row["wall_s"] for row in scale), 1),
        "wall_s_per_dag": {row["dag"]: row["wall_s"] for row in scale},
        "sync_dataverse_requests_per_prospect": sync["dataverse_requests_per_prospect"],
        "throttled_429": sum(row["throttled_429"] for row in scale),
        "throttle_failures": sum(row["throttle_failures"] for row in scale),
        "peak_rss_mb": max(row["peak_rss_mb"] for row in scale),
        "cpu_s": round(sum(row["cpu_s"] for row in scale), 1),
        "naive_n": args.naive_n,
        "naive_requests_ratio": round(float(requests_ratio), 1),
        "naive_wall_ratio": round(float(wall_ratio), 1),
        "dag_parse_s": parse,
        "runs": scale + small,
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + json.dumps({key: value for key, value in results.items() if key != "runs"}))
    print("(written to .bench/results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
