"""Microsoft's own Dataverse client, PowerPlatform-Dataverse-Client 1.1.0, signed in with
azure-identity's ClientSecretCredential, against the running fakes over HTTPS: what it sends (the
EntityDefinitions lookups that resolve a table's entity set and primary key, the picklist metadata
it reads to turn labels into values, Prefer headers, paging through `@odata.nextLink`, alternate-key
URLs, UpsertMultiple) the fakes answer as the Web API does. The SDK is used as shipped."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.core.errors import HttpError
from PowerPlatform.Dataverse.models.upsert import UpsertItem

from d365_fakes.running import Endpoints, FakeAdmin, running_fakes

# An app registration of its own, with the default roles (System Administrator): it deletes leads.
APP = {"client_id": "dataverse-sdk", "client_secret": secrets.token_urlsafe(24), "display_name": "Dataverse SDK"}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    with running_fakes(tmp_path_factory.mktemp("fakes"), [APP]) as endpoints:
        yield endpoints


@pytest.fixture
def admin(fakes: Endpoints) -> Iterator[FakeAdmin]:
    with FakeAdmin(fakes) as admin:
        admin.reset()
        yield admin


@pytest.fixture
def client(fakes: Endpoints, admin: FakeAdmin, monkeypatch: pytest.MonkeyPatch) -> Iterator[DataverseClient]:
    # The SDK talks through requests, which trusts the CA bundle named in the environment.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", fakes.ca_bundle)
    credential = ClientSecretCredential(
        fakes.tenant_id, APP["client_id"], APP["client_secret"], authority=fakes.entra,
        disable_instance_discovery=True, connection_verify=fakes.ca_bundle,
    )  # fmt: skip
    with DataverseClient(fakes.dataverse, credential) as client:
        yield client


def leads_by_prospect_id(client: DataverseClient) -> dict[str, dict]:
    rows = client.records.list("lead", select=["msdyn_prospectid", "lastname", "leadsourcecode"])
    return {row["msdyn_prospectid"]: row for row in rows}


def test_create_get_update_and_delete_a_lead(client: DataverseClient, admin: FakeAdmin) -> None:
    lead_id = client.records.create("lead", {"lastname": "Zhang", "companyname": "Contoso", "leadsourcecode": 8})
    lead = client.records.get("lead", lead_id, select=["lastname", "companyname", "leadsourcecode"])
    assert (lead.id, lead["lastname"], lead["companyname"], lead["leadsourcecode"]) == (lead_id, "Zhang", "Contoso", 8)
    # A choice's label is turned into its value by the SDK, from the column's OptionSet metadata.
    client.records.update("lead", lead_id, {"lastname": "Zhang Wei", "leadsourcecode": "Word of Mouth"})
    updated = client.records.get("lead", lead_id, select=["lastname", "leadsourcecode"])
    assert (updated["lastname"], updated["leadsourcecode"]) == ("Zhang Wei", 9)
    client.records.delete("lead", lead_id)
    with pytest.raises(HttpError) as missing:
        client.records.get("lead", lead_id)
    assert (missing.value.status_code, missing.value.details["service_error_code"]) == (404, "0x80040217")


def test_list_with_a_filter_across_pages(client: DataverseClient) -> None:
    for number in range(5):
        client.records.create("lead", {"lastname": f"Lead {number}", "subject": "sdk" if number % 2 else "other"})
    # Prefer: odata.maxpagesize=1, then the @odata.nextLink of each page
    pages = list(client.records.list_pages("lead", filter="subject eq 'sdk'", select=["lastname"], page_size=1))
    assert [len(page) for page in pages] == [1, 1]
    assert sorted(row["lastname"] for page in pages for row in page) == ["Lead 1", "Lead 3"]
    everything = client.records.list("lead", select=["lastname"], page_size=2)
    assert sorted(row["lastname"] for row in everything) == [f"Lead {number}" for number in range(5)]


def test_upsert_by_alternate_key_one_and_many(client: DataverseClient) -> None:
    client.records.upsert("lead", [UpsertItem(alternate_key={"msdyn_prospectid": "P-1"}, record={"lastname": "One"})])
    client.records.upsert("lead", [UpsertItem(alternate_key={"msdyn_prospectid": "P-1"}, record={"lastname": "Uno"})])
    assert {key: row["lastname"] for key, row in leads_by_prospect_id(client).items()} == {"P-1": "Uno"}
    many = [
        UpsertItem(alternate_key={"msdyn_prospectid": f"P-{number}"}, record={"lastname": f"Lead {number}", "leadsourcecode": "Web"})
        for number in range(1, 4)
    ]
    client.records.upsert("lead", many)  # UpsertMultiple
    rows = leads_by_prospect_id(client)
    assert {key: (row["lastname"], row["leadsourcecode"]) for key, row in rows.items()} == {
        "P-1": ("Lead 1", 8), "P-2": ("Lead 2", 8), "P-3": ("Lead 3", 8)}


def test_the_model_s_limits_reach_the_sdk_as_dataverse_errors(client: DataverseClient) -> None:
    with pytest.raises(HttpError) as too_long:
        client.records.create("lead", {"lastname": "x" * 51})
    assert too_long.value.status_code == 400
    assert too_long.value.details["service_error_code"] == "0x80044331"
    assert "exceeded the maximum allowed length of '50'" in str(too_long.value)
    items = [UpsertItem(alternate_key={"msdyn_prospectid": "P-1"}, record={"lastname": "Fine"}),
             UpsertItem(alternate_key={"msdyn_prospectid": "P-2"}, record={"leadsourcecode": 77})]
    with pytest.raises(HttpError) as out_of_range:
        client.records.upsert("lead", items)
    assert out_of_range.value.details["service_error_code"] == "0x8004431a"
    assert leads_by_prospect_id(client) == {}  # all or nothing


def test_a_removed_column_is_unknown_to_the_sdk_too(client: DataverseClient, admin: FakeAdmin) -> None:
    admin.change_model(system="dataverse", table="lead", remove_columns=["msdyn_prospectid"])
    with pytest.raises(HttpError) as unknown:
        client.records.create("lead", {"lastname": "A", "msdyn_prospectid": "P-1"})
    assert unknown.value.details["service_error_code"] == "0x80060888"
