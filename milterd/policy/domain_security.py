"""Domain Security decisions as pure functions over typed values (no MTA, no I/O).

A message is *covered* when any plausible reading of its envelope sender or of a ``From:`` field
names a domain on ``receive_domains`` (:mod:`milterd.policy.coverage`, which fails closed); the *covered
domain* is the list entry (without its leading dot), which is also what certificates must name,
what pins are keyed by and what metrics are labelled with — so label sets stay bounded by the
config.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from milterd.core.config import TLS_VERSIONS, Config
from milterd.core.partners import PartnerTerms
from milterd.policy import reasons
from milterd.policy.names import name_covers_domain, reference_matches
from milterd.session import CertVerify, StashKey, TlsFacts

PASS, FAIL, NONE = "pass", "fail", "none"


@dataclass(frozen=True)
class Result:
    status: str                 # pass | fail | none (not covered)
    domain: str | None = None   # the covered domain (list entry without the leading dot)
    reason: str | None = None   # one of milterd.policy.reasons when status is fail
    via: str | None = None      # "trusted" | "pinned" when status is pass
    partner: str | None = None  # the partner entry whose terms applied (".x.test" keeps its dot)
    match: str | None = None    # how the certificate matched: one of MATCHES, when status is pass
    mode: str = "enforce"       # the partner's mode and failure action (what a failure does)
    failure_action: str = "reject"

    @property
    def refuses(self) -> bool:
        """A failure that the partner's terms say to refuse (enforce mode)."""
        return self.status == FAIL and self.mode == "enforce"


NOT_COVERED = Result(NONE)

#: How a passing certificate matched the partner's terms (trace header ``match=``, log, metrics).
MATCH_DOMAIN = "domain"                      # trusted, names the partner domain (or a host under it)
MATCH_CERTIFICATE_NAME = "certificate_name"  # trusted, names one of the partner's certificate_names
MATCH_CERT_PIN = "cert_pin"                  # Direct Trust: certificate SHA-256 pin
MATCH_KEY_PIN = "key_pin"                    # Direct Trust: public-key (SPKI) SHA-256 pin
MATCHES = (MATCH_DOMAIN, MATCH_CERTIFICATE_NAME, MATCH_CERT_PIN, MATCH_KEY_PIN)

# Where the built-in plugin leaves its result for the stamp, counters and log plugins.
RESULT_KEY: StashKey[Result] = StashKey("domain_security.result")


def _version_rank(version: str | None) -> int:
    try:
        return TLS_VERSIONS.index(version or "")
    except ValueError:
        return -1  # SSLv3 or unknown: below every configurable minimum


def terms_for(partner: PartnerTerms | str, config: Config | None) -> PartnerTerms:
    """``partner`` itself, or the terms of the entry/domain it names: the exact entry, else the
    ``.domain`` entry, else the global defaults (a domain that is no partner)."""
    if isinstance(partner, PartnerTerms):
        return partner
    if config is None:
        raise TypeError("a partner named by domain needs the config")
    found = config.partner(partner) or config.partner("." + partner.lstrip("."))
    if found is not None:
        return found
    return PartnerTerms(entry=partner, mode=config.domain_security.mode,
                        failure_action=config.domain_security.failure_action,
                        trusted_issuers=config.peer_cert.trusted_issuers,
                        cert_pins=config.peer_cert.pins_for(partner.lstrip(".")),
                        min_version=config.tls.min_version,
                        min_cipher_bits=config.tls.min_cipher_bits)


