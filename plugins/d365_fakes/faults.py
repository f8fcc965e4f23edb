"""Faults to inject: queued HTTP error answers per system, for testing clients' retries and errors.

    plan = FaultPlan()
    plan.add("dataverse", 429, count=2, retry_after=1)  # the next two Web API requests are throttled
    plan.take("dataverse")  # -> Fault(status=429, retry_after=1), and one remains

Each app consults the plan at the start of every request it would serve (Commerce and Dataverse:
every authenticated-API request, after counting it and before the auth check; Entra: every token
request) and, when `take` hands it a fault, answers with that status in its own error shape.
Faults of a system are served in the order they were added. Safe to share between threads.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

SYSTEMS = ("commerce", "dataverse", "entra")


@dataclass(frozen=True)
class Fault:
    status: int
    retry_after: int | None = None  # seconds, sent as the Retry-After header

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class FaultPlan:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[list]] = {system: deque() for system in SYSTEMS}  # [Fault, remaining]

    def add(self, system: str, status: int, count: int = 1, retry_after: int | None = None) -> None:
        """Queue `count` answers of `status`. Raises ValueError naming the field that is wrong."""
        if system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
        if not _is_int(status) or not 400 <= status <= 599:
            raise ValueError(f"status must be an integer from 400 to 599, got {status!r}")
        if not _is_int(count) or count < 1:
            raise ValueError(f"count must be an integer of at least 1, got {count!r}")
        if retry_after is not None and (not _is_int(retry_after) or retry_after < 0):
            raise ValueError(f"retry_after must be a whole number of seconds (0 or more), got {retry_after!r}")
        with self._lock:
            self._queues[system].append([Fault(status, retry_after), count])

    def take(self, system: str) -> Fault | None:
        """The fault for the next request to `system`, consuming it; None when none is queued."""
        with self._lock:
            queue = self._queues[system]
            if not queue:
                return None
            entry = queue[0]
            entry[1] -= 1
            if entry[1] == 0:
                queue.popleft()
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            for queue in self._queues.values():
                queue.clear()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
