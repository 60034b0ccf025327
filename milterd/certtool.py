"""``milterd cert request|import|list|check`` — certificate tooling for Domain Security.

Domain Security only works if both ends hold certificates that chain to a trusted CA, name the
host, and are not expired or revoked; these commands make the routine steps (make a request,
install what the CA returned, see what is installed and when it expires, check one certificate
the way a peer would) safe and scriptable.  Built on the ``cryptography`` package only.

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
* ``check`` builds the chain itself (not with ``cryptography.x509.verification``) so it can list
  *every* failure with its own stable keyword: ``untrusted``, ``expired``, ``not_yet_valid``,
  ``revoked``, ``name_mismatch``, ``crl_invalid``, ``crl_expired``.  Every certificate in
  ``--ca`` is a trust anchor (like ``openssl verify -CAfile -partial_chain``), including a
  self-signed end-entity certificate listed there itself; without ``--ca`` the system bundle is used.  Extra certificates after the leaf in the checked file serve as intermediates.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import ssl
import sys
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

from milterd import dn as _dn
from milterd.names import name_matches, normalize_dns_name

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
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CertError("cannot create directory %s: %s" % (path, exc.strerror or exc)) from None
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


def _is_ca(cert: x509.Certificate, anchor: bool) -> bool:
    """May ``cert`` issue certificates?  An anchor without basicConstraints (v1 root) may."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return anchor
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:  # InvalidSignature, mismatched names, unsupported algorithms: not issued
        return False


def build_chain(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate] | None:
    """A verified path leaf -> ... -> anchor (signatures and CA flags), or None.

    Depth-first so that a wrong same-named candidate does not hide a right one.
    """

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        cur = path[-1]
        if cur in anchors:  # the very certificate is trusted (e.g. a self-signed peer cert)
            return path
        for anchor in anchors:
            if anchor.subject == cur.issuer and _is_ca(anchor, True) and _issued_by(cur, anchor):
                return path if anchor == cur else path + [anchor]
        if len(path) >= _MAX_CHAIN:
            return None
        for cand in intermediates:
            if cand in path or cand.subject != cur.issuer:
                continue
            if _is_ca(cand, False) and _issued_by(cur, cand):
                found = extend(path + [cand])
                if found:
                    return found
        return None

    return extend([leaf])


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


def check_certificate(
    leaf: x509.Certificate,
    extra: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] | None = None,
    name: str | None = None,
    now: _dt.datetime | None = None,
) -> list[Failure]:
    """Every reason ``leaf`` is not acceptable, as (keyword, detail) pairs; [] means OK.

    ``crls``: None = no revocation check; [] = a CRL file was given but nothing in it parsed.
    """
    now = now or _now()
    failures: list[Failure] = []
    subj = leaf.subject.rfc4514_string() or "(empty subject)"
    if leaf.not_valid_after_utc < now:
        failures.append(("expired", "%s expired on %s" % (subj, _iso(leaf.not_valid_after_utc))))
    if leaf.not_valid_before_utc > now:
        failures.append(("not_yet_valid", "%s is not valid before %s" % (subj, _iso(leaf.not_valid_before_utc))))
    chain: list[x509.Certificate] | None = None
    if not anchors:
        failures.append(("untrusted", "no trusted CA certificates (give --ca)"))
    else:
        pool = list(extra) + [a for a in anchors]
        chain = build_chain(leaf, pool, anchors)
        if chain is None:
            failures.append(("untrusted", "no verified path from %s to a trusted CA (issuer %s)"
                             % (subj, leaf.issuer.rfc4514_string())))
        else:
            for ca in chain[1:]:
                ca_subj = ca.subject.rfc4514_string()
                if ca.not_valid_after_utc < now:
                    failures.append(("expired", "issuing CA %s expired on %s" % (ca_subj, _iso(ca.not_valid_after_utc))))
                if ca.not_valid_before_utc > now:
                    failures.append(("not_yet_valid", "issuing CA %s is not valid before %s"
                                     % (ca_subj, _iso(ca.not_valid_before_utc))))
    if crls is not None:
        failures.extend(_check_revocation(leaf, chain, list(extra) + list(anchors), crls, now))
    if name is not None:
        failures.extend(_check_name(leaf, name))
    return failures


def _check_revocation(
    leaf: x509.Certificate,
    chain: list[x509.Certificate] | None,
    known: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: _dt.datetime,
) -> list[Failure]:
    """Revocation of every non-anchor certificate in the path against CRLs from its issuer.

    The leaf's issuer must have a valid CRL in the file (else ``crl_invalid``): an unusable CRL
    is a failure, not a pass.  A CRL is believed only if its signature verifies with the issuer key.
    """
    if not crls:
        return [("crl_invalid", "the CRL file holds no readable CRL")]
    failures: list[Failure] = []
    subjects = chain[:-1] if chain and len(chain) > 1 else [leaf]
    for idx, cert in enumerate(subjects):
        issuer_cert = chain[idx + 1] if chain and len(chain) > idx + 1 else next(
            (c for c in known if c.subject == cert.issuer and _issued_by(cert, c)), None)
        candidates = [c for c in crls if c.issuer == cert.issuer]
        if not candidates:
            if cert is leaf:
                failures.append(("crl_invalid", "no CRL from the issuer %s in the CRL file" % cert.issuer.rfc4514_string()))
            continue
        good = []
        for crl in candidates:
            if issuer_cert is None:
                failures.append(("crl_invalid", "cannot verify the CRL from %s: issuer certificate not found"
                                 % crl.issuer.rfc4514_string()))
            elif not crl.is_signature_valid(issuer_cert.public_key()):  # type: ignore[arg-type]
                failures.append(("crl_invalid", "the CRL from %s has a bad signature" % crl.issuer.rfc4514_string()))
            else:
                good.append(crl)
        for crl in good:
            nu = crl.next_update_utc
            if nu is not None and nu < now:
                failures.append(("crl_expired", "the CRL from %s was due for update on %s"
                                 % (crl.issuer.rfc4514_string(), _iso(nu))))
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                failures.append(("revoked", "%s (serial %X) was revoked on %s"
                                 % (cert.subject.rfc4514_string(), cert.serial_number,
                                    _iso(entry.revocation_date_utc))))
                break
    return failures


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
    """Check one certificate as a peer would; list every failure with its keyword."""
    name = None
    if args.name is not None:
        name = normalize_dns_name(args.name)
        if name is None:
            raise CertError("--name %r is not a valid DNS name" % args.name)
    certs = _load_cert_file(args.cert)
    anchors = _load_cert_file(args.ca, "CA file") if args.ca else _default_anchors()
    crls = _load_crls(args.crl) if args.crl else None
    failures = check_certificate(certs[0], certs[1:], anchors, crls, name)
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

    p = sub.add_parser("check", help="verify chain, dates, revocation and name of a certificate")
    p.add_argument("cert", metavar="CERT", help="PEM file: the certificate, optionally followed by intermediates")
    p.add_argument("--ca", metavar="FILE", help="trusted CA certificates (default: the system bundle)")
    p.add_argument("--crl", metavar="FILE", help="CRL(s), PEM or DER")
    p.add_argument("--name", metavar="HOST", help="host name the certificate must match")
    p.set_defaults(func=_runner(cmd_check, "check"))
