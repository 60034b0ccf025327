"""The partner certificate watch's in-process view (#18): which certificates each partner has
presented, per direction, and the metrics about them.

:class:`WatchState` keeps, per ``(partner entry, direction)``, the set of certificate identities
known to the fleet and the facts of the newest one.  :meth:`WatchState.observe` is what a milter
callback (inbound) or a probe round (outbound) calls; it is O(1), takes one uncontended lock,
never touches the store and never raises:

* a certificate not known yet for the partner and direction is a *change*:
  ``milterd_partner_certificate_changes_total{partner,direction}`` + 1 (the first certificate
  ever seen counts too) and one INFO log line;
* ``milterd_partner_certificate_last_seen_timestamp_seconds`` is set to the sighting's time;
* ``milterd_partner_certificate_expiry_timestamp_seconds`` to the newest certificate's notAfter
  where it is known (outbound: the probe reads it from the certificate; inbound no MTA gives it
  to a milter or to a policy service, so it is known only when the same certificate was seen
  with its notAfter — by a probe of the partner's MX hosts, on any host of the fleet — else the
  series is removed rather than left at an older certificate's date);
* ``milterd_partner_certificate_pin_match`` (inbound, pinned partners only): 1 when the newest
  certificate matches one of the partner's pins (certificate SHA-256 or public-key SHA-256),
  else 0 — what enforcement would decide about it, shown in report mode too.  Pins are inbound
  terms: outbound (Postfix ``secure``) checks names and trust, not pins, so no outbound series;
* the sighting is queued for the store (:func:`milterd.store.service.submit`, spool
  ``partner-cert``: never blocks) as an observation (see :func:`apply_observations`).

Known identities come from the store: :meth:`WatchState.merge_history` adds every
``partner-cert`` observation of the fleet (the watch service calls it at start and every
``refresh`` seconds in a background thread), so a certificate another host has recorded is not
new here.  Until the first history arrives, sightings are judged *later*: they are kept
(bounded) and judged when it does — so a restart does not report every partner's certificate as
new.  If no store answers within :data:`SEED_GRACE` seconds the state judges by what it has seen
itself (logged once).

A certificate's identity: its SHA-256 fingerprint; else ``key:<public-key SHA-256>``; else (an
MTA that gives neither: Postfix without ``[policy]``) ``subject:<subject>/<issuer>`` — with
which a renewal under the same names is not visible.

Labels: ``partner`` is the partner's domain (the entry without a leading dot, as every other
partner metric), ``direction`` is ``inbound`` or ``outbound``: bounded by the configuration,
never by fingerprint.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["WatchState", "WatchMetrics", "watch_metrics", "current_state", "set_current_state",
           "apply_observations", "cert_identity", "observation_key", "KIND", "HOST_KIND",
           "PROBE_KIND", "SPOOL", "INBOUND", "OUTBOUND", "SEED_GRACE"]

log = logging.getLogger("milterd.watch")

KIND = "partner-cert"             # store kind: one row per (entry, direction, certificate)
HOST_KIND = "partner-cert-host"   # the same per host: key + "|" + host (who saw it, how often)
PROBE_KIND = "partner-probe"      # the last probe of a partner by a host: key entry|host
SPOOL = "partner-cert"            # the store spool the observations go through
INBOUND, OUTBOUND = "inbound", "outbound"
DIRECTIONS = (INBOUND, OUTBOUND)
SEED_GRACE = 60.0                 # seconds without a store before judging by local sightings
PENDING_MAX = 1000                # sightings held while the history is not known yet

_STATES: "weakref.WeakKeyDictionary[Any, WatchState]" = weakref.WeakKeyDictionary()
_METRICS: "weakref.WeakKeyDictionary[Any, WatchMetrics]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------- metrics

def define_metrics(registry: Any) -> dict[str, Any]:
    """The six watch metrics in ``registry`` (names fixed: contrib/prometheus uses them)."""
    from prometheus_client import Counter, Gauge

    pd = ["partner", "direction"]
    return dict(
        partner_cert_changes=Counter(
            "milterd_partner_certificate_changes", "Certificates not seen before from a "
            "partner (inbound: presented by its client; outbound: by its MX hosts to the probe)",
            pd, registry=registry),
        partner_cert_expiry=Gauge(
            "milterd_partner_certificate_expiry_timestamp_seconds", "notAfter of the newest "
            "certificate seen from a partner, where known", pd, registry=registry),
        partner_cert_last_seen=Gauge(
            "milterd_partner_certificate_last_seen_timestamp_seconds", "When a partner's "
            "certificate was last seen", pd, registry=registry),
        partner_cert_pin_match=Gauge(
            "milterd_partner_certificate_pin_match", "Pinned partners: 1 if the newest "
            "certificate matches a pin, else 0", pd, registry=registry),
        partner_probe_success=Gauge(
            "milterd_partner_probe_success", "1 if the last probe of every MX host of a send "
            "partner would pass its terms, else 0", ["partner"], registry=registry),
        partner_probe_timestamp=Gauge(
            "milterd_partner_probe_timestamp_seconds", "When a send partner was last probed",
            ["partner"], registry=registry),
    )


class WatchMetrics:
    def __init__(self, metrics: dict[str, Any]):
        self.changes = metrics["partner_cert_changes"]
        self.expiry = metrics["partner_cert_expiry"]
        self.last_seen = metrics["partner_cert_last_seen"]
        self.pin_match = metrics["partner_cert_pin_match"]
        self.probe_success = metrics["partner_probe_success"]
        self.probe_timestamp = metrics["partner_probe_timestamp"]


def watch_metrics(app: Any) -> WatchMetrics:
    """The app's watch metrics: the ones :class:`milterd.core.metrics.Metrics` defines when it
    does (``metrics.partner_cert_changes`` …), else registered once per app in its registry."""
    with _LOCK:
        wm = _METRICS.get(app)
        if wm is None:
            m = app.metrics
            if hasattr(m, "partner_cert_changes"):
                found = {k: getattr(m, k) for k in (
                    "partner_cert_changes", "partner_cert_expiry", "partner_cert_last_seen",
                    "partner_cert_pin_match", "partner_probe_success", "partner_probe_timestamp")}
            else:
                found = define_metrics(m.registry)
            wm = _METRICS[app] = WatchMetrics(found)
        return wm


def current_state(app: Any) -> "WatchState | None":
    return _STATES.get(app)


def set_current_state(app: Any, state: "WatchState | None") -> None:
    with _LOCK:
        if state is None:
            _STATES.pop(app, None)
        else:
            _STATES[app] = state


# ------------------------------------------------------------------------------------- identity

def cert_identity(cert_sha256: str | None, pubkey_sha256: str | None, subject: str | None,
                  issuer: str | None) -> str | None:
    if cert_sha256:
        return cert_sha256
    if pubkey_sha256:
        return "key:" + pubkey_sha256
    if subject:
        return f"subject:{subject}/{issuer or ''}"
    return None


def observation_key(entry: str, direction: str, ident: str) -> str:
    return f"{entry}|{direction}|{ident}"


def parse_key(key: str) -> tuple[str, str, str] | None:
    parts = key.split("|", 2)
    if len(parts) != 3 or parts[1] not in DIRECTIONS:
        return None
    return parts[0], parts[1], parts[2]


# ------------------------------------------------------------------------------------- state

@dataclass
class _Slot:
    """One (entry, direction): what is known, the newest certificate, its metric children."""

    entry: str
    direction: str
    changes: Any
    last_seen: Any                       # created at the first sighting
    known: set
    newest: str | None = None
    newest_pin: int | None = None
    newest_expiry: float | None = None
    newest_certs: tuple = (None, None)     # (cert_sha256, pubkey_sha256) of the newest


class WatchState:
    """See the module docstring.  ``submit(item)`` queues a store item (never blocks)."""

    def __init__(self, metrics: WatchMetrics, config: Any, *,
                 submit: Callable[[dict], Any] | None = None, host: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.m = metrics
        self.clock = clock
        self.submit = submit or (lambda item: False)
        self.host = host or config.store.host_name
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._expiry_of: dict[str, float] = {}     # identity -> notAfter (from any source)
        self._pending: list[tuple[_Slot, str, str]] = []   # (slot, ident, text) before history
        self.seeded = False
        self.created = clock()
        self.partners: dict[str, Any] = {}
        self.configure(config)

    # -- configuration ------------------------------------------------------------------------
    def configure(self, config: Any) -> None:
        """Partners of ``config``: series at 0 for every partner × direction it covers, pins
        re-evaluated for the newest certificates, series of partners gone removed."""
        partners = {p.entry: p for p in config.partners}
        with self._lock:
            self.partners = partners
            wanted = set()
            for p in partners.values():
                for direction, on in ((INBOUND, p.receive), (OUTBOUND, p.send)):
                    if on:
                        wanted.add((p.entry, direction))
                        self._slot(p.entry, direction)
            domains = {p.domain for p in partners.values()}
            for key in list(self._slots):
                slot = self._slots[key]
                if key not in wanted and slot.entry not in partners:
                    del self._slots[key]
                    label = slot.entry.lstrip(".")
                    if label not in domains:
                        for g in (self.m.changes, self.m.last_seen, self.m.expiry,
                                  self.m.pin_match):
                            _remove(g, label, slot.direction)
                        if slot.direction == OUTBOUND:
                            _remove(self.m.probe_success, label)
                            _remove(self.m.probe_timestamp, label)
            for slot in self._slots.values():
                if slot.direction == INBOUND and slot.newest is not None:
                    self._set_pin(slot, partners.get(slot.entry), slot.newest_certs)

    def _slot(self, entry: str, direction: str) -> _Slot:
        key = (entry, direction)
        slot = self._slots.get(key)
        if slot is None:
            label = entry.lstrip(".")
            slot = self._slots[key] = _Slot(entry, direction,
                                            self.m.changes.labels(label, direction), None,
                                            set())
        return slot

    def _set_pin(self, slot: _Slot, partner: Any, certs: tuple) -> None:
        label = slot.entry.lstrip(".")
        if partner is None or not partner.pinned:
            if slot.newest_pin is not None:
                _remove(self.m.pin_match, label, slot.direction)
                slot.newest_pin = None
            return
        cert, key = certs
        match = int(bool((cert and cert in partner.cert_pins)
                         or (key and key in partner.key_pins)))
        if match != slot.newest_pin:
            self.m.pin_match.labels(label, slot.direction).set(match)
            slot.newest_pin = match

    # -- the hot path ------------------------------------------------------------------------
    def observe(self, entry: str, direction: str, *, cert_sha256: str | None = None,
                pubkey_sha256: str | None = None, subject: str | None = None,
                issuer: str | None = None, not_after: float | None = None,
                verify: str | None = None, result: str | None = None,
                reason: str | None = None, mta: str | None = None,
                extra: dict | None = None, seen_at: float | None = None) -> bool | None:
        """One sighting of a certificate of partner ``entry``.  True: new (a change counted);
        False: known; None: not judged yet (no history) or nothing to record."""
        ident = cert_identity(cert_sha256, pubkey_sha256, subject, issuer)
        if ident is None:
            return None
        now = self.clock() if seen_at is None else seen_at
        new: bool | None
        with self._lock:
            slot = self._slots.get((entry, direction))
            if slot is None:
                if entry not in self.partners:
                    return None
                slot = self._slot(entry, direction)
            if not_after is not None:
                self._expiry_of[ident] = not_after
            if ident in slot.known:
                new = False
            elif self.seeded:
                slot.known.add(ident)
                new = True
            else:
                new = None
                if len(self._pending) < PENDING_MAX:
                    self._pending.append((slot, ident, subject or ""))
            if ident != slot.newest:
                slot.newest = ident
                slot.newest_certs = (cert_sha256, pubkey_sha256)
                if direction == INBOUND:
                    self._set_pin(slot, self.partners.get(entry), (cert_sha256, pubkey_sha256))
                if direction == INBOUND or not_after is not None:
                    self._set_expiry(slot, self._expiry_of.get(ident))
            elif not_after is not None and direction == INBOUND:
                self._set_expiry(slot, not_after)
        if new:
            slot.changes.inc()
            log.info("partner %s presented a new certificate (%s): %s%s", entry, direction,
                     subject or "(no subject)", f" sha256 {cert_sha256}" if cert_sha256
                     else f" key-sha256 {pubkey_sha256}" if pubkey_sha256 else "")
        last_seen = slot.last_seen
        if last_seen is None:   # created at the first sighting: no 0 for "never"
            last_seen = slot.last_seen = self.m.last_seen.labels(entry.lstrip("."), direction)
        last_seen.set(now)
        attrs = {"cert_sha256": cert_sha256, "pubkey_sha256": pubkey_sha256, "subject": subject,
                 "issuer": issuer, "not_after": not_after, "verify": verify, "result": result,
                 "reason": reason, "mta": mta, "host": self.host}
        if extra:
            attrs.update(extra)
        self.submit({"k": observation_key(entry, direction, ident), "d": entry.lstrip("."),
                     "t": now, "h": self.host, "a": attrs})
        return new

    def _set_expiry(self, slot: _Slot, not_after: float | None) -> None:
        if not_after == slot.newest_expiry:
            return
        label = slot.entry.lstrip(".")
        if not_after is None:
            _remove(self.m.expiry, label, slot.direction)
        else:
            self.m.expiry.labels(label, slot.direction).set(not_after)
        slot.newest_expiry = not_after

    def set_expiry(self, entry: str, direction: str, not_after: float | None) -> None:
        """The expiry shown for ``entry`` (a probe round: the soonest of its MX hosts)."""
        with self._lock:
            slot = self._slots.get((entry, direction))
            if slot is not None:
                self._set_expiry(slot, not_after)

    # -- history (background thread) ---------------------------------------------------------
    def merge_history(self, observations: Iterable[Any]) -> int:
        """Add the fleet's known certificates (store observations of :data:`KIND`); the first
        call judges the sightings held until then.  Returns how many identities were added."""
        added = 0
        judged: list[tuple[_Slot, str, str]] = []
        with self._lock:
            for o in observations:
                parsed = parse_key(o.key)
                if parsed is None:
                    continue
                entry, direction, ident = parsed
                not_after = (o.attrs or {}).get("not_after")
                if isinstance(not_after, (int, float)) and ident not in self._expiry_of:
                    self._expiry_of[ident] = float(not_after)
                slot = self._slots.get((entry, direction))
                if slot is not None and ident not in slot.known:
                    slot.known.add(ident)
                    added += 1
            if not self.seeded:
                judged = self._judge_pending()
        self._report(judged)
        return added

    def seed_locally(self) -> None:
        """No history to be had: judge by this host's own sightings from now on."""
        with self._lock:
            if self.seeded:
                return
            judged = self._judge_pending()
        self._report(judged)

    def _judge_pending(self) -> list[tuple[_Slot, str, str]]:
        self.seeded = True
        judged = []
        for slot, ident, text in self._pending:
            if ident not in slot.known:
                slot.known.add(ident)
                judged.append((slot, ident, text))
        self._pending = []
        return judged

    def _report(self, judged: list[tuple[_Slot, str, str]]) -> None:
        for slot, ident, text in judged:
            slot.changes.inc()
            log.info("partner %s presented a new certificate (%s): %s %s", slot.entry,
                     slot.direction, text or "(no subject)", ident)

    def known(self, entry: str, direction: str) -> set[str]:
        with self._lock:
            slot = self._slots.get((entry, direction))
            return set(slot.known) if slot else set()


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


