"""Run the three fakes (Entra ID, Commerce, Dataverse) over HTTPS in one process.

The sockets are bound before the apps are built, so each app knows its real base URL (its token
audience) even when the port was 0 (any free port). Once all three serve, one JSON line describing
the endpoints goes to stdout and to `<state_dir>/endpoints.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import Depends
from starlette.types import ASGIApp

from d365_fakes import admin, entra
from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import FaultInjection, FaultPlan
from d365_fakes.limits import Limits, ServiceProtection, ServiceProtectionMiddleware, create_limits_router
from d365_fakes.listen import ANY_ADDRESS, LOOPBACK, check_listen_address
from d365_fakes.security import TenantSecurity, create_security_router
from d365_fakes.tls import TlsFiles, ensure_tls, load_or_create_rsa_key
from d365_fakes.tokens import ServiceDateHeader, TokenIssuer

if TYPE_CHECKING:
    from d365_fakes.commerce import CommerceState
    from d365_fakes.dataverse import DataverseState

ENDPOINTS_FILE = "endpoints.json"
TENANT_ID_FILE = "tenant-id"
SIGNING_KEY_FILE = "token-signing-key.pem"


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve`, which stops all three at once.

    (Each uvicorn.Server would otherwise replace the others' SIGTERM/SIGINT handlers.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(
    state_dir: Path,
    entra_port: int,
    commerce_port: int,
    dataverse_port: int,
    clients: Mapping[str, ClientRegistration],
    commerce_page_size: int = 10_000,
    tenant_id: str | None = None,
    limits: Limits | None = None,
    delta_token_ttl_s: float = 604_800,
    faults: FaultPlan | None = None,
    host: str = LOOPBACK,
    public_host: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT. Raises OSError if a port cannot be bound.

    `host`: the IPv4 address to listen on, a loopback one or 0.0.0.0 (e.g. in a container);
    `public_host`: the name clients reach the fakes by (default: `host`), which goes into every URL,
    token audience and issuer, and into the server certificate;
    `limits`: service protection and latency (default: the real Dataverse limits, no latency);
    `delta_token_ttl_s`: how long a Dataverse change-tracking delta link stays valid;
    `faults`: the fault plan to start with (default: none, seed 0).
    """
    # Imported on use: the OData services are the bulk of the package; nothing else here needs them.
    from d365_fakes import commerce, dataverse

    check_listen_address(host)
    public_host = public_host or host
    # The admin surface answers loopback callers only: on 0.0.0.0 they reach it through 127.0.0.1.
    admin_host = LOOPBACK if host == ANY_ADDRESS else host
    state_dir = Path(state_dir).resolve()
    tls = ensure_tls(state_dir, extra_names=(public_host, admin_host))
    tenant_id = tenant_id or _stable_tenant_id(state_dir)
    sockets = [_bind(host, port) for port in (entra_port, commerce_port, dataverse_port)]
    entra_url, commerce_url, dataverse_url = (_base_url(public_host, sock) for sock in sockets)

    issuer = TokenIssuer(
        entra_url, tenant_id, signing_key=load_or_create_rsa_key(state_dir / SIGNING_KEY_FILE)
    )
    apps = create_apps(
        issuer,
        clients,
        commerce_url,
        dataverse_url,
        commerce.CommerceState(),
        dataverse.DataverseState(delta_token_ttl_s=delta_token_ttl_s),
        faults or FaultPlan(),
        ServiceProtection(limits),
        commerce_page_size,
        admin_for_loopback_only=True,
    )

    endpoints = {
        "entra": entra_url,
        "tenant_id": tenant_id,
        "authority": f"{entra_url}/{tenant_id}",
        "commerce": commerce_url,
        "dataverse": dataverse_url,
        "ca_bundle": str(tls.ca_bundle),
        "pid": os.getpid(),
        "admin": f"{_base_url(admin_host, sockets[0])}/_admin",
    }
    endpoints_file = state_dir / ENDPOINTS_FILE
    try:
        asyncio.run(_serve_all(apps, sockets, tls, lambda: _announce(endpoints, endpoints_file)))
    finally:
        _remove_if_ours(endpoints_file)


