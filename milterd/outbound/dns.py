"""The DNS client of the outbound TLS policy: a stub resolver that reports DNSSEC status.

Queries are sent with DO and AD set to the (validating) resolvers in ``[outbound] dns_servers``
or ``/etc/resolv.conf``; an answer counts as DNSSEC-authenticated when the response has the AD
bit (:attr:`DnsResult.authenticated`).  NXDOMAIN is an answer (``nxdomain=True``); a timeout,
SERVFAIL or no answer from any server is :class:`DnsTempError`.  Used for the DANE lookups of
:mod:`milterd.outbound.tlspolicy` and the ``_mta-sts`` TXT lookups of
:mod:`milterd.outbound.mtasts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
import dns.resolver

__all__ = ["DnsClient", "DnsResult", "DnsTempError"]


class DnsTempError(Exception):
    """A temporary DNS failure (timeout, SERVFAIL, no server answered)."""


@dataclass(frozen=True)
class DnsResult:
    """An answer: ``records`` in text form, ``authenticated`` = AD bit of the response."""

    name: str
    rdtype: str
    records: tuple[str, ...]
    authenticated: bool
    nxdomain: bool = False
    ttl: int = 0


class DnsClient:
    """dnspython stub resolver that asks for DNSSEC status (DO + AD) and reports the AD bit.

    :param nameservers: (validating) recursive resolvers, each an IP address or an
        ``(IP, port)`` pair (``[outbound] dns_servers`` as parsed by the config: every server
        keeps its own port); None = /etc/resolv.conf.
    :param port: the port of servers given without one (tests use an ephemeral loopback port).
    :param timeout: per-server attempt timeout, seconds.
    :param lifetime: total time for one query, seconds.

    Trust in the AD bit requires a trustworthy path to a validating resolver (normally a
    resolver on loopback), exactly as for Postfix's own ``smtp_dns_support_level = dnssec``.
    """

    def __init__(self, nameservers: Sequence[str] | None = None, port: int = 53,
                 timeout: float = 3.0, lifetime: float = 6.0) -> None:
        import dns.nameserver

        res = dns.asyncresolver.Resolver(configure=nameservers is None)
        res.port = port
        if nameservers is not None:
            res.nameservers = [
                dns.nameserver.Do53Nameserver(*ns) if isinstance(ns, tuple)
                else dns.nameserver.Do53Nameserver(ns, port) for ns in nameservers]
        res.timeout = timeout
        res.lifetime = lifetime
        res.use_edns(0, dns.flags.DO, 1232)
        res.flags = dns.flags.RD | dns.flags.AD
        res.cache = None
        res.retry_servfail = False
        self._res = res

    async def query(self, name: str, rdtype: str) -> DnsResult:
        try:
            ans = await self._res.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return DnsResult(name, rdtype, (), False, nxdomain=True)
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN,
                dns.resolver.NoRootSOA, dns.exception.DNSException, OSError) as exc:
            raise DnsTempError(f"{rdtype} {name}: {type(exc).__name__}") from None
        response = ans.response
        ad = bool(response.flags & dns.flags.AD)
        rrset = ans.rrset
        records = tuple(r.to_text() for r in rrset) if rrset is not None else ()
        ttl = rrset.ttl if rrset is not None else _negative_ttl(response)
        return DnsResult(name, rdtype, records, ad, False, ttl)

    async def txt(self, name: str) -> list[str] | None:
        """TXT strings per record (the record's strings joined), ``None`` for NXDOMAIN."""
        res = await self.query(name, "TXT")
        if res.nxdomain:
            return None
        out = []
        for text in res.records:
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
            out.append("".join(_unescape_txt(p) for p in parts) if parts else text)
        return out


def _negative_ttl(response: dns.message.Message) -> int:
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, rrset[0].minimum)
    return 0


def _unescape_txt(s: str) -> str:
    def sub(m: re.Match) -> str:
        e = m.group(1)
        return chr(int(e)) if e.isdigit() else e
    return re.sub(r"\\([0-9]{3}|.)", sub, s)
