"""`make chaos`: the onboarding flow under faults, kills, overlapping runs and a backfill; its invariants.

What it does (every random choice is drawn from `--seed`, so a run can be repeated):

1. Starts the fakes and three Airflow homes, "main", "overlap" and "backfill": each its own
   AIRFLOW_HOME with its own SQLite metadata database (`airflow db migrate`, the product's pools
   imported). All three share the fakes and one product state store (the `d365_state` connection
   names one SQLite file). The connections' `timeout_s` is short (2 s), so slow answers time out.
2. Seeds `--n` prospects (default 600) over three legal entities, plus prospects with hostile but
   valid ids and names (`P'1`, `P/2`, `P#3?`, `P%274`, quotes, emoji, right-to-left marks) and a
   handful of bad records (invalid email, empty company, over-long name, a field too long for its
   column, a control character, an over-long id, a second prospect with the same email in one legal
   entity), each recorded with why it is bad: they must be kept with an error and never get a lead.
3. Turns faults on (`FakeAdmin.add_fault`): 429 with Retry-After 1, 500/502/503/504, answers slower
   than the client's timeout (served in full: the writes land), connection resets before and after
   the request is served, on reads and writes of Commerce and Dataverse, a few Entra token 503s, and
   one revocation of every token issued so far, in the middle of the reconciliation.
4. Sync under chaos. Each DAG run is `python -m airflow dags test <dag> [<logical date>]`, one
   process; some are SIGKILLed at random moments (once the fakes' write counts have grown since the
   run began, or after a random 2-15 s) and run again until a run succeeds.
   - Overlap: two runs of the same DAG started at the same moment, each in its own AIRFLOW_HOME.
     That is harsher than two runs under one scheduler: nothing in Airflow coordinates them (no
     shared metadata database, `max_active_runs` or pool); only the product's conditional writes
     and its state-store lock keep them apart.
   - Backfill: sync runs for three past logical dates a day apart, in the third home, started while
     the scheduled-style run is going.
5. Sellers decide in bulk through the fakes' admin surface (never faulted): won, lost,
   disqualified, qualified only, or untouched, as planned per prospect.
6. Reconciliation under chaos: an overlapping pair of runs, with kills, the token revocation.
7. Faults off: one clean sync (a record refused during the chaos gets its retry), the decisions
   that could not be applied yet (their lead did not exist), one clean reconciliation.
8. Reads the end state (Commerce and Sales through their APIs as a clerk and a seller, the outbox,
   the state store) and checks the invariants: exactly one lead per prospect; exactly one email per
   decided prospect; every decision equals the seller's outcome; every bad record kept with its
   error; no prospect lost. Prints the figures (requests, faults by kind and the faulted share,
   retries, kills, runs) and each invariant's result; writes them to `.chaos/results.json`.

A task that fails makes `dags test` sleep out the DAG's retry_delay (1 or 5 minutes); the harness,
in the scheduler's place, ends such a run at once and starts another. That run counts as failed,
its error and log are shown, and a DAG run that fails `--max-failures` times (default 6) is given up.

Exit status: 0 when every invariant holds and the chaos happened as planned (at least 500
prospects, at least 10 % of Commerce and Dataverse requests faulted, at least one kill, no DAG run
given up); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from b2b_onboarding.airflow.pools import POOLS_FILE
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import OUTCOMES, Cast, airflow_connections, prospects, total_writes

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / ".chaos"
SYNC, RECONCILE = "b2b_prospect_sync", "b2b_outcome_reconciliation"
HOMES = ("main", "overlap", "backfill")
DECIDED = ("won", "lost", "disqualified", "qualified")  # what sellers do; "untouched" and "invalid" are not decisions
# Where each plan leaves a prospect in the product's state store (its `stage`).
EXPECTED_STAGE = {"won": "approved", "lost": "rejected", "disqualified": "rejected", "qualified": "customers_created",
                  "untouched": "lead_open"}  # fmt: skip
MIN_PROSPECTS = 500
MIN_FAULTED_SHARE = 0.10
POLL_S = 0.5
SEED_BATCH = 5000
# Marks in a `dags test` log.
TASK_FAILED = re.compile(r"new_state=(up_for_retry|failed)\b")
TASK_STARTED = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d")

Key = tuple[str, str]  # (legal entity, prospect id)


# ---------------------------------------------------------------------------------------------
# Invariants: pure functions over what was seeded and what the systems hold at the end.
# ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    checked: int  # prospects (or records) looked at
    violations: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "PASS" if self.ok else "FAIL"


def key_of(legal_entity: str, prospect_id: str) -> Key:
    return (str(legal_entity).lower(), str(prospect_id))


def lead_key(lead: Mapping, legal_entities: Iterable[str] = ()) -> Key:
    """The prospect a lead belongs to: keyed by its prospect id and company (`_msdyn_company_value`,
    one of `legal_entities`), or, as earlier versions keyed it, `<legal entity>:<prospect id>` (the id
    may hold a colon itself; the legal entity never does)."""
    company = lead.get("_msdyn_company_value")
    if company:
        codes = {company_id(code): code for code in legal_entities}
        return key_of(codes.get(str(company).lower(), f"company {company}"), lead["msdyn_prospectid"])
    legal_entity, _, prospect_id = lead["msdyn_prospectid"].partition(":")
    return key_of(legal_entity, prospect_id)


def _label(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def _check(name: str, checked: int, violations: list[str]) -> Check:
    return Check(name, not violations, checked, violations)


def check_one_lead_per_prospect(leads: Iterable[Mapping], plan: Mapping[Key, str], bad: Iterable[Key]) -> Check:
    """Every valid prospect has exactly one lead (grouped by `msdyn_prospectid`); a bad record has
    none; no lead names a prospect that was not seeded, and none lacks the prospect id."""
    bad = set(bad)
    counts: Counter[Key] = Counter()
    violations = []
    for lead in leads:
        prospect_id = lead.get("msdyn_prospectid")
        if not prospect_id:
            violations.append(f"lead {lead.get('leadid')} names no prospect (msdyn_prospectid empty)")
            continue
        counts[lead_key(lead, {key[0] for key in plan})] += 1
    for key in sorted(plan):
        n = counts.get(key, 0)
        if key in bad and n:
            violations.append(f"{_label(key)}: a bad record has {n} lead(s)")
        elif key not in bad and n != 1:
            violations.append(f"{_label(key)}: {n} leads")
    violations += [f"{_label(key)}: {n} lead(s) of a prospect never seeded" for key, n in sorted(counts.items())
                   if key not in plan]  # fmt: skip
    return _check("exactly one lead per prospect", len(plan), violations)


def expected_emails(decision: str) -> dict[str, int]:
    """The emails a prospect must have had, by template, once its seller's decision is carried out."""
    template = OUTCOMES[decision][1]
    return {template: 1} if template else {}


