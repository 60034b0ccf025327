"""A throw-away PKI for tests and demos, made with ``cryptography``.

Why in the package and not in tests: demos of the reference MTA need the same
certificates (a CA, CA-signed server/client certs, self-signed look-alikes
carrying the *same* names — the case a CN-only check gets wrong).

Certificates follow the RFC 5280 profile that ``cryptography.x509.verification``
enforces (basicConstraints, keyUsage, SKI/AKI, SAN on leaves).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


def _name(cn: str, org: Optional[str]) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / ("%s.crt" % stem)
    key_path = directory / ("%s.key" % stem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Issued(cert, key, cert_path, key_path)


class TestCA:
    """A root CA that issues leaf certificates for server and client use."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "Milterd Test CA", org: str = "Lab") -> None:
        self.directory = directory
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = _name(name, org)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        self.ca = _write(directory, "ca", cert, key)

    @property
    def cert_path(self) -> Path:
        return self.ca.cert_path

    def issue(self, stem: str, cn: str, sans: Sequence[str] = (), org: Optional[str] = "Lab",
              *, self_signed: bool = False, days: int = 30,
              not_after: Optional[dt.datetime] = None) -> Issued:
        """Issue (or, with ``self_signed``, fake) a leaf for ``cn`` + DNS ``sans``.

        Leaves carry both serverAuth and clientAuth, as MTA certificates do
        (one certificate for receiving and for sending).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = _name(cn, org)
        issuer_name = subject if self_signed else self.ca.cert.subject
        signer = key if self_signed else self.ca.key
        expires = not_after or now + dt.timedelta(days=days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now - dt.timedelta(hours=1), expires - dt.timedelta(days=1)))
            .not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, True, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        names = list(sans) or [cn]
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca.key.public_key()),
                critical=False)
        cert = builder.sign(signer, hashes.SHA256())
        return _write(self.directory, stem, cert, key)
