"""A throw-away test PKI for tests and the demo (never for production keys).

Makes a CA and leaves with ``cryptography``; files are written PEM, private keys 0600.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: Any = None  # the private key object

    @property
    def sha256(self) -> str:
        """The certificate pin value (``cert-sha256:`` + this)."""
        from milterd.certs.common import sha256_fingerprint

        return sha256_fingerprint(self.cert)

    @property
    def pubkey_sha256(self) -> str:
        """The public-key pin value (``key-sha256:`` + this): unchanged by a same-key re-issue."""
        from milterd.certs.common import pubkey_sha256_fingerprint

        return pubkey_sha256_fingerprint(self.cert)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str | None, org: str | None) -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


class TestPKI:
    """A CA in ``directory`` that issues leaves on demand."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, ca_name: str = "milterd Test CA",
                 org: str = "milterd Lab", *, days: int = 365):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.org = org  # also the default organisation of issued leaves
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = _name(ca_name, org)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca_path = self.dir / "ca.crt"
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.dir / "ca.key", self.ca_key)
        self.ca = Issued(self.ca_path, self.dir / "ca.key", self.ca_cert, self.ca_key)

    @property
    def cert_path(self) -> Path:
        """The CA certificate (what peers load as their trust anchor)."""
        return self.ca_path

    def issue(self, stem: str, cn: str | None, sans: tuple[str, ...] | list[str] | None = None,
              org: str | None | type[Ellipsis] = ..., *, self_signed: bool = False,
              days: int = 90, not_before_days: int = -1,
              not_after: dt.datetime | None = None,
              key: ec.EllipticCurvePrivateKey | None = None) -> Issued:
        """A leaf for ``cn`` (serverAuth + clientAuth, as MTA certificates are used both ways).

        ``sans`` None or empty: the CN is the only DNS SAN; ``org`` defaults to the CA's;
        ``not_after`` in the past makes an expired certificate; ``key`` re-issues for an existing
        key (a renewal that keeps the key: same public-key pin, new certificate pin).
        """
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        subject = _name(cn, self.org if org is ... else org)  # type: ignore[arg-type]
        sans = tuple(sans) if sans else ((cn,) if cn else ())
        expires = not_after or now + dt.timedelta(days=days)
        starts = min(now + dt.timedelta(days=not_before_days), expires - dt.timedelta(days=1))
        issuer_name = subject if self_signed else self.ca_cert.subject
        signing_key = key if self_signed else self.ca_key
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(starts).not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, True, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False))
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False)
        cert = builder.sign(signing_key, hashes.SHA256())
        cert_path = self.dir / f"{stem}.crt"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Issued(cert_path, key_path, cert, key)
