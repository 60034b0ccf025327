"""Postfix SMTPD policy delegation (``check_policy_service``) server, in the daemon's process.

It never decides anything itself (it always answers ``action=DUNNO``): it records what Postfix
knows and a milter cannot learn — the fingerprint of *any* client certificate — into
:class:`~milterd.inbound.policy_views.PolicyViews`, where the milter side joins it by client address and
port.  Protocol (Postfix SMTPD_POLICY_README): ``name=value`` lines, an empty line ends a
request, the reply is ``action=…`` and an empty line; connections are reused for many requests.

Who may post.  Whatever reaches this server becomes a "fact" about some SMTP session, so the
server is only as trustworthy as its socket: on a unix socket (``[policy] listen =
"unix:/path"``, mode 0660, group ``[policy] group``) only Postfix (and root) can post; on TCP
every local user can, and :meth:`PolicyView.agrees_with` is then the only check left (a forger
who guesses the session's protocol, cipher and key size passes it).

Hostile input.  Nothing a peer sends raises: a line without ``=``, a bad attribute name or a
repeated attribute makes the request malformed (answered ``DUNNO``, nothing stored, connection
kept); an attribute value that is not what Postfix sends (invalid UTF-8, ``encryption_keysize=²``,
overlong) is dropped with a warning — which only ever removes facts, never adds them; an overlong
line or request closes the connection.  At most ``max_connections`` connections are served at
once; one connection's trouble never reaches another's thread.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import socketserver
import struct
import threading
import time
from typing import Mapping

from milterd.core.listeners import set_socket_group, tcp_listener, unix_listener
from milterd.inbound.policy_views import PolicyView, PolicyViews, normalize_address, normalize_port

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024    # Postfix requests are a few hundred bytes
MAX_LINE_BYTES = 8192
MAX_CONNECTIONS = 512            # Postfix keeps one connection per smtpd process
IDLE_TIMEOUT = 300.0             # Postfix's smtpd_policy_service_max_idle is 300 s
REPLY = b"action=DUNNO\n\n"

_NAME = re.compile(rb"[A-Za-z0-9_]{1,64}")
# Values milterd uses, as Postfix spells them (ASCII only: re.ASCII and explicit classes).
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_KEYSIZE = re.compile(r"[0-9]{1,5}", re.ASCII)
_FINGERPRINT = re.compile(r"(?:[0-9A-Fa-f]{2}:){0,63}[0-9A-Fa-f]{2}", re.ASCII)
_PROTOCOL = re.compile(r"[A-Za-z0-9._-]{1,16}", re.ASCII)
_CIPHER = re.compile(r"[A-Za-z0-9_.+-]{1,64}", re.ASCII)
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,32}", re.ASCII)
_ADDRESS = re.compile(r"[0-9A-Fa-f:.%a-zA-Z\[\]]{1,64}", re.ASCII)
_MAX_TEXT = 512                  # display-only values (subject, issuer, sender) are cut here
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# -- attributes -> view ------------------------------------------------------------------------

def _ascii(raw: str | bytes | None) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    return raw if raw.isascii() else None


def _checked(attrs: Mapping[str, str | bytes], name: str, pattern: re.Pattern[str],
             warnings: list[str]) -> str | None:
    """The attribute's value if it is what Postfix sends; None when absent or empty; None and a
    warning when it is anything else."""
    raw = attrs.get(name)
    if raw is None or raw in ("", b""):
        return None
    text = _ascii(raw)
    if text is None or not pattern.fullmatch(text):
        warnings.append(f"ignoring malformed {name}={raw[:40]!r}")
        return None
    return text


def _display(attrs: Mapping[str, str | bytes], name: str) -> str | None:
    raw = attrs.get(name)
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = _CONTROL.sub("?", text[:_MAX_TEXT])
    return text or None


def view_from_attributes(attrs: Mapping[str, str | bytes],
                         warnings: list[str] | None = None) -> PolicyView | None:
    """A :class:`PolicyView` from a request's attributes, or None if it lacks the join key.

    Values may be ``str`` or the raw ``bytes`` of the request; nothing here raises.  Problems are
    appended to ``warnings`` (for the log).
    """
    if warnings is None:
        warnings = []
    address_text = _checked(attrs, "client_address", _ADDRESS, warnings)
    port_text = _checked(attrs, "client_port", _PORT, warnings)
    address = normalize_address(address_text)
    port = normalize_port(port_text)
    if address is None or port is None:
        if address_text is not None and address is None:
            warnings.append(f"client_address {address_text[:40]!r} is not an IP address")
        if port_text is not None and port is None:
            warnings.append(f"client_port {port_text!r} is out of range")
        return None
    keysize_text = _checked(attrs, "encryption_keysize", _KEYSIZE, warnings)
    return PolicyView(
        client_address=address,
        client_port=port,
        fingerprint=_checked(attrs, "ccert_fingerprint", _FINGERPRINT, warnings),
        pubkey_fingerprint=_checked(attrs, "ccert_pubkey_fingerprint", _FINGERPRINT, warnings),
        subject=_display(attrs, "ccert_subject"),
        issuer=_display(attrs, "ccert_issuer"),
        protocol=_checked(attrs, "encryption_protocol", _PROTOCOL, warnings),
        cipher=_checked(attrs, "encryption_cipher", _CIPHER, warnings),
        keysize=int(keysize_text) if keysize_text is not None else None,
        queue_id=_checked(attrs, "queue_id", _QUEUE_ID, warnings),
        sender=_display(attrs, "sender"),
        received_at=time.monotonic(),
    )


# -- the server --------------------------------------------------------------------------------

class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"
    timeout = IDLE_TIMEOUT

    def handle(self) -> None:
        try:
            while self._one_request():
                pass
        except (TimeoutError, ConnectionError, OSError):
            return
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("internal error serving %s; closing the connection",
                          self._peer())

    def _peer(self) -> str:
        return self.server.describe_peer(self.request, self.client_address)

    def _one_request(self) -> bool:
        attrs: dict[str, bytes] = {}
        problems: list[str] = []
        size = 0
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
            if not line:
                if attrs or problems:
                    log.warning("%s closed the connection in the middle of a request",
                                self._peer())
                return False  # client closed
            size += len(line)
            if len(line) > MAX_LINE_BYTES or size > MAX_REQUEST_BYTES:
                log.warning("request from %s too large (a line over %d bytes or a "
                            "request over %d); closing", self._peer(), MAX_LINE_BYTES,
                            MAX_REQUEST_BYTES)
                return False
            if line.endswith(b"\n"):
                line = line[:-1]
                if line.endswith(b"\r"):
                    line = line[:-1]
            if not line:
                break
            name, sep, value = line.partition(b"=")
            if not sep:
                problems.append(f"line without '=' {line[:40]!r}")
            elif not _NAME.fullmatch(name):
                problems.append(f"bad attribute name {name[:40]!r}")
            elif name.decode("ascii") in attrs:
                problems.append(f"repeated attribute {name.decode('ascii')}")
            else:
                attrs[name.decode("ascii")] = value
        if problems:
            log.warning("malformed request from %s, nothing recorded: %s",
                        self._peer(), "; ".join(problems[:5]))
        else:
            warnings: list[str] = []
            view = view_from_attributes(attrs, warnings)
            if warnings:
                log.warning("request from %s: %s", self._peer(), "; ".join(warnings[:5]))
            if view is not None:
                self.server.views.put(view)
        self.wfile.write(REPLY)
        return True


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading stream server on a listening socket made elsewhere (TCP or unix)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, views: PolicyViews, max_connections: int):
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self.address_family = sock.family
        self.views = views
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            log.warning("%d connections open; closing a new one from %s",
                        self.max_connections, self.describe_peer(request, client_address))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        log.exception("error serving %s", self.describe_peer(request, client_address))

    def describe_peer(self, request: socket.socket, client_address: object) -> str:
        if self.address_family == socket.AF_UNIX:
            try:
                creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                           struct.calcsize("3i"))
                pid, uid, _gid = struct.unpack("3i", creds)
                return f"pid {pid} uid {uid}"
            except OSError:
                return "a unix-socket peer"
        if isinstance(client_address, tuple) and len(client_address) >= 2:
            host, port = client_address[0], client_address[1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return str(client_address)


class PolicyServer:
    """The policy service on TCP (``host``, ``port``) or, with ``path``, on a unix socket."""

    def __init__(self, views: PolicyViews, host: str = "", port: int = 0, *,
                 path: str | None = None, group: str | None = None,
                 max_connections: int = MAX_CONNECTIONS):
        self.path = path
        if path is not None:
            sock = unix_listener(path, group, key="policy.listen", group_key="policy.group")
            self.port = 0
            st = os.stat(path)
            self._inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        else:
            sock = tcp_listener(host, port, key="policy.listen")
            self.port = sock.getsockname()[1]
            self._inode = None
        self._server = _Server(sock, views, max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_group(self, group: str | None) -> None:
        """At reload: give the unix socket to another ``[policy] group`` in place."""
        if self.path is not None:
            set_socket_group(self.path, group, group_key="policy.group")

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        if self.path is not None and self._inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)  # ours, not a successor's
            except OSError:
                pass
