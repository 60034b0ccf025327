"""A tiny PKI for the certtool tests: CAs, leaves, CRLs and PKCS#12 files made on the fly.

EC P-256 keys keep key generation fast; the openssl CLI makes the PKCS#12 files so the import
test reads what real users hand it, not what our own library would write.

``make_cert`` and ``make_crl(..., extensions=...)`` build the odd PKIs of the ``cert check``
differential test (path lengths, name constraints, key usages, unknown critical extensions,
CRL scopes, delta and indirect CRLs); they live here rather than in ``milterd.lab.pki`` because
that one is the demo's well-formed PKI and must stay boring.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
             signer: ec.EllipticCurvePrivateKey | None = None, last_update: dt.datetime | None = None,
             extensions: Sequence[tuple[x509.ExtensionType, bool]] = ()) -> x509.CertificateRevocationList:
    """A CRL from ``ca`` revoking the given serials (``signer`` to forge a bad signature).

    ``extensions``: (extension, critical) pairs, e.g. an ``idp(...)`` or a ``DeltaCRLIndicator``.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject).last_update(last_update or NOW - DAY)
        .next_update(next_update or NOW + 7 * DAY)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - DAY).build())
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(signer or ca.key, hashes.SHA256())


def idp(**fields: Any) -> x509.IssuingDistributionPoint:
    """An issuingDistributionPoint (CRL scope) with every field off except those given."""
    values: dict[str, Any] = dict(
        full_name=None, relative_name=None, only_contains_user_certs=False, only_contains_ca_certs=False,
        only_some_reasons=None, indirect_crl=False, only_contains_attribute_certs=False)
    values.update(fields)
    return x509.IssuingDistributionPoint(**values)


UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1.1")  # a private arc: no library knows it


def unknown_extension() -> x509.UnrecognizedExtension:
    """An extension no verifier understands (its value an ASN.1 NULL)."""
    return x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00")


def ns_cert_type(bits: int) -> x509.UnrecognizedExtension:
    """Netscape cert type (BIT STRING, RFC-less but honoured by OpenSSL): 0x80 SSL client, 0x40 SSL server."""
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("2.16.840.1.113730.1.1"), bytes([0x03, 0x02, 0x07, bits]))


_KU_FLAGS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign")


def key_usage(*flags: str) -> x509.KeyUsage:
    """KeyUsage with exactly ``flags`` set (names as in ``x509.KeyUsage``)."""
    unknown = set(flags) - set(_KU_FLAGS)
    assert not unknown, unknown
    return x509.KeyUsage(**{f: f in flags for f in _KU_FLAGS}, encipher_only=False, decipher_only=False)


_DEFAULT = object()


def make_cert(issuer: Issued | None, cn: str, *, ca: bool = False, path_length: int | None = None,
              basic_constraints: bool = True, ku: x509.KeyUsage | None | object = _DEFAULT,
              eku: Sequence[x509.ObjectIdentifier] | None | object = _DEFAULT,
              sans: Sequence[str] | None = None, ips: Sequence[str] = (), org: str = "Lab",
              name_constraints: x509.NameConstraints | None = None,
              extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              signer: ec.EllipticCurvePrivateKey | None = None) -> Issued:
    """Any certificate of the differential test; ``issuer=None`` makes it self-signed.

    Defaults are a well-formed CA (basicConstraints CA:TRUE critical, keyUsage keyCertSign +
    cRLSign, SKI/AKI) or end-entity (CA:FALSE, EKU serverAuth + clientAuth, SAN = [cn], no
    keyUsage); every keyword argument bends one thing.  ``signer`` signs instead of the issuer's key
    (a forgery).  The subject is ``O=<org>, CN=<cn>``.
    """
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(cn, org)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 365 * DAY)
        .add_extension(_ski(key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                                        critical=True)
    if ku is _DEFAULT:
        ku = key_usage("digital_signature", "key_cert_sign", "crl_sign") if ca else None
    if ku is not None:
        builder = builder.add_extension(ku, critical=True)  # type: ignore[arg-type]
    if eku is _DEFAULT:
        eku = None if ca else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)  # type: ignore[arg-type]
    if sans is None:
        sans = [] if ca else [cn]
    names: list[x509.GeneralName] = [x509.DNSName(s) for s in sans]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return Issued(builder.sign(signer or (issuer.key if issuer else key), hashes.SHA256()), key)


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
