"""The `$batch` wire format: what we send parses as OData multipart, and answers map to changesets."""

from __future__ import annotations

import json
from email import policy
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.parser import BytesParser

import httpx
import pytest

from b2b_onboarding.clients import batch
from b2b_onboarding.clients.batch import BatchRequest
from b2b_onboarding.clients.commerce import batch_answers
from b2b_onboarding.errors import D365Error


def test_each_changeset_becomes_a_multipart_part_with_numbered_requests():
    # A customer HQ numbers (no CustomerAccount sent); the prospect a write is for is never sent.
    customer = {"dataAreaId": "usrt", "PartyType": "Organization", "OrganizationName": "Contoso"}
    content_type, body = batch.encode([
        [BatchRequest("POST", "CustomersV3?cross-company=true", customer, prospect=("usrt", "P-1"))],
        [BatchRequest("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-2')?cross-company=true",
                      {"B2BProspectStatus": "Rejected"}, {"If-Match": 'W/"abc"'}, prospect=("usrt", "P-2"))],
    ])  # fmt: skip
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    changesets = list(message.iter_parts())
    assert [part.get_content_type() for part in changesets] == ["multipart/mixed", "multipart/mixed"]
    assert len({message.get_boundary(), *(part.get_boundary() for part in changesets)}) == 3  # no two alike
    created = next(changesets[0].iter_parts()).get_payload(decode=True).decode()
    assert created.startswith("POST CustomersV3?cross-company=true HTTP/1.1")
    assert json.loads(created.split("\r\n\r\n", 1)[1]) == customer
    assert "P-1" not in body.decode()
    request = next(changesets[1].iter_parts())
    assert request.get_content_type() == "application/http" and request["Content-ID"] == "1"
    text = request.get_payload(decode=True).decode()
    assert text.startswith("PATCH Prospects(dataAreaId='usrt',ProspectId='P-2')?cross-company=true HTTP/1.1")
    assert 'If-Match: W/"abc"' in text
    assert json.loads(text.split("\r\n\r\n", 1)[1]) == {"B2BProspectStatus": "Rejected"}


def test_answers_are_read_per_changeset_and_a_rolled_back_one_has_one_answer():
    body = "\r\n".join([
        "--batchresponse_1",
        "Content-Type: multipart/mixed; boundary=changesetresponse_a",
        "",
        "--changesetresponse_a",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "Content-ID: 1",
        "",
        "HTTP/1.1 201 Created",
        "Content-Type: application/json",
        "",
        '{"CustomerAccount": "USRT-000001", "PartyNumber": "000000001"}',
        "--changesetresponse_a",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "Content-ID: 2",
        "",
        "HTTP/1.1 204 No Content",
        "",
        "",
        "--changesetresponse_a--",
        "--batchresponse_1",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "",
        "HTTP/1.1 400 Bad Request",
        "Content-Type: application/json",
        "",
        '{"error": {"code": "", "message": "An error has occurred."}}',
        "--batchresponse_1--",
        "",
    ]).encode()  # fmt: skip
    first, second = batch.decode("multipart/mixed; boundary=batchresponse_1", body)
    assert [(part.status, part.ok) for part in first] == [(201, True), (204, True)]
    assert first[0].body == {"CustomerAccount": "USRT-000001", "PartyNumber": "000000001"}
    assert first[0].content_id == "1" and first[1].body is None
    assert len(second) == 1 and second[0].status == 400 and not second[0].ok


def test_an_answer_that_is_not_multipart_is_refused_loudly():
    with pytest.raises(ValueError, match="multipart"):
        batch.decode("application/json", b"{}")


# --- the decoder against the `email` package's reading, which it replaced -------------------------


