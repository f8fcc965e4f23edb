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

`--scheduling events` (issue 16: event triggers start the DAGs as soon as there is work) plays the
event-driven deployment instead, its output in `.chaos/events/`:
- The outcome phases (the overlapping pair under chaos, the clean one) run the light DAG
  `b2b_outcomes`; then the nightly `b2b_outcome_reconciliation` (the safety net) runs clean, and one
  more clean sync (approvals changed the Pending set).
- All along, a thread plays the triggers' part under the same faults: every second it builds the
  product's clients and state store from the connections, as the hooks do, runs the triggers'
  read-only checks (`flow.watch`) and records what they reported, every error, and the store's delta
  links and HQ watermarks just before and after.
- More invariants: every delta link and watermark was stored by a DAG run the harness started; none
  changed during a check while no DAG run was running; the watchers reported work during the chaos
  and none at the end; in the clean phase, the flow wrote no lead twice. The figures add the
  watchers' checks and failures, and the flow's lead writes against the leads.

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
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from b2b_onboarding.airflow.hooks import FernetTokenCaches
from b2b_onboarding.airflow.pools import POOLS_FILE
from b2b_onboarding.clients.auth import token_provider
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.errors import first_line
from b2b_onboarding.flow import watch
from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import OUTCOMES, Cast, airflow_connections, prospects, total_writes

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / ".chaos"
# Where each scheduling writes (logs, homes, fakes, state store, results): `make chaos` alone in `.chaos/`.
OUT_OF = {"time": OUT, "events": OUT / "events"}
SYNC, RECONCILE, OUTCOMES_DAG = "b2b_prospect_sync", "b2b_outcome_reconciliation", "b2b_outcomes"
WATCH_INTERVAL_S = 1.0
IDLE_CHECKS = 3  # watcher checks under faults with no DAG run running, after the chaos
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
# Invariants of event-driven scheduling (--scheduling events): pure functions over what the
# watchers and the harness recorded.
# ---------------------------------------------------------------------------------------------

Links = dict[str, tuple[str, str]]  # entity set or `Prospects@<legal entity>` -> (delta link or watermark, run_id)
WATCHERS = {"hq": "HQ watcher (pending prospects)", "sales": "Sales watcher (seller outcomes)"}


@dataclass
class WatchCheck:
    """One round of the triggers' checks: what each watcher reported (None: it failed), its errors,
    and the store's delta links and watermarks just before and just after the round."""

    phase: str
    started: float  # time.monotonic()
    ended: float
    hq: list[str] | None
    sales: list[str] | None
    errors: list[dict] = field(default_factory=list)  # {"watcher", "error" (its type), "message"}
    links_before: Links = field(default_factory=dict)
    links_after: Links = field(default_factory=dict)


def check_links_stored_by_dag_runs(seen: Iterable[Links], run_ids: Collection[str]) -> Check:
    """Every delta link and HQ watermark the store held, in any snapshot, was stored by a DAG run
    the harness started (its run_id): the triggers only compare, never store."""
    stored = {(name, run_id) for links in seen for name, (_, run_id) in links.items()}
    violations = [f"{name}: stored by run {run_id!r}, which the harness never started"
                  for name, run_id in sorted(stored) if run_id not in run_ids]  # fmt: skip
    return _check("every delta link and watermark stored by a DAG run", len(stored), violations)


def _during_a_run(check: WatchCheck, spans: Iterable[tuple[float, float]]) -> bool:
    return any(start <= check.ended and end >= check.started for start, end in spans)


def check_watchers_moved_nothing(checks: Iterable[WatchCheck], spans: Iterable[tuple[float, float]]) -> Check:
    """No delta link or watermark changed during a watcher check while no DAG run was running
    (`spans`: each run's start and end), when nothing but the watchers could have moved it. There
    must be such checks, or this proves nothing."""
    spans = list(spans)
    idle = [check for check in checks if not _during_a_run(check, spans)]
    violations = []
    for check in idle:
        changed = sorted(name for name in set(check.links_before) | set(check.links_after)
                         if check.links_before.get(name) != check.links_after.get(name))  # fmt: skip
        if changed:
            violations.append(f"{check.phase}: {', '.join(changed)} changed during a watcher check, no DAG run running")
    if not idle:
        violations.append("no watcher check ran while no DAG run was running")
    return _check("the watchers moved no delta link or watermark", len(idle), violations)


