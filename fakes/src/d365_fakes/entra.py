"""Fake Microsoft Entra ID: OIDC discovery, signing keys and the v2.0 token endpoint.

Only the client-credentials grant exists, which is what MSAL's `acquire_token_for_client` uses.
Error answers copy Entra ID's shape (`error`, `error_description` starting with the AADSTS code,
`error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`) and its HTTP statuses.
"""

from __future__ import annotations

import base64
import hmac
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import Scope

from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import Fault
from d365_fakes.tokens import TokenIssuer

DEFAULT_SCOPE_SUFFIX = "/.default"


class _EntraError(Exception):
    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.code, self.message = status, error, code, message


def create_app(
    issuer: TokenIssuer, clients: Mapping[str, ClientRegistration], resources: Iterable[str] | None = None
) -> FastAPI:
    """`resources`: the base URLs of the tenant's resources (its service principals), the only ones
    a token may be asked for; None: any resource (an Entra ID tested on its own)."""
    app = FastAPI(title="Fake Microsoft Entra ID", docs_url=None, redoc_url=None, openapi_url=None)
    base = issuer.issuer_base_url
    # Entra ID finds a resource by its identifier whatever its case and trailing slash; the token's
    # audience is the identifier as registered.
    known = None if resources is None else {_folded(url): url.rstrip("/") for url in resources}

    @app.exception_handler(_EntraError)
    async def entra_error(request: Request, error: _EntraError) -> JSONResponse:
        return _error_response(request, error, issuer.clock.now())

    def check_tenant(tenant: str) -> None:
        if tenant.lower() != issuer.tenant_id.lower():
            raise _EntraError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud. Check with your subscription "
                "administrator, this may happen if there are no active subscriptions for the "
                "tenant.",
            )

    @app.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def openid_configuration(tenant: str) -> dict:
        check_tenant(tenant)
        root = f"{base}/{tenant}"
        return {
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
            ],
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer.issuer,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
        }

    @app.get("/{tenant}/discovery/v2.0/keys")
    async def keys(tenant: str) -> dict:
        check_tenant(tenant)
        return issuer.jwks()

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request) -> JSONResponse:
        check_tenant(tenant)
        form = await request.form()
        grant_type = _required(form, "grant_type")
        if grant_type != "client_credentials":
            raise _EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        client_id, secret = _client_credentials(request, form)
        client = clients.get(client_id)
        if client is None:
            raise _EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You may "
                "have sent your authentication request to the wrong tenant.",
            )
        if secret is None:
            raise _EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        if not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
            raise _EntraError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is "
                f"the client secret value, not the client secret ID, for a secret added to app "
                f"'{client_id}'.",
            )
        resource = _resource_from_scope(_required(form, "scope"))
        if known is not None:
            if _folded(resource) not in known:
                raise _EntraError(
                    400,
                    "invalid_resource",
                    500011,
                    f"The resource principal named {resource} was not found in the tenant named "
                    f"{tenant}. This can happen if the application has not been installed by the "
                    "administrator of the tenant or consented to by any user in the tenant. You might "
                    "have sent your authentication request to the wrong tenant.",
                )
            resource = known[_folded(resource)]
        body = issuer.issue(client, resource)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    return app


def _required(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value:
        raise _EntraError(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )
    return value


def _client_credentials(request: Request, form: Mapping[str, object]) -> tuple[str, str | None]:
    """The client id and secret, from HTTP Basic auth (client_secret_basic) or the form."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic" and encoded:
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
            basic_id, _, basic_secret = decoded.partition(":")
        except ValueError:
            raise _EntraError(
                401, "invalid_client", 7000216, "The Authorization header is malformed."
            ) from None
        # RFC 6749 2.3.1: both parts are form-urlencoded before base64.
        return unquote_plus(basic_id), unquote_plus(basic_secret)
    secret = form.get("client_secret")
    return _required(form, "client_id"), secret if isinstance(secret, str) and secret else None


def _resource_from_scope(scope: str) -> str:
    scopes = scope.split()
    if len(scopes) != 1:
        raise _EntraError(
            400,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' is not valid. The scope "
            f"'{scope}' is not valid. A client credentials request takes exactly one scope, "
            "'<resource>/.default'.",
        )
    if not scopes[0].endswith(DEFAULT_SCOPE_SUFFIX) or scopes[0] == DEFAULT_SCOPE_SUFFIX:
        raise _EntraError(
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows must "
            "have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI).",
        )
    return scopes[0].removesuffix(DEFAULT_SCOPE_SUFFIX).rstrip("/")


def _folded(resource: str) -> str:
    return resource.rstrip("/").casefold()


def _error_response(request: Request, error: _EntraError, now: float | None = None) -> JSONResponse:
    """`now`: Microsoft's time (tokens.ServiceClock), for the answer's timestamp."""
    trace_id = str(uuid.uuid4())
    # Entra ID echoes the caller's client-request-id (MSAL sends one) as the correlation id.
    correlation_id = _uuid_or_none(request.headers.get("client-request-id")) or str(uuid.uuid4())
    moment = datetime.now(timezone.utc) if now is None else datetime.fromtimestamp(now, timezone.utc)
    timestamp = moment.strftime("%Y-%m-%d %H:%M:%SZ")
    description = (
        f"AADSTS{error.code}: {error.message}\r\nTrace ID: {trace_id}\r\n"
        f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
    )
    body = {
        "error": error.error,
        "error_description": description,
        "error_codes": [error.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        # Microsoft's own page for the code: it explains the error, so it is worth linking.
        "error_uri": f"https://login.microsoftonline.com/error?code={error.code}",
    }
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache", "x-ms-request-id": trace_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


def fault_response(fault: Fault, scope: Scope) -> JSONResponse:
    """An injected status fault (faults.FaultInjection): a transient failure (429, 5xx), a refused
    client (401, as a wrong secret is refused) or a refused request (other 4xx)."""
    if fault.status == 429 or fault.status >= 500:
        error = _EntraError(fault.status, "temporarily_unavailable", 90033,
                            "A transient error has occurred. Please try again.")  # fmt: skip
    elif fault.status == 401:
        error = _EntraError(401, "invalid_client", 7000215,
                            "Invalid client secret provided. Ensure the secret being sent in the request is the "
                            "client secret value, not the client secret ID.")  # fmt: skip
    else:
        error = _EntraError(fault.status, "invalid_request", 9002313,
                            "Invalid request. Request is malformed or invalid.")  # fmt: skip
    response = _error_response(Request(scope), error)
    response.headers.update(fault.headers())
    return response


def _uuid_or_none(value: str | None) -> str | None:
    try:
        return str(uuid.UUID(value)) if value else None
    except ValueError:
        return None
