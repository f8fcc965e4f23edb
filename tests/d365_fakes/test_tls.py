"""The local CA and server certificate."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from d365_fakes.tls import TlsFiles, ensure_tls


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def handshake(tls: TlsFiles, server_hostname: str) -> dict:
    """A real TLS handshake against a server using `tls`, verified with the CA bundle."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls.cert, tls.key)
    client_context = ssl.create_default_context(cafile=str(tls.ca_bundle))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve_one() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True):
                    pass
            except ssl.SSLError:
                pass  # the client rejected us; its side of the test reports that

        server = threading.Thread(target=serve_one)
        server.start()
        try:
            with socket.create_connection(listener.getsockname()) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_hostname) as client:
                    return client.getpeercert()
        finally:
            server.join(timeout=10)


def test_creates_ca_and_server_certificate_with_private_keys_0600(tmp_path: Path) -> None:
    tls = ensure_tls(tmp_path / "state")

    assert tls.ca_bundle.exists() and tls.cert.exists()
    assert mode(tls.key) == 0o600
    assert mode(tmp_path / "state" / "ca-key.pem") == 0o600
    ca = x509.load_pem_x509_certificate(tls.ca_bundle.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert ca.public_key().key_size == 2048


def test_server_certificate_names_localhost_and_loopback_addresses(tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(ensure_tls(tmp_path).cert.read_bytes())

    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_clients_trusting_the_ca_bundle_accept_the_server(tmp_path: Path, hostname: str) -> None:
    assert handshake(ensure_tls(tmp_path), hostname)


def test_other_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ensure_tls(tmp_path), "example.com")


def test_reuses_everything_on_the_next_start(tmp_path: Path) -> None:
    first = ensure_tls(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}

    again = ensure_tls(tmp_path)

    assert again == first
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_missing_server_certificate_is_reissued_by_the_same_ca(tmp_path: Path) -> None:
    tls = ensure_tls(tmp_path)
    ca_before = tls.ca_bundle.read_bytes()
    tls.cert.unlink()

    ensure_tls(tmp_path)

    assert tls.ca_bundle.read_bytes() == ca_before
    assert handshake(tls, "127.0.0.1")


def test_extra_names_are_certified_and_a_change_of_names_reissues_the_certificate(tmp_path: Path) -> None:
    first = ensure_tls(tmp_path, extra_names=("fakes",))
    assert handshake(first, "fakes")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(first, "other")
    ca_before = first.ca_bundle.read_bytes()

    again = ensure_tls(tmp_path, extra_names=("other", "10.0.0.7"))

    names = x509.load_pem_x509_certificate(again.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value  # fmt: skip
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "other"]
    assert ipaddress.ip_address("10.0.0.7") in names.get_values_for_type(x509.IPAddress)
    assert again.ca_bundle.read_bytes() == ca_before  # same CA: clients' bundles stay valid
    assert handshake(again, "other")
