"""The api-server middlewares' one mechanism: read a matching request's JSON body whole, let the
middleware rewrite it, and hand Airflow the body (rewritten or as it came) with a matching
Content-Length. Every other request passes through untouched."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class JsonRequestRewrite:
    """ASGI middleware: a subclass says which requests it reads (`matches`) and what their parsed
    JSON body becomes (`rewrite`: the same object when nothing changes)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    def matches(self, scope: Scope) -> bool:
        raise NotImplementedError

    def rewrite(self, body: Any) -> Any:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not self.matches(scope):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to do
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except ValueError:  # not JSON: Airflow answers it as it answers any bad body
            parsed = None
        if (changed := self.rewrite(parsed)) is not parsed:
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
