"""OData v4 `$batch` over multipart/mixed: atomic changesets of writes out, their answers back in."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    unique = uuid.uuid4()  # one random part a batch: os.urandom per changeset was a measurable cost
    batch = f"batch_{unique}"
    lines: list[str] = []
    for number, changeset in enumerate(changesets, start=1):
        boundary = f"changeset_{unique}_{number}"
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
    or a single failed answer when it was rolled back. A malformed answer raises ValueError naming
    its boundary and what is wrong.

    Read by splitting on the delimiter lines (RFC 2046) rather than with the `email` package, whose
    header objects for every part cost half of a large reconciliation's CPU."""
    media_type, batch_boundary = _media_type(content_type)
    if media_type != "multipart/mixed":
        raise ValueError(f"a $batch answer must be multipart/mixed, got {content_type!r}")
    if not batch_boundary:
        raise ValueError(f"a $batch answer's Content-Type has no boundary parameter: {content_type!r}")
    # Lenient about line ends, like the `email` parser: a bare LF ends a line as CRLF does.
    parts = _parts(body.replace(b"\r\n", b"\n"), batch_boundary.encode(), f"$batch answer {batch_boundary!r}")
    answers = []
    for number, part in enumerate(parts, start=1):
        where = f"part {number} of $batch answer {batch_boundary!r}"
        headers, content = _headers(part, where)
        media_type, changeset_boundary = _media_type(headers.get("content-type", ""))
        if media_type != "multipart/mixed":
            answers.append([_response(headers, content, where)])  # a rolled-back changeset, or a single request
            continue
        if not changeset_boundary:
            raise ValueError(f"{where}: a changeset without a boundary parameter: {headers['content-type']!r}")
        changeset = f"changeset {changeset_boundary!r} ({where})"
        # Headers are read as latin-1: encoding back gives the boundary's bytes as they were sent.
        inner_parts = _parts(content, changeset_boundary.encode("latin-1"), changeset)
        answers.append([_answer(inner, f"answer {position} of {changeset}")
                        for position, inner in enumerate(inner_parts, start=1)])  # fmt: skip
    return answers


# A parameter of a Content-Type: name=token or name="quoted string".
_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")
_STATUS_LINE = re.compile(rb"HTTP/\S+[ \t]+([0-9]{3})(?:[ \t]|$)")
# Transfer encodings that leave a part's bytes as they are; OData sends `binary`.
_IDENTITY_ENCODINGS = frozenset({"", "binary", "8bit", "7bit"})


def _media_type(content_type: str) -> tuple[str, str | None]:
    """The media type of a Content-Type value, lower-cased, and its `boundary` parameter if any."""
    media_type, _, parameters = content_type.partition(";")
    for name, value in _PARAMETER.findall(";" + parameters):
        if name.lower() == "boundary":
            unquoted = _QUOTED_PAIR.sub(r"\1", value[1:-1]) if value.startswith('"') else value
            return media_type.strip().lower(), unquoted.rstrip()
    return media_type.strip().lower(), None


def _parts(data: bytes, boundary: bytes, whole: str) -> list[bytes]:
    """The parts of a multipart body whose lines end in LF: what lies between its delimiter lines,
    without the preamble and the epilogue. A delimiter line is `--boundary` (`--boundary--` for the
    last), then optional transport padding; the line end before it belongs to it."""
    dash = b"--" + boundary
    line_before = b"\n" + dash

    def next_candidate(start: int) -> int:
        """Where the next line from `start` that begins with `--boundary` begins; -1 when none does."""
        found = data.find(line_before, start)
        return -1 if found == -1 else found + 1

    line_start = 0 if data.startswith(dash) else next_candidate(0)
    parts: list[bytes] = []
    content_start: int | None = None
    while line_start != -1:
        after_dash = line_start + len(dash)
        closing = data.startswith(b"--", after_dash)
        line_end = data.find(b"\n", after_dash)
        line_end = len(data) if line_end == -1 else line_end
        if not data[after_dash + 2 * closing : line_end].strip(b" \t"):  # not content that merely starts alike
            if content_start is not None:
                parts.append(data[content_start : line_start - 1])
            if closing:
                return parts
            content_start = line_end + 1
        line_start = next_candidate(line_end)
    closing_delimiter = (dash + b"--").decode("latin-1")
    raise ValueError(f"{whole} has no closing delimiter {closing_delimiter!r}: it is truncated, or not delimited by it")


def _headers(part: bytes, where: str) -> tuple[dict[str, str], bytes]:
    """A part's headers (lower-cased names; the first of a repeated one) and its content."""
    if part.startswith(b"\n"):
        return {}, part[1:]
    end = part.find(b"\n\n")
    if end == -1:
        raise ValueError(f"{where}: its headers are not ended by a blank line: {part[:80]!r}")
    fields: list[list[str]] = []
    for line in part[:end].decode("latin-1").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += line  # a folded header goes on
            continue
        name, colon, value = line.partition(":")
        if not colon or not name:
            raise ValueError(f"{where}: not a header line: {line!r}")
        fields.append([name.lower(), value.lstrip(" \t")])
    headers: dict[str, str] = {}
    for name, value in fields:
        headers.setdefault(name, value)
    return headers, part[end + 2 :]


def _answer(part: bytes, where: str) -> BatchResponse:
    return _response(*_headers(part, where), where)


def _response(headers: dict[str, str], content: bytes, where: str) -> BatchResponse:
    """An `application/http` part: status line, headers, blank line, JSON body."""
    encoding = headers.get("content-transfer-encoding", "").strip().lower()
    if encoding not in _IDENTITY_ENCODINGS:
        raise ValueError(f"{where}: Content-Transfer-Encoding {encoding!r}; a $batch answer's parts are binary")
    head, _, payload = content.partition(b"\n\n")
    status_line = head.partition(b"\n")[0]
    if not (found := _STATUS_LINE.match(status_line)):
        raise ValueError(f"not an HTTP status line in a $batch answer: {status_line.decode('latin-1')!r}, in {where}")
    status = int(found[1])
    payload = payload.strip()
    try:
        body = json.loads(payload) if payload else None
    except ValueError as error:
        raise ValueError(f"{where}: its HTTP {status} answer's body is not JSON ({error}): {payload[:80]!r}") from None
    return BatchResponse(status, body, headers.get("content-id"))
