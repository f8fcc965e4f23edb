"""The product's clients refused by the tenant's security, as a real tenant refuses them (the fakes'
`/_admin/security`, Entra ID's AADSTS700016 and AADSTS500011): the failure's one line names the
connection, what is missing and what to do, and the failure is final (no retry can cure it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import AuthenticationError, D365Error, cures_itself

BEFORE_FIRST_RUN = "(README, Before the first run on your tenant)"


@pytest.fixture
def sales(world, admin) -> Iterator[SalesClient]:
    admin.seed_companies(["usmf"])
    client = SalesClient.connect(world.settings(world.endpoints.dataverse))
    yield client
    client.odata.close()


@pytest.fixture
def commerce(world, admin) -> Iterator[CommerceClient]:
    admin.seed_prospects([{"dataAreaId": "usmf", "ProspectId": "P-1", "ProspectName": "Ann Lee"}])
    client = CommerceClient.connect(world.settings(world.endpoints.commerce, legal_entities=["usmf"]))
    yield client
    client.odata.close()


def integration(world) -> str:
    return world.cast.integration["client_id"]


def assert_final(error: BaseException) -> str:
    line = str(error)
    assert "\n" not in line and " after " not in line.split(" with HTTP")[0]  # one line, one attempt
    assert not cures_itself(error)
    return line


def test_a_missing_dataverse_privilege_names_the_privilege_and_the_role_to_give(world, admin, sales):
    admin.security(client_id=integration(world), system="dataverse", revoke=["prvCreateLead"])
    with pytest.raises(D365Error) as refused:
        sales.create_lead("usmf", "P-1", {"lastname": "Lee"})

    line = assert_final(refused.value)
    assert line.startswith("Dataverse (Sales) via Airflow connection 'd365_test': create lead for lead of prospect "
                           "usmf/P-1 failed with HTTP 403 0x80040220: Principal user (Id=")  # fmt: skip
    assert "is missing prvCreateLead privilege" in line
    assert line.endswith(f"Next step: give the application user of connection 'd365_test' a role with prvCreateLead "
                         f"on lead {BEFORE_FIRST_RUN}.")  # fmt: skip


def test_a_missing_append_to_on_the_company_is_named_for_the_bulk_upsert(world, admin, sales):
    admin.security(client_id=integration(world), system="dataverse", revoke=["prvAppendTocdm_Company"])
    with pytest.raises(D365Error) as refused:
        sales.upsert_leads("usmf", [("P-1", {"lastname": "Lee"}), ("P-2", {"lastname": "Kim"})])

    line = assert_final(refused.value)
    assert "upsert leads for 2 leads (usmf/P-1 … usmf/P-2) failed with HTTP 403 0x80040220" in line
    assert f"a role with prvAppendTocdm_Company on cdm_company {BEFORE_FIRST_RUN}." in line


def test_an_app_without_a_dataverse_application_user_is_told_to_add_one(world, admin, sales):
    admin.security(client_id=integration(world), system="dataverse", application_user=False)
    with pytest.raises(D365Error) as refused:
        sales.whoami()

    line = assert_final(refused.value)
    assert "WhoAmI failed with HTTP 403 0x80072560: The user is not a member of the organization." in line
    assert ("Next step: the client id of connection 'd365_test' has no application user in this Dataverse "
            "environment: add one") in line  # fmt: skip
    assert "'Commerce B2B onboarding integration'" in line


def test_a_missing_hq_access_names_the_data_entity_and_the_access(world, admin, commerce):
    admin.security(client_id=integration(world), system="commerce", revoke=["ProspectsEntityUpdate"])
    prospect = commerce.get_prospect("usmf", "P-1")
    with pytest.raises(D365Error) as refused:
        commerce.set_prospect_status("usmf", "P-1", "Approved", prospect["@odata.etag"])

    line = assert_final(refused.value)
    assert line.startswith("Commerce headquarters via Airflow connection 'd365_test': set prospect status to Approved "
                           "for prospect usmf/P-1 failed with HTTP 403")  # fmt: skip
    assert "has no Update access to data entity Prospects" in line
    assert ("Microsoft Entra applications) a role with Update access to data entity Prospects "
            f"{BEFORE_FIRST_RUN}.") in line  # fmt: skip


def test_an_app_hq_does_not_know_is_told_where_hq_registers_apps(world, admin, commerce):
    admin.security(client_id=integration(world), system="commerce", application_user=False)
    with pytest.raises(D365Error) as refused:
        commerce.get_prospect("usmf", "P-1")

    line = str(refused.value)
    assert not cures_itself(refused.value)
    assert "HTTP 401" in line and "System administration > Setup > Microsoft Entra applications" in line


def test_an_unknown_client_id_is_not_an_app_registration_of_the_tenant(world, admin):
    unknown = str(uuid.uuid4())
    settings = world.settings(world.endpoints.dataverse).model_copy(update={"client_id": unknown})
    client = SalesClient.connect(settings)
    with client.odata, pytest.raises(AuthenticationError) as refused:
        client.whoami()

    line = assert_final(refused.value)
    tenant = world.endpoints.tenant_id
    assert line.startswith("Dataverse (Sales) via Airflow connection 'd365_test': Entra ID (")
    assert "with HTTP 400 unauthorized_client." in line and "AADSTS700016" in line
    assert f"Next step: the client id (login) {unknown} of this connection is not an app registration in tenant {tenant}" in line


def test_a_host_that_is_not_a_resource_of_the_tenant_is_named(world, admin):
    host = world.endpoints.dataverse.replace("127.0.0.1", "localhost")
    client = SalesClient.connect(world.settings(host))
    with client.odata, pytest.raises(AuthenticationError) as refused:
        client.whoami()

    line = assert_final(refused.value)
    assert "with HTTP 400 invalid_resource." in line and "AADSTS500011" in line
    assert (f"Next step: the Environment URL (host) {host} of this connection is not a resource of tenant "
            f"{world.endpoints.tenant_id}") in line  # fmt: skip
