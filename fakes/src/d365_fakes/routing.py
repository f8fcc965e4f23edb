"""Routing shared by the OData fakes: an entity path may hold any character, newlines included;
every answer of a service stamped with the headers the real one puts on all of them; a `$batch`
part served as a request of its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import unquote

from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RESOURCE_CONVERTOR = "odata_resource"


class _ResourcePathConvertor(Convertor[str]):
    """Like Starlette's `path` (`.*`), but across newlines too: key values may contain them."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor(RESOURCE_CONVERTOR, _ResourcePathConvertor())


class StampedAnswers:
    """Plain ASGI middleware adding `stamp(scope)`'s headers (replacing same-named ones) to every
    answer under `path_prefix`. `stamp` runs once per request, before it is served. Plain ASGI so
    that a request passes through without waiting on the event loop (see dataverse_batch)."""

    def __init__(self, app: ASGIApp, path_prefix: str, stamp: Callable[[Scope], Mapping[str, str]]) -> None:
        self.app, self.path_prefix, self.stamp = app, path_prefix, stamp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        stamped = {name.lower().encode("latin-1"): value.encode("latin-1") for name, value in self.stamp(scope).items()}

        async def send_stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in stamped]
                message = {**message, "headers": [*kept, *stamped.items()]}
            await send(message)

        await self.app(scope, receive, send_stamped)


def part_scope(outer: Scope, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of a `$batch` part: a request of its own on the batch's connection (scheme,
    server, client, root path), with its method, percent-encoded path, query and headers."""
    return {
        "type": "http",
        "asgi": outer.get("asgi", {"version": "3.0"}),
        "http_version": "1.1",
        "scheme": outer["scheme"],
        "server": outer.get("server"),
        "client": outer.get("client"),
        "root_path": outer.get("root_path", ""),
        "method": method,
        "path": unquote(path),
        "raw_path": path.encode("utf-8"),
        "query_string": query.encode("utf-8"),
        "headers": headers,
    }
