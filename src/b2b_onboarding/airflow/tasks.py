"""The bodies of the DAGs' tasks: connections in, one step of the flow, a table logged, counts out.

Kept apart from the DAG files so that parsing a DAG imports none of this. Every result is a small
summary (counts, requests, resources); rows never travel through XCom.

The run's params (the Trigger form) shape every task: `dry_run` (plan every write, send none),
`legal_entities` (a subset of the connection's), `prospect_ids` (a targeted rerun of named
prospects), `chunk_size`, and in the reconciliation `sla_days`.
"""

from __future__ import annotations

import functools
import logging
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowFailException

from b2b_onboarding import errors
from b2b_onboarding.airflow.hooks import CommerceHook, SalesHook, StateStoreHook
from b2b_onboarding.clients.commerce import CommerceClient, required_customer_group
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.domain import report, rules
from b2b_onboarding.domain.tenant import TableModel, Tenant, check_lead_model
from b2b_onboarding.errors import ConfigurationError
from b2b_onboarding.flow import drift, preflight, reconcile, sync
from b2b_onboarding.flow.dry_run import DryRunCommerce, DryRunSales, Plan
from b2b_onboarding.store.state import DryRunStore, StateStore

log = logging.getLogger(__name__)

# Prospects of work per mapped task unless the run's `chunk_size` param says otherwise.
DEFAULT_CHUNK_SIZE = 5000
# Days a prospect may wait undecided before `check_sla` fails, unless the run's `sla_days` says otherwise.
DEFAULT_SLA_DAYS = 3
# Task states that leave a task's result missing from a run (skipped means it had nothing to do).
_FAILED, _NOT_RUN = "failed", "upstream_failed"

Body = TypeVar("Body", bound=Callable[..., Any])


class FailedCheck(SystemExit):
    """A check that failed as designed (the SLA, a run with failed tasks), its table logged once
    above it: the task fails without a traceback. Airflow's task runner logs every exception with its
    traceback except SystemExit, which it logs as "Task exited" and then fails (or retries) the task
    like any other failure, its callbacks included."""

    def __str__(self) -> str:
        return str(self.code)


class SlaBreached(FailedCheck):
    """`check_sla` found open anomalies or prospects pending longer than the SLA."""


class RunFailed(FailedCheck):
    """A task of the run failed for good, or did not run because one did (`all_tasks_succeeded`)."""


class PreflightFailed(FailedCheck):
    """A check of the preflight failed (`run_preflight`)."""


def fails_clearly(body: Body) -> Body:
    """A task body whose failure starts with its one line, logged before Airflow's traceback (so it
    heads "Recent failed task logs" and the log), naming the connection, system, operation, record,
    HTTP status and next step. A failure that cannot cure itself (refused credentials,
    configuration, TLS trust, a missing privilege) fails the task at once, without its retries."""

    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return body(*args, **kwargs)
        except (AirflowFailException, FailedCheck):
            raise
        except Exception as error:
            line = errors.first_line(error)
            if errors.cures_itself(error):
                log.error("%s", line)
                raise
            log.error("%s Not retried: this cannot cure itself.", line)
            raise AirflowFailException(line) from error

    return run  # type: ignore[return-value]


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


def _map_index(ti: Any) -> int:
    index = getattr(ti, "map_index", None)
    return -1 if index is None else int(index)


def _task_label() -> str:
    ti = _context().get("ti")
    if ti is None:
        return "outside_airflow"
    return ti.task_id + (f"[{ti.map_index}]" if _map_index(ti) >= 0 else "")


def _task_states() -> dict[str, str | None]:
    """Every task instance of this run and its state (a mapped one as `task_id_mapindex`, as
    Airflow's execution API answers); empty outside Airflow."""
    ti = _context().get("ti")
    if ti is None:
        return {}
    return ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})


