"""The running daemon's shared objects, and the one place where hooks are called.

:class:`App` lives as long as the process (metrics, the policy-delegation store).  A
:class:`Dispatcher` is built per configuration: a reload builds a new one and swaps it in; each
SMTP connection keeps the dispatcher it started with, and every hook gets that dispatcher's
configuration as ``config`` — so a reload never changes policy in the middle of a session.
(``app.config`` is the *live* configuration, for process-wide services; plugins never read it.)

:meth:`Dispatcher.verdict` is the error boundary of the style guide: a plugin that raises,
overruns ``plugin_timeout`` or returns what its hook does not allow becomes the configured
``on_error`` verdict, a log line (with the queue ID; the connection id comes with every line of
a session, see :mod:`milterd.core.logs`) and a count in ``milterd_plugin_errors_total`` — never a
crash and never exception text in an SMTP reply.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pluggy

from milterd.core.config import Config
from milterd.core.metrics import Metrics
from milterd.inbound.policy_views import PolicyViews
from milterd.session import Connection, Message, Stash
from milterd.verdict import (CONTINUE, Action, AddHeader, DeleteHeader, HeaderEdit, Verdict,
                             compose)

log = logging.getLogger(__name__)

PLUGIN_ERROR = "plugin_error"


class App:
    """Process-wide state handed to every hook as ``app``.

    ``config`` is the live configuration: a reload replaces it.  It is for process-wide
    services (the outbound counters); hooks get their session's snapshot as ``config``.
    """

    def __init__(self, config: Config, *, metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self.policy_views = PolicyViews()
        self.stash = Stash()
        self.dispatcher: Dispatcher | None = None
        self.config = config
        self._open_sessions = 0
        self._sessions_lock = threading.Lock()
        self.metrics.sessions_open.set_function(lambda: self.open_sessions)

    # MTA connections being served: a graceful stop waits for them (see Daemon.run).
    @property
    def open_sessions(self) -> int:
        return self._open_sessions

    def session_opened(self) -> None:
        with self._sessions_lock:
            self._open_sessions += 1

    def session_closed(self) -> None:
        with self._sessions_lock:
            self._open_sessions -= 1


class _Impl:
    __slots__ = ("plugin", "function", "argnames")

    def __init__(self, plugin: str, function: Callable[..., Any], argnames: tuple[str, ...]):
        self.plugin = plugin
        self.function = function
        self.argnames = argnames


class Dispatcher:
    """Calls the hooks of one plugin manager for one configuration."""

    def __init__(self, app: App, config: Config, pm: pluggy.PluginManager):
        self.app = app
        self.config = config
        self.pm = pm
        self._impls: dict[str, list[_Impl]] = {}
        for name in dir(pm.hook):
            if not name.startswith("milterd_"):
                continue
            caller = getattr(pm.hook, name)
            # pluggy calls the last-registered (and tryfirst) implementations first.
            self._impls[name] = [
                _Impl(pm.get_name(i.plugin) or repr(i.plugin), i.function, tuple(i.argnames))
                for i in reversed(caller.get_hookimpls())
                if getattr(i.function, "milterd_only_if", None) is None
                or i.function.milterd_only_if(config)
            ]
        self.timeout = config.milter.plugin_timeout
        if config.milter.on_error == "tempfail":
            self.error_verdict = Verdict(Action.TEMPFAIL, "451", "4.3.0",
                                         "Temporary local policy failure, try again later",
                                         PLUGIN_ERROR)
        else:
            self.error_verdict = Verdict(Action.CONTINUE, reason=PLUGIN_ERROR)
        self.plugin_names = sorted({i.plugin for impls in self._impls.values() for i in impls})

    def has_impls(self, hook: str) -> bool:
        return bool(self._impls.get(hook))

    def configure(self) -> None:
        """Run ``milterd_configure``; unlike the SMTP hooks, an error here propagates (the
        configuration is refused)."""
        for impl in self._impls.get("milterd_configure", ()):
            kwargs = {"app": self.app, "config": self.config}
            impl.function(*[kwargs[a] for a in impl.argnames])

    def _call(self, hook: str, kwargs: dict[str, Any], queue_id: str | None,
              allowed: Callable[[Any], str | None]) -> tuple[list[tuple[_Impl, Any]], bool]:
        """Each implementation's non-None result, in call order, with the error verdict in the
        place of a failed one; and whether any failed.  ``allowed(result)`` names what is wrong
        with a result (None: nothing)."""
        results = []
        failed = False
        for impl in self._impls.get(hook, ()):
            start = time.monotonic()
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception:
                log.exception("plugin %s failed in %s (queue_id=%s); on_error=%s", impl.plugin,
                              hook, queue_id or "-", self.config.milter.on_error)
                self._count_error(impl, hook, results)
                failed = True
                continue
            elapsed = time.monotonic() - start
            if elapsed > self.timeout:
                # A hook cannot be interrupted safely inside libmilter's thread; treat the overrun
                # as an error so a slow dependency cannot turn into silent acceptance.
                log.error("plugin %s overran plugin_timeout in %s: %.3fs (queue_id=%s); "
                          "on_error=%s", impl.plugin, hook, elapsed, queue_id or "-",
                          self.config.milter.on_error)
                self._count_error(impl, hook, results)
                failed = True
                continue
            if result is None:
                continue
            problem = allowed(result)
            if problem is not None:
                log.error("plugin %s returned %r from %s, %s (queue_id=%s); on_error=%s",
                          impl.plugin, type(result).__name__, hook, problem, queue_id or "-",
                          self.config.milter.on_error)
                self._count_error(impl, hook, results)
                failed = True
                continue
            results.append((impl, result))
        return results, failed

    def _count_error(self, impl: _Impl, hook: str, results: list[tuple[_Impl, Any]]) -> None:
        self.app.metrics.plugin_errors.labels(plugin=impl.plugin, hook=hook).inc()
        results.append((impl, self.error_verdict))

    def notify(self, hook: str, **kwargs: Any) -> Verdict | None:
        """Observation hooks (they must return None): None when every implementation ran
        cleanly, else the error verdict, for the caller to apply where the MTA still listens."""
        message = kwargs.get("message")
        _, failed = self._call(hook, {"app": self.app, "config": self.config, **kwargs},
                               message.queue_id if message is not None else None,
                               _observation_result)
        return self.error_verdict if failed else None

    def verdict(self, hook: str, connection: Connection, message: Message,
                **extra: Any) -> Verdict:
        kwargs = {"app": self.app, "config": self.config, "connection": connection,
                  "message": message, **extra}
        verdicts = []
        for impl, result in self._call(hook, kwargs, message.queue_id, _verdict_result)[0]:
            if result.action is not Action.CONTINUE and not result.plugin:
                result = Verdict(result.action, result.code, result.xcode, result.text,
                                 result.reason, impl.plugin)
            verdicts.append(result)
        return compose(verdicts) if verdicts else CONTINUE

    def header_edits(self, connection: Connection, message: Message) -> list[HeaderEdit] | None:
        """All plugins' edits, or None when a plugin failed (the caller applies on_error)."""
        kwargs = {"app": self.app, "config": self.config, "connection": connection,
                  "message": message}
        results, failed = self._call("milterd_header_edits", kwargs, message.queue_id,
                                     _header_edits_result)
        if failed:
            return None
        edits: list[HeaderEdit] = []
        for _impl, result in results:
            edits.extend(result)
        return edits


def _observation_result(result: Any) -> str | None:
    return "but the hook only observes (it must return None)"


def _verdict_result(result: Any) -> str | None:
    return None if isinstance(result, Verdict) else "not a Verdict"


def _header_edits_result(result: Any) -> str | None:
    if isinstance(result, (list, tuple)) and all(isinstance(e, (AddHeader, DeleteHeader))
                                                 for e in result):
        return None
    return "not a list of AddHeader/DeleteHeader"


def build_dispatcher(app: App, config: Config, *, load_entrypoints: bool = True,
                     extra_plugins: tuple[tuple[str, object], ...] = ()) -> Dispatcher:
    """Load plugins for ``config`` and run their configure hooks; raises on any failure."""
    from milterd.core.plugins import make_plugin_manager

    pm = make_plugin_manager(config, load_entrypoints=load_entrypoints,
                             extra_plugins=extra_plugins)
    dispatcher = Dispatcher(app, config, pm)
    dispatcher.configure()
    return dispatcher