def check_one_email_per_decided(outbox: Iterable[Mapping], plan: Mapping[Key, str]) -> Check:
    """Exactly one email of the right template per decided prospect (approved for won, rejected for
    lost or disqualified); none for the others; none for a prospect never seeded."""
    sent: dict[Key, Counter[str]] = {}
    for mail in outbox:
        sent.setdefault(key_of(mail["dataAreaId"], mail["ProspectId"]), Counter())[mail["template"]] += 1
    violations = []
    for key in sorted(plan):
        got, wanted = dict(sent.get(key, {})), expected_emails(plan[key])
        if got != wanted:
            violations.append(f"{_label(key)} ({plan[key]}): emails {got or 'none'}, expected {wanted or 'none'}")
    violations += [f"{_label(key)}: emails {dict(got)} to a prospect never seeded" for key, got in sorted(sent.items())
                   if key not in plan]  # fmt: skip
    return _check("exactly one email per decided prospect", len(plan), violations)


def check_decisions(
    hq_prospects: Iterable[Mapping], store_rows: Iterable[Mapping], plan: Mapping[Key, str], bad: Iterable[Key]
) -> Check:
    """Each prospect's status in Commerce is its seller's outcome (`scenario.OUTCOMES`), and the
    state store records the same: the stage that outcome leads to."""
    bad = set(bad)
    status = {key_of(row["dataAreaId"], row["ProspectId"]): row.get("B2BProspectStatus") for row in hq_prospects}
    stage = {key_of(row["legal_entity"], row["prospect_id"]): row.get("stage") for row in store_rows}
    violations = []
    for key in sorted(plan):
        decision = plan[key]
        expected = OUTCOMES[decision][0]
        if key in status and status[key] != expected:
            violations.append(f"{_label(key)} ({decision}): {status[key]} in Commerce, expected {expected}")
        if key not in bad and key in stage and stage[key] != EXPECTED_STAGE[decision]:
            violations.append(f"{_label(key)} ({decision}): stage {stage[key]} in the state store, "
                              f"expected {EXPECTED_STAGE[decision]}")  # fmt: skip
    return _check("every decision equals the seller's outcome", len(plan), violations)


def check_bad_records_kept(store_rows: Iterable[Mapping], leads: Iterable[Mapping], bad: Mapping[Key, str]) -> Check:
    """Every bad record is in the state store with a non-empty error (its validation error or its
    last error) that names it, and has no lead, neither in the store nor in Sales."""
    rows = {key_of(row["legal_entity"], row["prospect_id"]): row for row in store_rows}
    with_leads = {lead_key(lead, {key[0] for key in rows}) for lead in leads if lead.get("msdyn_prospectid")}
    violations = []
    for key in sorted(bad):
        row = rows.get(key)
        if row is None:
            violations.append(f"{_label(key)} ({bad[key]}): not in the state store")
            continue
        error = row.get("validation_error") or row.get("last_error") or ""
        if not error.strip():
            violations.append(f"{_label(key)} ({bad[key]}): kept without an error")
        elif key[1] not in error:
            violations.append(f"{_label(key)} ({bad[key]}): its error does not name it: {error[:200]!r}")
        if row.get("lead_id") or key in with_leads:
            violations.append(f"{_label(key)} ({bad[key]}): has a lead")
    return _check("every bad record kept with its error", len(bad), violations)


def check_no_prospect_lost(seeded: Iterable[Key], hq_prospects: Iterable[Mapping], store_rows: Iterable[Mapping]) -> Check:
    """Every seeded prospect is still in Commerce (once) and is tracked in the state store; nothing
    appeared in either that was never seeded."""
    seeded = set(seeded)
    in_hq = Counter(key_of(row["dataAreaId"], row["ProspectId"]) for row in hq_prospects)
    in_store = Counter(key_of(row["legal_entity"], row["prospect_id"]) for row in store_rows)
    violations = []
    for key in sorted(seeded):
        if in_hq.get(key, 0) != 1:
            violations.append(f"{_label(key)}: {in_hq.get(key, 0)} times in Commerce")
        if in_store.get(key, 0) != 1:
            violations.append(f"{_label(key)}: {in_store.get(key, 0)} times in the state store")
    violations += [f"{_label(key)}: in Commerce, never seeded" for key in sorted(set(in_hq) - seeded)]
    violations += [f"{_label(key)}: in the state store, never seeded" for key in sorted(set(in_store) - seeded)]
    return _check("no prospect lost", len(seeded), violations)


