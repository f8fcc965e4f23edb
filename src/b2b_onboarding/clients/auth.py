"""Client-credentials tokens from Microsoft Entra ID through MSAL, one app per authority and client.

Given a `TokenCachePersistence`, an app's token cache is also shared with every process using the same
persistence (tasks and triggers on all machines): one token per client, not one per task."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Protocol
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
# MSAL takes a cached token for expired when it has less than this left (its acquire_token_for_client).
_EXPIRY_MARGIN_S = 5 * 60

log = logging.getLogger(__name__)


class TokenCachePersistence(Protocol):
    """Where serialized MSAL token caches are kept between processes, by name. The serialized cache
    holds access tokens: a persistence must protect it (encrypt it) and never log it."""

    def load(self, name: str) -> str | None:
        """The cache saved under `name`, None when there is none; ValueError when it cannot be read
        (e.g. encrypted with another key)."""

    def save(self, name: str, serialized: str) -> None:
        """Keeps `serialized` under `name`, replacing what was there."""


class TokenProvider:
    """Acquires application tokens; MSAL's own cache answers until a token has < 5 minutes left.

    With a persistence, a scope without a good token in this process's cache first loads the persisted
    cache (when it changed since this provider last saw it), and a cache that changed (a new token, a
    token forgotten) is saved back: another process finds the token there instead of asking Entra ID."""

    def __init__(
        self, authority: str, client_id: str, client_secret: str, verify: str | bool = True,
        persistence: TokenCachePersistence | None = None,
    ) -> None:  # fmt: skip
        self.authority = authority
        self.client_id = client_id
        self.cache_name = cache_name(authority, client_id, client_secret)
        self._persistence = persistence
        self._persisted: str | None = None  # the persisted cache as this provider last loaded or saved it
        self._fresh_until: dict[str, float] = {}  # per scope: until when this process's cache holds a good token
        self._sync_lock = threading.Lock()  # one thread of the process syncs with the persistence at a time
        self._cache = msal.SerializableTokenCache()
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
                token_cache=self._cache,
            )
        except (ValueError, httpx.HTTPError) as error:
            if reason := certificate_verify_failure(error):
                raise self._tls_error(reason) from error
            raise AuthenticationError(
                f"Entra ID: cannot read the authority {authority} for client {client_id}: {error}. "
                "Next step: check the authority (tenant) URL and the network path to it."
            ) from error
        self.last_token_source: str | None = None

    def persist_in(self, persistence: TokenCachePersistence) -> None:
        """Shares this provider's token cache through `persistence` from now on."""
        with self._sync_lock:
            if persistence is not self._persistence:
                self._persistence, self._persisted = persistence, None
                self._fresh_until.clear()

    def token(self, scope: str) -> str:
        if self._persistence is None or time.time() < self._fresh_until.get(scope, 0.0):
            return self._answer(scope, self._acquire(scope))  # MSAL's cache in this process answers
        with self._sync_lock:  # the persisted cache may hold a token another process got
            self._load()
            result = self._acquire(scope)
            self._save()
        return self._answer(scope, result)

    def _acquire(self, scope: str) -> dict:
        try:
            return self._app.acquire_token_for_client(scopes=[scope])
        except (httpx.HTTPError, MsalServiceError) as error:  # MSAL raises the latter for a 5xx answer
            if reason := certificate_verify_failure(error):
                raise self._tls_error(reason) from error  # permanent: not transient
            raise AuthenticationError(
                f"Entra ID ({self.authority}) could not be reached for client {self.client_id}: {error}. "
                "Next step: check the network and the CA bundle, then rerun.",
                transient=True,
            ) from error

    def _answer(self, scope: str, result: dict) -> str:
        """The access token of MSAL's `result`, or the AuthenticationError of Entra ID's refusal."""
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
        self._fresh_until[scope] = time.time() + int(result.get("expires_in", 0)) - _EXPIRY_MARGIN_S
        return result["access_token"]

    def _load(self) -> None:
        """Takes the persisted cache when it changed since this provider last saw it. One that cannot
        be read is ignored, with one warning: the next token is saved over it."""
        try:
            serialized = self._persistence.load(self.cache_name)
            if serialized is None or serialized == self._persisted:
                return
            self._persisted = serialized  # a cache that cannot be read is warned of once, not at each sync
            state = json.loads(serialized)
            if not isinstance(state, dict) or not all(isinstance(entries, dict) for entries in state.values()):
                raise ValueError("not an MSAL token cache")
        except ValueError as error:
            log.warning("Entra ID: the shared token cache of client %s (%s) cannot be read (%s): ignored; this "
                        "process's tokens replace it", self.client_id, self.authority, error)  # fmt: skip
            self._cache.has_state_changed = True  # saved over at the next sync, even without a new token
            return
        self._cache.deserialize(serialized)

    def _save(self) -> None:
        if self._cache.has_state_changed:
            serialized = self._cache.serialize()
            self._persistence.save(self.cache_name, serialized)
            self._persisted = serialized

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
        """Drops the cached tokens, so the next `token` call asks Entra ID (after a revocation); the
        persisted ones too, so that no other process takes them up."""
        with self._sync_lock:
            self._fresh_until.clear()
            if self._persistence is None:
                self._app.remove_tokens_for_client()
                return
            self._load()  # what other processes saved since: its tokens are dropped as well
            self._app.remove_tokens_for_client()
            self._save()


def cache_name(authority: str, client_id: str, client_secret: str) -> str:
    """The name a client's persisted token cache goes by. Tokens belong to the app registration, but a
    token another secret got must not answer for this one: a secret rotated or pasted wrong fails at
    once (401 invalid_client), not when the token expires. So the name holds a short digest of the
    secret (64 bits of SHA-256: nothing to recover the secret from), never the secret."""
    return f"{client_id}@{authority}#{hashlib.sha256(client_secret.encode()).hexdigest()[:16]}"


_providers: dict[tuple[str, str], tuple[str, TokenProvider]] = {}
_providers_lock = threading.Lock()


def token_provider(
    authority: str, client_id: str, client_secret: str, verify: str | bool = True,
    persistence: TokenCachePersistence | None = None,
) -> TokenProvider:  # fmt: skip
    """The process-wide provider for this authority and client, so its token cache is shared; given a
    `persistence`, shared through it with other processes from now on (without one, the provider keeps
    the persistence it has, if any: a client connecting later shares the same cache)."""
    fingerprint = hashlib.sha256(f"{client_secret}\0{verify}".encode()).hexdigest()
    with _providers_lock:
        known = _providers.get((authority, client_id))
        if known is None or known[0] != fingerprint:  # a rotated secret gets a fresh app
            known = (fingerprint, TokenProvider(authority, client_id, client_secret, verify, persistence))
            _providers[(authority, client_id)] = known
        elif persistence is not None:
            known[1].persist_in(persistence)
        return known[1]
