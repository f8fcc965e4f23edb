"""A tenant whose lead columns differ from the standard ones, played end to end: the fakes' tenant is
changed through `POST /_admin/model` (a column's MaxLength, a choice's option values), and Airflow's
tasks pull from HQ and push to Sales against it, reading its metadata once per run
(`tasks.tenant_of_run`). `test_tenant.py` checks the same limits and values on the pure functions."""

from __future__ import annotations

import pytest
from test_tenant import PROSPECT, in_a_run

from b2b_onboarding.airflow import tasks
from b2b_onboarding.store.state import PROSPECT_COLUMNS, StateStore

RUN = "manual__tenant_differs"
PROSPECT_ID = "P-000001"
LAST_NAME = "L" * 60  # longer than the standard lastname (50)
# The B2B status choice as a tenant whose solution publisher numbers its options from its prefix has it.
TENANT_STATUS_VALUES = {"Pending": 100000000, "Approved": 100000001, "Rejected": 100000002, "Unknown": 100000003}


@pytest.fixture
def prospect(admin):
    """One Pending B2B prospect of usrt whose last name has 60 characters."""
    admin.seed_companies(["usrt"])
    admin.seed_prospects([{**PROSPECT, "ProspectId": PROSPECT_ID, "ProspectName": f"Ada {LAST_NAME}"}])
    return PROSPECT_ID


def pull_then_push(monkeypatch, world, tmp_path, run_id: str = RUN) -> tuple[dict, dict]:
    """The run's pull of usrt, then its push of the prospect, each a task in a process of its own."""
    in_a_run(monkeypatch, world, tmp_path, run_id, "pull_prospects")
    pulled = tasks.pull_prospects("usrt")
    in_a_run(monkeypatch, world, tmp_path, run_id, "push_leads")
    return pulled, tasks.push_leads("usrt", PROSPECT_ID, PROSPECT_ID)


def leads(seller, *columns: str) -> list[dict]:
    """The prospect's leads in Sales, as a person sees them."""
    return seller.rows("leads", {"$select": ",".join(columns), "$filter": f"msdyn_prospectid eq '{PROSPECT_ID}'"})


def tracked(tmp_path) -> dict:
    """The prospect as the state store (the one the tasks' connection names) tracks it."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        return store.frame(keys=[("usrt", PROSPECT_ID)], columns=PROSPECT_COLUMNS).iloc[0].to_dict()
    finally:
        store.close()


def count_entity_definitions(admin) -> None:
    """Every EntityDefinitions request from now on is counted (`entity_definitions_sent`): a fault
    rule that fires on each of them and only delays its answer by a millisecond."""
    admin.add_fault(system="dataverse", kind="slow", delay_s=0.001, route="/EntityDefinitions", share=1)


def entity_definitions_sent(admin) -> int:
    return sum(rule["fired"] for rule in admin.faults()["rules"] if rule["route"] == "/EntityDefinitions")


def test_a_60_character_last_name_is_valid_where_lastname_holds_80_and_written_whole(
    world, admin, seller, prospect, monkeypatch, tmp_path
):
    admin.change_model(system="dataverse", table="lead", max_lengths={"lastname": 80})

    pulled, pushed = pull_then_push(monkeypatch, world, tmp_path)

    assert (pulled["pulled"], pulled.get("invalid", 0), pushed["created"]) == (1, 0, 1)
    assert tracked(tmp_path)["last_error"] is None
    written = leads(seller, "firstname", "lastname")
    assert [(row["firstname"], row["lastname"]) for row in written] == [("Ada", LAST_NAME)]


def test_the_same_prospect_is_invalid_where_lastname_holds_30_naming_the_limit_and_no_lead_is_written(
    world, admin, seller, prospect, monkeypatch, tmp_path
):
    admin.change_model(system="dataverse", table="lead", max_lengths={"lastname": 30})

    pulled, pushed = pull_then_push(monkeypatch, world, tmp_path)

    assert (pulled["pulled"], pulled["invalid"], pushed.get("created", 0)) == (1, 1, 0)
    assert tracked(tmp_path)["last_error"] == (
        f"prospect usrt/{PROSPECT_ID}: ProspectName: its last word has 60 characters; the lead column 'lastname' "
        "holds at most 30 in this tenant"
    )
    assert leads(seller, "lastname") == []
    assert admin.counts()["dataverse"]["writes"].get("leads", 0) == 0


def test_the_lead_gets_the_tenants_pending_value_and_the_rejection_writes_no_standard_value(
    world, admin, seller, clerk, prospect, monkeypatch, tmp_path
):
    """The status values are the tenant's (100000000+), read by label. The product writes the
    lead's status once, Pending, at creation: the reconciliation decides in HQ (its enum, by name)
    and writes no status to the lead, so the tenant's value stays and nothing is refused."""
    admin.change_model(system="dataverse", table="lead", max_lengths={"lastname": 80},
                       options={"msdyn_b2bprospectstatus": TENANT_STATUS_VALUES})  # fmt: skip

    _, pushed = pull_then_push(monkeypatch, world, tmp_path)
    [lead] = leads(seller, "leadid", "msdyn_b2bprospectstatus")
    assert pushed["created"] == 1 and lead["msdyn_b2bprospectstatus"] == TENANT_STATUS_VALUES["Pending"]

    lead_writes = admin.counts()["dataverse"]["writes"]["leads"]
    seller.disqualify(lead["leadid"])
    in_a_run(monkeypatch, world, tmp_path, RUN, "read_outcomes")
    tasks.read_outcomes()
    in_a_run(monkeypatch, world, tmp_path, RUN, "reject_lost")
    rejected = tasks.reject_lost("usrt", PROSPECT_ID, PROSPECT_ID)

    assert rejected.get("written", 0) + rejected.get("rejected", 0) == 1  # in changesets, or one by one
    assert clerk.prospect("usrt", PROSPECT_ID)["B2BProspectStatus"] == "Rejected"
    assert leads(seller, "msdyn_b2bprospectstatus")[0]["msdyn_b2bprospectstatus"] == TENANT_STATUS_VALUES["Pending"]
    assert admin.counts()["dataverse"]["writes"]["leads"] == lead_writes + 1  # the seller's disqualification only


def test_the_tenants_model_is_read_by_the_runs_first_task_and_its_second_task_sends_no_entity_definitions_request(
    world, admin, seller, prospect, monkeypatch, tmp_path
):
    admin.change_model(system="dataverse", table="lead", max_lengths={"lastname": 80})
    count_entity_definitions(admin)

    in_a_run(monkeypatch, world, tmp_path, RUN, "pull_prospects")
    tasks.pull_prospects("usrt")
    read_by_the_pull = entity_definitions_sent(admin)
    in_a_run(monkeypatch, world, tmp_path, RUN, "push_leads")
    pushed = tasks.push_leads("usrt", PROSPECT_ID, PROSPECT_ID)

    assert read_by_the_pull == 3  # the lead, its string columns, its choices
    assert entity_definitions_sent(admin) == read_by_the_pull  # the push used the run's model...
    assert pushed["created"] == 1 and leads(seller, "lastname")[0]["lastname"] == LAST_NAME  # ...the tenant's

    in_a_run(monkeypatch, world, tmp_path, "manual__next", "push_leads")
    tasks.push_leads("usrt", PROSPECT_ID, PROSPECT_ID)
    assert entity_definitions_sent(admin) == read_by_the_pull + 3  # a new run reads the tenant anew
