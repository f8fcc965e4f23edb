"""A CA bundle that does not trust the service fails with a message that says so, against the running fakes.

TLS verification is never turned off and neither MSAL nor httpx is patched: every failure here is a
real handshake refused by OpenSSL.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from b2b_onboarding.clients.auth import TokenProvider
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.errors import (
    AuthenticationError,
    ConfigurationError,
    certificate_failure_message,
    certificate_verify_failure,
)
from d365_fakes.tls import ensure_tls

REASON = "(certificate verify failed: unable to get local issuer certificate)"


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@pytest.fixture
def other_ca(tmp_path) -> str:
    """A CA bundle that is valid PEM but did not sign the fakes' certificate."""
    return str(ensure_tls(tmp_path / "other-ca").ca_bundle)


def provider(world, verify: str | bool) -> TokenProvider:
    app = world.cast.integration
    return TokenProvider(world.endpoints.authority, app["client_id"], app["client_secret"], verify)


def test_a_ca_bundle_that_did_not_sign_the_service_is_named_with_the_server_and_the_fix(world, other_ca):
    with pytest.raises(AuthenticationError) as refused:
        provider(world, other_ca)

    message = str(refused.value)
    assert message == (
        f"Entra ID ({world.endpoints.authority}, client {world.cast.integration['client_id']}): the TLS "
        f"certificate of {origin(world.endpoints.authority)} is not trusted by the CA bundle {other_ca} {REASON}. "
        'TLS verification stays on. Next step: set the connection\'s extra "ca_bundle" to a CA bundle (PEM file) '
        "holding the CA that signed the service's certificate (for the fakes: <state_dir>/ca.pem), or remove it "
        "to use the system trust store."
    )
    assert world.cast.integration["client_secret"] not in message
    assert not refused.value.transient  # a wrong bundle stays wrong: never worth a retry


def test_without_a_bundle_the_system_trust_store_is_named(world):
    with pytest.raises(AuthenticationError) as refused:
        provider(world, True)

    message = str(refused.value)
    assert f"the TLS certificate of {origin(world.endpoints.authority)} is not trusted by the system trust store" in message
    assert REASON in message and "TLS verification stays on" in message
    assert 'set the connection\'s extra "ca_bundle"' in message and "add that CA to the system trust store" in message


def test_a_client_built_from_a_connection_with_the_wrong_bundle_fails_the_same_way(world, other_ca):
    settings = world.settings(world.endpoints.commerce, ca_bundle=other_ca)
    with pytest.raises(AuthenticationError, match=f"is not trusted by the CA bundle {other_ca} "):
        CommerceClient.connect(settings)


def test_the_right_bundle_is_trusted_with_verification_on(world):
    token = provider(world, world.endpoints.ca_bundle).token(f"{world.endpoints.commerce}/.default")
    assert token.count(".") == 2


def test_an_api_request_refused_by_tls_gets_the_same_wording(world, other_ca):
    """What odata.py words for a request to Commerce or Dataverse that TLS refused."""
    url = f"{world.endpoints.commerce}/data/Prospects"
    with httpx.Client(verify=other_ca) as client, pytest.raises(httpx.ConnectError) as caught:
        client.get(url)

    reason = certificate_verify_failure(caught.value)
    assert reason == REASON.strip("()")
    message = certificate_failure_message("Commerce", url, reason, other_ca)
    assert message.startswith(
        f"Commerce: the TLS certificate of {origin(url)} is not trusted by the CA bundle {other_ca} {REASON}. "
        "TLS verification stays on. Next step: "
    )


def test_a_failure_that_is_not_tls_is_not_called_one(tmp_path):
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{unused.getsockname()[1]}/data"
    with httpx.Client() as client, pytest.raises(httpx.ConnectError) as caught:
        client.get(url)

    assert certificate_verify_failure(caught.value) is None


def test_a_missing_bundle_file_is_a_configuration_error_naming_the_field_and_the_path(world, tmp_path):
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(ConfigurationError) as caught:
        world.settings(world.endpoints.commerce, ca_bundle=str(missing))

    message = str(caught.value)
    assert "extra.ca_bundle" in message and str(missing) in message and "does not exist" in message
    assert world.cast.integration["client_secret"] not in message


def test_a_bundle_file_that_is_not_pem_is_a_configuration_error(world, tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"extra\.ca_bundle: .*holds no readable PEM certificate"):
        world.settings(world.endpoints.commerce, ca_bundle=str(not_pem))