def stdlib_decode(content_type: str, body: bytes) -> list[list[batch.BatchResponse]]:
    """The decoder before issue 17, on the `email` package: the reference the fast one must equal."""

    def response(part: Message) -> batch.BatchResponse:
        raw = part.get_payload(decode=True) or b""
        head, _, payload = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        status = int(head.split(b"\n", 1)[0].decode().split()[1])
        payload = payload.strip()
        return batch.BatchResponse(status, json.loads(payload) if payload else None, part.get("Content-ID"))

    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.is_multipart()
    return [[response(inner) for inner in part.iter_parts()] if part.is_multipart() else [response(part)]
            for part in message.iter_parts()]  # fmt: skip


CUSTOMER = {"CustomerAccount": "USRT-000001", "PartyNumber": "000000001", "OrganizationName": "Contoso"}
UNICODE = {"OrganizationName": "Ünïcødé Straße 株式会社 🚀", "Note": 'quote " backslash \\ tab \t'}
LARGE = {"@odata.etag": 'W/"JzEsNTYzNzE0NDU3NjsxLDY4NzE5NDc2NzM2Jw=="', **{f"Field{n}": "x" * 40 for n in range(12)}}
ERROR = {"error": {"code": "", "message": "An error has occurred.", "innererror": {"message": "Write failed"}}}
# An answer: (status line, JSON body or None); a changeset is a list of them, a plain part one of them.
CREATED, NO_CONTENT = ("HTTP/1.1 201 Created", CUSTOMER), ("HTTP/1.1 204 No Content", None)
ROLLED_BACK, READ = ("HTTP/1.1 400 Bad Request", ERROR), ("HTTP/1.1 200 OK", {"value": [CUSTOMER, UNICODE]})
MIXED = [[CREATED], [CREATED, NO_CONTENT], ROLLED_BACK, [("HTTP/1.1 201 Created", UNICODE), NO_CONTENT, NO_CONTENT,
         ("HTTP/1.1 201 Created", LARGE)], READ, [NO_CONTENT]]  # fmt: skip


def http_lines(answer: tuple[str, dict | None]) -> list[str]:
    status_line, body = answer
    if body is None:
        return [status_line, "OData-Version: 4.0", "", ""]
    return [status_line, "Content-Type: application/json; odata.metadata=minimal; charset=utf-8", "",
            json.dumps(body, ensure_ascii=False)]  # fmt: skip


def by_hand(parts, eol="\r\n", quoted=False, name=str, preamble="", epilogue="", padding="", content_id="{}"):
    """A `$batch` answer as a service writes one, with the freedoms RFC 2046 and HTTP leave it."""
    batch_boundary = "batchresponse_8f4e (1)=x" if quoted else "batchresponse_8f4e"
    lines = [preamble] if preamble else []

    def http_part(answer, number: int | None) -> list[str]:
        header = [f"{name('Content-Type')}: application/http", f"{name('Content-Transfer-Encoding')}: binary"]
        if number is not None:
            header.append(f"{name('Content-ID')}: {content_id.format(number)}")
        return [*header, "", *http_lines(answer)]

    for position, part in enumerate(parts):
        lines.append(f"--{batch_boundary}{padding}")
        if isinstance(part, list):
            boundary = f"changesetresponse_{position}"
            lines += [f'{name("Content-Type")}: multipart/mixed; {name("boundary")}="{boundary}"' if quoted else
                      f"{name('Content-Type')}: multipart/mixed; boundary={boundary}", ""]  # fmt: skip
            for number, answer in enumerate(part, start=1):
                lines += [f"--{boundary}{padding}", *http_part(answer, number)]
            lines.append(f"--{boundary}--{padding}")
        else:
            lines += http_part(part, None)
    lines.append(f"--{batch_boundary}--{padding}")
    parameter = f'"{batch_boundary}"' if quoted else batch_boundary
    return f"multipart/mixed; boundary={parameter}", (eol.join(lines) + eol + epilogue).encode()


