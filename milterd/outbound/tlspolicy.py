"""Outbound TLS policy for Postfix ``smtp_tls_policy_maps`` (served by :mod:`milterd.outbound.socketmap`).

Order of decisions for a next-hop key (``example.com``, ``example.com.``, ``[mx.example.com]:587``)
--------------------------------------------------------------------------------------------------
1. **Send list** (``[domain_security] send_domains``; exact entry, or any strict subdomain of a
   ``.parent`` entry, via :func:`milterd.policy.names.domain_listed`) → ``secure match=<d>:.<d>``
   (+ ``protocols=>=TLSv1.2`` when ``min_protocol`` is set).  No DNS at all, so a DNS or fetch
   failure can never downgrade a partner domain.
2. **DANE** (RFC 7672): MX lookup (implicit MX = the domain itself when there is none; a null MX
   ends the search), then TLSA at ``_25._tcp.<mx>`` for each MX (at most ``max_mx``).  Only
   DNSSEC-authenticated answers count (the AD bit of a validating resolver; queries are sent
   with DO and AD set).  Every MX with usable TLSA (usage 2 or 3) → ``dane-only``; only some →
   ``dane`` (Postfix then requires DANE exactly for the MX hosts that publish TLSA); none →
   next step.  DANE wins over MTA-STS (RFC 8461 §2).
3. **MTA-STS** (RFC 8461, :mod:`milterd.outbound.mtasts`): mode ``enforce`` → ``secure match=<mx
   patterns> servername=hostname`` (``*.example.net`` becomes ``.example.net``); mode
   ``testing`` → ``NOTFOUND`` (or ``may``, ``sts_testing_answer``) but the answer keeps the
   policy for TLS-RPT; mode ``none`` → ``NOTFOUND``.  Applies only to plain domain keys on the
   SMTP port (an explicit ``[host]`` next hop has no MX, so no MTA-STS).
4. Otherwise ``NOTFOUND``: Postfix applies its own default (normally opportunistic TLS).

TLSRPT attributes (``[socketmap] tlsrpt = true``, Postfix >= 3.10): an MTA-STS answer is followed
by ``policy_type=sts policy_domain=… { policy_string = … }… mx_host_pattern=…`` (see
:meth:`PolicyAnswer.tlsrpt_attributes`); DANE and send-list answers stay plain.  Off by default:
Postfix 3.9 and older refuse the attribute names and would defer the mail.

Keys that are not a domain or ``[host]`` — notably the ``.parent`` keys Postfix tries after a
``NOTFOUND`` for ``sub.parent`` (smtp_tls_policy.c, ``tls_policy_lookup``) and the pathname of a
UNIX-domain next hop — get ``NOTFOUND`` without any DNS: the full-name query has already applied
the send list (including ``.parent`` entries), and an error reply would make Postfix defer.

DNS failure semantics (the decision)
------------------------------------
* Send-list domains never touch DNS: always ``secure``.
* A *temporary* DNS failure (timeout, SERVFAIL, no answer from any server) in the DANE step
  answers ``TEMP`` (Postfix defers the mail and retries) — unless a cached, unexpired MTA-STS
  ``enforce`` policy exists, which is then used (RFC 8461 §5.1).  Answering ``NOTFOUND`` would
  let anyone who can block DNS strip DANE (RFC 7672 §2.1 treats such failures as "defer"); and
  Postfix itself cannot route the mail without its MX lookup, so deferring costs nothing that
  would otherwise have worked.  ``on_dns_error="notfound"`` selects fail-open instead.
* MTA-STS failures (TXT lookup, HTTPS fetch, invalid policy) with nothing cached fail open to
  ``NOTFOUND`` as RFC 8461 §5 requires (trust on first use); the error type is kept on the
  answer for TLS-RPT.  A cached policy survives all of them.
* The whole resolution has one time limit (``deadline``); hitting it is a DNS failure as above.

Caching: answers are cached in a bounded LRU (``cache_size`` entries; keys are at most 255
characters and answers are bounded by the MTA-STS limits) with a TTL: DANE answers for the
smallest DNS TTL seen (clamped to ``[min_ttl, max_ttl]``), MTA-STS and ``NOTFOUND`` answers for
``negative_ttl`` (MTA-STS policies have their own max_age cache), ``TEMP`` never.  Concurrent
lookups of the same key share one resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

from milterd.core.cache import TtlLruCache
from milterd.outbound.dns import DnsClient, DnsTempError
from milterd.outbound.mtasts import MtaStsClient, StsLookup
from milterd.policy.names import domain_listed, normalize_dns_name

__all__ = [
    "PolicyAnswer",
    "PolicyResolver",
    "NextHop",
    "parse_nexthop",
    "TLS_PROTOCOLS",
]

log = logging.getLogger(__name__)

TLS_PROTOCOLS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

PolicyKind = Literal["secure", "dane-only", "dane", "may", "notfound", "temp", "perm"]
PolicySource = Literal["send_list", "dane", "mta-sts", "none"]
TlsRptPolicyType = Literal["sts", "tlsa", "no-policy-found"]


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyAnswer:
    """One policy decision.

    ``policy`` is the Postfix policy string (``""`` for notfound/temp/perm); ``reason`` the
    short text of a TEMP/PERM reply.  The ``tlsrpt_*`` / ``sts_*`` fields carry what TLS-RPT
    needs to describe the policy that applied (also for MTA-STS ``testing``, answered NOTFOUND).
    """

    kind: PolicyKind
    policy: str
    source: PolicySource
    domain: str
    reason: str | None = None
    tlsrpt_policy_type: TlsRptPolicyType = "no-policy-found"
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    sts_mode: str | None = None
    sts_error: str | None = None  # RFC 8460 result type of an MTA-STS fetch failure

    def socketmap_reply(self, tlsrpt: bool = False) -> str:
        """The socketmap reply payload (without netstring framing).

        ``tlsrpt=True`` (``[socketmap] tlsrpt``, Postfix >= 3.10 only) appends
        :meth:`tlsrpt_attributes` to an MTA-STS answer; every other answer stays as it is.
        """
        if self.kind in ("temp", "perm"):
            return f"{self.kind.upper()} {self.reason or ''}"
        if self.kind == "notfound":
            return "NOTFOUND "
        attrs = self.tlsrpt_attributes() if tlsrpt else ""
        return f"OK {self.policy}{' ' + attrs if attrs else ''}"

    def tlsrpt_attributes(self) -> str:
        """The Postfix >= 3.10 TLSRPT attributes of an MTA-STS answer, ``""`` for any other.

        Grammar (Postfix TLSRPT_README "MTA-STS Support via smtp_tls_policy_maps";
        ``tls_policy_lookup_one`` in src/smtp/smtp_tls_policy.c, 3.10.0 and later):
        ``policy_type=sts policy_domain=<domain> { policy_string = <line> }…
        mx_host_pattern=<pattern>…`` — ``policy_type`` is ``sts`` or ``no-policy-found`` only,
        ``policy_domain`` must be a valid host name, the brace form protects the blanks of a
        policy line.  Only MTA-STS answers carry them: Postfix reports DANE itself (a
        ``dane``/``dane-only`` level makes it ignore ``policy_type``), a send-list answer is a
        local policy that Postfix already reports as ``no-policy-found``, and its README calls
        the attributes an error on a non-STS policy.  ``policy_failure`` is never sent: it
        would force the delivery to fail, while a fetch failure without a cached policy must
        fail open (RFC 8461 §5) and is answered ``NOTFOUND``.  Postfix 3.9 and older reject any
        of these names ("invalid attribute name") — hence the switch.
        """
        if (self.tlsrpt_policy_type != "sts" or self.source != "mta-sts"
                or self.kind not in ("secure", "may")):
            return ""
        parts = ["policy_type=sts", f"policy_domain={self.domain}"]
        parts += [f"{{ policy_string = {_brace_safe(s)} }}" for s in self.policy_strings]
        parts += [f"mx_host_pattern={p}" for p in self.mx_patterns]
        return " ".join(parts)

    def to_json(self) -> dict:
        """Plain-dict form (for the TLS-RPT session records)."""
        return {
            "kind": self.kind, "policy": self.policy, "source": self.source,
            "domain": self.domain, "policy_type": self.tlsrpt_policy_type,
            "policy_string": list(self.policy_strings), "mx_host": list(self.mx_patterns),
            "sts_mode": self.sts_mode, "sts_error": self.sts_error,
        }


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NextHop:
    """A parsed Postfix next-hop key: ``host`` is a normalised DNS name or an IP address."""

    host: str
    port: int | None
    bracketed: bool
    is_ip: bool


_NEXTHOP_RE = re.compile(r"(\[([^\]]*)\]|[^\[\]:]+)(?::([0-9]{1,5}))?\Z")


def parse_nexthop(key: str) -> NextHop | None:
    """Parse ``domain``, ``domain.``, ``domain:port``, ``[host]``, ``[host]:port``,
    ``[ipv6:addr]`` (Postfix next-hop syntax); None if it is not a valid key."""
    if not isinstance(key, str) or not key or len(key) > 300:
        return None
    key = key.strip()
    m = _NEXTHOP_RE.match(key)
    if not m:
        return None
    bracketed = m.group(2) is not None
    raw = m.group(2) if bracketed else m.group(1)
    port = int(m.group(3)) if m.group(3) else None
    if port is not None and not 0 < port < 65536:
        return None
    if bracketed:
        inner = raw[5:] if raw.lower().startswith("ipv6:") else raw
        try:
            return NextHop(str(ipaddress.ip_address(inner)), port, True, True)
        except ValueError:
            pass
    host = normalize_dns_name(raw)
    if host is None:
        return None
    return NextHop(host, port, bracketed, False)


# --------------------------------------------------------------------------------------------
# Resolver
# --------------------------------------------------------------------------------------------
@dataclass
class _DaneOutcome:
    level: Literal["all", "some", "none", "nxdomain", "nullmx"]
    ttl: int = 0
    tlsa: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


class PolicyResolver:
    """Resolve the Postfix TLS policy for a next-hop key (see the module docstring).

    :param send_domains: ``[domain_security] send_domains`` (exact or ``.parent`` entries).
    :param min_protocol: ``[tls] min_version`` (``"TLSv1.2"``…) or None; added to send-list
        answers as ``protocols=>=…``.
    :param dns: a :class:`milterd.outbound.dns.DnsClient`; :param mtasts: an :class:`~milterd.outbound.mtasts.MtaStsClient`
        (None disables MTA-STS).
    :param send_match: ``match=`` templates for send-list answers; ``{domain}`` is the key's host.
    :param sts_testing_answer: ``"notfound"`` or ``"may"`` for MTA-STS testing mode.
    :param on_dns_error: ``"temp"`` (default, defer) or ``"notfound"`` (fail open).
    :param send_terms: per send-list entry, the partner's ``(server_names, min_version)``
        (``[partners]``): non-empty server names replace the ``match=`` templates for that entry
        (a hosted partner's MX certificates name the provider), a min_version its ``protocols``.
    """

    def __init__(
        self,
        send_domains: Sequence[str],
        min_protocol: str | None,
        dns: DnsClient | None,
        mtasts: MtaStsClient | None,
        *,
        cache_size: int = 10000,
        negative_ttl: float = 300.0,
        min_ttl: float = 30.0,
        max_ttl: float = 3600.0,
        deadline: float = 20.0,
        max_mx: int = 10,
        send_match: Sequence[str] = ("{domain}", ".{domain}"),
        sts_testing_answer: Literal["notfound", "may"] = "notfound",
        on_dns_error: Literal["temp", "notfound"] = "temp",
        send_terms: Mapping[str, tuple[Sequence[str], str | None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_protocol is not None and min_protocol not in TLS_PROTOCOLS:
            raise ValueError(f"min_protocol must be one of {', '.join(TLS_PROTOCOLS)}")
        if sts_testing_answer not in ("notfound", "may"):
            raise ValueError("sts_testing_answer must be notfound or may")
        if on_dns_error not in ("temp", "notfound"):
            raise ValueError("on_dns_error must be temp or notfound")
        self.send_domains = tuple(send_domains)
        self.min_protocol = min_protocol
        self._send_terms = dict(send_terms or {})
        for names, version in self._send_terms.values():
            if version is not None and version not in TLS_PROTOCOLS:
                raise ValueError(f"min_version must be one of {', '.join(TLS_PROTOCOLS)}")
        self._dns = dns
        self._sts = mtasts
        self._negative_ttl = negative_ttl
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._deadline = deadline
        self._max_mx = max_mx
        self._send_match = tuple(send_match)
        self._sts_testing = sts_testing_answer
        self._on_dns_error = on_dns_error
        self._cache: TtlLruCache[str, PolicyAnswer] = TtlLruCache(cache_size, clock=clock)
        self._inflight: dict[str, asyncio.Task[PolicyAnswer]] = {}

    # -- pure parts --------------------------------------------------------------------------
    def send_list_answer(self, hop: NextHop) -> PolicyAnswer | None:
        """The send-list answer for ``hop``, or None if it is not on the send list."""
        entry = None if hop.is_ip else domain_listed(hop.host, self.send_domains)
        if entry is None:
            return None
        names, min_protocol = self._send_terms.get(entry, ((), self.min_protocol))
        if names:
            patterns = ":".join(names)
        else:
            patterns = ":".join(t.format(domain=hop.host) for t in self._send_match)
        policy = f"secure match={patterns}"
        if min_protocol:
            policy += f" protocols=>={min_protocol}"
        return PolicyAnswer("secure", policy, "send_list", hop.host)

    @staticmethod
    def sts_answer(domain: str, sts: StsLookup, testing_answer: str = "notfound") -> PolicyAnswer:
        """Map an MTA-STS lookup to an answer (pure)."""
        pol = sts.policy
        if pol is None:
            return PolicyAnswer("notfound", "", "none", domain, sts_error=sts.error)
        common = dict(tlsrpt_policy_type="sts", policy_strings=tuple(pol.policy_strings()),
                      mx_patterns=pol.mx, sts_mode=pol.mode)
        if pol.mode == "enforce":
            return PolicyAnswer("secure", f"secure match={pol.postfix_match()} servername=hostname",
                                "mta-sts", domain, **common)  # type: ignore[arg-type]
        if pol.mode == "testing":
            if testing_answer == "may":
                return PolicyAnswer("may", "may", "mta-sts", domain, **common)  # type: ignore[arg-type]
            return PolicyAnswer("notfound", "", "mta-sts", domain, **common)  # type: ignore[arg-type]
        return PolicyAnswer("notfound", "", "none", domain)

    # -- cache -------------------------------------------------------------------------------
    def peek(self, key: str) -> PolicyAnswer | None:
        """The cached answer for ``key`` (no I/O; thread-safe), or None."""
        hop = parse_nexthop(key)
        if hop is None:
            return None
        sent = self.send_list_answer(hop)
        if sent is not None:
            return sent
        return self._cache.get(_cache_key(hop))

    def _cache_put(self, ck: str, answer: PolicyAnswer, ttl: float) -> None:
        if ttl <= 0 or answer.kind in ("temp", "perm"):
            return
        self._cache.put(ck, answer, ttl)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- resolution --------------------------------------------------------------------------
    async def resolve(self, key: str) -> PolicyAnswer:
        """The policy for a Postfix next-hop key.  Never raises (errors become TEMP)."""
        hop = parse_nexthop(key)
        if hop is None:
            # Postfix asks for parent domains (".example.com") after a NOTFOUND, and for
            # UNIX-domain next hops it sends a pathname.  Both get NOTFOUND (the full-name
            # answer already covered the send list); an error reply would make Postfix defer.
            return PolicyAnswer("notfound", "", "none", key[:255] if isinstance(key, str) else "",
                                reason="not a domain key")
        sent = self.send_list_answer(hop)
        if sent is not None:
            return sent
        ck = _cache_key(hop)
        cached = self._cache.get(ck)
        if cached is not None:
            return cached
        task = self._inflight.get(ck)
        if task is None:
            # One shared task per key: a waiter being cancelled (request timeout, client gone)
            # never cancels the resolution the other waiters share; it still fills the cache.
            task = asyncio.get_running_loop().create_task(self._resolve_guarded(hop, ck))
            self._inflight[ck] = task
            task.add_done_callback(lambda _t, ck=ck: self._inflight.pop(ck, None))
        return await asyncio.shield(task)

    async def _resolve_guarded(self, hop: NextHop, ck: str) -> PolicyAnswer:
        try:
            answer, ttl = await asyncio.wait_for(self._resolve_dns(hop), self._deadline)
        except (DnsTempError, asyncio.TimeoutError) as exc:
            log.info("TLS policy lookup for %s: DNS failure (%s)", hop.host,
                     exc if isinstance(exc, DnsTempError) else "deadline")
            return await self._dns_failure(hop)
        except Exception:
            log.exception("TLS policy lookup for %s failed", hop.host)
            return PolicyAnswer("temp", "", "none", hop.host, reason="internal error")
        self._cache_put(ck, answer, ttl)
        return answer

    async def _dns_failure(self, hop: NextHop) -> PolicyAnswer:
        if self._sts is not None and not hop.bracketed and not hop.is_ip:
            # The fleet's shared cache too (RFC 8461 §5.1): a host that just restarted or joined
            # serves a policy another host fetched, on the first lookup, while DNS fails.
            shared = getattr(self._sts, "cached_shared", None)
            cached = self._sts.cached(hop.host) or (await shared(hop.host) if shared else None)
            if cached is not None and cached.policy is not None and cached.policy.mode == "enforce":
                return self.sts_answer(hop.host, cached, self._sts_testing)
        if self._on_dns_error == "notfound":
            return PolicyAnswer("notfound", "", "none", hop.host, reason="DNS failure")
        return PolicyAnswer("temp", "", "none", hop.host, reason="DNS lookup failure")

    async def _resolve_dns(self, hop: NextHop) -> tuple[PolicyAnswer, float]:
        if hop.is_ip or self._dns is None:
            return PolicyAnswer("notfound", "", "none", hop.host), self._negative_ttl
        dane = await self._dane(hop)
        if dane.level in ("all", "some"):
            kind: PolicyKind = "dane-only" if dane.level == "all" else "dane"
            ttl = min(max(dane.ttl, self._min_ttl), self._max_ttl)
            return PolicyAnswer(kind, kind, "dane", hop.host, tlsrpt_policy_type="tlsa",
                                policy_strings=dane.tlsa, mx_patterns=dane.mx_hosts), ttl
        if dane.level in ("nxdomain", "nullmx"):
            return PolicyAnswer("notfound", "", "none", hop.host), self._negative_ttl
        if self._sts is not None and not hop.bracketed and hop.port in (None, 25):
            sts = await self._sts.lookup(hop.host)
            return self.sts_answer(hop.host, sts, self._sts_testing), self._negative_ttl
        return PolicyAnswer("notfound", "", "none", hop.host), self._negative_ttl

    async def _dane(self, hop: NextHop) -> _DaneOutcome:
        assert self._dns is not None
        port = hop.port or 25
        ttls: list[int] = []
        if hop.bracketed:
            hosts = [hop.host]
        else:
            mx = await self._dns.query(hop.host, "MX")
            if mx.nxdomain:
                return _DaneOutcome("nxdomain")
            if not mx.authenticated:
                return _DaneOutcome("none")
            ttls.append(mx.ttl)
            pairs = []
            for rec in mx.records:
                pref, _, exch = rec.partition(" ")
                pairs.append((int(pref), exch))
            if any(exch == "." for _, exch in pairs):
                return _DaneOutcome("nullmx")
            pairs.sort()
            hosts = []
            for _, exch in pairs:
                h = normalize_dns_name(exch)
                if h and h not in hosts:
                    hosts.append(h)
            if not mx.records:
                hosts = [hop.host]
            hosts = hosts[: self._max_mx]
        if not hosts:
            return _DaneOutcome("none")
        results = await asyncio.gather(
            *(self._tlsa(h, port) for h in hosts), return_exceptions=True)
        with_tlsa = 0
        tlsa_text: list[str] = []
        for host, res in zip(hosts, results):
            if isinstance(res, DnsTempError):
                continue  # indeterminate: counted below; Postfix decides at delivery time
            if isinstance(res, BaseException):
                raise res
            usable, recs, ttl = res
            if usable:
                with_tlsa += 1
                ttls.append(ttl)
                tlsa_text.extend(recs)
        indeterminate = any(isinstance(r, DnsTempError) for r in results)
        ttl = min(ttls) if ttls else 0
        if with_tlsa == len(hosts):
            return _DaneOutcome("all", ttl, tuple(tlsa_text), tuple(hosts))
        if with_tlsa or indeterminate:
            return _DaneOutcome("some", ttl, tuple(tlsa_text), tuple(hosts))
        return _DaneOutcome("none")

    async def _tlsa(self, host: str, port: int) -> tuple[bool, list[str], int]:
        assert self._dns is not None
        res = await self._dns.query(f"_{port}._tcp.{host}", "TLSA")
        if not res.authenticated or not res.records:
            return False, [], 0
        usable = [r for r in res.records if r.split(" ", 1)[0] in ("2", "3")]
        return bool(usable), usable, res.ttl


def _brace_safe(text: str) -> str:
    """A policy line as the value of ``{ name = value }``: no braces, blanks folded to one
    space (Postfix normalises whitespace there anyway; parsed policies never contain braces)."""
    return " ".join(text.replace("{", " ").replace("}", " ").split())


def _cache_key(hop: NextHop) -> str:
    host = f"[{hop.host}]" if hop.bracketed else hop.host
    return f"{host}:{hop.port}" if hop.port else host
