"""Service protection for the OData fakes: per-caller sliding-window limits answered with 429, and
a simulated network latency.

Dataverse (its service protection API limits; CONTRACT.md, "Service protection and latency") limits
each user, over a sliding window (real: 300 s), to a number of requests (6000, code 0x80072322), a
combined execution time (1200 s, 0x80072321) and a number of concurrent requests (52, 0x80072326,
refused at once). Commerce headquarters has
optional per-user limits; the fake offers its request limit (off unless configured). Each refusal
is a 429 whose `Retry-After` says when the window admits the caller again; a caller that sends
again before then is refused again, each time with a longer wait, as the real services do. Every
Dataverse answer says what is left of the caller's window (`x-ms-ratelimit-*-xrm-requests`).

The caller is the user the bearer token names (`oid`, else `appid`/`azp`); the token is decoded
without verification, only to tell callers apart (the apps verify it). Requests without a readable
token share one caller. Execution time is the handler's own time, not the simulated latency.

    protection = ServiceProtection(Limits(dataverse_requests=100))
    app.add_middleware(ServiceProtectionMiddleware, protection=protection, system="dataverse",
                       path_prefix="/api/data/")
    app.include_router(create_limits_router(protection), prefix="/_admin")
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import jwt
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SYSTEMS = ("commerce", "dataverse")
REQUESTS, EXECUTION, CONCURRENT = "requests", "execution", "concurrent"
DATAVERSE_CODES = {REQUESTS: "0x80072322", EXECUTION: "0x80072321", CONCURRENT: "0x80072326"}
# As commerce.CONTENT_TYPE (not imported: the middleware must not pull in the whole Commerce app).
FNO_CONTENT_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"
# Set in the ASGI scope of a request that a `$batch` carries: the batch is the one request service
# protection admits and counts, so its parts pass through.
BATCH_PART = "d365_fakes.batch_part"
# Dataverse's "Service protection API limits" headers: what is left of the caller's window.
BURST_REMAINING = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_REMAINING = "x-ms-ratelimit-time-remaining-xrm-requests"


def dataverse_request_id() -> dict[str, str]:
    """The ids Dataverse stamps on every answer, errors and 429s included: a new GUID per request,
    as `x-ms-service-request-id` and `REQ_ID` (what Microsoft support asks for)."""
    request_id = str(uuid.uuid4())
    return {"x-ms-service-request-id": request_id, "REQ_ID": request_id}


def fno_activity_id() -> dict[str, str]:
    """The activity id finance and operations sends back on every answer ("Service request
    tracing"): a new GUID per request, as `ms-dyn-aid`."""
    return {"ms-dyn-aid": str(uuid.uuid4())}


@dataclass(frozen=True)
class Limits:
    """What service protection enforces. A limit of 0 is off; `enabled=False` turns all of them off
    (the latency still applies)."""

    enabled: bool = True
    latency_ms: float = 0
    dataverse_requests: int = 6000
    dataverse_window_s: float = 300
    dataverse_execution_s: float = 1200
    dataverse_concurrent: int = 52
    commerce_requests: int = 0
    commerce_window_s: float = 300

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int if field.type == "int" else (int, float)):
                raise ValueError(f"{field.name} must be a{'n integer' if field.type == 'int' else ' number'}, got {value!r}")
            elif field.name.endswith("_window_s") and not value > 0:
                raise ValueError(f"{field.name} must be more than 0, got {value!r}")
            elif not 0 <= value < math.inf:
                raise ValueError(f"{field.name} must be 0 or more, got {value!r}")

    def updated(self, values: Mapping[str, Any]) -> Limits:
        """These limits with `values` (field names) changed; ValueError naming a wrong field."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **values)

    def of(self, system: str) -> dict[str, float]:
        """The limits of one system by name (0: off), all 0 when disabled."""
        if system == "dataverse":
            limits = {REQUESTS: self.dataverse_requests, EXECUTION: self.dataverse_execution_s,
                      CONCURRENT: self.dataverse_concurrent, "window_s": self.dataverse_window_s}
        else:
            limits = {REQUESTS: self.commerce_requests, EXECUTION: 0, CONCURRENT: 0, "window_s": self.commerce_window_s}
        if not self.enabled:
            limits |= {REQUESTS: 0, EXECUTION: 0, CONCURRENT: 0}
        return limits


@dataclass(frozen=True)
class Refusal:
    limit: str  # REQUESTS, EXECUTION or CONCURRENT
    retry_after: int  # whole seconds, at least 1


class _Caller:
    """One caller's sliding window: admitted requests, finished requests' execution times, the
    requests in flight, and the wait it was last told."""

    __slots__ = ("admitted", "executions", "execution_total", "in_flight", "blocked_until", "blocked_by", "strikes")

    def __init__(self) -> None:
        self.admitted: deque[float] = deque()
        self.executions: deque[tuple[float, float]] = deque()  # (finished at, seconds)
        self.execution_total = 0.0
        self.in_flight = 0
        self.blocked_until = 0.0
        self.blocked_by = REQUESTS
        self.strikes = 0  # refusals in a row while told to wait

    def forget_before(self, start: float) -> None:
        while self.admitted and self.admitted[0] <= start:
            self.admitted.popleft()
        while self.executions and self.executions[0][0] <= start:
            self.execution_total -= self.executions.popleft()[1]
        if not self.executions:
            self.execution_total = 0.0  # no float drift once the window empties


class ServiceProtection:
    """The limits, each system's callers, and the 429s sent. Safe to share between threads."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._lock = threading.Lock()
        self.limits = limits or Limits()
        self.reset()

    def reset(self) -> None:
        """Forget every caller's window and the 429 counts (the limits stay)."""
        with self._lock:
            self._callers: dict[str, dict[str, _Caller]] = {system: {} for system in SYSTEMS}
            self._throttled = {system: dict.fromkeys((REQUESTS, EXECUTION, CONCURRENT), 0) for system in SYSTEMS}

    def configure(self, values: Mapping[str, Any]) -> Limits:
        """Change some limits (field names of `Limits`); ValueError naming a wrong field."""
        with self._lock:
            self.limits = self.limits.updated(values)
            return self.limits

    def admit(self, system: str, caller: str, now: float) -> Refusal | None:
        """None (the request runs; call `finish` after it) or why it is refused."""
        with self._lock:
            limits = self.limits.of(system)
            state = self._callers[system].get(caller)
            if state is None:
                state = self._callers[system][caller] = _Caller()
            window = limits["window_s"]
            state.forget_before(now - window)
            if now < state.blocked_until:
                # Sent while told to wait: refused again, and each time the wait grows.
                state.strikes += 1
                wait = min(state.blocked_until - now + state.strikes, 2 * window)
                return self._refuse(system, state, state.blocked_by, now, wait)
            if limits[CONCURRENT] and state.in_flight >= limits[CONCURRENT]:
                # A slot may free up any moment: refused at once, but the caller is not made to wait.
                self._throttled[system][CONCURRENT] += 1
                return Refusal(CONCURRENT, 1)
            if limits[REQUESTS] and len(state.admitted) >= limits[REQUESTS]:
                wait = state.admitted[len(state.admitted) - limits[REQUESTS]] + window - now
                return self._refuse(system, state, REQUESTS, now, wait)
            if limits[EXECUTION] and state.execution_total >= limits[EXECUTION]:
                return self._refuse(system, state, EXECUTION, now, _execution_wait(state, limits[EXECUTION], window, now))
            state.admitted.append(now)
            state.in_flight += 1
            state.strikes = 0
            return None

    def finish(self, system: str, caller: str, now: float, seconds: float) -> None:
        """An admitted request ended after running `seconds` in its handler."""
        with self._lock:
            state = self._callers[system].get(caller)
            if state is None:  # reset while it ran
                return
            state.in_flight = max(0, state.in_flight - 1)
            state.executions.append((now, seconds))
            state.execution_total += seconds

    def remaining(self, system: str, caller: str, now: float) -> dict[str, str]:
        """The rate-limit headers for `caller`: requests left in the window and execution seconds
        left (as Dataverse writes it, "1,200.00"); a limit that is off has no header."""
        with self._lock:
            limits = self.limits.of(system)
            state = self._callers[system].get(caller) or _Caller()
            state.forget_before(now - limits["window_s"])
            headers = {}
            if limits[REQUESTS]:
                headers[BURST_REMAINING] = str(max(0, limits[REQUESTS] - len(state.admitted)))
            if limits[EXECUTION]:
                headers[TIME_REMAINING] = f"{max(0.0, limits[EXECUTION] - state.execution_total):,.2f}"
            return headers

    def report(self) -> dict[str, Any]:
        """The limits and the 429s sent, per system (Dataverse's by error code)."""
        with self._lock:
            limits = self.limits
            return {
                "enabled": limits.enabled,
                "latency_ms": limits.latency_ms,
                "dataverse": {
                    "requests": limits.dataverse_requests,
                    "window_s": limits.dataverse_window_s,
                    "execution_s": limits.dataverse_execution_s,
                    "concurrent": limits.dataverse_concurrent,
                    "throttled": {DATAVERSE_CODES[limit]: count for limit, count in self._throttled["dataverse"].items()},
                },
                "commerce": {
                    "requests": limits.commerce_requests,
                    "window_s": limits.commerce_window_s,
                    "throttled": {REQUESTS: self._throttled["commerce"][REQUESTS]},
                },
            }

    def _refuse(self, system: str, state: _Caller, limit: str, now: float, wait: float) -> Refusal:
        state.blocked_until = now + wait
        state.blocked_by = limit
        self._throttled[system][limit] += 1
        return Refusal(limit, max(1, math.ceil(wait)))


