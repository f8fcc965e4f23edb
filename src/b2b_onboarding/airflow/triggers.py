"""Event triggers: the triggerer looks at Commerce HQ and Dataverse every `poll_interval_s` and starts
a DAG run (through an asset watcher, airflow/schedules.py) as soon as there is work.

- `PendingProspectsTrigger` (`b2b_prospect_sync`): the Pending B2B prospects of the Commerce
  connection's legal entities differ from what the last pull read (`flow.watch.hq_changes`).
- `SellerOutcomesTrigger` (`b2b_outcomes`): leads or opportunities changed since the delta links
  the last outcome read stored, or there is no link yet, or it expired (`flow.watch.sales_changes`).

Idle cost: HQ one request per look (one keys-only read of every legal entity), Dataverse two (one
delta-link read of at most one row per table): at the default 30 s, 2 requests a minute to HQ and 4
to Dataverse, plus a token from Entra ID about once an hour.

A trigger never writes to the state store: only the tasks that apply changes move a watermark or a
link. It remembers what it fired for (the fingerprints, the links) and fires again for the same state
only after `REFIRE_POLLS` looks, so a run in progress does not queue duplicates, while a change made
meanwhile (a new fingerprint, a new link) fires at once. Throttling and transient failures double
the time to the next look up to `MAX_WAIT_S`, logged in one line each. A failure that cannot cure
itself (credentials, configuration, TLS trust, a missing privilege) fires one event carrying its
first line, so that a run starts and fails loudly (red, alerted), then the trigger keeps looking at
`MAX_WAIT_S`, logging the line, until it clears.

Imported when a DAG file is parsed: Airflow's trigger base and the standard library only; the
product's clients are imported in the triggerer, on the first look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)

# The longest wait between two looks: the cap of the back-off, and the pace while a failure lasts.
MAX_WAIT_S = 600.0
# Looks after which the same state fires again (a run that failed or was lost leaves it unchanged).
REFIRE_POLLS = 10
# How long a trigger keeps its connections' clients and the state store open between looks: a changed
# connection is picked up within this, or at the next look after a failed one. Reading the connection
# on every look would ask the metadata database each time (and Airflow logs a warning about the
# underscore in the connection type each time it reads one from there).
REOPEN_AFTER_S = 300.0


class _WatchTrigger(BaseEventTrigger):
    """Looks (in a thread: the clients are synchronous) every `poll_interval_s`, and fires when
    `_look` answers some work: item (legal entity, table) → its state now."""

    # What the event's payload calls the items.
    items_name: str

    def __init__(self, *, poll_interval_s: float = 30.0) -> None:
        super().__init__()
        self.poll_interval_s = float(poll_interval_s)
        self.refire_after_s = REFIRE_POLLS * self.poll_interval_s
        self._fired: dict[str, tuple[str, float]] = {}  # item → (state fired for, monotonic time)
        self._wait_s = self.poll_interval_s
        self._failing: str | None = None  # the line of a failure that cannot cure itself, while it lasts
        self._opened: tuple[float, Any] | None = None  # (monotonic time opened, what `_open` gave)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            event, wait_s = await self.poll()
            if event is not None:
                yield event
            await asyncio.sleep(wait_s)

    async def poll(self) -> tuple[TriggerEvent | None, float]:
        """One look: the event to fire (None when there is nothing new to do) and the seconds to the next."""
        try:
            state = await asyncio.to_thread(self._look)
        except Exception as error:  # noqa: BLE001 - every failure is logged, backed off or fired, never lost
            self._close()  # the next look reads the connections again: one fixed meanwhile counts at once
            return self._failed(error)
        if self._failing is not None:
            log.info("%s: looks succeed again (after: %s)", type(self).__name__, self._failing)
            self._failing = None
        self._wait_s = self.poll_interval_s
        due = self._due(state)
        event = TriggerEvent({"reason": "changed", self.items_name: sorted(state)}) if due else None
        return event, self.poll_interval_s

    def _due(self, state: dict[str, str]) -> list[str]:
        """The items to fire for: new, in a new state, or unchanged since they fired `refire_after_s` ago."""
        now = time.monotonic()
        self._fired = {item: fired for item, fired in self._fired.items() if item in state}  # settled: forgotten
        due = [item for item, value in state.items() if item not in self._fired or self._fired[item][0] != value
               or now - self._fired[item][1] >= self.refire_after_s]  # fmt: skip
        self._fired |= {item: (state[item], now) for item in due}
        return due

    def _failed(self, error: Exception) -> tuple[TriggerEvent | None, float]:
        from b2b_onboarding import errors, redaction

        line = redaction.redact(errors.first_line(error))
        if not errors.cures_itself(error):
            log.error("%s: %s Next look in %.0f s.", type(self).__name__, line, MAX_WAIT_S)
            first = self._failing is None
            self._failing = line
            self._wait_s = MAX_WAIT_S
            return (TriggerEvent({"reason": "error", "error": line}) if first else None), MAX_WAIT_S
        self._wait_s = min(self._wait_s * 2, MAX_WAIT_S)
        log.warning("%s: %s Next look in %.0f s.", type(self).__name__, line, self._wait_s)
        return None, self._wait_s

    async def cleanup(self) -> None:
        self._close()

    def _look(self) -> dict[str, str]:
        """Item → its state now, through what `_open` gave (opened again every `REOPEN_AFTER_S`)."""
        if self._opened is not None and time.monotonic() - self._opened[0] >= REOPEN_AFTER_S:
            self._close()
        if self._opened is None:
            self._opened = (time.monotonic(), self._open())
        return self._ask(self._opened[1])

    def _close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            client, store = opened[1][:2]
            store.close()
            client.odata.close()

    def _open(self) -> tuple[Any, ...]:
        """(client, state store, ...): what each look needs, from the connections."""
        raise NotImplementedError

    def _ask(self, opened: tuple[Any, ...]) -> dict[str, str]:
        raise NotImplementedError


class PendingProspectsTrigger(_WatchTrigger):
    """Fires `{"reason": "changed", "legal_entities": [...]}` when Pending B2B prospects of the
    Commerce connection's legal entities were added, corrected or decided since their last pull."""

    items_name = "legal_entities"

    def __init__(
        self, commerce_conn_id: str = "d365_commerce", state_conn_id: str = "d365_state", poll_interval_s: float = 30.0
    ) -> None:
        super().__init__(poll_interval_s=poll_interval_s)
        self.commerce_conn_id = commerce_conn_id
        self.state_conn_id = state_conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.{type(self).__name__}", {"commerce_conn_id": self.commerce_conn_id,
                "state_conn_id": self.state_conn_id, "poll_interval_s": self.poll_interval_s})  # fmt: skip

    def _open(self) -> tuple[Any, ...]:
        from b2b_onboarding.airflow.hooks import CommerceHook, StateStoreHook
        from b2b_onboarding.errors import ConfigurationError

        hook = CommerceHook(self.commerce_conn_id)
        settings = hook.settings()
        if not settings.legal_entities:
            raise ConfigurationError(
                f"Airflow connection {self.commerce_conn_id!r} names no legal entities. Next step: set its "
                'extra "legal_entities", e.g. ["usrt", "usmf"].'
            )
        store = StateStoreHook(self.state_conn_id).get_conn()
        try:
            return hook.client(settings), store, settings.legal_entities
        except Exception:
            store.close()
            raise

    def _ask(self, opened: tuple[Any, ...]) -> dict[str, str]:
        from b2b_onboarding.flow import watch

        commerce, store, legal_entities = opened
        return watch.hq_state(commerce, store, legal_entities)


