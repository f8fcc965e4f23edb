"""A state store filled the way the DAGs fill it (`record_pulled`, `update_many`, `record_anomalies`,
`record_drift`; the step tasks' `record_step_result`, the failure callback's `record_task_failure`),
runs as Airflow's metadata database holds them, and a client of the pages on it, for the tests of the
onboarding pages."""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd
from fastapi.testclient import TestClient

from b2b_onboarding.airflow.ui import auth
from b2b_onboarding.airflow.ui.app import create_app
from b2b_onboarding.store.state import StateStore

SYNC_RUN = "scheduled__2026-11-20T01:45:00+00:00"
PUSH_RUN = "scheduled__2026-11-20T02:00:00+00:00"  # both DAGs have a run of this id
NIGHT_RUN = "scheduled__2026-11-20T02:00:00+00:00"
NEXT_NIGHT = "scheduled__2026-11-21T02:00:00+00:00"


def prospect(legal_entity: str, prospect_id: str, name: str = "Ada Lovelace", company: str = "Contoso",
             error: str | None = None) -> dict:  # fmt: skip
    record = None if error else {
        "dataAreaId": legal_entity, "ProspectId": prospect_id, "ProspectName": name, "CompanyName": company,
        "PrimaryEmailAddress": f"{prospect_id.lower()}@{legal_entity}.example",
    }  # fmt: skip
    return {"legal_entity": legal_entity, "prospect_id": prospect_id, "prospect": record,
            "email": None if error else record["PrimaryEmailAddress"], "error": error}  # fmt: skip


