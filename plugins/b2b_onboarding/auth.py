"""Client-credentials tokens from Microsoft Entra ID through MSAL, one app per authority and client."""

from __future__ import annotations

import hashlib
import threading
from urllib.parse import urlsplit

import httpx
import msal
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS

from .errors import AuthenticationError


class TokenProvider:
    """Acquires application tokens; MSAL's own cache answers until a token has < 5 minutes left."""

    def __init__(self, authority: str, client_id: str, client_secret: str, verify: str | bool = True) -> None:
        self.authority = authority
        self.client_id = client_id
        # MSAL's default requests session lets REQUESTS_CA_BUNDLE override `verify=` (psf/requests#3829),
        # so MSAL gets an httpx client: the same TLS trust as the API calls, whatever the environment.
        self._http = httpx.Client(verify=verify, timeout=30)
        try:  # MSAL reads the authority's OIDC discovery document here, over the network
            self._app = msal.ConfidentialClientApplication(
                client_id,
                client_credential=client_secret,
                authority=authority,
                # Instance discovery asks Microsoft's cloud about the host: only meaningful for its hosts.
                instance_discovery=urlsplit(authority).hostname in WELL_KNOWN_AUTHORITY_HOSTS,
                http_client=self._http,
            )
        except (ValueError, httpx.HTTPError) as error:
            raise AuthenticationError(
                f"Entra ID: cannot read the authority {authority} for client {client_id}: {error}. "
                "Next step: check the authority (tenant) URL, the network, and the CA bundle "
                "(a TLS certificate error means the bundle does not trust the server)."
            ) from error
        self.last_token_source: str | None = None

    def token(self, scope: str) -> str:
        try:
            result = self._app.acquire_token_for_client(scopes=[scope])
        except httpx.HTTPError as error:
            raise AuthenticationError(
                f"Entra ID ({self.authority}) could not be reached for client {self.client_id}: {error}. "
                "Next step: check the network and the CA bundle, then rerun."
            ) from error
        if "access_token" not in result:
            raise AuthenticationError(
                f"Entra ID ({self.authority}) refused a token to client {self.client_id} for {scope}: "
                f"{result.get('error')}: {result.get('error_description')}. Next step: check the "
                "connection's client id, secret and authority (tenant)."
            )
        self.last_token_source = result.get("token_source")
        return result["access_token"]


_providers: dict[tuple[str, str], tuple[str, TokenProvider]] = {}
_providers_lock = threading.Lock()


def token_provider(authority: str, client_id: str, client_secret: str, verify: str | bool = True) -> TokenProvider:
    """The process-wide provider for this authority and client, so its token cache is shared."""
    fingerprint = hashlib.sha256(f"{client_secret}\0{verify}".encode()).hexdigest()
    with _providers_lock:
        known = _providers.get((authority, client_id))
        if known is None or known[0] != fingerprint:  # a rotated secret gets a fresh app
            known = (fingerprint, TokenProvider(authority, client_id, client_secret, verify))
            _providers[(authority, client_id)] = known
        return known[1]