def in_networks(client_address: str | None, networks: tuple) -> bool:
    """Is the client (either view's spelling: ``IPv6:::1``, ``[::1]``, mapped IPv4) inside one of
    ``networks``?  An address that is missing or not an IP address is inside none (fail closed)."""
    if not isinstance(client_address, str):
        return False
    ip = _client_ip(client_address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


@functools.lru_cache(maxsize=4096)  # pure; one client address per connection (bounded)
def _client_ip(client_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    from milterd.inbound.policy_views import normalize_address

    text = normalize_address(client_address)
    return None if text is None else ipaddress.ip_address(text)


def evaluate(tls: TlsFacts, partner: PartnerTerms | str, config: Config | None = None, *,
             client_address: str | None = None) -> Result:
    """Does a session with ``tls`` from ``client_address`` pass Domain Security under the
    partner's terms?  ``partner`` is a :class:`PartnerTerms` (or an entry/domain looked up in
    ``config``).  Checks in order: client network, TLS, version, cipher bits, pins, trusted
    chain, issuer allow-list, certificate name."""
    t = terms_for(partner, config)
    domain = t.domain

    def fail(reason: str) -> Result:
        return Result(FAIL, domain, reason, partner=t.entry, mode=t.mode,
                      failure_action=t.failure_action)

    def ok(via: str, match: str) -> Result:
        return Result(PASS, domain, via=via, partner=t.entry, match=match, mode=t.mode,
                      failure_action=t.failure_action)

    if t.client_networks and not in_networks(client_address, t.client_networks):
        return fail(reasons.CLIENT_NETWORK)
    if not tls.encrypted:
        return fail(reasons.NO_TLS)
    if _version_rank(tls.version) < _version_rank(t.min_version):
        return fail(reasons.TLS_VERSION)
    if tls.bits is None or tls.bits < t.min_cipher_bits:
        return fail(reasons.CIPHER_BITS)
    # Direct Trust: a pin binds this certificate (or its key) to the partner; no chain or name.
    if tls.fingerprint_sha256 and tls.fingerprint_sha256 in t.cert_pins:
        return ok("pinned", MATCH_CERT_PIN)
    if tls.pubkey_sha256 and tls.pubkey_sha256 in t.key_pins:
        return ok("pinned", MATCH_KEY_PIN)
    if tls.verify is not CertVerify.OK:
        presented = tls.fingerprint_sha256 or tls.pubkey_sha256
        return fail(reasons.PIN_MISMATCH if t.pinned and presented else reasons.NO_TRUSTED_CERT)
    if t.trusted_issuers and not issuer_allowed(tls.issuer, t.trusted_issuers):
        return fail(reasons.ISSUER_NOT_ALLOWED)
    if tls.subject_cn and name_covers_domain(tls.subject_cn, domain):
        return ok("trusted", MATCH_DOMAIN)
    if tls.subject_cn and any(reference_matches(tls.subject_cn, ref)
                              for ref in t.certificate_names):
        return ok("trusted", MATCH_CERTIFICATE_NAME)
    return fail(reasons.NAME_MISMATCH)


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


def _severity(r: Result) -> int:
    if r.status == FAIL:
        if r.mode == "enforce":
            return 0 if r.failure_action == "reject" else 1
        return 2
    return 3 if r.status == PASS else 4


def combine(results: list[Result]) -> Result:
    """One result for a message covered by several partners: the failure that refuses hardest
    (an enforce partner's reject, then tempfail, then a report partner's failure — so a report
    partner can never mask an enforce partner's failure), else the first pass."""
    if not results:
        return NOT_COVERED
    return min(results, key=_severity)  # min is stable: the first of equals wins


def may_still_pass(tls: TlsFacts, partner: PartnerTerms | str, config: Config | None = None
                   ) -> bool:
    """At MAIL FROM with Postfix, a pinned partner's fingerprints are not known yet (they arrive
    with the policy-delegation request at RCPT): don't refuse before that view could be joined."""
    t = terms_for(partner, config)
    return (tls.dialect == "postfix" and tls.encrypted and tls.fingerprint_sha256 is None
            and tls.pubkey_sha256 is None and t.pinned)


def failure_text(result: Result) -> str:
    return (f"Domain Security: mail from {result.domain} requires mutual TLS with a trusted "
            f"certificate for the domain; {reasons.DESCRIPTIONS.get(result.reason or '', '')} "
            f"({result.reason})")
