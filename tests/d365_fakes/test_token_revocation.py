"""Token revocation: TokenIssuer.revoke, the APIs' 401 for a revoked token, and
`POST /_admin/tokens/revoke` (in process; over HTTPS in test_faults_over_https.py)."""

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from d365_fakes import tokens
from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CommerceState
from d365_fakes.dataverse import DataverseState
from d365_fakes.faults import FaultPlan
from d365_fakes.limits import Limits, ServiceProtection
from d365_fakes.server import create_apps
from d365_fakes.tokens import InvalidToken, TokenIssuer

TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
ENTRA, COMMERCE, DATAVERSE = "https://login.test", "https://commerce.test", "https://org.crm.test"
SYNC = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
REPORTS = ClientRegistration("reports", "reports-secret", default_company="usrt")


def bearer(issuer: TokenIssuer, client: ClientRegistration, resource: str = DATAVERSE) -> str:
    return "Bearer " + issuer.issue(client, resource)["access_token"]


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token is issued in the same second (`iat` has whole seconds)."""
    now = int(tokens.time.time())
    monkeypatch.setattr(tokens, "time", SimpleNamespace(time=lambda: now))


def test_a_token_issued_before_a_revocation_is_refused_and_one_issued_after_works(frozen_clock):
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    old = bearer(issuer, SYNC)

    issuer.revoke()
    new = bearer(issuer, SYNC)  # the same second as the revocation

    with pytest.raises(InvalidToken, match="^The token has been revoked$"):
        issuer.verify(old, DATAVERSE)
    assert issuer.verify(new, DATAVERSE).client_id == SYNC.client_id


def test_revoking_one_client_leaves_the_others_tokens_alone():
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    sync, reports = bearer(issuer, SYNC), bearer(issuer, REPORTS)

    issuer.revoke(SYNC.client_id)

    with pytest.raises(InvalidToken, match="revoked"):
        issuer.verify(sync, DATAVERSE)
    assert issuer.verify(reports, DATAVERSE).client_id == REPORTS.client_id


def test_tokens_issued_before_a_restart_are_revoked_too():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # kept across restarts, as server.py does
    before_restart = TokenIssuer(ENTRA, TENANT_ID, signing_key=key)
    restarted = TokenIssuer(ENTRA, TENANT_ID, signing_key=key)
    cached_sync, cached_reports = bearer(before_restart, SYNC), bearer(before_restart, REPORTS)
    assert restarted.verify(cached_sync, DATAVERSE).client_id == SYNC.client_id

    restarted.revoke(SYNC.client_id)

    with pytest.raises(InvalidToken, match="revoked"):
        restarted.verify(cached_sync, DATAVERSE)
    assert restarted.verify(cached_reports, DATAVERSE).client_id == REPORTS.client_id


def test_clear_revocations_accepts_the_tokens_again():
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    old = bearer(issuer, SYNC)
    issuer.revoke()

    issuer.clear_revocations()

    assert issuer.verify(old, DATAVERSE).client_id == SYNC.client_id


# --- the APIs and the admin route (in process) ---------------------------------------------------


@pytest.fixture
def apps():
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    entra_app, commerce_app, dataverse_app = create_apps(
        issuer, {SYNC.client_id: SYNC, REPORTS.client_id: REPORTS}, COMMERCE, DATAVERSE, CommerceState(),
        DataverseState(), FaultPlan(), ServiceProtection(Limits(enabled=False)),
    )  # fmt: skip
    return SimpleNamespace(
        issuer=issuer,
        admin=TestClient(entra_app, ENTRA),
        commerce=TestClient(commerce_app, COMMERCE),
        dataverse=TestClient(dataverse_app, DATAVERSE),
    )


def test_the_apis_answer_a_revoked_token_401_in_their_own_shape(apps):
    dataverse_token, commerce_token = bearer(apps.issuer, SYNC), bearer(apps.issuer, SYNC, COMMERCE)

    assert apps.admin.post("/_admin/tokens/revoke").status_code == 204

    dataverse = apps.dataverse.get("/api/data/v9.2/WhoAmI", headers={"Authorization": dataverse_token})
    commerce = apps.commerce.get("/data/Prospects", headers={"Authorization": commerce_token})
    assert dataverse.status_code == 401 and "WWW-Authenticate" in dataverse.headers
    assert dataverse.json()["error"] == {"code": "0x80072243", "message": "Unauthorized: The token has been revoked."}
    assert commerce.status_code == 401 and "WWW-Authenticate" in commerce.headers
    assert commerce.json()["error"]["innererror"]["message"] == "The token has been revoked"
    again = apps.dataverse.get("/api/data/v9.2/WhoAmI", headers={"Authorization": bearer(apps.issuer, SYNC)})
    assert again.status_code == 200


def test_the_admin_route_revokes_one_clients_tokens(apps):
    sync, reports = bearer(apps.issuer, SYNC), bearer(apps.issuer, REPORTS)

    assert apps.admin.post("/_admin/tokens/revoke", json={"client_id": SYNC.client_id}).status_code == 204

    who_am_i = "/api/data/v9.2/WhoAmI"
    assert apps.dataverse.get(who_am_i, headers={"Authorization": sync}).status_code == 401
    assert apps.dataverse.get(who_am_i, headers={"Authorization": reports}).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"client_id": ""}, "client_id must be"),
        ({"client_id": 5}, "client_id must be"),
        ({"client": "b2b-sync"}, "unknown field(s): client"),
        (["b2b-sync"], "JSON object"),
    ],
)
def test_a_bad_revocation_is_400_naming_the_field(apps, body, message):
    response = apps.admin.post("/_admin/tokens/revoke", json=body)

    assert response.status_code == 400 and message in response.json()["error"]


def test_reset_forgets_the_revocations(apps):
    old = bearer(apps.issuer, SYNC)
    apps.admin.post("/_admin/tokens/revoke", json={})

    assert apps.admin.post("/_admin/reset").status_code == 204

    assert apps.dataverse.get("/api/data/v9.2/WhoAmI", headers={"Authorization": old}).status_code == 200


def test_a_token_already_accepted_is_checked_again_on_every_use():
    """`verify` remembers the tokens whose signature passed; their revocation, expiry and audience
    still count from the next use on."""
    issuer = TokenIssuer(ENTRA, TENANT_ID)
    token = bearer(issuer, SYNC)
    assert issuer.verify(token, DATAVERSE).client_id == SYNC.client_id

    with pytest.raises(InvalidToken, match="audience"):
        issuer.verify(token, COMMERCE)
    issuer.clock.set_skew(issuer.lifetime_s + 1)
    with pytest.raises(InvalidToken, match="expired"):
        issuer.verify(token, DATAVERSE)
    issuer.clock.reset()
    assert issuer.verify(token, DATAVERSE).client_id == SYNC.client_id
    issuer.revoke(SYNC.client_id)
    with pytest.raises(InvalidToken, match="^The token has been revoked$"):
        issuer.verify(token, DATAVERSE)
