"""The read-only preflight against the fakes: all ✓ on the default tenant; then one misconfiguration
at a time, each failing its own row and only it (the rows that depend on it not checked), and
nothing written; the CLI's exit codes; the task body's verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from b2b_onboarding.airflow import tasks
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.flow import preflight
from b2b_onboarding.flow.preflight import FAILED, NOT_CHECKED, PASSED, Row
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import airflow_connections

HQ, DV = "Commerce headquarters", "Dataverse (Sales)"
LEGAL_ENTITIES = ["usrt", "usmf"]
CUSTOMER_GROUP = "30"


@pytest.fixture
def tenant(admin: FakeAdmin) -> FakeAdmin:
    """The default tenant, with dual-write's legal entities in Dataverse."""
    admin.seed_companies(LEGAL_ENTITIES)
    return admin


def run(world, commerce: dict | None = None, sales: dict | None = None) -> dict[tuple[str, str], Row]:
    """The preflight of the integration's connections, each changed by `commerce` / `sales`
    (connection fields `host`, `login`, `password`, or extras)."""

    def settings(resource: str, changes: dict | None, **extra) -> Callable:
        changes = dict(changes or {})
        fields = {"host": changes.pop("host", resource), "login": changes.pop("login", world.cast.integration["client_id"]),
                  "password": changes.pop("password", world.cast.integration["client_secret"])}  # fmt: skip
        return lambda: ServiceSettings.from_connection(
            "d365_test", **fields, extra={"authority": world.endpoints.authority, "ca_bundle": world.endpoints.ca_bundle,
                                          **extra, **changes})  # fmt: skip

    rows = preflight.Preflight(
        settings(world.endpoints.commerce, commerce, legal_entities=LEGAL_ENTITIES, customer_group=CUSTOMER_GROUP),
        settings(world.endpoints.dataverse, sales),
    ).run()
    return {(row.check, row.system): row for row in rows}


def statuses(rows: dict[tuple[str, str], Row], status: str) -> set[tuple[str, str]]:
    return {key for key, row in rows.items() if row.status == status}


def test_the_default_tenant_passes_every_check_and_nothing_is_written(world, tenant):
    before = tenant.counts()
    rows = run(world)
    assert statuses(rows, PASSED) == set(rows), preflight.table(list(rows.values()))
    expected = {("Token", HQ), ("Token", DV), ("Application user", DV), ("Application user", HQ),
                ("Privileges on lead", DV), ("Lead columns and alternate key", DV),
                ('View "All Commerce B2B leads"', DV), ("Read Prospects", HQ), ("Legal entity usrt", HQ),
                ("Legal entity usmf", DV), ("Customer group in usmf", HQ), ("Clock", "Entra ID")}  # fmt: skip
    assert expected <= set(rows)
    assert "prvCreateLead" in rows[("Privileges on lead", DV)].detail
    after = tenant.counts()
    assert after["commerce"]["writes"] == before["commerce"]["writes"]
    assert after["dataverse"]["writes"] == before["dataverse"]["writes"]
    assert preflight.verdict(list(rows.values())).startswith(f"Preflight passed: all {len(rows)} checks ✓")


def test_a_customer_group_of_each_legal_entity_passes_its_rows(world, tenant):
    rows = run(world)
    for legal_entity in LEGAL_ENTITIES:
        assert rows[(f"Customer group in {legal_entity}", HQ)].detail == f"{CUSTOMER_GROUP}: Retail customers"


def _integration(world) -> str:
    return world.cast.integration["client_id"]


# One misconfiguration each: (how to make it, the connections' changes, the rows that fail, words
# the failed rows must show).
MISCONFIGURATIONS = {
    "wrong client secret": (None, {"sales": {"password": "not-the-secret"}}, {("Token", DV)}, "AADSTS7000215"),
    "unknown client id": (None, {"commerce": {"login": "no-such-app"}}, {("Token", HQ)}, "AADSTS700016"),
    "Environment URL not a resource of the tenant": (
        None, {"sales": {"host": "https://org-not-in-this-tenant.crm.dynamics.com"}}, {("Token", DV)}, "AADSTS500011"),
    "no application user in Dataverse": (
        lambda admin, world: admin.security(client_id=_integration(world), system="dataverse", application_user=False),
        {}, {("Application user", DV)}, ""),
    "no application user in HQ": (
        lambda admin, world: admin.security(client_id=_integration(world), system="commerce", application_user=False),
        {}, {("Application user", HQ)}, ""),
    "a missing Dataverse privilege": (
        lambda admin, world: admin.security(client_id=_integration(world), system="dataverse", revoke=["prvCreateLead"]),
        {}, {("Privileges on lead", DV)}, "prvCreateLead"),
    "a missing HQ read privilege": (
        lambda admin, world: admin.security(client_id=_integration(world), system="commerce",
                                            revoke=["ProspectsEntityRead"]),
        {}, {("Read Prospects", HQ)}, "HTTP 403"),
    "a missing lead column": (
        lambda admin, world: admin.change_model(system="dataverse", table="lead", remove_columns=["msdyn_prospectid"]),
        {}, {("Lead columns and alternate key", DV)}, "msdyn_prospectid"),
    "the alternate key not Active": (
        lambda admin, world: admin.change_model(system="dataverse", table="lead", key_status="Failed"),
        {}, {("Lead columns and alternate key", DV)}, "Failed"),
    "the view removed": (
        lambda admin, world: admin.remove_saved_view("All Commerce B2B leads"),
        {}, {('View "All Commerce B2B leads"', DV)}, "All Commerce B2B leads"),
    "an unknown legal entity": (
        None, {"commerce": {"legal_entities": ["usrt", "zzzz"]}},
        {("Legal entity zzzz", HQ), ("Legal entity zzzz", DV)}, "zzzz"),
    "no customer group configured": (
        None, {"commerce": {"customer_group": None}},
        {("Customer group in usrt", HQ), ("Customer group in usmf", HQ)},
        'no customer group configured: HQ requires one for every new customer set the extra "customer_group"'),
    "an unknown customer group": (
        None, {"commerce": {"customer_group": "NO-SUCH-GROUP"}},
        {("Customer group in usrt", HQ), ("Customer group in usmf", HQ)}, "NO-SUCH-GROUP"),
    "the clock skewed": (lambda admin, world: admin.skew_clock(600), {}, {("Clock", "Entra ID")}, "s off this machine's clock"),
}  # fmt: skip


