"""The bodies of the DAGs' tasks: connections in, one step of the flow, a table logged, counts out.

Kept apart from the DAG files so that parsing a DAG imports none of this. Every result is a small
summary (counts, requests, resources); rows never travel through XCom.

The run's params (the Trigger form) shape every task: `dry_run` (plan every write, send none),
`legal_entities` (a subset of the connection's), `prospect_ids` (a targeted rerun of named
prospects), `chunk_size`, and in the reconciliation `sla_days`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

from airflow.sdk import get_current_context

from . import drift, reconcile, report, rules, sync
from .commerce import CommerceClient
from .dry_run import DryRunCommerce, DryRunSales, Plan
from .errors import ConfigurationError
from .hooks import CommerceHook, SalesHook, StateStoreHook
from .sales import SalesClient
from .settings import ServiceSettings
from .store import DryRunStore, StateStore

log = logging.getLogger(__name__)

# Prospects of work per mapped task unless the run's `chunk_size` param says otherwise.
DEFAULT_CHUNK_SIZE = 5000
# Days a prospect may wait undecided before `check_sla` fails, unless the run's `sla_days` says otherwise.
DEFAULT_SLA_DAYS = 3


@dataclass(frozen=True)
class RunOptions:
    """A run's params, checked."""

    dry_run: bool = False
    legal_entities: tuple[str, ...] = ()
    prospect_keys: frozenset[tuple[str, str]] | None = None  # None: every prospect
    chunk_size: int = DEFAULT_CHUNK_SIZE
    sla_days: float = DEFAULT_SLA_DAYS
    qualified_without_opportunity_days: float = reconcile.DEFAULT_QUALIFIED_WITHOUT_OPPORTUNITY_DAYS

    @classmethod
    def from_params(cls, params: Mapping) -> RunOptions:
        try:
            keys = rules.prospect_keys(params.get("prospect_ids") or ())
        except ValueError as error:
            raise ConfigurationError(f"DAG param prospect_ids: {error}. Next step: trigger the run again with the "
                                     "prospects named that way.") from None  # fmt: skip
        return cls(
            dry_run=bool(params.get("dry_run") or False),
            legal_entities=tuple(str(name).strip() for name in params.get("legal_entities") or () if str(name).strip()),
            prospect_keys=keys or None,
            chunk_size=int(params.get("chunk_size") or DEFAULT_CHUNK_SIZE),
            sla_days=float(DEFAULT_SLA_DAYS if params.get("sla_days") is None else params["sla_days"]),
            qualified_without_opportunity_days=float(
                reconcile.DEFAULT_QUALIFIED_WITHOUT_OPPORTUNITY_DAYS if params.get("qualified_without_opportunity_days")
                is None else params["qualified_without_opportunity_days"]),
        )  # fmt: skip

    def prospect_ids(self, legal_entity: str) -> set[str] | None:
        """The named prospects of one legal entity; None when the run is not targeted."""
        if self.prospect_keys is None:
            return None
        return {prospect_id for le, prospect_id in self.prospect_keys if le == legal_entity.lower()}


def choose_legal_entities(conn_id: str, configured: Iterable[str], options: RunOptions) -> list[str]:
    """The legal entities a run works on: the connection's, or the subset the run's params name;
    narrowed, in a targeted run, to those of the named prospects."""
    configured = list(configured)
    if not configured:
        raise ConfigurationError(
            f"Airflow connection {conn_id!r} names no legal entities. Next step: set its "
            'extra "legal_entities", e.g. ["usrt", "usmf"].'
        )
    by_name = {name.lower(): name for name in configured}
    chosen = [by_name.get(name.lower(), name) for name in options.legal_entities] or configured
    unknown = [name for name in chosen if name.lower() not in by_name]
    if unknown:
        raise ConfigurationError(
            f"DAG param legal_entities names {unknown}, which Airflow connection {conn_id!r} does not onboard "
            f"({configured}). Next step: trigger again with some of {configured}, or add the legal entity to "
            'the connection\'s extra "legal_entities".'
        )
    if options.prospect_keys is not None:
        named = sorted({legal_entity for legal_entity, _ in options.prospect_keys})
        outside = [name for name in named if name not in {name.lower() for name in chosen}]
        if outside:
            raise ConfigurationError(
                f"DAG param prospect_ids names prospects of {outside}, outside this run's legal entities "
                f"{chosen}. Next step: fix the prospect ids (<legal entity>/<prospect id>) or the param legal_entities."
            )
        chosen = [name for name in chosen if name.lower() in named]
    return chosen


