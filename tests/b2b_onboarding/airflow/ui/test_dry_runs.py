"""A dry run is recognisable in Airflow's run list: the api-server's middleware gives a dry run of
an onboarding DAG a `dry_run__` run id and a note, and leaves every other request as it came."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from b2b_onboarding.airflow.ui.dry_runs import NOTE, RUN_ID_PREFIX, DryRunMarker


@pytest.fixture
def client() -> TestClient:
    """Airflow's trigger endpoint, as far as the middleware is concerned: it answers what it received."""
    app = FastAPI()

    @app.post("/api/v2/dags/{dag_id}/dagRuns")
    async def trigger(dag_id: str, request: Request) -> dict:
        body = await request.body()
        return {"dag_id": dag_id, "body": body.decode(), "content_length": request.headers.get("content-length")}

    app.add_middleware(DryRunMarker)
    return TestClient(app)


def received(client: TestClient, dag_id: str, body) -> dict:
    answer = client.post(f"/api/v2/dags/{dag_id}/dagRuns", content=body if isinstance(body, bytes) else json.dumps(body))
    assert answer.status_code == 200
    seen = answer.json()
    assert int(seen["content_length"]) == len(seen["body"].encode())
    return seen


def test_a_dry_run_gets_a_dry_run_id_and_a_note(client):
    seen = json.loads(received(client, "b2b_outcome_reconciliation",
                               {"logical_date": None, "conf": {"dry_run": True, "sla_days": 3}})["body"])  # fmt: skip
    assert seen["dag_run_id"].startswith(RUN_ID_PREFIX) and seen["note"] == NOTE
    assert seen["conf"] == {"dry_run": True, "sla_days": 3} and seen["logical_date"] is None


def test_a_run_id_or_note_the_trigger_chose_is_kept(client):
    body = {"dag_run_id": "rehearsal-1", "note": "before the cut-over", "conf": {"dry_run": True}}
    assert json.loads(received(client, "b2b_prospect_sync", body)["body"]) == body


@pytest.mark.parametrize(
    ("dag_id", "body"),
    [
        ("b2b_prospect_sync", {"conf": {"dry_run": False}}),
        ("b2b_prospect_sync", {"conf": {}}),
        ("b2b_prospect_sync", {"conf": {"dry_run": "true"}}),  # not the form's boolean: Airflow refuses it anyway
        ("another_dag", {"conf": {"dry_run": True}}),
        ("b2b_prospect_sync", b"{not json"),
    ],
)
def test_other_triggers_pass_through_untouched(client, dag_id, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert received(client, dag_id, raw)["body"] == raw.decode()
