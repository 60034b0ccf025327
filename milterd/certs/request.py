"""``milterd cert request``: a private key and a PKCS#10 request for a Domain Security certificate.

Writes ``<name>.key`` (PKCS#8 PEM, created with mode 0600 through ``os.open``, so it is never
readable by others even for an instant) and ``<name>.csr`` (PKCS#10 PEM) into ``--out``;
``<name>`` is the CN (or first SAN), ``*`` spelled ``wildcard``.  Existing files are never
overwritten.  The subject is parsed strictly (RFC 4514, RFC 5280 length limits) so the CA does
not refuse the request later.
"""

from __future__ import annotations

import argparse
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from milterd.certs.common import CertError, ensure_private_dir, private_key_pem, write_key_pair
from milterd.policy import dn as _dn
from milterd.policy.names import normalize_dns_name


# --------------------------------------------------------------------------- subject parsing

_ATTRS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "DC": NameOID.DOMAIN_COMPONENT,
    "STREET": NameOID.STREET_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "E": NameOID.EMAIL_ADDRESS,
    "UID": NameOID.USER_ID,
    "TITLE": NameOID.TITLE,
    "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME,
}
# ub-* upper bounds from RFC 5280 appendix A, so the CA does not reject the request later.
_MAX_LEN = {"CN": 64, "O": 64, "OU": 64, "L": 128, "ST": 128, "C": 2, "DC": 63}


def _split_unescaped(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside backslash escapes and double quotes."""
    parts, cur, i, quoted = [], [], 0, False
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_subject(text: str) -> x509.Name:
    """Strictly parse an RFC 4514 subject into an ``x509.Name``; CertError names the bad part.

    RFC 4514 text lists the most specific RDN first, certificates store it last: the RDN order
    is reversed so that ``Name.rfc4514_string()`` gives the user's text back.
    """
    if not text or not text.strip():
        raise CertError("--subject is empty")
    rdns: list[x509.RelativeDistinguishedName] = []
    for comp in _split_unescaped(text, ","):
        if not comp.strip():
            raise CertError("--subject %r: empty RDN (stray comma?)" % text)
        attrs: list[x509.NameAttribute] = []
        for atv in _split_unescaped(comp, "+"):
            atv_s = atv.strip()
            if "=" not in atv_s:
                raise CertError("--subject: %r is not TYPE=value" % atv_s)
            typ = atv_s.split("=", 1)[0].strip().upper()
            pairs, clean = _dn._parse_rfc4514(atv_s)
            if not clean or len(pairs) != 1:
                raise CertError("--subject: cannot parse %r (bad escape or quote)" % atv_s)
            value = pairs[0][1]
            if typ in _ATTRS:
                oid = _ATTRS[typ]
            elif typ[:1].isdigit():
                try:
                    oid = x509.ObjectIdentifier(typ)
                except ValueError:
                    raise CertError("--subject: bad OID %r in %r" % (typ, atv_s)) from None
            else:
                raise CertError(
                    "--subject: unknown attribute type %r in %r (known: %s)"
                    % (typ, atv_s, ", ".join(sorted(_ATTRS)))
                )
            if not value:
                raise CertError("--subject: empty value in %r" % atv_s)
            if "\ufffd" in value or any(ord(c) < 0x20 for c in value):
                raise CertError("--subject: control or invalid characters in %r" % atv_s)
            if typ == "C" and not (len(value) == 2 and value.isascii() and value.isalpha()):
                raise CertError("--subject: C=%r must be a two-letter country code" % value)
            limit = _MAX_LEN.get(typ)
            if limit is not None and len(value) > limit:
                raise CertError("--subject: %s value %r is longer than %d characters" % (typ, value, limit))
            if typ == "DC" and normalize_dns_name(value) != value.lower():
                raise CertError("--subject: DC=%r is not a single DNS label" % value)
            if typ in ("DC", "E", "EMAILADDRESS") and not value.isascii():
                raise CertError("--subject: %s=%r must be ASCII" % (typ, value))
            try:
                attrs.append(x509.NameAttribute(oid, value))
            except ValueError as exc:
                raise CertError("--subject: %r: %s" % (atv_s, exc)) from None
        rdns.append(x509.RelativeDistinguishedName(attrs))
    rdns.reverse()
    return x509.Name(rdns)


def _parse_san(value: str) -> str:
    """A ``--san``: a DNS name or ``*.name`` (base of two labels or more), normalised."""
    if value.startswith("*."):
        base = normalize_dns_name(value[2:])
        if base is None or base.count(".") < 1:
            raise CertError("--san %r: a wildcard needs a valid base of two labels or more" % value)
        return "*." + base
    name = normalize_dns_name(value)
    if name is None:
        raise CertError("--san %r is not a valid DNS name" % value)
    return name


def _generate_key(spec: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    kind, _, param = spec.lower().partition(":")
    if kind == "rsa" and param in ("2048", "3072", "4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(param))
    curves: dict[str, ec.EllipticCurve] = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}
    if kind == "ec" and param in curves:
        return ec.generate_private_key(curves[param])
    raise CertError("--key %r: use rsa:2048, rsa:3072, rsa:4096, ec:p256, ec:p384 or ec:p521" % spec)


# --------------------------------------------------------------------------- request


def cmd_request(args: argparse.Namespace) -> int:
    """Make a key and a PKCS#10 request for a Domain Security certificate (server + client)."""
    subject = parse_subject(args.subject)
    sans: list[str] = []
    for raw in args.san or []:
        san = _parse_san(raw)
        if san not in sans:
            sans.append(san)
    cns = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) > 1:
        raise CertError("--subject has %d CNs; use one CN and put the other names in --san" % len(cns))
    notes: list[str] = []
    if cns:
        cn_name = _parse_san(cns[0]) if cns[0].startswith("*.") else normalize_dns_name(cns[0])
        if cn_name is None:
            notes.append("note: CN %r is not a DNS name, so it was not added to the SANs" % cns[0])
        elif cn_name not in sans:
            sans.insert(0, cn_name)
            notes.append("note: added the CN %s to the SANs (peers match SANs, not the CN)" % cn_name)
    if not sans:
        raise CertError("no host name: give a CN that is a DNS name or at least one --san")
    key = _generate_key(args.key)
    key_usage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        content_commitment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    base = (cns[0] if cns and normalize_dns_name(cns[0]) else sans[0]).replace("*", "wildcard")
    base = normalize_dns_name(base) or "request"
    ensure_private_dir(args.out)
    key_path = os.path.join(args.out, base + ".key")
    csr_path = os.path.join(args.out, base + ".csr")
    for path in (key_path, csr_path):
        if os.path.lexists(path):
            raise CertError("%s already exists; refusing to overwrite it" % path)
    write_key_pair(key_path, private_key_pem(key), csr_path, csr.public_bytes(serialization.Encoding.PEM))
    for note in notes:
        print(note, file=sys.stderr)
    print("request:     %s" % csr_path)
    print("private key: %s (mode 0600; keep it secret)" % key_path)
    print("subject:     %s" % subject.rfc4514_string())
    print("SANs:        %s" % ", ".join(sans))
    print("key:         %s" % args.key.lower())
    return 0
