"""Running the daemon: sockets, side servers, signals and reload.

pymilter's ``runmilter`` is not used as is, because the unix socket must get mode 0660 and the
MTA's group between libmilter creating it and serving on it.

Signals.  libmilter's ``smfi_main`` blocks SIGHUP/SIGTERM/SIGINT in its thread and starts a
signal thread that ``sigwait``\ s for them and treats SIGHUP like SIGTERM: *stop*.  A second
``sigwait`` thread for reloads would race it (the kernel hands the signal to either waiter).
Linux gives a process-directed signal to the main thread first whenever the main thread accepts
it, so ``milter.main()`` runs in a worker thread and the Python main thread, which never blocks
these signals, handles them: SIGHUP reloads, SIGTERM/SIGINT call ``milter.stop()`` (graceful:
open sessions finish).  libmilter's signal thread never sees a signal.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import Milter
import milter

from milterd.inbound.milter_adapter import LIBMILTER_MODE, session_class
from milterd.core.app import App, Dispatcher, build_dispatcher
from milterd.core.config import Config, ConfigError, load_config
from milterd.core.metrics import MetricsServer
from milterd.inbound.policy_server import ListenerError, PolicyServer

log = logging.getLogger("milterd")

MILTER_NAME = "milterd"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines; structured ``fields`` (if any) follow as ``key=value``, strings repr-quoted so
    a peer-chosen value (a certificate name with CR/LF) cannot start a forged log line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # strftime once per second, not once per line (a line per message is the hot path)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S",
                                                           self.converter(record.created)))
        return f"{cached[1]},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                   for k, v in fields.items() if v is not None)
        return text


def setup_logging(config: Config, log_format: str | None = None) -> None:
    # Neither formatter prints thread or process fields: don't compute them for every record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if (log_format or config.log.format) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


class Daemon:
    def __init__(self, config_path: str | None, config: Config, *,
                 extra_plugins: tuple[tuple[str, object], ...] = ()):
        self.config_path = config_path
        self.config = config
        self.extra_plugins = extra_plugins
        self.app = App(config)
        self.app.dispatcher = self._build(config)
        self._servers: list[Any] = []
        self._reload_lock = threading.Lock()

    def _build(self, config: Config) -> Dispatcher:
        dispatcher = build_dispatcher(self.app, config, extra_plugins=self.extra_plugins)
        self.app.metrics.prime_domains(config.domain_security.receive_domains,
                                       config.domain_security.send_domains)
        self._refresh_cert_gauge(config)
        return dispatcher

    def _refresh_cert_gauge(self, config: Config) -> None:
        from milterd.certs.tool import certificate_expiry

        paths = _configured_cert_paths(config)
        gauge = self.app.metrics.certificate_expiry
        gauge.clear()
        for path, subject, not_after in certificate_expiry(paths):
            gauge.labels(path=path, subject=subject).set(not_after)

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Load the config file again; keep the old one on any error.  Returns success."""
        with self._reload_lock:
            try:
                new_config = load_config(self.config_path)
                dispatcher = self._build(new_config)
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s",
                          "; ".join(exc.errors))
                self.app.metrics.config_reloads.labels(result="refused").inc()
                return False
            except Exception as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                self.app.metrics.config_reloads.labels(result="refused").inc()
                return False
            for key in ("milter", "policy_listen", "policy_group", "metrics_listen",
                        "socketmap_listen"):
                old, new = getattr(self.config, key), getattr(new_config, key)
                if key == "milter":
                    old, new = (old.listen, old.group), (new.listen, new.group)
                if old != new:
                    log.warning("reload: %s changed; it takes effect at the next restart", key)
            self.config = new_config
            self.app.config = new_config
            for service in self._servers:
                if hasattr(service, "reconfigure"):
                    service.reconfigure(new_config)
            self.app.dispatcher = dispatcher  # atomic swap; open sessions keep their own
            self.app.metrics.config_reloads.labels(result="ok").inc()
            log.info("configuration reloaded from %s (plugins: %s)", self.config_path or
                     "<default>", ", ".join(dispatcher.plugin_names))
            return True


    # -- run ------------------------------------------------------------------------------------
    def start_side_servers(self) -> None:
        """Start metrics, policy, socketmap and the maillog follower; a listener that cannot
        be set up raises :class:`ListenerError` (naming its key) after stopping the others."""
        c = self.config
        try:
            if c.metrics_listen:
                s = MetricsServer(self.app.metrics, c.metrics_listen.host, c.metrics_listen.port)
                s.start()
                self._servers.append(s)
                log.info("metrics on http://%s/metrics", c.metrics_listen)
            if c.policy_listen:
                pl = c.policy_listen
                if pl.is_unix:
                    p = PolicyServer(self.app.policy_views, path=pl.path, group=c.policy_group)
                    log.info("policy delegation on %s (mode 0660, group %s)", pl,
                             c.policy_group or "unchanged")
                else:
                    p = PolicyServer(self.app.policy_views, pl.host, pl.port)
                    log.info("policy delegation on %s (TCP: every local user can post "
                             "requests; prefer a unix socket)", pl)
                p.start()
                self._servers.append(p)
            if c.socketmap_listen:
                self._start_socketmap(c)
            if c.outbound.maillog:
                self._start_maillog(c)
        except BaseException:
            self._stop_side_servers()
            raise

    def _stop_side_servers(self) -> None:
        for s in self._servers:
            try:
                s.stop()
            except Exception:
                log.exception("while stopping %r", s)
        self._servers.clear()

    def _start_socketmap(self, c: Config) -> None:
        from milterd.outbound.service import start_socketmap

        try:
            self._servers.append(start_socketmap(self.app, c))
        except OSError as exc:
            raise ListenerError(f"socketmap.listen: cannot listen on {c.socketmap_listen}: "
                                f"{exc.strerror or exc}") from None
        log.info("TLS policy socketmap on %s", c.socketmap_listen)

    def _start_maillog(self, c: Config) -> None:
        from milterd.outbound.service import start_maillog_follower

        self._servers.append(start_maillog_follower(self.app, c))
        log.info("following %s for outbound TLS results", c.outbound.maillog)

    def _open_milter_socket(self, c: Config) -> None:
        Milter.factory = session_class(self.app)
        milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST)
        _set_callbacks()
        milter.setconn(c.milter.listen)
        milter.settimeout(c.milter.timeout)
        milter.setbacklog(128)
        milter.register(MILTER_NAME, negotiate=Milter.negotiate_callback)
        socket_path = _unix_path(c.milter.listen)
        if socket_path:
            Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o117)  # socket created 0660
        try:
            milter.opensocket(True)
        except milter.error as exc:
            raise ListenerError(f"milter.listen: cannot listen on {c.milter.listen!r} "
                                f"(libmilter: {exc}; it gives no reason: check the address, "
                                "that the port is free and the directory's permissions)") from None
        finally:
            os.umask(old_umask)
        inet_port = _inet_port(c.milter.listen)
        if inet_port:
            _nodelay_listener(inet_port)
        if socket_path and c.milter.group:
            try:
                os.chown(socket_path, -1, grp.getgrnam(c.milter.group).gr_gid)
            except KeyError:
                log.error("[milter] group %r does not exist; the MTA may not reach the socket",
                          c.milter.group)
            except PermissionError:
                log.error("cannot give the socket to group %r (not root?)", c.milter.group)

    def run(self) -> int:
        c = self.config
        reload_requested = threading.Event()
        stop_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
        signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
        signal.signal(signal.SIGINT, lambda signum, frame: stop_requested.set())
        try:
            self.start_side_servers()
        except ListenerError as exc:
            log.error("cannot start: %s", exc)
            return 2
        try:
            self._open_milter_socket(c)
        except ListenerError as exc:
            self._stop_side_servers()
            log.error("cannot start: %s", exc)
            return 2
        except BaseException:
            self._stop_side_servers()
            raise
        log.info("milterd %s serving %s (plugins: %s; libmilter: %s)", _version(),
                 c.milter.listen, ", ".join(self.app.dispatcher.plugin_names), LIBMILTER_MODE)
        self.app.metrics.set_build_info(LIBMILTER_MODE)
        if LIBMILTER_MODE == "pool":
            log.info("pymilter uses a worker-pool libmilter (Debian's build): ~30%% more CPU "
                     "per message than scripts/build-libmilter.sh's thread-per-connection one")
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                milter.main()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)

        worker = threading.Thread(target=serve, name="libmilter")
        worker.start()
        stopping = False
        try:
            while worker.is_alive():
                worker.join(0.2)  # the main thread stays free to run signal handlers
                if reload_requested.is_set():
                    reload_requested.clear()
                    log.info("SIGHUP received: reloading")
                    self.reload()
                if stop_requested.is_set() and not stopping:
                    stopping = True
                    log.info("stop requested: finishing open sessions")
                    milter.stop()
            if failure:
                raise failure[0]
            self._wait_for_sessions()
        finally:
            for s in self._servers:
                try:
                    s.stop()
                except Exception:
                    log.exception("while stopping %r", s)
            log.info("milterd stopped")
        return 0

    def _wait_for_sessions(self) -> None:
        """After libmilter stopped accepting: let open sessions finish, up to ``stop_grace``.

        With a thread-per-connection libmilter (scripts/build-libmilter.sh) their threads keep
        serving after smfi_main() returns; exiting at once would cut them (the MTA then tempfails
        those messages, so nothing is lost, but a graceful stop should not cause retries).
        Debian's worker-pool build ends its sessions itself when stopped.
        """
        if LIBMILTER_MODE == "pool":
            return
        grace = self.config.milter.stop_grace
        deadline = time.monotonic() + grace
        if self.app.open_sessions > 0:
            log.info("waiting up to %.0fs for %d open session(s)", grace, self.app.open_sessions)
        while self.app.open_sessions > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.app.open_sessions > 0:
            log.warning("stop_grace over: %d session(s) still open are cut (the MTA tempfails "
                        "them)", self.app.open_sessions)


