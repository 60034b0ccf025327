"""Prometheus metrics: one registry per daemon (never the global default), names per interface.md.

Label sets stay bounded: domains come only from the configured lists (anything else is
``other``), reasons from the closed set in :mod:`milterd.policy.reasons`, plugins from what is loaded.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from milterd import __version__

log = logging.getLogger(__name__)

class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # -- the fixed names of interface.md ---------------------------------------------------
        self.domain_secured_received = Counter(
            "milterd_domain_secured_messages_received", "Messages from receive-list domains "
            "that passed Domain Security (mutual TLS, trusted or pinned, name matched)",
            ["domain"], registry=r)
        self.domain_secured_sent = Counter(
            "milterd_domain_secured_messages_sent", "Messages delivered to send-list domains over "
            "verified TLS", ["domain"], registry=r)
        self.outbound_session_failures = Counter(
            "milterd_domain_secured_outbound_session_failures", "Outbound sessions to send-list "
            "domains that failed TLS policy", ["domain", "reason"], registry=r)
        self.domain_security_failures = Counter(
            "milterd_domain_security_failures", "Inbound messages from receive-list domains that "
            "failed Domain Security (counted in enforce and report mode)",
            ["domain", "reason"], registry=r)
        self.messages = Counter(
            "milterd_messages", "Messages by final verdict", ["verdict"], registry=r)
        # -- operations ---------------------------------------------------------------------------
        self.tls_sessions = Counter(
            "milterd_tls_sessions", "SMTP connections by TLS version (none = plain) and client "
            "certificate state", ["version", "verify"], registry=r)
        self.plugin_errors = Counter(
            "milterd_plugin_errors", "Plugin hooks that raised or overran plugin_timeout",
            ["plugin", "hook"], registry=r)
        self.callback_seconds = Histogram(
            "milterd_callback_duration_seconds", "Time spent in milter callbacks", ["stage"],
            buckets=(0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                     0.025, 0.1, 0.5, 2.5),
            registry=r)
        self.sessions_open = Gauge(
            "milterd_sessions_open", "MTA connections being served now", registry=r)
        self.config_reloads = Counter(
            "milterd_config_reloads", "Configuration reloads by result (ok | refused)",
            ["result"], registry=r)
        self.certificate_expiry = Gauge(
            "milterd_certificate_expiry_timestamp_seconds", "notAfter of certificates named in "
            "the configuration", ["path", "subject"], registry=r)
        self.build_info = Gauge("milterd_build_info", "Build information (libmilter: threads | "
                                "pool, see README Performance)", ["version", "libmilter"],
                                registry=r)
        # -- the partner certificate watch (#18): {partner, direction} and {partner} --------
        from milterd.watch.state import define_metrics

        for attr, metric in define_metrics(r).items():
            setattr(self, attr, metric)
        for verdict in ("accept", "reject", "tempfail"):
            self.messages.labels(verdict=verdict)  # export zeros: alerts need the series
        # Children of labelled metrics, cached: labels() validates and locks on every call, too
        # dear for the per-message path.  Keys are bounded because label values are (see top).
        self._children: dict[tuple, object] = {}

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, cached; for the per-message path."""
        key = (id(metric), values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    def set_build_info(self, libmilter: str) -> None:
        self.build_info.labels(version=__version__, libmilter=libmilter).set(1)

    def observe_callback(self, stage: str, seconds: float) -> None:
        self.child(self.callback_seconds, stage).observe(seconds)

    def prime_domains(self, receive_domains: tuple[str, ...], send_domains: tuple[str, ...]) -> None:
        """Export zero-valued series for configured domains, so rate() and alerts see them."""
        for d in receive_domains:
            self.domain_secured_received.labels(domain=d)
        for d in send_domains:
            self.domain_secured_sent.labels(domain=d)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("metrics request: " + format, *args)


class _Server(WSGIServer):
    # A class per bind: the address family is a class attribute in socketserver.
    pass


class MetricsServer:
    """``/metrics`` over HTTP in a background thread (loopback by default, per config).

    ``host`` is an IPv4 or IPv6 literal (``::1``, no brackets) or a name, bound with the family
    it has (wsgiref alone binds IPv4 only).  A bind failure raises
    :class:`~milterd.core.listeners.ListenerError` naming ``metrics.listen``.
    """

    def __init__(self, metrics: Metrics, host: str, port: int):
        from milterd.core.config import listen_family
        from milterd.core.listeners import ListenerError

        app = make_wsgi_app(metrics.registry)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            server_class = type("MetricsWSGIServer", (_Server,),
                                {"address_family": listen_family(host, port)})
            self._httpd: WSGIServer = make_server(host, port, app, server_class=server_class,
                                                  handler_class=_QuietHandler)
        except OSError as exc:
            raise ListenerError(f"metrics.listen: cannot listen on {where}: "
                                f"{exc.strerror or exc}") from None
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
