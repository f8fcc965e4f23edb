"""A dry run recognisable in Airflow's run list: a middleware of the api-server that gives a run of
the onboarding DAGs triggered with `dry_run` on (the Trigger form, the REST API) a run id starting
`dry_run__` and a note, unless the trigger named its own.

Airflow's run list shows each run's id but not its params (the conf is folded away), and a task
cannot rename its run or write its note: the trigger request is the one place to mark it. Only
`POST /api/v2/dags/<onboarding DAG>/dagRuns` with a JSON body whose conf holds `"dry_run": true` is
touched; every other request passes through as it came.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from b2b_onboarding.airflow.ui.links import DAG_IDS
from b2b_onboarding.airflow.ui.request_rewrite import JsonRequestRewrite, Scope

RUN_ID_PREFIX = "dry_run__"
NOTE = "Dry run: reads Commerce, Sales and the state store, writes nothing; its plan is in the report task's log."
_TRIGGER = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?")


def marked(body: dict, now: datetime) -> dict:
    """The trigger body with a dry run's run id and note, where the trigger left them empty."""
    if not isinstance(body.get("conf"), dict) or body["conf"].get("dry_run") is not True:
        return body
    return {**body, "dag_run_id": body.get("dag_run_id") or f"{RUN_ID_PREFIX}{now.isoformat()}",
            "note": body.get("note") or NOTE}  # fmt: skip


class DryRunMarker(JsonRequestRewrite):
    """ASGI middleware: see the module."""

    def matches(self, scope: Scope) -> bool:
        found = _TRIGGER.fullmatch(scope.get("path", ""))
        return bool(found) and found["dag_id"] in DAG_IDS

    def rewrite(self, body: Any) -> Any:
        return marked(body, datetime.now(UTC)) if isinstance(body, dict) else body
