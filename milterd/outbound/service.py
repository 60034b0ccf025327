"""Outbound Domain Security wiring: the TLS-policy socketmap and the maillog follower.

The pieces (policy resolution, socketmap protocol, MTA-STS, log parsing) are in their own modules;
this one builds them from the config and turns delivery results into the outbound counters:
``milterd_domain_secured_messages_sent_total{domain}`` for a send-list domain delivered over a
verified (or trusted-and-matched) TLS session, and
``milterd_domain_secured_outbound_session_failures_total{domain,reason}`` for a TLS failure.
Only send-list domains are counted, under their list entry, so labels stay bounded.

TLS-RPT session records carry the policy that applied: :class:`ServedPolicies` (one per
:class:`~milterd.core.app.App`, owned here, so it outlives a reload, a socketmap listener swap and
a follower restart) records the answer the socketmap *served* for each next-hop domain, and the
follower's ``policy_lookup`` reads it there — falling back to the current resolver's
:meth:`~milterd.outbound.tlspolicy.PolicyResolver.peek` (its cache, the send list) for a domain
not served since milterd started.

MTA-STS policies are shared by the fleet: each app has one
:class:`~milterd.outbound.mtasts.SharedStsCache` (:func:`shared_sts_cache`) on the store of the
running store service (:func:`milterd.store.service.current_cache_store`, looked up at each use,
so it follows a store restarted on reload; no store running: no shared cache), handed to every
resolver built for the app — at start and at each reload.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from milterd.core.app import App
from milterd.core.config import Config
from milterd.outbound.dns import DnsClient
from milterd.outbound.maillog_follower import MaillogFollower
from milterd.outbound.maillog_parser import OutboundResult
from milterd.outbound.mtasts import MtaStsClient, SharedStsCache
from milterd.outbound.socketmap import SocketmapServer
from milterd.core.cache import TtlLruCache
from milterd.outbound.tlspolicy import PolicyAnswer, PolicyResolver, parse_nexthop
from milterd.policy.names import domain_listed, normalize_dns_name

log = logging.getLogger("milterd.outbound")


def build_resolver(config: Config, shared_sts: SharedStsCache | None = None) -> PolicyResolver:
    ob = config.outbound
    dns = DnsClient(nameservers=list(ob.dns_servers) or None)  # (IP, port) each
    sts = MtaStsClient(dns, ca_file=ob.mtasts_ca_file, shared_cache=shared_sts)
    return PolicyResolver(config.send_entries, config.tls.min_version, dns, sts,
                          send_terms={p.entry: (p.server_names, p.min_version)
                                      for p in config.partners if p.send},
                          on_dns_error=ob.on_dns_error)  # type: ignore[arg-type]


class ServedPolicies:
    """The policy answers the socketmap served, by next-hop domain, for the TLS-RPT records.

    * :meth:`record` (the socketmap's ``on_answer``) keeps each answer served for a domain key
      (``example.com``, ``example.com.``, ``example.com:587``) under the domain for ``ttl``
      seconds (default a day: every delivery attempt, retries included, asks again and renews
      it; the day covers a delivery that takes long after its lookup), at most ``max_entries``
      domains (least recently used dropped).  TEMP/PERM answers (Postfix defers, no TLS session
      follows), ``[host]``/IP next hops (no recipient domain) and the ``.parent`` keys Postfix
      asks after a NOTFOUND are not recorded.
    * :meth:`lookup` (the follower's ``policy_lookup``): the recorded answer, else the current
      resolver's :meth:`~milterd.outbound.tlspolicy.PolicyResolver.peek`, else None.
    * The current resolver is that of the socketmap server registered last and not yet
      unregistered, read at each lookup: a reload that replaces ``server.resolver`` or the
      server itself is followed, and a refused reload that stops the new server falls back to
      the old one.
    """

    def __init__(self, max_entries: int = 50000, ttl: float = 86400.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._served: TtlLruCache[str, PolicyAnswer] = TtlLruCache(max_entries, ttl, clock=clock)
        self._servers: list[Any] = []
        self._lock = threading.Lock()

    def register(self, server: Any) -> None:
        with self._lock:
            self._servers.append(server)

    def unregister(self, server: Any) -> None:
        with self._lock:
            self._servers = [s for s in self._servers if s is not server]

    @property
    def resolver(self) -> Any:
        with self._lock:
            return self._servers[-1].resolver if self._servers else None

    def record(self, key: str, answer: PolicyAnswer) -> None:
        if answer.kind in ("temp", "perm"):
            return
        hop = parse_nexthop(key)
        if hop is None or hop.bracketed or hop.is_ip:
            return
        self._served.put(hop.host, answer)

    def lookup(self, domain: str) -> PolicyAnswer | None:
        host = normalize_dns_name(domain) if isinstance(domain, str) else None
        if host is None:
            return None
        answer = self._served.get(host)
        if answer is not None:
            return answer
        resolver = self.resolver
        return resolver.peek(host) if resolver is not None else None


_SERVED: "weakref.WeakKeyDictionary[App, ServedPolicies]" = weakref.WeakKeyDictionary()
_SERVED_LOCK = threading.Lock()


def served_policies(app: App) -> ServedPolicies:
    """The app's :class:`ServedPolicies` (created on first use)."""
    with _SERVED_LOCK:
        served = _SERVED.get(app)
        if served is None:
            served = _SERVED[app] = ServedPolicies()
        return served


_SHARED_STS: "weakref.WeakKeyDictionary[App, SharedStsCache]" = weakref.WeakKeyDictionary()


def shared_sts_cache(app: App) -> SharedStsCache:
    """The app's shared MTA-STS cache (created on first use; the store is looked up per call)."""
    from milterd.store.service import current_cache_store

    with _SERVED_LOCK:
        cache = _SHARED_STS.get(app)
        if cache is None:
            ref = weakref.ref(app)

            def store() -> Any:
                a = ref()
                return current_cache_store(a) if a is not None else None

            cache = _SHARED_STS[app] = SharedStsCache(store, app.config.store.host_name)
        return cache


class _SocketmapService:
    def __init__(self, handle: Any, served: ServedPolicies, app: App):
        self.handle = handle
        self.served = served
        self.app = app

    def reconfigure(self, config: Config) -> None:
        server = self.handle.server
        shared = shared_sts_cache(self.app)
        shared.host = config.store.host_name
        server.resolver = build_resolver(config, shared)
        server.tlsrpt = config.socketmap_tlsrpt

    def stop(self) -> None:
        self.served.unregister(self.handle.server)
        self.handle.stop()


def start_socketmap(app: App, config: Config) -> _SocketmapService:
    assert config.socketmap_listen is not None
    served = served_policies(app)
    server = SocketmapServer(build_resolver(config, shared_sts_cache(app)),
                             config.socketmap_listen.host,
                             config.socketmap_listen.port, map_name="tlspolicy",
                             tlsrpt=config.socketmap_tlsrpt, on_answer=served.record)
    handle = server.start_in_thread()
    served.register(server)
    return _SocketmapService(handle, served, app)


def count_result(app: App, result: OutboundResult) -> None:
    """The outbound counters for one delivery result (send-list domains only)."""
    entry = domain_listed(result.recipient_domain, app.config.send_entries)
    if entry is None:
        return
    domain = entry.lstrip(".")
    m = app.metrics
    if result.status == "sent" and result.tls_level in ("verified", "trusted"):
        # With a "secure" policy Postfix logs "Verified" (name matched) — or "Trusted" when it
        # was told to match by fingerprint/other names; either way the policy held.
        m.domain_secured_sent.labels(domain=domain).inc()
    elif result.tls_failure:
        m.outbound_session_failures.labels(domain=domain, reason=result.reason).inc()
    log.info("outbound queue_id=%s domain=%s relay=%s status=%s tls=%s reason=%s",
             result.queue_id, result.recipient_domain, result.relay, result.status,
             result.tls_level, result.reason)


class _FollowerService:
    def __init__(self, handle: Any):
        self.handle = handle

    def reconfigure(self, config: Config) -> None:
        pass  # counting reads app.config at each result

    def stop(self) -> None:
        self.handle.stop()


def start_maillog_follower(app: App, config: Config) -> _FollowerService:
    ob = config.outbound
    assert ob.maillog is not None
    state_dir = Path(ob.state_dir or os.path.dirname(ob.maillog) or ".")
    state_dir.mkdir(parents=True, exist_ok=True)
    follower = MaillogFollower(ob.maillog, state_dir / "maillog.state",
                               lambda r: count_result(app, r),
                               sessions_file=state_dir / "tlsrpt-sessions.jsonl",
                               policy_lookup=served_policies(app).lookup)
    return _FollowerService(follower.start_in_thread(poll_interval=0.5))