class SellerOutcomesTrigger(_WatchTrigger):
    """Fires `{"reason": "changed", "tables": [...]}` when leads or opportunities changed in
    Dataverse since the last outcome read (or it has not stored a link yet, or the link expired)."""

    items_name = "tables"

    def __init__(
        self, sales_conn_id: str = "d365_sales", state_conn_id: str = "d365_state", poll_interval_s: float = 30.0
    ) -> None:
        super().__init__(poll_interval_s=poll_interval_s)
        self.sales_conn_id = sales_conn_id
        self.state_conn_id = state_conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.{type(self).__name__}", {"sales_conn_id": self.sales_conn_id,
                "state_conn_id": self.state_conn_id, "poll_interval_s": self.poll_interval_s})  # fmt: skip

    def _open(self) -> tuple[Any, ...]:
        from b2b_onboarding.airflow.hooks import SalesHook, StateStoreHook

        sales = SalesHook(self.sales_conn_id).get_conn()
        try:
            return sales, StateStoreHook(self.state_conn_id).get_conn()
        except Exception:
            sales.odata.close()
            raise

    def _ask(self, opened: tuple[Any, ...]) -> dict[str, str]:
        from b2b_onboarding.flow import watch

        sales, store = opened
        return watch.sales_state(sales, store)
