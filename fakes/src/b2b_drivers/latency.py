"""`make latency` (not part of `make test`): how soon the product reacts, and what it costs at rest, with
event-driven scheduling and with the time-based schedules, side by side in one run.

Two deployments that share nothing, each a real Airflow (api-server, scheduler, dag-processor, triggerer,
LocalExecutor, SQLite) with its own fakes (20 ms latency), AIRFLOW_HOME, state store and connections:
"events" (`[d365_b2b_onboarding] scheduling = events`, triggers polling every `--poll-interval-s`) and
"time" (`scheduling = time`, the shipped crons). One script drawn from `--seed` plays on both: a backlog
seeded before the DAGs are unpaused (so sellers have leads to decide on in both from the start; not
measured), then prospects arriving at random moments for `--duration-s`, and sellers deciding at random
moments (won, lost, disqualified) on the oldest undecided lead each deployment has (none: that
deployment skips the decision). Measured from the systems, never from Airflow:

- prospect → lead: the lead's `createdon` (whole seconds, so its middle, kept between the seeding and
  the poll that first saw the lead; the harness reads the leads as a seller every second) minus the
  moment the prospect was seeded;
- decision → email: the email's `sent_at` in the fakes' outbox minus the moment the decision was applied;
- idle: requests per minute to each system (and Entra tokens issued) over `--idle-s` with no arrivals
  and no decisions, from the fakes' `/_admin/counts`; the harness makes no request to the systems then
  (its seeding, decisions and outbox reads go through the admin surface, which is never counted). For the
  time-based side, also the rate over a full cron period: one run of each cron DAG, triggered on the idle
  world and counted, added to the window's rate without its scheduled runs.

After the window, a drain waits until every arrived prospect has a lead and every decision an email in
both deployments (`--drain-timeout-s`); what is still missing is censored: counted at its wait so far, a
lower bound. Prints a side-by-side table with the targets (reported, not asserted) and writes
`.latency/results.json`; the processes' logs stay in `.latency/<events|time>/`. Exits 0 when the run
completed, 1 when the harness failed (a process died, nothing measured), with the logs' tails.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from b2b_drivers.airflow_processes import (
    LEGAL_ENTITIES,
    ROOT,
    STARTUP_TIMEOUT_S,
    AirflowFailed,
    AirflowProcesses,
    admin_password,
    environment,
    free_port,
)
from b2b_drivers.chaos import key_of, lead_key
from d365_fakes.actors import Seller
from d365_fakes.running import Endpoints, FakeAdmin, FakesFailedToStart, running_fakes
from d365_fakes.scenario import OUTCOMES, Cast, airflow_connections

Key = tuple[str, str]  # (legal entity, prospect id)
MODES = ("events", "time")
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")  # started in this order
DAGS = ("b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation")  # unpaused in both deployments
CRON_DAGS = ("b2b_prospect_sync", "b2b_outcomes")  # what the time-based side runs on its crons
WATCHED_ASSETS = ("b2b_pending_prospects", "b2b_seller_outcomes")  # what the events side's triggers watch
SYSTEMS = ("commerce", "dataverse")
OUTCOME_WEIGHTS = {"won": 0.4, "lost": 0.3, "disqualified": 0.3}
TARGETS = {"p95_prospect_to_lead_s": 60.0, "p95_decision_to_email_s": 120.0, "idle_requests_per_min": 4.0}
LEAD_COLUMNS = "leadid,msdyn_prospectid,_msdyn_company_value,createdon"
TICK_S = 1.0  # how often the harness acts and looks
PROGRESS_EVERY_S = 30.0
SETTLE_TIMEOUT_S = 300.0  # for the runs still active after the drain, before the idle window
RUN_TIMEOUT_S = 600.0


class HarnessFailed(RuntimeError):
    pass


# --- the script ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at_s: float  # after the window opens
    row: dict  # the Prospects row seeded

    @property
    def key(self) -> Key:
        return key_of(self.row["dataAreaId"], self.row["ProspectId"])


@dataclass(frozen=True)
class Decision:
    at_s: float
    outcome: str  # won | lost | disqualified


@dataclass(frozen=True)
class Script:
    """What happens, the same in both deployments: drawn from a seed, so a run can be repeated."""

    backlog: tuple[dict, ...]  # seeded before the DAGs are unpaused
    arrivals: tuple[Arrival, ...]
    decisions: tuple[Decision, ...]

    @classmethod
    def draw(cls, seed: int, duration_s: float, arrivals_per_min: float, decisions_per_min: float,
             backlog: int, legal_entities: Sequence[str] = tuple(LEGAL_ENTITIES)) -> Script:  # fmt: skip
        """Poisson arrivals and decisions (exponential gaps at the given rates) over `duration_s`."""
        rng = random.Random(seed)
        numbers = iter(range(1, 1_000_000))

        def row() -> dict:
            return prospect_row(next(numbers), rng.choice(legal_entities))

        def moments(per_min: float) -> list[float]:
            found, at = [], 0.0
            while per_min > 0 and (at := at + rng.expovariate(per_min / 60)) < duration_s:
                found.append(round(at, 3))
            return found

        backlog_rows = tuple(row() for _ in range(backlog))
        arrivals = tuple(Arrival(at, row()) for at in moments(arrivals_per_min))
        outcomes, weights = list(OUTCOME_WEIGHTS), list(OUTCOME_WEIGHTS.values())
        decisions = tuple(Decision(at, rng.choices(outcomes, weights)[0]) for at in moments(decisions_per_min))
        return cls(backlog_rows, arrivals, decisions)


def prospect_row(number: int, legal_entity: str) -> dict:
    """A valid Pending B2B prospect; ids are unique across legal entities, so a lead's prospect id names it."""
    return {
        "dataAreaId": legal_entity, "ProspectId": f"P-{number:06d}", "ProspectName": f"Partner {number}",
        "CompanyName": f"Latency Trading {number}", "PrimaryEmailAddress": f"partner{number:06d}@example.com",
        "PrimaryPhoneNumber": f"+1 555 {number:06d}", "AddressStreet": f"{number} Harbour Road",
        "AddressCity": "Seattle", "AddressZipCode": "98052", "AddressCountryRegionISOCode": "USA",
        "CurrencyCode": "USD", "LanguageId": "en-us", "Note": "Requested on the B2B site",
        "RetailChannelOperatingUnitPartyNumber": "000000123",
    }  # fmt: skip