def by_mime_writer(parts, linesep="\r\n"):
    """The same answer as the `email` package's MIME writer lays it out (its boundaries are quoted
    and hold `=`; each part has a MIME-Version header)."""
    chosen = policy.HTTP.clone(linesep=linesep)

    def http_part(answer, number: int | None) -> MIMENonMultipart:
        part = MIMENonMultipart("application", "http", policy=chosen)
        part["Content-Transfer-Encoding"] = "binary"
        if number is not None:
            part["Content-ID"] = str(number)
        # Bytes as the writer's surrogates: it writes them out unchanged.
        part.set_payload(linesep.join(http_lines(answer)).encode().decode("ascii", "surrogateescape"))
        return part

    outer = MIMEMultipart("mixed", policy=chosen)
    outer.preamble, outer.epilogue = "This is a multi-part message in MIME format.", "the epilogue"
    for part in parts:
        if isinstance(part, list):
            changeset = MIMEMultipart("mixed", policy=chosen)
            for number, answer in enumerate(part, start=1):
                changeset.attach(http_part(answer, number))
            outer.attach(changeset)
        else:
            outer.attach(http_part(part, None))
    written = outer.as_bytes()
    return outer["Content-Type"], written.split(linesep.encode() * 2, 1)[1]


ANSWERS = {
    "as HQ writes it": by_hand(MIXED),
    "one changeset of one create": by_hand([[CREATED]]),
    "a rolled-back changeset only": by_hand([ROLLED_BACK]),
    "100 changesets": by_hand([[("HTTP/1.1 201 Created", LARGE), NO_CONTENT]] * 100),
    "bare LF line ends": by_hand(MIXED, eol="\n"),
    "quoted boundaries": by_hand(MIXED, quoted=True),
    "preamble and epilogue": by_hand(MIXED, preamble="This is a preamble.\r\n--batchresponse_8f4e is not here",
                                     epilogue="an epilogue\r\n--batchresponse_8f4e\r\nignored"),
    "transport padding": by_hand(MIXED, padding=" \t "),
    "upper-case header names": by_hand(MIXED, name=str.upper, quoted=True),
    "lower-case header names": by_hand(MIXED, name=str.lower),
    "Content-ID with spaces": by_hand(MIXED, content_id="  {} "),
    "the MIME writer's CRLF": by_mime_writer(MIXED),
    "the MIME writer's LF": by_mime_writer(MIXED, linesep="\n"),
}  # fmt: skip


@pytest.mark.parametrize("content_type, body", ANSWERS.values(), ids=ANSWERS.keys())
def test_answers_are_read_as_the_email_package_reads_them(content_type, body):
    decoded = batch.decode(content_type, body)

    assert decoded == stdlib_decode(content_type, body)
    assert sum(map(len, decoded)) >= 1 and all(decoded)


def test_unusual_parts_are_read_alike_a_repeated_or_folded_header_and_no_blank_line_or_body_after_the_status():
    body = (b"--b\r\nContent-Type: application/http\r\nContent-ID: 1\r\nContent-ID: 2\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n"
            b"--b\r\nContent-ID: a\r\n  b\r\n\r\nHTTP/1.1 200 OK\r\n\r\n  \r\n--b--")  # fmt: skip

    assert batch.decode("multipart/mixed; boundary=b", body) == stdlib_decode("multipart/mixed; boundary=b", body) == [
        [batch.BatchResponse(204, None, "1")], [batch.BatchResponse(200, None, "a  b")]]  # fmt: skip


# --- malformed answers are refused, naming the batch and what is wrong -----------------------------

GOOD_TYPE, GOOD = by_hand([[CREATED, NO_CONTENT], ROLLED_BACK])
IN_BATCH = r"\$batch answer 'batchresponse_8f4e'"
IN_CHANGESET = rf"changeset 'changesetresponse_0' \(part 1 of {IN_BATCH}\)"


def broken(good: bytes, bad: bytes) -> bytes:
    assert good in GOOD
    return GOOD.replace(good, bad)