def pulled(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame.from_records(list(rows), columns=["legal_entity", "prospect_id", "prospect", "email", "error"])


def fill(store: StateStore) -> None:
    """A small tenant: usrt P-1 approved through every step, P-2 rejected, P-3 qualified whose
    customers Commerce refused, P-4 a bad record, usmf P-1 (same id, other company) pending."""
    store.record_pulled(pulled(
        prospect("usrt", "P-1", "Ada Lovelace", "Analytical Engines"),
        prospect("usrt", "P-2", "Grace Hopper", "Compilers Inc"),
        prospect("usrt", "P-3", "Alan Turing", "Bombe Ltd"),
        prospect("usrt", "P-4", error="prospect usrt/P-4: PrimaryEmailAddress: value is not a valid email address"),
        prospect("usmf", "P-1", "Edsger Dijkstra", "Semaphores BV"),
    ), SYNC_RUN)  # fmt: skip
    store.update_many([((le, pid), {"lead_id": f"lead-{le}-{pid}", "lead_state": "open"}, None)
                       for le, pid in [("usrt", "P-1"), ("usrt", "P-2"), ("usrt", "P-3"), ("usmf", "P-1")]],
                      PUSH_RUN)  # fmt: skip
    store.update_many([
        (("usrt", "P-1"), {"lead_state": "qualified", "opportunity_id": "opp-1", "opportunity_state": "open",
                           "account_id": "acc-1", "contact_id": "con-1"}, None),
        (("usrt", "P-2"), {"lead_state": "disqualified"}, None),
        (("usrt", "P-3"), {"lead_state": "qualified", "opportunity_id": "opp-3", "opportunity_state": "open",
                           "account_id": "acc-3", "contact_id": "con-3"}, None),
    ], NIGHT_RUN)  # fmt: skip
    store.update_many([
        (("usrt", "P-1"), {"org_customer_account": "P-1-ORG", "person_customer_account": "P-1-ADM",
                           "org_party_number": "000001", "person_party_number": "000002"}, None),
        (("usrt", "P-3"), {}, "Commerce: CustomersV3 create for P-3-ORG failed with HTTP 400 Bad Request"),
    ], NIGHT_RUN)  # fmt: skip
    store.update_many([(("usrt", "P-1"), {"opportunity_state": "won"}, None)], NEXT_NIGHT)
    store.update_many([
        (("usrt", "P-1"), {"hierarchy_id": "USRT-P-1", "decision": "approved"}, None),
        (("usrt", "P-2"), {"decision": "rejected"}, None),
    ], NEXT_NIGHT)  # fmt: skip
    store.record_anomalies([(("usrt", "P-2"), "lead_reopened", "the lead of prospect usrt/P-2 is open in Sales")],
                           NIGHT_RUN)  # fmt: skip
    store.record_anomalies([(("usrt", "P-2"), "lead_reopened", "the lead of prospect usrt/P-2 is open in Sales")],
                           NEXT_NIGHT)  # fmt: skip
    store.record_drift(pd.DataFrame([
        {"kind": "missing lead", "legal_entity": "usmf", "prospect_id": "P-9", "lead_id": None,
         "detail": "B2B prospect (Pending) has no Commerce B2B lead in Sales"},
    ]), NIGHT_RUN)  # fmt: skip
    store.record_drift(pd.DataFrame([
        {"kind": "lead without prospect", "legal_entity": None, "prospect_id": None, "lead_id": "lead-x",
         "detail": "lead usrt:P-77 names no B2B prospect in Commerce"},
        {"kind": "state disagreement", "legal_entity": "usrt", "prospect_id": "P-2", "lead_id": "lead-usrt-P-2",
         "detail": "prospect is Rejected in Commerce but its lead is open"},
    ]), NEXT_NIGHT)  # fmt: skip


def dag_run(run_id: str, state: str, started_at: str, seconds: int | None = 60, dry_run: bool = False) -> dict:
    """A DAG run as `health.airflow_dag_runs` reads it from Airflow's metadata database (running: no end)."""
    started = datetime.fromisoformat(started_at)
    ended = None if seconds is None else (started + timedelta(seconds=seconds)).isoformat()
    return {"run_id": run_id, "state": state, "started_at": started.isoformat(), "ended_at": ended, "dry_run": dry_run}


def runs_of(**runs: list[dict]):
    """A reader of Airflow's DAG runs (`create_app(dag_runs=…)`) holding these runs, newest first, per DAG id."""
    return lambda dag_id, limit: runs.get(dag_id, [])[:limit]


def record_result(store: StateStore, dag_id: str, run_id: str, task_id: str, map_index: int, step: str,
                  legal_entity: str = "*", dry_run: bool = False, **counts: int) -> None:  # fmt: skip
    """What a step task records as it ends (tasks.py: its result dict)."""
    result = {"step": step, "legal_entity": legal_entity, **counts}
    store.record_step_result(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, result=result,
                             dry_run=dry_run)  # fmt: skip


def record_failure(store: StateStore, dag_id: str, run_id: str, task_id: str, error: str, map_index: int = -1,
                   chunk: tuple[str, str, str] | None = None, failed_at: datetime | None = None) -> None:  # fmt: skip
    """What the failure callback records (notify.py), with the chunk a mapped task worked on."""
    legal_entity, first_id, last_id = chunk or (None, None, None)
    rendered = f"{legal_entity} {first_id}…{last_id}" if chunk else None
    store.record_task_failure(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, try_number=3,
                              error=error, rendered_map_index=rendered, failed_at=failed_at, legal_entity=legal_entity,
                              first_id=first_id, last_id=last_id)  # fmt: skip


class Viewer:
    """Stands for the Airflow user the app's `auth.reader` would resolve (tested in test_ui_auth.py)."""

    def get_id(self) -> str:
        return "viewer"


def no_runs(dag_id: str, limit: int) -> list[dict]:
    return []


def every_pool() -> set[str]:
    return {"d365_commerce", "d365_sales", "default_pool"}


def client_for(store: StateStore, latest_drift_check=lambda: None, dag_runs=no_runs, pool_names=every_pool,
               **kwargs) -> TestClient:  # fmt: skip
    """A client of the pages on the store, with Airflow's metadata database as the test says it is."""
    app = create_app(store.engine, latest_drift_check=latest_drift_check, dag_runs=dag_runs, pool_names=pool_names)
    app.dependency_overrides[auth.reader] = Viewer
    return TestClient(app, **kwargs)


