"""Microsoft's own clients against the fake Entra ID over real HTTPS: azure-identity's
ClientSecretCredential and MSAL's ConfidentialClientApplication get tokens for the tenant's
resources, and carry Entra ID's AADSTS700016 (unknown client) and AADSTS500011 (unknown resource)
answers in their errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jwt
import msal
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential

from d365_fakes import entra
from d365_fakes.clients import load_clients
from d365_fakes.tls import TlsFiles, ensure_tls
from d365_fakes.tokens import TokenIssuer

TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
CLIENT_ID = "0b7e6c1e-9a55-4a53-8f5e-3d2f1a4c8b90"
CLIENT_SECRET = "test-only-secret~value"
UNKNOWN_CLIENT_ID = "11111111-2222-3333-4444-555555555555"
DATAVERSE = "https://contoso.crm.example"
COMMERCE = "https://contoso.operations.example"
NOT_IN_TENANT = "https://fabrikam.crm.example"


@dataclass(frozen=True)
class Tenant:
    url: str
    tls: TlsFiles

    @property
    def authority(self) -> str:
        return f"{self.url}/{TENANT_ID}"


@pytest.fixture
def tenant(tmp_path, serve_https, msal_honours_verify) -> Iterator[Tenant]:
    tls = ensure_tls(tmp_path / "state")
    clients = load_clients([{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}])
    url = serve_https(
        lambda url: entra.create_app(TokenIssuer(url, TENANT_ID), clients, resources=(DATAVERSE, COMMERCE)), tls
    )
    yield Tenant(url, tls)


def credential(tenant: Tenant, client_id: str = CLIENT_ID) -> ClientSecretCredential:
    return ClientSecretCredential(
        TENANT_ID, client_id, CLIENT_SECRET, authority=tenant.url,
        disable_instance_discovery=True, connection_verify=str(tenant.tls.ca_bundle),
    )  # fmt: skip


def msal_app(tenant: Tenant, client_id: str = CLIENT_ID) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id, client_credential=CLIENT_SECRET, authority=tenant.authority, instance_discovery=False,
        verify=str(tenant.tls.ca_bundle),
    )  # fmt: skip


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize("resource", [DATAVERSE, COMMERCE])
def test_azure_identity_gets_a_token_for_each_resource(tenant, resource):
    with credential(tenant) as azure:
        token = azure.get_token(f"{resource}/.default")
    assert token.expires_on > 0
    issued = claims(token.token)
    assert issued["aud"] == resource and issued["azp"] == CLIENT_ID and issued["tid"] == TENANT_ID


def test_msal_gets_a_token_and_caches_it(tenant):
    app = msal_app(tenant)
    first = app.acquire_token_for_client(scopes=[f"{DATAVERSE}/.default"])
    assert claims(first["access_token"])["aud"] == DATAVERSE
    again = app.acquire_token_for_client(scopes=[f"{DATAVERSE}/.default"])
    assert again["access_token"] == first["access_token"] and again["token_source"] == "cache"


def test_azure_identity_carries_aadsts700016_for_an_unknown_client(tenant):
    with credential(tenant, UNKNOWN_CLIENT_ID) as azure, pytest.raises(ClientAuthenticationError) as refused:
        azure.get_token(f"{DATAVERSE}/.default")
    assert "AADSTS700016" in str(refused.value)
    assert f"Application with identifier '{UNKNOWN_CLIENT_ID}' was not found in the directory" in str(refused.value)


def test_msal_carries_aadsts700016_for_an_unknown_client(tenant):
    result = msal_app(tenant, UNKNOWN_CLIENT_ID).acquire_token_for_client(scopes=[f"{DATAVERSE}/.default"])
    assert result["error"] == "unauthorized_client" and result["error_codes"] == [700016]
    assert "access_token" not in result


def test_azure_identity_carries_aadsts500011_for_a_resource_not_in_the_tenant(tenant):
    with credential(tenant) as azure, pytest.raises(ClientAuthenticationError) as refused:
        azure.get_token(f"{NOT_IN_TENANT}/.default")
    assert "AADSTS500011" in str(refused.value)
    assert f"The resource principal named {NOT_IN_TENANT} was not found in the tenant named" in str(refused.value)


def test_msal_carries_aadsts500011_for_a_resource_not_in_the_tenant(tenant):
    result = msal_app(tenant).acquire_token_for_client(scopes=[f"{NOT_IN_TENANT}/.default"])
    assert result["error"] == "invalid_resource" and result["error_codes"] == [500011]
    assert result["error_description"].startswith(f"AADSTS500011: The resource principal named {NOT_IN_TENANT} ")