QUALIFIED_OUTCOMES = ("won", "lost", "qualified")


def check_one_customer_pair_per_qualified(customers: Iterable[Mapping], plan: Mapping[Key, str],
                                          bad: Iterable[Key]) -> Check:  # fmt: skip
    """Every qualified prospect (won, lost or qualified only) has one Organization and one Person
    customer in its legal entity, and there are no others: no customer doubled by a retry, a kill
    or an overlapping run (HQ numbers them, so only a lookup before each create prevents it)."""
    bad = set(bad)
    wanted = Counter(key[0] for key, decision in plan.items() if decision in QUALIFIED_OUTCOMES and key not in bad)
    found: dict[str, Counter[str]] = {}
    names: Counter[tuple[str, str]] = Counter()
    for row in customers:
        found.setdefault(row["dataAreaId"].lower(), Counter())[row["PartyType"]] += 1
        names[(row["dataAreaId"].lower(), row.get("OrganizationName") or row.get("PrimaryContactEmail") or "")] += 1
    violations = [f"{legal_entity}: {found.get(legal_entity, Counter())[party]} {party} customers, expected {count}"
                  for legal_entity in sorted(set(wanted) | set(found)) for party in ("Organization", "Person")
                  if found.get(legal_entity, Counter())[party] != (count := wanted.get(legal_entity, 0))]  # fmt: skip
    violations += [f"{legal_entity}: {n} customers named {name!r}" for (legal_entity, name), n in sorted(names.items()) if n > 1]
    return _check("one Organization and one Person customer per qualified prospect", sum(wanted.values()), violations)


def check_invariants(
    plan: Mapping[Key, str], bad: Mapping[Key, str], hq_prospects: list[dict], leads: list[dict],
    outbox: list[dict], store_rows: list[dict], customers: list[dict],
) -> list[Check]:  # fmt: skip
    return [
        check_one_lead_per_prospect(leads, plan, bad),
        check_one_customer_pair_per_qualified(customers, plan, bad),
        check_one_email_per_decided(outbox, plan),
        check_decisions(hq_prospects, store_rows, plan, bad),
        check_bad_records_kept(store_rows, leads, bad),
        check_no_prospect_lost(plan, hq_prospects, store_rows),
    ]


def fault_figures(served: Mapping[str, Mapping[str, int]], requests: Mapping[str, int]) -> dict:
    """Faults served per system and kind, and the share of Commerce and Dataverse requests faulted.
    `served` is `FakeAdmin.faults()["served"]`; `requests` the requests per system over the same time."""
    by_system = {system: dict(sorted(kinds.items())) for system, kinds in served.items() if kinds}
    faulted = sum(sum(served.get(system, {}).values()) for system in ("commerce", "dataverse"))
    total = sum(requests.get(system, 0) for system in ("commerce", "dataverse"))
    return {"by_system": by_system, "faulted": faulted, "requests": total,
            "share": round(faulted / total, 4) if total else 0.0}  # fmt: skip


def retries_from_results(results: Iterable[Any]) -> dict | None:
    """The retries tasks report (`commerce_retries` and `dataverse_retries` in their return
    values), summed; None when no task reports them."""
    sums: Counter[str] = Counter()
    seen = False
    for result in results:
        if not isinstance(result, Mapping):
            continue
        for system in ("commerce", "dataverse"):
            value = result.get(f"{system}_retries")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[system] += value
                seen = True
    if not seen:
        return None
    return {"commerce": int(sums["commerce"]), "dataverse": int(sums["dataverse"]),
            "total": int(sums["commerce"] + sums["dataverse"])}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The prospects: the scenario's, hostile ones, bad ones.
# ---------------------------------------------------------------------------------------------

HOSTILE = (  # (ProspectId, ProspectName, CompanyName, plan): valid, however they look
    ("P'1", 'Seán O\'Brien "the Boss"', "O'Brien & Sons \"Ltd\"", "won"),
    ("P/2", "דוד כהן", 'חברת אור בע"מ', "lost"),
    ("P#3?", "Amara 😀 Okafor", "Emoji 🚀 Trading", "disqualified"),
    ("P%274", "\u200fمحمد علي", "\u200fشركة النور", "won"),
    ("P&5=+", "Zoë Żółć", "100% <Fair> Trade; DROP TABLE", "qualified"),
)


