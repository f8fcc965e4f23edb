"""Access tokens of the fake Entra ID tenant: issuing (for entra.py), verifying (for the APIs) and
revoking (for `/_admin/tokens/revoke`).

Tokens are RS256 JWTs shaped like Entra ID v2.0 app-only tokens, so that what the product sees on
the wire (and any tooling that decodes a token) looks like the real thing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from d365_fakes.clients import ClientRegistration

DEFAULT_LIFETIME_S = 3599  # what Entra ID answers for client-credential tokens
_DECODED_TOKENS_KEPT = 512  # tokens whose signature, audience and issuer passed (TokenIssuer._decoded)


class InvalidToken(Exception):
    """The request's bearer token is missing or unacceptable; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServiceClock:
    """Microsoft's clock: this machine's, `skew_s` seconds off (`/_admin/clock`), for token times,
    token checks and the services' Date headers, so that a client whose clock is off can be tried."""

    def __init__(self) -> None:
        self.skew_s = 0.0

    def now(self) -> float:
        return time.time() + self.skew_s

    def set_skew(self, seconds: Any) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or abs(seconds) > 10 * 365 * 86400:
            raise ValueError(f"skew_s must be a number of seconds (at most ten years either way), got {seconds!r}")
        self.skew_s = float(seconds)

    def reset(self) -> None:
        self.skew_s = 0.0


