"""The `$batch` body reader (Commerce's, which Dataverse's `$batch` shares): bodies in the plain shape
clients write are split without the stdlib `email` parser, and every body, plain, odd or malformed,
is answered exactly as that parser's reading answers it (the same parts, or the same 400)."""

from __future__ import annotations

import json
import random

import pytest

from d365_fakes.commerce import ODataError, _parse_batch, _parse_batch_with_email, _split_batch

CRLF = "\r\n"


def product_batch(changesets: int = 3, requests: int = 2) -> tuple[str, bytes]:
    """As the product's client writes a `$batch`: changesets closed right before the next delimiter."""
    lines = []
    for number in range(1, changesets + 1):
        boundary = f"changeset_77_{number}"
        lines += ["--batch_77", f"Content-Type: multipart/mixed; boundary={boundary}", ""]
        for content_id in range(1, requests + 1):
            lines += [f"--{boundary}", "Content-Type: application/http", "Content-Transfer-Encoding: binary",
                      f"Content-ID: {content_id}", "", "POST CustomersV3?cross-company=true HTTP/1.1",
                      "Content-Type: application/json", "If-Match: *", "",
                      json.dumps({"Name": "Müller", "n": content_id})]
        lines.append(f"--{boundary}--")
    lines += ["--batch_77", "Content-Type: application/http", "", "GET Prospects HTTP/1.1",
              "Accept: application/json", ""]
    lines += ["--batch_77--", ""]
    return "multipart/mixed; boundary=batch_77", CRLF.join(lines).encode()


