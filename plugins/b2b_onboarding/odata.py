"""An OData v4 client on httpx: bearer auth, server-driven paging, typed errors, polite retries."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import tenacity

from .auth import TokenProvider, token_provider
from .errors import D365Error
from .settings import ServiceSettings

# Throttling and "service unavailable" are the two answers that promise a later success.
RETRYABLE_STATUSES = frozenset({429, 503})
# Throttling is waited out for this long in all before a task gives up; other retries count attempts.
MAX_THROTTLED_WAIT_S = 900.0


def literal(value: str) -> str:
    """An OData string literal for `$filter` (quotes doubled); httpx percent-encodes the query."""
    return "'" + str(value).replace("'", "''") + "'"


def key_segment(entity_set: str, **keys: str) -> str:
    """`Set(k='v',...)` for a URL path, each value quoted and fully percent-encoded.

    Encoding everything but the OData punctuation means no value (a `/`, `?`, `#`, `%`, a newline)
    can ever change which resource the path names.
    """
    parts = [f"{name}='{quote(str(value).replace(chr(39), chr(39) * 2), safe='')}'" for name, value in keys.items()]
    return f"{entity_set}({','.join(parts)})"


class _RetryableResponse(Exception):
    def __init__(self, error: D365Error, retry_after: float | None) -> None:
        self.error = error
        self.retry_after = retry_after


def _retry_after_seconds(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _backoff(attempt_number: int) -> float:
    return min(30.0, 0.5 * 2 ** (attempt_number - 1)) * random.uniform(0.5, 1.0)


class _Gate:
    """Holds back every request of a client while the service's Retry-After runs.

    Dataverse answers a client that keeps sending during a throttle with ever longer waits, so one
    429 pauses all of this client's threads, not only the one that received it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resume_at = 0.0

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def wait(self) -> None:
        while (delay := self._resume_at - time.monotonic()) > 0:
            time.sleep(delay)


def error_from_response(system: str, operation: str, response: httpx.Response, record: str | None) -> D365Error:
    """Reads both error dialects: Dataverse's `error.code/message` and F&O's `innererror.message`."""
    code, message = "", response.reason_phrase
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
        message = inner.get("message") or error.get("message") or message
    return D365Error(
        system=system, operation=operation, status=response.status_code, code=code, message=message, record=record
    )


class ODataClient:
    """One service root of one system, authenticated as one application."""

    def __init__(
        self,
        *,
        system: str,
        service_root: str,
        scope: str,
        tokens: TokenProvider,
        verify: str | bool = True,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        max_throttled_wait_s: float = MAX_THROTTLED_WAIT_S,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.system = system
        self.service_root = service_root.rstrip("/") + "/"
        self._scope = scope
        self._tokens = tokens
        self._max_attempts = max_attempts
        self._max_throttled_wait_s = max_throttled_wait_s
        self._gate = _Gate()
        # What this client sent, by operation, and how often it was throttled: each task reports both.
        self.requests: Counter[str] = Counter()
        self.throttled = 0
        self._count_lock = threading.Lock()
        self._http = httpx.Client(
            base_url=self.service_root,
            verify=verify,
            timeout=timeout_s,
            headers={"Accept": "application/json", **(headers or {})},
        )

    @classmethod
    def connect(
        cls, settings: ServiceSettings, *, system: str, root_path: str, headers: Mapping[str, str] | None = None
    ) -> ODataClient:
        """A client for the service root under the connection's environment URL."""
        secret = settings.client_secret.get_secret_value()
        return cls(
            system=system,
            service_root=settings.resource + root_path,
            scope=settings.scope,
            tokens=token_provider(settings.authority, settings.client_id, secret, settings.verify),
            verify=settings.verify,
            timeout_s=settings.timeout_s,
            headers=headers,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ODataClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        url: str,
        *,
        operation: str,
        record: str | None = None,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        accept: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Sends one request; waits out 429s (honouring Retry-After, pausing the whole client) and
        retries 503s with back-off; raises D365Error for any other failure not in `accept`."""

        def attempt() -> httpx.Response:
            self._gate.wait()
            auth = {"Authorization": f"Bearer {self._tokens.token(self._scope)}"}
            with self._count_lock:
                self.requests[operation] += 1
            try:
                response = self._http.request(
                    method, url, params=params, json=json, content=content, headers={**auth, **(headers or {})}
                )
            except httpx.TransportError as error:
                raise D365Error(
                    system=self.system, operation=operation, status=0, message=f"{type(error).__name__}: {error}",
                    record=record,
                ) from error
            if response.status_code < 400 or response.status_code in accept:
                return response
            failure = error_from_response(self.system, operation, response, record)
            if response.status_code in RETRYABLE_STATUSES:
                retry_after = _retry_after_seconds(response)
                if response.status_code == 429:
                    with self._count_lock:
                        self.throttled += 1
                    self._gate.pause(retry_after if retry_after is not None else _backoff(1))
                raise _RetryableResponse(failure, retry_after)
            raise failure

        throttled_since = time.monotonic()

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _RetryableResponse) and error.error.status == 429:
                return 0.0  # the gate already holds every request until Retry-After has passed
            if isinstance(error, _RetryableResponse) and error.retry_after is not None:
                return error.retry_after
            return _backoff(state.attempt_number)

        def stop(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _RetryableResponse) and error.error.status == 429:
                return time.monotonic() - throttled_since > self._max_throttled_wait_s
            return state.attempt_number >= self._max_attempts

        try:
            return tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_RetryableResponse), wait=wait, stop=stop, reraise=True
            )(attempt)
        except _RetryableResponse as exhausted:
            raise exhausted.error from None

    def get(self, url: str, *, operation: str, record: str | None = None, params=None, headers=None) -> dict | None:
        """One entity or collection page; None when the service answers 404."""
        response = self.request(
            "GET", url, operation=operation, record=record, params=params, headers=headers, accept=frozenset({404})
        )
        return None if response.status_code == 404 else response.json()

    def iter_page_bodies(
        self, url: str, *, operation: str, params: Mapping[str, str] | None = None, headers=None
    ) -> Iterator[dict]:
        """Each page's whole answer, following `@odata.nextLink` unchanged until the service stops paging."""
        page = self.request("GET", url, operation=operation, params=params, headers=headers).json()
        yield page
        while next_link := page.get("@odata.nextLink"):
            page = self.request("GET", next_link, operation=operation, headers=headers).json()
            yield page

    def iter_pages(
        self, url: str, *, operation: str, params: Mapping[str, str] | None = None, headers=None
    ) -> Iterator[list[dict]]:
        """The rows of each page."""
        for page in self.iter_page_bodies(url, operation=operation, params=params, headers=headers):
            yield page.get("value", [])