class ServiceDateHeader:
    """ASGI middleware: every answer's `Date` header from the service's clock (RFC 9110 IMF-fixdate)."""

    def __init__(self, app: ASGIApp, clock: ServiceClock) -> None:
        self.app, self.clock = app, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_date(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"date"]
                headers.append((b"date", formatdate(self.clock.now(), usegmt=True).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_date)


@dataclass(frozen=True)
class Claims:
    client_id: str
    app_user_id: str
    tenant_id: str
    audience: str
    expires_at: datetime


class TokenIssuer:
    """Signs, checks and revokes the tenant's tokens; counts the tokens it has issued.

    Pass the same `signing_key` across restarts (server.py keeps it in the state directory) so
    that tokens clients have cached stay valid, as with Entra ID's long-lived signing keys.
    """

    def __init__(
        self,
        issuer_base_url: str,
        tenant_id: str,
        lifetime_s: int = DEFAULT_LIFETIME_S,
        signing_key: rsa.RSAPrivateKey | None = None,
        clock: ServiceClock | None = None,
    ) -> None:
        self.clock = clock or ServiceClock()
        self.issuer_base_url = issuer_base_url.rstrip("/")
        self.tenant_id = tenant_id
        self.issuer = f"{self.issuer_base_url}/{tenant_id}/v2.0"
        self.lifetime_s = lifetime_s
        self._key = signing_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public_jwk = _public_jwk(self._key.public_key())
        self.kid = self._public_jwk["kid"]
        self._lock = threading.Lock()
        self._tokens_issued = 0
        # Revocation works on token ids (`uti`), not on times: `iat` has whole seconds, and a token
        # issued in the second of a revocation, after it, must still work.
        self._unexpired: dict[str, tuple[str, int]] = {}  # uti -> (client id, exp) of tokens issued here
        self._revoked: set[str] = set()  # utis
        # Tokens this process did not issue were issued before it started (the signing key
        # outlives restarts): revoked for these client ids (None: for every client).
        self._revoked_before_start: set[str | None] = set()
        self._decoded_tokens: dict[tuple[str, str], dict[str, Any]] = {}  # see _decoded

    @property
    def tokens_issued(self) -> int:
        return self._tokens_issued

    def reset_counts(self) -> None:
        with self._lock:
            self._tokens_issued = 0

    def revoke(self, client_id: str | None = None) -> None:
        """Revoke every token issued until now to `client_id` (None: to every client); `verify`
        refuses them from now on. Tokens issued afterwards work."""
        now = self.clock.now()
        with self._lock:
            for uti, (holder, expires_at) in list(self._unexpired.items()):
                if expires_at < now:
                    del self._unexpired[uti]  # refused as expired anyway
                elif client_id is None or holder == client_id:
                    del self._unexpired[uti]
                    self._revoked.add(uti)
            self._revoked_before_start.add(client_id)

    def clear_revocations(self) -> None:
        """Accept revoked tokens again (until they expire), as after a fresh start."""
        with self._lock:
            self._revoked.clear()
            self._revoked_before_start.clear()

    def www_authenticate(self, audience: str) -> str:
        """The `WWW-Authenticate` challenge of a 401 from the API whose resource is `audience`."""
        return (
            f'Bearer authorization_uri="{self.issuer_base_url}/{self.tenant_id}/oauth2/authorize", '
            f'resource_id="{audience}"'
        )

    def issue(self, client: ClientRegistration, resource: str) -> dict[str, Any]:
        """The token endpoint's answer body for `client` asking for `resource` (the audience)."""
        now = int(self.clock.now())
        claims = {
            "aud": resource.rstrip("/"),
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime_s,
            "tid": self.tenant_id,
            "appid": client.client_id,
            "appidacr": "1",  # 1 = authenticated with a client secret
            "azp": client.client_id,
            "azpacr": "1",
            "oid": client.app_user_id,
            "sub": client.app_user_id,
            "idtyp": "app",
            "roles": [],
            "uti": uuid.uuid4().hex,
            "ver": "2.0",
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
        with self._lock:
            self._tokens_issued += 1
            self._unexpired[claims["uti"]] = (client.client_id, claims["exp"])
        return {
            "token_type": "Bearer",
            "expires_in": self.lifetime_s,
            "ext_expires_in": self.lifetime_s,
            "access_token": token,
        }

    def verify(self, authorization_header: str | None, audience: str) -> Claims:
        """Check an `Authorization` header value for a token meant for `audience`."""
        if not authorization_header:
            raise InvalidToken("no Authorization header")
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken("the Authorization header is not 'Bearer <token>'")
        claims = self._decoded(token, audience)
        now = self.clock.now()
        if not isinstance(claims["exp"], (int, float)) or claims["exp"] <= now:
            raise InvalidToken("the token has expired")
        if not isinstance(claims["nbf"], (int, float)) or claims["nbf"] > now:
            raise InvalidToken("the token is not valid yet (nbf is in the future)")
        if self._is_revoked(claims.get("uti"), claims["azp"]):
            raise InvalidToken("The token has been revoked")
        return Claims(
            client_id=claims["azp"],
            app_user_id=claims["oid"],
            tenant_id=claims["tid"],
            audience=claims["aud"],
            expires_at=datetime.fromtimestamp(claims["exp"], tz=timezone.utc),
        )

    def _decoded(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a token signed with this tenant's key, for `audience`, from this issuer
        (InvalidToken otherwise). That check depends on the token's text alone, and a client sends
        the same token for an hour, so a token that passed is remembered (a few hundred of them);
        times and revocation are checked on every use."""
        with self._lock:
            claims = self._decoded_tokens.get((token, audience))
        if claims is not None:
            return claims
        claims = self._decode(token, audience)
        with self._lock:
            if len(self._decoded_tokens) >= _DECODED_TOKENS_KEPT:
                del self._decoded_tokens[next(iter(self._decoded_tokens))]  # the oldest
            self._decoded_tokens[(token, audience)] = claims
        return claims

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("the bearer token is not a JWT") from None
        if header.get("kid") != self.kid:
            raise InvalidToken("the token was not signed by this tenant's key")
        try:
            return jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                audience=audience.rstrip("/"),
                issuer=self.issuer,
                # Times are checked by `verify` against the service's clock, not this machine's.
                options={"require": ["exp", "iat", "nbf", "aud", "iss", "tid", "azp", "oid"],
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise InvalidToken(f"the token's audience is not {audience.rstrip('/')}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token's signature is invalid") from None
        except jwt.InvalidTokenError as error:
            raise InvalidToken(f"the token is invalid: {error}") from None

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._public_jwk)]}

    def _is_revoked(self, uti: object, client_id: str) -> bool:
        with self._lock:
            if uti in self._unexpired:
                return False
            if uti in self._revoked:
                return True
            # Not issued by this process: issued before it started.
            return bool(self._revoked_before_start & {None, client_id})


def _public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    n = _b64url_uint(numbers.n)
    e = _b64url_uint(numbers.e)
    # RFC 7638 thumbprint as the key id: stable for a given key, so restarts keep the same kid.
    canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    kid = _b64url(hashlib.sha256(canonical.encode()).digest())
    return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": e}


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

