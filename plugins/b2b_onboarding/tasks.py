"""The bodies of the DAGs' tasks: connections in, one step of the flow, a table logged, counts out.

Kept apart from the DAG files so that parsing a DAG imports none of this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from airflow.sdk import get_current_context

from . import reconcile, report, sync
from .commerce import CommerceClient
from .errors import ConfigurationError
from .hooks import CommerceHook, SalesHook, StateStoreHook

log = logging.getLogger(__name__)


def _run_id() -> str:
    return get_current_context()["run_id"]


def _logged(result: dict) -> dict:
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


def pull_prospects(legal_entity: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    with commerce.odata:
        return _logged(sync.pull_prospects(commerce, store, legal_entity, _run_id()))


def push_leads(legal_entity: str) -> dict:
    sales, store = SalesHook().get_conn(), StateStoreHook().get_conn()
    with sales.odata:
        return _logged(sync.push_leads(sales, store, legal_entity, _run_id()))


def read_outcomes() -> dict:
    sales, store = SalesHook().get_conn(), StateStoreHook().get_conn()
    with sales.odata:
        return _logged(reconcile.read_outcomes(sales, store, _run_id()))


def write_customers(legal_entity: str) -> dict:
    settings = CommerceHook().settings()  # read once: the client and the customer group both need it
    commerce, sales, store = CommerceClient.connect(settings), SalesHook().get_conn(), StateStoreHook().get_conn()
    with commerce.odata, sales.odata:
        return _logged(
            reconcile.write_customers(commerce, sales, store, legal_entity, _run_id(), settings.customer_group)
        )


def approve_won(legal_entity: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    with commerce.odata:
        return _logged(reconcile.approve_won(commerce, store, legal_entity, _run_id()))


def reject_lost(legal_entity: str) -> dict:
    commerce, store = CommerceHook().get_conn(), StateStoreHook().get_conn()
    with commerce.odata:
        return _logged(reconcile.reject_lost(commerce, store, legal_entity, _run_id()))


def report_run(*step_results: Iterable[dict] | dict) -> None:
    """Logs what every step of this run did and where every prospect now stands."""
    results = [item for result in step_results for item in ([result] if isinstance(result, dict) else result)]
    log.info("This run\n%s", report.run_table(results).to_string())
    log.info("Prospects by stage\n%s", report.stage_counts(StateStoreHook().get_conn().frame()).to_string())
