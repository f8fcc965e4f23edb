"""`make demo`: the whole onboarding flow, run by Airflow (`airflow dags test`, SQLite), against the
fakes: check the tenant (the read-only preflight, the demo stops if it fails), seed prospects (and
the cases real tenants bring: `stories`), sync, sellers decide, reconcile, sellers and clerks work
on, run both DAGs again, judge the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from b2b_onboarding.airflow.pools import POOLS_FILE
from d365_fakes import stories
from d365_fakes.actors import Clerk, Seller
from d365_fakes.running import FakeAdmin, running_fakes
from d365_fakes.scenario import Cast, airflow_connections, observe, play_sellers, prospects, total_writes

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / ".demo"
LEGAL_ENTITIES = ["usrt", "usmf"]


def airflow(env: dict, log_name: str, *args: str) -> None:
    """Runs an Airflow command; its (long) output goes to a log file, its duration to the screen."""
    log = OUT / "logs" / f"{log_name}.log"
    started = time.monotonic()
    with open(log, "w") as output:
        code = subprocess.call([sys.executable, "-m", "airflow", *args], env=env, stdout=output,
                               stderr=subprocess.STDOUT)  # fmt: skip
    print(f"  {' '.join(args):<42} {time.monotonic() - started:6.1f} s  (log: {log.relative_to(ROOT)})")
    run_failed = args[0] == "dags" and "state=success" not in log.read_text()
    if code != 0 or run_failed:
        print(log.read_text()[-4000:])
        raise SystemExit(f"airflow {' '.join(args)} failed; see {log}")


def preflight(env: dict) -> None:
    """The product's read-only preflight of its connections, its table printed; the demo stops
    when a check fails."""
    result = subprocess.run([sys.executable, "-m", "b2b_onboarding.airflow.preflight"], env=env, capture_output=True, text=True)
    print("\n".join(f"  {line}" for line in result.stdout.splitlines()))
    if result.returncode != 0:
        print(result.stderr[-4000:])
        raise SystemExit("the preflight failed: fix what its table names, then run the demo again")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "logs").mkdir(parents=True)
    cast = Cast.new()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(OUT / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    print("Airflow metadata database (SQLite)")
    airflow(env, "db-migrate", "db", "migrate")
    airflow(env, "pools", "pools", "import", str(POOLS_FILE))
    with running_fakes(OUT / "fakes", cast.clients) as endpoints, FakeAdmin(endpoints) as admin:
        print(f"Fakes: Entra ID {endpoints.entra}, Commerce {endpoints.commerce}, Dataverse {endpoints.dataverse}")
        env.update(airflow_connections(endpoints, cast, LEGAL_ENTITIES, OUT / "state.db"))
        admin.seed_companies(LEGAL_ENTITIES)  # dual-write's legal entities, set up before the integration
        print("Preflight (python -m b2b_onboarding.airflow.preflight: reads only)")
        preflight(env)
        seeded, plan = prospects(50, tuple(LEGAL_ENTITIES))
        admin.seed_prospects(seeded)
        print(f"Seeded {len(seeded)} B2B prospects (Pending) in {', '.join(LEGAL_ENTITIES)}")
        seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
        clerk = Clerk(endpoints, cast.clerk["client_id"], cast.clerk["client_secret"])
        told = stories.seed(admin, seller, clerk)
        plan.update(told.plan)
        print(f"Seeded {len(told.prospects)} more as real tenants have them: a second requester of {stories.ONBOARDED} "
              "(already a B2B customer), a late opportunity, a correction in HQ, a lead dual-write wrote")  # fmt: skip

        print("First run")
        airflow(env, "1-sync", "dags", "test", "b2b_prospect_sync")
        decided = play_sellers(seller, plan, leave=frozenset(row["PrimaryEmailAddress"] for row in told.prospects))
        stories.after_first_sync(seller, clerk, told)
        print("  sellers decided: " + ", ".join(f"{n} {decision}" for decision, n in sorted(decided.items())))
        print("  the second requester's lead qualified against the existing account and won; one lead qualified "
              "without an opportunity; a clerk corrected a prospect in HQ")  # fmt: skip
        airflow(env, "1-reconcile", "dags", "test", "b2b_outcome_reconciliation")

        print("Sellers and clerks at work")
        airflow(env, "2-sync", "dags", "test", "b2b_prospect_sync")
        stories.after_corrections_synced(seller, told)
        print("  the late opportunity made and won; the corrected lead and the dual-write lead won")
        airflow(env, "2-reconcile", "dags", "test", "b2b_outcome_reconciliation")

        print("Last run (must write nothing)")
        writes_before = total_writes(admin.counts())
        airflow(env, "3-sync", "dags", "test", "b2b_prospect_sync")
        airflow(env, "3-reconcile", "dags", "test", "b2b_outcome_reconciliation")
        writes_in_second_run = total_writes(admin.counts()) - writes_before
        outcome = observe(endpoints, cast, plan)
        story_counts, story_violations = stories.judge(seller, clerk, admin.outbox(), told)
        seller.close()
        clerk.close()

    frame = pd.DataFrame(outcome.rows)
    print("\nProspects by seller's decision and final status in Commerce")
    print(pd.crosstab(frame["plan"], frame["status"], margins=True, margins_name="total").to_string())
    summary = {
        "prospects": len(frame),
        "leads": outcome.leads,
        "approved": int((frame["status"] == "Approved").sum()),
        "rejected": int((frame["status"] == "Rejected").sum()),
        "pending": int((frame["status"] == "Pending").sum()),
        "hierarchies": outcome.hierarchies,
        "emails_sent": outcome.emails,
        "writes_in_second_run": writes_in_second_run,
        **story_counts,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{json.dumps(summary)}\n(written to .demo/summary.json)")
    wrong = frame[~frame["ok"]]
    if not wrong.empty:
        print(f"\nFAILED: {len(wrong)} prospects do not match their seller's decision:\n{wrong.to_string()}")
    if writes_in_second_run:
        print(f"\nFAILED: the last run wrote {writes_in_second_run} times")
    for violation in story_violations:
        print(f"\nFAILED: {violation}")
    ok = outcome.ok and wrong.empty and writes_in_second_run == 0 and not story_violations
    print("\nDemo passed." if ok else "\nDemo FAILED.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
