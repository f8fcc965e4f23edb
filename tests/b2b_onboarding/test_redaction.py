"""The product's log redaction: each credential shape, registered secrets, and no false alarms."""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid

import pytest

from b2b_onboarding import redaction

# A real-looking RS256 JWT (header.payload.signature), as Entra ID issues them.
JWT = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJodHRwczovL2NvbnRvc28uY3JtLmR5bmFtaWNzLmNvbSIsImFwcGlkIjoiMSJ9"
    ".Qm9ndXMtc2lnbmF0dXJlLWJ1dC1zaGFwZWQtbGlrZS1vbmVfXy0tXw"
)
# What the end-to-end test greps for: an unredacted JWT or bearer credential.
LEAK = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.|Bearer\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]+")


@pytest.fixture
def captured():
    """Records of a private logger, formatted by a plain handler that carries the filter, as `install` does."""
    logger = logging.getLogger(f"b2b_onboarding.test_redaction.{uuid.uuid4().hex}")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(redaction.RedactingFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, lines
    logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer ***"),
        ("headers={'Authorization': 'Bearer abc.DEF-123_~+/=='}", "headers={'Authorization': 'Bearer ***'}"),
        ("[(b'authorization', b'bearer opaque-token-0123')]", "[(b'authorization', b'bearer ***')]"),
        (f"token {JWT} expired", "token *** expired"),
        (f"{JWT}", "***"),
        ("grant_type=client_credentials&client_id=app&client_secret=s%2Bcr~et&scope=x",
         "grant_type=client_credentials&client_id=app&client_secret=***&scope=x"),
        ("client_assertion=abc.def.ghi&x=1", "client_assertion=***&x=1"),
        ('{"token_type": "Bearer", "expires_in": 3599, "access_token": "opaque\\"token"}',
         '{"token_type": "Bearer", "expires_in": 3599, "access_token": "***"}'),
        ("{'access_token': 'abc', 'refresh_token': 'def'}", "{'access_token': '***', 'refresh_token': '***'}"),
        ('{"client_secret":"s3cr3t-value"}', '{"client_secret":"***"}'),
    ],
)  # fmt: skip
def test_each_credential_shape_is_redacted(text, expected):
    assert redaction.redact(text) == expected
    assert not LEAK.search(redaction.redact(text))


@pytest.mark.parametrize(
    "text",
    [
        "prospect usrt/P-000123 became a lead (3fa85f64-5717-4562-b306-2c963f66afa6)",
        "GET https://contoso.crm.dynamics.com/api/data/v9.2/leads?$filter=(msdyn_prospectid eq 'P-000001' and "
        "_msdyn_company_value eq 0b5c9a4e-2f6d-5a8b-9c3e-1d7f4b2a6e90) or msdyn_prospectid eq 'usrt:P-000001'",
        'HTTP Request: POST https://127.0.0.1:8441/tenant/oauth2/v2.0/token "HTTP/1.1 200 OK"',
        "pull_prospects\n  step  commerce_requests  dataverse_requests\n0 pull  12  0",
        "token_type=Bearer; expires_in=3599",  # a field *named* token is not a token
        "eyJ is how base64 JSON starts; eyJhbGciOiJIUzI1NiJ9 alone is no token",
        "a.b.c version 1.2.3 and file.name.txt",
        "the access token was refreshed; client secret rotated",
        "",
    ],
)
def test_ordinary_text_is_left_exactly_as_it_was(text):
    assert redaction.redact(text) is text


def test_a_registered_secret_is_hidden_as_is_and_url_encoded():
    secret = secrets.token_urlsafe(24) + "+/="
    text = f"secret={secret} encoded={secret.replace('+', '%2B').replace('/', '%2F').replace('=', '%3D')}"
    assert redaction.redact(text) is text  # not registered yet: its shape alone does not give it away
    redaction.register_secret(secret)
    assert redaction.redact(text) == "secret=*** encoded=***"


def test_values_too_short_to_be_secrets_are_not_registered():
    redaction.register_secret("abc")
    redaction.register_secret("")
    redaction.register_secret(None)
    assert redaction.redact("abc abcdef") == "abc abcdef"


def test_message_and_arguments_are_redacted_after_formatting(captured):
    logger, lines = captured
    secret = "cs-" + secrets.token_urlsafe(24)
    redaction.register_secret(secret)

    logger.info("sending %s with %r", {"Authorization": f"Bearer {JWT}"}, secret)
    logger.debug("token %(token)s for %(client)s", {"token": JWT, "client": "b2b-onboarding-airflow"})
    logger.info("prospect usrt/P-000001 pulled; %d requests", 12)

    assert lines == [
        "INFO sending {'Authorization': 'Bearer ***'} with '***'",
        "DEBUG token *** for b2b-onboarding-airflow",
        "INFO prospect usrt/P-000001 pulled; 12 requests",
    ]


def test_exception_text_is_redacted(captured):
    logger, lines = captured
    try:
        raise RuntimeError(f"the service echoed Authorization: Bearer {JWT}")
    except RuntimeError:
        logger.exception("call failed")
    assert JWT not in lines[0] and "Bearer ***" in lines[0]
    assert lines[0].startswith("ERROR call failed\nTraceback") and "RuntimeError" in lines[0]


def test_without_the_filter_the_same_record_would_leak(captured):
    """The negative control: the grep used on the end-to-end logs does catch an unredacted token."""
    logger, lines = captured
    plain: list[str] = []
    unfiltered = logging.getLogger(f"b2b_onboarding.test_redaction.plain.{uuid.uuid4().hex}")
    unfiltered.propagate = False
    handler = logging.Handler()
    handler.emit = lambda record: plain.append(record.getMessage())  # type: ignore[method-assign]
    unfiltered.addHandler(handler)
    unfiltered.warning("Authorization: Bearer %s", JWT)
    logger.warning("Authorization: Bearer %s", JWT)
    assert LEAK.search(plain[0]) and not LEAK.search(lines[0])


def test_install_covers_the_libraries_loggers_and_their_children_idempotently():
    import httpx  # noqa: F401  (their loggers exist once imported)
    import msal  # noqa: F401

    try:
        installed = redaction.install()
        redaction.install()
        for name in ("b2b_onboarding", "msal", "msal.application", "httpx", "httpcore", "httpcore.http11"):
            assert logging.getLogger(name).filters.count(installed) == 1, name
        for handler in logging.getLogger().handlers:
            assert handler.filters.count(installed) == 1
    finally:
        redaction.uninstall()
    assert installed not in logging.getLogger("msal.application").filters


def test_an_installed_filter_rewrites_a_library_record_for_every_handler(caplog):
    caplog.set_level(logging.DEBUG, logger="httpcore.http11")
    try:
        redaction.install()
        logging.getLogger("httpcore.http11").debug("send_request_headers %s", [(b"Authorization", f"Bearer {JWT}")])
    finally:
        redaction.uninstall()
    assert caplog.messages == ["send_request_headers [(b'Authorization', 'Bearer ***')]"]


def test_redaction_is_cheap_when_nothing_matches():
    for _ in range(5):
        redaction.register_secret(secrets.token_urlsafe(32))
    line = "prospect usrt/P-000123 lead 3fa85f64-5717-4562-b306-2c963f66afa6 upserted in 12 ms; 4 of 5000 done " * 4
    started = time.perf_counter()
    for _ in range(2000):
        redaction.redact(line)
    per_line_us = (time.perf_counter() - started) / 2000 * 1e6
    assert per_line_us < 200, f"{per_line_us:.0f} µs per line"
