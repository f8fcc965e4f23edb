"""An OData v4 client on httpx: bearer auth, server-driven paging, typed errors, polite retries."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import tenacity

from b2b_onboarding.clients.auth import TokenProvider, token_provider
from b2b_onboarding.clients.settings import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BUDGET, ServiceSettings
from b2b_onboarding.errors import (
    AuthenticationError,
    ConfigurationError,
    D365Error,
    certificate_failure_message,
    certificate_verify_failure,  # fmt: skip
    via,
)

log = logging.getLogger(__name__)

# Answers that promise a later success: throttling, and the gateway and server failures a repeat cures.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# Throttling is waited out for this long per task before it gives up (Retry-After summed).
MAX_THROTTLED_WAIT_S = 900.0
# A task may retry `retry_budget` times plus this share of its requests: a storm of failures fails
# the task within minutes instead of retrying every request to its last attempt.
RETRY_RATIO = 0.2
# MSAL answers a token request repeated within 5 s of a 5xx from its own cache (ThrottledHttpClient).
TOKEN_RETRY_MIN_WAIT_S = 5.0


# No key or filter value of these services comes near this; the bound keeps every URL far below the
# services' and httpx's length limits, however much percent-encoding a value needs (up to 12 times).
MAX_URL_VALUE_LENGTH = 1000


def _url_value(value: str) -> str:
    """The value, if it can go into a URL as text: a string, valid Unicode, of bounded length."""
    if not isinstance(value, str):
        raise TypeError(f"a key or filter value must be a string, not {type(value).__name__} {value!r}")
    if len(value) > MAX_URL_VALUE_LENGTH:
        raise ValueError(
            f"the value {value[:40]!r}... is {len(value)} characters long; a key or filter value in a URL may "
            f"have at most {MAX_URL_VALUE_LENGTH}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the value {value[:40]!r} is not valid Unicode text ({error.reason})") from None
    return value


def literal(value: str) -> str:
    """An OData string literal for `$filter` (quotes doubled); httpx percent-encodes the query, `+`
    and `&` included, so nothing in the value can end the literal or the query option."""
    return "'" + _url_value(value).replace("'", "''") + "'"


def key_segment(entity_set: str, **keys: str) -> str:
    """`Set(k='v',...)` for a URL path, each value quoted and fully percent-encoded.

    Encoding everything but the OData punctuation means no value (a `/`, `?`, `#`, `%`, a newline)
    can ever change which resource the path names.
    """
    parts = [f"{name}='{quote(_url_value(value).replace(chr(39), chr(39) * 2), safe='')}'"
             for name, value in keys.items()]  # fmt: skip
    return f"{entity_set}({','.join(parts)})"


class RetryBudget:
    """The retries one client (so one task, per system) may spend: `retry_budget` plus a fifth of its
    requests, and `MAX_THROTTLED_WAIT_S` of throttling. Thread-safe; shared by a client's threads."""

    def __init__(self, retries: int = DEFAULT_RETRY_BUDGET, throttled_wait_s: float = MAX_THROTTLED_WAIT_S) -> None:
        self._lock = threading.Lock()
        self._base = retries
        self._throttled_wait_limit_s = throttled_wait_s
        self.requests = 0
        self.retries = 0
        self.throttled_wait_s = 0.0

    def sent(self) -> None:
        with self._lock:
            self.requests += 1

    def spend_retry(self) -> bool:
        """Takes one retry; False when the budget is spent."""
        with self._lock:
            if self.retries >= self._base + RETRY_RATIO * self.requests:
                return False
            self.retries += 1
            return True

    def spend_throttled_wait(self, seconds: float) -> bool:
        """Takes one wait for throttling; False once the task has waited out its share."""
        with self._lock:
            if self.throttled_wait_s + seconds > self._throttled_wait_limit_s:
                return False
            self.throttled_wait_s += seconds
            self.retries += 1
            return True


class _Transient(Exception):
    """A failure that a repeat may cure, with how long the service asked to wait."""

    def __init__(self, error: D365Error | AuthenticationError, wait_s: float | None) -> None:
        self.error = error
        self.wait_s = wait_s


