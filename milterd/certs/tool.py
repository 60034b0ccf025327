"""``milterd cert request|import|list|check`` — certificate tooling for Domain Security.

Domain Security only works if both ends hold certificates that chain to a trusted CA, name the
host, and are not expired or revoked; these commands make the routine steps (make a request,
install what the CA returned, see what is installed and when it expires, check one certificate
the way a peer would) safe and scriptable.  Built on the ``cryptography`` package; ``check``
also runs the ``openssl`` command (3.0 or later; Debian's ``postfix`` pulls it in via
``ssl-cert``), because the verdict that matters is the one of the OpenSSL library Postfix and
most partners verify with.

Exit codes: 0 success; 1 the material was checked and refused (``check`` failures, an expired or
key-mismatched PKCS#12 on ``import``); 2 usage or input errors (bad subject, unreadable file,
wrong password).  Errors are one line on stderr, never a traceback, and never contain a
password or key material.

Files
-----
* ``request`` writes ``<name>.key`` (PKCS#8 PEM, created with mode 0600 through ``os.open``, so
  it is never readable by others even for an instant) and ``<name>.csr`` (PKCS#10 PEM) into
  ``--out``; ``<name>`` is the CN (or first SAN), ``*`` spelled ``wildcard``.  Existing files
  are never overwritten.
* ``import`` stores ``<SHA1>.key`` (0600) and ``<SHA1>.pem`` (leaf first, then its chain) in
  ``--store``, named by the SHA-1 thumbprint Exchange shows.  New directories are made 0700.
* ``list`` reads every ``*.pem``/``*.crt``/``*.cert`` file in the store (default
  ``$MILTERD_CERT_STORE`` or ``/etc/milterd/certs``) and every such path named in the TOML
  config given with ``-c``: any string value anywhere in the config that ends in
  ``.pem``/``.crt``/``.cert`` counts, and is reported under its dotted key (``tls.cert_file``;
  list items as ``key[0]``).  Relative paths are taken relative to the config file.  Each file is
  shown by its first certificate (the leaf); ``chain`` counts the certificates in the file.
* ``check`` does not judge the chain with rules of its own: it asks OpenSSL, with the command
  line of a TLS peer (``openssl verify -purpose sslserver`` and/or ``sslclient`` per
  ``--purpose``, default ``both``; ``-crl_check_all -CRLfile`` with ``--crl``), so it never says
  OK where OpenSSL refuses (path length, name constraints, keyUsage/extendedKeyUsage/nsCertType
  for the role, critical extensions, signatures, dates at every level, CRL scope, CRL signature
  and dates, revocation).  Every OpenSSL error becomes one line ``keyword: detail``
  (``untrusted``, ``expired``, ``not_yet_valid``, ``revoked``, ``path_length``,
  ``name_constraints``, ``purpose``, ``invalid_ca``, ``critical_extension``, ``crl_invalid``,
  ``crl_expired``, ``crl_not_yet_valid``, ``crl_scope``, ``crl_unsupported``…, see
  ``KEYWORDS``); the same failure seen in several runs is printed once, and a purpose failure
  names every role it breaks.  OpenSSL stops at a certificate that is not yet valid, so then
  ``check`` runs it once more without date checks to report what lies behind.  Checks of our
  own, on top: ``--name`` (the RFC 9525 matcher Domain Security uses), and delta CRLs are
  refused (``crl_unsupported``), deliberately stricter than OpenSSL, which takes a lone delta
  for a complete CRL and ignores what a delta adds to its base; indirect CRLs (which OpenSSL
  uses only with ``-extended_crl``) are refused by name too.  Trust is what Postfix's
  ``smtpd_tls_CAfile`` gives: only ``--ca`` (``-no-CApath -no-CAstore``), whose self-signed
  certificates are the anchors (no ``-partial_chain``: an intermediate there only helps build
  the path to its root); a self-signed end-entity certificate listed there is trusted as
  itself.  Without ``--ca`` the system bundle is used.  Extra certificates after the leaf in the
  checked file serve as untrusted intermediates.  With ``--crl`` every certificate in the path,
  the root included, needs a current CRL from its issuer in the file (``-crl_check_all``).
  ``$MILTERD_OPENSSL`` names another ``openssl`` binary (3.0 or later).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import tomllib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from milterd.policy import dn as _dn
from milterd.policy.names import name_matches, normalize_dns_name

__all__ = ["register", "certificate_expiry", "CertError"]

log = logging.getLogger("milterd.cert")

DEFAULT_STORE = "/etc/milterd/certs"
CERT_SUFFIXES = (".pem", ".crt", ".cert")
_MAX_CHAIN = 8


class CertError(Exception):
    """A user-facing failure: one line of text and an exit code (2 = input, 1 = refused)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- small helpers


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: str, what: str) -> bytes:
    """Read a file or raise CertError naming it (why: no tracebacks for a missing file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CertError("cannot read %s %s: %s" % (what, path, exc.strerror or exc)) from None


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """All certificates in PEM data (or one DER certificate); ValueError if there are none."""
    if b"-----BEGIN" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def _load_cert_file(path: str, what: str = "certificate file") -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        return load_certificates(data)
    except ValueError:
        raise CertError("%s %s holds no readable certificate" % (what, path)) from None


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-1 of the DER certificate, no colons: what Exchange calls Thumbprint."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - identifier, not security


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-256 with colons: the form Postfix's ccert_fingerprint and pins use."""
    return ":".join("%02X" % b for b in cert.fingerprint(hashes.SHA256()))


def dns_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.DNSName))


