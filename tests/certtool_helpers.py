"""A tiny PKI for the certtool tests: CAs, leaves, CRLs and PKCS#12 files made on the fly.

EC P-256 keys keep key generation fast; the openssl CLI makes the PKCS#12 files so the import
test reads what real users hand it, not what our own library would write.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OPENSSL = "/usr/bin/openssl"
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str | None, org: str = "Lab") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def make_ca(cn: str = "Lab Root CA", parent: Issued | None = None, *,
            not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
    """A CA certificate: self-signed root, or an intermediate when ``parent`` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = parent.cert.subject if parent else _name(cn)
    signer = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(_ski(key), critical=False)
    )
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_leaf(ca: Issued, cn: str | None = "mail.woodgrovebank.test", sans: Sequence[str] | None = None, *,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              serial: int | None = None, org: str = "Woodgrove Bank") -> Issued:
    """An end-entity certificate for server and client auth; ``sans=None`` means [cn]."""
    key = ec.generate_private_key(ec.SECP256R1())
    if sans is None:
        sans = [cn] if cn else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org)).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 90 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(ca: Issued, revoked: Sequence[int] = (), *, next_update: dt.datetime | None = None,
             signer: ec.EllipticCurvePrivateKey | None = None) -> x509.CertificateRevocationList:
    """A CRL from ``ca`` revoking the given serials (``signer`` to forge a bad signature)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject).last_update(NOW - DAY).next_update(next_update or NOW + 7 * DAY)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - DAY).build())
    return builder.sign(signer or ca.key, hashes.SHA256())


def pem(*objs: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return b"".join(o.public_bytes(serialization.Encoding.PEM) for o in objs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def openssl_pkcs12(tmp: Path, leaf: Issued, chain: Sequence[x509.Certificate] = (),
                   password: str | None = None, name: str = "bundle",
                   key: ec.EllipticCurvePrivateKey | None = None, extra_args: Sequence[str] = ()) -> Path:
    """``openssl pkcs12 -export`` a leaf + key (+ chain); password via ``-passout file:``."""
    leaf_path = write(tmp / (name + "-leaf.pem"), pem(leaf.cert))
    key_path = tmp / (name + "-leaf.key")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem(key or leaf.key))
    out = tmp / (name + ".pfx")
    cmd = [OPENSSL, "pkcs12", "-export", *extra_args, "-in", leaf_path, "-inkey", str(key_path), "-out", str(out)]
    if chain:
        cmd += ["-certfile", write(tmp / (name + "-chain.pem"), pem(*chain))]
    if password is None:
        cmd += ["-passout", "pass:"]
    else:
        pw_file = tmp / (name + "-password.txt")
        pw_file.write_text(password + "\n")
        cmd += ["-passout", "file:" + str(pw_file)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    key_path.unlink()
    return out