# --- figures -----------------------------------------------------------------------------------------


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """n, p50, p95 and max (nearest rank: the smallest value with at least that share of values at or
    below it), in seconds to 0.1; None each without values."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p95": None, "max": None}

    def rank(share: float) -> float:
        return round(ordered[max(math.ceil(share * len(ordered)), 1) - 1], 1)

    return {"n": len(ordered), "p50": rank(0.50), "p95": rank(0.95), "max": round(ordered[-1], 1)}


def per_min(requests: Mapping[str, int], seconds: float) -> dict[str, float]:
    return {system: round(count * 60 / seconds, 2) for system, count in requests.items()}


def count_delta(before: Mapping, after: Mapping) -> dict[str, int]:
    """Requests per system and Entra tokens issued between two `/_admin/counts` answers."""
    delta = {system: after[system]["requests"] - before[system]["requests"] for system in SYSTEMS}
    return delta | {"entra_tokens": after["entra"]["tokens_issued"] - before["entra"]["tokens_issued"]}


def cron_period_rate(window: Mapping[str, int], window_s: float, scheduled_in_window: Mapping[str, int],
                     run_cost: Mapping[str, Mapping[str, int]], period_min: float) -> dict[str, float]:  # fmt: skip
    """Requests per minute over a full cron period: the idle window's rate without its scheduled runs (each
    taken at its DAG's measured `run_cost`), plus one run of each DAG per period."""
    rates = {}
    for system in window:
        runs = sum(count * run_cost[dag_id][system] for dag_id, count in scheduled_in_window.items())
        baseline = max(window[system] - runs, 0) * 60 / window_s
        rates[system] = round(baseline + sum(cost[system] for cost in run_cost.values()) / period_min, 2)
    return rates


def cron_minutes(summary: str | None) -> float | None:
    """The period of a `*/N * * * *` cron (as the REST API's `timetable_summary` shows it), else None."""
    found = re.fullmatch(r"\*/(\d+) \* \* \* \*", (summary or "").strip())
    return float(found[1]) if found else None