# ------------------------------------------------------------------------------------- the store

def apply_observations(store: Any, items: list[dict]) -> None:
    """The ``partner-cert`` spool's apply: items (from :meth:`WatchState.observe` and the probe
    service) become store observations, coalesced per key within the batch with exact first and
    last times: :data:`KIND` ``entry|direction|identity`` (the fleet's row: count of every
    host's sightings, first/last host) and :data:`HOST_KIND` ``…|host`` (each host's own row);
    items with ``"kind": PROBE_KIND`` are a host's last probe of a partner."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("k"), str):
            continue
        kind = item.get("kind", KIND)
        groups.setdefault((kind, item["k"], str(item.get("h", ""))), []).append(item)
    for (kind, key, host), group in groups.items():
        group.sort(key=lambda i: float(i.get("t", 0)))
        first, last = group[0], group[-1]
        domain = str(first.get("d", ""))
        keys = [(kind, key)] if kind != KIND else [(KIND, key), (HOST_KIND, f"{key}|{host}")]
        for k, kk in keys:
            store.observe(k, kk, domain, first.get("a") or {}, float(first.get("t", 0)), host, 1)
            if len(group) > 1:
                store.observe(k, kk, domain, last.get("a") or {}, float(last.get("t", 0)), host,
                              len(group) - 1)
