"""The local certificate authority and server certificate the fakes serve HTTPS with.

MSAL accepts only https authorities, so the fakes need certificates that clients can verify. The CA
is created once per state directory and reused, so a CA bundle handed to clients stays valid across
restarts. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_CERT_LIFETIME = datetime.timedelta(days=825)  # the longest lifetime TLS clients accept
RENEW_BEFORE = datetime.timedelta(days=30)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_bundle: Path  # the CA certificate: give it to clients as `verify=`
    cert: Path  # the server certificate
    key: Path  # the server certificate's private key


def ensure_tls(state_dir: Path, extra_names: tuple[str, ...] = ()) -> TlsFiles:
    """Create the CA and server certificate in `state_dir` if needed, and return their paths.

    The server certificate is valid for localhost and the loopback addresses, plus `extra_names`
    (host names or IP addresses, e.g. the name a compose network gives the fakes). An existing CA is
    always reused. The server certificate is reissued when it is missing, was not signed by the
    current CA, names other hosts, or is within 30 days of expiry.
    """
    names = _subject_alternative_names((*LOOPBACK_NAMES, *extra_names))
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_bundle=state_dir / "ca.pem",
        cert=state_dir / "server.pem",
        key=state_dir / "server-key.pem",
    )
    ca_key = load_or_create_rsa_key(state_dir / "ca-key.pem")
    ca_cert = _load_or_create_ca(files.ca_bundle, ca_key)
    if not _server_cert_usable(files.cert, ca_cert, names):
        server_key = load_or_create_rsa_key(files.key)
        cert = _issue_server_cert(server_key, ca_cert, ca_key, names)
        _write_atomically(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def load_or_create_rsa_key(path: Path) -> rsa.RSAPrivateKey:
    """An RSA 2048 private key kept in `path` (PEM, mode 0600), created on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, pem, 0o600)
    return key


def _load_or_create_ca(path: Path, ca_key: rsa.RSAPrivateKey) -> x509.Certificate:
    if path.exists():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if cert.public_key().public_numbers() == ca_key.public_key().public_numbers():
            return cert
        raise ValueError(f"{path} does not match {path.parent / 'ca-key.pem'}; remove both")
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "d365_fakes"),
            x509.NameAttribute(NameOID.COMMON_NAME, "d365_fakes local CA"),
        ]
    )
    public_key = ca_key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def _subject_alternative_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    alternative_names: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, without repeats
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    return alternative_names


def _server_cert_usable(path: Path, ca_cert: x509.Certificate, names: list[x509.GeneralName]) -> bool:
    if not path.exists() or not path.with_name("server-key.pem").exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ca_public_key = ca_cert.public_key()
    assert isinstance(ca_public_key, rsa.RSAPublicKey)
    try:
        ca_public_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm or hashes.SHA256(),
        )
    except InvalidSignature:
        return False
    issued_for = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(issued_for) == set(names) and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def _issue_server_cert(
    server_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    names: list[x509.GeneralName],
) -> x509.Certificate:
    now = _now()
    public_key = server_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # Write then rename, so a crash never leaves a half-written key or certificate behind.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