def verdict(value: float | None, target: float) -> str:
    return "n/a" if value is None else "PASS" if value <= target else "FAIL"


def build_results(settings: Mapping[str, Any], sides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """results.json: the headline keys for the events deployment, the same keys under `time_based`, the
    verdicts, and every figure of both deployments (`deployments`)."""

    def headline(side: Mapping[str, Any]) -> dict[str, Any]:
        idle = side["idle"]["requests_per_min"]
        return {
            "p95_prospect_to_lead_s": side["prospect_to_lead_s"]["p95"],
            "p95_decision_to_email_s": side["decision_to_email_s"]["p95"],
            "idle_requests_per_min": {system: idle[system] for system in SYSTEMS},
            "idle_tokens_per_min": idle["entra_tokens"],
        }

    def verdicts(figures: Mapping[str, Any]) -> dict[str, str]:
        return {
            "p95_prospect_to_lead_s": verdict(figures["p95_prospect_to_lead_s"], TARGETS["p95_prospect_to_lead_s"]),
            "p95_decision_to_email_s": verdict(figures["p95_decision_to_email_s"],
                                               TARGETS["p95_decision_to_email_s"]),
            **{f"idle_requests_per_min.{system}": verdict(figures["idle_requests_per_min"][system],
                                                          TARGETS["idle_requests_per_min"]) for system in SYSTEMS},
        }  # fmt: skip

    events, time_based = headline(sides["events"]), headline(sides["time"])
    cron = sides["time"].get("cron_period") or {}
    time_based |= {"idle_requests_per_min_over_cron_period": cron.get("requests_per_min"),
                   "cron_period_min": cron.get("period_min")}  # fmt: skip
    return {
        **events,
        "time_based": time_based,
        "targets": TARGETS,
        "verdicts": {"events": verdicts(events), "time": verdicts(time_based)},
        "settings": dict(settings),
        "deployments": {mode: dict(side) for mode, side in sides.items()},
    }


def table(results: Mapping[str, Any]) -> str:
    """The side-by-side table of results.json: events vs time, with the targets and verdicts."""
    sides = results["deployments"]
    verdicts = results["verdicts"]
    rows: list[tuple[str, str, str, str]] = []

    def row(label: str, cell: Any, target: str = "") -> None:
        rows.append((label, cell(sides["events"], "events"), cell(sides["time"], "time"), target))

    def latency(name: str, key: str, target: float) -> None:
        def figures(side: Mapping, mode: str) -> str:
            found = side[name]
            if not found["n"]:
                return "none"
            return f"{found['p50']} / {found['p95']} / {found['max']}  {verdicts[mode][key]}"

        row(f"{label_of[name]} p50/p95/max s", figures, f"p95 <= {target:g} s")
        row("  measured, censored", lambda side, _: f"{side[name]['n'] - side[name]['censored']}, "
            f"{side[name]['censored']}")  # fmt: skip

    label_of = {"prospect_to_lead_s": "prospect -> lead", "decision_to_email_s": "decision -> email"}
    latency("prospect_to_lead_s", "p95_prospect_to_lead_s", TARGETS["p95_prospect_to_lead_s"])
    latency("decision_to_email_s", "p95_decision_to_email_s", TARGETS["p95_decision_to_email_s"])
    row("prospects arrived (+ backlog)", lambda side, _: f"{side['arrived']} (+{side['backlog']})")
    row("decisions applied, skipped", lambda side, _: f"{side['decisions']['applied']}, "
        f"{side['decisions']['skipped_no_lead']}")  # fmt: skip
    row("  won / lost / disqualified", lambda side, _: " / ".join(
        str(side["decisions"]["by_outcome"].get(outcome, 0)) for outcome in OUTCOME_WEIGHTS))  # fmt: skip
    row("emails wrong or unasked", lambda side, _: str(side["emails_unexpected"]))
    for system in SYSTEMS:
        row(f"idle req/min {system}", lambda side, mode, system=system: f"{side['idle']['requests_per_min'][system]}"
            f"  {verdicts[mode][f'idle_requests_per_min.{system}']}", f"<= {TARGETS['idle_requests_per_min']:g}")
    row("idle Entra tokens/min", lambda side, _: str(side["idle"]["requests_per_min"]["entra_tokens"]))
    row("idle window s, runs started", lambda side, _: f"{side['idle']['window_s']:g}, "
        f"{sum(side['idle']['runs_started'].values())}")  # fmt: skip
    cron = sides["time"].get("cron_period")
    if cron:
        for system in SYSTEMS:
            rate = cron["requests_per_min"][system]
            rows.append((f"idle req/min over a {cron['period_min']:g}-min cron period {system}", "-",
                         f"{rate}  {verdict(rate, TARGETS['idle_requests_per_min'])}",
                         f"<= {TARGETS['idle_requests_per_min']:g}"))
    row("product requests window+drain c / d", lambda side, _: f"{side['active_requests']['commerce']} / "
        f"{side['active_requests']['dataverse']}")  # fmt: skip
    for dag_id in DAGS:
        row(f"runs started {dag_id}", lambda side, _, dag_id=dag_id: _run_types(side["runs_started"].get(dag_id, {})))
    row("failed task instances", lambda side, _: str(side["failed_tasks"]))
    width = [max(len(cells[column]) for cells in rows) for column in range(3)]
    header = ("", "events", "time", "target")
    lines = [header, *rows]
    return "\n".join(f"{a:<{width[0]}}  {b:<{max(width[1], 6)}}  {c:<{max(width[2], 4)}}  {d}".rstrip()
                     for a, b, c, d in lines)  # fmt: skip


def _run_types(by_type: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {run_type}" for run_type, count in sorted(by_type.items())) or "0"


# --- one deployment ----------------------------------------------------------------------------------


class Observer(Seller):
    """A seller reading the leads, counting the requests it makes (they are not the product's)."""

    requests = 0

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.requests += 1
        return super().call(method, path, **kwargs)


@dataclass
class Side:
    """One deployment: its fakes, its Airflow, and what the harness saw happen in it."""

    mode: str
    endpoints: Endpoints
    airflow: AirflowProcesses
    admin: FakeAdmin
    observer: Observer
    seeded: dict[Key, float] = field(default_factory=dict)  # by arrival order
    backlog: set[Key] = field(default_factory=set)
    leads: dict[Key, float] = field(default_factory=dict)  # when each was created
    decided: dict[Key, tuple[str, float]] = field(default_factory=dict)  # outcome, when applied
    emails: dict[Key, tuple[str, float]] = field(default_factory=dict)  # first email: template, sent_at
    extra_emails: int = 0  # a second email, a wrong template, or one for a prospect nobody decided
    skipped: int = 0
    decision_errors: list[str] = field(default_factory=list)

    def seed(self, rows: Sequence[dict], backlog: bool = False) -> None:
        self.admin.seed_prospects(list(rows))
        now = time.time()
        for prospect in rows:
            key = key_of(prospect["dataAreaId"], prospect["ProspectId"])
            self.seeded[key] = now
            if backlog:
                self.backlog.add(key)

    def decide(self, outcome: str) -> None:
        """The seller decides on the oldest lead nobody decided yet; none here: skipped."""
        key = next((key for key in self.seeded if key in self.leads and key not in self.decided), None)
        if key is None:
            self.skipped += 1
            return
        answer = self.admin.decide([{"msdyn_prospectid": key[1], "company": key[0], "outcome": outcome}])
        if answer["errors"]:
            self.decision_errors.append(f"{key}: {answer['errors'][0]}")
            return
        self.decided[key] = (outcome, time.time())

    def observe(self, final: bool = False) -> None:
        """New leads (as a seller sees them) and new emails (the outbox), when any is awaited (`final`: emails
        anyway, to find those nobody asked for)."""
        if any(key not in self.leads for key in self.seeded):
            seen = time.time()
            for lead in self.observer.rows("leads", {"$select": LEAD_COLUMNS}):
                key = lead_key(lead, LEGAL_ENTITIES)
                if key in self.seeded and key not in self.leads:
                    created = _epoch(lead["createdon"]) + 0.5  # createdon has whole seconds: its middle
                    self.leads[key] = min(max(created, self.seeded[key]), seen)
        if final or any(key not in self.emails for key in self.decided):
            self.emails, self.extra_emails = {}, 0
            for mail in sorted(self.admin.outbox(), key=lambda mail: mail["sent_at"]):
                key = key_of(mail["dataAreaId"], mail["ProspectId"])
                expected = OUTCOMES[self.decided[key][0]][1] if key in self.decided else None
                if key in self.emails or mail["template"] != expected:
                    self.extra_emails += 1
                else:
                    self.emails[key] = (mail["template"], _epoch(mail["sent_at"]))

    def unfinished(self) -> int:
        return sum(key not in self.leads for key in self.seeded) + sum(key not in self.emails for key in self.decided)

    def progress(self) -> str:
        return (f"{self.mode}: leads {len(self.leads)}/{len(self.seeded)}, "
                f"emails {sum(key in self.emails for key in self.decided)}/{len(self.decided)}")  # fmt: skip

    def latencies(self, now: float) -> dict[str, dict[str, Any]]:
        """Both latencies; what is still missing at `now` counts at its wait so far (a lower bound)."""
        measured = [key for key in self.seeded if key not in self.backlog]
        leads = [self.leads.get(key, now) - self.seeded[key] for key in measured]
        emails = [self.emails[key][1] - at if key in self.emails else now - at for key, (_, at) in self.decided.items()]
        return {
            "prospect_to_lead_s": percentiles(leads) | {"censored": sum(key not in self.leads for key in measured)},
            "decision_to_email_s": percentiles(emails) | {
                "censored": sum(key not in self.emails for key in self.decided)},
        }  # fmt: skip

    def counts(self) -> dict:
        return self.admin.counts()

    def check_alive(self) -> None:
        self.airflow.check_alive()

    def active_runs(self) -> int:
        return sum(self.airflow.api("GET", f"/dags/{dag_id}/dagRuns", params={"state": state, "limit": 1})
                   ["total_entries"] for dag_id in DAGS for state in ("queued", "running"))  # fmt: skip

    def runs(self, dag_id: str) -> list[dict]:
        found: list[dict] = []
        while True:
            page = self.airflow.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "offset": len(found),
                                                                               "order_by": "id"})  # fmt: skip
            found += page["dag_runs"]
            if not page["dag_runs"] or len(found) >= page["total_entries"]:
                return found

    def runs_started(self, since: float, until: float) -> dict[str, Counter]:
        """Runs of each DAG that started in [since, until), by run type."""
        return {dag_id: Counter(run["run_type"] for run in self.runs(dag_id)
                                if run["start_date"] and since <= _epoch(run["start_date"]) < until)
                for dag_id in DAGS}  # fmt: skip

    def failed_tasks(self) -> int:
        found = self.airflow.api("GET", "/dags/~/dagRuns/~/taskInstances",
                                 params={"state": ["failed", "up_for_retry"], "limit": 1})  # fmt: skip
        return found["total_entries"]

    def run_once(self, dag_id: str) -> None:
        """A manual run, waited for; fails the harness unless it succeeds."""
        run_id = self.airflow.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})[
            "dag_run_id"]  # fmt: skip
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (state := self.airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) not in (
                "success", "failed"):  # fmt: skip
            if time.monotonic() > deadline:
                raise HarnessFailed(f"{self.mode}: {dag_id} {run_id} still {state} after {RUN_TIMEOUT_S:g} s")
            self.check_alive()
            time.sleep(TICK_S)
        if state != "success":
            raise HarnessFailed(f"{self.mode}: {dag_id} {run_id} ended {state}\n{self.airflow.log_tails()}")


