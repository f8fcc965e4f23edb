"""Event-driven scheduling on a real Airflow, as the business owner sees it: nobody triggers a DAG.

A deployment of its own (airflow_services.start with a Topology): api-server, scheduler, dag-processor
and a triggerer (LocalExecutor, SQLite), `[d365_b2b_onboarding] scheduling = events`, the triggers
looking every POLL_S seconds, one Fernet key for every process (tasks and triggers share Entra ID
tokens through the state store). The story, in order:

1. prospects submitted in HQ become leads in Sales within LEAD_BOUND_S, by an asset-triggered sync;
2. sellers decide: each won prospect is Approved, each lost or disqualified one Rejected, with exactly
   one email each, by asset-triggered `b2b_outcomes` runs, within OUTCOME_BOUND_S;
3. once the runs that our own writes cause have run, no run starts over QUIET_S, nothing is written,
   and the systems see only the triggers' looks (HQ one request a look, Dataverse two);
4. every watermark and delta link in the state store was written by a DAG run, never by a trigger;
5. every run of every DAG succeeded, and none was started by hand.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import airflow_services as af
import pytest
from cryptography.fernet import Fernet

from b2b_drivers.airflow_processes import DAG_IDS, LEGAL_ENTITIES
from b2b_onboarding.airflow import triggers
from d365_fakes.dataverse import company_id
from d365_fakes.scenario import observe, play_sellers, prospects, total_writes

pytestmark = pytest.mark.e2e

POLL_S = 3
SYNC, OUTCOMES, RECONCILIATION = "b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation"
WATCHED = {SYNC: "b2b_pending_prospects", OUTCOMES: "b2b_seller_outcomes"}  # DAG → the asset its trigger feeds
PROSPECTS = 12  # every seller's decision once at least, and the two invalid prospects (scenario.prospects)
LEAD_BOUND_S = 90
OUTCOME_BOUND_S = 120
# No run started for this long: the triggers have seen what the last runs wrote and started what it calls for.
SETTLE_S = 5 * POLL_S
# Longer than a trigger's refire (REFIRE_POLLS looks): a state it keeps seeing as work fires again within it.
QUIET_S = (triggers.REFIRE_POLLS + 2) * POLL_S
ASSET_TRIGGERED = "asset_triggered"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[af.AirflowServices]:
    topology = af.Topology(
        env={
            "AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING": "events",
            "AIRFLOW__D365_B2B_ONBOARDING__POLL_INTERVAL_S": str(POLL_S),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        },
        # Its log server on a port of its own: another deployment's triggerer may hold the default 8794.
        extra_processes=(af.Process("triggerer", ("triggerer",),
                                    {"AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(af.free_port())}),),  # fmt: skip
        artifacts="event-driven",
    )
    started = time.monotonic()
    running, stack = af.start(tmp_path_factory.mktemp("event-driven"), topology)
    with stack:
        running.watch(WATCHED, WATCHED.values())
        # Whatever the first looks start on the empty world (b2b_outcomes, when Dataverse's trigger looks before
        # the reconciliation that unpausing started has stored the delta links), then both triggers looking.
        _settle(running)
        _wait_looking(running)
        print(f"\nAirflow with a triggerer started and settled in {time.monotonic() - started:.0f} s")
        yield running


@pytest.fixture(scope="module")
def story() -> dict:
    """What the tests of the module hand on, in order: the prospects, the plan, the outcome."""
    seeded, plan = prospects(PROSPECTS)
    return {"seeded": seeded, "plan": plan}


def _run_count(services: af.AirflowServices) -> int:
    return services.api("GET", "/dags/~/dagRuns", params={"limit": 1})["total_entries"]


def _settle(services: af.AirflowServices, timeout: float = 300) -> None:
    """Until no run is active and none has started for SETTLE_S (a decided prospect leaving Pending, a lead
    written: our own writes are changes the triggers see once)."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while True:
        services.check()
        count, active = _run_count(services), services.active_runs()
        if active or count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since >= SETTLE_S:
            return
        if time.monotonic() > deadline:
            raise af.AirflowFailed(f"runs still starting after {timeout} s: {count} runs, {active} active\n"
                                   f"{services.log_tails()}")  # fmt: skip
        time.sleep(1)