def create_apps(
    issuer: TokenIssuer,
    clients: Mapping[str, ClientRegistration],
    commerce_url: str,
    dataverse_url: str,
    commerce_state: CommerceState,
    dataverse_state: DataverseState,
    faults: FaultPlan,
    protection: ServiceProtection,
    commerce_page_size: int = 10_000,
    admin_for_loopback_only: bool = False,
) -> list[ASGIApp]:
    """The Entra, Commerce and Dataverse apps, each with the whole `/_admin` surface; the two OData
    services behind service protection; each app wrapped whole in fault injection (outermost, so a
    reset fault gets uvicorn's own connection). One fault plan and one `ServiceProtection` serve
    all three, so an admin call through any server reaches the system it names.
    `admin_for_loopback_only`: `/_admin` answers 403 to callers not on the loopback (on for the
    served fakes; in-process test clients have no address)."""
    from d365_fakes import commerce, dataverse, metadata

    security = TenantSecurity(clients)
    commerce_app = commerce.create_app(
        commerce_state, issuer, commerce_url, clients, page_size=commerce_page_size, security=security
    )
    commerce_app.add_middleware(
        ServiceProtectionMiddleware, protection=protection, system="commerce", path_prefix="/data/"
    )
    dataverse_app = dataverse.create_app(dataverse_state, issuer, dataverse_url, clients, security)
    dataverse_app.add_middleware(
        ServiceProtectionMiddleware,
        protection=protection,
        system="dataverse",
        path_prefix=dataverse.API_ROOT + "/",
    )
    entra_app = entra.create_app(issuer, clients, resources=(commerce_url, dataverse_url))
    admin_router = admin.create_admin_router(
        commerce_state, dataverse_state, issuer, faults, also_reset=(security.reset,)
    )
    security_router = create_security_router(security, issuer.clock)
    limits_router = create_limits_router(protection)
    model_router = metadata.create_admin_router(commerce_state.model, dataverse_state)
    admin_dependencies = [Depends(admin.loopback_callers_only)] if admin_for_loopback_only else []
    for app in (entra_app, commerce_app, dataverse_app):
        app.include_router(admin_router, prefix="/_admin", dependencies=admin_dependencies)
        app.include_router(limits_router, prefix="/_admin", dependencies=admin_dependencies)
        app.include_router(security_router, prefix="/_admin", dependencies=admin_dependencies)
        app.include_router(model_router, prefix="/_admin", dependencies=admin_dependencies)
    commerce_challenge = issuer.www_authenticate(commerce_url)
    dataverse_challenge = issuer.www_authenticate(dataverse_url)
    # Microsoft's Date headers, from its clock (`/_admin/clock`), on every answer the apps give.
    entra_app, commerce_app, dataverse_app = (
        ServiceDateHeader(app, issuer.clock) for app in (entra_app, commerce_app, dataverse_app)
    )
    return [
        FaultInjection(entra_app, faults, "entra", entra.fault_response),
        FaultInjection(
            commerce_app,
            faults,
            "commerce",
            lambda fault, _scope: commerce.fault_response(fault, commerce_challenge),
            commerce_state.count_request,
        ),
        FaultInjection(
            dataverse_app,
            faults,
            "dataverse",
            lambda fault, _scope: dataverse.fault_response(fault, dataverse_challenge),
            dataverse_state.count_request,
        ),
    ]


async def _serve_all(
    apps: list[ASGIApp],
    sockets: list[socket.socket],
    tls: TlsFiles,
    on_started: Callable[[], None],
) -> None:
    servers = [_Server(_config(app, tls)) for app in apps]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)

    tasks = [
        asyncio.create_task(server.serve(sockets=[sock])) for server, sock in zip(servers, sockets)
    ]
    try:
        if await _all_started(servers, tasks):
            on_started()
        else:
            stop()
        await asyncio.gather(*tasks)
    finally:
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _all_started(servers: list[_Server], tasks: list[asyncio.Task[None]]) -> bool:
    """Wait until every server listens (True), or until one of them has ended (False)."""
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            return False
        await asyncio.sleep(0.01)
    return True


def _config(app: ASGIApp, tls: TlsFiles) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        log_level="warning",
        access_log=False,
        date_header=False,  # each app sets Date from Microsoft's clock (tokens.ServiceDateHeader)
        lifespan="off",
        # Requests take milliseconds; what remains at shutdown is mostly clients' idle keep-alive
        # TLS connections, which would otherwise hold the shutdown for the TLS close timeout.
        timeout_graceful_shutdown=1,
    )


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, an answer written in two segments (TLS record
    # of the headers, then the body) waits ~40 ms for the client's delayed ACK (Nagle's algorithm).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def _base_url(host: str, sock: socket.socket) -> str:
    return f"https://{host}:{sock.getsockname()[1]}"


def _stable_tenant_id(state_dir: Path) -> str:
    """The tenant id kept in the state directory, so it survives restarts (as a real one does)."""
    path = state_dir / TENANT_ID_FILE
    if path.exists():
        return str(uuid.UUID(path.read_text(encoding="utf-8").strip()))
    tenant_id = str(uuid.uuid4())
    path.write_text(tenant_id + "\n", encoding="utf-8")
    return tenant_id


def _remove_if_ours(endpoints_file: Path) -> None:
    """Remove endpoints.json once this process stops serving, unless another instance wrote it
    (e.g. this one failed to start because that one holds the ports)."""
    try:
        if json.loads(endpoints_file.read_text(encoding="utf-8"))["pid"] == os.getpid():
            endpoints_file.unlink()
    except (OSError, ValueError, KeyError):
        pass


def _announce(endpoints: dict[str, Any], endpoints_file: Path) -> None:
    line = json.dumps(endpoints)
    temp = endpoints_file.with_name(f".{endpoints_file.name}.tmp")
    temp.write_text(line + "\n", encoding="utf-8")
    temp.replace(endpoints_file)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
