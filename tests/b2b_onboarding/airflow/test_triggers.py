"""The event triggers (airflow/triggers.py) run as the triggerer runs them, with asyncio, against the
fakes, reading real Airflow connections (AIRFLOW_CONN_* variables): they fire when there is work and
only then, not twice for the same state, at once for a new one; they back off when throttled, and
fire one event for a failure that cannot cure itself."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from b2b_onboarding.airflow.triggers import MAX_WAIT_S, REFIRE_POLLS, PendingProspectsTrigger, SellerOutcomesTrigger
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.flow import reconcile, sync

RUN = "manual__test"
POLL_S = 0.2


def request(number: int, legal_entity: str = "usrt") -> dict:
    return {"dataAreaId": legal_entity, "ProspectId": f"P-{number:06d}", "ProspectName": f"Ada Lovelace{number}",
            "CompanyName": f"Engines {number}", "PrimaryEmailAddress": f"p{number}@engines.example"}  # fmt: skip


def connection(world, resource: str, password: str | None = None, **extra) -> str:
    app = world.cast.integration
    return json.dumps({"conn_type": "generic", "host": resource, "login": app["client_id"],
                       "password": password or app["client_secret"],
                       "extra": {"authority": world.endpoints.authority, "ca_bundle": world.endpoints.ca_bundle,
                                 **extra}})  # fmt: skip


@pytest.fixture
def connections(world, admin, store, monkeypatch):
    """The Commerce, Sales and state store connections, as Airflow reads them from the environment."""
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", connection(world, world.endpoints.commerce,
                                                                legal_entities=["usrt", "usmf"]))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_D365_SALES", connection(world, world.endpoints.dataverse))
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({
        "conn_type": "generic", "schema": store.engine.url.database, "extra": {"driver": "sqlite"}}))  # fmt: skip


def look(trigger) -> tuple[TriggerEvent | None, float]:
    return asyncio.run(trigger.poll())


async def first_events(trigger, count: int, within_s: float) -> list[TriggerEvent]:
    """The first `count` events `run()` yields, or those that came within `within_s`."""
    events: list[TriggerEvent] = []
    run: AsyncIterator[TriggerEvent] = trigger.run()

    async def collect() -> None:
        async for event in run:
            events.append(event)
            if len(events) == count:
                return

    try:
        await asyncio.wait_for(collect(), within_s)
    except TimeoutError:
        pass
    await run.aclose()
    return events


def test_the_hq_trigger_fires_on_work_and_is_quiet_once_it_is_pulled(connections, admin, world, store):
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)
    assert asyncio.run(first_events(trigger, 1, 3 * POLL_S + 2)) == []  # nothing Pending: quiet
    admin.seed_prospects([request(1), request(2, "usmf")])
    events = asyncio.run(first_events(PendingProspectsTrigger(poll_interval_s=POLL_S), 1, 10))
    assert [event.payload for event in events] == [{"reason": "changed", "legal_entities": ["usmf", "usrt"]}]
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    with commerce.odata:
        for legal_entity in ("usrt", "usmf"):
            sync.pull_prospects(commerce, store, legal_entity, RUN)
    assert asyncio.run(first_events(PendingProspectsTrigger(poll_interval_s=POLL_S), 1, 3 * POLL_S + 2)) == []


def test_the_same_state_fires_again_only_after_the_refire_delay_and_a_new_one_at_once(connections, admin, clerk):
    admin.seed_prospects([request(1)])
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)
    assert trigger.refire_after_s == REFIRE_POLLS * POLL_S
    event, wait_s = look(trigger)
    assert event.payload == {"reason": "changed", "legal_entities": ["usrt"]} and wait_s == POLL_S
    assert look(trigger) == (None, POLL_S)  # a run is on its way: no duplicate
    clerk.correct("usrt", "P-000001", AddressCity="Redmond")  # a change meanwhile: fires at once
    assert look(trigger)[0].payload == {"reason": "changed", "legal_entities": ["usrt"]}
    assert look(trigger) == (None, POLL_S)
    admin.seed_prospects([request(2, "usmf")])  # another legal entity: fires, naming every one with work
    assert look(trigger)[0].payload == {"reason": "changed", "legal_entities": ["usmf", "usrt"]}
    trigger.refire_after_s = 0.5  # the run came and went, and the work is still there
    assert look(trigger)[0] is None
    time.sleep(0.5)
    assert look(trigger)[0].payload == {"reason": "changed", "legal_entities": ["usmf", "usrt"]}


def test_the_run_loop_fires_again_for_a_change_made_while_a_run_is_on_its_way(connections, admin, clerk):
    admin.seed_prospects([request(1)])
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)

    async def scenario() -> list[TriggerEvent]:
        run = trigger.run()
        first = await asyncio.wait_for(anext(run), 10)
        await asyncio.to_thread(clerk.correct, "usrt", "P-000001", AddressCity="Redmond")
        started = time.monotonic()
        second = await asyncio.wait_for(anext(run), 10)
        assert time.monotonic() - started < trigger.refire_after_s
        await run.aclose()
        return [first, second]

    assert [event.payload["legal_entities"] for event in asyncio.run(scenario())] == [["usrt"], ["usrt"]]


def test_throttling_doubles_the_wait_up_to_the_cap_in_one_line_each(connections, admin, caplog):
    admin.seed_prospects([request(1)])
    # Retry-After beyond what a client waits out (MAX_THROTTLED_WAIT_S): the 429 reaches the trigger at once.
    admin.inject_fault("commerce", 429, count=2, retry_after=3600)
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)
    with caplog.at_level(logging.WARNING, logger="b2b_onboarding.airflow.triggers"):
        assert look(trigger) == (None, 2 * POLL_S)
        assert look(trigger) == (None, 4 * POLL_S)
    lines = [record.getMessage() for record in caplog.records if record.name == "b2b_onboarding.airflow.triggers"]
    assert len(lines) == 2 and all("HTTP 429" in line and "Next look in" in line for line in lines)
    event, wait_s = look(trigger)  # it answers again: the work fires, and the pace is back
    assert event.payload == {"reason": "changed", "legal_entities": ["usrt"]} and wait_s == POLL_S
    trigger._wait_s = MAX_WAIT_S * 0.75
    admin.inject_fault("commerce", 429, count=1, retry_after=3600)
    assert look(trigger) == (None, MAX_WAIT_S)


def test_a_refused_secret_fires_one_event_then_polls_at_the_cap_until_fixed(connections, admin, world, monkeypatch,
                                                                            caplog):  # fmt: skip
    admin.seed_prospects([request(1)])
    wrong = "not-the-secret-" + "x" * 20
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", connection(world, world.endpoints.commerce, wrong,
                                                                legal_entities=["usrt"]))  # fmt: skip
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)
    with caplog.at_level(logging.ERROR, logger="b2b_onboarding.airflow.triggers"):
        event, wait_s = look(trigger)
        assert event.payload["reason"] == "error" and wait_s == MAX_WAIT_S
        assert event.payload["error"].startswith(
            "Commerce headquarters via Airflow connection 'd365_commerce': Entra ID")
        assert "refused a token" in event.payload["error"] and wrong not in event.payload["error"]
        assert look(trigger) == (None, MAX_WAIT_S)  # one event, then only the log
        assert look(trigger) == (None, MAX_WAIT_S)
    logged = [record.getMessage() for record in caplog.records if record.name == "b2b_onboarding.airflow.triggers"]
    same = event.payload["error"].split(" Trace ID:")[0]  # Entra ID's trace ids differ from answer to answer
    assert len(logged) == 3 and all(same in line and wrong not in line for line in logged)
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", connection(world, world.endpoints.commerce,
                                                                legal_entities=["usrt"]))  # fmt: skip
    event, wait_s = look(trigger)
    assert event.payload == {"reason": "changed", "legal_entities": ["usrt"]} and wait_s == POLL_S


def test_a_missing_connection_fires_one_event_naming_it(connections, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_D365_SALES")
    trigger = SellerOutcomesTrigger(poll_interval_s=POLL_S)
    event, wait_s = look(trigger)
    assert event.payload["reason"] == "error" and wait_s == MAX_WAIT_S
    assert event.payload["error"].startswith(
        "Airflow connection 'd365_sales' (Dynamics 365 Sales (Dataverse)) is not defined. Next step: add it")
    assert look(trigger) == (None, MAX_WAIT_S)


def test_the_dataverse_trigger_fires_for_changed_outcome_tables(connections, admin, world, store, seller):
    admin.seed_prospects([request(1)])
    trigger = SellerOutcomesTrigger(poll_interval_s=POLL_S)
    assert look(trigger)[0].payload == {"reason": "changed", "tables": ["leads", "opportunities"]}  # no links yet
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse))
    with commerce.odata, sales.odata:
        sync.pull_prospects(commerce, store, "usrt", RUN)
        sync.push_leads(sales, store, "usrt", RUN)
        reconcile.read_outcomes(sales, store, RUN)
        assert look(trigger) == (None, POLL_S)
        seller.disqualify(store.frame().loc[0, "lead_id"])
        assert look(trigger)[0].payload == {"reason": "changed", "tables": ["leads"]}
        assert look(trigger)[0] is None
        reconcile.read_outcomes(sales, store, RUN)
        assert look(trigger)[0] is None


@pytest.mark.parametrize("trigger", [
    PendingProspectsTrigger("hq", "state", 12.5), SellerOutcomesTrigger("dataverse", "state", 45),
    PendingProspectsTrigger(), SellerOutcomesTrigger(),
], ids=["hq", "dataverse", "hq defaults", "dataverse defaults"])  # fmt: skip
def test_a_trigger_serializes_to_what_makes_it_again(trigger):
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert isinstance(again, BaseEventTrigger) and again.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert BaseEventTrigger.hash(classpath, kwargs) == BaseEventTrigger.hash(*again.serialize())


def test_a_changed_connection_counts_once_the_trigger_opens_its_connections_again(connections, admin, world,
                                                                                  monkeypatch):  # fmt: skip
    """The clients and the store stay open between looks (no read of the metadata database per look),
    and are opened again after `REOPEN_AFTER_S`: a legal entity added to the connection is watched then."""
    from b2b_onboarding.airflow import triggers

    admin.seed_prospects([request(1, "usrt"), request(2, "usmf")])
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", connection(world, world.endpoints.commerce,
                                                                legal_entities=["usrt"]))  # fmt: skip
    trigger = PendingProspectsTrigger(poll_interval_s=POLL_S)
    assert look(trigger)[0].payload == {"reason": "changed", "legal_entities": ["usrt"]}
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", connection(world, world.endpoints.commerce,
                                                                legal_entities=["usrt", "usmf"]))  # fmt: skip
    assert look(trigger) == (None, POLL_S)  # still the connection as it was opened
    monkeypatch.setattr(triggers, "REOPEN_AFTER_S", 0.0)
    assert look(trigger)[0].payload == {"reason": "changed", "legal_entities": ["usmf", "usrt"]}  # usmf is new
    asyncio.run(trigger.cleanup())
    assert trigger._opened is None
