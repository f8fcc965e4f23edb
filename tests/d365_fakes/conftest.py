"""Shared fixtures: a fake Entra ID served in-process over real HTTPS."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from d365_fakes import entra
from d365_fakes.clients import ClientRegistration, load_clients
from d365_fakes.tls import TlsFiles, ensure_tls
from d365_fakes.tokens import TokenIssuer

TENANT_ID = "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11"
CLIENT_ID = "0b7e6c1e-9a55-4a53-8f5e-3d2f1a4c8b90"
CLIENT_SECRET = "test-only-secret~value"


@dataclass(frozen=True)
class EntraUnderTest:
    url: str
    tenant_id: str
    authority: str
    tls: TlsFiles
    issuer: TokenIssuer
    client: ClientRegistration

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.tls.ca_bundle))


@pytest.fixture
def msal_honours_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let MSAL's `verify=` take effect.

    MSAL talks through a requests.Session, and requests prefers REQUESTS_CA_BUNDLE and
    CURL_CA_BUNDLE from the environment over a Session's `verify` (psf/requests#3829, #4726).
    """
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@contextmanager
def serving(make_app: Callable[[str], Any], tls: TlsFiles) -> Iterator[str]:
    """Serves `make_app(url)` over HTTPS (the fakes' TLS files) on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(make_app(url), ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key), log_level="warning",
                            access_log=False, lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "an in-process server did not start"
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        server.force_exit = True  # do not wait for clients' idle keep-alive connections
        thread.join(timeout=10)


@pytest.fixture
def serve_https() -> Iterator[Callable[[Callable[[str], Any], TlsFiles], str]]:
    """`serve_https(make_app, tls) -> url`: more in-process HTTPS servers, stopped after the test."""
    with ExitStack() as stack:
        yield lambda make_app, tls: stack.enter_context(serving(make_app, tls))


@pytest.fixture
def entra_server(tmp_path: Path, msal_honours_verify: None) -> Iterator[EntraUnderTest]:
    tls = ensure_tls(tmp_path / "state")
    clients = load_clients([{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}])
    issuers: list[TokenIssuer] = []

    def make_app(url: str) -> Any:
        issuers.append(TokenIssuer(url, TENANT_ID))
        return entra.create_app(issuers[0], clients)

    with serving(make_app, tls) as url:
        yield EntraUnderTest(url, TENANT_ID, f"{url}/{TENANT_ID}", tls, issuers[0], clients[CLIENT_ID])