def check_watchers_noticed_then_quiet(checks: Iterable[WatchCheck], final: WatchCheck | None) -> Check:
    """Each watcher reported work during the chaos at least once, and at the end, every change
    applied and faults off, both report none and fail no more."""
    checks = list(checks)
    violations = [f"{label}: never reported a change" for name, label in WATCHERS.items()
                  if not any(getattr(check, name) for check in checks)]  # fmt: skip
    if final is None:
        violations.append("no final check")
    else:
        for name, label in WATCHERS.items():
            reported = getattr(final, name)
            if reported is None:
                errors = "; ".join(error["message"] for error in final.errors if error["watcher"] in (name, "store"))
                violations.append(f"{label}: failed at the end: {errors or '?'}")
            elif reported:
                violations.append(f"{label}: still reports {', '.join(map(str, reported[:5]))} after the final runs")
    return _check("the watchers noticed the work, then were quiet", len(checks) + (final is not None), violations)


def check_no_lead_written_again(lead_writes: int, leads_created: int, leads: int) -> Check:
    """In the clean phase (faults off), the flow wrote a lead only to create it: its writes of
    `leads` then (the sellers' own taken out) equal the leads created then. `leads`: all there are."""
    violations = [] if lead_writes == leads_created else [
        f"{lead_writes} lead writes by the flow for {leads_created} leads created in the clean phase"]
    return _check("no lead written again in the clean phase", leads, violations)


def watch_figures(checks: Iterable[WatchCheck]) -> dict:
    """The watchers' checks, how many saw changes, and their failures by watcher and error type."""
    checks = list(checks)
    errors = Counter(f"{error['watcher']}: {error['error']}" for check in checks for error in check.errors)
    return {"checks": len(checks), "hq_reported_changes": sum(1 for check in checks if check.hq),
            "sales_reported_changes": sum(1 for check in checks if check.sales),
            "failed": sum(1 for check in checks if check.errors), "errors": dict(sorted(errors.items()))}  # fmt: skip


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
    """One AIRFLOW_HOME with its own SQLite metadata database; `variables` (the connections, the
    deployment's settings) over the environment."""

    def __init__(self, name: str, variables: Mapping[str, str], out: Path) -> None:
        self.name = name
        self.out = out
        self.path = out / "homes" / name
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.path),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **variables,
        }

    def setup(self) -> None:
        for label, args in (("db-migrate", ["db", "migrate"]), ("pools", ["pools", "import", str(POOLS_FILE)])):
            log = self.out / "logs" / f"{self.name}-{label}.log"
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

    def run_ids(self) -> set[str]:
        """The run_id of every DAG run started in this home (killed ones too: `dags test` records the
        run before its first task)."""
        database = self.path / "airflow.db"
        if not database.exists():
            return set()
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        try:
            return {row[0] for row in connection.execute("SELECT run_id FROM dag_run")}
        finally:
            connection.close()


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
                 max_kills: int, run_timeout_s: float, out: Path) -> None:  # fmt: skip
        self.homes, self.admin, self.rng, self.out = homes, admin, rng, out
        self.max_failures, self.max_kills, self.run_timeout_s = max_failures, max_kills, run_timeout_s
        self.runs: list[dict] = []
        self.results: dict[tuple, Any] = {}
        self.kills = 0
        self.active: dict[str, Attempt] = {}
        self.spans: list[tuple[float, float]] = []  # each attempt's process, from start to its end seen (monotonic)

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
        log = self.out / "logs" / f"{slug}.log"
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
        self.spans.append((attempt.started, time.monotonic()))
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
# The event triggers' part (--scheduling events), played by a thread.
# ---------------------------------------------------------------------------------------------


def stored_links(state_db: Path) -> Links:
    """The store's delta links and HQ watermarks with the run that stored each; none before the
    first task created the store."""
    if not state_db.exists():
        return {}
    connection = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute("SELECT entity_set, delta_link, run_id FROM b2b_delta_links").fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" not in str(error):
            raise
        return {}
    finally:
        connection.close()
    return {name: (link, run_id) for name, link, run_id in rows}


def _service_settings(connections: Mapping[str, str], conn_id: str) -> ServiceSettings:
    """A connection's settings from its `AIRFLOW_CONN_*` JSON, as the hooks read them."""
    connection = json.loads(connections[f"AIRFLOW_CONN_{conn_id.upper()}"])
    return ServiceSettings.from_connection(conn_id, connection.get("host"), connection.get("login"),
                                           connection.get("password"), connection.get("extra") or {},
                                           port=connection.get("port"))  # fmt: skip


