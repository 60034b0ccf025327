"""Normalise the MTA's TLS macros into one :class:`~milterd.session.TlsFacts` value.

Two dialects reach a milter (see shared/notes):

* **Postfix** sends ``{tls_version} {cipher} {cipher_bits}`` for any TLS session and
  ``{cert_subject} {cert_issuer}`` *only when the client certificate's chain was trusted*; the
  subject is the CN alone.  It never sends ``{verify}`` or a fingerprint, so "no cert" and
  "untrusted cert" look the same: verify is ``UNKNOWN`` unless the policy-delegation view
  (which carries ``ccert_fingerprint`` for any certificate) says more — see :func:`merge_policy_facts`.
* **Sendmail** sends ``{verify}`` (only ``OK``/``TRUSTED`` mean verified), xtext-encoded one-line
  DNs in ``{cert_subject}``/``{cert_issuer}``, the CN in ``{cn_subject}``, and ``{cert_fp}``
  (digest per ``CertFingerprintAlgorithm``) or ``{cert_md5}``.

The dialect is recognised by ``{verify}``: only Sendmail sends it.  Malformed values never raise;
they become ``None`` and a warning is returned to the caller for the log.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping

from milterd.core.config import normalize_fingerprint
from milterd.policy.dn import subject_cn, xtext_decode
from milterd.session import PLAINTEXT, CertVerify, TlsFacts

#: The SHA-256 of the client certificate's SubjectPublicKeyInfo, for key pins.  Sent by milterd's
#: reference MTA (Sendmail dialect); Sendmail itself has no such macro, so with Sendmail a key
#: pin never matches (fail closed) and only certificate pins ({cert_fp}) work.
PUBKEY_MACRO = "{cert_pubkey_fp}"

# The macros milterd asks the MTA for, per stage.  Postfix ignores names it does not know.
TLS_MACROS = ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}",
              "{verify}", "{cn_subject}", "{cert_fp}", "{cert_md5}", PUBKEY_MACRO)

_SENDMAIL_VERIFIED = {"OK", "TRUSTED"}
_SENDMAIL_NO_CERT = {"NO", "NONE", "NOT", "CLEAR"}
_VERSION = re.compile(r"TLSv1(\.[0-3])?|SSLv3")
_BITS = re.compile(r"[0-9]{1,5}")  # ASCII digits only: "²".isdigit() is true and int() raises
_MAX_MACRO = 4096  # a longer macro value is truncated; certificates do not have 4 KiB names


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > _MAX_MACRO:
        value = value[:_MAX_MACRO]
    return value


def from_macros(macros: Mapping[str, str | None]) -> tuple[TlsFacts, list[str]]:
    """Build TLS facts from macro values (absent macros missing or None).

    Returns the facts and a list of warnings about malformed values (for the log).
    """
    warnings: list[str] = []
    version = _clean(macros.get("{tls_version}"))
    verify_raw = _clean(macros.get("{verify}"))
    if not version:
        # No TLS.  Sendmail says {verify}=NO/CLEAR without STARTTLS only in odd set-ups; the
        # session is unencrypted either way.
        return PLAINTEXT, warnings
    if not _VERSION.fullmatch(version):
        warnings.append(f"unexpected {{tls_version}} {version!r}")
    cipher = _clean(macros.get("{cipher}")) or None
    bits: int | None = None
    bits_raw = macros.get("{cipher_bits}")
    if bits_raw:
        if _BITS.fullmatch(bits_raw):
            bits = int(bits_raw)
        else:
            warnings.append(f"malformed {{cipher_bits}} {bits_raw[:40]!r}")

    subject = _clean(macros.get("{cert_subject}"))
    issuer = _clean(macros.get("{cert_issuer}"))
    if verify_raw is not None:
        return _sendmail(version, cipher, bits, verify_raw, subject, issuer, macros, warnings)
    # Postfix: certificate macros are present exactly when the chain was trusted.
    if subject is not None:
        cn = subject or None  # present-but-empty: trusted cert without a CN (SAN only)
        if cn is not None and not _plausible_name(cn):
            warnings.append(f"unusual certificate CN {cn[:80]!r}")
        return TlsFacts(version=version, cipher=cipher, bits=bits, verify=CertVerify.OK,
                        subject_cn=cn, issuer=issuer or None, dialect="postfix"), warnings
    return TlsFacts(version=version, cipher=cipher, bits=bits, verify=CertVerify.UNKNOWN,
                    dialect="postfix"), warnings


def _sendmail(version: str, cipher: str | None, bits: int | None, verify_raw: str,
              subject: str | None, issuer: str | None, macros: Mapping[str, str | None],
              warnings: list[str]) -> tuple[TlsFacts, list[str]]:
    v = verify_raw.strip().upper()
    if v in _SENDMAIL_VERIFIED:
        verify = CertVerify.OK
    elif v in _SENDMAIL_NO_CERT:
        verify = CertVerify.NONE
    else:  # FAIL, TEMP, PROTOCOL, CONFIG, SOFTWARE, DANE_*: anything else is not verified
        verify = CertVerify.FAIL
    subject_dn = xtext_decode(subject) if subject else None
    issuer_dn = xtext_decode(issuer) if issuer else None
    cn_macro = _clean(macros.get("{cn_subject}"))
    cn = xtext_decode(cn_macro) if cn_macro else None
    if subject_dn:
        # The DN must agree: a value that smuggles "/CN=" (in the CN or in another attribute)
        # makes the one-line DN ambiguous, and an ambiguous name is no name.  When Sendmail sent
        # {cn_subject} at all (even empty), it is authoritative: never fall back to reading a CN
        # out of the DN the peer composed.
        dn_cn = subject_cn(subject_dn)
        if cn_macro is not None:
            if cn is not None and dn_cn != cn:
                warnings.append(f"ambiguous certificate subject {subject_dn[:120]!r}")
                cn = None
        else:
            cn = dn_cn
    fp_raw = _clean(macros.get("{cert_fp}"))
    md5 = _clean(macros.get("{cert_md5}"))
    fp256 = normalize_fingerprint(fp_raw) if fp_raw else None
    key_raw = _clean(macros.get(PUBKEY_MACRO))
    key256 = normalize_fingerprint(key_raw) if key_raw else None
    if key_raw and key256 is None:
        warnings.append(f"malformed {PUBKEY_MACRO} {key_raw[:80]!r}")
    other = None
    if fp_raw and fp256 is None:
        other = fp_raw  # SHA-1 or MD5 per CertFingerprintAlgorithm: display only
    if md5:
        other = md5
    if verify is CertVerify.NONE:
        # The MTA says no certificate was presented: whatever else it says about one is
        # contradictory and believed nowhere (no name, no fingerprint a pin could match).
        if fp256 or key256:
            warnings.append(f"{{verify}}={verify_raw[:20]!r} but a certificate fingerprint was "
                            "given: ignored")
        cn = subject_dn = None
        fp256 = key256 = None
    return TlsFacts(version=version, cipher=cipher, bits=bits, verify=verify, subject_cn=cn,
                    subject_dn=subject_dn, issuer=issuer_dn, fingerprint_sha256=fp256,
                    pubkey_sha256=key256, fingerprint_other=other, dialect="sendmail"), warnings


def _plausible_name(cn: str) -> bool:
    return all(32 < ord(c) < 127 for c in cn)


def merge_policy_facts(facts: TlsFacts, fingerprint: str | None,
                       pubkey_fingerprint: str | None = None) -> TlsFacts:
    """Add what Postfix's policy delegation knows: the SHA-256 fingerprints of *any* client
    certificate and of its public key (``ccert_fingerprint``, ``ccert_pubkey_fingerprint``).

    With a fingerprint but no trusted-cert macros the certificate was presented and untrusted;
    with an empty fingerprint on a TLS session, no certificate was presented.
    """
    if facts.dialect != "postfix" or not facts.encrypted:
        return facts
    fp = normalize_fingerprint(fingerprint) if fingerprint else None
    key = normalize_fingerprint(pubkey_fingerprint) if pubkey_fingerprint else None
    verify = facts.verify
    if verify is CertVerify.UNKNOWN:
        verify = CertVerify.FAIL if (fp or key) else CertVerify.NONE
    return replace(facts, fingerprint_sha256=fp or facts.fingerprint_sha256,
                   pubkey_sha256=key or facts.pubkey_sha256, verify=verify)