def _execution_wait(state: _Caller, limit: float, window: float, now: float) -> float:
    """Seconds until enough execution time leaves the window to bring the total under `limit`."""
    remaining = state.execution_total
    for finished_at, seconds in state.executions:
        remaining -= seconds
        if remaining < limit:
            return finished_at + window - now
    return window


@functools.lru_cache(maxsize=1024)
def caller_of(authorization: str) -> str:
    """Who sends a request, from its Authorization header ("" when it carries no readable token)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return ""
    return str(claims.get("oid") or claims.get("appid") or claims.get("azp") or "")


def refusal_response(system: str, refusal: Refusal, limits: Limits, remaining: Mapping[str, str]) -> JSONResponse:
    """The 429 in the system's own words, with the system's request id (Dataverse's also with
    `remaining`, the rate-limit headers)."""
    headers = {"Retry-After": str(refusal.retry_after), "OData-Version": "4.0"}
    if system == "dataverse":
        headers |= {**dataverse_request_id(), **remaining}
        window = _seconds(limits.dataverse_window_s)
        message = {
            REQUESTS: f"Number of requests exceeded the limit of {limits.dataverse_requests} over time window of {window} seconds.",
            EXECUTION: (
                f"Combined execution time of incoming requests exceeded limit of {round(limits.dataverse_execution_s * 1000):,} "
                f"milliseconds over time window of {window} seconds. Decrease number of concurrent requests or reduce the "
                "duration of requests and try again later."
            ),
            CONCURRENT: f"Number of concurrent requests exceeded the limit of {limits.dataverse_concurrent}.",
        }[refusal.limit]
        return JSONResponse({"error": {"code": DATAVERSE_CODES[refusal.limit], "message": message}}, 429, headers)
    message = (
        f"The request was throttled: the user exceeded the limit of {limits.commerce_requests} requests over a time window "
        f"of {_seconds(limits.commerce_window_s)} seconds. Retry after the number of seconds in the Retry-After header."
    )
    body = {"error": {"code": "", "message": "An error has occurred.",
                      "innererror": {"message": message, "type": "", "stacktrace": ""}}}
    return JSONResponse(body, 429, headers | fno_activity_id(), media_type=FNO_CONTENT_TYPE)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class ServiceProtectionMiddleware:
    """ASGI middleware enforcing `protection` for `system` on paths under `path_prefix` (the OData
    service; the `/_admin` routes mounted alongside, and the parts of a `$batch`, are left alone).
    Dataverse's answers carry the rate-limit headers."""

    def __init__(self, app: ASGIApp, protection: ServiceProtection, system: str, path_prefix: str) -> None:
        if system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
        self.app = app
        self.protection = protection
        self.system = system
        self.path_prefix = path_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.path_prefix) or scope.get(BATCH_PART):
            await self.app(scope, receive, send)
            return
        authorization = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        caller = caller_of(authorization.decode("latin-1"))
        protection, limits = self.protection, self.protection.limits
        refusal = protection.admit(self.system, caller, time.monotonic())
        if limits.latency_ms:
            await asyncio.sleep(limits.latency_ms / 1000)  # concurrent requests wait side by side
        if refusal:
            remaining = protection.remaining(self.system, caller, time.monotonic())
            await refusal_response(self.system, refusal, limits, remaining)(scope, receive, send)
            return

        async def send_with_remaining(message: Message) -> None:
            if message["type"] == "http.response.start" and self.system == "dataverse":
                remaining = protection.remaining(self.system, caller, time.monotonic())
                extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in remaining.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_remaining)
        finally:
            protection.finish(self.system, caller, time.monotonic(), time.perf_counter() - started)


def create_limits_router(protection: ServiceProtection) -> APIRouter:
    """`GET /limits`, `POST /limits` (change some) and `POST /limits/reset`, to mount at `/_admin`."""
    router = APIRouter()

    @router.get("/limits")
    async def limits() -> dict[str, Any]:
        return protection.report()

    @router.post("/limits")
    async def configure(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return JSONResponse({"error": f"the body is not JSON: {error}"}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"error": 'the body must be an object such as {"dataverse_requests": 100}'}, 400)
        try:
            protection.configure(body)
        except (TypeError, ValueError) as error:
            return JSONResponse({"error": str(error)}, 400)
        return JSONResponse(protection.report())

    @router.post("/limits/reset", status_code=204)
    async def reset() -> Response:
        protection.reset()
        return Response(status_code=204)

    return router