def chaos_prospects(count: int, legal_entities: tuple[str, ...]) -> tuple[list[dict], dict[Key, str], dict[Key, str]]:
    """The rows to seed, each prospect's plan (what its seller will decide, or "invalid"), and the
    bad records with why each is bad. `count` scenario prospects, then hostile and bad ones."""
    rows, by_email = prospects(count, legal_entities)
    plan = {key_of(row["dataAreaId"], row["ProspectId"]): by_email[row["PrimaryEmailAddress"]] for row in rows}
    bad = {key_of(row["dataAreaId"], row["ProspectId"]): reason for row, reason in
           ((rows[3], "invalid email"), (rows[8], "empty company name"))}  # fmt: skip

    def spoil(index: int, reason: str, **fields: str) -> None:
        rows[index].update(fields)
        key = key_of(rows[index]["dataAreaId"], rows[index]["ProspectId"])
        plan[key], bad[key] = "invalid", reason

    spoil(len(rows) // 5, "name over 100 characters", ProspectName="Maximilian " * 10 + "Longname")
    spoil(2 * len(rows) // 5, "currency code over 3 characters", CurrencyCode="EURO")
    spoil(3 * len(rows) // 5, "control character in the company name", CompanyName="Acme\x07 Bell Corp")

    base = rows[0]
    extra = []
    for index, (prospect_id, name, company, decision) in enumerate(HOSTILE):
        legal_entity = legal_entities[index % len(legal_entities)]
        extra.append({**base, "dataAreaId": legal_entity, "ProspectId": prospect_id, "ProspectName": name,
                      "CompanyName": company, "PrimaryEmailAddress": f"hostile{index}@example.com",
                      "Note": "Quotes ' \" and a right-to-left mark \u200f in the note"})  # fmt: skip
        plan[key_of(legal_entity, prospect_id)] = decision
    too_long = "P-" + "9" * 20
    extra.append({**base, "dataAreaId": legal_entities[0], "ProspectId": too_long, "ProspectName": "Long Id",
                  "CompanyName": "Long Id Ltd", "PrimaryEmailAddress": "longid@example.com"})  # fmt: skip
    plan[key_of(legal_entities[0], too_long)], bad[key_of(legal_entities[0], too_long)] = "invalid", "id over 16 characters"
    # A second prospect with the email of a won one, in its legal entity, with a later id: the product
    # flags the later of the two (emails compare case-insensitively).
    holder = next(row for row in rows if plan[key_of(row["dataAreaId"], row["ProspectId"])] == "won")
    duplicate = {**holder, "ProspectId": "P-900001", "ProspectName": "Second Requester",
                 "PrimaryEmailAddress": holder["PrimaryEmailAddress"].upper()}  # fmt: skip
    extra.append(duplicate)
    key = key_of(duplicate["dataAreaId"], duplicate["ProspectId"])
    plan[key], bad[key] = "invalid", f"same email as {holder['dataAreaId']}/{holder['ProspectId']}"
    return rows + extra, plan, bad


# ---------------------------------------------------------------------------------------------
# Faults.
# ---------------------------------------------------------------------------------------------


def fault_mix(timeout_s: float, scale: float = 1.0) -> list[dict]:
    """The fault rules, most specific first (the first matching rule that fires wins); `scale`
    multiplies every share (at most 1)."""
    slow = {"kind": "slow", "delay_s": timeout_s + 1.5, "phase": "after"}  # past the client's timeout; writes land
    rules: list[dict] = [
        {"system": "entra", "kind": "status", "status": 503, "count": 3},
        # Writes.
        {"system": "dataverse", "route": r"UpsertMultiple$", "method": "POST", "kind": "reset", "phase": "after", "share": 0.12},
        {"system": "dataverse", "route": r"UpsertMultiple$", "method": "POST", **slow, "share": 0.08},
        {"system": "dataverse", "route": r"UpsertMultiple$", "method": "POST", "kind": "status", "status": 502, "share": 0.06},
        {"system": "commerce", "route": r"/\$batch$", "method": "POST", "kind": "reset", "phase": "after", "share": 0.05},
        {"system": "commerce", "route": r"/\$batch$", "method": "POST", **slow, "share": 0.04},
        {"system": "commerce", "route": r"/\$batch$", "method": "POST", "kind": "status", "status": 504, "share": 0.03},
        {"system": "commerce", "route": r"/Prospects\(", "method": "PATCH", "kind": "status", "status": 500, "share": 0.1},
        {"system": "commerce", "route": r"/CustomersV3$", "method": "POST", "kind": "reset", "phase": "before", "share": 0.1},
    ]
    for system in ("commerce", "dataverse"):  # everything else, reads first of all
        rules += [
            {"system": system, "kind": "status", "status": 429, "retry_after": 1, "share": 0.05},
            {"system": system, "kind": "status", "status": 503, "share": 0.04},
            {"system": system, "kind": "status", "status": 500, "share": 0.01},
            {"system": system, "kind": "status", "status": 502, "share": 0.01},
            {"system": system, "kind": "status", "status": 504, "share": 0.01},
            {"system": system, "method": "GET", **slow, "share": 0.015},
            {"system": system, "kind": "reset", "phase": "before", "share": 0.015},
            {"system": system, "method": "GET", "kind": "reset", "phase": "after", "share": 0.01},
        ]
    return [{**rule, "share": min(1.0, rule["share"] * scale)} if "share" in rule else rule for rule in rules]


# ---------------------------------------------------------------------------------------------
# Airflow homes and DAG runs.
# ---------------------------------------------------------------------------------------------


class Home:
    """One AIRFLOW_HOME with its own SQLite metadata database."""

    def __init__(self, name: str, connections: Mapping[str, str]) -> None:
        self.name = name
        self.path = OUT / "homes" / name
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.path),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **connections,
        }

    def setup(self) -> None:
        for label, args in (("db-migrate", ["db", "migrate"]), ("pools", ["pools", "import", str(POOLS_FILE)])):
            log = OUT / "logs" / f"{self.name}-{label}.log"
            with open(log, "w") as output:
                code = subprocess.call([sys.executable, "-m", "airflow", *args], env=self.env, stdout=output,
                                       stderr=subprocess.STDOUT)  # fmt: skip
            if code:
                raise SystemExit(f"airflow {' '.join(args)} failed in {self.path}:\n{_tail(log, 40)}")

    def task_results(self) -> dict[tuple, Any]:
        """Every task's return value in this home's metadata database, by (home, dag, run, task, map index)."""
        database = self.path / "airflow.db"
        if not database.exists():
            return {}
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        try:
            rows = connection.execute(
                "SELECT dag_id, run_id, task_id, map_index, value FROM xcom WHERE key = 'return_value'"
            ).fetchall()
        except sqlite3.Error:
            return {}
        finally:
            connection.close()
        return {(self.name, *row[:4]): _json_value(row[4]) for row in rows}


def _json_value(value: Any) -> Any:
    for _ in range(2):  # stored as JSON, sometimes a JSON string of JSON
        if not isinstance(value, (str, bytes)):
            break
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value


@dataclass
class Job:
    """One DAG run to get done in one home: attempted until it succeeds or fails too often."""

    lane: str
    dag_id: str
    logical_date: str | None = None
    start_after_s: float = 0.0
    kills_allowed: int = 0
    force_kill: bool = False  # the first attempt is killed once writes have grown (so every run of the suite kills)
    attempts: int = 0
    failures: int = 0
    kills: int = 0
    state: str = "pending"  # pending, running, success, gave_up

    @property
    def label(self) -> str:
        return f"{self.lane}:{self.dag_id}" + (f"@{self.logical_date}" if self.logical_date else "")


@dataclass
class Attempt:
    job: Job
    process: subprocess.Popen
    log: Path
    started: float
    writes_at_start: int
    kill: tuple[str, float] | None  # ("writes", growth) or ("timer", seconds)
    offset: int = 0


class Conductor:
    """Runs lanes of jobs (one lane per home, its jobs one after another, lanes side by side),
    kills some attempts, ends failed ones, and keeps the figures."""

    def __init__(self, homes: Mapping[str, Home], admin: FakeAdmin, rng: random.Random, max_failures: int,
                 max_kills: int, run_timeout_s: float) -> None:  # fmt: skip
        self.homes, self.admin, self.rng = homes, admin, rng
        self.max_failures, self.max_kills, self.run_timeout_s = max_failures, max_kills, run_timeout_s
        self.runs: list[dict] = []
        self.results: dict[tuple, Any] = {}
        self.kills = 0
        self.active: dict[str, Attempt] = {}

    def run_phase(self, phase: str, jobs: list[Job], events: list[tuple[float, str, Callable[[], None]]] = ()) -> bool:
        """Runs the jobs; `events` are (seconds after the start, label, action). True when every job
        succeeded."""
        print(f"\n{phase}")
        started = time.monotonic()
        events = sorted(events, key=lambda event: event[0])
        lanes: dict[str, list[Job]] = {}
        for job in jobs:
            lanes.setdefault(job.lane, []).append(job)
        try:
            while any(job.state in ("pending", "running") for job in jobs):
                now = time.monotonic() - started
                writes = total_writes(self.admin.counts())
                while events and events[0][0] <= now:
                    _, label, action = events.pop(0)
                    action()
                    print(f"  {now:6.1f} s  {label}")
                for lane, lane_jobs in lanes.items():
                    attempt = self.active.get(lane)
                    if attempt is None:
                        job = next((job for job in lane_jobs if job.state == "pending"), None)
                        if job is not None and now >= job.start_after_s:
                            self._start(phase, job, writes)
                        continue
                    self._watch(phase, attempt, writes, started)
                time.sleep(POLL_S)
        finally:
            for attempt in list(self.active.values()):
                self._kill(attempt)
                self._ended(phase, attempt, "aborted", "the harness stopped")
        return all(job.state == "success" for job in jobs)

    def _start(self, phase: str, job: Job, writes: int) -> None:
        job.attempts += 1
        job.state = "running"
        home = self.homes[job.lane]
        kill = None
        if job.force_kill and job.attempts == 1 and self.kills < self.max_kills:
            kill = ("writes", 1.0)
        elif job.kills < job.kills_allowed and self.kills < self.max_kills and self.rng.random() < 0.6:
            kill = (("writes", float(self.rng.randint(1, 200))) if self.rng.random() < 0.5
                    else ("timer", round(self.rng.uniform(2, 15), 1)))  # fmt: skip
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{phase.split()[0]}-{job.label}-{job.attempts}")
        log = OUT / "logs" / f"{slug}.log"
        args = [sys.executable, "-m", "airflow", "dags", "test", job.dag_id] + ([job.logical_date] if job.logical_date else [])
        with open(log, "w") as output:  # its own session: a kill reaches the whole process group
            process = subprocess.Popen(args, env=home.env, stdout=output, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.active[job.lane] = Attempt(job, process, log, time.monotonic(), writes, kill)
        plan = "" if kill is None else f"  (will be killed {_kill_text(kill)})"
        print(f"  start {job.label} attempt {job.attempts}{plan}")

    def _watch(self, phase: str, attempt: Attempt, writes: int, phase_started: float) -> None:
        job = attempt.job
        code = attempt.process.poll()
        if code is None:
            with open(attempt.log, "rb") as log:
                log.seek(attempt.offset)
                chunk = log.read()
            whole = chunk[: chunk.rfind(b"\n") + 1]  # only whole lines: a mark may be half written
            attempt.offset += len(whole)
            elapsed = time.monotonic() - attempt.started
            if TASK_FAILED.search(whole.decode(errors="replace")):
                time.sleep(1)  # let the task's last lines reach the log
                self._kill(attempt)
                self._failed(phase, attempt, "a task failed; the run was ended instead of waiting out retry_delay")
            elif elapsed > self.run_timeout_s:
                self._kill(attempt)
                self._failed(phase, attempt, f"still running after {self.run_timeout_s:g} s; ended")
            elif attempt.kill and (
                (attempt.kill[0] == "timer" and elapsed >= attempt.kill[1])
                or (attempt.kill[0] == "writes" and writes - attempt.writes_at_start >= attempt.kill[1])
            ):
                self._kill(attempt)
                self.kills += 1
                job.kills += 1
                job.state = "pending"
                self._ended(phase, attempt, "killed", f"SIGKILL {_kill_text(attempt.kill)}, after {elapsed:.1f} s "
                                                      f"(writes +{writes - attempt.writes_at_start})")  # fmt: skip
            return
        text = attempt.log.read_text(errors="replace")
        if code == 0 and "state=success" in text:
            job.state = "success"
            self._ended(phase, attempt, "success", "")
        else:
            self._failed(phase, attempt, f"exit code {code}")

    def _failed(self, phase: str, attempt: Attempt, why: str) -> None:
        job = attempt.job
        job.failures += 1
        job.state = "gave_up" if job.failures >= self.max_failures else "pending"
        task, error, excerpt = failure_of(attempt.log.read_text(errors="replace"))
        record = self._ended(phase, attempt, "failed", why, task=task, error=error)
        print(f"      task {task or '?'}: {error or '(no error found)'}")
        print("      " + "\n      ".join(line[:400] for line in excerpt))
        if job.state == "gave_up":
            print(f"  GAVE UP {job.label} after {job.failures} failed attempts")
        record["excerpt"] = excerpt

    def _kill(self, attempt: Attempt) -> None:
        if attempt.process.poll() is None:
            try:
                os.killpg(attempt.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        attempt.process.wait()

    def _ended(self, phase: str, attempt: Attempt, outcome: str, detail: str, **more: Any) -> dict:
        job = attempt.job
        del self.active[job.lane]
        wall = round(time.monotonic() - attempt.started, 1)
        self.results.update(self.homes[job.lane].task_results())
        record = {"phase": phase, "lane": job.lane, "dag": job.dag_id, "logical_date": job.logical_date,
                  "attempt": job.attempts, "outcome": outcome, "wall_s": wall, "detail": detail,
                  "log": str(attempt.log.relative_to(ROOT)), **more}  # fmt: skip
        self.runs.append(record)
        print(f"  {outcome:<7} {job.label} attempt {job.attempts} ({wall} s){': ' + detail if detail else ''}"
              f"  [{record['log']}]")  # fmt: skip
        return record


def _kill_text(kill: tuple[str, float]) -> str:
    return f"once writes grew by {kill[1]:g}" if kill[0] == "writes" else f"after {kill[1]:g} s"


def failure_of(log: str) -> tuple[str | None, str | None, list[str]]:
    """(the task that failed, its final error line, the last lines of its traceback) from a
    `dags test` log; for a run that failed otherwise, the log's last lines."""
    lines = log.splitlines()
    marks = [index for index, line in enumerate(lines) if TASK_FAILED.search(line)]
    if not marks:
        tail = [line for line in lines if line.strip()][-15:]
        errors = [line for line in tail if not TIMESTAMPED.match(line) and re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
        return None, errors[-1] if errors else None, tail
    end = marks[0]
    start = next((index for index in range(end, -1, -1) if "Task failed with exception" in lines[index]), max(0, end - 40))
    task = None
    for line in reversed(lines[:start + 1]):
        if match := TASK_STARTED.search(line):
            task = match.group(1) + (f"[{match.group(2)}]" if match.group(2) != "-1" else "")
            break
    block = lines[start:end + 1]
    finals = [line for line in block if line and not line[0].isspace() and not TIMESTAMPED.match(line)
              and not line.startswith(("Traceback", "The above exception", "During handling"))]  # fmt: skip
    return task, finals[-1] if finals else None, block[-14:]


# ---------------------------------------------------------------------------------------------
# The flow.
# ---------------------------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b2b_drivers.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="scenario prospects to seed (default 600; hostile "
                                                           "and bad ones come on top)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=7, help="seeds kills, timings and faults (default 7)")
    parser.add_argument("--legal-entities", default="usrt,usmf,frrt", help="comma-separated (default usrt,usmf,frrt)")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="the connections' request timeout (default 2)")
    parser.add_argument("--max-failures", type=int, default=6, help="failed attempts before a DAG run is given up")
    parser.add_argument("--max-kills", type=int, default=8, help="kills at most, in all (default 8)")
    parser.add_argument("--run-timeout-s", type=float, default=300.0, help="a DAG run still going after this "
                                                                          "is ended as failed (default 300)")  # fmt: skip
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiplies every fault share (default 1)")
    parser.add_argument("--no-faults", action="store_true", help="kills, overlap and backfill only")
    return parser.parse_args(argv)


def _connections(endpoints: Endpoints, cast: Cast, legal_entities: list[str], timeout_s: float) -> dict[str, str]:
    connections = airflow_connections(endpoints, cast, legal_entities, OUT / "state.db")
    for name in ("AIRFLOW_CONN_D365_COMMERCE", "AIRFLOW_CONN_D365_SALES"):
        connection = json.loads(connections[name])
        connection["extra"]["timeout_s"] = timeout_s
        connections[name] = json.dumps(connection)
    return connections


def _requests(admin: FakeAdmin) -> dict[str, int]:
    counts = admin.counts()
    return {"commerce": counts["commerce"]["requests"], "dataverse": counts["dataverse"]["requests"],
            "entra_tokens": counts["entra"]["tokens_issued"]}  # fmt: skip


def _decide(admin: FakeAdmin, decisions: list[dict]) -> tuple[int, list[dict]]:
    if not decisions:
        return 0, []
    answer = admin.decide(decisions)
    return answer["applied"], answer["errors"]


def _store_rows(path: Path) -> list[dict]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(
            "SELECT legal_entity, prospect_id, stage, validation_error, last_error, lead_id, decision FROM b2b_prospects")]
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    began = time.monotonic()
    legal_entities = [part.strip() for part in args.legal_entities.split(",") if part.strip()]
    rng = random.Random(args.seed)
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "logs").mkdir(parents=True)
    cast = Cast.new()
    rows, plan, bad = chaos_prospects(args.n, tuple(legal_entities))
    can_fault = hasattr(FakeAdmin, "add_fault") and not args.no_faults
    faults = fault_mix(args.timeout_s, args.fault_scale) if can_fault else []
    flags = {"fault_seed": args.seed} if can_fault else {}

    with running_fakes(OUT / "fakes", cast.clients, **flags) as endpoints, FakeAdmin(endpoints) as admin:
        connections = _connections(endpoints, cast, legal_entities, args.timeout_s)
        homes = {name: Home(name, connections) for name in HOMES}
        print(f"Airflow homes {', '.join(HOMES)} (own SQLite metadata DB each; one state store, one set of fakes)")
        with ThreadPoolExecutor(len(homes)) as pool:
            list(pool.map(Home.setup, homes.values()))
        admin.reset()
        for start in range(0, len(rows), SEED_BATCH):
            admin.seed_prospects(rows[start : start + SEED_BATCH])
        print(f"Seeded {len(rows)} prospects over {', '.join(legal_entities)}: {len(bad)} bad, "
              f"{len(HOSTILE)} with hostile ids and names; plan: "
              + ", ".join(f"{n} {decision}" for decision, n in sorted(Counter(plan.values()).items())))  # fmt: skip

        conductor = Conductor(homes, admin, rng, args.max_failures, args.max_kills, args.run_timeout_s)
        for rule in faults:
            admin.add_fault(**rule)
        if faults:
            print(f"Faults on: {len(faults)} rules (seed {args.seed}); client timeout {args.timeout_s:g} s")
        else:
            print("Faults: OFF (" + ("--no-faults" if args.no_faults else "FakeAdmin.add_fault is missing") + ")")
        before_chaos = _requests(admin)

        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        backfill = [(hour - timedelta(days=days)).isoformat() for days in (3, 2, 1)]
        sync_ok = conductor.run_phase("Sync under chaos: main and overlap together, backfill of three dates", [
            Job("main", SYNC, kills_allowed=2, force_kill=True),
            Job("overlap", SYNC, kills_allowed=1),
            *(Job("backfill", SYNC, date, start_after_s=3.0, kills_allowed=1) for date in backfill),
        ])  # fmt: skip

        decisions = [{"msdyn_prospectid": f"{key[0]}:{key[1]}", "outcome": decision}
                     for key, decision in sorted(plan.items()) if decision in DECIDED]  # fmt: skip
        applied, errors = _decide(admin, decisions)
        deferred = [decisions[error["index"]] for error in errors]
        print(f"\nSellers decided {applied} leads" + (f"; {len(deferred)} not yet possible (e.g. "
              f"{errors[0]['msdyn_prospectid']}: {errors[0]['error']})" if errors else ""))  # fmt: skip

        tokens_at_revocation: list[int] = []

        def revoke_tokens() -> None:
            admin.revoke_tokens()
            tokens_at_revocation.append(_requests(admin)["entra_tokens"])

        revoke = [(rng.uniform(10, 20), "revoked every token issued so far", revoke_tokens)] if faults else []
        reconcile_ok = conductor.run_phase("Reconciliation under chaos: main and overlap together", [
            Job("main", RECONCILE, kills_allowed=2, force_kill=True),
            Job("overlap", RECONCILE, start_after_s=round(rng.uniform(0, 2), 1), kills_allowed=1),
        ], revoke)  # fmt: skip

        fault_report = admin.faults() if can_fault else {"rules": [], "served": {}}
        tokens_after_revocation = (_requests(admin)["entra_tokens"] - tokens_at_revocation[0]) if tokens_at_revocation else None
        during_chaos = {name: value - before_chaos[name] for name, value in _requests(admin).items()}
        if can_fault:
            admin.clear_faults()
        sync_final = conductor.run_phase("Faults off: a clean sync", [Job("main", SYNC)])
        late_applied, late_errors = _decide(admin, deferred)
        if deferred:
            print(f"\nSellers decided the {late_applied} leads that were missing before"
                  + (f"; {len(late_errors)} still failed: {late_errors[:3]}" if late_errors else ""))  # fmt: skip
        reconcile_final = conductor.run_phase("Faults off: a clean reconciliation", [Job("main", RECONCILE)])
        requests = _requests(admin)

        clerk = Clerk(endpoints, cast.clerk["client_id"], cast.clerk["client_secret"])
        seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
        try:
            hq_prospects = clerk.all("Prospects")
            customers = clerk.all("CustomersV3")
            leads = seller.rows("leads", {"$select": "leadid,msdyn_prospectid,_msdyn_company_value,statecode"})
        finally:
            clerk.close()
            seller.close()
        outbox = admin.outbox()
    store_rows = _store_rows(OUT / "state.db")

    checks = check_invariants(plan, bad, hq_prospects, leads, outbox, store_rows, customers)
    faulted = fault_figures(fault_report["served"], requests)
    faulted_chaos = fault_figures(fault_report["served"], during_chaos)
    retries = retries_from_results(conductor.results.values())
    throttled = {system: sum(int(result.get(f"{system}_throttled") or 0) for result in conductor.results.values()
                             if isinstance(result, Mapping)) for system in ("commerce", "dataverse")}  # fmt: skip
    outcomes = Counter(run["outcome"] for run in conductor.runs)
    given_up = _given_up(conductor.runs)
    wall = round(time.monotonic() - began, 1)
    conditions = [
        (f"at least {MIN_PROSPECTS} prospects", len(rows) >= MIN_PROSPECTS, f"{len(rows)} seeded"),
        (f"at least {MIN_FAULTED_SHARE:.0%} of Commerce+Dataverse requests faulted",
         faulted["share"] >= MIN_FAULTED_SHARE, f"{faulted['share']:.1%} of the flow's requests"),
        ("at least one run killed", conductor.kills > 0, f"{conductor.kills} kills"),
        ("every DAG run done (none given up)", sync_ok and reconcile_ok and sync_final and reconcile_final,
         ", ".join(given_up) or "all done"),
    ]  # fmt: skip

    print("\nFigures")
    print(f"  prospects     {len(rows)} seeded ({len(bad)} bad), {len(leads)} leads, {len(outbox)} emails")
    print(f"  requests      Commerce {requests['commerce']}, Dataverse {requests['dataverse']}, "
          f"Entra tokens {requests['entra_tokens']} (during the chaos: Commerce {during_chaos['commerce']}, "
          f"Dataverse {during_chaos['dataverse']})")  # fmt: skip
    for system, kinds in faulted["by_system"].items():
        print(f"  faults        {system:<10} " + ", ".join(f"{kind}: {n}" for kind, n in kinds.items())
              + f"  (total {sum(kinds.values())})")  # fmt: skip
    print(f"  faulted share {faulted['faulted']} of {faulted['requests']} Commerce+Dataverse requests = "
          f"{faulted['share']:.1%} (while faults were on: {faulted_chaos['share']:.1%})")  # fmt: skip
    print("  retries       " + ("n/a (tasks report no commerce_retries / dataverse_retries)" if retries is None else
                               f"{retries['total']} (Commerce {retries['commerce']}, Dataverse {retries['dataverse']}; "
                               "as reported by the tasks that finished)"))  # fmt: skip
    print(f"  throttled     Commerce {throttled['commerce']}, Dataverse {throttled['dataverse']} (429s the tasks saw)")
    if tokens_after_revocation is not None:
        print(f"  revocation    every token revoked once, mid-reconciliation; {tokens_after_revocation} tokens issued "
              "after it while faults were on")  # fmt: skip
    print(f"  kills         {conductor.kills}")
    print(f"  runs          {len(conductor.runs)} started: " + ", ".join(f"{n} {outcome}" for outcome, n in
                                                                      sorted(outcomes.items())))  # fmt: skip
    print(f"  wall time     {wall} s")
    print("\nInvariants")
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"  {check.result}  {check.name:<{width}}  {check.checked} checked, {len(check.violations)} violations")
        for violation in check.violations[:8]:
            print(f"          {violation}")
        if len(check.violations) > 8:
            print(f"          ... and {len(check.violations) - 8} more (.chaos/results.json)")
    print("\nChaos conditions")
    for name, ok, detail in conditions:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")

    ok = all(check.ok for check in checks) and all(ok for _, ok, _ in conditions)
    results = {
        "ok": ok, "seed": args.seed, "n": len(rows), "legal_entities": legal_entities, "wall_s": wall,
        "requests": requests, "requests_during_chaos": during_chaos,
        "faults": {"served": faulted["by_system"], "faulted": faulted["faulted"], "share": faulted["share"],
                   "share_while_on": faulted_chaos["share"], "rules": fault_report["rules"]},
        "retries": retries, "throttled": throttled, "kills": conductor.kills,
        "tokens_issued_after_revocation": tokens_after_revocation,
        "runs_started": len(conductor.runs), "runs_by_outcome": dict(outcomes),
        "invariants": [{**asdict(check), "result": check.result} for check in checks],
        "conditions": [{"name": name, "ok": ok_, "detail": detail} for name, ok_, detail in conditions],
        "bad_records": {_label(key): reason for key, reason in sorted(bad.items())},
        "deferred_decisions": deferred, "runs": conductor.runs,
    }  # fmt: skip
    (OUT / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"\n{'PASSED' if ok else 'FAILED'} (written to .chaos/results.json)")
    return 0 if ok else 1


def _given_up(runs: list[dict]) -> list[str]:
    attempts: dict[str, list[str]] = {}
    for run in runs:
        label = f"{run['lane']}:{run['dag']}" + (f"@{run['logical_date']}" if run["logical_date"] else "")
        attempts.setdefault(f"{run['phase']}|{label}", []).append(run["outcome"])
    return [key.split("|", 1)[1] + " given up" for key, outcomes in attempts.items() if "success" not in outcomes]


def _tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