class Watchers:
    """What the triggers do on each poll, every WATCH_INTERVAL_S in a thread of the harness, under the
    chaos' faults: builds the product's clients from the connections and opens the state store, as the
    hooks do (Entra ID tokens shared with the tasks through the store, under the deployment's Fernet
    key), asks `watch.hq_changes` and `watch.sales_changes`, and records what they reported, each
    error (a fault may fail a check; it must never corrupt anything), and the store's delta links and
    watermarks just before and just after."""

    def __init__(self, connections: Mapping[str, str], state_db: Path, legal_entities: list[str],
                 fernet_key: str) -> None:  # fmt: skip
        self.commerce = _service_settings(connections, "d365_commerce")
        self.sales = _service_settings(connections, "d365_sales")
        self.state_db = state_db
        self.legal_entities = legal_entities
        self.fernet = Fernet(fernet_key)
        self.phase = "before the first DAG run"
        self.checks: list[WatchCheck] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken: BaseException | None = None  # what ended the thread, other than a failed check

    def start(self, log: Path) -> None:
        """Checks in a thread from now on; the product's log lines of this process (the watchers' retries,
        failures, the store's migration) go to `log`, not among the harness's lines."""
        handler = logging.FileHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
        for name in ("b2b_onboarding", "alembic", "msal", "httpx"):
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = [handler], False
        self._thread = threading.Thread(target=self._loop, name="watchers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread; raises what broke it, if anything did (the harness's own failure, not a fault's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._broken is not None:
            raise RuntimeError("the watchers' thread broke") from self._broken

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                self.checks.append(self.check())
                self._stop.wait(max(0.0, WATCH_INTERVAL_S - (time.monotonic() - began)))
        except BaseException as error:  # noqa: BLE001 - kept for `stop` to raise in the harness's thread
            self._broken = error

    def wait_for(self, count: int, timeout_s: float) -> int:
        """Until `count` more checks have ended (at most `timeout_s`); how many did."""
        first, deadline = len(self.checks), time.monotonic() + timeout_s
        while len(self.checks) - first < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return len(self.checks) - first

    def check(self) -> WatchCheck:
        phase, errors = self.phase, []
        started = time.monotonic()
        before = stored_links(self.state_db)
        hq = sales = None
        try:
            store = StateStore(f"sqlite:///{self.state_db}")
        except Exception as error:  # noqa: BLE001 - counted: a check may fail, never corrupt
            errors.append(_watch_error("store", error))
        else:
            try:
                caches = FernetTokenCaches(store, self.fernet)
                hq = self._ask("hq", errors, lambda: _client(CommerceClient, self.commerce, caches),
                               lambda commerce: watch.hq_changes(commerce, store, self.legal_entities))  # fmt: skip
                sales = self._ask("sales", errors, lambda: _client(SalesClient, self.sales, caches),
                                  lambda client: watch.sales_changes(client, store))  # fmt: skip
            finally:
                store.close()
        after = stored_links(self.state_db)
        return WatchCheck(phase, started, time.monotonic(), hq, sales, errors, before, after)

    @staticmethod
    def _ask(name: str, errors: list[dict], connect: Callable[[], Any],
             changes: Callable[[Any], list[str]]) -> list[str] | None:  # fmt: skip
        try:
            client = connect()
            try:
                return list(changes(client))
            finally:
                client.odata.close()
        except Exception as error:  # noqa: BLE001 - counted: a check may fail, never corrupt
            errors.append(_watch_error(name, error))
            return None


def _client(client_class: type[CommerceClient] | type[SalesClient], settings: ServiceSettings,
            caches: FernetTokenCaches) -> CommerceClient | SalesClient:  # fmt: skip
    """As the hooks' `client`: the process-wide token provider shares its cache through the store first."""
    token_provider(settings.authority, settings.client_id, settings.client_secret.get_secret_value(), settings.verify,
                   caches)  # fmt: skip
    return client_class.connect(settings)


def _watch_error(watcher: str, error: BaseException) -> dict:
    return {"watcher": watcher, "error": type(error).__name__, "message": first_line(error)}


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
    parser.add_argument("--scheduling", choices=tuple(OUT_OF), default="time",
                        help="time: the DAGs as cron starts them (default); events: as event triggers start them, "
                             "the triggers' checks running all along (output in .chaos/events/)")  # fmt: skip
    return parser.parse_args(argv)


def _fresh(out: Path) -> None:
    """`out` emptied, with its `logs/`; another scheduling's output inside it (`.chaos/events/`) stays."""
    others = set(OUT_OF.values()) - {out}
    if out.exists():
        for path in out.iterdir():
            if path not in others:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (out / "logs").mkdir(parents=True)


def _connections(endpoints: Endpoints, cast: Cast, legal_entities: list[str], timeout_s: float,
                 state_db: Path) -> dict[str, str]:  # fmt: skip
    connections = airflow_connections(endpoints, cast, legal_entities, state_db)
    for name in ("AIRFLOW_CONN_D365_COMMERCE", "AIRFLOW_CONN_D365_SALES"):
        connection = json.loads(connections[name])
        connection["extra"]["timeout_s"] = timeout_s
        connections[name] = json.dumps(connection)
    return connections


def _requests(admin: FakeAdmin) -> dict[str, int]:
    counts = admin.counts()
    return {"commerce": counts["commerce"]["requests"], "dataverse": counts["dataverse"]["requests"],
            "entra_tokens": counts["entra"]["tokens_issued"]}  # fmt: skip


def _decide(admin: FakeAdmin, decisions: list[dict]) -> tuple[int, list[dict], int]:
    """The decisions applied, those that failed, and the sellers' writes of leads they made."""
    if not decisions:
        return 0, [], 0
    before = _lead_writes(admin)
    answer = admin.decide(decisions)
    return answer["applied"], answer["errors"], _lead_writes(admin) - before


def _lead_writes(admin: FakeAdmin) -> int:
    return admin.counts()["dataverse"]["writes"].get("leads", 0)


def _leads(endpoints: Endpoints, cast: Cast) -> list[dict]:
    seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
    try:
        return seller.rows("leads", {"$select": "leadid,msdyn_prospectid,_msdyn_company_value,statecode"})
    finally:
        seller.close()


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
    events = args.scheduling == "events"
    out = OUT_OF[args.scheduling]
    legal_entities = [part.strip() for part in args.legal_entities.split(",") if part.strip()]
    rng = random.Random(args.seed)
    _fresh(out)
    cast = Cast.new()
    rows, plan, bad = chaos_prospects(args.n, tuple(legal_entities))
    can_fault = hasattr(FakeAdmin, "add_fault") and not args.no_faults
    faults = fault_mix(args.timeout_s, args.fault_scale) if can_fault else []
    flags = {"fault_seed": args.seed} if can_fault else {}

    with running_fakes(out / "fakes", cast.clients, **flags) as endpoints, FakeAdmin(endpoints) as admin:
        connections = _connections(endpoints, cast, legal_entities, args.timeout_s, out / "state.db")
        # One deployment: one Fernet key for every home (they share the state store, whose token caches it
        # encrypts), and the scheduling its DAG files are parsed with.
        fernet_key = Fernet.generate_key().decode()
        variables = {**connections, "AIRFLOW__CORE__FERNET_KEY": fernet_key,
                     "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING": args.scheduling}  # fmt: skip
        homes = {name: Home(name, variables, out) for name in HOMES}
        print(f"Airflow homes {', '.join(HOMES)} (own SQLite metadata DB each; one state store, one set of fakes); "
              f"scheduling: {args.scheduling}")  # fmt: skip
        with ThreadPoolExecutor(len(homes)) as pool:
            list(pool.map(Home.setup, homes.values()))
        admin.reset()
        for start in range(0, len(rows), SEED_BATCH):
            admin.seed_prospects(rows[start : start + SEED_BATCH])
        print(f"Seeded {len(rows)} prospects over {', '.join(legal_entities)}: {len(bad)} bad, "
              f"{len(HOSTILE)} with hostile ids and names; plan: "
              + ", ".join(f"{n} {decision}" for decision, n in sorted(Counter(plan.values()).items())))  # fmt: skip

        conductor = Conductor(homes, admin, rng, args.max_failures, args.max_kills, args.run_timeout_s, out)
        watchers = Watchers(connections, out / "state.db", legal_entities, fernet_key) if events else None

        def run_phase(title: str, jobs: list[Job], timed: list[tuple[float, str, Callable[[], None]]] = ()) -> bool:
            if watchers is not None:
                watchers.phase = title
            return conductor.run_phase(title, jobs, timed)

        for rule in faults:
            admin.add_fault(**rule)
        if faults:
            print(f"Faults on: {len(faults)} rules (seed {args.seed}); client timeout {args.timeout_s:g} s")
        else:
            print("Faults: OFF (" + ("--no-faults" if args.no_faults else "FakeAdmin.add_fault is missing") + ")")
        before_chaos = _requests(admin)
        if watchers is not None:
            watchers.start(out / "logs" / "watchers.log")
            print(f"Watchers on: the triggers' checks every {WATCH_INTERVAL_S:g} s, under the same faults "
                  f"[{(out / 'logs' / 'watchers.log').relative_to(ROOT)}]")  # fmt: skip

        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        backfill = [(hour - timedelta(days=days)).isoformat() for days in (3, 2, 1)]
        sync_ok = run_phase("Sync under chaos: main and overlap together, backfill of three dates", [
            Job("main", SYNC, kills_allowed=2, force_kill=True),
            Job("overlap", SYNC, kills_allowed=1),
            *(Job("backfill", SYNC, date, start_after_s=3.0, kills_allowed=1) for date in backfill),
        ])  # fmt: skip

        decisions = [{"msdyn_prospectid": f"{key[0]}:{key[1]}", "outcome": decision}
                     for key, decision in sorted(plan.items()) if decision in DECIDED]  # fmt: skip
        applied, errors, seller_lead_writes = _decide(admin, decisions)
        deferred = [decisions[error["index"]] for error in errors]
        print(f"\nSellers decided {applied} leads" + (f"; {len(deferred)} not yet possible (e.g. "
              f"{errors[0]['msdyn_prospectid']}: {errors[0]['error']})" if errors else ""))  # fmt: skip

        tokens_at_revocation: list[int] = []

        def revoke_tokens() -> None:
            admin.revoke_tokens()
            tokens_at_revocation.append(_requests(admin)["entra_tokens"])

        revoke = [(rng.uniform(10, 20), "revoked every token issued so far", revoke_tokens)] if faults else []
        # Event-driven, the sellers' outcomes start the light DAG; time-driven, the reconciliation reads them.
        outcome_dag = OUTCOMES_DAG if events else RECONCILE
        reconcile_ok = run_phase(("Outcomes under chaos: b2b_outcomes" if events else "Reconciliation under chaos")
                                 + ": main and overlap together", [
            Job("main", outcome_dag, kills_allowed=2, force_kill=True),
            Job("overlap", outcome_dag, start_after_s=round(rng.uniform(0, 2), 1), kills_allowed=1),
        ], revoke)  # fmt: skip
        if watchers is not None:
            # Checks that no DAG run overlaps: whatever changes in the store during one, the watchers did.
            watchers.phase = "watchers alone, faults on"
            done = watchers.wait_for(IDLE_CHECKS + 1, timeout_s=120)
            print(f"\nWatchers alone under faults, no DAG run running: {done} checks")
            chaos_checks = len(watchers.checks)

        fault_report = admin.faults() if can_fault else {"rules": [], "served": {}}
        tokens_after_revocation = (_requests(admin)["entra_tokens"] - tokens_at_revocation[0]) if tokens_at_revocation else None
        during_chaos = {name: value - before_chaos[name] for name, value in _requests(admin).items()}
        if can_fault:
            admin.clear_faults()
        if events:
            lead_writes_before, leads_before = _lead_writes(admin), len(_leads(endpoints, cast))
        sync_final = run_phase("Faults off: a clean sync", [Job("main", SYNC)])
        late_applied, late_errors, late_seller_lead_writes = _decide(admin, deferred)
        seller_lead_writes += late_seller_lead_writes
        if deferred:
            print(f"\nSellers decided the {late_applied} leads that were missing before"
                  + (f"; {len(late_errors)} still failed: {late_errors[:3]}" if late_errors else ""))  # fmt: skip
        finals_ok = [sync_final, run_phase(f"Faults off: a clean {'b2b_outcomes' if events else 'reconciliation'}",
                                           [Job("main", outcome_dag)])]  # fmt: skip
        final_check = None
        if watchers is not None:
            finals_ok += [
                run_phase("Faults off: the nightly reconciliation, the safety net", [Job("main", RECONCILE)]),
                run_phase("Faults off: one more sync (the approvals changed the Pending set)", [Job("main", SYNC)]),
            ]
            watchers.stop()
            watchers.phase = "final, faults off"
            final_check = watchers.check()
            print(f"\nWatchers at the end: HQ {_reported(final_check.hq)}, Sales {_reported(final_check.sales)}"
                  + "".join(f"; {error['watcher']}: {error['message']}" for error in final_check.errors))  # fmt: skip
        requests = _requests(admin)
        lead_writes_end = _lead_writes(admin)

        clerk = Clerk(endpoints, cast.clerk["client_id"], cast.clerk["client_secret"])
        try:
            hq_prospects = clerk.all("Prospects")
            customers = clerk.all("CustomersV3")
        finally:
            clerk.close()
        leads = _leads(endpoints, cast)
        outbox = admin.outbox()
    store_rows = _store_rows(out / "state.db")

    checks = check_invariants(plan, bad, hq_prospects, leads, outbox, store_rows, customers)
    lead_figures = None
    if watchers is not None:
        run_ids = set().union(*(home.run_ids() for home in homes.values()))
        seen = [links for check in [*watchers.checks, final_check] for links in (check.links_before, check.links_after)]
        lead_figures = {
            "flow_writes": lead_writes_end - seller_lead_writes, "leads": len(leads),
            "repeats": lead_writes_end - seller_lead_writes - len(leads), "seller_writes": seller_lead_writes,
            "clean_phase_writes": lead_writes_end - lead_writes_before - late_seller_lead_writes,
            "clean_phase_leads_created": len(leads) - leads_before,
        }  # fmt: skip
        checks += [
            check_links_stored_by_dag_runs([*seen, stored_links(out / "state.db")], run_ids),
            check_watchers_moved_nothing([*watchers.checks, final_check], conductor.spans),
            check_watchers_noticed_then_quiet(watchers.checks[:chaos_checks], final_check),
            check_no_lead_written_again(lead_figures["clean_phase_writes"], lead_figures["clean_phase_leads_created"],
                                        len(leads)),
        ]
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
        ("every DAG run done (none given up)", sync_ok and reconcile_ok and all(finals_ok),
         ", ".join(given_up) or "all done"),
    ]  # fmt: skip
    results_path = (out / "results.json").relative_to(ROOT)

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
        print(f"  revocation    every token revoked once, mid-{OUTCOMES_DAG if events else 'reconciliation'}; "
              f"{tokens_after_revocation} tokens issued after it while faults were on")  # fmt: skip
    print(f"  kills         {conductor.kills}")
    print(f"  runs          {len(conductor.runs)} started: " + ", ".join(f"{n} {outcome}" for outcome, n in
                                                                      sorted(outcomes.items())))  # fmt: skip
    if watchers is not None:
        watched = watch_figures(watchers.checks)
        print(f"  watchers      {watched['checks']} checks: HQ reported changes in {watched['hq_reported_changes']}, "
              f"Sales in {watched['sales_reported_changes']}; {watched['failed']} failed under faults ("
              + (", ".join(f"{kind}: {n}" for kind, n in watched["errors"].items()) or "none") + ")")  # fmt: skip
        print(f"  lead writes   the flow wrote leads {lead_figures['flow_writes']} times for {len(leads)} leads "
              f"({lead_figures['repeats']} repeated after an answer lost or a run killed); in the clean phase "
              f"{lead_figures['clean_phase_writes']} for {lead_figures['clean_phase_leads_created']} "
              "new leads")  # fmt: skip
    print(f"  wall time     {wall} s")
    print("\nInvariants")
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"  {check.result}  {check.name:<{width}}  {check.checked} checked, {len(check.violations)} violations")
        for violation in check.violations[:8]:
            print(f"          {violation}")
        if len(check.violations) > 8:
            print(f"          ... and {len(check.violations) - 8} more ({results_path})")
    print("\nChaos conditions")
    for name, ok, detail in conditions:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")

    ok = all(check.ok for check in checks) and all(ok for _, ok, _ in conditions)
    results = {
        "ok": ok, "seed": args.seed, "n": len(rows), "legal_entities": legal_entities, "scheduling": args.scheduling,
        "wall_s": wall, "requests": requests, "requests_during_chaos": during_chaos,
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
    if watchers is not None:
        results["watchers"] = {**watched, "final": _check_record(final_check, began),
                               "checks": [_check_record(check, began) for check in watchers.checks]}  # fmt: skip
        results["lead_writes"] = lead_figures
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"\n{'PASSED' if ok else 'FAILED'} (written to {results_path})")
    return 0 if ok else 1


def _reported(changes: list[str] | None) -> str:
    return "failed" if changes is None else ", ".join(changes) or "quiet"


def _check_record(check: WatchCheck, began: float) -> dict:
    """A watcher check for results.json: when (seconds since the harness began), what each reported, its errors."""
    return {"phase": check.phase, "at_s": round(check.started - began, 1),
            "took_s": round(check.ended - check.started, 2), "hq": check.hq, "sales": check.sales,
            "errors": check.errors}  # fmt: skip


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