def _retry_after_seconds(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _never_sent(error: httpx.TransportError) -> bool:
    """The connection failed before the request left: repeating it cannot do anything twice."""
    return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def _backoff(attempt_number: int) -> float:
    """Exponential back-off with jitter, so that many clients failing together do not return together."""
    return _longest_backoff(attempt_number) * random.uniform(0.5, 1.0)


def _longest_backoff(attempt_number: int) -> float:
    return min(30.0, 0.5 * 2 ** (attempt_number - 1))


class _Gate:
    """Holds back every request of a client while the service's Retry-After runs.

    Dataverse answers a client that keeps sending during a throttle with ever longer waits, so one
    429 pauses all of this client's threads, not only the one that received it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resume_at = 0.0

    def pause(self, seconds: float, budget: RetryBudget) -> bool:
        """Holds every request of the client until `seconds` from now, unless that takes the task past
        its budget of throttled waiting (False, and the pause stays as it was). Only the time added
        to a pause already running is spent: threads throttled together wait together, once."""
        with self._lock:
            now = time.monotonic()
            resume_at = max(self._resume_at, now + seconds)
            if not budget.spend_throttled_wait(resume_at - max(self._resume_at, now)):
                return False
            self._resume_at = resume_at
            return True

    def wait(self) -> None:
        while (delay := self._resume_at - time.monotonic()) > 0:
            time.sleep(delay)


# The id each service gives a request, for Microsoft support: Dataverse's service request id
# (REQ_ID on older answers and inside a $batch), F&O's activity id ("Service request tracing").
REQUEST_ID_HEADERS = ("x-ms-service-request-id", "REQ_ID", "ms-dyn-aid")


def request_id_of(response: httpx.Response) -> str:
    """The service's id for the request `response` answers; "" if it sent none."""
    return next((response.headers[name] for name in REQUEST_ID_HEADERS if name in response.headers), "")


def error_from_response(system: str, operation: str, response: httpx.Response, record: str | None,
                        connection: str | None = None) -> D365Error:  # fmt: skip
    """Reads both error dialects: Dataverse's `error.code/message` and F&O's `innererror.message`;
    and the answer's request id."""
    code, message = "", response.reason_phrase
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
        message = inner.get("message") or error.get("message") or message
    return D365Error(system=system, operation=operation, status=response.status_code, code=code, message=message,
                     record=record, connection=connection, request_id=request_id_of(response))  # fmt: skip


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
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        budget: RetryBudget | None = None,
        headers: Mapping[str, str] | None = None,
        connection: str | None = None,
    ) -> None:
        self.system = system
        self.connection = connection  # the Airflow connection it came from, named in every failure
        self.service_root = service_root.rstrip("/") + "/"
        self._scope = scope
        self._tokens = tokens
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._verify = verify
        self.budget = budget or RetryBudget()
        self._gate = _Gate()
        # What this client sent, by operation, how often it was throttled and how often it retried:
        # each task reports all three.
        self.requests: Counter[str] = Counter()
        self.throttled = 0
        self.retried = 0
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
            max_attempts=settings.max_attempts,
            budget=RetryBudget(settings.retry_budget),
            headers=headers,
            connection=settings.conn_id,
        )

    def longest_request_s(self) -> float:
        """How long one request takes at most when each attempt runs into the timeout: the attempts
        and the back-offs between them; a Retry-After longer than the back-off, or throttling (within
        the budget's MAX_THROTTLED_WAIT_S), makes it longer. What a claim on the records it writes
        must outlast (`flow.claims`)."""
        return self._max_attempts * self._timeout_s + sum(map(_longest_backoff, range(1, self._max_attempts)))

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
        repeatable: bool | None = None,
    ) -> httpx.Response:
        """Sends one request and answers it, or raises D365Error (AuthenticationError when Entra ID
        refuses a token) for any failure not in `accept`.

        Transient failures (429, 5xx, timeouts, dropped connections, Entra ID outages) are retried
        with back-off and jitter, honouring Retry-After, within the attempt limit and the client's
        retry budget; a 429 pauses the whole client. A request is retried after it may have reached
        the service only when it is `repeatable`: every method but POST is, and a POST only when its
        caller says a repeat is harmless (an upsert by key, a create of a derived key whose repeat
        is refused as a duplicate and adopted). A 401 gets a fresh token once.
        """
        repeatable = method != "POST" if repeatable is None else repeatable
        subject = f" for {record}" if record else ""
        refreshed_token = False
        attempts = 0

        def failure(status: int, message: str, code: str = "") -> D365Error:
            return D365Error(system=self.system, operation=operation, status=status, code=code, message=message,
                             record=record, connection=self.connection)  # fmt: skip

        def attempt() -> httpx.Response:
            nonlocal refreshed_token, attempts
            attempts += 1
            self._gate.wait()
            try:
                token = self._tokens.token(self._scope)
            except AuthenticationError as refused:
                refused = refused.for_connection(self.system, self.connection)
                if refused.transient:
                    raise _Transient(refused, TOKEN_RETRY_MIN_WAIT_S) from refused
                raise refused from None
            with self._count_lock:
                self.requests[operation] += 1
            self.budget.sent()
            try:
                response = self._http.request(method, url, params=params, json=json, content=content,
                                              headers={"Authorization": f"Bearer {token}", **(headers or {})})  # fmt: skip
            except httpx.TransportError as error:
                if (reason := certificate_verify_failure(error)) is not None:
                    bundle = self._verify if isinstance(self._verify, str) else None
                    raise ConfigurationError(
                        certificate_failure_message(via(self.system, self.connection), str(self._http.base_url), reason,
                                                    bundle)  # fmt: skip
                    ) from error
                failed = failure(0, self._transport_failure(error))
                if not (repeatable or _never_sent(error)):
                    raise failed from error
                raise _Transient(failed, None) from error
            if response.status_code < 400 or response.status_code in accept:
                return response
            failed = error_from_response(self.system, operation, response, record, self.connection)
            if response.status_code == 401 and not refreshed_token:
                refreshed_token = True  # revoked or expired early: one fresh token, then the 401 stands
                self._tokens.forget()
                raise _Transient(failed, 0.0)
            if response.status_code == 429:
                with self._count_lock:
                    self.throttled += 1
                wait_s = _retry_after_seconds(response)
                wait_s = _backoff(1) if wait_s is None else wait_s
                if not self._gate.pause(wait_s, self.budget):
                    raise failed
                raise _Transient(failed, 0.0)  # the gate already holds every request until then
            if response.status_code in TRANSIENT_STATUSES and (repeatable or response.status_code == 503):
                raise _Transient(failed, _retry_after_seconds(response))
            raise failed

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Transient) and error.wait_s is not None:
                return max(error.wait_s, _backoff(state.attempt_number) if error.wait_s else 0.0)
            return _backoff(state.attempt_number)

        def stop(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Transient) and isinstance(error.error, D365Error) and error.error.status == 429:
                return False  # throttling is bounded by the budget's wait time, spent in `attempt`
            if state.attempt_number >= self._max_attempts:
                return True
            if not self.budget.spend_retry():
                log.warning("%s: retry budget spent (%d retries for %d requests); %s%s not retried",
                            self.system, self.budget.retries, self.budget.requests, operation, subject)  # fmt: skip
                return True
            return False

        def count_retry(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            cause = error.error if isinstance(error, _Transient) else error
            answer = (f"HTTP {cause.status}" if cause.status else cause.message) if isinstance(cause, D365Error) \
                else "Entra ID unavailable"  # fmt: skip
            log.info("%s: %s%s got %s; attempt %d in %.1f s", self.system, operation, subject, answer,
                     state.attempt_number + 1, state.next_action.sleep if state.next_action else 0.0)  # fmt: skip
            with self._count_lock:
                self.retried += 1

        try:
            return tenacity.Retrying(retry=tenacity.retry_if_exception_type(_Transient), wait=wait, stop=stop,
                                     before_sleep=count_retry, reraise=True)(attempt)  # fmt: skip
        except _Transient as exhausted:
            if isinstance(exhausted.error, D365Error):
                raise exhausted.error.after(attempts) from None
            raise exhausted.error from None
        except D365Error as failed:
            if attempts > 1:
                raise failed.after(attempts) from None
            raise

    def _transport_failure(self, error: httpx.TransportError) -> str:
        if isinstance(error, httpx.TimeoutException):
            return (f"no answer within {self._http.timeout.read} s ({type(error).__name__}); the connection's "
                    "extra timeout_s sets the limit")  # fmt: skip
        return f"{type(error).__name__}: {error}"

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