@pytest.mark.parametrize("case", MISCONFIGURATIONS, ids=str)
def test_one_misconfiguration_fails_its_own_row_and_only_it(world, tenant, case):
    make, changes, failing, words = MISCONFIGURATIONS[case]
    if make is not None:
        make(tenant, world)
    rows = run(world, **changes)
    table = preflight.table(list(rows.values()))
    assert statuses(rows, FAILED) == failing, table
    for key in failing:
        assert words.lower() in f"{rows[key].detail} {rows[key].next_step}".lower(), table
        assert rows[key].next_step, table
    # Every row not checked names a check that did not pass; every other row passed.
    for key in statuses(rows, NOT_CHECKED):
        assert any(f"{name} ({system})" in rows[key].detail for name, system in failing | statuses(rows, NOT_CHECKED)
                   if (name, system) != key), table  # fmt: skip
    assert statuses(rows, PASSED) | statuses(rows, FAILED) | statuses(rows, NOT_CHECKED) == set(rows)
    verdict = preflight.verdict(list(rows.values()))
    assert verdict.startswith("Preflight failed") and all(f"{name} ({system})" in verdict for name, system in failing)


def test_a_failed_token_leaves_every_check_that_needs_it_unchecked(world, tenant):
    rows = run(world, sales={"password": "not-the-secret"})
    dataverse = {key for key in rows if key[1] == DV} - {("Connection", DV), ("Token", DV)}
    assert dataverse <= statuses(rows, NOT_CHECKED)
    assert {key for key in rows if key[1] == HQ} <= statuses(rows, PASSED)


def test_an_unusable_connection_fails_its_own_row(world, tenant):
    rows = run(world, commerce={"authority": "http://not-https"})
    assert statuses(rows, FAILED) == {("Connection", HQ)}
    assert "extra.authority" in rows[("Connection", HQ)].detail


def test_a_connection_without_legal_entities_fails_its_own_row(world, tenant):
    rows = run(world, commerce={"legal_entities": []})
    assert statuses(rows, FAILED) == {("Legal entities", HQ)}
    assert not any(check.startswith(("Legal entity ", "Customer group")) for check, _ in rows)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "b2b_onboarding.airflow.preflight", *args], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.fixture
def connections(world, tenant, tmp_path) -> dict:
    """The process environment with the product's connections as `AIRFLOW_CONN_*` variables."""
    return {**os.environ, **airflow_connections(world.endpoints, world.cast, LEGAL_ENTITIES, tmp_path / "state.db")}


def test_the_cli_exits_0_when_every_check_passes_and_prints_the_table(connections):
    result = _cli(connections)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Preflight passed" in result.stdout and "Privileges on lead" in result.stdout
    assert json.loads(connections["AIRFLOW_CONN_D365_SALES"])["password"] not in result.stdout + result.stderr


def test_the_cli_exits_1_when_a_check_fails(connections):
    sales = json.loads(connections["AIRFLOW_CONN_D365_SALES"])
    result = _cli({**connections, "AIRFLOW_CONN_D365_SALES": json.dumps({**sales, "password": "not-the-secret"})})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Preflight failed: 1 of" in result.stdout and "Token (Dataverse (Sales))" in result.stdout


def test_the_cli_names_a_connection_airflow_does_not_know(connections, airflow_db):
    result = _cli(connections, "--sales-conn", "no_such_connection")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'no_such_connection' is not defined" in result.stdout


def test_the_cli_exits_2_on_a_usage_error(connections):
    assert _cli(connections, "--no-such-option").returncode == 2


def test_the_task_fails_naming_the_failed_checks_in_its_first_line(world, tenant, connections, monkeypatch, caplog):
    for name in ("AIRFLOW_CONN_D365_COMMERCE", "AIRFLOW_CONN_D365_SALES"):
        monkeypatch.setenv(name, connections[name])
    tasks.run_preflight()
    assert "Preflight passed" in caplog.text
    tenant.remove_saved_view("All Commerce B2B leads")
    with pytest.raises(tasks.PreflightFailed) as failed:
        tasks.run_preflight()
    assert str(failed.value).startswith('Preflight failed: 1 of') and 'View "All Commerce B2B leads"' in str(failed.value)