def _store(options: RunOptions) -> StateStore:
    """The state store; in a dry run the store as the dry run sees it (reads its plan, writes none
    of the store's facts); in a targeted run scoped to the named prospects."""
    store = StateStoreHook().get_conn(dry_run_of=_run_id() if options.dry_run else None)
    ti = _context().get("ti")
    if ti is not None:
        store.writer = {"dag_id": ti.dag_id, "task_id": ti.task_id, "map_index": _map_index(ti)}
    return store.scoped(options.prospect_keys)


# The tenant's models this process already holds, by (run id, Airflow connection), in JSON form.
_MODELS: dict[tuple[str, str], Any] = {}


def _model_of_run(store: StateStore, run_id: str, conn_id: str, read: Callable[[], Any]) -> Any:
    """A model read through a connection once per run: this process's copy, else the one an earlier
    task of the run stored, else read now and stored for the run's other tasks."""
    key = (run_id, conn_id)
    if key not in _MODELS:
        model = store.tenant_model(run_id, conn_id)
        if model is None:
            model = read()
            store.record_tenant_model(run_id, conn_id, model)
        _MODELS[key] = model
    return _MODELS[key]


def tenant_of_run(store: StateStore, run_id: str, commerce_settings: ServiceSettings,
                  sales_settings: ServiceSettings) -> Tenant:  # fmt: skip
    """The tenant's lead table and HQ entity sets, from their metadata, read once per run (a dry
    run's too: reading metadata writes nothing). A lead table the flow cannot work with (a column or
    the key missing) fails the task at once, naming what is missing."""

    def read_lead() -> dict:
        sales = SalesHook().client(sales_settings)
        with sales.odata:
            return sales.lead_model().to_json()

    def read_commerce() -> dict:
        commerce = CommerceHook().client(commerce_settings)
        with commerce.odata:
            return {name: model.to_json() for name, model in commerce.table_models().items()}

    lead = TableModel.from_json(_model_of_run(store, run_id, sales_settings.conn_id, read_lead))
    check_lead_model(lead, sales_settings.conn_id)
    commerce = _model_of_run(store, run_id, commerce_settings.conn_id, read_commerce)
    return Tenant(lead, {name: TableModel.from_json(model) for name, model in commerce.items()})


@dataclass(frozen=True)
class _Step:
    """What every step task starts from: the run's params and id, the state store as this run sees
    it, and in a dry run the plan its clients fill instead of writing."""

    options: RunOptions
    run_id: str
    store: StateStore
    plan: Plan | None

    # Each connection's settings, read once per task: its client and the tenant's models both need them.
    @functools.cached_property
    def commerce_settings(self) -> ServiceSettings:
        return CommerceHook().settings()

    @functools.cached_property
    def sales_settings(self) -> ServiceSettings:
        return SalesHook().settings()

    def commerce(self, legal_entity: str | None = None) -> CommerceClient:
        """Commerce HQ; in a dry run, the client that plans its writes instead."""
        client = CommerceHook().client(self.commerce_settings)
        return DryRunCommerce(client, self.plan, legal_entity) if self.plan is not None else client

    def sales(self, legal_entity: str | None = None) -> SalesClient:
        """Dataverse; in a dry run, the client that plans its writes instead."""
        client = SalesHook().client(self.sales_settings)
        return DryRunSales(client, self.plan, legal_entity) if self.plan is not None else client

    def tenant(self) -> Tenant:
        """The tenant's tables, as this run read them (`tenant_of_run`)."""
        return tenant_of_run(self.store, self.run_id, self.commerce_settings, self.sales_settings)

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
        if self.store.writer:  # in Airflow: the run's history (report, plugin) reads it, whatever later tasks do
            self.store.record_step_result(run_id=self.run_id, result=result, dry_run=self.options.dry_run,
                                          **self.store.writer)  # fmt: skip
        if self.plan is not None and isinstance(self.store, DryRunStore):
            planned = self.plan.frame()
            self.store.record_planned_writes(_task_label(), planned)
            log.info("DRY RUN: the writes this task would make (%d; none was sent)\n%s", len(planned),
                     report.plan_text(planned))  # fmt: skip
        log.info("%s %s: what this task did\n%s", result["step"], result["legal_entity"],
                 report.text(report.task_table(result, dry_run=self.plan is not None)))  # fmt: skip
        return result


