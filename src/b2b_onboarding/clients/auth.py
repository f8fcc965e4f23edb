"""Client-credentials tokens from Microsoft Entra ID through MSAL, one app per authority and client."""

from __future__ import annotations

import hashlib
import threading
from urllib.parse import urlsplit

import httpx
import msal
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS
from msal.exceptions import MsalServiceError

from b2b_onboarding import redaction
from b2b_onboarding.errors import AuthenticationError, certificate_failure_message, certificate_verify_failure

# OAuth errors of an Entra ID that is unavailable or throttling, not refusing the credentials.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_UNKNOWN_CLIENT = 700016  # AADSTS700016: no app registration with this client id in the tenant
_UNKNOWN_RESOURCE = 500011  # AADSTS500011: no resource (service principal) of that name in the tenant


class TokenProvider:
    """Acquires application tokens; MSAL's own cache answers until a token has < 5 minutes left."""

    def __init__(self, authority: str, client_id: str, client_secret: str, verify: str | bool = True) -> None:
        self.authority = authority
        self.client_id = client_id
        self._ca_bundle = verify if isinstance(verify, str) else None
        redaction.register_secret(client_secret)  # before MSAL, httpx or an error message can see it
        # MSAL's default requests session lets REQUESTS_CA_BUNDLE override `verify=` (psf/requests#3829),
        # so MSAL gets an httpx client: the same TLS trust as the API calls, whatever the environment.
        self._answers = threading.local()  # the HTTP status of this thread's last answer from Entra ID
        self._http = httpx.Client(verify=verify, timeout=30, event_hooks={"response": [self._remember_status]})
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
            if reason := certificate_verify_failure(error):
                raise self._tls_error(reason) from error
            raise AuthenticationError(
                f"Entra ID: cannot read the authority {authority} for client {client_id}: {error}. "
                "Next step: check the authority (tenant) URL and the network path to it."
            ) from error
        self.last_token_source: str | None = None

    def token(self, scope: str) -> str:
        try:
            result = self._app.acquire_token_for_client(scopes=[scope])
        except (httpx.HTTPError, MsalServiceError) as error:  # MSAL raises the latter for a 5xx answer
            if reason := certificate_verify_failure(error):
                raise self._tls_error(reason) from error  # permanent: not transient
            raise AuthenticationError(
                f"Entra ID ({self.authority}) could not be reached for client {self.client_id}: {error}. "
                "Next step: check the network and the CA bundle, then rerun.",
                transient=True,
            ) from error
        if "access_token" not in result:
            status = getattr(self._answers, "status", None)
            answer = f"HTTP {status} {result.get('error')}" if status else str(result.get("error"))
            raise AuthenticationError(
                f"Entra ID ({self.authority}) refused a token to client {self.client_id} for {scope} with {answer}. "
                f"Next step: {self._next_step(result.get('error_codes') or [], scope)}. "
                f"Entra ID said: {result.get('error_description')}",
                transient=result.get("error") in _TRANSIENT_ERRORS,
            )
        self.last_token_source = result.get("token_source")
        redaction.register_secret(result["access_token"])  # a set lookup once known (cache hits)
        return result["access_token"]

    def _next_step(self, error_codes: list[int], scope: str) -> str:
        """What to fix, by Entra ID's AADSTS code where it names the culprit (Microsoft Entra
        authentication and authorization error codes)."""
        tenant = urlsplit(self.authority).path.strip("/").split("/")[0] or self.authority
        if _UNKNOWN_CLIENT in error_codes:
            return (f"the client id (login) {self.client_id} of this connection is not an app registration in tenant "
                    f"{tenant}: fix the connection's login, or its tenant (extra tenant_id or authority) if the app "
                    "lives in another tenant, then clear the task")  # fmt: skip
        if _UNKNOWN_RESOURCE in error_codes:
            resource = scope.removesuffix("/.default")
            return (f"the Environment URL (host) {resource} of this connection is not a resource of tenant {tenant}: "
                    "set the connection's host to the environment's URL as the Power Platform admin center (Dataverse) "
                    "or LCS (HQ) shows it, or fix the tenant, then clear the task")  # fmt: skip
        return ("check the connection's client id (login), secret (password) and tenant (extra tenant_id or "
                "authority), then clear the task")  # fmt: skip

    def _remember_status(self, response: httpx.Response) -> None:
        self._answers.status = response.status_code

    def _tls_error(self, reason: str) -> AuthenticationError:
        return AuthenticationError(certificate_failure_message(
            f"Entra ID ({self.authority}, client {self.client_id})", self.authority, reason, self._ca_bundle))  # fmt: skip

    def forget(self) -> None:
        """Drops the cached tokens, so the next `token` call asks Entra ID (after a revocation)."""
        self._app.remove_tokens_for_client()


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
