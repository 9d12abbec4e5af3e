"""The local development CA, and certificates issued by it.

A dev relay (the embedded default and ``burrow relay`` without ``--cert``)
needs a certificate for every tunnel host ``<id>.localhost``. burrow creates
one CA per user, once, in its data directory, and issues a short-lived leaf
certificate per host on demand. Trust that CA once (curl ``--cacert``, the
system store, a browser) and every tunnel URL is accepted.

``cryptography`` takes ~70 ms to import: only a dev relay imports this module
(when it starts), so agents and ``import burrow`` do not pay for it.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .paths import CA_CERT_NAME, CA_KEY_NAME, data_dir, write_private

#: The CA outlives many relays; ten years means users trust it once.
CA_LIFETIME = datetime.timedelta(days=3650)
#: Leaves live with one relay process; browsers cap leaves at 398 days anyway.
LEAF_LIFETIME = datetime.timedelta(days=90)
#: Tolerate clocks a little behind ours.
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and its key, as PEM."""

    cert_pem: bytes
    key_pem: bytes


class DevCA:
    """The per-user development CA; :meth:`load_or_create` is the way in."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        self.cert = cert
        self.key = key
        self.path = path  # the CA certificate file
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.fingerprint = cert.fingerprint(hashes.SHA256()).hex()  # names its entries in trust stores
        # one key for every leaf: generating a key per tunnel would cost more than signing
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> DevCA:
        """Load the CA from ``directory`` (default :func:`data_dir`), creating it once.

        Safe against several processes starting at once (a file lock).
        """
        directory = directory or data_dir()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (cert_path.exists() and key_path.exists()):
                cert_pem, key_pem = _new_ca()
                write_private(key_path, key_pem)
                write_private(cert_path, cert_pem, mode=0o644)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC key; delete {directory} to make a new dev CA")
        return cls(cert, key, cert_path)

    def issue(self, *hosts: str) -> IssuedCert:
        """A leaf certificate for ``hosts`` (DNS names, or IP addresses), signed by this CA."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), self.leaf_key_pem)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _new_ca() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "burrow development CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"burrow dev CA ({socket.gethostname()[:40]})"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def uncovered(cert_pem: bytes, domain: str) -> tuple[list[str], list[str]] | None:
    """The DNS names a relay's certificate lacks of ``domain`` and ``*.domain``, with the names it has.

    None when all are covered, or when ``cert_pem`` holds no certificate (its
    loader says so). Matching as a TLS client does: exact, or a wildcard for
    one leftmost label.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    except x509.ExtensionNotFound:
        names = []
    names = [name.lower().rstrip(".") for name in names]

    def covers(host: str) -> bool:
        parent = host.partition(".")[2]
        return host in names or (bool(parent) and f"*.{parent}" in names)

    missing = [want for want, probe in ((domain, domain), (f"*.{domain}", f"x.{domain}")) if not covers(probe)]
    return (missing, names) if missing else None