def _step() -> _Step:
    options = _options()
    return _Step(options, _run_id(), _store(options), Plan() if options.dry_run else None)


@fails_clearly
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


@fails_clearly
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


@fails_clearly
def pull_prospects(legal_entity: str) -> dict:
    step = _step()
    commerce, ids, tenant = step.commerce(legal_entity), step.options.prospect_ids(legal_entity), step.tenant()
    return step.measured(lambda: sync.pull_prospects(commerce, step.store, legal_entity, step.run_id, ids, tenant),
                         commerce)  # fmt: skip


@fails_clearly
def push_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    sales, tenant = step.sales(legal_entity), step.tenant()
    return step.measured(
        lambda: sync.push_leads(sales, step.store, legal_entity, step.run_id, first_id, last_id, tenant), sales
    )


@fails_clearly
def correct_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    step.tenant()  # the lead columns it updates must exist: fails at once, naming a missing one
    sales = step.sales(legal_entity)
    return step.measured(
        lambda: sync.correct_leads(sales, step.store, legal_entity, step.run_id, first_id, last_id), sales
    )


@fails_clearly
def read_outcomes() -> dict:
    step = _step()
    sales = step.sales()
    return step.measured(lambda: reconcile.read_outcomes(sales, step.store, step.run_id, step.options.prospect_keys,
                                                         step.options.qualified_without_opportunity_days),
                         sales)  # fmt: skip


