"""``milterd cert check``: one certificate judged the way a TLS peer's OpenSSL judges it.

``check`` does not judge the chain with rules of its own: it asks OpenSSL, with the command line
of a TLS peer (``openssl verify -purpose sslserver`` and/or ``sslclient`` per ``--purpose``,
default ``both``; ``-crl_check_all -CRLfile`` with ``--crl``), so it never says OK where OpenSSL
refuses (path length, name constraints, keyUsage/extendedKeyUsage/nsCertType for the role,
critical extensions, signatures, dates at every level, CRL scope, CRL signature and dates,
revocation).  Every OpenSSL error becomes one line ``keyword: detail`` (``untrusted``,
``expired``, ``not_yet_valid``, ``revoked``, ``path_length``, ``name_constraints``, ``purpose``,
``invalid_ca``, ``critical_extension``, ``crl_invalid``, ``crl_expired``, ``crl_not_yet_valid``,
``crl_scope``, ``crl_unsupported``…, see ``KEYWORDS``); the same failure seen in several runs is
printed once, and a purpose failure names every role it breaks.  OpenSSL stops at a certificate
that is not yet valid, so then ``check`` runs it once more without date checks to report what
lies behind.  Checks of our own, on top: ``--name`` (the RFC 9525 matcher Domain Security uses),
and delta CRLs are refused (``crl_unsupported``), deliberately stricter than OpenSSL, which takes
a lone delta for a complete CRL and ignores what a delta adds to its base; indirect CRLs (which
OpenSSL uses only with ``-extended_crl``) are refused by name too.  Trust is what Postfix's
``smtpd_tls_CAfile`` gives: only ``--ca`` (``-no-CApath -no-CAstore``), whose self-signed
certificates are the anchors (no ``-partial_chain``: an intermediate there only helps build the
path to its root); a self-signed end-entity certificate listed there is trusted as itself.
Without ``--ca`` the system bundle is used.  Extra certificates after the leaf in the checked
file serve as untrusted intermediates.  With ``--crl`` every certificate in the path, the root
included, needs a current CRL from its issuer in the file (``-crl_check_all``).
``$MILTERD_OPENSSL`` names another ``openssl`` binary (3.0 or later).  ``--pins`` adds, after the
verdict lines and whatever the verdict, the leaf's two partner pins in ``cert list``'s form (a
partner's self-signed certificate fails ``check`` as ``untrusted`` yet is what pins are for); the
verdict stays on the first line(s) and the exit code does not change.

Layout: ``openssl`` runs ``openssl verify`` and parses its output, ``explain`` turns its errors
into lines; this module decides which runs to make and adds the checks of our own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import ssl
import tempfile
import warnings
from typing import Sequence

from cryptography import x509

from milterd.certs.common import CertError, common_names, dns_sans, load_cert_file, load_certificates, read_input
from milterd.certs.explain import CODE_KEYWORD, CRL_KEYWORDS, KEYWORDS, Explainer, Failure, merge_failures
from milterd.certs.listing import pin_lines
from milterd.certs.openssl import VerifyError, Verifier
from milterd.policy.names import name_matches, normalize_dns_name

__all__ = ["check_certificate", "cmd_check", "Failure", "KEYWORDS", "PURPOSES"]

#: ``--purpose`` -> the roles checked; each role is one ``openssl verify -purpose`` run.
PURPOSES: dict[str, tuple[str, ...]] = {"server": ("server",), "client": ("client",), "both": ("server", "client")}

# Errors raised while OpenSSL builds the path, i.e. before it looks at any CRL.
_PATH_BUILDING_CODES = frozenset({2, 18, 19, 20, 21, 22, 27, 28, 55})
_TIME_CODES = frozenset({9, 10})


def _default_anchors() -> list[x509.Certificate]:
    paths = ssl.get_default_verify_paths()
    for cafile in (paths.cafile, paths.openssl_cafile):
        if cafile and os.path.isfile(cafile):
            try:
                with warnings.catch_warnings():  # old roots in system bundles trip deprecations
                    warnings.simplefilter("ignore")
                    return load_certificates(read_input(cafile, "CA bundle"))
            except (ValueError, CertError):
                continue
    return []


def _load_crls(path: str) -> list[x509.CertificateRevocationList]:
    data = read_input(path, "CRL file")
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
    explainer = Explainer(leaf, [*extra, *anchors], crls or [], now)
    # (keyword, error, role); purpose errors are merged across roles below.
    found: list[tuple[str, VerifyError, str]] = []
    failed_runs: list[str] = []  # last output line of every run that did not say OK
    crl_failures: list[Failure] = []
    skip_crl_issuers: set[x509.Name] = set()
    with tempfile.TemporaryDirectory(prefix="milterd-cert-check-") as tmp:
        verifier = Verifier(tmp, leaf, extra, anchors, crls, now)
        for role in roles:
            run = verifier.run(role)
            found.extend((CODE_KEYWORD.get(e.code, "refused"), e, role) for e in run.errors)
            if any(e.code == 9 for e in run.errors):
                # "not yet valid" stops OpenSSL before the later checks (e.g. name constraints):
                # run again without time checks to report those too.
                found.extend((CODE_KEYWORD.get(e.code, "refused"), e, role)
                             for e in verifier.run(role, check_time=False).errors if e.code not in _TIME_CODES)
            if not run.ok:
                failed_runs.append(_last_line(run.output))
        if crls:
            crl_failures, skip_crl_issuers = _crl_precheck(crls)
            run = verifier.run(roles[0], with_crls=True)
            crl_errors = [e for e in run.errors if e.crl_path or CODE_KEYWORD.get(e.code) in CRL_KEYWORDS]
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
    failures = merge_failures(found, explainer) + crl_failures
    if not failures:  # never OK when a run failed, even if nothing in its output could be read
        failures = [("refused", "openssl verify refused it: %s" % r) for r in dict.fromkeys(failed_runs)]
    return failures


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _check_name(leaf: x509.Certificate, name: str) -> list[Failure]:
    """RFC 9525: DNS SANs only; the CN is consulted only when there are no DNS SANs."""
    sans = dns_sans(leaf)
    if sans:
        if any(name_matches(s, name) for s in sans):
            return []
        return [("name_mismatch", "%s is not among the SANs: %s" % (name, ", ".join(sans)))]
    cns = common_names(leaf)
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
    certs = load_cert_file(args.cert)
    anchors = load_cert_file(args.ca, "CA file") if args.ca else _default_anchors()
    crls = _load_crls(args.crl) if args.crl else None
    failures = check_certificate(certs[0], certs[1:], anchors, crls, name, purpose=args.purpose)
    lines = ["%s: %s" % failure for failure in failures] or ["OK"]
    if getattr(args, "pins", False):
        lines += pin_lines(certs[0])
    print("\n".join(lines))
    return 1 if failures else 0