def _wait_looking(services: af.AirflowServices, timeout: float = 120) -> None:
    """Until HQ and Dataverse each see a request while no run is active: the triggers' looks."""
    with services.admin() as admin:
        first = admin.counts()
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(POLL_S)
            now = admin.counts()
            assert not services.active_runs(), "a run started on the settled, empty world"
            if all(now[system]["requests"] > first[system]["requests"] for system in ("commerce", "dataverse")):
                return
            if time.monotonic() > deadline:
                raise af.AirflowFailed(f"the triggers did not look at HQ and Dataverse in {timeout} s: {now}\n"
                                       f"{services.log_tails()}")  # fmt: skip


def _key(row: dict) -> tuple[str, str]:
    return row["dataAreaId"].lower(), row["ProspectId"]


def _leads(services: af.AirflowServices) -> set[tuple[str, str]]:
    """The (legal entity, prospect id) of every lead in "All Commerce B2B leads", as a seller sees them."""
    legal_entity = {company_id(code): code for code in LEGAL_ENTITIES}
    seller = services.seller()
    try:
        return {(legal_entity[lead["_msdyn_company_value"]], lead["msdyn_prospectid"])
                for lead in seller.view("All Commerce B2B leads")}  # fmt: skip
    finally:
        seller.close()


def _transitions(services: af.AirflowServices, *to_stages: str) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(legal entity, prospect id) → the (dag_id, run_id) of each transition of the state store to `to_stages`."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    with sqlite3.connect(services.state_db) as connection:
        query = (f"SELECT legal_entity, prospect_id, dag_id, run_id FROM b2b_transitions WHERE to_stage IN "
                 f"({', '.join('?' * len(to_stages))}) ORDER BY id")  # fmt: skip
        for legal_entity, prospect_id, dag_id, run_id in connection.execute(query, to_stages):
            found.setdefault((legal_entity, prospect_id), []).append((dag_id, run_id))
    return found


