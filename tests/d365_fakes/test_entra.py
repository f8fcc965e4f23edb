"""The fake Entra ID over real HTTPS, driven by real MSAL and httpx (fixture: conftest.py)."""

from __future__ import annotations

import uuid

import httpx
import jwt
import msal
import pytest

RESOURCE = "https://127.0.0.1:8442"
SCOPE = f"{RESOURCE}/.default"
UNKNOWN_ID = "11111111-2222-3333-4444-555555555555"


def msal_app(entra, client_id=None, secret=None, authority=None):
    return msal.ConfidentialClientApplication(
        client_id or entra.client.client_id,
        client_credential=secret or entra.client.client_secret,
        authority=authority or entra.authority,
        instance_discovery=False,
        verify=str(entra.tls.ca_bundle),
    )


def token_request(entra, **form):
    """POST the token endpoint; keyword arguments override (or, as None, remove) form fields."""
    fields = {
        "grant_type": "client_credentials",
        "client_id": entra.client.client_id,
        "client_secret": entra.client.client_secret,
        "scope": SCOPE,
        **form,
    }
    return httpx.post(
        f"{entra.authority}/oauth2/v2.0/token",
        data={name: value for name, value in fields.items() if value is not None},
        verify=entra.ssl_context(),
    )


def assert_entra_error(response, status, error, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert uuid.UUID(body["trace_id"]) and uuid.UUID(body["correlation_id"])
    assert body["timestamp"].endswith("Z")
    assert body["error_uri"].endswith(f"/error?code={code}")
    return body


def test_msal_gets_a_token_then_serves_it_from_its_cache(entra_server):
    app = msal_app(entra_server)

    first = app.acquire_token_for_client(scopes=[SCOPE])
    second = app.acquire_token_for_client(scopes=[SCOPE])

    assert first.get("token_source") == "identity_provider", first
    assert first["token_type"] == "Bearer"
    assert first["expires_in"] == 3599
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert entra_server.issuer.tokens_issued == 1


def test_token_is_signed_by_the_published_key_for_the_requested_resource(entra_server):
    access_token = msal_app(entra_server).acquire_token_for_client(scopes=[SCOPE])["access_token"]
    config = httpx.get(
        f"{entra_server.authority}/v2.0/.well-known/openid-configuration",
        verify=entra_server.ssl_context(),
    ).json()
    jwks = httpx.get(config["jwks_uri"], verify=entra_server.ssl_context()).json()
    kid = jwt.get_unverified_header(access_token)["kid"]
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))

    claims = jwt.decode(
        access_token, key, algorithms=["RS256"], audience=RESOURCE, issuer=config["issuer"]
    )

    client = entra_server.client
    assert config["issuer"] == f"{entra_server.authority}/v2.0"
    assert config["token_endpoint"] == f"{entra_server.authority}/oauth2/v2.0/token"
    assert claims["aud"] == RESOURCE
    assert claims["tid"] == entra_server.tenant_id
    assert claims["appid"] == claims["azp"] == client.client_id
    assert claims["oid"] == claims["sub"] == client.app_user_id
    assert claims["ver"] == "2.0"
    assert claims["exp"] - claims["iat"] == 3599


def test_issued_token_verifies_for_its_resource(entra_server):
    access_token = token_request(entra_server).json()["access_token"]

    claims = entra_server.issuer.verify(f"Bearer {access_token}", RESOURCE)

    client = entra_server.client
    assert claims.client_id == client.client_id
    assert claims.app_user_id == client.app_user_id
    assert claims.tenant_id == entra_server.tenant_id
    assert claims.audience == RESOURCE


def test_unknown_client_is_answered_as_entra_does(entra_server):
    response = token_request(entra_server, client_id=UNKNOWN_ID)

    body = assert_entra_error(response, 400, "unauthorized_client", 700016)
    assert (
        f"Application with identifier '{UNKNOWN_ID}' was not found in the directory "
        f"'{entra_server.tenant_id}'" in body["error_description"]
    )
    result = msal_app(entra_server, client_id=UNKNOWN_ID).acquire_token_for_client(scopes=[SCOPE])
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]
    assert "access_token" not in result


def test_wrong_secret_is_401_invalid_client(entra_server):
    response = token_request(entra_server, client_secret="not-the-secret")

    body = assert_entra_error(response, 401, "invalid_client", 7000215)
    assert "Invalid client secret provided." in body["error_description"]
    result = msal_app(entra_server, secret="not-the-secret").acquire_token_for_client(
        scopes=[SCOPE]
    )
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert entra_server.issuer.tokens_issued == 0


def test_missing_secret_is_401_invalid_client(entra_server):
    assert_entra_error(
        token_request(entra_server, client_secret=None), 401, "invalid_client", 7000218
    )


def test_client_secret_may_come_as_http_basic_auth(entra_server):
    response = httpx.post(
        f"{entra_server.authority}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "scope": SCOPE},
        auth=(entra_server.client.client_id, entra_server.client.client_secret),
        verify=entra_server.ssl_context(),
    )

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert entra_server.issuer.verify(f"Bearer {response.json()['access_token']}", RESOURCE)


def test_unknown_tenant_is_rejected_by_discovery_and_msal(entra_server):
    other_tenant = "99999999-8888-7777-6666-555555555555"

    response = httpx.get(
        f"{entra_server.url}/{other_tenant}/v2.0/.well-known/openid-configuration",
        verify=entra_server.ssl_context(),
    )

    body = assert_entra_error(response, 400, "invalid_tenant", 90002)
    assert f"Tenant '{other_tenant}' not found." in body["error_description"]
    with pytest.raises(ValueError):
        msal_app(entra_server, authority=f"{entra_server.url}/{other_tenant}")


@pytest.mark.parametrize(
    ("scope", "code"),
    [
        (RESOURCE, 1002012),  # no /.default suffix
        (f"{RESOURCE}/user_impersonation", 1002012),
        (f"{SCOPE} https://127.0.0.1:8443/.default", 70011),  # two resources at once
    ],
)
def test_scope_must_be_one_resource_default_scope(entra_server, scope, code):
    assert_entra_error(token_request(entra_server, scope=scope), 400, "invalid_scope", code)


def test_only_the_client_credentials_grant_is_supported(entra_server):
    assert_entra_error(
        token_request(entra_server, grant_type="password"), 400, "unsupported_grant_type", 70003
    )


def test_missing_parameter_is_named(entra_server):
    response = token_request(entra_server, scope=None)

    body = assert_entra_error(response, 400, "invalid_request", 900144)
    assert "'scope'" in body["error_description"]


def test_correlation_id_echoes_the_client_request_id(entra_server):
    request_id = str(uuid.uuid4())

    response = httpx.post(
        f"{entra_server.authority}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": UNKNOWN_ID, "scope": SCOPE},
        headers={"client-request-id": request_id},
        verify=entra_server.ssl_context(),
    )

    assert response.json()["correlation_id"] == request_id