def _cns(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _spki(key_or_cert: Any) -> bytes:
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` atomically at creation (O_EXCL, no symlink following).

    Why: a key must never exist with wider permissions, not even between write and chmod, and an
    existing file (possibly someone's live key) is never overwritten.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CertError("%s already exists; refusing to overwrite it" % path) from None
    except OSError as exc:
        raise CertError("cannot create %s: %s" % (path, exc.strerror or exc)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_pair(key_path: str, key_data: bytes, public_path: str, public_data: bytes) -> None:
    """Write a key (0600) and its public companion (0644); never leave a key without it."""
    _write_new(key_path, key_data, 0o600)
    try:
        _write_new(public_path, public_data, 0o644)
    except CertError:
        os.unlink(key_path)
        raise


def _ensure_dir(path: str) -> None:
    """Make ``path`` and every missing parent with mode 0700 (existing directories are left alone).

    Why: ``os.makedirs(mode=...)`` applies the mode to the last directory only (and through the
    umask), so ``--out /new/a/b`` would leave ``/new`` and ``/new/a`` world-readable on the way to
    key material.
    """
    missing: list[str] = []
    cur = os.path.abspath(path)
    while not os.path.lexists(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to chmod
        except OSError as exc:
            raise CertError("cannot create directory %s: %s" % (directory, exc.strerror or exc)) from None
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    if not os.path.isdir(path):
        raise CertError("%s is not a directory" % path)


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


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


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
    _ensure_dir(args.out)
    key_path = os.path.join(args.out, base + ".key")
    csr_path = os.path.join(args.out, base + ".csr")
    for path in (key_path, csr_path):
        if os.path.lexists(path):
            raise CertError("%s already exists; refusing to overwrite it" % path)
    _write_pair(key_path, _key_pem(key), csr_path, csr.public_bytes(serialization.Encoding.PEM))
    for note in notes:
        print(note, file=sys.stderr)
    print("request:     %s" % csr_path)
    print("private key: %s (mode 0600; keep it secret)" % key_path)
    print("subject:     %s" % subject.rfc4514_string())
    print("SANs:        %s" % ", ".join(sans))
    print("key:         %s" % args.key.lower())
    return 0


# --------------------------------------------------------------------------- import


def _order_chain(leaf: x509.Certificate, others: Sequence[x509.Certificate]) -> tuple[list[x509.Certificate], int]:
    """Leaf first, then each issuer in turn; returns (chain, number of unrelated certs dropped)."""
    chain = [leaf]
    pool = [c for c in others if c != leaf]
    while pool and len(chain) <= _MAX_CHAIN:
        cur = chain[-1]
        if cur.issuer == cur.subject:
            break
        nxt = next((c for c in pool if c.subject == cur.issuer), None)
        if nxt is None:
            break
        chain.append(nxt)
        pool.remove(nxt)
    return chain, len(pool)


def _read_password(path: str | None) -> bytes | None:
    """First line of the password file (what ``openssl … -passout file:`` writes and reads)."""
    if path is None:
        return None
    data = _read(path, "password file")
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def cmd_import(args: argparse.Namespace) -> int:
    """Install a PKCS#12 (.pfx) key + chain into the store, refusing unusable material."""
    data = _read(args.file, "PKCS#12 file")
    password = _read_password(args.password_file)
    attempts = [password] if password is not None else [None, b""]
    loaded = None
    for pw in attempts:
        try:
            loaded = pkcs12.load_key_and_certificates(data, pw)
            break
        except (ValueError, TypeError):
            continue
        except UnsupportedAlgorithm:
            raise CertError("cannot read %s: it uses an unsupported (legacy) encryption; re-export it"
                            " with AES (openssl pkcs12 -export without -legacy)" % args.file) from None
    if loaded is None:
        hint = "wrong password" if password is not None else "a password is needed (--password-file)"
        raise CertError("cannot read %s: %s, or not a PKCS#12 file" % (args.file, hint))
    key, cert, extra = loaded
    everything = ([cert] if cert is not None else []) + list(extra or [])
    if not everything:
        raise CertError("%s holds no certificate" % args.file)
    if key is None:
        raise CertError("%s holds no private key" % args.file)
    # The key's certificate is normally flagged in the bag attributes; when it is not (or the
    # flag is wrong), the certificate whose public key matches the private key is the leaf.
    key_spki = _spki(key)
    cert = next((c for c in everything if _spki(c) == key_spki), None)
    if cert is None:
        raise CertError("refusing %s: the private key does not match any certificate in it" % args.file, 1)
    extra = [c for c in everything if c is not cert]
    now = _now()
    if cert.not_valid_after_utc < now:
        raise CertError(
            "refusing %s: certificate %s expired on %s"
            % (args.file, cert.subject.rfc4514_string(), _iso(cert.not_valid_after_utc)), 1)
    chain, dropped = _order_chain(cert, list(extra or []))
    if cert.not_valid_before_utc > now:
        print("warning: certificate is not valid before %s" % _iso(cert.not_valid_before_utc), file=sys.stderr)
    for ca in chain[1:]:
        if ca.not_valid_after_utc < now:
            print("warning: chain certificate %s expired on %s"
                  % (ca.subject.rfc4514_string(), _iso(ca.not_valid_after_utc)), file=sys.stderr)
    if dropped:
        print("warning: ignored %d certificate(s) not in the leaf's chain" % dropped, file=sys.stderr)
    thumb = sha1_thumbprint(cert)
    _ensure_dir(args.store)
    key_path = os.path.join(args.store, thumb + ".key")
    pem_path = os.path.join(args.store, thumb + ".pem")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = _key_pem(key)
    if os.path.lexists(key_path) or os.path.lexists(pem_path):
        try:
            same = _read(pem_path, "stored chain") == chain_pem and _read(key_path, "stored key") == key_pem
        except CertError:
            same = False
        if not same:
            raise CertError("%s or %s already exists with other content; refusing to overwrite" % (key_path, pem_path), 1)
        print("already in the store")
    else:
        _write_pair(key_path, key_pem, pem_path, chain_pem)
    print("SHA-1 thumbprint: %s" % thumb)
    print("SHA-256:          %s" % sha256_fingerprint(cert))
    print("subject:          %s" % cert.subject.rfc4514_string())
    print("not after:        %s" % _iso(cert.not_valid_after_utc))
    print("chain:            %s (%d certificate%s)" % (pem_path, len(chain), "" if len(chain) == 1 else "s"))
    for ca in chain[1:]:
        print("  issuer SHA-1 %s  %s" % (sha1_thumbprint(ca), ca.subject.rfc4514_string()))
    print("private key:      %s (mode 0600)" % key_path)
    return 0


# --------------------------------------------------------------------------- list


def config_cert_paths(config_path: str) -> list[tuple[str, str]]:
    """(dotted key, absolute path) for every string in a TOML config ending in a cert suffix."""
    data = _read(config_path, "config")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CertError("cannot parse config %s: %s" % (config_path, exc)) from None
    base = os.path.dirname(os.path.abspath(config_path))
    found: list[tuple[str, str]] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, "%s.%s" % (key, k) if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, "%s[%d]" % (key, i))
        elif isinstance(node, str) and node.lower().endswith(CERT_SUFFIXES):
            found.append((key, os.path.normpath(os.path.join(base, node))))

    walk(doc, "")
    return found


@dataclass
class CertInfo:
    """One row of ``cert list`` (also its JSON object)."""

    path: str
    sha1: str
    sha256: str
    subject: str
    sans: list[str]
    issuer: str
    not_after: str
    days_left: int
    chain: int
    used_by: list[str]


def _describe(path: str, certs: list[x509.Certificate], used_by: list[str], now: _dt.datetime) -> CertInfo:
    leaf = certs[0]
    left = leaf.not_valid_after_utc - now
    return CertInfo(
        path=path, sha1=sha1_thumbprint(leaf), sha256=sha256_fingerprint(leaf),
        subject=leaf.subject.rfc4514_string(), sans=dns_sans(leaf), issuer=leaf.issuer.rfc4514_string(),
        not_after=_iso(leaf.not_valid_after_utc), days_left=left.days, chain=len(certs), used_by=used_by,
    )


def _table(rows: list[CertInfo]) -> str:
    header = ["SHA1 THUMBPRINT", "SHA256", "SUBJECT", "SANS", "ISSUER", "NOT AFTER", "DAYS", "USED BY", "FILE"]
    body = [
        [r.sha1, r.sha256, r.subject, ",".join(r.sans) or "-", r.issuer, r.not_after, str(r.days_left),
         ",".join(r.used_by) or "-", r.path]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header] + body)


def cmd_list(args: argparse.Namespace) -> int:
    """Show the installed certificates, their fingerprints, expiry and which config key uses them."""
    store = args.store or os.environ.get("MILTERD_CERT_STORE") or DEFAULT_STORE
    files: list[str] = []
    if os.path.isdir(store):
        for name in sorted(os.listdir(store)):
            if name.lower().endswith(CERT_SUFFIXES):
                files.append(os.path.normpath(os.path.join(os.path.abspath(store), name)))
    elif args.store:
        raise CertError("store %s is not a directory" % store)
    used: dict[str, list[str]] = {}
    if args.config:
        for key, path in config_cert_paths(args.config):
            real = os.path.realpath(path)
            used.setdefault(real, []).append(key)
            if all(os.path.realpath(f) != real for f in files):
                files.append(path)
    now = _now()
    rows: list[CertInfo] = []
    for path in files:
        try:
            certs = _load_cert_file(path)
        except CertError as exc:
            print("warning: skipping %s" % exc, file=sys.stderr)
            continue
        rows.append(_describe(path, certs, used.get(os.path.realpath(path), []), now))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    elif rows:
        print(_table(rows))
    else:
        print("no certificates found (store %s)" % store)
    return 0


# --------------------------------------------------------------------------- check

Failure = tuple[str, str]

#: ``--purpose`` -> the roles checked; each role is one ``openssl verify -purpose`` run.
PURPOSES: dict[str, tuple[str, ...]] = {"server": ("server",), "client": ("client",), "both": ("server", "client")}
_OPENSSL_PURPOSE = {"server": "sslserver", "client": "sslclient"}
_ROLE_TEXT = {"server": "TLS server", "client": "TLS client"}

# OpenSSL X509_V_ERR_* numbers (as renumbered in 3.0; later 3.x releases only append), named by
# the keyword ``check`` prints.  A code not listed here is still a refusal, printed as ``refused``
# with OpenSSL's own text.
_KEYWORD_CODES: dict[str, tuple[int, ...]] = {
    "untrusted": (2, 4, 6, 7, 18, 19, 20, 21, 24, 27, 28, 29, 30, 31, 55, 76, 77),
    "not_yet_valid": (9,),
    "expired": (10,),
    "revoked": (23,),
    "crl_invalid": (3, 5, 8, 15, 16, 33, 35, 54),
    "crl_not_yet_valid": (11,),
    "crl_expired": (12,),
    "crl_scope": (44,),
    "crl_unsupported": (36, 45),
    "chain_too_long": (22,),
    "path_length": (25, 38),
    "purpose": (26,),
    "invalid_ca": (32, 37, 79),
    "critical_extension": (34,),
    "malformed": (13, 14, 41, 78, 93, 94),
    "policy": (42, 43),
    "name_constraints": (47, 48, 49, 51, 52, 53),
    "weak_key": (66, 67),
    "weak_signature": (68,),
}
_CODE_KEYWORD = {code: kw for kw, codes in _KEYWORD_CODES.items() for code in codes}
#: Every keyword ``check`` can print, besides ``name_mismatch`` (ours) and ``refused`` (fallback).
KEYWORDS = frozenset(_KEYWORD_CODES) | {"name_mismatch", "refused"}
_CRL_KEYWORDS = frozenset({"revoked", "crl_invalid", "crl_not_yet_valid", "crl_expired", "crl_scope",
                           "crl_unsupported"})
# Errors raised while OpenSSL builds the path, i.e. before it looks at any CRL.
_PATH_BUILDING_CODES = frozenset({2, 18, 19, 20, 21, 22, 27, 28, 55})
_TIME_CODES = frozenset({9, 10})

_EKU_NAMES = {
    "1.3.6.1.5.5.7.3.1": "serverAuth", "1.3.6.1.5.5.7.3.2": "clientAuth", "1.3.6.1.5.5.7.3.3": "codeSigning",
    "1.3.6.1.5.5.7.3.4": "emailProtection", "1.3.6.1.5.5.7.3.8": "timeStamping", "1.3.6.1.5.5.7.3.9": "OCSPSigning",
    "2.5.29.37.0": "anyExtendedKeyUsage",
}
_KU_NAMES = (("digital_signature", "digitalSignature"), ("content_commitment", "nonRepudiation"),
             ("key_encipherment", "keyEncipherment"), ("data_encipherment", "dataEncipherment"),
             ("key_agreement", "keyAgreement"), ("key_cert_sign", "keyCertSign"), ("crl_sign", "cRLSign"))
_NS_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")
_ERROR_LINE = re.compile(r"^(\[CRL path\] )?error (\d+) at (-?\d+) depth lookup: ?(.*)$")


def _default_anchors() -> list[x509.Certificate]:
    paths = ssl.get_default_verify_paths()
    for cafile in (paths.cafile, paths.openssl_cafile):
        if cafile and os.path.isfile(cafile):
            try:
                with warnings.catch_warnings():  # old roots in system bundles trip deprecations
                    warnings.simplefilter("ignore")
                    return load_certificates(_read(cafile, "CA bundle"))
            except (ValueError, CertError):
                continue
    return []


def _load_crls(path: str) -> list[x509.CertificateRevocationList]:
    data = _read(path, "CRL file")
    try:
        if b"-----BEGIN" in data:
            crls = []
            marker = b"-----BEGIN X509 CRL-----"
            for chunk in data.split(marker)[1:]:
                crls.append(x509.load_pem_x509_crl(marker + chunk))
            if not crls:
                raise ValueError("no CRL")
            return crls
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        return []


@functools.lru_cache(maxsize=4)
def _openssl_for(configured: str | None) -> str:
    """The ``openssl`` binary to verify with: ``$MILTERD_OPENSSL`` or the one on PATH (>= 3.0)."""
    path = configured or shutil.which("openssl") or "/usr/bin/openssl"
    try:
        proc = subprocess.run([path, "version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CertError("cert check needs the openssl command (Debian package openssl): %s" % exc) from None
    m = re.match(r"OpenSSL (\d+)\.", proc.stdout)
    if proc.returncode != 0 or not m or int(m.group(1)) < 3:
        raise CertError("cert check needs OpenSSL 3.0 or later; %s says %r"
                        % (path, (proc.stdout or proc.stderr).strip()[:80]))
    return path


def _openssl() -> str:
    return _openssl_for(os.environ.get("MILTERD_OPENSSL"))


@dataclass(frozen=True)
class VerifyError:
    """One error line of ``openssl verify``: code, depth in the path, printed subject, text."""

    code: int
    depth: int
    subject: str | None
    message: str
    crl_path: bool = False


@dataclass
class VerifyRun:
    ok: bool
    errors: list[VerifyError]
    output: str


def parse_verify_output(text: str) -> list[VerifyError]:
    """The ``error N at D depth lookup: ...`` lines, each with the subject line printed before it."""
    errors: list[VerifyError] = []
    previous: str | None = None
    for line in text.splitlines():
        m = _ERROR_LINE.match(line.strip())
        if m:
            errors.append(VerifyError(int(m.group(2)), int(m.group(3)), previous, m.group(4).strip(), bool(m.group(1))))
            previous = None
        else:
            previous = line.strip() or None
    return errors


class _Verifier:
    """Runs ``openssl verify`` on files written once into a private temporary directory.

    The command is what a TLS peer's OpenSSL does: ``-purpose sslserver|sslclient``, trust only in
    ``--ca`` (``-no-CApath -no-CAstore``; anchored at a self-signed certificate, as without
    ``-partial_chain`` in Postfix), the rest of the checked file as untrusted intermediates, and
    with ``--crl`` the CRLs of every certificate in the path (``-crl_check_all``).
    """

    def __init__(self, tmp: str, leaf: x509.Certificate, extra: Sequence[x509.Certificate],
                 anchors: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList] | None,
                 now: _dt.datetime | None) -> None:
        self.openssl = _openssl()

        def put(name: str, objs: Sequence[Any]) -> str:
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(b"".join(o.public_bytes(serialization.Encoding.PEM) for o in objs))
            return path

        self.leaf = put("leaf.pem", [leaf])
        self.base = [self.openssl, "verify", "-no-CApath", "-no-CAstore", "-CAfile", put("anchors.pem", anchors),
                     "-nameopt", "RFC2253,-esc_msb"]
        if extra:
            self.base += ["-untrusted", put("untrusted.pem", extra)]
        if now is not None:
            self.base += ["-attime", str(int(now.timestamp()))]
        self.crl_args = ["-crl_check_all", "-CRLfile", put("crls.pem", crls)] if crls else []

    def run(self, role: str, *, with_crls: bool = False, check_time: bool = True) -> VerifyRun:
        cmd = self.base + ["-purpose", _OPENSSL_PURPOSE[role]]
        if with_crls:
            cmd += self.crl_args
        if not check_time:
            cmd.append("-no_check_time")
        try:
            proc = subprocess.run(cmd + [self.leaf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise CertError("cannot run %s verify: %s" % (self.openssl, exc)) from None
        return VerifyRun(proc.returncode == 0, parse_verify_output(proc.stdout), proc.stdout)


# ----- turning OpenSSL's errors into one line per failure


class _Explainer:
    """Maps an OpenSSL error back to the certificate (and CRL) it is about, and says it plainly."""

    def __init__(self, leaf: x509.Certificate, others: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList], now: _dt.datetime | None = None) -> None:
        self.leaf = leaf
        self.by_subject: dict[str, list[x509.Certificate]] = {}
        for cert in [leaf, *others]:
            self.by_subject.setdefault(cert.subject.rfc4514_string(), []).append(cert)
        self.crls = list(crls)
        self.now = now or _now()

    def cert_for(self, err: VerifyError) -> x509.Certificate | None:
        """The certificate OpenSSL printed (``-nameopt RFC2253,-esc_msb`` = ``rfc4514_string()``).

        Of several with that subject, one whose dates fit a date error; only the wording depends
        on this choice, never the verdict.
        """
        if err.depth == 0 and not err.crl_path:
            return self.leaf
        found = self.by_subject.get(err.subject or "", [])
        fits = {9: lambda c: c.not_valid_before_utc > self.now, 10: lambda c: c.not_valid_after_utc < self.now}
        return next((c for c in found if fits.get(err.code, bool)(c)), found[0] if found else None)

    def who(self, err: VerifyError, cert: x509.Certificate | None) -> str:
        if cert is not None:
            name = cert.subject.rfc4514_string() or "(empty subject)"
        else:
            name = err.subject or "the certificate at depth %d" % err.depth
        if err.crl_path:
            return "CRL issuer certificate %s" % name
        return name if err.depth == 0 else "issuing CA %s" % name

    def crl_keyword(self, err: VerifyError) -> str:
        """OpenSSL says "unable to get certificate CRL" also when the only CRLs are narrowed by an
        issuingDistributionPoint (e.g. onlySomeReasons): that is a scope failure, named as such."""
        if err.crl_path:
            return "crl_invalid"
        cert = self.cert_for(err)
        if err.code == 3 and cert is not None and any(_crl_scope(c) for c in self.crls_from(cert.issuer)):
            return "crl_scope"
        return _CODE_KEYWORD[err.code]

    def crls_from(self, issuer: x509.Name) -> list[x509.CertificateRevocationList]:
        return [c for c in self.crls if c.issuer == issuer]

    def explain(self, keyword: str, err: VerifyError) -> str:
        """One sentence naming the certificate (or CRL) and what is wrong with it."""
        cert = self.cert_for(err)
        who = self.who(err, cert)
        issuer = cert.issuer.rfc4514_string() if cert is not None else "its issuer"
        text = None
        if keyword == "expired" and cert is not None:
            text = "%s expired on %s" % (who, _iso(cert.not_valid_after_utc))
        elif keyword == "not_yet_valid" and cert is not None:
            text = "%s is not valid before %s" % (who, _iso(cert.not_valid_before_utc))
        elif keyword == "untrusted":
            missing = "no path from %s to a trusted CA: its issuer %s is neither a trusted CA nor in the checked" \
                      " file" % (who, issuer)
            text = {
                2: missing,
                20: missing,
                18: "%s is self-signed and not a trusted CA" % who,
                19: "%s is self-signed and not a trusted CA" % who,
                7: "the signature on %s does not verify with the key of %s (forged, or another CA of that name)"
                   % (who, issuer),
            }.get(err.code)
        elif keyword == "revoked" and cert is not None:
            when = ""
            for crl in self.crls_from(cert.issuer):
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    when = " on %s" % _iso(entry.revocation_date_utc)
                    break
            text = "%s (serial %X) was revoked%s" % (who, cert.serial_number, when)
        elif keyword == "path_length":
            limit = _path_length(cert)
            text = "%s allows %s CA certificate(s) below it (pathLenConstraint) and this path has more" % (
                who, "at most %d" % limit if limit is not None else "a limited number of")
        elif keyword == "invalid_ca":
            text = "%s issues certificates but may not: %s" % (who, _ca_problem(cert))
        elif keyword == "critical_extension":
            oids = _unknown_critical(cert)
            text = "%s has a critical extension OpenSSL does not handle%s" % (
                who, " (%s)" % ", ".join(oids) if oids else "")
        elif keyword == "name_constraints":
            text = "%s (%s) is outside the name constraints of an issuing CA" % (who, _names(cert))
        elif keyword in _CRL_KEYWORDS and cert is not None:
            text = self._explain_crl(keyword, err, cert, who, issuer)
        if text is None:
            text = "%s: %s" % (who, err.message)
        return text

    def _explain_crl(self, keyword: str, err: VerifyError, cert: x509.Certificate, who: str, issuer: str) -> str | None:
        crls = self.crls_from(cert.issuer)
        if keyword == "crl_expired":
            due = [c.next_update_utc for c in crls if c.next_update_utc is not None]
            return "the CRL from %s was due for update on %s" % (issuer, _iso(min(due))) if due else None
        if keyword == "crl_not_yet_valid":
            return "the CRL from %s is not valid before %s" % (issuer, _iso(max(c.last_update_utc for c in crls))) \
                if crls else None
        if keyword == "crl_scope" or (err.code == 3 and any(_crl_scope(c) for c in crls)):
            scopes = sorted({s for c in crls for s in _crl_scope(c)})
            return "no CRL from %s covers %s: %s" % (
                issuer, who, "; ".join(scopes) or "its issuingDistributionPoint does not match")
        if err.code == 3:
            if not crls:
                return "no CRL from %s (needed for %s) in the CRL file" % (issuer, who)
            return "no usable CRL from %s for %s" % (issuer, who)
        if err.code in (5, 8):
            return "the CRL from %s has a bad signature" % issuer
        if err.code == 33:
            return "cannot find the certificate of %s, which issued the CRL for %s" % (issuer, who)
        if err.code == 35:
            return "the CRL for %s is signed by %s, whose keyUsage lacks cRLSign" % (who, issuer)
        if keyword == "crl_unsupported":
            return "the CRL from %s has a critical extension or feature OpenSSL does not handle" % issuer
        return None


def _path_length(cert: x509.Certificate | None) -> int | None:
    if cert is None:
        return None
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except (x509.ExtensionNotFound, ValueError):
        return None


def _ca_problem(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "it is not a CA certificate"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "it has no basicConstraints extension"
    except ValueError:
        return "its extensions cannot be parsed"
    if not bc.ca:
        return "basicConstraints says CA:FALSE"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return "its keyUsage lacks keyCertSign"
    except (x509.ExtensionNotFound, ValueError):
        pass
    return "it is not a valid CA certificate"


def _unknown_critical(cert: x509.Certificate | None) -> list[str]:
    if cert is None:
        return []
    try:
        return [e.oid.dotted_string for e in cert.extensions
                if e.critical and isinstance(e.value, x509.UnrecognizedExtension)]
    except ValueError:
        return []


def _names(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "its names"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(g, "value", g)) for g in san]
    except (x509.ExtensionNotFound, ValueError):
        names = ["CN " + cn for cn in _cns(cert)]
    return "names: " + (", ".join(names) if names else "none")


def usage_summary(cert: x509.Certificate | None) -> str:
    """keyUsage / extendedKeyUsage / nsCertType of ``cert`` in a few words (for ``purpose`` failures)."""
    if cert is None:
        return "unknown key usage"
    parts: list[str] = []
    try:
        exts = cert.extensions
    except ValueError:
        return "extensions cannot be parsed"
    for ext in exts:
        if isinstance(ext.value, x509.ExtendedKeyUsage):
            parts.append("extendedKeyUsage " + ",".join(_EKU_NAMES.get(o.dotted_string, o.dotted_string)
                                                        for o in ext.value))
        elif isinstance(ext.value, x509.KeyUsage):
            ku = ext.value
            flags = [rfc for attr, rfc in _KU_NAMES if getattr(ku, attr)]
            parts.append("keyUsage " + (",".join(flags) or "empty"))
        elif ext.oid == _NS_CERT_TYPE:
            parts.append("Netscape cert type restricted")
    return "; ".join(parts) or "no keyUsage/extendedKeyUsage"


def _crl_scope(crl: x509.CertificateRevocationList) -> list[str]:
    """What an issuingDistributionPoint narrows a CRL to, in words ([] = a full CRL)."""
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    out = []
    if idp.only_contains_ca_certs:
        out.append("it covers only CA certificates (onlyContainsCACerts)")
    if idp.only_contains_user_certs:
        out.append("it covers only end-entity certificates (onlyContainsUserCerts)")
    if idp.only_contains_attribute_certs:
        out.append("it covers only attribute certificates (onlyContainsAttributeCerts)")
    if idp.only_some_reasons:
        out.append("it covers only some reasons (onlySomeReasons: %s)"
                   % ",".join(sorted(r.value for r in idp.only_some_reasons)))
    if idp.full_name or idp.relative_name:
        out.append("it is partitioned by distribution point")
    return out


def _crl_precheck(crls: Sequence[x509.CertificateRevocationList]) -> tuple[list[Failure], set[x509.Name]]:
    """Delta and indirect CRLs, refused outright (a deliberate choice, stricter than OpenSSL).

    OpenSSL 3.0 treats a delta CRL without its base as complete and ignores the revocations a
    delta adds to a base (even with ``-use_deltas``), and uses an indirect CRL only with
    ``-extended_crl``: either way "not revoked" would not be established.  Returns the failures
    and the issuers concerned (so OpenSSL's "no CRL" for them is not reported a second time).
    """
    failures: list[Failure] = []
    issuers: set[x509.Name] = set()
    for crl in crls:
        who = crl.issuer.rfc4514_string() or "(empty issuer)"
        try:
            exts = crl.extensions
        except ValueError as exc:
            failures.append(("crl_invalid", "the CRL from %s has unreadable extensions: %s" % (who, exc)))
            issuers.add(crl.issuer)
            continue
        for ext in exts:
            if isinstance(ext.value, x509.DeltaCRLIndicator):
                failures.append(("crl_unsupported", "the CRL from %s is a delta CRL (base CRL number %d): not"
                                 " supported, since OpenSSL ignores what it revokes; give the complete CRL"
                                 % (who, ext.value.crl_number)))
                issuers.add(crl.issuer)
            elif isinstance(ext.value, x509.IssuingDistributionPoint) and ext.value.indirect_crl:
                failures.append(("crl_unsupported", "the CRL from %s is an indirect CRL: not supported; give"
                                 " a CRL issued by the certificate's own CA" % who))
                issuers.add(crl.issuer)
    return failures, issuers


def check_certificate(
    leaf: x509.Certificate,
    extra: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] | None = None,
    name: str | None = None,
    now: _dt.datetime | None = None,
    purpose: str = "both",
) -> list[Failure]:
    """Every reason ``leaf`` is not acceptable, as (keyword, detail) pairs; [] means OK.

    The chain is judged by OpenSSL itself (``openssl verify``, the library Postfix and most
    partners use), once per role in ``purpose``; ``[]`` is returned only if every run succeeded.
    ``crls``: None = no revocation check; [] = a CRL file was given but nothing in it parsed.
    """
    if purpose not in PURPOSES:
        raise CertError("--purpose %r: use server, client or both" % purpose)
    failures: list[Failure] = []
    if not anchors:
        failures.append(("untrusted", "no trusted CA certificates (give --ca)"))
    else:
        failures.extend(_verify(leaf, extra, anchors, crls, now, PURPOSES[purpose]))
    if crls is not None and not crls:
        failures.append(("crl_invalid", "the CRL file holds no readable CRL"))
    elif crls is not None and not anchors:
        failures.append(("crl_invalid", "revocation not checked: no trusted CA to verify the CRLs with"))
    if name is not None:
        failures.extend(_check_name(leaf, name))
    return failures


def _verify(leaf: x509.Certificate, extra: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
            crls: Sequence[x509.CertificateRevocationList] | None, now: _dt.datetime | None,
            roles: Sequence[str]) -> list[Failure]:
    explainer = _Explainer(leaf, [*extra, *anchors], crls or [], now)
    # (keyword, error, role); purpose errors are merged across roles below.
    found: list[tuple[str, VerifyError, str]] = []
    failed_runs: list[str] = []  # last output line of every run that did not say OK
    crl_failures: list[Failure] = []
    skip_crl_issuers: set[x509.Name] = set()
    with tempfile.TemporaryDirectory(prefix="milterd-cert-check-") as tmp:
        verifier = _Verifier(tmp, leaf, extra, anchors, crls, now)
        for role in roles:
            run = verifier.run(role)
            found.extend((_CODE_KEYWORD.get(e.code, "refused"), e, role) for e in run.errors)
            if any(e.code == 9 for e in run.errors):
                # "not yet valid" stops OpenSSL before the later checks (e.g. name constraints):
                # run again without time checks to report those too.
                found.extend((_CODE_KEYWORD.get(e.code, "refused"), e, role)
                             for e in verifier.run(role, check_time=False).errors if e.code not in _TIME_CODES)
            if not run.ok:
                failed_runs.append(_last_line(run.output))
        if crls:
            crl_failures, skip_crl_issuers = _crl_precheck(crls)
            run = verifier.run(roles[0], with_crls=True)
            crl_errors = [e for e in run.errors if e.crl_path or _CODE_KEYWORD.get(e.code) in _CRL_KEYWORDS]
            for e in crl_errors:
                cert = explainer.cert_for(e)
                if e.code == 3 and cert is not None and cert.issuer in skip_crl_issuers:
                    continue  # already refused as a delta / indirect CRL
                found.append((explainer.crl_keyword(e), e, roles[0]))
            if not crl_errors and any(e.code in _PATH_BUILDING_CODES for e in run.errors):
                crl_failures.append(("crl_invalid", "revocation not checked: the CRLs cannot be verified"
                                     " without a trusted path"))
            if not run.ok:
                failed_runs.append(_last_line(run.output))
    failures = _merge(found, explainer) + crl_failures
    if not failures:  # never OK when a run failed, even if nothing in its output could be read
        failures = [("refused", "openssl verify refused it: %s" % r) for r in dict.fromkeys(failed_runs)]
    return failures


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _merge(found: list[tuple[str, VerifyError, str]], explainer: _Explainer) -> list[Failure]:
    """One line per failure.

    The same failure seen in several runs, or as several OpenSSL errors about the same thing
    (``invalid CA`` and ``no keyCertSign`` for one CA; one stale CRL met at two depths), is one
    line ending in every OpenSSL error behind it; a purpose failure names every role it breaks.
    """

    def key(e: VerifyError) -> tuple[int, str | None, bool]:
        return e.depth, e.subject, e.crl_path

    not_ca = {key(e) for kw, e, _ in found if kw == "invalid_ca"}
    roles: dict[tuple[int, str | None, bool], list[str]] = {}
    for kw, e, role in found:
        if kw == "purpose" and role not in roles.setdefault(key(e), []):
            roles[key(e)].append(role)
    lines: dict[tuple[str, str], list[str]] = {}
    for kw, e, _ in found:
        if kw == "purpose":
            if key(e) in not_ca:
                continue  # "not a CA" already says why it cannot issue for any purpose
            cert = explainer.cert_for(e)
            who = explainer.who(e, cert)
            what = " or ".join(_ROLE_TEXT[r] for r in roles[key(e)])
            if e.depth == 0:
                detail = "%s is not usable as a %s certificate (%s)" % (who, what, usage_summary(cert))
            else:
                detail = "%s may not issue %s certificates (%s)" % (who, what, usage_summary(cert))
        else:
            detail = explainer.explain(kw, e)
        notes = lines.setdefault((kw, detail), [])
        note = "%d: %s" % (e.code, e.message)
        if note not in notes:
            notes.append(note)
    return [(kw, "%s [OpenSSL %s]" % (detail, "; ".join(notes))) for (kw, detail), notes in lines.items()]


def _check_name(leaf: x509.Certificate, name: str) -> list[Failure]:
    """RFC 9525: DNS SANs only; the CN is consulted only when there are no DNS SANs."""
    sans = dns_sans(leaf)
    if sans:
        if any(name_matches(s, name) for s in sans):
            return []
        return [("name_mismatch", "%s is not among the SANs: %s" % (name, ", ".join(sans)))]
    cns = _cns(leaf)
    if len(cns) == 1 and name_matches(cns[0], name):
        return []
    return [("name_mismatch", "%s does not match (no DNS SANs; CN %s)" % (name, ", ".join(cns) or "absent"))]


def cmd_check(args: argparse.Namespace) -> int:
    """Check one certificate as a TLS peer's OpenSSL would; list every failure with its keyword."""
    name = None
    if args.name is not None:
        name = normalize_dns_name(args.name)
        if name is None:
            raise CertError("--name %r is not a valid DNS name" % args.name)
    certs = _load_cert_file(args.cert)
    anchors = _load_cert_file(args.ca, "CA file") if args.ca else _default_anchors()
    crls = _load_crls(args.crl) if args.crl else None
    failures = check_certificate(certs[0], certs[1:], anchors, crls, name, purpose=args.purpose)
    if not failures:
        print("OK")
        return 0
    for keyword, detail in failures:
        print("%s: %s" % (keyword, detail))
    return 1


# --------------------------------------------------------------------------- expiry (daemon)


def certificate_expiry(paths: Iterable[str]) -> list[tuple[str, str, float]]:
    """(path, subject RFC 4514, not-after unix time) for every certificate in each PEM file.

    For the gauge ``milterd_certificate_expiry_timestamp_seconds{path,subject}``; chain files
    yield one row per certificate, since an expiring intermediate breaks the chain too.
    Unreadable files are skipped with a warning so one bad path does not hide the others.
    """
    out: list[tuple[str, str, float]] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            certs = load_certificates(data)
        except (OSError, ValueError) as exc:
            log.warning("cannot read certificate file %s: %s", path, exc)
            continue
        for cert in certs:
            out.append((path, cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp()))
    return out


# --------------------------------------------------------------------------- argparse wiring


def _runner(func: Callable[[argparse.Namespace], int], label: str) -> Callable[[argparse.Namespace], int]:
    """Turn CertError into a one-line message and its exit code (no tracebacks for user errors)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CertError as exc:
            print("milterd cert %s: %s" % (label, exc), file=sys.stderr)
            return exc.code

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``cert request|import|list|check`` to the main CLI's sub-command parsers."""
    cert = subparsers.add_parser(
        "cert", help="certificate tooling",
        description="Certificate tooling for Domain Security: request, import, list, check.")
    sub = cert.add_subparsers(dest="cert_command", metavar="{request,import,list,check}")
    sub.required = True

    p = sub.add_parser("request", help="make a private key and a PKCS#10 certificate request")
    p.add_argument("--subject", required=True, help='RFC 4514, e.g. "CN=mail1.contoso.com,O=Contoso,DC=contoso,DC=com"')
    p.add_argument("--san", action="append", default=[], metavar="DNSNAME", help="subject alternative name (repeat)")
    p.add_argument("--key", default="rsa:3072", help="rsa:2048|rsa:3072|rsa:4096|ec:p256|ec:p384|ec:p521 (default rsa:3072)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for NAME.key (0600) and NAME.csr")
    p.set_defaults(func=_runner(cmd_request, "request"))

    p = sub.add_parser("import", help="install a PKCS#12 (.pfx) key and chain into the store")
    p.add_argument("file", metavar="FILE.pfx")
    p.add_argument("--password-file", metavar="F", help="file whose first line is the PKCS#12 password")
    p.add_argument("--store", required=True, metavar="DIR")
    p.set_defaults(func=_runner(cmd_import, "import"))

    p = sub.add_parser("list", help="show installed certificates, fingerprints and expiry")
    p.add_argument("--store", metavar="DIR", help="default $MILTERD_CERT_STORE or %s" % DEFAULT_STORE)
    p.add_argument("-c", "--config", metavar="CONFIG", help="TOML config: report which keys use each file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_runner(cmd_list, "list"))

    p = sub.add_parser("check", help="verify a certificate the way a TLS peer's OpenSSL does")
    p.add_argument("cert", metavar="CERT", help="PEM file: the certificate, optionally followed by intermediates")
    p.add_argument("--ca", metavar="FILE", help="trusted CA certificates (default: the system bundle)")
    p.add_argument("--crl", metavar="FILE", help="CRL(s), PEM or DER")
    p.add_argument("--name", metavar="HOST", help="host name the certificate must match")
    p.add_argument("--purpose", choices=sorted(PURPOSES), default="both",
                   help="the TLS role(s) the certificate must be usable for (default both: an MTA"
                        " certificate serves inbound TLS and is the client certificate outbound)")
    p.set_defaults(func=_runner(cmd_check, "check"))
