"""The daemon's store services: open ``[store] url``, keep its schema in place, ship the journals.

:func:`start_store_services` (called by the daemon after its other side services, stopped before
them) returns a :class:`StoreService` that

* opens the store and runs ``migrate()`` in a background thread — retried with backoff while the
  store is down, so mail flow never waits for it — then checks it every :data:`PING_INTERVAL`
  seconds (``milterd_store_up`` stays true when nothing is written);
* ships ``<[outbound] state_dir>/tlsrpt-sessions.jsonl`` (the maillog follower's TLS-RPT records)
  into the store as ``tlsrpt-session`` records when ``[outbound] maillog`` is set
  (:mod:`milterd.store.spool` states the record contract), with this host's watermark and roster
  record (how far it has shipped: ``milterd tlsrpt send`` waits for every host's);
* runs the :class:`~milterd.store.spool.Spool`\\ s other features ask for
  (:func:`register_spool` + :func:`submit`: never blocking, from any thread);
* exposes the store to other services per app: :func:`current_store` (None until the schema is
  in place, and while no store service runs), e.g. the MTA-STS policy cache shared by the fleet.

A reload that changes ``[store]``, ``[outbound] maillog``/``state_dir`` or ``[tlsrpt]
sending_ip`` restarts the shippers and spools (on the new store); what was not shipped stays in
the journals and is shipped from there.  The metrics (:class:`~milterd.store.spool.StoreMetrics`)
are registered once per app in its registry and outlive restarts.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from milterd.store.api import Store, StoreError, open_store, redact
from milterd.store.spool import (BACKOFF_MAX, BACKOFF_MIN, Shipper, Spool, StoreHealth,
                                 StoreMetrics, records_apply, tlsrpt_converter,
                                 watermark_writer)

__all__ = ["start_store_services", "StoreService", "current_store", "store_metrics",
           "register_spool", "submit", "SESSIONS_FILE"]

log = logging.getLogger("milterd.store")

SESSIONS_FILE = "tlsrpt-sessions.jsonl"
TLSRPT_SHIPPER_STATE = "store-tlsrpt-sessions.shipped"
PING_INTERVAL = 30.0

_METRICS: "weakref.WeakKeyDictionary[Any, StoreMetrics]" = weakref.WeakKeyDictionary()
_SERVICES: "weakref.WeakKeyDictionary[Any, StoreService]" = weakref.WeakKeyDictionary()
_SPOOLS: "weakref.WeakKeyDictionary[Any, dict[str, Callable[[Store, list[dict]], Any]]]" = \
    weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def store_metrics(app: Any) -> StoreMetrics:
    """The app's store metrics, registered in ``app.metrics.registry`` on first use."""
    with _LOCK:
        m = _METRICS.get(app)
        if m is None:
            m = _METRICS[app] = StoreMetrics(app.metrics.registry)
        return m


def current_store(app: Any) -> Store | None:
    """The running store service's store once its schema is in place, else None."""
    service = _SERVICES.get(app)
    return service.store if service is not None and service.ready.is_set() else None


def current_cache_store(app: Any) -> Store | None:
    """Like :func:`current_store`, on a connection of its own for short reads (the MTA-STS
    cache), so they never queue behind a shipper's batch."""
    service = _SERVICES.get(app)
    return service.cache_store if service is not None and service.ready.is_set() else None


def register_spool(app: Any, name: str, apply: Callable[[Store, list[dict]], Any]) -> None:
    """Declare a spool ``name`` whose items are applied by ``apply(store, items)`` (which must
    raise unless the store committed them).  Takes effect at the next (re)start of the store
    services; call it before the daemon starts them."""
    with _LOCK:
        _SPOOLS.setdefault(app, {})[name] = apply


def submit(app: Any, name: str, item: dict) -> bool:
    """Queue ``item`` for spool ``name``; never blocks.  False when refused (no store service,
    no such spool, spool full — counted in ``milterd_store_spool_dropped_total``)."""
    service = _SERVICES.get(app)
    spool = service.spools.get(name) if service is not None else None
    if spool is None:
        if service is not None:
            service.metrics.dropped.inc()
        return False
    return spool.submit(item)


def _settings(config: Any) -> tuple:
    s, ob = config.store, config.outbound
    return (s.url, s.spool_dir or ob.state_dir, s.spool_max_mb, s.host_name,
            config.tlsrpt.sending_ip, ob.maillog, ob.state_dir)


