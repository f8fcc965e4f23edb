"""A dry run recognisable in Airflow's run list: a middleware of the api-server that gives a run of
the onboarding DAGs triggered with `dry_run` on (the Trigger form, the REST API) a run id starting
`dry_run__` and a note, unless the trigger named its own.

Airflow's run list shows each run's id but not its params (the conf is folded away), and a task
cannot rename its run or write its note: the trigger request is the one place to mark it. Only
`POST /api/v2/dags/<onboarding DAG>/dagRuns` with a JSON body whose conf holds `"dry_run": true` is
touched; every other request passes through as it came.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from .links import DAG_IDS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RUN_ID_PREFIX = "dry_run__"
NOTE = "Dry run: reads Commerce, Sales and the state store, writes nothing; its plan is in the report task's log."
_TRIGGER = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?")


def marked(body: dict, now: datetime) -> dict:
    """The trigger body with a dry run's run id and note, where the trigger left them empty."""
    if not isinstance(body.get("conf"), dict) or body["conf"].get("dry_run") is not True:
        return body
    return {**body, "dag_run_id": body.get("dag_run_id") or f"{RUN_ID_PREFIX}{now.isoformat()}",
            "note": body.get("note") or NOTE}  # fmt: skip


class DryRunMarker:
    """ASGI middleware: see the module."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _TRIGGER.fullmatch(scope.get("path", "")) if scope.get("type") == "http" else None
        if not found or scope.get("method") != "POST" or found["dag_id"] not in DAG_IDS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to trigger
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except ValueError:  # not JSON: Airflow answers it as it answers any bad body
            parsed = None
        if isinstance(parsed, dict) and (changed := marked(parsed, datetime.now(UTC))) is not parsed:
            body = json.dumps(changed).encode()
            headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, for whoever waits for one
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