def _epoch(iso: str) -> float:
    moment = datetime.fromisoformat(iso)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def start_side(stack: ExitStack, directory: Path, mode: str, args: argparse.Namespace) -> Side:
    """The deployment's fakes and metadata database (migrated, pools imported); its processes start later."""
    shutil.rmtree(directory, ignore_errors=True)
    home = directory / "airflow"
    home.mkdir(parents=True)
    cast = Cast.new()
    endpoints = stack.enter_context(running_fakes(directory / "fakes", cast.clients, latency_ms=args.latency_ms))
    connections = airflow_connections(endpoints, cast, LEGAL_ENTITIES, directory / "state.db")
    port = free_port()
    env = environment(home, port, connections) | {
        "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING": mode,
        "AIRFLOW__D365_B2B_ONBOARDING__POLL_INTERVAL_S": str(args.poll_interval_s),
        # Tasks and triggers share the token cache, encrypted with this key: one for every process.
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        # Two deployments on a 2-core machine: few task processes at once, one parser, and DAG files
        # (which do not change during the run) parsed every 5 minutes rather than every 30 s.
        "AIRFLOW__CORE__PARALLELISM": str(args.parallelism),
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "600",
    }  # fmt: skip
    airflow = AirflowProcesses(home, env, f"http://127.0.0.1:{port}", admin_password(home))
    stack.callback(airflow.stop_all)
    admin = stack.enter_context(FakeAdmin(endpoints))
    observer = Observer(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
    stack.callback(observer.close)
    print(f"[{mode}] migrating Airflow's metadata database, importing the pools", flush=True)
    airflow.set_up_database({})
    return Side(mode, endpoints, airflow, admin, observer)


def wait_parsed(side: Side) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not set(DAGS) <= (parsed := {dag["dag_id"] for dag in side.airflow.api("GET", "/dags", params={
            "limit": 100})["dags"]}):  # fmt: skip
        side.check_alive()
        if time.monotonic() > deadline:
            raise HarnessFailed(f"{side.mode}: DAGs not parsed after {STARTUP_TIMEOUT_S} s: found {sorted(parsed)}, "
                                f"missing {sorted(set(DAGS) - parsed)}\n{side.airflow.log_tails()}")  # fmt: skip
        time.sleep(TICK_S)


def unpause(side: Side) -> None:
    """Unpauses the DAGs and has their files parsed again at once: Airflow registers an asset's watchers
    (starts its triggers) only when it parses the file of an unpaused DAG scheduled on it, so without this the
    events side would not watch until the next parse (`[dag_processor] min_file_process_interval` later)."""
    for dag_id in DAGS:
        dag = side.airflow.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        side.airflow.api("PUT", f"/parseDagFile/{dag['file_token']}")
    if side.mode != "events":
        return
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not all((watching := {asset["name"]: bool(asset["watchers"]) for asset in side.airflow.api(
            "GET", "/assets", params={"limit": 100})["assets"]}).get(name) for name in WATCHED_ASSETS):  # fmt: skip
        side.check_alive()
        if time.monotonic() > deadline:
            raise HarnessFailed(f"{side.mode}: no watcher on the assets after {STARTUP_TIMEOUT_S} s: {watching}\n"
                                f"{side.airflow.log_tails()}")  # fmt: skip
        time.sleep(TICK_S)


def wait_until(sides: Sequence[Side], done: Any, timeout: float, what: str, fail: bool = True) -> bool:
    """Until `done(side)` holds for every side (observing them meanwhile); False (or HarnessFailed) after `timeout`."""
    deadline = time.monotonic() + timeout
    last_progress = time.monotonic()
    while not all(done(side) for side in sides):
        if time.monotonic() > deadline:
            if fail:
                raise HarnessFailed(f"{what}: not after {timeout:g} s; " + "; ".join(side.progress() for side in sides))
            return False
        for side in sides:
            side.check_alive()
            side.observe()
        if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
            print(f"  {what}: " + " | ".join(side.progress() for side in sides), flush=True)
            last_progress = time.monotonic()
        time.sleep(TICK_S)
    return True


def play(sides: Sequence[Side], script: Script, duration_s: float) -> None:
    """The window: arrivals and decisions at their moments, in every deployment, observed every second."""
    arrivals, decisions = list(script.arrivals), list(script.decisions)
    opened = time.monotonic()
    last_progress = opened
    while (elapsed := time.monotonic() - opened) < duration_s or arrivals or decisions:
        due = [arrival for arrival in arrivals if arrival.at_s <= elapsed]
        if due:
            arrivals = arrivals[len(due):]
            for side in sides:
                side.seed([arrival.row for arrival in due])
        while decisions and decisions[0].at_s <= elapsed:
            outcome = decisions.pop(0).outcome
            for side in sides:
                side.decide(outcome)
        for side in sides:
            side.check_alive()
            side.observe()
        if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
            print(f"  +{elapsed:.0f} s: " + " | ".join(side.progress() for side in sides), flush=True)
            last_progress = time.monotonic()
        time.sleep(max(TICK_S - (time.monotonic() - opened - elapsed), 0.05))


def idle_window(sides: Sequence[Side], idle_s: float) -> dict[str, dict[str, Any]]:
    """Nothing happens for `idle_s`: what each deployment asks of each system meanwhile."""
    before = {side.mode: side.counts() for side in sides}
    started = time.time()
    deadline = time.monotonic() + idle_s
    while time.monotonic() < deadline:
        for side in sides:
            side.check_alive()
        time.sleep(min(TICK_S, max(deadline - time.monotonic(), 0)))
    window_s = time.time() - started
    figures = {}
    for side in sides:
        requests = count_delta(before[side.mode], side.counts())
        runs = side.runs_started(started, started + window_s)
        figures[side.mode] = {
            "window_s": round(window_s, 1), "requests": requests, "requests_per_min": per_min(requests, window_s),
            "runs_started": {dag_id: sum(by_type.values()) for dag_id, by_type in runs.items()},
            "scheduled_runs_started": {dag_id: by_type.get("scheduled", 0) for dag_id, by_type in runs.items()},
        }  # fmt: skip
    return figures


def cron_period(side: Side, idle: Mapping[str, Any]) -> dict[str, Any] | None:
    """The time-based side's idle cost over a full cron period: one manual run of each cron DAG on the idle
    world, counted, then `cron_period_rate`."""
    periods = {cron_minutes(side.airflow.api("GET", f"/dags/{dag_id}")["timetable_summary"]) for dag_id in CRON_DAGS}
    if len(periods) != 1 or None in periods:
        print(f"  [{side.mode}] the cron DAGs do not share one */N schedule ({periods}): no cron-period figure")
        return None
    period_min = periods.pop()
    run_cost = {}
    for dag_id in CRON_DAGS:
        before = side.counts()
        side.run_once(dag_id)
        run_cost[dag_id] = count_delta(before, side.counts())
    window = {system: idle["requests"][system] for system in SYSTEMS}
    costs = {dag_id: {system: cost[system] for system in SYSTEMS} for dag_id, cost in run_cost.items()}
    scheduled = {dag_id: idle["scheduled_runs_started"].get(dag_id, 0) for dag_id in CRON_DAGS}
    rates = cron_period_rate(window, idle["window_s"], scheduled, costs, period_min)
    return {"period_min": period_min, "run_cost": run_cost, "requests_per_min": rates}


def summarize(side: Side, latencies: Mapping[str, Any], active: Mapping[str, int], idle: Mapping[str, Any],
              runs: Mapping[str, Counter]) -> dict[str, Any]:  # fmt: skip
    """Everything about one deployment; `latencies` as they stood when the drain ended."""
    side.observe(final=True)
    return {
        **latencies,
        "arrived": len(side.seeded) - len(side.backlog),
        "backlog": len(side.backlog),
        "leads": len(side.leads),
        "decisions": {"applied": len(side.decided), "skipped_no_lead": side.skipped,
                      "errors": side.decision_errors,
                      "by_outcome": dict(Counter(outcome for outcome, _ in side.decided.values()))},
        "emails": len(side.emails),
        "emails_unexpected": side.extra_emails,
        "active_requests": dict(active),
        "idle": dict(idle),
        "runs_started": {dag_id: dict(by_type) for dag_id, by_type in runs.items()},
        "failed_tasks": side.failed_tasks(),
        "harness_dataverse_requests": side.observer.requests,
    }  # fmt: skip


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m b2b_drivers.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600, help="arrivals and decisions (default 600)")
    parser.add_argument("--seed", type=int, default=1, help="of the script (default 1)")
    parser.add_argument("--poll-interval-s", type=int, default=30, help="the events side's triggers (default 30)")
    parser.add_argument("--arrivals-per-min", type=float, default=6, help="prospects (default 6)")
    parser.add_argument("--decisions-per-min", type=float, default=5, help="sellers' decisions (default 5)")
    parser.add_argument("--backlog", type=int, default=20, help="prospects seeded before unpausing (default 20)")
    parser.add_argument("--drain-timeout-s", type=float, default=1200, help="after the window (default 1200)")
    parser.add_argument("--idle-s", type=float, default=180, help="the quiet window (default 180)")
    parser.add_argument("--latency-ms", type=float, default=20, help="of every request to the fakes (default 20)")
    parser.add_argument("--parallelism", type=int, default=4, help="task processes per deployment (default 4)")
    parser.add_argument("--out", type=Path, default=ROOT / ".latency", help="results and logs (default .latency)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    out = args.out.resolve()
    script = Script.draw(args.seed, args.duration_s, args.arrivals_per_min, args.decisions_per_min, args.backlog)
    print(f"make latency: events (triggers every {args.poll_interval_s} s) vs time (the shipped crons), seed "
          f"{args.seed}: {len(script.arrivals)} prospects and {len(script.decisions)} decisions over "
          f"{args.duration_s:g} s, backlog {len(script.backlog)}, fakes' latency {args.latency_ms:g} ms", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # results and logs of this machine's run, never committed
    sides: list[Side] = []
    try:
        with ExitStack() as stack:
            sides = [start_side(stack, out / mode, mode, args) for mode in MODES]
            for side in sides:
                print(f"[{side.mode}] starting airflow {', '.join(SERVICES)} ({side.airflow.home})", flush=True)
                for name in SERVICES:
                    side.airflow.start_process(name)
            for side in sides:
                side.airflow.wait_until_ready()
                wait_parsed(side)
            for side in sides:
                side.seed(script.backlog, backlog=True)
            for side in sides:
                unpause(side)
            print(f"Unpaused {', '.join(DAGS)} (the events side watching); waiting for the backlog's leads in both "
                  "deployments", flush=True)
            wait_until(sides, lambda side: all(key in side.leads for key in side.backlog), args.drain_timeout_s,
                       "backlog")  # fmt: skip
            wait_until(sides, lambda side: side.active_runs() == 0, SETTLE_TIMEOUT_S, "runs of the start ended")
            before = {side.mode: side.counts() for side in sides}
            harness_before = {side.mode: side.observer.requests for side in sides}
            opened = time.time()
            print(f"Window open: {args.duration_s:g} s of arrivals and decisions", flush=True)
            play(sides, script, args.duration_s)
            print(f"Window closed; draining (at most {args.drain_timeout_s:g} s)", flush=True)
            drained = wait_until(sides, lambda side: side.unfinished() == 0, args.drain_timeout_s, "drain", fail=False)
            ended = time.time()
            latencies = {side.mode: side.latencies(ended) for side in sides}
            active = {}
            for side in sides:
                delta = count_delta(before[side.mode], side.counts())
                own = side.observer.requests - harness_before[side.mode]
                active[side.mode] = {"commerce": delta["commerce"], "dataverse": delta["dataverse"] - own}
            print("Drained." if drained else "Drain timed out: what is missing is censored.", flush=True)
            if not all(side.leads.keys() - side.backlog for side in sides):
                raise HarnessFailed("nothing measured: a deployment made no lead for any arrival; "
                                    + "; ".join(side.progress() for side in sides))  # fmt: skip
            wait_until(sides, lambda side: side.active_runs() == 0, SETTLE_TIMEOUT_S, "runs ended", fail=False)
            print(f"Idle window: {args.idle_s:g} s without arrivals or decisions", flush=True)
            idle = idle_window(sides, args.idle_s)
            runs = {side.mode: side.runs_started(opened, time.time()) for side in sides}
            time_side = next(side for side in sides if side.mode == "time")
            print("[time] one run of each cron DAG on the idle world, counted (cost over a cron period)", flush=True)
            cron = cron_period(time_side, idle["time"])
            summaries = {side.mode: summarize(side, latencies[side.mode], active[side.mode], idle[side.mode],
                                              runs[side.mode]) for side in sides}  # fmt: skip
            summaries["time"]["cron_period"] = cron
    except (AirflowFailed, FakesFailedToStart, HarnessFailed, RuntimeError, httpx.HTTPError) as error:
        print(f"make latency failed: {error}", file=sys.stderr)
        for side in sides:
            if isinstance(error, HarnessFailed):
                print(f"--- {side.mode} ---\n{side.airflow.log_tails()}", file=sys.stderr)
        return 1
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    results = build_results(settings | {"drained": drained, "arrivals": len(script.arrivals),
                                        "decisions_drawn": len(script.decisions)}, summaries)  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print("\nTargets are reported, not asserted. Censored: still missing after the drain, counted at their wait "
          f"so far. Results in {out / 'results.json'}, logs in {out}/<events|time>/.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
