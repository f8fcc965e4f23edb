"""Security as on a real tenant: application users, security roles and privileges in Dataverse
and HQ, the refusals of each, the admin surface that changes them, and Microsoft's clock.

All three fakes run in-process (server.create_apps) with real tokens from the fake tenant.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import jwt
import pytest
from starlette.testclient import TestClient

from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CommerceState
from d365_fakes.dataverse import API_ROOT, DataverseState, company_id
from d365_fakes.faults import FaultPlan
from d365_fakes.limits import ServiceProtection
from d365_fakes.security import B2B_ONBOARDING_ROLE, DATAVERSE_ROLES, HQ_ROLES
from d365_fakes.server import create_apps
from d365_fakes.tokens import TokenIssuer

ENTRA = "https://login.test"
TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
COMMERCE = "https://hq.test"
DATAVERSE = "https://org.crm.test"
INTEGRATION = ClientRegistration(
    "b2b-onboarding", "integration-secret",
    dataverse_roles=(B2B_ONBOARDING_ROLE,), commerce_roles=(B2B_ONBOARDING_ROLE,),
)  # fmt: skip
ADMIN_APP = ClientRegistration("admin-app", "admin-secret")  # the default roles: System Administrator
LEAD_ID = "6a0d1a2e-3c4b-4d5e-8f70-112233445566"


class Tenant:
    def __init__(self) -> None:
        self.issuer = TokenIssuer(ENTRA, TENANT_ID)
        clients = {client.client_id: client for client in (INTEGRATION, ADMIN_APP)}
        entra, commerce, dataverse = create_apps(
            self.issuer, clients, COMMERCE, DATAVERSE, CommerceState(), DataverseState(), FaultPlan(),
            ServiceProtection(),
        )  # fmt: skip
        self.entra = TestClient(entra, base_url=ENTRA)
        self.commerce = TestClient(commerce, base_url=f"{COMMERCE}/data/")
        self.dataverse = TestClient(dataverse, base_url=f"{DATAVERSE}{API_ROOT}/")
        self.as_client(INTEGRATION)

    def as_client(self, client: ClientRegistration) -> None:
        self.dataverse.headers["Authorization"] = self.bearer(client, DATAVERSE)
        self.commerce.headers["Authorization"] = self.bearer(client, COMMERCE)

    def bearer(self, client: ClientRegistration, resource: str) -> str:
        return "Bearer " + self.issuer.issue(client, resource)["access_token"]

    def admin(self, path: str, body: object = None) -> None:
        response = self.entra.post(f"/_admin/{path}", json=body)
        assert response.status_code in (200, 204), response.text

    def revoke(self, system: str, *privileges: str, client: ClientRegistration = INTEGRATION) -> None:
        self.admin("security", {"client_id": client.client_id, "system": system, "revoke": list(privileges)})


@pytest.fixture
def tenant() -> Iterator[Tenant]:
    world = Tenant()
    world.admin("dataverse/companies", {"codes": ["usmf"]})
    world.admin("commerce/prospects", {"prospects": [{"dataAreaId": "usmf", "ProspectId": "P-1", "ProspectName": "Ann"}]})
    yield world


def lead(prospect_id: str = "P-1", **columns: object) -> dict:
    return {"msdyn_prospectid": prospect_id, "lastname": "Lee",
            "msdyn_company@odata.bind": f"/cdm_companies({company_id('usmf')})", **columns}  # fmt: skip


def refusal(response, status: int = 403) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def assert_missing(response, privilege: str, entity: str, otc: int) -> None:
    error = refusal(response)
    assert error["code"] == "0x80040220"
    assert f"is missing {privilege} privilege (Id=" in error["message"]
    assert f"on OTC={otc} for entity '{entity}'" in error["message"]
    assert error["message"].startswith(f"Principal user (Id={INTEGRATION.app_user_id}, type=8, roleCount=1, ")


# Dataverse -----------------------------------------------------------------------------------------


def test_the_least_privilege_role_does_what_the_product_does(tenant):
    api = tenant.dataverse
    assert api.get("WhoAmI").status_code == 200
    assert api.get("cdm_companies", params={"$select": "cdm_companycode"}).status_code == 200
    created = api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"})
    assert created.status_code == 204, created.text
    upsert = {"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": LEAD_ID, **lead(subject="x")},
                          {"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": str(uuid.uuid4()), **lead("P-2")}]}  # fmt: skip
    assert api.post("leads/Microsoft.Dynamics.CRM.UpsertMultiple", json=upsert).status_code == 204
    for entity_set in ("leads", "accounts", "contacts", "opportunities", "savedqueries", "systemusers"):
        assert api.get(entity_set).status_code == 200, entity_set


def test_what_the_least_privilege_role_does_not_allow_is_refused_naming_the_privilege(tenant):
    api = tenant.dataverse
    assert api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"}).status_code == 204
    assert_missing(api.delete(f"leads({LEAD_ID})"), "prvDeleteLead", "lead", 4)
    assert_missing(api.post("accounts", json={"name": "Contoso"}), "prvCreateAccount", "account", 1)
    qualify = {"CreateAccount": True, "CreateContact": False, "CreateOpportunity": False, "Status": 3}
    assert_missing(api.post(f"leads({LEAD_ID})/Microsoft.Dynamics.CRM.QualifyLead", json=qualify),
                   "prvCreateAccount", "account", 1)  # fmt: skip
    assert api.get(f"leads({LEAD_ID})", params={"$select": "statecode"}).json()["statecode"] == 0


def test_a_create_needs_create_and_an_update_needs_write(tenant):
    api = tenant.dataverse
    tenant.revoke("dataverse", "prvCreateLead")
    assert_missing(api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"}), "prvCreateLead", "lead", 4)
    assert_missing(api.post("leads", json=lead()), "prvCreateLead", "lead", 4)
    assert_missing(api.patch(f"leads({LEAD_ID})", json=lead()), "prvCreateLead", "lead", 4)  # an upsert that creates
    assert api.get("leads").json()["value"] == []

    tenant.as_client(ADMIN_APP)
    assert api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"}).status_code == 204
    tenant.as_client(INTEGRATION)
    assert api.patch(f"leads({LEAD_ID})", json={"subject": "updated"}).status_code == 204  # Write suffices
    tenant.revoke("dataverse", "prvWriteLead")
    assert_missing(api.patch(f"leads({LEAD_ID})", json={"subject": "again"}, headers={"If-Match": "*"}),
                   "prvWriteLead", "lead", 4)  # fmt: skip
    assert api.get(f"leads({LEAD_ID})").json()["subject"] == "updated"


@pytest.mark.parametrize(("privilege", "entity", "otc"), [("prvAppendLead", "lead", 4),
                                                          ("prvAppendTocdm_Company", "cdm_company", 10012)])  # fmt: skip
def test_a_bind_needs_append_on_the_row_and_append_to_on_the_target(tenant, privilege, entity, otc):
    tenant.revoke("dataverse", privilege)
    api = tenant.dataverse
    assert_missing(api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"}), privilege, entity, otc)
    unbound = {key: value for key, value in lead().items() if not key.endswith("@odata.bind")}
    assert api.patch(f"leads({LEAD_ID})", json=unbound, headers={"If-None-Match": "*"}).status_code == 204


def test_bulk_targets_need_what_each_target_does(tenant):
    api = tenant.dataverse
    assert api.patch(f"leads({LEAD_ID})", json=lead(), headers={"If-None-Match": "*"}).status_code == 204
    existing = {"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": LEAD_ID, "subject": "bulk"}
    new = {"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": str(uuid.uuid4()), "lastname": "New"}

    tenant.revoke("dataverse", "prvCreateLead")
    assert api.post("leads/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [existing]}).status_code == 204
    assert api.post("leads/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [existing]}).status_code == 204
    assert_missing(api.post("leads/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": [existing, new]}),
                   "prvCreateLead", "lead", 4)  # fmt: skip
    assert_missing(api.post("leads/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [new]}),
                   "prvCreateLead", "lead", 4)  # fmt: skip
    assert len(api.get("leads").json()["value"]) == 1  # all or nothing: the refused request wrote nothing

    tenant.revoke("dataverse", "prvWriteLead")
    assert_missing(api.post("leads/Microsoft.Dynamics.CRM.UpdateMultiple", json={"Targets": [existing]}),
                   "prvWriteLead", "lead", 4)  # fmt: skip


def test_reads_need_read(tenant):
    tenant.revoke("dataverse", "prvReadOpportunity", "prvReadcdm_Company")
    api = tenant.dataverse
    assert_missing(api.get("opportunities"), "prvReadOpportunity", "opportunity", 3)
    assert_missing(api.get(f"cdm_companies({company_id('usmf')})"), "prvReadcdm_Company", "cdm_company", 10012)
    assert api.get("leads").status_code == 200


def test_who_am_i_and_the_metadata_need_only_a_user(tenant):
    every = sorted(DATAVERSE_ROLES[B2B_ONBOARDING_ROLE].privileges)
    tenant.revoke("dataverse", *every)
    assert tenant.dataverse.get("WhoAmI").json()["UserId"] == INTEGRATION.app_user_id
    assert_missing(tenant.dataverse.get("leads"), "prvReadLead", "lead", 4)
    assert tenant.dataverse.get("$metadata").status_code not in (401, 403)


def test_an_app_without_an_application_user_is_not_a_member_of_the_organization(tenant):
    tenant.admin("security", {"client_id": INTEGRATION.client_id, "system": "dataverse", "application_user": False})
    for response in (tenant.dataverse.get("WhoAmI"), tenant.dataverse.get("leads"),
                     tenant.dataverse.post("leads", json=lead())):  # fmt: skip
        error = refusal(response)
        assert error == {"code": "0x80072560", "message": "The user is not a member of the organization."}
    assert tenant.commerce.get("Prospects").status_code == 200  # HQ still knows the app


def test_retrieve_user_privileges_lists_the_roles_privileges_less_what_was_revoked(tenant):
    path = f"systemusers({INTEGRATION.app_user_id})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()"
    body = tenant.dataverse.get(path).json()
    assert body["@odata.context"] == f"{DATAVERSE}{API_ROOT}/$metadata#Microsoft.Dynamics.CRM.RetrieveUserPrivilegesResponse"
    names = {privilege["PrivilegeName"] for privilege in body["RolePrivileges"]}
    assert names == DATAVERSE_ROLES[B2B_ONBOARDING_ROLE].privileges
    business_unit = tenant.dataverse.get("WhoAmI").json()["BusinessUnitId"]
    for privilege in body["RolePrivileges"]:
        assert privilege["Depth"] == "Global" and privilege["BusinessUnitId"] == business_unit
        uuid.UUID(privilege["PrivilegeId"])

    tenant.revoke("dataverse", "prvCreateLead")
    after = {privilege["PrivilegeName"] for privilege in tenant.dataverse.get(path).json()["RolePrivileges"]}
    assert after == names - {"prvCreateLead"}
    admin_path = f"systemusers({ADMIN_APP.app_user_id})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()"
    assert len(tenant.dataverse.get(admin_path).json()["RolePrivileges"]) > len(names)
    missing = tenant.dataverse.get(f"systemusers({uuid.uuid4()})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()")
    assert refusal(missing, 404)["code"] == "0x80040217"
    tenant.revoke("dataverse", "prvReadUser")
    assert_missing(tenant.dataverse.get(path), "prvReadUser", "systemuser", 8)


def test_reset_gives_back_the_users_and_privileges(tenant):
    tenant.revoke("dataverse", "prvReadLead")
    tenant.revoke("commerce", "ProspectsEntityRead")
    tenant.admin("security", {"client_id": INTEGRATION.client_id, "system": "dataverse", "application_user": False})
    tenant.admin("reset")
    assert tenant.dataverse.get("leads").status_code == 200
    assert tenant.commerce.get("Prospects").status_code == 200


# HQ ------------------------------------------------------------------------------------------------


def test_hq_refuses_an_access_level_the_roles_do_not_grant_in_fo_shape(tenant):
    api = tenant.commerce
    assert api.get("Prospects").status_code == 200
    refused = api.delete("Prospects(dataAreaId='usmf',ProspectId='P-1')")
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["message"] == "Access denied."
    assert error["innererror"]["type"] == "System.UnauthorizedAccessException"
    assert "has no Delete access to data entity Prospects (Prospect)" in error["innererror"]["message"]
    assert "ProspectsEntityDelete" in error["innererror"]["message"]

    tenant.revoke("commerce", "CustomersV3EntityCreate")
    created = api.post("CustomersV3", json={"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": "Contoso"})
    assert created.status_code == 403
    assert "has no Create access to data entity CustomersV3" in created.json()["error"]["innererror"]["message"]
    assert api.get("CustomersV3").status_code == 200


def test_hq_refuses_in_a_batch_part_as_on_its_own(tenant):
    tenant.revoke("commerce", "ProspectsEntityRead")
    batch = ("--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
             "GET Prospects HTTP/1.1\r\nAccept: application/json\r\n\r\n--b--\r\n")  # fmt: skip
    response = tenant.commerce.post("$batch", content=batch, headers={"Content-Type": "multipart/mixed; boundary=b"})
    assert response.status_code == 200
    assert "HTTP/1.1 403" in response.text and "has no Read access to data entity Prospects" in response.text


def test_hq_answers_401_to_an_app_not_in_its_entra_applications(tenant):
    tenant.admin("security", {"client_id": INTEGRATION.client_id, "system": "commerce", "application_user": False})
    response = tenant.commerce.get("Prospects")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert "not registered in Microsoft Entra applications" in response.json()["error"]["innererror"]["message"]
    assert tenant.dataverse.get("leads").status_code == 200


def test_hq_least_privilege_role_covers_the_products_entities():
    granted = HQ_ROLES[B2B_ONBOARDING_ROLE].all_privileges
    assert {"ProspectsEntityRead", "ProspectsEntityUpdate", "CustomersV3EntityCreate",
            "CustomerHiearchiesEntityCreate", "CustomerHierarchyNodesEntityCreate"} <= granted  # fmt: skip
    assert not any(name.endswith("EntityDelete") for name in granted)


# Admin ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "named"), [
    ({"client_id": "nobody", "system": "dataverse", "revoke": ["prvReadLead"]}, "client_id"),
    ({"client_id": INTEGRATION.client_id, "system": "crm", "revoke": ["prvReadLead"]}, "system"),
    ({"client_id": INTEGRATION.client_id, "system": "dataverse", "revoke": ["prvReadNothing"]}, "revoke"),
    ({"client_id": INTEGRATION.client_id, "system": "commerce", "revoke": ["prvReadLead"]}, "revoke"),
    ({"client_id": INTEGRATION.client_id, "system": "dataverse", "application_user": True}, "application_user"),
    ({"client_id": INTEGRATION.client_id, "system": "dataverse"}, "application_user"),
    ({"client_id": INTEGRATION.client_id, "system": "dataverse", "grant": []}, "grant"),
])  # fmt: skip
def test_a_bad_security_change_is_400_naming_the_field(tenant, body, named):
    response = tenant.entra.post("/_admin/security", json=body)
    assert response.status_code == 400
    assert named in response.json()["error"]


def test_a_registration_names_only_existing_roles():
    with pytest.raises(ValueError, match="dataverse_roles: dataverse has no role 'Salesperson'"):
        ClientRegistration("app", "secret", dataverse_roles=("Salesperson",))
    with pytest.raises(ValueError, match="commerce_application_user must be true or false"):
        ClientRegistration("app", "secret", commerce_application_user="no")


# Microsoft's clock ---------------------------------------------------------------------------------


def test_a_skewed_clock_moves_token_times_date_headers_and_expiry(tenant):
    cached = tenant.bearer(INTEGRATION, DATAVERSE)
    tenant.admin("clock", {"skew_s": 7200})
    issued = tenant.issuer.issue(INTEGRATION, DATAVERSE)["access_token"]
    claims = jwt.decode(issued, options={"verify_signature": False})
    assert abs(claims["iat"] - (time.time() + 7200)) < 5 and claims["nbf"] == claims["iat"]

    response = tenant.dataverse.get("WhoAmI", headers={"Authorization": "Bearer " + issued})
    assert response.status_code == 200
    served_at = parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(served_at - (time.time() + 7200)) < 5
    # A token issued an hour before Microsoft's "now" has expired for the services too.
    assert tenant.dataverse.get("WhoAmI", headers={"Authorization": cached}).status_code == 401

    tenant.admin("reset")
    assert abs(parsedate_to_datetime(tenant.commerce.get("Prospects").headers["Date"]).timestamp() - time.time()) < 5
    assert tenant.dataverse.get("WhoAmI", headers={"Authorization": cached}).status_code == 200


def test_a_bad_clock_body_is_400(tenant):
    for body in ({"skew_s": "soon"}, {"skew": 5}, {"skew_s": True}):
        response = tenant.entra.post("/_admin/clock", json=body)
        assert response.status_code == 400 and "skew_s" in response.json()["error"]


# Entra ID ------------------------------------------------------------------------------------------


def token_answer(tenant: Tenant, client: ClientRegistration, scope: str):
    form = {"grant_type": "client_credentials", "client_id": client.client_id,
            "client_secret": client.client_secret, "scope": scope}  # fmt: skip
    return tenant.entra.post(f"/{TENANT_ID}/oauth2/v2.0/token", data=form)


def test_entra_issues_tokens_only_for_the_tenants_resources(tenant):
    refused = token_answer(tenant, INTEGRATION, "https://other.crm.test/.default")
    assert refused.status_code == 400
    body = refused.json()
    assert body["error"] == "invalid_resource" and body["error_codes"] == [500011]
    assert body["error_description"].startswith(
        f"AADSTS500011: The resource principal named https://other.crm.test was not found in the tenant named {TENANT_ID}.")

    # Entra ID finds a resource whatever the case of its name and a trailing slash; the audience is as registered.
    for scope in (f"{DATAVERSE.upper()}/.default", f"{DATAVERSE}//.default", f"{COMMERCE}/.default"):
        answer = token_answer(tenant, INTEGRATION, scope)
        assert answer.status_code == 200, answer.text
        audience = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})["aud"]
        assert audience in (DATAVERSE, COMMERCE)


def test_a_dataverse_batch_part_is_checked_as_its_request_on_its_own(tenant):
    tenant.revoke("dataverse", "prvReadOpportunity")
    batch = ("--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
             f"GET {DATAVERSE}{API_ROOT}/opportunities HTTP/1.1\r\nAccept: application/json\r\n\r\n"
             "--batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
             f"GET {DATAVERSE}{API_ROOT}/leads HTTP/1.1\r\nAccept: application/json\r\n\r\n--batch_1--\r\n")  # fmt: skip
    response = tenant.dataverse.post("$batch", content=batch,
                                     headers={"Content-Type": "multipart/mixed; boundary=batch_1", "Prefer": "odata.continue-on-error"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert "HTTP/1.1 403" in response.text and "is missing prvReadOpportunity privilege" in response.text
    assert "HTTP/1.1 200" in response.text
