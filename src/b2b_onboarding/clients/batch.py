"""OData v4 `$batch` over multipart/mixed: atomic changesets of writes out, their answers back in."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import Any

CRLF = "\r\n"


@dataclass(frozen=True)
class BatchRequest:
    """One write inside a changeset; `url` is relative to the service root and may carry a query."""

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # The (legal entity, prospect id) the write is for: named in a dry run's plan, never sent.
    prospect: tuple[str, str] | None = None


@dataclass(frozen=True)
class BatchResponse:
    status: int
    body: Any
    content_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400


def encode(changesets: Sequence[Sequence[BatchRequest]]) -> tuple[str, bytes]:
    """(Content-Type, body) of a `$batch` request holding one changeset per item."""
    batch = f"batch_{uuid.uuid4()}"
    lines: list[str] = []
    for changeset in changesets:
        boundary = f"changeset_{uuid.uuid4()}"
        lines += [f"--{batch}", f"Content-Type: multipart/mixed; boundary={boundary}", ""]
        for content_id, request in enumerate(changeset, start=1):
            lines += [
                f"--{boundary}",
                "Content-Type: application/http",
                "Content-Transfer-Encoding: binary",
                f"Content-ID: {content_id}",
                "",
                f"{request.method} {request.url} HTTP/1.1",
                "Content-Type: application/json",
                *(f"{name}: {value}" for name, value in request.headers.items()),
                "",
                json.dumps(request.body) if request.body is not None else "",
            ]
        lines.append(f"--{boundary}--")
    lines += [f"--{batch}--", ""]
    return f"multipart/mixed; boundary={batch}", CRLF.join(lines).encode()


def decode(content_type: str, body: bytes) -> list[list[BatchResponse]]:
    """The answers per changeset, in order: every request's answer when the changeset was applied,
    or a single failed answer when it was rolled back."""
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise ValueError(f"a $batch answer must be multipart/mixed, got {content_type!r}")
    return [
        [_response(inner) for inner in part.iter_parts()] if part.is_multipart() else [_response(part)]
        for part in message.iter_parts()
    ]


def _response(part: Message) -> BatchResponse:
    """An `application/http` part: status line, headers, blank line, JSON body."""
    raw = part.get_payload(decode=True) or b""
    head, _, payload = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    status_line = head.split(b"\n", 1)[0].decode()
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise ValueError(f"not an HTTP status line in a $batch answer: {status_line!r}") from None
    payload = payload.strip()
    return BatchResponse(status, json.loads(payload) if payload else None, part.get("Content-ID"))
