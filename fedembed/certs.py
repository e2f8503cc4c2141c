"""Test certificates and organisation keys for trying a deployment on one machine.

:func:`write_test_certs` writes, into one directory:

- ``ca.crt`` / ``ca.key``: a local certificate authority (EC P-256, self-signed);
- ``server.crt`` / ``server.key``: the coordinator's TLS certificate, signed by that CA,
  valid for ``localhost``, ``127.0.0.1`` and any extra host names or IP addresses given;
- ``org-<i>.key`` / ``org-<i>.pub``: one SuperNode authentication key pair per
  organisation, EC P-384 in OpenSSH format, which is what Flower's SuperNode
  authentication reads (``flower-supernode --auth-supernode-private-key``,
  ``flwr supernode register <public key>``).

These are for tests and trials. In production, the coordinator's certificate comes from
the CA the organisations already trust, and every organisation generates its own key pair
(``ssh-keygen -t ecdsa -b 384 -N '' -f org.key``) and sends only the ``.pub`` file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedembed.store import atomic_write

log = logging.getLogger(__name__)


@dataclass
class CertPaths:
    """Where :func:`write_test_certs` put each file."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    org_private_keys: list[Path]
    org_public_keys: list[Path]


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; a private key's file is created 0600 (never readable by others, not even briefly)."""
    atomic_write(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_org_key(private_path: Path, public_path: Path, comment: str = "") -> None:
    """Write one organisation's SuperNode authentication key pair (EC P-384, OpenSSH).

    Parameters
    ----------
    private_path : Path
        Private key file (``--auth-key`` of ``fedembed client``), mode 0600.
    public_path : Path
        Public key file (``ecdsa-sha2-nistp384 ...``), listed by the coordinator.
    comment : str
        Appended to the public key line.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        private=True,
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public_path, pub + (f" {comment}".encode() if comment else b"") + b"\n", private=False)


def write_test_certs(directory: Path, orgs: int, hosts: list[str] | None = None, days: int = 365) -> CertPaths:
    """Write a test CA, a server certificate and ``orgs`` organisation key pairs.

    Parameters
    ----------
    directory : Path
        Output directory (created if missing). Existing files are overwritten.
    orgs : int
        Number of organisation key pairs (``org-0`` ... ``org-<orgs-1>``).
    hosts : list of str, optional
        Extra host names or IP addresses the server certificate is valid for, besides
        ``localhost`` and ``127.0.0.1`` (e.g. the coordinator's DNS name on a LAN).
    days : int
        Validity of the certificates.

    Returns
    -------
    CertPaths
        The paths written.
    """
    if orgs < 0:
        raise ValueError(f"orgs must be >= 0, got {orgs}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedembed test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = ["localhost", "127.0.0.1", *(hosts or [])]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertPaths(
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        org_private_keys=[d / f"org-{i}.key" for i in range(orgs)],
        org_public_keys=[d / f"org-{i}.pub" for i in range(orgs)],
    )
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    for i, (priv, pub) in enumerate(zip(paths.org_private_keys, paths.org_public_keys)):
        make_org_key(priv, pub, comment=f"fedembed-org-{i}")
    log.debug("wrote a test CA, a server certificate for %s and %d org key pairs to %s", names, orgs, d)
    return paths
