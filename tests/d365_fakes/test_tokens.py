"""Issuing and verifying the fake tenant's access tokens."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
import pytest

from d365_fakes.clients import ClientRegistration
from d365_fakes.tls import load_or_create_rsa_key
from d365_fakes.tokens import InvalidToken, TokenIssuer

ENTRA = "https://127.0.0.1:8441"
TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
COMMERCE = "https://127.0.0.1:8442"
DATAVERSE = "https://127.0.0.1:8443"
CLIENT = ClientRegistration(client_id="pipeline-app", client_secret="s3cret")


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer(ENTRA, TENANT_ID)


def bearer(issuer: TokenIssuer, resource: str = COMMERCE) -> str:
    return f"Bearer {issuer.issue(CLIENT, resource)['access_token']}"


def reason(issuer: TokenIssuer, header: str | None, audience: str = COMMERCE) -> str:
    with pytest.raises(InvalidToken) as raised:
        issuer.verify(header, audience)
    return raised.value.reason


def test_token_response_has_entra_shape(issuer: TokenIssuer) -> None:
    body = issuer.issue(CLIENT, f"{COMMERCE}/")

    assert {k: v for k, v in body.items() if k != "access_token"} == {
        "token_type": "Bearer",
        "expires_in": 3599,
        "ext_expires_in": 3599,
    }
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == issuer.jwks()["keys"][0]["kid"]
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == COMMERCE  # no trailing slash
    assert claims["iss"] == f"{ENTRA}/{TENANT_ID}/v2.0"
    assert claims["appid"] == claims["azp"] == "pipeline-app"
    assert claims["oid"] == claims["sub"] == CLIENT.app_user_id
    assert claims["nbf"] == claims["iat"]


def test_verify_returns_the_callers_claims(issuer: TokenIssuer) -> None:
    claims = issuer.verify(bearer(issuer), COMMERCE)

    assert claims.client_id == "pipeline-app"
    assert claims.app_user_id == CLIENT.app_user_id
    assert claims.tenant_id == TENANT_ID
    assert claims.audience == COMMERCE
    remaining = claims.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=59) < remaining <= timedelta(seconds=3599)


def test_token_for_another_resource_is_rejected(issuer: TokenIssuer) -> None:
    assert "audience" in reason(issuer, bearer(issuer, DATAVERSE), COMMERCE)


def test_expired_token_is_rejected() -> None:
    short_lived = TokenIssuer(ENTRA, TENANT_ID, lifetime_s=-1)

    assert "expired" in reason(short_lived, bearer(short_lived))


def test_token_from_another_key_is_rejected(issuer: TokenIssuer) -> None:
    impostor = TokenIssuer(ENTRA, TENANT_ID)

    assert "key" in reason(issuer, bearer(impostor))


def test_tampered_token_is_rejected(issuer: TokenIssuer) -> None:
    header, payload, signature = bearer(issuer).removeprefix("Bearer ").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["oid"] = "00000000-0000-0000-0000-000000000000"  # pose as another application user
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()

    assert "signature" in reason(issuer, f"Bearer {header}.{forged}.{signature}")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-jwt"])
def test_missing_or_malformed_header_is_rejected(issuer: TokenIssuer, header: str | None) -> None:
    assert reason(issuer, header)


def test_a_kept_signing_key_keeps_tokens_valid_across_restarts(tmp_path: Path) -> None:
    before = TokenIssuer(ENTRA, TENANT_ID, signing_key=load_or_create_rsa_key(tmp_path / "k.pem"))
    after = TokenIssuer(ENTRA, TENANT_ID, signing_key=load_or_create_rsa_key(tmp_path / "k.pem"))

    assert after.jwks() == before.jwks()
    assert after.verify(bearer(before), COMMERCE).client_id == "pipeline-app"


def test_tokens_issued_are_counted_until_reset() -> None:
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    issuer.issue(CLIENT, COMMERCE)
    issuer.issue(CLIENT, DATAVERSE)

    assert issuer.tokens_issued == 2
    issuer.reset_counts()
    assert issuer.tokens_issued == 0

