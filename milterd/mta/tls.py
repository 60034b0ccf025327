"""TLS for the reference MTA: contexts, certificate facts, Sendmail-style macros.

The client-certificate problem, and the choice made here
--------------------------------------------------------
Sendmail requests a client certificate, completes the handshake whatever the
certificate is, and reports the outcome in ``{verify}`` (``OK`` / ``FAIL`` /
``NO``). The milter — not the MTA — refuses an untrusted certificate. Python's
``ssl`` cannot do that on its own: with ``CERT_OPTIONAL`` OpenSSL aborts the
handshake on an unverifiable certificate, ``CERT_NONE`` never asks for one, and
the stdlib exposes no verify callback.

What we do: ``CERT_OPTIONAL`` (so a CertificateRequest is sent) plus an
OpenSSL verify callback that returns 1, installed with ``ctypes`` on the
context's ``SSL_CTX`` (CPython keeps an existing callback when verify_mode is
set again). OpenSSL still checks that the client owns the key
(CertificateVerify); only the *chain* decision is moved to Python, where
:func:`verify_chain` checks the DER certificate from
``getpeercert(binary_form=True)`` against the configured CAs with
``cryptography.x509.verification``. The pointer is sanity-checked (the
verify mode read back through it must follow ``verify_mode`` changes) before
anything is written through it; if that fails we fall back to OpenSSL's own
verification (untrusted certificates then fail the handshake, like Postfix
with ``smtpd_tls_req_ccert``) and log a warning once. pyOpenSSL would offer a
real callback API but is not a dependency.

Outbound (client side) uses the same idea without ctypes: ``CERT_NONE`` at the
TLS layer, then chain and name are checked in Python, so the failure reason
(``untrusted_cert`` vs ``name_mismatch``) is known and the certificate can be
logged either way. Nothing is sent before the check passes.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (ExtensionPolicy, PolicyBuilder, Store,
                                            VerificationError)

from milterd.certs.common import pubkey_sha256_fingerprint
from milterd.inbound.tlsfacts import PUBKEY_MACRO
from milterd.policy.names import name_covers_domain

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- OpenSSL verify callback

_VERIFY_CB_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept_any(preverify_ok: int, store_ctx: Optional[int]) -> int:  # pragma: no cover - C calls it
    return 1


_ACCEPT_ANY = _VERIFY_CB_TYPE(_accept_any)  # module-level: must outlive every context
_warned_fallback = False


def _libssl() -> Optional[ctypes.CDLL]:
    try:
        import _ssl
        lib = ctypes.CDLL(_ssl.__file__)  # dlsym also searches its libssl dependency
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_set_verify.restype = None
        lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CB_TYPE]
        return lib
    except (OSError, AttributeError):
        return None


def _ssl_ctx_pointer(context: ssl.SSLContext, lib: ctypes.CDLL) -> Optional[int]:
    """The ``SSL_CTX *`` right after PyObject_HEAD in CPython's PySSLContext,
    validated by watching it follow verify_mode changes."""
    offset = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
    ptr = ctypes.c_void_p.from_address(id(context) + offset).value
    if not ptr:
        return None
    saved = context.verify_mode
    try:
        context.verify_mode = ssl.CERT_REQUIRED
        if lib.SSL_CTX_get_verify_mode(ptr) != 3:  # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT
            return None
        context.verify_mode = ssl.CERT_OPTIONAL
        if lib.SSL_CTX_get_verify_mode(ptr) != 1:  # SSL_VERIFY_PEER
            return None
    finally:
        context.verify_mode = saved
    return ptr


def accept_any_client_cert(context: ssl.SSLContext) -> bool:
    """Request a client certificate and let the handshake succeed whatever it is.

    Returns False (and leaves OpenSSL verification on) when the ctypes hook
    cannot be installed safely on this Python build.
    """
    global _warned_fallback
    context.verify_mode = ssl.CERT_OPTIONAL
    lib = _libssl()
    ptr = _ssl_ctx_pointer(context, lib) if lib is not None else None
    if lib is None or ptr is None:
        if not _warned_fallback:
            log.warning("cannot install the TLS verify callback; untrusted client "
                        "certificates will fail the handshake")
            _warned_fallback = True
        return False
    lib.SSL_CTX_set_verify(ptr, 1, _ACCEPT_ANY)
    return True


# ---------------------------------------------------------------------- contexts


def load_ca_certs(paths: Sequence[Path]) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for p in paths:
        certs.extend(x509.load_pem_x509_certificates(Path(p).read_bytes()))
    return certs


def server_context(cert_file: Path, key_file: Path, *, request_client_cert: bool = True,
                   ca_files: Sequence[Path] = ()) -> ssl.SSLContext:
    """Server-side context for STARTTLS; see the module docstring for client certs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if request_client_cert:
        for ca in ca_files:
            ctx.load_verify_locations(cafile=str(ca))  # used only by the fallback path
        accept_any_client_cert(ctx)
    return ctx


