"""The Dataverse Web API's `$batch` ("Execute batch operations using the Web API"): one POST of
`multipart/mixed` carrying up to 1000 requests, alone or in changesets.

The multipart codec is Commerce's (`commerce.py`, "$batch"): both services speak OData v4's batch
format. What Dataverse adds or answers differently is here: each part is served by the Web API app
itself, in-process, as if it had come on its own (same routes, caller, validation and error
bodies); a changeset is one transaction; a `$<Content-ID>` may stand for a URL created earlier in
the changeset, in the part's URL or in a bind in its body; without `Prefer:
odata.continue-on-error` the batch stops at the first failure and its answer takes that failure's
status; `REQ_ID` names each part's own request id.

A part runs to its end without yielding to the event loop (every layer of the app is plain ASGI and
the handlers do not wait), so no other request sees or writes into a changeset before it commits:
the same guarantee single requests have. `run_part` checks that and fails loudly otherwise.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

from fastapi import Request, Response
from starlette.types import ASGIApp, Message

from d365_fakes.commerce import (
    ODataError,
    _BatchItem,
    _changeset_part,
    _http_part,
    _multipart,
    _parse_batch,
    _prefers_continue_on_error,
)
from d365_fakes.limits import BATCH_PART, dataverse_request_id
from d365_fakes.routing import part_scope

_CONTENT_ID_REFERENCE = re.compile(r"\$([\w-]+)")
_BIND_REFERENCE = re.compile(r'("[^"]*@odata\.(?:bind|id)"\s*:\s*")\$([\w-]+)(")')


class BatchError(Exception):
    """The batch as a whole is refused (400) before anything runs: malformed, or too many requests."""


class _ChangesetFailed(Exception):
    """Raised inside a changeset's transaction to undo it; carries the failed part's answer."""

    def __init__(self, answer: bytes, status: int):
        super().__init__(status)
        self.answer, self.status = answer, status


def run_batch(
    app: ASGIApp,
    outer: Request,
    body: bytes,
    api_root: str,
    transaction: Callable[[], AbstractContextManager[None]],
) -> Response:
    """Serve a `$batch` whose body has been read: each part through `app` under `api_root` (the
    Web API's path), each changeset inside `transaction()`. BatchError if the body is malformed."""
    try:
        parts = _parse_batch(outer.headers.get("content-type", ""), body)
    except ODataError as error:
        raise BatchError(error.message) from None
    continue_on_error = _prefers_continue_on_error(outer.headers.get("prefer", ""))
    answers: list[bytes] = []
    failed_status = None
    for part in parts:
        if isinstance(part, tuple):
            answer, status = _run_changeset(app, outer, part, api_root, transaction)
        else:
            status, headers, content = run_part(app, outer, part, api_root, {})
            answer = _http_part(Response(content, status, headers), part.content_id)
        answers.append(answer)
        if status >= 400 and not continue_on_error:
            failed_status = status  # stop, and answer with the failure's status
            break
    boundary = f"batchresponse_{uuid.uuid4()}"
    headers = {"Preference-Applied": "odata.continue-on-error"} if continue_on_error else None
    return Response(
        _multipart(boundary, answers),
        failed_status or 200,
        headers,
        media_type=f"multipart/mixed; boundary={boundary}",
    )


def _run_changeset(
    app: ASGIApp,
    outer: Request,
    changeset: tuple[_BatchItem, ...],
    api_root: str,
    transaction: Callable[[], AbstractContextManager[None]],
) -> tuple[bytes, int]:
    """All of the changeset's answers, or (its writes undone) the answer of the part that failed."""
    answered: list[bytes] = []
    locations: dict[str, str] = {}  # Content-ID -> the URL its part created or addressed
    try:
        with transaction():
            for item in changeset:
                status, headers, content = run_part(app, outer, item, api_root, locations)
                answer = _http_part(Response(content, status, headers), item.content_id)
                if status >= 400:
                    raise _ChangesetFailed(answer, status)
                answered.append(answer)
                entity_id = headers.get("odata-entityid")
                if item.content_id is not None and entity_id:
                    locations[item.content_id] = entity_id
    except _ChangesetFailed as failure:
        return failure.answer, failure.status
    return _changeset_part(answered), 200


def run_part(
    app: ASGIApp,
    outer: Request,
    item: _BatchItem,
    api_root: str,
    locations: Mapping[str, str],
) -> tuple[int, dict[str, str], bytes]:
    """One part served by `app` as the same request on its own: (status, headers, body)."""
    try:
        scope, body = _part_scope(outer, item, api_root, locations)
    except BatchError as error:
        headers = {"Content-Type": "application/json; odata.metadata=minimal", "OData-Version": "4.0"}
        return 400, {**headers, "REQ_ID": dataverse_request_id()["REQ_ID"]}, _error_body(str(error))
    received = False
    answer: dict = {"status": 500, "headers": [], "body": b""}

    async def receive() -> Message:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    step = app(scope, receive, send).__await__()
    try:
        step.send(None)
    except StopIteration:
        pass
    else:
        step.close()
        raise RuntimeError("a $batch part waited on the event loop: a changeset would not be isolated")
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in answer["headers"]
        if name.lower() not in (b"content-length",)
    }
    return answer["status"], headers, answer["body"]


def _part_scope(
    outer: Request, item: _BatchItem, api_root: str, locations: Mapping[str, str]
) -> tuple[dict, bytes]:
    """The ASGI scope and body of a part: its URL (absolute, root-relative or relative to the
    service root, or `$<Content-ID>...`) and its `$<Content-ID>` binds resolved."""
    url = item.url
    reference = _CONTENT_ID_REFERENCE.match(url)
    if reference:
        url = _location(reference[1], locations) + url[reference.end() :]
    target = urlsplit(url)
    path = target.path if target.scheme or url.startswith("/") else f"{api_root}/{target.path}"
    if not path.startswith(api_root + "/"):
        raise BatchError(f"The URL '{item.url}' of a request in the batch is not under {api_root}/.")
    body = _BIND_REFERENCE.sub(
        lambda match: match[1] + _location(match[2], locations) + match[3],
        item.body.decode("utf-8", "replace"),
    ).encode("utf-8")
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in item.headers]
    inherited = (b"host", b"authorization")  # a part is sent as its batch's caller, to its host
    given = {name for name, _ in headers}
    headers += [(name, value) for name, value in outer.scope["headers"] if name in inherited and name not in given]
    scope = {**part_scope(outer.scope, item.method, path, target.query, headers), BATCH_PART: True}
    return scope, body


def _location(content_id: str, locations: Mapping[str, str]) -> str:
    if content_id not in locations:
        raise BatchError(f"Content-ID Reference: '${content_id}' does not exist in the batch context.")
    return locations[content_id]


def _error_body(message: str) -> bytes:
    """A refused part's body, in the Web API's error shape (Choice: code 0x80040203, invalid argument)."""
    return json.dumps({"error": {"code": "0x80040203", "message": message}}).encode()
