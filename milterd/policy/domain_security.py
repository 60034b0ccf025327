"""Domain Security decisions as pure functions over typed values (no MTA, no I/O).

A message is *covered* when any plausible reading of its envelope sender or of a ``From:`` field
names a domain on ``receive_domains`` (:mod:`milterd.policy.coverage`, which fails closed); the *covered
domain* is the list entry (without its leading dot), which is also what certificates must name,
what pins are keyed by and what metrics are labelled with — so label sets stay bounded by the
config.
"""

from __future__ import annotations

from dataclasses import dataclass

from milterd.policy import reasons
from milterd.core.config import TLS_VERSIONS, Config
from milterd.policy.names import name_covers_domain
from milterd.session import CertVerify, StashKey, TlsFacts

PASS, FAIL, NONE = "pass", "fail", "none"


@dataclass(frozen=True)
class Result:
    status: str                 # pass | fail | none (not covered)
    domain: str | None = None   # the covered domain (list entry without the leading dot)
    reason: str | None = None   # one of milterd.policy.reasons when status is fail
    via: str | None = None      # "trusted" | "pinned" when status is pass


NOT_COVERED = Result(NONE)

# Where the built-in plugin leaves its result for the stamp, counters and log plugins.
RESULT_KEY: StashKey[Result] = StashKey("domain_security.result")


def _version_rank(version: str | None) -> int:
    try:
        return TLS_VERSIONS.index(version or "")
    except ValueError:
        return -1  # SSLv3 or unknown: below every configurable minimum


def evaluate(tls: TlsFacts, domain: str, config: Config) -> Result:
    """Does a session with ``tls`` pass Domain Security for the covered ``domain``?"""
    if not tls.encrypted:
        return Result(FAIL, domain, reasons.NO_TLS)
    if _version_rank(tls.version) < _version_rank(config.tls.min_version):
        return Result(FAIL, domain, reasons.TLS_VERSION)
    if tls.bits is None or tls.bits < config.tls.min_cipher_bits:
        return Result(FAIL, domain, reasons.CIPHER_BITS)
    pins = config.peer_cert.pins_for(domain)
    if pins and tls.fingerprint_sha256 in pins:
        # Direct Trust: the pin binds this certificate to the domain; no chain or name check.
        return Result(PASS, domain, via="pinned")
    if tls.verify is not CertVerify.OK:
        return Result(FAIL, domain, reasons.PIN_MISMATCH if pins and tls.fingerprint_sha256
                      else reasons.NO_TRUSTED_CERT)
    if config.peer_cert.trusted_issuers and not issuer_allowed(
            tls.issuer, config.peer_cert.trusted_issuers):
        return Result(FAIL, domain, reasons.ISSUER_NOT_ALLOWED)
    if not tls.subject_cn or not name_covers_domain(tls.subject_cn, domain):
        return Result(FAIL, domain, reasons.NAME_MISMATCH)
    return Result(PASS, domain, via="trusted")


def issuer_allowed(issuer: str | None, allowed: tuple[str, ...]) -> bool:
    """Postfix gives the issuer's CN, Sendmail its one-line DN: accept a match on either."""
    if not issuer:
        return False
    from milterd.policy.dn import subject_cn

    candidates = {issuer.casefold()}
    cn = subject_cn(issuer)
    if cn:
        candidates.add(cn.casefold())
    return any(a.casefold() in candidates for a in allowed)


def combine(results: list[Result]) -> Result:
    """One result for a message covered by several domains: the first failure, else a pass."""
    for r in results:
        if r.status == FAIL:
            return r
    for r in results:
        if r.status == PASS:
            return r
    return NOT_COVERED


def may_still_pass(tls: TlsFacts, domain: str, config: Config) -> bool:
    """At MAIL FROM with Postfix, a pinned partner's fingerprint is not known yet (it arrives with
    the policy-delegation request at RCPT): don't refuse before that view could be joined."""
    return (tls.dialect == "postfix" and tls.encrypted and tls.fingerprint_sha256 is None
            and bool(config.peer_cert.pins_for(domain)))


def failure_text(result: Result) -> str:
    return (f"Domain Security: mail from {result.domain} requires mutual TLS with a trusted "
            f"certificate for the domain; {reasons.DESCRIPTIONS.get(result.reason or '', '')} "
            f"({result.reason})")
