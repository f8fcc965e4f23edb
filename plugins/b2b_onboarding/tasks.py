"""The bodies of the DAGs' tasks: connections in, one step of the flow, a table logged, counts out.

Kept apart from the DAG files so that parsing a DAG imports none of this. Every result is a small
summary (counts, requests, resources); rows never travel through XCom.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack

from airflow.sdk import get_current_context

from . import drift, reconcile, report, rules, sync
from .commerce import CommerceClient
from .errors import ConfigurationError
from .hooks import CommerceHook, SalesHook, StateStoreHook
from .sales import SalesClient

log = logging.getLogger(__name__)

# Prospects of work per mapped task unless the run's `chunk_size` param says otherwise.
DEFAULT_CHUNK_SIZE = 5000


def _run_id() -> str:
    return get_current_context()["run_id"]


def _measured(step: Callable[..., dict], *clients: CommerceClient | SalesClient) -> dict:
    """Runs a step with its clients open; adds what it sent to each system and what it cost."""
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
    result["cpu_s"] = round(time.process_time() - started_cpu, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    log.info("%s\n%s", result["step"], report.run_table([result]).to_string())
    return result


def legal_entities() -> list[str]:
    settings = CommerceHook().settings()
    if not settings.legal_entities:
        raise ConfigurationError(
            f"Airflow connection {settings.conn_id!r} names no legal entities. Next step: set its "
            'extra "legal_entities", e.g. ["usrt", "usmf"].'
        )
    return list(settings.legal_entities)


def plan(step: str, entities: Iterable[str]) -> list[dict]:
    """The chunks of one step's work: prospect-id ranges per legal entity, `chunk_size` each."""
    size = int(get_current_context()["params"].get("chunk_size") or DEFAULT_CHUNK_SIZE)
    wanted = set(entities)
    work = rules.STEPS[step](StateStoreHook().get_conn().frame(columns=rules.RULE_COLUMNS))
    chunks = rules.chunks(work[work["legal_entity"].isin(wanted)], size)
    log.info("%s: %d prospects of work in %d chunks of at most %d", step, len(work), len(chunks), size)
    return chunks


def pull_prospects(legal_entity: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    return _measured(lambda: sync.pull_prospects(commerce, store, legal_entity, _run_id()), commerce)


def push_leads(legal_entity: str, first_id: str, last_id: str) -> dict:
    sales, store = SalesHook().get_conn(), StateStoreHook().get_conn()
    return _measured(lambda: sync.push_leads(sales, store, legal_entity, _run_id(), first_id, last_id), sales)


def read_outcomes() -> dict:
    sales, store = SalesHook().get_conn(), StateStoreHook().get_conn()
    return _measured(lambda: reconcile.read_outcomes(sales, store, _run_id()), sales)


def write_customers(legal_entity: str, first_id: str, last_id: str) -> dict:
    settings = CommerceHook().settings()  # read once: the client and the customer group both need it
    commerce, sales, store = CommerceClient.connect(settings), SalesHook().get_conn(), StateStoreHook().get_conn()
    return _measured(
        lambda: reconcile.write_customers(
            commerce, sales, store, legal_entity, _run_id(), settings.customer_group, first_id, last_id
        ),
        commerce,
        sales,
    )


def approve_won(legal_entity: str, first_id: str, last_id: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    return _measured(lambda: reconcile.approve_won(commerce, store, legal_entity, _run_id(), first_id, last_id), commerce)


def reject_lost(legal_entity: str, first_id: str, last_id: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    return _measured(lambda: reconcile.reject_lost(commerce, store, legal_entity, _run_id(), first_id, last_id), commerce)


def check_drift(entities: Iterable[str]) -> dict:
    commerce, sales, store = CommerceHook().get_conn(), SalesHook().get_conn(), StateStoreHook().get_conn()

    def check() -> dict:
        summary, findings = drift.check_drift(commerce, sales, store, entities, _run_id())
        if len(findings):
            log.warning("Drift between Commerce and Sales (first 50 of %d)\n%s", len(findings),
                        findings.head(50).to_string())  # fmt: skip
        return summary

    return _measured(check, commerce, sales)


def report_run(*step_results: Iterable[dict] | dict) -> None:
    """Logs what every step of this run did and where every prospect now stands."""
    results = [item for result in step_results for item in ([result] if isinstance(result, dict) else result)]
    log.info("This run\n%s", report.run_table(results).to_string())
    tracked = StateStoreHook().get_conn().frame(columns=["stage"])
    log.info("Prospects by stage\n%s", report.stage_counts(tracked).to_string())
