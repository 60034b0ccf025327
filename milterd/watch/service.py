"""The partner certificate watch's background services (#18), beside the store services.

* :func:`prepare_watch` declares the ``partner-cert`` spool (:func:`milterd.store.service.
  register_spool`); the daemon calls it before it starts the store services.
* :func:`start_watch_services` (after the store services; stopped before them) makes the app's
  :class:`~milterd.watch.state.WatchState` (which the ``partner_watch`` plugin feeds from the
  milter) and runs two daemon threads:

  - **history**: reads the fleet's ``partner-cert`` observations from the store at start (every
    :data:`SEED_POLL` s until the store answers) and then every ``refresh`` seconds
    (:data:`REFRESH_INTERVAL`), so a certificate another host recorded is not new here.  A store
    that fails is logged once per outage; the state keeps what it knows.  No store within
    :data:`~milterd.watch.state.SEED_GRACE` s: judged by this host's own sightings (logged).
  - **probes** (``[watch] probe_interval`` > 0): every send partner that is a domain (not a
    ``.parent`` entry: :func:`~milterd.watch.probe.probe_partner`) is probed once per interval,
    the first time after a random delay of up to a tenth of the interval (at most
    :data:`FIRST_SPREAD` s), then every interval ±10 % (jitter: a fleet does not probe in step),
    at most :data:`PROBE_CONCURRENCY` partners at a time, each bounded by
    ``probe_timeout × (probe_max_hosts + 2)``.  Each host's certificate is an outbound sighting
    (``WatchState.observe``, notAfter from the certificate); the expiry shown is the soonest of
    the partner's MX hosts; ``milterd_partner_probe_success`` is 1 when every probed MX host
    would pass the partner's terms (0 when one would not: Postfix would defer to it), and the
    round's result per host goes to the store (kind ``partner-probe``, key ``entry|host``) for
    ``milterd partners``.  A probe error is logged and the next round comes; it never ends the
    thread.

Nothing here runs on a milter callback; the store is only touched from these threads and
through the never-blocking spool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any

from milterd.watch import state as st

__all__ = ["prepare_watch", "start_watch_services", "WatchService", "REFRESH_INTERVAL"]

log = logging.getLogger("milterd.watch")

REFRESH_INTERVAL = 60.0     # seconds between reads of the fleet's history
SEED_POLL = 0.25            # seconds between tries while the first history is not in
PROBE_CONCURRENCY = 2       # partners probed at the same time
FIRST_SPREAD = 10.0         # the first probe of a partner: within min(interval/10, this) s
STOP_TIMEOUT = 5.0


def prepare_watch(app: Any, config: Any) -> None:
    """Declare the watch's store spool; call before the store services start."""
    from milterd.store.service import register_spool

    register_spool(app, st.SPOOL, st.apply_observations)


def start_watch_services(app: Any, config: Any, *,
                         refresh_interval: float = REFRESH_INTERVAL) -> "WatchService":
    """Start the watch for ``app`` (see the module docstring); never waits for the store."""
    return WatchService(app, config, refresh_interval=refresh_interval)