def _when(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite keeps UTC without its offset


def test_a_prospect_submitted_in_hq_becomes_a_lead_started_by_the_hq_trigger(services, story):
    # The hourly safety net would make the leads too: it must not be what this test sees.
    services.no_scheduled_run_within(SYNC, LEAD_BOUND_S + SETTLE_S)
    before = {run["dag_run_id"] for run in services.runs(SYNC)}
    valid = {_key(row) for row in story["seeded"] if story["plan"][row["PrimaryEmailAddress"]] != "invalid"}
    assert len(valid) == PROSPECTS - 2

    with services.admin() as admin:
        admin.seed_prospects(story["seeded"])
    submitted = time.monotonic()
    while (leads := _leads(services)) != valid:
        waited = time.monotonic() - submitted
        assert waited < LEAD_BOUND_S, f"after {waited:.0f} s, leads of {sorted(leads)}; expected {sorted(valid)}"
        assert leads <= valid, f"leads of prospects that must not have one: {sorted(leads - valid)}"
        services.check()
        time.sleep(1)
    print(f"prospects → leads in {time.monotonic() - submitted:.0f} s")

    runs = {run["dag_run_id"]: run for run in services.runs(SYNC) if run["dag_run_id"] not in before}
    assert {run["run_type"] for run in runs.values()} == {ASSET_TRIGGERED}, runs
    made_by = _transitions(services, "lead_open")
    assert set(made_by) == valid
    for key, writers in made_by.items():
        assert len(writers) == 1, (key, writers)
        dag_id, run_id = writers[0]
        assert dag_id == SYNC and run_id in runs, (key, writers, sorted(runs))
        services.wait_for_run(SYNC, run_id)


def test_sellers_decisions_reach_hq_once_started_by_the_dataverse_trigger(services, story):
    seller = services.seller()
    try:
        decided = play_sellers(seller, story["plan"])
    finally:
        seller.close()
    assert decided["won"] and decided["lost"] and decided["disqualified"], decided
    played = time.monotonic()
    while not (outcome := observe(services.endpoints, services.cast, story["plan"])).ok:
        waited = time.monotonic() - played
        assert waited < OUTCOME_BOUND_S, f"after {waited:.0f} s: {[row for row in outcome.rows if not row['ok']]}"
        services.check()
        time.sleep(POLL_S)
    print(f"decisions → HQ and emails in {time.monotonic() - played:.0f} s: {dict(decided)}")
    story["outcome"] = outcome.rows

    # Each won prospect Approved, each lost or disqualified one Rejected, one email each (observe's `ok`).
    ends = {row["expected"] for row in outcome.rows}
    assert {"Approved", "Rejected", "Pending"} == ends
    assert outcome.emails == sum(row["expected"] != "Pending" for row in outcome.rows)
    # The runs that wrote the decisions: asset-triggered (one that the new leads started may have read them).
    runs = {run["dag_run_id"]: run for run in services.runs(OUTCOMES)}
    assert {run["run_type"] for run in runs.values()} == {ASSET_TRIGGERED}, runs
    made_by = _transitions(services, "approved", "rejected")
    assert set(made_by) == {(row["legal_entity"], row["prospect_id"]) for row in outcome.rows
                            if row["expected"] != "Pending"}  # fmt: skip
    for key, writers in made_by.items():
        assert len(writers) == 1, (key, writers)
        dag_id, run_id = writers[0]
        assert dag_id == OUTCOMES and run_id in runs, (key, writers, sorted(runs))
        services.wait_for_run(OUTCOMES, run_id)


def test_quiet_when_idle_only_the_triggers_look(services, story):
    _settle(services)  # the sync after prospects left Pending, the outcomes after the leads and qualifications
    for dag_id in (SYNC, RECONCILIATION):  # their crons would start a run in the window
        services.no_scheduled_run_within(dag_id, QUIET_S + SETTLE_S)
    runs = _run_count(services)
    with services.admin() as admin:
        first, opened = admin.counts(), time.monotonic()
        time.sleep(QUIET_S)
        last, closed = admin.counts(), time.monotonic()
    looks = (closed - opened) / POLL_S
    hq = last["commerce"]["requests"] - first["commerce"]["requests"]
    dataverse = last["dataverse"]["requests"] - first["dataverse"]["requests"]
    tokens = last["entra"]["tokens_issued"] - first["entra"]["tokens_issued"]
    print(f"idle for {closed - opened:.0f} s ({looks:.0f} looks): HQ {hq} requests, Dataverse {dataverse}, "
          f"Entra ID {tokens} tokens")  # fmt: skip

    assert _run_count(services) == runs and not services.active_runs(), "a run started on an idle world"
    assert total_writes(last) == total_writes(first)
    # At most one look more than the window holds (a look takes time too) and two for slack; at least a
    # third of them: the triggers are alive and looking, on a loaded machine.
    most = math.ceil(looks) + 3
    assert looks / 3 <= hq <= most, f"HQ: {hq} requests in {looks:.0f} looks (one a look)"
    assert 2 * looks / 3 <= dataverse <= 2 * most, f"Dataverse: {dataverse} requests in {looks:.0f} looks (two a look)"
    assert tokens <= 1, "the triggers reuse their Entra ID tokens (an hour each), shared through the state store"
    # Still exactly what the sellers decided, one email each.
    assert observe(services.endpoints, services.cast, story["plan"]).rows == story["outcome"]


def test_only_dag_runs_move_watermarks_and_delta_links(services):
    with sqlite3.connect(services.state_db) as connection:
        links = connection.execute("SELECT entity_set, run_id, updated_at FROM b2b_delta_links").fetchall()
    assert {"leads", "opportunities", *(f"Prospects@{code}" for code in LEGAL_ENTITIES)} <= {row[0] for row in links}
    for entity_set, run_id, updated_at in links:
        dag_ids = (SYNC,) if entity_set.startswith("Prospects@") else (OUTCOMES, RECONCILIATION)
        found = [run for dag_id in dag_ids for run in services.runs(dag_id) if run["dag_run_id"] == run_id]
        assert found, f"{entity_set}: run {run_id!r} is no run of {dag_ids}"
        run = found[0]
        assert _when(run["start_date"]) <= _when(updated_at) <= _when(run["end_date"]), (entity_set, run, updated_at)


def test_every_run_succeeded_and_none_was_started_by_hand(services):
    services.wait_idle()
    runs = [(dag_id, run) for dag_id in DAG_IDS for run in services.runs(dag_id)]
    assert [(dag_id, run["dag_run_id"], run["state"]) for dag_id, run in runs if run["state"] != "success"] == []
    assert [(dag_id, run["dag_run_id"]) for dag_id, run in runs if run["run_type"] == "manual"] == []
    assert services.task_errors() == []
    print("runs: " + ", ".join(f"{dag_id} {kind} {n}" for (dag_id, kind), n in
                               sorted(Counter((dag_id, run["run_type"]) for dag_id, run in runs).items())))  # fmt: skip
