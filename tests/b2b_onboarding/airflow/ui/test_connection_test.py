"""The Connections list's Test button works for the product's connections, which have no port:
Airflow 3.3.2's list posts `"port": 0` for them, which its test endpoint would refuse (HTTP 400); the
api-server's middleware sends null instead, and leaves every other request as it came."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from b2b_onboarding.airflow.ui.connection_test import TEST_PATH, PortlessConnectionTest


@pytest.fixture
def client() -> TestClient:
    """Airflow's test endpoints, as far as the middleware is concerned: they answer what they received."""
    app = FastAPI()

    @app.post(TEST_PATH)
    @app.post("/api/v2/connections/enqueue-test")
    async def test(request: Request) -> dict:
        body = await request.body()
        return {"body": body.decode(), "content_length": request.headers.get("content-length")}

    app.add_middleware(PortlessConnectionTest)
    return TestClient(app)


def received(client: TestClient, body, path: str = TEST_PATH) -> str:
    answer = client.post(path, content=body if isinstance(body, bytes) else json.dumps(body))
    assert answer.status_code == 200
    seen = answer.json()
    assert int(seen["content_length"]) == len(seen["body"].encode())
    return seen["body"]


# What the list's Test button posts for the `d365_sales` connection (Airflow 3.3.2).
LISTED = {"conn_type": "d365_sales", "connection_id": "d365_sales", "description": "", "extra": "{}",
          "host": "https://contoso.crm.dynamics.com", "login": "app", "password": "***", "port": 0, "schema": ""}  # fmt: skip


@pytest.mark.parametrize("conn_type", ["d365_commerce", "d365_sales", "d365_state"])
def test_a_product_connection_without_a_port_is_tested_without_one(client, conn_type):
    assert json.loads(received(client, LISTED | {"conn_type": conn_type})) == LISTED | {"conn_type": conn_type,
                                                                                        "port": None}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (LISTED | {"port": 5432}, TEST_PATH),  # a port of its own
        (LISTED | {"conn_type": "http"}, TEST_PATH),  # another provider's connection: Airflow's to fix
        (LISTED, "/api/v2/connections/enqueue-test"),
        (b"{not json", TEST_PATH),
    ],
)
def test_other_requests_pass_through_untouched(client, body, path):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert received(client, raw, path) == raw.decode()
