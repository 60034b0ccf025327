"""Outbound Domain Security wiring: the TLS-policy socketmap and the maillog follower.

The pieces (policy resolution, socketmap protocol, MTA-STS, log parsing) are in their own modules;
this one builds them from the config and turns delivery results into the outbound counters:
``milterd_domain_secured_messages_sent_total{domain}`` for a send-list domain delivered over a
verified (or trusted-and-matched) TLS session, and
``milterd_domain_secured_outbound_session_failures_total{domain,reason}`` for a TLS failure.
Only send-list domains are counted, under their list entry, so labels stay bounded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from milterd.core.app import App
from milterd.core.config import Config
from milterd.outbound.dns import DnsClient
from milterd.outbound.maillog_follower import MaillogFollower
from milterd.outbound.maillog_parser import OutboundResult
from milterd.outbound.mtasts import MtaStsClient
from milterd.outbound.socketmap import SocketmapServer
from milterd.outbound.tlspolicy import PolicyResolver
from milterd.policy.names import domain_listed

log = logging.getLogger("milterd.outbound")


def build_resolver(config: Config) -> PolicyResolver:
    ob = config.outbound
    dns = DnsClient(nameservers=list(ob.dns_servers) or None)  # (IP, port) each
    sts = MtaStsClient(dns, ca_file=ob.mtasts_ca_file)
    return PolicyResolver(config.send_entries, config.tls.min_version, dns, sts,
                          send_terms={p.entry: (p.server_names, p.min_version)
                                      for p in config.partners if p.send},
                          on_dns_error=ob.on_dns_error)  # type: ignore[arg-type]


class _SocketmapService:
    def __init__(self, handle: Any):
        self.handle = handle

    def reconfigure(self, config: Config) -> None:
        self.handle.server.resolver = build_resolver(config)

    def stop(self) -> None:
        self.handle.stop()


def start_socketmap(app: App, config: Config) -> _SocketmapService:
    assert config.socketmap_listen is not None
    server = SocketmapServer(build_resolver(config), config.socketmap_listen.host,
                             config.socketmap_listen.port, map_name="tlspolicy")
    return _SocketmapService(server.start_in_thread())


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
                               sessions_file=state_dir / "tlsrpt-sessions.jsonl")
    return _FollowerService(follower.start_in_thread(poll_interval=0.5))