def _set_callbacks() -> None:
    # As Milter.runmilter does, minus opensocket/main which we run ourselves.
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)


def _unix_path(spec: str) -> str | None:
    if spec.startswith(("unix:", "local:")):
        return spec.split(":", 1)[1]
    return None


def _inet_port(spec: str) -> int | None:
    if spec.startswith(("inet:", "inet6:")):
        return int(spec.split(":", 1)[1].partition("@")[0])
    return None


def _nodelay_listener(port: int) -> None:
    """TCP_NODELAY on libmilter's listening socket (Linux hands it on to accepted sockets).

    libmilter writes e.g. an added header and the final reply as separate small segments; with
    Nagle each second segment waits for the MTA's delayed ACK (~40 ms a message on loopback).
    Measured (bench/): one session over inet 88.6 -> 44.5 ms/message; the rest is the MTA's side.
    """
    import socket as _socket

    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            s = _socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (s.family in (_socket.AF_INET, _socket.AF_INET6)
                    and s.type == _socket.SOCK_STREAM
                    and s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
                    and s.getsockname()[1] == port):
                s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError:
            pass
        finally:
            s.detach()


def _configured_cert_paths(config: Config) -> list[str]:
    return list(config.tls.certificates)


def _version() -> str:
    from milterd import __version__

    return __version__


def run(config_path: str | None, *, log_format: str | None = None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"milterd: {e}", file=sys.stderr)
        return 2
    setup_logging(config, log_format)
    try:
        daemon = Daemon(config_path, config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    started = time.monotonic()
    try:
        return daemon.run()
    except milter.error as exc:
        log.error("milter error after %.1fs: %s", time.monotonic() - started, exc)
        return 1