def _context() -> Mapping:
    try:
        return get_current_context()
    except RuntimeError:  # called outside a task (a test, a shell): the params' defaults
        return {"params": {}, "run_id": "manual__outside_airflow"}


def _options() -> RunOptions:
    return RunOptions.from_params(_context()["params"])


def _run_id() -> str:
    return _context()["run_id"]


def _task_label() -> str:
    ti = _context().get("ti")
    if ti is None:
        return "outside_airflow"
    return ti.task_id + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) >= 0 else "")


def _store(options: RunOptions) -> StateStore:
    """The state store; in a dry run the store as the dry run sees it (reads its plan, writes none
    of the store's facts); in a targeted run scoped to the named prospects."""
    url = StateStoreHook().url()
    store = DryRunStore(url, _run_id()) if options.dry_run else StateStore(url)
    return store.scoped(options.prospect_keys)


@dataclass(frozen=True)
class _Step:
    """What every step task starts from: the run's params and id, the state store as this run sees
    it, and in a dry run the plan its clients fill instead of writing."""

    options: RunOptions
    run_id: str
    store: StateStore
    plan: Plan | None

    def commerce(self, legal_entity: str | None = None, settings: ServiceSettings | None = None) -> CommerceClient:
        """Commerce HQ; in a dry run, the client that plans its writes instead."""
        client = CommerceClient.connect(settings or CommerceHook().settings())
        return DryRunCommerce(client, self.plan, legal_entity) if self.plan is not None else client

    def sales(self, legal_entity: str | None = None) -> SalesClient:
        """Dataverse; in a dry run, the client that plans its writes instead."""
        client = SalesClient.connect(SalesHook().settings())
        return DryRunSales(client, self.plan, legal_entity) if self.plan is not None else client

    def measured(self, step: Callable[[], dict], *clients: CommerceClient | SalesClient) -> dict:
        """Runs the step with its clients open; adds what it sent to each system and what it cost,
        and in a dry run what it would have written; logs it all as one short table."""
        started_cpu = time.process_time()
        with ExitStack() as stack:
            for client in clients:
                stack.enter_context(client.odata)
            result = step()
        for client in clients:
            name = "commerce" if isinstance(client, CommerceClient) else "dataverse"
            result[f"{name}_requests"] = sum(client.odata.requests.values())
            result[f"{name}_throttled"] = client.odata.throttled
            result[f"{name}_retries"] = client.odata.retried
        if self.plan is not None:
            result["planned_writes"] = len(self.plan)
        result["cpu_s"] = round(time.process_time() - started_cpu, 2)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if self.plan is not None and isinstance(self.store, DryRunStore):
            planned = self.plan.frame()
            self.store.record_planned_writes(_task_label(), planned)
            log.info("DRY RUN: the writes this task would make (%d; none was sent)\n%s", len(planned),
                     report.plan_text(planned))  # fmt: skip
        log.info("%s %s: what this task did\n%s", result["step"], result["legal_entity"],
                 report.task_table(result).to_string())  # fmt: skip
        return result


def _step() -> _Step:
    options = _options()
    return _Step(options, _run_id(), _store(options), Plan() if options.dry_run else None)


def legal_entities() -> list[str]:
    settings = CommerceHook().settings()
    options = _options()
    chosen = choose_legal_entities(settings.conn_id, settings.legal_entities, options)
    if options.dry_run:
        _store(options).purge_dry_runs()
        log.info("DRY RUN: every step reads Commerce, Sales and the state store, and plans its writes "
                 "without sending them; the store's facts stay as they are")  # fmt: skip
    if options.prospect_keys is not None:
        log.info("Targeted run: %d named prospects: %s", len(options.prospect_keys),
                 ", ".join(f"{le}/{pid}" for le, pid in sorted(options.prospect_keys)))  # fmt: skip
    return chosen


def plan(step: str, entities: Iterable[str]) -> list[dict]:
    """The chunks of one step's work: prospect-id ranges per legal entity, `chunk_size` each."""
    options = _options()
    wanted = {name.lower() for name in entities}
    tracked = rules.only(_store(options).frame(columns=rules.RULE_COLUMNS), options.prospect_keys)
    work = rules.STEPS[step](tracked)
    work = work[work["legal_entity"].isin(wanted)]
    chunks = rules.chunks(work, options.chunk_size)
    log.info("%s: %d prospects of work in %d chunks of at most %d", step, len(work), len(chunks), options.chunk_size)
    return chunks