MALFORMED = {
    "no boundary parameter": (
        "multipart/mixed", GOOD, r"has no boundary parameter: 'multipart/mixed'"),
    "truncated": (
        GOOD_TYPE, GOOD[: len(GOOD) // 2],
        rf"{IN_BATCH} has no closing delimiter '--batchresponse_8f4e--': it is truncated"),
    "another boundary": (
        "multipart/mixed; boundary=batchresponse_other", GOOD,
        r"\$batch answer 'batchresponse_other' has no closing delimiter"),
    "a changeset without a boundary": (
        GOOD_TYPE, broken(b"; boundary=changesetresponse_0", b""),
        rf"part 1 of {IN_BATCH}: a changeset without a boundary parameter"),
    "a changeset without its closing delimiter": (
        GOOD_TYPE, broken(b"--changesetresponse_0--", b""), rf"{IN_CHANGESET} has no closing delimiter"),
    "not an HTTP status line": (
        GOOD_TYPE, broken(b"HTTP/1.1 400 Bad Request", b"400 Bad Request"),
        rf"not an HTTP status line in a \$batch answer: '400 Bad Request', in part 2 of {IN_BATCH}"),
    "a status that is not a number": (
        GOOD_TYPE, broken(b"HTTP/1.1 201 Created", b"HTTP/1.1 2O1 Created"),
        rf"not an HTTP status line .*'HTTP/1.1 2O1 Created', in answer 1 of {IN_CHANGESET}"),
    "a body that is not JSON": (
        GOOD_TYPE, broken(json.dumps(CUSTOMER).encode(), b"<html>Gateway</html>"),
        rf"answer 1 of {IN_CHANGESET}: its HTTP 201 answer's body is not JSON"),
    "headers without their blank line": (
        GOOD_TYPE, broken(b"binary\r\n\r\nHTTP/1.1 400", b"binary\r\nHTTP/1.1 400"),
        rf"part 2 of {IN_BATCH}: not a header line: 'HTTP/1.1 400 Bad Request'"),
    "a part without a blank line": (
        GOOD_TYPE, broken(b"\r\n--changesetresponse_0--", b"\r\n--changesetresponse_0\r\nContent-ID: 3\r\n"
                                                           b"--changesetresponse_0--"),
        rf"answer 3 of {IN_CHANGESET}: its headers are not ended by a blank line"),
    "an encoded part": (
        GOOD_TYPE, broken(b"Encoding: binary\r\n\r\nHTTP/1.1 400", b"Encoding: base64\r\n\r\nHTTP/1.1 400"),
        rf"part 2 of {IN_BATCH}: Content-Transfer-Encoding 'base64'"),
}  # fmt: skip


@pytest.mark.parametrize("content_type, body, problem", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_answer_is_refused_naming_its_boundary_and_the_problem(content_type, body, problem):
    with pytest.raises(ValueError, match=problem):
        batch.decode(content_type, body)


def test_a_malformed_answer_reaches_the_caller_as_a_failure_of_the_operation_with_its_request_id():
    answer = httpx.Response(200, headers={"Content-Type": GOOD_TYPE, "ms-dyn-aid": "5c7d0a4e-aid"}, content=GOOD[:-40])

    with pytest.raises(D365Error) as failed:
        batch_answers(answer, "approve B2B prospects", "d365_commerce")

    assert str(failed.value).startswith(
        "Commerce headquarters via Airflow connection 'd365_commerce': approve B2B prospects failed with HTTP 200: "
        "the $batch answer was malformed: $batch answer 'batchresponse_8f4e' has no closing delimiter"
    )
    assert str(failed.value).endswith(
        "Request id: 5c7d0a4e-aid (give it to Microsoft support). Next step: whether the writes were applied is "
        "unknown: rerun the task (nothing is written twice), and if it persists report it to Microsoft support with "
        "the request id."
    )
    assert not failed.value.is_record_error  # a failure of the whole request, never split up as a bad record