class WatchService:
    def __init__(self, app: Any, config: Any, *, refresh_interval: float = REFRESH_INTERVAL):
        from milterd.store.service import submit

        self.app = app
        self.config = config
        self.refresh_interval = refresh_interval
        self.state = st.WatchState(st.watch_metrics(app), config,
                                   submit=lambda item: submit(app, st.SPOOL, item))
        st.set_current_state(app, self.state)
        self._stop = threading.Event()
        self._wake_history = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task | None = None
        self._failing = False
        self._last_ok: dict[str, bool] = {}
        self.rounds = 0                                   # probes finished (tests, logs)
        self._history = threading.Thread(target=self._history_loop, name="milterd-watch",
                                         daemon=True)
        self._history.start()
        self._prober = threading.Thread(target=self._probe_thread, name="milterd-watch-probe",
                                        daemon=True)
        self._prober.start()

    # -- the daemon's interface --------------------------------------------------------------
    def reconfigure(self, config: Any) -> None:
        self.config = config
        self.state.configure(config)
        self._wake_history.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: stopping
                pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stop.set()
        self._wake_history.set()
        loop, main = self._loop, self._main
        if loop is not None and main is not None:
            try:
                loop.call_soon_threadsafe(main.cancel)
            except RuntimeError:
                pass
        for t in (self._prober, self._history):
            t.join(timeout)
        if st.current_state(self.app) is self.state:
            st.set_current_state(self.app, None)

    # -- history -----------------------------------------------------------------------------
    def _history_loop(self) -> None:
        from milterd.store.service import current_store

        while not self._stop.is_set():
            store = current_store(self.app)
            if store is not None:
                try:
                    added = self.state.merge_history(store.observations(st.KIND))
                except Exception as exc:  # noqa: BLE001 - StoreError or a bug: keep going
                    if not self._failing:
                        self._failing = True
                        log.warning("partner watch: cannot read the certificate history from "
                                    "the store (%s); using what is known", exc)
                else:
                    if self._failing:
                        self._failing = False
                        log.info("partner watch: certificate history read again")
                    if added:
                        log.info("partner watch: %d certificate(s) new to this host learnt "
                                 "from the fleet's history", added)
            if not self.state.seeded and \
                    self.state.clock() - self.state.created > st.SEED_GRACE:
                log.info("partner watch: no store answered within %g s: certificates are "
                         "judged new by this host's own sightings until it does", st.SEED_GRACE)
                self.state.seed_locally()
            wait = SEED_POLL if not self.state.seeded else self.refresh_interval
            self._wake_history.wait(wait)
            self._wake_history.clear()

    # -- probes ------------------------------------------------------------------------------
    def _probe_thread(self) -> None:
        try:
            asyncio.run(self._probe_main())
        except asyncio.CancelledError:   # stop()
            pass
        except Exception:  # noqa: BLE001 - a bug here must not take anything else down
            log.exception("partner watch: the probe scheduler stopped")

    async def _probe_main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._main = asyncio.current_task()
        if self._stop.is_set():
            return
        due: dict[str, float] = {}
        running: dict[str, asyncio.Task] = {}
        sem = asyncio.Semaphore(PROBE_CONCURRENCY)
        try:
            while not self._stop.is_set():
                cfg = self.config
                interval = cfg.watch.probe_interval
                now = time.time()
                partners = {p.entry: p for p in cfg.partners
                            if p.send and not p.entry.startswith(".")} if interval > 0 else {}
                for entry in list(due):
                    if entry not in partners:
                        del due[entry]
                for entry in partners:
                    if entry not in due:
                        due[entry] = now + random.uniform(0, min(interval / 10, FIRST_SPREAD))
                for entry, p in partners.items():
                    if due[entry] <= now and entry not in running:
                        due[entry] = now + interval * random.uniform(0.9, 1.1)
                        running[entry] = asyncio.create_task(self._probe_one(p, cfg, sem))
                        running[entry].add_done_callback(
                            lambda t, e=entry: running.pop(e, None))
                nxt = min(due.values(), default=now + 3600) - time.time()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.05, min(nxt, 3600)))
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in list(running.values()):
                t.cancel()
            if running:
                await asyncio.gather(*running.values(), return_exceptions=True)

    async def _probe_one(self, partner: Any, cfg: Any, sem: asyncio.Semaphore) -> None:
        from milterd.outbound.dns import DnsClient
        from milterd.watch.probe import probe_partner

        w = cfg.watch
        async with sem:
            try:
                dns = DnsClient(nameservers=list(cfg.outbound.dns_servers) or None)
                results = await asyncio.wait_for(probe_partner(
                    partner, dns=dns, port=w.probe_port, timeout=w.probe_timeout,
                    max_hosts=w.probe_max_hosts, ca_file=w.probe_ca_file,
                    helo=w.probe_helo or cfg.store.host_name),
                    w.probe_timeout * (w.probe_max_hosts + 2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never ends the scheduler
                log.warning("partner watch: probing %s failed: %s", partner.entry, exc)
                return
        try:
            self._record(partner, results)
        except Exception:  # noqa: BLE001
            log.exception("partner watch: recording the probe of %s failed", partner.entry)
        self.rounds += 1

    def _record(self, partner: Any, results: list) -> None:
        from milterd.policy import reasons

        m = self.state.m
        label = partner.domain
        now = time.time()
        expiries = []
        for r in results:
            if not (r.cert_sha256 or r.pubkey_sha256):
                continue
            verify = ("fail" if r.reason == reasons.OUTBOUND_UNTRUSTED_CERT
                      else "ok" if r.ok or r.reason == reasons.OUTBOUND_NAME_MISMATCH else None)
            self.state.observe(
                partner.entry, st.OUTBOUND, cert_sha256=r.cert_sha256,
                pubkey_sha256=r.pubkey_sha256, subject=r.subject, issuer=r.issuer,
                not_after=r.not_after, verify=verify, result="pass" if r.ok else "fail",
                reason=r.reason, mta="probe", seen_at=r.probed_at or now,
                extra={"mx_host": r.mx_host, "address": r.address, "names": list(r.names),
                       "tls_version": r.tls_version, "detail": r.detail})
            if r.not_after is not None:
                expiries.append(r.not_after)
        if expiries:
            self.state.set_expiry(partner.entry, st.OUTBOUND, min(expiries))
        m.probe_timestamp.labels(label).set(now)
        if not results:
            return
        ok = all(r.ok for r in results)
        m.probe_success.labels(label).set(int(ok))
        if self._last_ok.get(partner.entry) != ok:
            bad = [r for r in results if not r.ok]
            if ok:
                log.info("partner watch: mail to %s would pass its terms (%d MX hosts)",
                         partner.entry, len(results))
            else:
                log.warning("partner watch: mail to %s would fail its terms: %s",
                            partner.entry, "; ".join(f"{r.mx_host or partner.domain}: "
                                                     f"{r.reason} ({r.detail})" for r in bad[:3]))
            self._last_ok[partner.entry] = ok
        self.state.submit({
            "kind": st.PROBE_KIND, "k": f"{partner.entry}|{self.state.host}", "d": label,
            "t": now, "h": self.state.host,
            "a": {"ok": ok, "host": self.state.host, "results": [
                {"mx_host": r.mx_host, "address": r.address, "ok": r.ok, "reason": r.reason,
                 "detail": r.detail, "cert_sha256": r.cert_sha256, "not_after": r.not_after}
                for r in results[:10]]}})
