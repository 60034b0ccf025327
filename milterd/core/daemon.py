"""Running the daemon: process control — sockets, side services, signals and reload.

(The log formats live in :mod:`milterd.core.logs`.)

pymilter's ``runmilter`` is not used as is, because the unix socket must get mode 0660 and the
MTA's group between libmilter creating it and serving on it, and because milterd checks the
socket's directory itself first: libmilter says only "cannot opensocket".

Signals.  libmilter's ``smfi_main`` blocks SIGHUP/SIGTERM/SIGINT in its thread and starts a
signal thread that ``sigwait``\ s for them and treats SIGHUP like SIGTERM: *stop*.  A second
``sigwait`` thread for reloads would race it (the kernel hands the signal to either waiter).
Linux gives a process-directed signal to the main thread first whenever the main thread accepts
it, so ``milter.main()`` runs in a worker thread and the Python main thread, which never blocks
these signals, handles them: SIGHUP reloads, SIGTERM/SIGINT call ``milter.stop()`` (graceful:
open sessions finish).  libmilter's signal thread never sees a signal.

Reload (SIGHUP) is all or nothing: the new configuration and its plugins are built, and every
side listener whose settings changed (``[metrics]``, ``[policy]``, ``[socketmap]`` listen, the
policy socket's group) is started on its new address *before* anything is swapped, the maillog
follower restarted if ``[outbound] maillog``/``state_dir`` changed; if any step fails, the reload
is refused, the new listeners are closed and the old ones keep serving.  Only ``[milter] listen``,
``[milter] timeout`` and ``[log] format`` need a restart (libmilter opens its socket and reads its
timeout once; the log handler is set up once); a change is logged as such.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import Milter
import milter

from milterd.core.app import App, Dispatcher, build_dispatcher
from milterd.core.config import Config, ConfigError, load_config
from milterd.core.logs import set_level, setup_logging
from milterd.core.metrics import MetricsServer
from milterd.inbound.milter_adapter import LIBMILTER_MODE, session_class
from milterd.core.listeners import ListenerError, prepare_unix_socket, set_socket_group, whoami
from milterd.inbound.policy_server import PolicyServer

log = logging.getLogger(__name__)

MILTER_NAME = "milterd"

# Settings read once at start; a reload that changes one logs that it waits for a restart.
RESTART_KEYS: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("milter.listen", lambda c: c.milter.listen),
    ("milter.timeout", lambda c: c.milter.timeout),
    ("log.format", lambda c: c.log.format),
)


@dataclass
class _Service:
    """A side service and the settings it was started with (compared at reload)."""

    name: str            # the config key a change of which restarts it, e.g. "metrics.listen"
    settings: Any
    handle: Any          # has stop(); may have reconfigure(config)


@dataclass
class _Swap:
    """At reload: a side listener to replace (old None: new key; new None: key removed)."""

    old: _Service | None
    new: _Service | None
    old_stopped: bool = False   # the old one had to stop first (it held the new address)


def _listen_text(service: _Service) -> str:
    settings = service.settings
    if service.name == "policy.listen":
        listen, group = settings
        return f"on {listen}" + (f" (group {group})" if group else "")
    if service.name == "outbound.maillog":
        maillog, state_dir = settings
        return f"follows {maillog}" + (f" (state in {state_dir})" if state_dir else "")
    return f"on {settings}"


def _settings(name: str, c: Config) -> Any:
    """What a side listener depends on; None: not configured."""
    if name == "metrics.listen":
        return c.metrics_listen
    if name == "policy.listen":
        pl = c.policy_listen
        return None if pl is None else (pl, c.policy_group if pl.is_unix else None)
    if name == "socketmap.listen":
        return c.socketmap_listen
    if name == "outbound.maillog":
        ob = c.outbound
        return None if ob.maillog is None else (ob.maillog, ob.state_dir)
    raise KeyError(name)


# Side services, in start order.  The maillog follower is replaced by stopping the old one first
# (two followers of one log would count its lines twice), the listeners by starting the new one
# first (the old one serves until the new one does).
_LISTENERS = ("metrics.listen", "policy.listen", "socketmap.listen", "outbound.maillog")
_STOP_FIRST = ("outbound.maillog",)


class Daemon:
    def __init__(self, config_path: str | None, config: Config, *,
                 extra_plugins: tuple[tuple[str, object], ...] = (),
                 log_format: str | None = None):
        self.config_path = config_path
        self.config = config
        self.log_format = log_format  # --log-format: [log] format does not matter then
        self.extra_plugins = extra_plugins
        self.app = App(config)
        self.app.dispatcher = self._build(config)
        self._config_metrics(config)
        self._services: list[_Service] = []
        self._store: Any = None   # milterd.store.service.StoreService once side servers run
        self._watch: Any = None   # milterd.watch.service (certificate history, MX probes)
        self._reload_lock = threading.Lock()

    def _build(self, config: Config) -> Dispatcher:
        return build_dispatcher(self.app, config, extra_plugins=self.extra_plugins)

    def _config_metrics(self, config: Config) -> None:
        """The series a configuration brings: zeros for its domains, its certificates' expiry."""
        # Labelled as the counters are: the partner's domain (an entry without its leading dot).
        self.app.metrics.prime_domains(
            tuple(dict.fromkeys(e.lstrip(".") for e in config.receive_entries)),
            tuple(dict.fromkeys(e.lstrip(".") for e in config.send_entries)))
        from milterd.certs.expiry import certificate_expiry

        paths = _configured_cert_paths(config)
        gauge = self.app.metrics.certificate_expiry
        gauge.clear()
        for path, subject, not_after in certificate_expiry(paths):
            gauge.labels(path=path, subject=subject).set(not_after)
        self._export_tlsrpt_outcomes(config.outbound.state_dir)

    def _export_tlsrpt_outcomes(self, state_dir: str | None) -> None:
        """``milterd tlsrpt send`` runs from a timer, not in the daemon: it leaves its per-domain
        outcome in ``<state_dir>/tlsrpt.prom``, which /metrics passes on (re-pointed on reload)."""
        from milterd.outbound.tlsrpt_send import TlsRptFileCollector

        old = getattr(self, "_tlsrpt_collector", None)
        if old is not None and state_dir is not None and str(old.path.parent) == state_dir:
            return
        if old is not None:
            self.app.metrics.registry.unregister(old)
            self._tlsrpt_collector = None
        if state_dir:
            self._tlsrpt_collector = TlsRptFileCollector(state_dir)
            self.app.metrics.registry.register(self._tlsrpt_collector)

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Load the config file again and apply it whole, or refuse it whole (the old one keeps
        serving, listeners included).  Returns success."""
        with self._reload_lock:
            try:
                new_config = load_config(self.config_path)
                dispatcher = self._build(new_config)
            except ConfigError as exc:
                return self._refuse_reload("; ".join(exc.errors))
            except Exception as exc:
                return self._refuse_reload(str(exc))
            try:
                replaced = self._prepare_listeners(new_config)
            except Exception as exc:
                return self._refuse_reload(f"{exc} (the running listener, if any, keeps "
                                           "serving)")
            for key, value in RESTART_KEYS:
                old, new = value(self.config), value(new_config)
                if old != new and not (key == "log.format" and self.log_format):
                    log.warning("reload: %s changed (%r -> %r); it takes effect at the next "
                                "restart (until then: %r)", key, old, new, old)
            if new_config.milter.group != self.config.milter.group:
                self._milter_socket_group(new_config)
            # -- commit: nothing below refuses --------------------------------------------------
            for swap in replaced:
                if swap.old is not None:
                    if not swap.old_stopped:
                        self._stop(swap.old)
                    self._services.remove(swap.old)
                if swap.new is not None:
                    self._services.append(swap.new)
                    log.info("reload: %s now %s", swap.new.name, _listen_text(swap.new))
                else:
                    log.info("reload: %s removed: stopped", swap.old.name)
            changed = {swap.new.name for swap in replaced if swap.new is not None}
            self.config = new_config
            self.app.config = new_config
            for service in self._services:
                if service.name not in changed and hasattr(service.handle, "reconfigure"):
                    service.handle.reconfigure(new_config)
            if self._store is not None:
                self._store.reconfigure(new_config)
            if self._watch is not None:
                self._watch.reconfigure(new_config)
            set_level(new_config)
            self._config_metrics(new_config)
            self.app.dispatcher = dispatcher  # atomic swap; open sessions keep their own
            self.app.metrics.config_reloads.labels(result="ok").inc()
            log.info("configuration reloaded from %s (plugins: %s)", self.config_path or
                     "<default>", ", ".join(dispatcher.plugin_names))
            return True

    def _refuse_reload(self, why: str) -> bool:
        log.error("reload refused, keeping the running configuration: %s", why)
        self.app.metrics.config_reloads.labels(result="refused").inc()
        return False

    def _service(self, name: str) -> _Service | None:
        return next((s for s in self._services if s.name == name), None)

    def _prepare_listeners(self, new: Config) -> list[_Swap]:
        """Start every side service whose settings changed, on its new settings, before the
        old one stops (the maillog follower: after); returns the swaps for the commit.  A
        listener whose new address the old one still holds (same port, another spelling) is
        moved by stopping the old one first — and restarting it if the new one cannot start.  On any failure every new listener is
        closed again, every old one runs again, and :class:`ListenerError` says which key
        failed and why."""
        swaps: list[_Swap] = []
        regroup: _Service | None = None
        try:
            for name in _LISTENERS:
                old = self._service(name)
                settings = _settings(name, new)
                if (old.settings if old else None) == settings:
                    continue
                if settings is None:
                    swaps.append(_Swap(old, None))
                elif (name == "policy.listen" and old is not None
                        and old.settings[0] == settings[0]):
                    regroup = old  # the same socket, another group: below, as the last step
                else:
                    swaps.append(self._start_replacement(name, new, old))
            if regroup is not None:
                regroup.handle.set_group(new.policy_group)
                regroup.settings = _settings(regroup.name, new)
                log.info("reload: policy socket %s given to group %s", regroup.settings[0],
                         new.policy_group)
        except BaseException:
            for swap in reversed(swaps):
                self._undo(swap)
            raise
        return swaps

    def _start_replacement(self, name: str, new: Config, old: _Service | None) -> _Swap:
        if old is None or name not in _STOP_FIRST:
            try:
                return _Swap(old, self._start_listener(name, new))
            except ListenerError:
                if old is None:
                    raise
            # Perhaps the old listener holds the very address: stop it and try once more.
            log.info("reload: %s: stopping the running listener first (it may hold the new "
                     "address), and trying again", name)
        self._stop(old)
        try:
            return _Swap(old, self._start_listener(name, new), old_stopped=True)
        except ListenerError:
            self._undo(_Swap(old, None, old_stopped=True))
            raise

    def _undo(self, swap: _Swap) -> None:
        if swap.new is not None:
            self._stop(swap.new)
        if swap.old is not None and swap.old_stopped:
            try:
                swap.old.handle = self._start_listener(swap.old.name, self.config).handle
            except ListenerError as exc:
                self._services.remove(swap.old)
                log.critical("reload: the running %s listener could not be restarted; it is "
                             "not served now: %s", swap.old.name, exc)

    # -- side services -------------------------------------------------------------------------
    def start_side_servers(self) -> None:
        """Start metrics, policy, socketmap and the maillog follower; a listener that cannot
        be set up raises :class:`ListenerError` (naming its key) after stopping the others."""
        c = self.config
        try:
            for name in _LISTENERS:
                if _settings(name, c) is not None:
                    self._services.append(self._start_listener(name, c))
            # The store (schema, shipping the TLS-RPT journal, spools) starts last and never
            # blocks the start: a down store is retried in the background.
            from milterd.store.service import start_store_services
            from milterd.watch.service import prepare_watch, start_watch_services

            prepare_watch(self.app, c)  # the watch's spool: declared before the store starts
            self._store = start_store_services(self.app, c)
            self._watch = start_watch_services(self.app, c)
        except BaseException:
            self._stop_side_servers()
            raise

    def _start_listener(self, name: str, c: Config) -> _Service:
        if name == "metrics.listen":
            assert c.metrics_listen is not None
            handle: Any = MetricsServer(self.app.metrics, c.metrics_listen.host,
                                        c.metrics_listen.port)
            handle.start()
            log.info("metrics on http://%s/metrics", c.metrics_listen)
        elif name == "policy.listen":
            pl = c.policy_listen
            assert pl is not None
            if pl.is_unix:
                handle = PolicyServer(self.app.policy_views, path=pl.path, group=c.policy_group)
                log.info("policy delegation on %s (mode 0660, group %s)", pl,
                         c.policy_group or "unchanged")
            else:
                handle = PolicyServer(self.app.policy_views, pl.host, pl.port)
                log.info("policy delegation on %s (TCP: every local user can post "
                         "requests; prefer a unix socket)", pl)
            handle.start()
        elif name == "socketmap.listen":
            from milterd.outbound.service import start_socketmap

            try:
                handle = start_socketmap(self.app, c)
            except OSError as exc:  # asyncio words it its own way: the errno's text instead
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenerError(f"socketmap.listen: cannot listen on {c.socketmap_listen}: "
                                    f"{reason}") from None
            log.info("TLS policy socketmap on %s", c.socketmap_listen)
        elif name == "outbound.maillog":
            from milterd.outbound.service import start_maillog_follower

            try:
                handle = start_maillog_follower(self.app, c)
            except OSError as exc:
                raise ListenerError(f"outbound.maillog: cannot follow {c.outbound.maillog} "
                                    f"(state in {c.outbound.state_dir or 'its directory'}): "
                                    f"{exc.strerror or exc}") from None
            log.info("following %s for outbound TLS results", c.outbound.maillog)
        else:
            raise KeyError(name)
        return _Service(name, _settings(name, c), handle)

    def _stop(self, service: _Service) -> None:
        try:
            service.handle.stop()
        except Exception:
            log.exception("while stopping %s", service.name)

    def _stop_side_servers(self) -> None:
        if self._watch is not None:  # before the store: it feeds the store's spool
            try:
                self._watch.stop()
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("while stopping the partner watch")
            self._watch = None
        if self._store is not None:
            try:
                self._store.stop()
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("while stopping the store services")
            self._store = None
        for s in self._services:
            self._stop(s)
        self._services.clear()

    # -- the milter socket ---------------------------------------------------------------------
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
            # libmilter's "cannot opensocket" names neither the path nor the reason: check first.
            prepare_unix_socket(socket_path, key="milter.listen", group=c.milter.group or None,
                                dir_mode=0o755)
        else:
            _check_inet(c.milter.listen)
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
        self._milter_socket_group(c)

    def _milter_socket_group(self, c: Config) -> None:
        """Give the milter's unix socket to ``[milter] group`` (at start and at reload); a
        failure is logged, not fatal (the MTA may then not reach the socket)."""
        socket_path = _unix_path(self.config.milter.listen)  # the socket really open
        if not socket_path or not c.milter.group:
            return
        try:
            set_socket_group(socket_path, c.milter.group, group_key="milter.group")
        except ListenerError as exc:
            log.error("%s; the MTA may not reach the socket", exc)

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
                    try:
                        self.reload()
                    except Exception:  # a bug in reload must not stop the daemon
                        log.exception("reload failed; the running configuration stays")
                if stop_requested.is_set() and not stopping:
                    stopping = True
                    log.info("stop requested: finishing open sessions")
                    milter.stop()
            if failure:
                raise failure[0]
            self._wait_for_sessions()
        finally:
            self._stop_side_servers()
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


def _check_inet(spec: str) -> None:
    """Bind a probe to libmilter's ``inet:``/``inet6:`` address first: libmilter's own failure
    gives no reason (port in use, privileged port, a name that does not resolve)."""
    kind, _, rest = spec.partition(":")
    port_text, _, host = rest.partition("@")
    family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    host = host.strip("[]") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    try:
        address = socket.getaddrinfo(host, int(port_text), family, socket.SOCK_STREAM)[0][4]
    except (OSError, ValueError) as exc:
        raise ListenerError(f"milter.listen: cannot listen on {spec!r}: {host!r} does not "
                            f"resolve ({exc})") from None
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libmilter does
        probe.bind(address)
    except OSError as exc:
        who = f" for user {whoami()}" if exc.errno == errno.EACCES else ""
        raise ListenerError(f"milter.listen: cannot listen on {spec!r}: "
                            f"{exc.strerror or exc}{who}") from None
    finally:
        probe.close()


def _nodelay_listener(port: int) -> None:
    """TCP_NODELAY on libmilter's listening socket (Linux hands it on to accepted sockets).

    libmilter writes e.g. an added header and the final reply as separate small segments; with
    Nagle each second segment waits for the MTA's delayed ACK (~40 ms a message on loopback).
    Measured (bench/): one session over inet 88.6 -> 44.5 ms/message; the rest is the MTA's side.
    """
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (s.family in (socket.AF_INET, socket.AF_INET6)
                    and s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and s.getsockname()[1] == port):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        daemon = Daemon(config_path, config, log_format=log_format)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    started = time.monotonic()
    try:
        return daemon.run()
    except milter.error as exc:
        log.error("milter error after %.1fs: %s", time.monotonic() - started, exc)
        return 1