@fails_clearly
def write_customers(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    settings = step.commerce_settings
    # HQ refuses every customer without a customer group: fail at once, before any call, dry run or not.
    group = required_customer_group(settings.customer_group, settings.conn_id)
    commerce, sales, tenant = step.commerce(legal_entity), step.sales(legal_entity), step.tenant()
    return step.measured(
        lambda: reconcile.write_customers(
            commerce, sales, step.store, legal_entity, step.run_id, group, first_id, last_id,
            settings.customer_account_template, tenant,
        ),
        commerce,
        sales,
    )


@fails_clearly
def approve_won(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    commerce = step.commerce(legal_entity)
    return step.measured(
        lambda: reconcile.approve_won(commerce, step.store, legal_entity, step.run_id, first_id, last_id), commerce
    )


@fails_clearly
def reject_lost(legal_entity: str, first_id: str, last_id: str) -> dict:
    step = _step()
    commerce = step.commerce(legal_entity)
    return step.measured(
        lambda: reconcile.reject_lost(commerce, step.store, legal_entity, step.run_id, first_id, last_id), commerce
    )


@fails_clearly
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


@fails_clearly
def report_run() -> None:
    """Logs what every step of this run did, where every prospect now stands, and in a dry run the
    whole plan. The steps' figures come from the state store (each step records its own as it
    ends), so the report works whatever its upstream left, and names what is missing and why."""
    options = _options()
    store = _store(options)
    recorded = store.step_results(store.writer.get("dag_id"), run_ids=[_run_id()])
    log.info("This run\n%s", report.run_report(recorded["result"].tolist(), dry_run=options.dry_run))
    missing = missing_results(_task_states(), _task_ids(), store.task_failures(run_id=_run_id()))
    if missing:
        log.warning("Missing from this report (%d tasks):\n%s", len(missing), "\n".join(missing))
    tracked = rules.only(store.frame(columns=["stage"]), options.prospect_keys)
    leave = "as this dry run would leave them (nothing was written)" if options.dry_run else "now"
    log.info("Prospects by stage, %s\n%s", leave, report.text(report.stage_counts(tracked)))
    if options.dry_run:
        planned = store.planned_writes(_run_id())
        log.info("DRY RUN: %d writes planned, none sent. Per system, operation and legal entity\n%s", len(planned),
                 report.text(report.plan_summary(planned)))  # fmt: skip
        log.info("DRY RUN: the plan (also in the state store's b2b_planned_writes, run_id %s)\n%s", _run_id(),
                 report.plan_text(planned))  # fmt: skip


def _task_ids() -> list[str]:
    dag = _context().get("dag")
    return list(getattr(dag, "task_ids", ()))


def missing_results(states: Mapping[str, str | None], task_ids: Iterable[str], failures: Any) -> list[str]:
    """One line per task of a run whose result is missing: failed (with the one line its failure
    was recorded with) or not run because an upstream task failed; a mapped task's instances
    counted together. `states` as Airflow's execution API gives them (`task_id_mapindex` for a
    mapped instance); `failures` the run's recorded task failures, newest first."""
    first_lines = {}
    for row in failures.to_dict("records")[::-1] if len(failures) else []:  # the newest try wins
        first_lines[row["task_id"]] = errors.one_line(str(row["error"]).splitlines()[0]) if row["error"] else ""
    lines = []
    for task_id, found in _states_by_task(states, task_ids).items():
        failed, not_run = found.count(_FAILED), found.count(_NOT_RUN)
        of = f" ({failed + not_run} of {len(found)} mapped)" if len(found) > 1 else ""
        if failed:
            cause = first_lines.get(task_id) or "no failure recorded; read the task's log"
            lines.append(f"{task_id}{of} failed: {cause}")
        elif not_run:
            lines.append(f"{task_id}{of} did not run: a task it depends on failed")
    return lines


def _states_by_task(states: Mapping[str, str | None], task_ids: Iterable[str]) -> dict[str, list[str | None]]:
    """The states of each task's instances (a mapped task's together), from `task_id_mapindex` keys."""
    known = set(task_ids)
    by_task: dict[str, list[str | None]] = {}
    for key, state in states.items():
        mapped = re.fullmatch(r"(.+)_(\d+)", key)
        task_id = mapped[1] if key not in known and mapped and mapped[1] in known else key
        by_task.setdefault(task_id, []).append(state)
    return by_task


@fails_clearly
def all_tasks_succeeded() -> None:
    """The run's verdict, its last task: fails when any task of the run failed for good (or did not
    run because one did), naming each with its one line. Airflow sets a run's state from its leaf
    tasks, and `report` and `check_sla` run whatever happened before them: without this leaf, a run
    whose tasks failed would be green (Airflow's watcher pattern)."""
    ti = _context().get("ti")
    states = {key: state for key, state in _task_states().items() if key != getattr(ti, "task_id", None)}
    store = StateStoreHook().get_conn()
    try:
        missing = missing_results(states, _task_ids(), store.task_failures(run_id=_run_id()))
    finally:
        store.close()
    if not missing:
        log.info("Every task of this run succeeded or had nothing to do")
        return
    failed = sum(_FAILED in found for found in _states_by_task(states, _task_ids()).values())
    message = (f"This run failed: {failed} tasks failed for good, {len(missing) - failed} did not run because of them. "
               "Next step: README, Runbook, \"The run is red\".")  # fmt: skip
    log.error("%s\n%s", message, "\n".join(missing))
    raise RunFailed(f"{message} {' | '.join(missing)}")


@fails_clearly
def check_sla() -> dict:
    """Fails when anomalies are open or prospects wait undecided longer than `sla_days`, listing
    them once and without a traceback; a dry run lists them and passes."""
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
    raise SlaBreached(message.splitlines()[0])


@fails_clearly
def run_preflight() -> None:
    """The read-only preflight (DAG `b2b_preflight`): logs its table, and fails, its first line
    naming the failed checks, when one failed."""
    rows = preflight.Preflight(CommerceHook().settings, SalesHook().settings).run()
    outcome = preflight.verdict(rows)
    log.info("Preflight of the connections %s and %s\n%s", CommerceHook.default_conn_name, SalesHook.default_conn_name,
             preflight.table(rows))  # fmt: skip
    if preflight.failed(rows):
        log.error("%s", outcome)
        raise PreflightFailed(outcome)
    log.info("%s", outcome)
