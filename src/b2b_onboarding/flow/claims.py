"""Claims on the prospects a task writes, so that overlapping runs write each of them once.

A task claims the prospects of a batch in the state store (`StateStore.claim`) before it reads what
Sales holds of them and writes. A task that finds some claimed by another run leaves them; once the
rest of its work is recorded, it waits for those claims to end, reads again what is still to do (the
other run has usually done it) and claims that, so nothing is left undone for good. A claim ends in
the transaction that records its outcomes, at the end of its task whatever happened, or when its
lease runs out (its task died); a retry of the same task instance takes its claims back at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from types import TracebackType

import pandas as pd

from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.domain import rules
from b2b_onboarding.store.state import StateStore

log = logging.getLogger(__name__)

# The lease. A claim must outlast the requests it guards (the read of what Sales holds, then the write),
# else a slow claimant and the run that took its claim over could both write; past them, the taker
# reads Sales first and adopts what landed. The client's settings bound each request: `max_attempts`
# attempts of up to `timeout_s`, with the back-offs between (`ODataClient.longest_request_s`: 6 × 60 s
# + 15.5 s by default), so a lease is that bound times the requests a claim guards (a bulk batch of
# the push: 2, about 12.5 minutes by default). Only another run waits that long for a dead claimant: a
# retry of the same task takes its claims back at once. The floor covers what the bound leaves out:
# the token fetched before a request, the store's own writes, and workers' clocks seconds apart.
LEASE_FLOOR = timedelta(seconds=30)
# How often a task waiting for another run's claims looks at the store.
POLL_S = 1.0

Key = tuple[str, str]


def lease(sales: SalesClient, requests: int) -> timedelta:
    """How long a claim lasts that guards `requests` requests sent one after another."""
    return max(LEASE_FLOOR, timedelta(seconds=requests * sales.odata.longest_request_s()))


def _key(row: dict) -> Key:
    return row["legal_entity"], row["prospect_id"]


class Claims:
    """One task's claims on the prospects of one step (`rules.STEPS`); `take` may be called from a
    bulk write's threads. Use as a context manager: every claim of the task ends with it."""

    def __init__(self, store: StateStore, step: str, run_id: str) -> None:
        self.store = store
        self.step = step
        self.claimant = store.claimant(run_id)
        # Prospects this task left to another run: found claimed, or done by it since this task read its work.
        self.elsewhere: set[Key] = set()
        self._waiting: set[Key] = set()  # found claimed this round: waited for, then read again
        self._lock = threading.Lock()

    def __enter__(self) -> Claims:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.store.release(self.step, self.claimant)

    def take(self, rows: Sequence[dict], lease: timedelta) -> list[dict]:
        """The rows this task now holds, for `lease`, and that are still to do. A row another run
        claims waits for the next round; one another run did since this task read its work is let go."""
        if not rows:
            return []
        keys = [_key(row) for row in rows]
        held = self.store.claim(self.step, keys, self.claimant, lease)
        todo = self._still_to_do(held)
        if held - todo:
            self.store.release(self.step, self.claimant, held - todo)
        with self._lock:
            self._waiting |= set(keys) - held
            self.elsewhere |= (set(keys) - held) | (held - todo)
        return [row for row in rows if _key(row) in todo]

    def _still_to_do(self, keys: set[Key]) -> set[Key]:
        if not keys:
            return set()
        light = self.store.frame(keys=keys, columns=rules.RULE_COLUMNS)
        return set(rules.STEPS[self.step](light)[["legal_entity", "prospect_id"]].itertuples(index=False, name=None))

    def rounds(self, work: Callable[[], pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """The work to do, then, round after round, what is still to do of the prospects found claimed
        by another run, once their claims ended. The caller records each round before the next."""
        todo = work()
        while len(todo):
            yield todo
            waited = self._wait()
            if not waited:
                return
            todo = work()
            todo = todo[[key in waited for key in zip(todo["legal_entity"], todo["prospect_id"])]]

    def _wait(self) -> set[Key]:
        """Waits until the prospects found claimed this round are claimed by no other run (each claim
        ends at the latest with its lease), polling the store; returns them."""
        with self._lock:
            waiting, self._waiting = self._waiting, set()
        told = False
        while live := {key: claim for key, claim in self.store.claimed(self.step, waiting).items()
                       if claim[0] != self.claimant}:  # fmt: skip
            if not told:
                log.info("%d prospects of this chunk are claimed by another run (%s): waiting for its claims to end, "
                         "by %s at the latest, then doing what it left", len(live),
                         ", ".join(sorted({owner for owner, _ in live.values()})),
                         max(until for _, until in live.values()).isoformat(timespec="seconds"))  # fmt: skip
                told = True
            time.sleep(POLL_S)
        return waiting
