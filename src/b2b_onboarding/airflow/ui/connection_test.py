"""The Connections list's Test button, for the product's connection types: Airflow 3.3.2's list posts
a connection that has no port with `"port": 0` (its UI's `Number(null)`), which
`POST /api/v2/connections/test` takes for another destination than the stored connection's and
refuses with HTTP 400 ("The host or port to test differs from the stored connection") before any
hook runs. The product's connections have no port (the Environment URL carries it), so their Test
button would always fail so. This middleware of the api-server sends `null` instead, which is what
the UI means (apache/airflow#73298 makes Airflow itself read 0 so: drop this with the release that has it).

Only that request, for a connection of the product's types with port 0, is touched; every other
request passes through as it came.
"""

from __future__ import annotations

from typing import Any

from b2b_onboarding.airflow.provider_info import COMMERCE, SALES, STATE_STORE
from b2b_onboarding.airflow.ui.request_rewrite import JsonRequestRewrite, Scope

TEST_PATH = "/api/v2/connections/test"
CONNECTION_TYPES = frozenset(kind["connection-type"] for kind in (COMMERCE, SALES, STATE_STORE))


def portless(body: Any) -> Any:
    """The test request's body with `port` null where the UI sent 0 for a connection of the product's types."""
    if isinstance(body, dict) and body.get("conn_type") in CONNECTION_TYPES and body.get("port") == 0:
        return {**body, "port": None}
    return body


class PortlessConnectionTest(JsonRequestRewrite):
    """ASGI middleware: see the module."""

    def matches(self, scope: Scope) -> bool:
        return scope.get("path") == TEST_PATH

    def rewrite(self, body: Any) -> Any:
        return portless(body)