class StoreService:
    def __init__(self, app: Any, config: Any):
        self.app = app
        self.metrics = store_metrics(app)
        self.settings = _settings(config)
        self.spools: dict[str, Spool] = {}
        self.shippers: list[Shipper] = []
        self._start(config)

    # -- life cycle -------------------------------------------------------------------------
    def _start(self, config: Any) -> None:
        url, spool_dir, max_mb, host, sending_ip, maillog, state_dir = self.settings
        self.url = url
        self.store: Store = open_store(url)
        self.cache_store: Store = open_store(url)
        if getattr(self, "health", None) is None or self.health.url != url:
            self.health = StoreHealth(self.metrics, url)   # an outage outlives a restart
        self.ready = threading.Event()
        self._stop = threading.Event()
        spool_dir = spool_dir or (os.path.dirname(maillog) if maillog else None)
        if maillog:
            sdir = Path(state_dir or os.path.dirname(maillog) or ".")
            shipdir = Path(spool_dir or sdir)
            shipdir.mkdir(parents=True, exist_ok=True)
            store = self.store
            self.shippers.append(Shipper(
                sdir / SESSIONS_FILE, shipdir / TLSRPT_SHIPPER_STATE,
                records_apply(lambda: store, tlsrpt_converter(host, sending_ip)), self.health,
                name="tlsrpt-sessions", gate=self.ready, max_bytes=max_mb << 20,
                caught_up=watermark_writer(lambda: store, host)).start())
        with _LOCK:
            wanted = dict(_SPOOLS.get(self.app, {}))
        if wanted and spool_dir:
            for name, apply in wanted.items():
                store = self.store
                self.spools[name] = Spool(
                    spool_dir, f"store-spool-{name}",
                    lambda items, a=apply, st=store: a(st, items), self.health,
                    max_bytes=max_mb << 20, gate=self.ready).start()
        elif wanted:
            log.warning("store: no [store] spool_dir (nor [outbound] state_dir): spools %s are "
                        "not run", ", ".join(sorted(wanted)))
        self._thread = threading.Thread(target=self._keeper, name="milterd-store", daemon=True)
        if (url.startswith("sqlite:///") and not os.path.isdir(os.path.dirname(url[9:]))
                and not self.shippers and not self.spools):
            # The default url under a state_dir that does not exist, and nothing to record
            # (no maillog, no spool): not an outage, just no store (`milterd demo`, tests).
            log.info("store %s: its directory does not exist and nothing needs it: not used",
                     redact(url))
            with _LOCK:
                _SERVICES[self.app] = self
            return
        self._thread.start()
        with _LOCK:
            _SERVICES[self.app] = self
        log.info("store %s%s", redact(url),
                 f"; TLS-RPT records shipped from {self.shippers[0].path}" if self.shippers
                 else "")

    def _keeper(self) -> None:
        """Migrate (retried with backoff), then check the store now and then."""
        delay = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                version = self.store.migrate()
            except StoreError as exc:
                self.health.failed(exc, write=False)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            log.info("store %s: schema version %d", redact(self.url), version)
            self.health.ok()
            self.ready.set()
            for s in self.shippers:
                s.notify()
            break
        while not self._stop.wait(PING_INTERVAL):
            try:
                self.store.ping()
            except StoreError as exc:
                self.health.failed(exc, write=False)
            else:
                self.health.ok()

    def _shutdown(self, timeout: float) -> None:
        with _LOCK:
            if _SERVICES.get(self.app) is self:
                del _SERVICES[self.app]
        self._stop.set()
        for spool in self.spools.values():
            spool.stop(timeout)
        for shipper in self.shippers:
            shipper.stop(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.spools, self.shippers = {}, []
        for store in (self.store, self.cache_store):
            try:
                store.close()
            except Exception:  # noqa: BLE001
                pass

    # -- the daemon's interface --------------------------------------------------------------
    def reconfigure(self, config: Any) -> None:
        settings = _settings(config)
        if settings == self.settings:
            return
        log.info("reload: store settings changed: restarting the store services on %s",
                 redact(config.store.url))
        self._shutdown(10.0)
        self.settings = settings
        self._start(config)

    def stop(self, timeout: float = 10.0) -> None:
        self._shutdown(timeout)


def start_store_services(app: Any, config: Any) -> StoreService:
    """Start the store services for ``app`` (see the module docstring); never waits for the
    store itself."""
    return StoreService(app, config)
