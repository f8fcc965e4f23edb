"""Keeps credentials out of logs: a `logging.Filter` that rewrites every record before any handler sees it.

What it hides, wherever it appears in a record's message, arguments, traceback or stack text:

- `Bearer <token>` (an Authorization header, any case) → `Bearer ***`
- JWT-shaped strings (three base64url segments, the first starting `eyJ`) → `***`
- form fields `client_secret=`, `client_assertion=`, `access_token=`, `refresh_token=` → `<field>=***`
- JSON or Python-repr fields `"access_token": "..."` (and `refresh_token`, `id_token`,
  `client_secret`) → `"access_token": "***"`
- every value given to `register_secret` (the client secret, each access token) → `***`

Plain Python, no Airflow: the TokenProvider registers what it holds, the hooks call `install()`.
Airflow's own secrets masker runs as well in a task; this filter also covers the libraries' loggers
(msal, httpx, httpcore) and any handler Airflow's masker does not sit in front of.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote

REPLACEMENT = "***"
# Shorter values would redact ordinary words; real client secrets and tokens are far longer.
MIN_SECRET_LENGTH = 6
# The loggers the product and its HTTP and identity libraries write to; their children too.
LOGGERS = ("b2b_onboarding", "msal", "httpx", "httpcore")
# Children that may not exist yet when `install` runs (httpx imports httpcore on its first client),
# named so that they get the filter anyway; any other child present at `install` time gets it too.
KNOWN_CHILDREN = ("httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy", "httpcore.socks")

_TOKEN_CHARS = r"[A-Za-z0-9\-._~+/]"  # RFC 6750 b64token
_B64URL = r"[A-Za-z0-9_-]"
_PATTERNS = (
    # `Bearer <token>`: the token is any run of b64token characters (plus padding) after the word.
    rf"(?P<bearer>(?<![A-Za-z0-9])[Bb][Ee][Aa][Rr][Ee][Rr])\s+(?!\*\*\*){_TOKEN_CHARS}+=*",
    # A JWT (JWS compact form): header.payload.signature, header and payload base64url JSON objects.
    rf"(?<![A-Za-z0-9_-])eyJ{_B64URL}*\.{_B64URL}+\.{_B64URL}*",
    # A form-encoded credential field, up to the next field, quote or space.
    r"(?P<field>(?<![A-Za-z0-9_])(?:client_secret|client_assertion|access_token|refresh_token)=)(?!\*\*\*)"
    r"[^&\s'\"]+",
    # A credential member of a JSON document or a Python dict repr.
    r"(?P<member>(?P<quote>[\"'])(?:access_token|refresh_token|id_token|client_secret)(?P=quote)\s*:\s*"
    r"(?P<value_quote>[\"']))(?!\*\*\*(?P=value_quote))(?:\\.|(?!(?P=value_quote)).)*(?P=value_quote)",
)

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_list: tuple[str, ...] = ()  # the same, for the quick substring look
_pattern: re.Pattern[str] = re.compile("|".join(_PATTERNS), re.DOTALL)
_installed_on: list[logging.Logger | logging.Handler] = []


def _compile(secrets: set[str]) -> re.Pattern[str]:
    # Longest first, so a secret that contains another is hidden whole.
    literal = "|".join(re.escape(secret) for secret in sorted(secrets, key=len, reverse=True))
    return re.compile("|".join(_PATTERNS + ((f"(?P<secret>{literal})",) if literal else ())), re.DOTALL)


def register_secret(value: str | None) -> None:
    """Hides `value` (and its URL-encoded form) in every log record from now on, process-wide.

    Cheap for a value already registered (a set lookup), so callers may register on every use."""
    if not value or len(value) < MIN_SECRET_LENGTH or value in _secrets:
        return
    global _pattern, _secret_list
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _secrets.add(quote(value, safe=""))  # as it travels in a form body or a query string
        _pattern = _compile(_secrets)  # the pattern first: a secret in the quick look is then always matched
        _secret_list = tuple(_secrets)


def _replace(match: re.Match[str]) -> str:
    groups = match.groupdict()
    if groups["bearer"]:
        return f"{groups['bearer']} {REPLACEMENT}"
    if groups["field"]:
        return groups["field"] + REPLACEMENT
    if groups["member"]:
        return groups["member"] + REPLACEMENT + groups["value_quote"]
    return REPLACEMENT


def _may_hold_credentials(text: str) -> bool:
    """A cheap first look (substring tests run in C): can any pattern or registered secret match?"""
    if "eyJ" in text or "secret" in text or "token" in text or "assertion" in text or "bearer" in text.lower():
        return True
    return any(secret in text for secret in _secret_list)


def redact(text: str) -> str:
    """`text` with every credential it contains replaced; the same object when it holds none."""
    if not _may_hold_credentials(text):
        return text
    pattern = _pattern
    if pattern.search(text) is None:
        return text
    return pattern.sub(_replace, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments merged in), traceback and stack text; never drops one."""

    _DONE = "_b2b_redacted"

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self._DONE, False):
            return True
        setattr(record, self._DONE, True)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it for the handler to report as Python does
            return True
        clean = redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            trace = record.exc_text or logging.Formatter().formatException(record.exc_info)
            clean_trace = redact(trace)
            if clean_trace is not trace:
                # Formatters render exc_info themselves (and structlog ignores exc_text): the only
                # way to be sure the cleaned traceback is what gets written is to make it the message.
                clean = f"{clean}\n{clean_trace}"
                record.exc_info, record.exc_text = None, None
        if clean is not message:
            record.msg, record.args = clean, ()
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_filter = RedactingFilter()


def install() -> RedactingFilter:
    """Puts the filter on the product's and libraries' loggers (and their existing children) and on the
    root logger's handlers. Idempotent and cheap: call it whenever a client is built."""
    targets: list[logging.Logger | logging.Handler] = [logging.getLogger(name) for name in LOGGERS + KNOWN_CHILDREN]
    children = [
        logger for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and name not in KNOWN_CHILDREN
        and any(name.startswith(prefix + ".") for prefix in LOGGERS)
    ]  # fmt: skip
    targets += children
    for logger in list(targets):
        targets += logger.handlers
    targets += logging.getLogger().handlers
    with _lock:
        for target in targets:
            if _filter not in target.filters:
                target.addFilter(_filter)
                _installed_on.append(target)
    return _filter


def uninstall() -> None:
    """Takes the filter off everything `install` put it on (for tests)."""
    with _lock:
        for target in _installed_on:
            target.removeFilter(_filter)
        _installed_on.clear()