def sdk_batch() -> tuple[str, bytes]:
    """As Microsoft's PowerPlatform Dataverse client writes one: quoted boundaries, an empty line
    after each changeset."""

    def part(boundary: str, method: str, url: str, body: str | None = None, content_id: str | None = None) -> str:
        head = [f"--{boundary}", "Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        head += [f"Content-ID: {content_id}"] if content_id else []
        inner = [f"{method} {url} HTTP/1.1", *(["Content-Type: application/json; type=entry"] if body else []), ""]
        return CRLF.join(head) + CRLF + CRLF + CRLF.join(inner + ([body] if body else [])) + CRLF

    changeset = part("cs_1", "POST", "leads", '{"lastname": "Lee"}', "1") + part("cs_1", "PATCH", "$1", "{}", "2")
    changeset += f"--cs_1--{CRLF}"
    body = part("batch_B", "GET", "leads?$top=1")
    body += f'--batch_B{CRLF}Content-Type: multipart/mixed; boundary="cs_1"{CRLF}{CRLF}{changeset}{CRLF}'
    body += f"--batch_B--{CRLF}"
    return 'multipart/mixed; boundary="batch_B"', body.encode()


def outcome(parse, content_type: str, body: bytes) -> tuple:
    try:
        return ("parts", parse(content_type, body))
    except ODataError as error:
        return ("refused", error.status, error.message)
    except Exception as error:  # the stdlib reading may fail on a header it keeps as a Header object
        return ("failed", type(error).__name__)


@pytest.mark.parametrize("written", [product_batch(), product_batch(1, 1), sdk_batch()])
def test_the_plain_shapes_are_split_without_the_email_parser(written: tuple[str, bytes]) -> None:
    content_type, body = written
    split = _split_batch(content_type, body)
    assert split is not None
    assert split == _parse_batch(content_type, body) == _parse_batch_with_email(content_type, body)


def test_what_a_split_part_holds() -> None:
    [changeset, single] = _split_batch(*product_batch(1, 1))
    [create] = changeset
    assert (create.method, create.url, create.content_id) == ("POST", "CustomersV3?cross-company=true", "1")
    assert create.headers == (("Content-Type", "application/json"), ("If-Match", "*"))
    assert json.loads(create.body) == {"Name": "Müller", "n": 1}
    assert (single.method, single.url, single.content_id, single.body) == ("GET", "Prospects", None, b"")


def _with(body: bytes, old: str, new: str) -> bytes:
    assert old.encode() in body
    return body.replace(old.encode(), new.encode(), 1)


PLAIN_TYPE, PLAIN = product_batch(2, 2)
ODD_OR_MALFORMED = [
    ("application/json", b"{}"),
    ("multipart/mixed", PLAIN),
    ("multipart/mixed; boundary=other", PLAIN),
    (PLAIN_TYPE + "; charset=utf-8", PLAIN),
    (PLAIN_TYPE, b"not a multipart body"),
    (PLAIN_TYPE, PLAIN[: -len(b"--batch_77--\r\n")]),  # no close delimiter
    (PLAIN_TYPE, b"a preamble\r\n" + PLAIN),
    (PLAIN_TYPE, PLAIN + b"an epilogue\r\n"),
    (PLAIN_TYPE, PLAIN.replace(b"\r\n", b"\n")),  # bare LF line ends
    (PLAIN_TYPE, _with(PLAIN, "--batch_77\r\n", "--batch_77  \r\n")),  # white space after a delimiter
    (PLAIN_TYPE, _with(PLAIN, "Content-Type: application/http", "Content-Type: application/json")),
    (PLAIN_TYPE, _with(PLAIN, "Content-Type: application/http", "Content-Type:  Application/HTTP ; x=1")),
    (PLAIN_TYPE, _with(PLAIN, "Content-Transfer-Encoding: binary", "Content-Transfer-Encoding: base64")),
    (PLAIN_TYPE, _with(PLAIN, "Content-ID: 1\r\n", "Content-ID: 1\r\n continued\r\n")),  # a folded header
    (PLAIN_TYPE, _with(PLAIN, "Content-ID: 1\r\n", "Content-ID: é\r\n")),
    (PLAIN_TYPE, _with(PLAIN, "Content-ID: 2", "Content-ID: 1")),  # twice in a changeset
    (PLAIN_TYPE, _with(PLAIN, "POST CustomersV3?cross-company=true HTTP/1.1", "POST CustomersV3")),
    (PLAIN_TYPE, _with(PLAIN, "POST CustomersV3?cross-company=true HTTP/1.1", "GET Prospects HTTP/1.1")),
    (PLAIN_TYPE, _with(PLAIN, "If-Match: *", "If-Match *")),  # not a header: the body starts there
    (PLAIN_TYPE, _with(PLAIN, "If-Match: *", "If-Match: *\r\n" + "X-Many: 1\r\n" * 120)),
    (PLAIN_TYPE, _with(PLAIN, '"n": 1}', '"n": 1}\r\n--batch_77')),  # the delimiter inside a part
    (PLAIN_TYPE, _with(PLAIN, "boundary=changeset_77_1", "boundary=batch_77")),  # a changeset reusing it
    (PLAIN_TYPE, _with(PLAIN, "--changeset_77_1--", "")),  # a changeset never closed
    (PLAIN_TYPE, _with(PLAIN, "Content-Type: multipart/mixed; boundary=changeset_77_2",
                       "Content-Type: multipart/mixed; boundary=changeset_77_2\r\nContent-Transfer-Encoding: base64")),
]


@pytest.mark.parametrize(("content_type", "body"), ODD_OR_MALFORMED)
def test_odd_and_malformed_bodies_are_answered_as_the_email_parser_reads_them(content_type: str, body: bytes) -> None:
    assert outcome(_parse_batch, content_type, body) == outcome(_parse_batch_with_email, content_type, body)


def test_the_tested_refusals_keep_their_messages() -> None:
    refusal = outcome(_parse_batch, PLAIN_TYPE, _with(PLAIN, "Content-ID: 2", "Content-ID: 1"))
    assert refusal == ("refused", 400, "The $batch request is not valid: a Content-ID is used twice in one changeset.")
    nested_get = outcome(_parse_batch, PLAIN_TYPE, _with(PLAIN, "POST CustomersV3?cross-company=true HTTP/1.1",
                                                        "GET Prospects HTTP/1.1"))  # fmt: skip
    assert nested_get[:2] == ("refused", 400) and "GET Prospects is inside a changeset" in nested_get[2]


def test_random_damage_is_answered_as_the_email_parser_reads_it() -> None:
    """Bytes inserted, deleted or replaced at random (line ends, delimiters, header syntax), a
    fixed seed: the fast reader either declines (the stdlib reads the body) or agrees with it."""
    fragments = [b"\r\n", b"\r", b"\n", b" ", b"\t", b"--", b":", b";", b'"', b"--batch_77", b"--changeset_77_1",
                 b"--batch_B", b"--cs_1", b"From ", b"\xc3\xa9", b"\r\n\r\n", b"HTTP/1.1", b"GET "]
    written = [product_batch(2, 2), sdk_batch()]
    generator = random.Random(20240917)
    split = 0
    for _ in range(3000):
        content_type, original = generator.choice(written)
        body = bytearray(original)
        for _ in range(generator.randint(1, 3)):
            position = generator.randrange(len(body) + 1)
            if generator.random() < 0.5:
                body[position:position] = generator.choice(fragments)
            else:
                body[position : position + generator.randint(1, 4)] = generator.choice([b"", *fragments])
        damaged = bytes(body)
        split += _split_batch(content_type, damaged) is not None
        assert outcome(_parse_batch, content_type, damaged) == outcome(_parse_batch_with_email, content_type, damaged)
    assert split > 300  # harmless damage (inside a JSON body, say) still takes the fast path