def pull_prospects(legal_entity: str) -> dict:
    step = _step()
    commerce, ids = step.commerce(legal_entity), step.options.prospect_ids(legal_entity)
    return step.measured(lambda: sync.pull_prospects(commerce, step.store, legal_entity, step.run_id, ids), commerce)


def push_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    sales = step.sales(legal_entity)
    return step.measured(
        lambda: sync.push_leads(sales, step.store, legal_entity, step.run_id, first_id, last_id), sales
    )


def correct_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    sales = step.sales(legal_entity)
    return step.measured(
        lambda: sync.correct_leads(sales, step.store, legal_entity, step.run_id, first_id, last_id), sales
    )


def read_outcomes() -> dict:
    step = _step()
    sales = step.sales()
    return step.measured(lambda: reconcile.read_outcomes(sales, step.store, step.run_id, step.options.prospect_keys,
                                                         step.options.qualified_without_opportunity_days),
                         sales)  # fmt: skip


def write_customers(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    settings = CommerceHook().settings()  # read once: the client and the customer group both need it
    commerce, sales = step.commerce(legal_entity, settings), step.sales(legal_entity)
    return step.measured(
        lambda: reconcile.write_customers(
            commerce, sales, step.store, legal_entity, step.run_id, settings.customer_group, first_id, last_id,
            settings.customer_account_template,
        ),
        commerce,
        sales,
    )


def approve_won(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    commerce = step.commerce(legal_entity)
    return step.measured(
        lambda: reconcile.approve_won(commerce, step.store, legal_entity, step.run_id, first_id, last_id), commerce
    )


def reject_lost(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    commerce = step.commerce(legal_entity)
    return step.measured(
        lambda: reconcile.reject_lost(commerce, step.store, legal_entity, step.run_id, first_id, last_id), commerce
    )


def check_drift(entities: Iterable[str]) -> dict:
    step = _step()
    commerce, sales, keys = step.commerce(), step.sales(), step.options.prospect_keys

    def check() -> dict:
        if keys is not None:
            summary, findings = reconcile.check_named_drift(commerce, sales, step.store, keys, step.run_id)
        else:
            summary, findings = drift.check_drift(commerce, sales, step.store, entities, step.run_id)
        if len(findings):
            log.warning("Drift between Commerce and Sales (first 50 of %d)\n%s", len(findings),
                        findings.head(50).to_string())  # fmt: skip
        return summary

    return step.measured(check, commerce, sales)


def report_run(*step_results: Iterable[dict] | dict) -> None:
    """Logs what every step of this run did and where every prospect now stands; in a dry run, the
    whole plan."""
    options = _options()
    results = [item for result in step_results for item in ([result] if isinstance(result, dict) else result)]
    store = _store(options)
    log.info("This run: what each step did per legal entity, then what it sent and cost\n%s",
             report.text(report.run_summary(results)))  # fmt: skip
    tracked = rules.only(store.frame(columns=["stage"]), options.prospect_keys)
    leave = "as this dry run would leave them (nothing was written)" if options.dry_run else "now"
    log.info("Prospects by stage, %s\n%s", leave, report.stage_counts(tracked).to_string())
    if options.dry_run:
        planned = store.planned_writes(_run_id())
        log.info("DRY RUN: %d writes planned, none sent. Per system, operation and legal entity\n%s", len(planned),
                 report.plan_summary(planned).to_string())  # fmt: skip
        log.info("DRY RUN: the plan (also in the state store's b2b_planned_writes, run_id %s)\n%s", _run_id(),
                 report.plan_text(planned))  # fmt: skip


def check_sla() -> dict:
    """Fails when anomalies are open or prospects wait undecided longer than `sla_days`, listing
    them; a dry run lists them and passes."""
    options = _options()
    store = _store(options)
    anomalies = rules.only(store.anomalies(), options.prospect_keys)
    tracked = rules.only(store.frame(columns=["stage", "decision", "created_at", "last_error"]), options.prospect_keys)
    late = rules.overdue(tracked, datetime.now(UTC), options.sla_days)
    summary = {"step": "check sla", "legal_entity": "*", "open_anomalies": len(anomalies),
               "pending_too_long": len(late), "sla_days": options.sla_days}  # fmt: skip
    if len(anomalies) == 0 and len(late) == 0:
        log.info("SLA met: no open anomalies, no prospect pending longer than %g days", options.sla_days)
        return summary
    message = report.sla_message(anomalies, late, options.sla_days)
    if options.dry_run:
        log.warning("DRY RUN: the SLA check would fail:\n%s", message)
        return summary
    log.error("%s", message)
    raise report.SlaBreached(message)
