"""Faults to inject, for testing clients' retries and a chaos suite: error answers, slow answers
and reset connections, on the next N matching requests or on a share of them.

    plan = FaultPlan(seed=1)
    plan.add("dataverse", 429, count=2, retry_after=1)  # the next two Web API requests are throttled
    plan.add("dataverse", kind="reset", route="UpsertMultiple", share=0.1)  # 10 % of bulk upserts
    plan.add("commerce", kind="slow", delay_s=30, method="PATCH", phase="after")
    plan.take("dataverse", "GET", "/api/data/v9.2/WhoAmI")  # -> Fault(status=429, retry_after=1)

A rule's kind:
- "status": the request is answered with `status` (400-599) in the system's own error shape,
  before it is served (always phase "before");
- "slow": the answer arrives `delay_s` late;
- "reset": the TCP connection is aborted with an RST; the client gets no HTTP answer at all.
Phase "before": the fault happens before the request is served, so the service does nothing (a
slow request whose client leaves during the delay is not served); "after" (the default for slow
and reset): the request is served in full (its writes land), then its answer is held or dropped.

Rules are checked in the order added; the first matching rule that fires wins. A `count` rule fires
on the next `count` matching requests; a `share` rule on each matching request with that
probability, drawn from a generator seeded with the plan's `seed`, so a run is repeatable.

`FaultInjection` applies a plan to one system's whole ASGI app; it must be the outermost layer
(the app given to uvicorn), because a reset needs uvicorn's own `send`, which carries the
connection's transport. Never `/_admin`. Safe to share between threads.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

SYSTEMS = ("commerce", "dataverse", "entra")
KINDS = ("status", "slow", "reset")
PHASES = ("before", "after")
RULE_FIELDS = (
    "system", "kind", "status", "retry_after", "delay_s", "phase", "route", "method", "count", "share",
)  # fmt: skip
ADMIN_PREFIX = "/_admin"
# The requests of each system that a rule without `route` applies to: the two OData services, and
# Entra's token endpoint only (not discovery nor the signing keys).
DEFAULT_TARGETS: dict[str, tuple[str | None, re.Pattern[str]]] = {
    "commerce": (None, re.compile(r"^/data/")),
    "dataverse": (None, re.compile(r"^/api/data/v9\.2/")),
    "entra": ("POST", re.compile(r"^/[^/]+/oauth2/v2\.0/token$")),
}


@dataclass(frozen=True)
class Fault:
    """What to do to one request."""

    status: int | None = None
    retry_after: int | None = None  # seconds, sent as the Retry-After header
    kind: str = "status"
    delay_s: float | None = None
    phase: str = "before"

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    @property
    def label(self) -> str:
        """How it is counted in the statistics: the status ("503"), "slow" or "reset"."""
        return str(self.status) if self.kind == "status" else self.kind


@dataclass
class FaultRule:
    """A fault, the requests it applies to, and how many of them (`remaining`) or which share."""

    system: str
    fault: Fault
    route: re.Pattern[str] | None
    method: str | None
    count: int | None
    share: float | None
    remaining: int | None = field(init=False)
    fired: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.remaining = self.count

    def matches(self, system: str, method: str | None, path: str | None) -> bool:
        """Whether a request falls under the rule. Without its method and path, only a rule with
        neither `route` nor `method` can match (the request is taken as one of the default target)."""
        if system != self.system or self.remaining == 0:
            return False
        if method is None or path is None:
            return self.route is None and self.method is None
        if self.method is not None and method != self.method:
            return False
        if self.route is not None:
            return self.route.search(path) is not None
        target_method, target_path = DEFAULT_TARGETS[system]
        return (target_method is None or method == target_method) and target_path.search(path) is not None

    def report(self) -> dict[str, Any]:
        fault = self.fault
        return {
            "system": self.system,
            "kind": fault.kind,
            "status": fault.status,
            "retry_after": fault.retry_after,
            "delay_s": fault.delay_s,
            "phase": fault.phase,
            "route": None if self.route is None else self.route.pattern,
            "method": self.method,
            "count": self.count,
            "share": self.share,
            "remaining": self.remaining,
            "fired": self.fired,
        }


class FaultPlan:
    def __init__(self, seed: int = 0) -> None:
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._random = random.Random(seed)
        self._served: dict[str, dict[str, int]] = {system: {} for system in SYSTEMS}

    def add(
        self,
        system: str,
        status: int | None = None,
        count: int | None = None,
        retry_after: int | None = None,
        *,
        kind: str = "status",
        delay_s: float | None = None,
        phase: str | None = None,
        route: str | None = None,
        method: str | None = None,
        share: float | None = None,
    ) -> None:
        """Add a rule after the others. Raises ValueError naming the field that is wrong."""
        rule = _rule(system, kind, status, retry_after, delay_s, phase, route, method, count, share)
        with self._lock:
            self._rules.append(rule)

    def add_fields(self, fields: Any) -> None:
        """Add a rule given as a JSON object of `RULE_FIELDS` (the admin route, the --fault flag)."""
        if not isinstance(fields, Mapping):
            raise ValueError(f"a fault rule must be a JSON object with some of: {', '.join(RULE_FIELDS)}")
        unknown = sorted(set(fields) - set(RULE_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(map(str, unknown))}")
        if "system" not in fields:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got nothing")
        self.add(**fields)

    def take(self, system: str, method: str | None = None, path: str | None = None) -> Fault | None:
        """The fault for a request to `system` (`method` and `path` as sent), counting it as fired
        and served; None when no rule fires. `/_admin` requests are never faulted."""
        if path is not None and _is_admin(path):
            return None
        with self._lock:
            for rule in self._rules:
                if not rule.matches(system, method, path):
                    continue
                if rule.share is not None and self._random.random() >= rule.share:
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                rule.fired += 1
                served = self._served[system]
                served[rule.fault.label] = served.get(rule.fault.label, 0) + 1
                return rule.fault
        return None

    def report(self) -> dict[str, Any]:
        """`{"seed": n, "rules": [{rule fields..., "remaining", "fired"}], "served": {system: {label: n}}}`."""
        with self._lock:
            return {
                "seed": self.seed,
                "rules": [rule.report() for rule in self._rules],
                "served": {system: dict(served) for system, served in self._served.items()},
            }

    def clear(self) -> None:
        """Drop every rule and the statistics, and restart the generator from the seed (so a run
        after a reset draws as a run after a fresh start does)."""
        with self._lock:
            self._rules.clear()
            self._random.seed(self.seed)
            for served in self._served.values():
                served.clear()


def _rule(
    system: Any, kind: Any, status: Any, retry_after: Any, delay_s: Any, phase: Any,
    route: Any, method: Any, count: Any, share: Any,
) -> FaultRule:  # fmt: skip
    """A validated rule; ValueError naming the first wrong field."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "status":
        if not _is_int(status) or not 400 <= status <= 599:
            raise ValueError(f"status must be an integer from 400 to 599, got {status!r}")
        if retry_after is not None and (not _is_int(retry_after) or retry_after < 0):
            raise ValueError(f"retry_after must be a whole number of seconds (0 or more), got {retry_after!r}")
        if delay_s is not None:
            raise ValueError(f'delay_s is for kind "slow" only, got {delay_s!r} with kind "status"')
        if phase not in (None, "before"):
            raise ValueError(f'phase must be "before" for kind "status" (it answers instead of serving), got {phase!r}')
        phase = "before"
    else:
        for name, value in (("status", status), ("retry_after", retry_after)):
            if value is not None:
                raise ValueError(f'{name} is for kind "status" only, got {value!r} with kind {kind!r}')
        if kind == "slow" and (not _is_number(delay_s) or not 0 < delay_s < math.inf):
            raise ValueError(f'delay_s must be a number of seconds more than 0 for kind "slow", got {delay_s!r}')
        if kind == "reset" and delay_s is not None:
            raise ValueError(f'delay_s is for kind "slow" only, got {delay_s!r} with kind "reset"')
        if phase is None:
            phase = "after"
        elif phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if route is not None:
        if not isinstance(route, str) or not route:
            raise ValueError(f"route must be a regular expression searched in the request path, got {route!r}")
        try:
            route = re.compile(route)
        except re.error as error:
            raise ValueError(f"route is not a valid regular expression ({error}): {route!r}") from None
    if method is not None:
        if not isinstance(method, str) or not method.isalpha():
            raise ValueError(f"method must be an HTTP method such as POST, got {method!r}")
        method = method.upper()
    if count is not None and share is not None:
        raise ValueError("share cannot be combined with count: give one of them")
    if count is not None and (not _is_int(count) or count < 1):
        raise ValueError(f"count must be an integer of at least 1, got {count!r}")
    if share is not None and (not _is_number(share) or not 0 < share <= 1):
        raise ValueError(f"share must be a number more than 0 and at most 1, got {share!r}")
    if share is None and count is None:
        count = 1
    fault = Fault(status, retry_after, kind, delay_s, phase)
    return FaultRule(system, fault, route, method, count, share)


