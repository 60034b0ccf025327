"""OpenSSL's verify errors turned into ``keyword: detail`` lines, one per failure.

Each OpenSSL error number maps to a keyword (``KEYWORDS``); the ``Explainer`` finds the
certificate (or CRL) an error is about and says in one sentence what is wrong with it, and
``merge_failures`` folds the same failure seen in several runs into one line.
"""

from __future__ import annotations

import datetime as _dt
from typing import Sequence

from cryptography import x509

from milterd.certs.common import common_names, iso_time, utc_now
from milterd.certs.openssl import VerifyError

Failure = tuple[str, str]

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
CODE_KEYWORD = {code: kw for kw, codes in _KEYWORD_CODES.items() for code in codes}
#: Every keyword ``check`` can print, besides ``name_mismatch`` (ours) and ``refused`` (fallback).
KEYWORDS = frozenset(_KEYWORD_CODES) | {"name_mismatch", "refused"}
CRL_KEYWORDS = frozenset({"revoked", "crl_invalid", "crl_not_yet_valid", "crl_expired", "crl_scope",
                           "crl_unsupported"})

_EKU_NAMES = {
    "1.3.6.1.5.5.7.3.1": "serverAuth", "1.3.6.1.5.5.7.3.2": "clientAuth", "1.3.6.1.5.5.7.3.3": "codeSigning",
    "1.3.6.1.5.5.7.3.4": "emailProtection", "1.3.6.1.5.5.7.3.8": "timeStamping", "1.3.6.1.5.5.7.3.9": "OCSPSigning",
    "2.5.29.37.0": "anyExtendedKeyUsage",
}
_KU_NAMES = (("digital_signature", "digitalSignature"), ("content_commitment", "nonRepudiation"),
             ("key_encipherment", "keyEncipherment"), ("data_encipherment", "dataEncipherment"),
             ("key_agreement", "keyAgreement"), ("key_cert_sign", "keyCertSign"), ("crl_sign", "cRLSign"))
_NS_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")


class Explainer:
    """Maps an OpenSSL error back to the certificate (and CRL) it is about, and says it plainly."""

    def __init__(self, leaf: x509.Certificate, others: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList], now: _dt.datetime | None = None) -> None:
        self.leaf = leaf
        self.by_subject: dict[str, list[x509.Certificate]] = {}
        for cert in [leaf, *others]:
            self.by_subject.setdefault(cert.subject.rfc4514_string(), []).append(cert)
        self.crls = list(crls)
        self.now = now or utc_now()

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
        return CODE_KEYWORD[err.code]

    def crls_from(self, issuer: x509.Name) -> list[x509.CertificateRevocationList]:
        return [c for c in self.crls if c.issuer == issuer]

    def explain(self, keyword: str, err: VerifyError) -> str:
        """One sentence naming the certificate (or CRL) and what is wrong with it."""
        cert = self.cert_for(err)
        who = self.who(err, cert)
        issuer = cert.issuer.rfc4514_string() if cert is not None else "its issuer"
        text = None
        if keyword == "expired" and cert is not None:
            text = "%s expired on %s" % (who, iso_time(cert.not_valid_after_utc))
        elif keyword == "not_yet_valid" and cert is not None:
            text = "%s is not valid before %s" % (who, iso_time(cert.not_valid_before_utc))
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
                    when = " on %s" % iso_time(entry.revocation_date_utc)
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
        elif keyword in CRL_KEYWORDS and cert is not None:
            text = self._explain_crl(keyword, err, cert, who, issuer)
        if text is None:
            text = "%s: %s" % (who, err.message)
        return text

    def _explain_crl(self, keyword: str, err: VerifyError, cert: x509.Certificate, who: str, issuer: str) -> str | None:
        crls = self.crls_from(cert.issuer)
        if keyword == "crl_expired":
            due = [c.next_update_utc for c in crls if c.next_update_utc is not None]
            return "the CRL from %s was due for update on %s" % (issuer, iso_time(min(due))) if due else None
        if keyword == "crl_not_yet_valid":
            return "the CRL from %s is not valid before %s" % (issuer, iso_time(max(c.last_update_utc for c in crls))) \
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
        names = ["CN " + cn for cn in common_names(cert)]
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


# --------------------------------------------------------------------------- one line per failure

_ROLE_TEXT = {"server": "TLS server", "client": "TLS client"}


def merge_failures(found: list[tuple[str, VerifyError, str]], explainer: Explainer) -> list[Failure]:
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