def client_context(cert_file: Optional[Path] = None,
                   key_file: Optional[Path] = None) -> ssl.SSLContext:
    """Outbound context: presents our certificate, verifies nothing at the TLS
    layer (done in Python afterwards so the reason is known)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# ---------------------------------------------------------------------- verification


def verify_chain(leaf: x509.Certificate, cas: Sequence[x509.Certificate], *,
                 now: Optional[dt.datetime] = None) -> tuple[bool, str]:
    """Chain check against ``cas`` (roots; non-self-issued ones also serve as
    intermediates). Returns (ok, short reason in OpenSSL's words)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if leaf.not_valid_after_utc < now:
        return False, "certificate has expired"
    if leaf.not_valid_before_utc > now:
        return False, "certificate is not yet valid"
    if not cas:
        return False, "no trusted CAs configured"
    roots = [c for c in cas if c.issuer == c.subject]
    inter = [c for c in cas if c.issuer != c.subject]
    try:
        verifier = (PolicyBuilder().store(Store(roots or list(cas))).time(now)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        verifier.verify(leaf, inter)
    except VerificationError as exc:
        log.debug("chain verification failed: %s", exc)
        if leaf.issuer == leaf.subject:
            return False, "self-signed certificate"
        return False, "unable to verify the certificate chain"
    return True, "ok"


# ---------------------------------------------------------------------- facts


_SHORT = {
    NameOID.COUNTRY_NAME: "C", NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O", NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN", NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "DC", NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.USER_ID: "UID", NameOID.GIVEN_NAME: "GN", NameOID.SURNAME: "SN",
    NameOID.TITLE: "title",
}


def _attr_name(oid: x509.ObjectIdentifier) -> str:
    return _SHORT.get(oid, oid.dotted_string)


def openssl_oneline(name: x509.Name) -> str:
    """``X509_NAME_oneline`` form (DER order): ``/O=Lab/CN=mail.example``."""
    parts = []
    for rdn in name.rdns:
        parts.append("+".join("%s=%s" % (_attr_name(a.oid), a.value) for a in rdn))
    return "".join("/" + p for p in parts)


def exchange_dn(name: x509.Name) -> str:
    """The reverse, comma-separated form Exchange's protocol log prints."""
    parts = []
    for rdn in reversed(name.rdns):
        parts.append("+".join("%s=%s" % (_attr_name(a.oid), a.value) for a in rdn))
    return ", ".join(parts)


def common_name(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[-1].value) if cns else ""


def xtext(value: str) -> str:
    """Sendmail's ``xtextify(s, "<>\\")")``: ``+HH`` for controls, space, 8-bit,
    ``+`` and ``<>")``; ``;`` and ``=`` stay as they are."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if byte <= 0x20 or byte >= 0x7F or ch in '+<>")':
            out.append("+%02X" % byte)
        else:
            out.append(ch)
    return "".join(out)


def colon_hex(digest: bytes) -> str:
    return ":".join("%02X" % b for b in digest)


@dataclass(frozen=True)
class CertFacts:
    """Everything we report about one certificate."""

    subject: str          # OpenSSL one-line form
    issuer: str
    subject_cn: str
    issuer_cn: str
    serial: str           # upper-case hex
    sha256: str           # upper-case hex with colons
    sha1: str             # upper-case hex, no colons (Exchange "thumbprint")
    pubkey_sha256: str    # SHA-256 of the SubjectPublicKeyInfo, upper-case hex with colons
    dns_names: tuple[str, ...]
    subject_exchange: str
    issuer_exchange: str
    not_after: str

    @classmethod
    def from_der(cls, der: bytes) -> "CertFacts":
        cert = x509.load_der_x509_certificate(der)
        return cls.from_cert(cert, der)

    @classmethod
    def from_cert(cls, cert: x509.Certificate, der: Optional[bytes] = None) -> "CertFacts":
        from cryptography.hazmat.primitives.serialization import Encoding
        der = der or cert.public_bytes(Encoding.DER)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            dns = ()
        issuer_cn = common_name(cert.issuer)
        if not issuer_cn:
            orgs = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            issuer_cn = str(orgs[-1].value) if orgs else ""
        return cls(
            subject=openssl_oneline(cert.subject), issuer=openssl_oneline(cert.issuer),
            subject_cn=common_name(cert.subject), issuer_cn=issuer_cn,
            serial="%X" % cert.serial_number,
            sha256=colon_hex(hashlib.sha256(der).digest()),
            sha1=hashlib.sha1(der).hexdigest().upper(),
            pubkey_sha256=pubkey_sha256_fingerprint(cert),
            dns_names=dns, subject_exchange=exchange_dn(cert.subject),
            issuer_exchange=exchange_dn(cert.issuer),
            not_after=cert.not_valid_after_utc.isoformat(),
        )


@dataclass(frozen=True)
class TlsHandshakeFacts:
    """The TLS facts of one session (inbound or outbound)."""

    version: str
    cipher: str
    bits: int
    peer_cert: Optional[CertFacts] = None
    verified: bool = False
    verify_reason: str = "no certificate"
    local_cert: Optional[CertFacts] = None
    peer_cert_obj: Optional[x509.Certificate] = field(default=None, compare=False, repr=False)

    @property
    def verify_macro(self) -> str:
        """Sendmail's ``{verify}``: OK, FAIL or NO."""
        if self.peer_cert is None:
            return "NO"
        return "OK" if self.verified else "FAIL"

    def sendmail_macros(self) -> dict[str, str]:
        """The Sendmail dialect of TLS macros (present only after STARTTLS)."""
        c = self.peer_cert
        return {
            "{tls_version}": self.version,
            "{cipher}": self.cipher,
            "{cipher_bits}": str(self.bits),
            "{verify}": self.verify_macro,
            "{cert_subject}": xtext(c.subject) if c else "",
            "{cert_issuer}": xtext(c.issuer) if c else "",
            "{cn_subject}": xtext(c.subject_cn) if c else "",
            "{cn_issuer}": xtext(c.issuer_cn) if c else "",
            "{cert_fp}": c.sha256 if c else "",
            # Not a Sendmail macro: milterd's key pins (Sendmail itself cannot give them).
            PUBKEY_MACRO: c.pubkey_sha256 if c else "",
        }


def facts_from_ssl(sslobj: ssl.SSLObject | ssl.SSLSocket, cas: Sequence[x509.Certificate],
                   local_cert: Optional[CertFacts] = None) -> TlsHandshakeFacts:
    """Collect facts after a completed handshake and verify the peer's chain."""
    cipher = sslobj.cipher() or ("", "", 0)
    version = sslobj.version() or ""
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return TlsHandshakeFacts(version, cipher[0], int(cipher[2] or 0), None, False,
                                 "no certificate", local_cert)
    cert = x509.load_der_x509_certificate(der)
    ok, reason = verify_chain(cert, cas)
    return TlsHandshakeFacts(version, cipher[0], int(cipher[2] or 0),
                             CertFacts.from_cert(cert, der), ok, reason, local_cert, cert)


def local_cert_facts(cert_file: Path) -> CertFacts:
    return CertFacts.from_cert(x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[0])


# ---------------------------------------------------------------------- name check


def cert_names(cert: CertFacts) -> tuple[str, ...]:
    """DNS SANs, or the CN when there are none (RFC 6125 fallback)."""
    return cert.dns_names or ((cert.subject_cn,) if cert.subject_cn else ())


def cert_covers_domain(cert: CertFacts, domain: str) -> bool:
    """Does a certificate name cover ``domain`` (the domain or a host under it)?  The rules are
    milterd's own (:func:`milterd.policy.names.name_covers_domain`), so the reference MTA decides
    as milterd does."""
    return any(name_covers_domain(n, domain) for n in cert_names(cert))
