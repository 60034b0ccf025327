"""Postfix SMTPD policy delegation (``check_policy_service``) server, in the daemon's process.

It never decides anything itself (it always answers ``action=DUNNO``): it records what Postfix
knows and a milter cannot learn — the fingerprint of *any* client certificate — into
:class:`~milterd.policy_views.PolicyViews`, where the milter side joins it by client address and
port.  Protocol (Postfix SMTPD_POLICY_README): ``name=value`` lines, an empty line ends a
request, the reply is ``action=…`` and an empty line; connections are reused for many requests.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time

from milterd.policy_views import PolicyView, PolicyViews

log = logging.getLogger("milterd.policy")

MAX_REQUEST_BYTES = 64 * 1024    # Postfix requests are a few hundred bytes
MAX_LINE_BYTES = 8192
IDLE_TIMEOUT = 300.0             # Postfix's smtpd_policy_service_max_idle is 300 s


def view_from_attributes(attrs: dict[str, str]) -> PolicyView | None:
    """A :class:`PolicyView` from a request's attributes, or None if it lacks the join key."""
    address = attrs.get("client_address") or None
    port_raw = attrs.get("client_port", "")
    if address is None or not port_raw.isdigit():
        return None
    keysize_raw = attrs.get("encryption_keysize", "")
    return PolicyView(
        client_address=address,
        client_port=int(port_raw),
        fingerprint=attrs.get("ccert_fingerprint") or None,
        pubkey_fingerprint=attrs.get("ccert_pubkey_fingerprint") or None,
        subject=attrs.get("ccert_subject") or None,
        issuer=attrs.get("ccert_issuer") or None,
        protocol=attrs.get("encryption_protocol") or None,
        cipher=attrs.get("encryption_cipher") or None,
        keysize=int(keysize_raw) if keysize_raw.isdigit() and len(keysize_raw) < 6 else None,
        queue_id=attrs.get("queue_id") or None,
        sender=attrs.get("sender") or None,
        received_at=time.monotonic(),
    )


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        self.connection.settimeout(IDLE_TIMEOUT)
        try:
            while self._one_request():
                pass
        except (TimeoutError, ConnectionError, OSError):
            return

    def _one_request(self) -> bool:
        attrs: dict[str, str] = {}
        size = 0
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
            if not line:
                return False  # client closed
            size += len(line)
            if len(line) > MAX_LINE_BYTES or size > MAX_REQUEST_BYTES:
                log.warning("policy request from %s too large; closing", self.client_address[0])
                return False
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text == "":
                break
            name, sep, value = text.partition("=")
            if not sep:
                log.warning("policy request line without '=' from %s; closing",
                            self.client_address[0])
                self.wfile.write(b"action=DUNNO\n\n")
                return False
            attrs[name] = value
        view = view_from_attributes(attrs)
        if view is not None:
            self.server.views.put(view)
        self.wfile.write(b"action=DUNNO\n\n")
        self.wfile.flush()
        return True


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], views: PolicyViews):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.views = views
        super().__init__(address, _Handler)


class PolicyServer:
    def __init__(self, views: PolicyViews, host: str, port: int):
        self._server = _Server((host, port), views)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