class FaultInjection:
    """Pure ASGI wrapper applying `plan` to `system`'s app; it must be the outermost layer.

    `respond(fault, scope)` builds a status fault's answer in the system's own shape.
    `count_request`, if given, counts a request of the service's paths that a fault keeps from the
    app (the app counts those it serves itself), so every request that reached it is counted once.
    """

    def __init__(
        self,
        app: ASGIApp,
        plan: FaultPlan,
        system: str,
        respond: Callable[[Fault, Scope], ASGIApp],
        count_request: Callable[[], None] | None = None,
    ) -> None:
        if system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
        self.app = app
        self.plan = plan
        self.system = system
        self.respond = respond
        self.count_request = count_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fault = self.plan.take(self.system, scope["method"], scope["path"]) if scope["type"] == "http" else None
        if fault is None:
            await self.app(scope, receive, send)
        elif fault.kind == "status":
            self._count_kept(scope)
            await self.respond(fault, scope)(scope, receive, send)
        elif fault.phase == "before":
            await self._before(fault, scope, receive, send)
        else:
            await self._after(fault, scope, receive, send)

    async def _before(self, fault: Fault, scope: Scope, receive: Receive, send: Send) -> None:
        if fault.kind == "reset":
            self._count_kept(scope)
            await _reset_connection(receive, send)
            return
        request = await _read_request(receive)
        if request is None or await _left_within(receive, fault.delay_s):
            self._count_kept(scope)  # the client gave up during the delay: nothing is served
            return
        await self.app(scope, _replay(request, receive), send)

    def _count_kept(self, scope: Scope) -> None:
        if self.count_request is not None and DEFAULT_TARGETS[self.system][1].search(scope["path"]):
            self.count_request()

    async def _after(self, fault: Fault, scope: Scope, receive: Receive, send: Send) -> None:
        answer: list[Message] = []

        async def hold(message: Message) -> None:
            answer.append(message)

        await self.app(scope, receive, hold)
        if fault.kind == "reset":
            await _reset_connection(receive, send)
            return
        await asyncio.sleep(fault.delay_s)
        for message in answer:
            await send(message)


async def _reset_connection(receive: Receive, send: Send) -> None:
    """Abort the TCP connection with an RST, then wait until the server has noticed, so that it
    does not try to answer a request left without a response."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError(
            "a reset fault needs the connection's transport, which only uvicorn's own send carries: "
            "FaultInjection must be the outermost ASGI layer under uvicorn (not an in-process client)"
        )
    sock = transport.get_extra_info("socket")
    if sock is not None:  # linger on, timeout 0: close() sends an RST instead of a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_request(receive: Receive) -> list[Message] | None:
    """The whole request body's messages; None if the client disconnects first."""
    messages: list[Message] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        messages.append(message)
        if not message.get("more_body", False):
            return messages


async def _left_within(receive: Receive, seconds: float) -> bool:
    """Wait `seconds`; True as soon as the client disconnects (the body has been read, so the next
    message can only be the disconnect)."""
    try:
        await asyncio.wait_for(receive(), seconds)
    except asyncio.TimeoutError:
        return False
    return True


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _is_admin(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
