"""Getting local records into the store without ever waiting for it, and without losing any.

The journal is the spool
------------------------
Everything that must reach the store is first a line in a local, append-only, fsync'd JSON-lines
file (a *journal*); a :class:`Shipper` thread ships the journal's new complete lines into the
store and remembers how far it got.  Nothing on a milter callback or a socketmap lookup touches
the store for this.

* **TLS-RPT sessions**: the journal is the maillog follower's ``<[outbound] state_dir>/
  tlsrpt-sessions.jsonl`` (durable, fsync'd, each record written exactly once, see
  :mod:`milterd.outbound.maillog_follower`); no second copy is made.  The file stays as an export.
* **Other producers** (e.g. certificate observations from milter callbacks): :class:`Spool` —
  :meth:`Spool.submit` never blocks (a bounded in-memory queue), a writer thread appends to a
  journal in ``[store] spool_dir`` (fsync per batch), and a Shipper applies it with a
  caller-supplied function (e.g. ``store.observe``).

Shipping protocol (exactly once with an idempotent apply)
---------------------------------------------------------
The shipper's position is a state file (temp file, fsync, rename): per journal file its device,
inode, byte offset and two fingerprints (sha256 of the first bytes and of the bytes just before
the offset), like the follower's, so a journal renamed away (rotation) is finished first (found
by inode beside it, also across a restart), and one truncated in place (``copytruncate``) is
noticed and its copy found by fingerprints.  A batch (at most :data:`BATCH` lines) is read from
the offset, applied to the store in one call, and only **after the store committed** is the
offset advanced and saved.  A crash between the commit and the save replays that batch:
``put_records`` is idempotent by ``(kind, key)``, so nothing is stored twice and counts stay
exact.  (An apply that is not idempotent — ``observe`` adds counts — may count a replayed batch
twice after such a crash: at-least-once, never lost.)

A store that fails (down, unreachable, locked, refusing): the offset stays, the batch is retried
with backoff (1 s doubling to 60 s), ``milterd_store_up`` is 0, ``milterd_store_write_errors_total``
counts each failed attempt, and the records wait in the journal (``milterd_store_spooled_records``
counts the complete lines not yet shipped).  :class:`StoreHealth` logs **one** warning when an
outage starts and **one** info when it is over — the store answers again and every journal has
caught up (``store back after 42 s: 1234 spooled records shipped``) — never a line per record.

What "bounded" means
--------------------
``[store] spool_max_mb`` bounds the *unshipped* part of each journal:

* :class:`Spool` (its own journal): an item submitted while the unshipped bytes are at the
  bound, or while the in-memory queue is full, is refused — counted in
  ``milterd_store_spool_dropped_total`` and logged once per episode; what is already spooled is
  kept (the oldest survives, the newest is refused).  A fully shipped Spool journal is truncated
  (compacted) so it does not grow for ever.
* The TLS-RPT journal is the follower's file, the host's own record of its TLS sessions: the
  shipper never drops or truncates any of it.  Beyond the bound it logs a warning (once per
  episode) and ``milterd_store_spooled_bytes`` shows the size; nothing is lost, the disk is the
  limit, as it was for the JSONL file before the store existed.

The ``tlsrpt-session`` contract (read by ``milterd tlsrpt send``)
----------------------------------------------------------------
Each journal line (a dict from :func:`milterd.outbound.tlsrpt.session_record`) becomes::

    Record(kind="tlsrpt-session",
           key=f"{host}:{line['key']}",               # host = [store] host (default hostname)
           day=<UTC date of line["ts"]>,               # "YYYY-MM-DD"
           domain=line["policy_domain"].lower().rstrip("."),
           host=host,
           data={**line, "host": host, "sending_ip": [tlsrpt] sending_ip or None})

Lines that are not a JSON object with a string ``key``, a parseable ``ts`` and a string
``policy_domain`` are skipped (logged; :func:`~milterd.outbound.tlsrpt.build_report` would skip
them too).

The watermark (read by ``milterd tlsrpt send``)
-----------------------------------------------
A report built at 00:05 UTC must not miss records still waiting in a host's journal (the store
was down, the host's shipper is behind).  So the TLS-RPT shipper says how far it got: after a
pass that found the journal fully shipped (every complete line is in the store) it writes

    cache_put("store-watermark", host, json {"ts": <now, Unix seconds>}, expires in a year, …)

— "every record this host made before ts is in the store" — on the first such pass, after each
pass that shipped something (at most once a second) and every 30 s while idle, never going back.
While a journal is not caught up (the store is down, a big backlog) the watermark stays where it
was.  With it, once per host and UTC day, goes a record ``Record("store-host", f"{host}|{day}",
day, "", host, {"host": host})``: the fleet's roster (which hosts exist), which the cache cannot
list.  ``tlsrpt send`` holds a day's reports until every host on the roster of the last 7 days,
and every host with sessions that day, has a watermark past the end of the day (or a limit
passes).  What the watermark does not cover: records the maillog follower has not written to the
journal yet (it follows the maillog within a second or so while it runs).

Metrics (:class:`StoreMetrics`, one set per daemon registry): ``milterd_store_up``,
``milterd_store_spooled_records``, ``milterd_store_spooled_bytes``,
``milterd_store_write_errors_total``, ``milterd_store_spool_dropped_total``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from milterd.core.files import atomic_write
from milterd.outbound.tlsrpt import session_day
from milterd.store.api import Record, Store, StoreError, redact

__all__ = ["StoreMetrics", "StoreHealth", "Shipper", "Spool", "tlsrpt_converter",
           "TLSRPT_KIND", "BATCH", "WATERMARK_NS", "HOST_KIND", "watermark_writer"]

log = logging.getLogger("milterd.store")

TLSRPT_KIND = "tlsrpt-session"
BATCH = 500                    # lines per store call
_BATCH_BYTES = 4 << 20         # … and at most this much read at once
_FP = 256                      # bytes hashed per fingerprint
_SCAN_CHUNK = 1 << 20
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
WATERMARK_EVERY = 30.0         # seconds between two watermarks while nothing is shipped
WATERMARK_MIN_GAP = 1.0        # … and at least this between two after shipping
STATE_VERSION = 1


# -- metrics and health ---------------------------------------------------------------------------
class StoreMetrics:
    """The store's metrics in one registry (create once per registry).

    ``milterd_store_spooled_records`` / ``_bytes`` are computed at scrape time from the journals
    registered with :meth:`add_source` (anything with ``pending_records`` and ``pending_bytes``).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("milterd_store_up", "1 when the store answered the last write or check, "
                        "0 when it failed (mail flow does not depend on it)", registry=registry)
        self.spooled = Gauge("milterd_store_spooled_records", "Records in the local journals "
                             "not yet written to the store", registry=registry)
        self.spooled_bytes = Gauge("milterd_store_spooled_bytes", "Bytes of the local journals "
                                   "not yet written to the store", registry=registry)
        self.write_errors = Counter("milterd_store_write_errors", "Writes to the store that "
                                    "failed (each retry counts)", registry=registry)
        self.dropped = Counter("milterd_store_spool_dropped", "Items refused by a full spool "
                               "(queue full or [store] spool_max_mb reached): never stored",
                               registry=registry)
        self._sources: list[Any] = []
        self._lock = threading.Lock()
        self.spooled.set_function(lambda: float(self.pending_records()))
        self.spooled_bytes.set_function(lambda: float(self.pending_bytes()))

    def add_source(self, source: Any) -> None:
        with self._lock:
            self._sources.append(source)

    def remove_source(self, source: Any) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s is not source]

    def pending_records(self) -> int:
        with self._lock:
            sources = list(self._sources)
        return sum(s.pending_records for s in sources)

    def pending_bytes(self) -> int:
        with self._lock:
            sources = list(self._sources)
        return sum(s.pending_bytes for s in sources)


class StoreHealth:
    """Whether the store answers, and the outage log: one warning when it stops answering, one
    info when it answers again *and* every registered journal has caught up."""

    def __init__(self, metrics: StoreMetrics, url: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._shipped = 0
        self.outages = 0

    @property
    def in_outage(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException, *, write: bool = True) -> None:
        self.metrics.up.set(0)
        if write:
            self.metrics.write_errors.inc()
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = self._clock()
            self._shipped = 0
            self.outages += 1
        log.warning("store %s does not answer (%s): mail flow is unaffected; records are kept "
                    "in the local spool and written when it is back", redact(self.url), exc)

    def ok(self, shipped: int = 0) -> None:
        self.metrics.up.set(1)
        with self._lock:
            if self._down_since is None:
                return
            self._shipped += shipped
            if self.metrics.pending_records() > 0:
                return                          # still catching up: the outage is not over
            took, n = self._clock() - self._down_since, self._shipped
            self._down_since = None
        log.info("store back after %.0f s: %d spooled records shipped", took, n)


# -- the TLS-RPT conversion -----------------------------------------------------------------------
def _utc_day(ts: Any) -> str | None:
    day = session_day(ts)
    return day.isoformat() if day is not None else None


def tlsrpt_converter(host: str, sending_ip: str | None) -> Callable[[dict], Record | None]:
    """Journal line -> ``tlsrpt-session`` Record (the contract in the module docstring)."""

    def convert(line: dict) -> Record | None:
        key, domain, day = line.get("key"), line.get("policy_domain"), _utc_day(line.get("ts"))
        if not isinstance(key, str) or not key or not isinstance(domain, str) or day is None:
            return None
        data = dict(line)
        data["host"] = host
        data["sending_ip"] = sending_ip
        return Record(TLSRPT_KIND, f"{host}:{key}", day, domain.lower().rstrip("."), host, data)

    return convert


def records_apply(store_getter: Callable[[], Store | None],
                  convert: Callable[[dict], Record | None]) -> Callable[[list[dict]], int]:
    """An apply function for :class:`Shipper`: convert and ``put_records`` in one transaction."""

    def apply(items: list[dict]) -> int:
        store = store_getter()
        if store is None:
            raise StoreError("no store")
        records = [r for r in map(convert, items) if r is not None]
        if len(records) < len(items):
            log.warning("store: %d malformed record(s) in the journal skipped",
                        len(items) - len(records))
        return store.put_records(records) if records else 0

    return apply


WATERMARK_NS = "store-watermark"     # cache: key host, value {"ts": unix seconds}
HOST_KIND = "store-host"             # records: key HOST|DAY, the fleet's roster
WATERMARK_TTL = 365 * 86400.0        # "expires far in the future" (rewritten every 30 s)


def watermark_writer(store_getter: Callable[[], Store | None],
                     host: str) -> Callable[[float], None]:
    """A ``caught_up`` function for the TLS-RPT :class:`Shipper`: the host's roster record
    (once per UTC day) and its watermark (the module docstring)."""
    written_day: list[str | None] = [None]

    def write(ts: float) -> None:
        store = store_getter()
        if store is None:
            raise StoreError("no store")
        day = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).date().isoformat()
        if written_day[0] != day:
            store.put_records([Record(HOST_KIND, f"{host}|{day}", day, "", host,
                                      {"host": host})])
            written_day[0] = day
        store.cache_put(WATERMARK_NS, host, json.dumps({"ts": ts}), ts + WATERMARK_TTL, host,
                        ts)

    return write


# -- the shipper ----------------------------------------------------------------------------------
def _fingerprint(fd: int, start: int, end: int) -> str | None:
    if end <= start:
        return ""
    try:
        data = os.pread(fd, end - start, start)
    except OSError:
        return None
    if len(data) != end - start:
        return None
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Segment:
    """One journal file being shipped: shipped up to ``offset``; ``scan`` (a line boundary,
    >= offset) is how far lines were counted, ``lines`` the complete lines in [offset, scan)."""

    fd: int
    dev: int
    ino: int
    offset: int = 0
    scan: int = 0
    lines: int = 0
    fp: dict = field(default_factory=lambda: {"head": "", "tail": ""})
    settled: int = -1          # a rotated file's size when last seen (dropped once unchanged)

    def fingerprints(self, offset: int | None = None) -> dict:
        off = self.offset if offset is None else offset
        return {"head": _fingerprint(self.fd, 0, min(off, _FP)),
                "tail": _fingerprint(self.fd, max(0, off - _FP), off)}

    def same_content(self, offset: int, fp: dict) -> bool:
        try:
            if os.fstat(self.fd).st_size < offset:
                return False
        except OSError:
            return False
        return (fp.get("head") == _fingerprint(self.fd, 0, min(offset, _FP))
                and fp.get("tail") == _fingerprint(self.fd, max(0, offset - _FP), offset))

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class Shipper:
    """Ship the complete lines of the journal ``path`` into the store (see the module docstring).

    :param apply: called with a batch of decoded lines (dicts); must raise (e.g.
        :class:`StoreError`) unless the store committed the whole batch.
    :param state_file: the shipper's position (atomic replace).
    :param health: :class:`StoreHealth` (metrics and the outage log).
    :param gate: shipping waits until this event is set (the schema is in place).
    :param max_bytes: the unshipped bytes above which a warning is logged (once per episode).
    :param compact_lock: with ``compact_bytes``: a journal this process owns (:class:`Spool`),
        fully shipped and at least that long, is truncated under this lock (its writer's).
    :param caught_up: the watermark: called with a Unix time ``ts`` after a pass that found the
        journal fully shipped — every complete line appended before ``ts`` is in the store.
        Called on the first such pass, then after each pass that shipped something (at most
        once a second) and at least every ``caught_up_every`` seconds while idle; ``ts`` never
        goes back (``max(clock(), last ts)``).  It must raise unless the store took it (then
        it counts as a failed write, and is retried).
    """

    def __init__(self, path: str | os.PathLike, state_file: str | os.PathLike,
                 apply: Callable[[list[dict]], Any], health: StoreHealth, *,
                 name: str = "journal", gate: threading.Event | None = None,
                 max_bytes: int | None = None, poll_interval: float = 0.5,
                 batch: int = BATCH, backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
                 compact_lock: Any = None, compact_bytes: int = 1 << 20,
                 caught_up: Callable[[float], Any] | None = None,
                 caught_up_every: float = WATERMARK_EVERY,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.fspath(path)
        self.state_file = os.fspath(state_file)
        self.name = name
        self._apply = apply
        self.health = health
        self._gate = gate
        self._max_bytes = max_bytes
        self._poll = poll_interval
        self._batch = max(1, batch)
        self._backoff_min, self._backoff_max = backoff
        self._compact_lock = compact_lock
        self._compact_bytes = compact_bytes
        self._segs: list[_Segment] = []
        self._loaded = False
        self._over_limit = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._abandoned = False
        self.shipped_total = 0           # lines shipped by this object (tests, logs)
        self._caught_up = caught_up
        self._caught_up_every = caught_up_every
        self._clock = clock
        self._mark_ts: float | None = None         # the last watermark written (wall clock)
        self._mark_at: float | None = None         # … when (monotonic)
        self._mark_shipped = -1                    # shipped_total when it was written

    # -- public ------------------------------------------------------------------------------
    @property
    def pending_records(self) -> int:
        return sum(s.lines for s in self._segs)

    @property
    def pending_bytes(self) -> int:
        if not self._loaded:                      # not started yet: all of it, to be safe
            try:
                return os.stat(self.path).st_size
            except OSError:
                return 0
        total = 0
        for s in list(self._segs):
            try:
                total += max(0, s.size() - s.offset)
            except OSError:
                pass
        return total

    def notify(self) -> None:
        """New lines were appended: look now, not at the next poll."""
        self._wake.set()

    def start(self) -> "Shipper":
        self.health.metrics.add_source(self)
        self._thread = threading.Thread(target=self._run, name=f"milterd-ship-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self.health.metrics.remove_source(self)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # It saves nothing any more (a successor may own the state file now) and
                # closes its files when the call returns; the batch is shipped again.
                self._abandoned = True
                log.warning("store: the %s shipper did not stop within %g s (a store call is "
                            "hanging); its batch is shipped again next time", self.name, timeout)
                return
        self._close()

    def _close(self) -> None:
        with self._lock:
            for s in self._segs:
                s.close()
            self._segs.clear()
            self._loaded = False

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._abandoned:
                self._close()

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            try:
                outcome = self.step()
            except Exception:
                log.exception("store: %s shipper failed; retrying", self.name)
                outcome = "error"
            if outcome == "shipped":
                delay = 0.0
                continue                         # more may be waiting: no pause
            if outcome in ("failed", "error"):
                delay = min(max(delay * 2, self._backoff_min), self._backoff_max)
                self._stop.wait(delay)
                continue
            delay = 0.0
            self._wake.wait(self._poll)
            self._wake.clear()

    def step(self) -> str:
        """One round: follow the journal, ship one batch.  Returns ``"shipped"``, ``"idle"``
        (nothing to ship, or waiting for the gate) or ``"failed"`` (the store failed)."""
        with self._lock:
            if not self._loaded:
                self._load()
            self._follow()
            for s in self._segs:
                self._scan(s)
            self._check_limit()
            if self._gate is not None and not self._gate.is_set():
                return "idle"
            seg = self._next_segment()
            if seg is None:
                self._maybe_compact()
                if self._caught_up is not None and not self.pending_records:
                    return self._watermark()
                return "idle"
            items, end, n = self._read_batch(seg)
            try:
                self._apply(items) if items else None
            except Exception as exc:  # noqa: BLE001 - any failure keeps the offset
                if not isinstance(exc, StoreError):
                    log.exception("store: applying a %s batch failed", self.name)
                self.health.failed(exc)
                return "failed"
            if self._abandoned:
                return "failed"
            seg.offset = end
            seg.lines -= n
            self._save()
            self.shipped_total += n
        self.health.ok(n)
        return "shipped"

    def _watermark(self) -> str:
        """Called fully caught up (under the lock): write the watermark when it is due."""
        mono = time.monotonic()
        if self._mark_at is not None:
            since = mono - self._mark_at
            fresh = self.shipped_total != self._mark_shipped
            if since < (WATERMARK_MIN_GAP if fresh else self._caught_up_every):
                return "idle"
        ts = self._clock()
        if self._mark_ts is not None:
            ts = max(ts, self._mark_ts)
        shipped = self.shipped_total
        try:
            self._caught_up(ts)
        except Exception as exc:  # noqa: BLE001 - retried at the next pass, like a batch
            if not isinstance(exc, StoreError):
                log.exception("store: writing the %s watermark failed", self.name)
            self.health.failed(exc)
            return "failed"
        self._mark_ts, self._mark_at, self._mark_shipped = ts, mono, shipped
        self.health.ok()
        return "idle"

    @property
    def watermark(self) -> float | None:
        """The last watermark written (Unix time), None before the first."""
        return self._mark_ts

    # -- following the journal ---------------------------------------------------------------
    def _open(self, path: str) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        return _Segment(fd, st.st_dev, st.st_ino)

    def _siblings(self) -> Iterable[str]:
        directory = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return []
        return [os.path.join(directory, n) for n in names
                if n.startswith(base) and n != base
                and not n.endswith((".gz", ".bz2", ".xz", ".zst", ".tmp"))]

    def _find(self, pred: Callable[[_Segment], bool]) -> _Segment | None:
        for full in self._siblings():
            seg = self._open(full)
            if seg is None:
                continue
            if pred(seg):
                return seg
            seg.close()
        return None

    def _load(self) -> None:
        state = self._read_state()
        cur = self._open(self.path)
        segs: list[_Segment] = []
        saved = state.get("segments", []) if state else []
        for i, s in enumerate(saved):
            off, fp = int(s.get("offset", 0)), s.get("fp") or {"head": "", "tail": ""}
            ident = (s.get("dev"), s.get("inode"))
            if cur is not None and (cur.dev, cur.ino) == ident:
                if cur.same_content(off, fp):
                    cur.offset, cur.scan, cur.fp = off, off, fp
                elif state.get("compact") and i == len(saved) - 1 and cur.size() < off:
                    cur.offset = cur.scan = 0     # our own compaction finished before the crash
                else:                             # truncated in place: finish its copy first
                    copy = self._find(lambda g, o=off, f=fp: g.same_content(o, f))
                    if copy is not None:
                        copy.offset, copy.scan, copy.fp = off, off, fp
                        segs.append(copy)
                    else:
                        log.warning("store: %s was truncated while unshipped records were in it; "
                                    "its copy was not found: records after byte %d of it may be "
                                    "missing from the store", self.path, off)
                    cur.offset = cur.scan = 0
                segs.append(cur)
                cur = None
                break
            old = self._find(lambda g, d=ident: (g.dev, g.ino) == d)
            if old is not None and old.same_content(off, fp):
                old.offset, old.scan, old.fp = off, off, fp
                segs.append(old)
            else:
                if old is not None:
                    old.close()
                log.warning("store: %s (inode %s) was rotated away with unshipped records and is "
                            "not beside it any more: records after byte %d of it may be missing "
                            "from the store", self.path, ident[1], off)
        if cur is not None:
            segs.append(cur)                      # new, or no state: all of it is unshipped
        if state is not None and state.get("compact") and segs and segs[-1].offset:
            self._finish_compaction(segs[-1])
        self._segs = segs
        self._loaded = True
        if state is None or len(segs) != len(saved):
            self._save()                          # the starting point itself

    def _follow(self) -> None:
        """Notice a rotation (a new file at the path) or a truncation of the current file."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        last = self._segs[-1] if self._segs else None
        if last is None or (st.st_dev, st.st_ino) != (last.dev, last.ino):
            seg = self._open(self.path)
            if seg is not None:
                self._segs.append(seg)            # the old one is finished first
                self._save()
            return
        if last.offset and not last.same_content(last.offset, last.fp):
            copy = self._find(lambda g: g.same_content(last.offset, last.fp)
                              and (g.dev, g.ino) != (last.dev, last.ino))
            if copy is not None:
                copy.offset = copy.scan = last.offset
                copy.fp = dict(last.fp)
                self._segs.insert(len(self._segs) - 1, copy)
            else:
                log.warning("store: %s was truncated with unshipped records; its copy was not "
                            "found: records after byte %d may be missing from the store",
                            self.path, last.offset)
            last.offset = last.scan = last.lines = 0
            last.fp = {"head": "", "tail": ""}
            self._save()
        elif last.size() < last.scan:             # shrank within the unshipped part: recount
            last.scan, last.lines = last.offset, 0

    def _scan(self, seg: _Segment) -> None:
        """Count the complete lines appended since the last scan."""
        try:
            size = seg.size()
        except OSError:
            return
        while seg.scan < size:
            data = os.pread(seg.fd, min(_SCAN_CHUNK, size - seg.scan), seg.scan)
            if not data:
                break
            end = data.rfind(b"\n")
            if end < 0:
                if len(data) < _SCAN_CHUNK:
                    break                         # a line being written
                seg.scan += len(data)             # an absurd line: shipped as one bad line
                seg.lines += 1
                continue
            seg.lines += data.count(b"\n", 0, end + 1)
            seg.scan += end + 1

    def _next_segment(self) -> _Segment | None:
        while self._segs:
            seg = self._segs[0]
            if seg.offset < seg.scan:
                return seg
            if len(self._segs) == 1:
                return None
            # A rotated file, fully shipped: done with it once it has stopped changing (a writer
            # that had not noticed the rotation may still finish a line in it).
            size = seg.size()
            if size != seg.settled:
                seg.settled = size
                return None
            if size != seg.offset:
                log.warning("store: %s: an incomplete last line (%d bytes) of a rotated journal "
                            "file skipped", self.path, size - seg.offset)
            self._segs.pop(0).close()
            self._save()
        return None

    def _read_batch(self, seg: _Segment) -> tuple[list[dict], int, int]:
        data = os.pread(seg.fd, min(_BATCH_BYTES, seg.scan - seg.offset), seg.offset)
        items: list[dict] = []
        pos, n, bad = 0, 0, 0
        while n < self._batch:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            raw = data[pos:nl]
            pos = nl + 1
            n += 1
            try:
                item = json.loads(raw)
            except ValueError:
                item = None
            if isinstance(item, dict):
                items.append(item)
            elif raw.strip():
                bad += 1
        if n == 0:                                 # one line longer than a batch read
            pos, n, bad = len(data), 1, 1
        if bad:
            log.warning("store: %d line(s) of %s are not JSON objects: skipped", bad, self.path)
        return items, seg.offset + pos, n

    def _check_limit(self) -> None:
        if not self._max_bytes:
            return
        over = self.pending_bytes > self._max_bytes
        if over and not self._over_limit:
            log.warning("store: %s holds more than %d MB not yet in the store ([store] "
                        "spool_max_mb); nothing is dropped from it — check the store",
                        self.path, self._max_bytes >> 20)
        self._over_limit = over

    # -- compaction (a journal this process owns) --------------------------------------------
    def _maybe_compact(self) -> None:
        if self._compact_lock is None or len(self._segs) != 1:
            return
        seg = self._segs[0]
        if seg.offset < self._compact_bytes:
            return
        with self._compact_lock:
            if seg.size() != seg.offset:
                return                             # the writer appended meanwhile
            self._save(compact=True)               # "all of it up to offset is shipped"
            self._finish_compaction(seg)

    def _finish_compaction(self, seg: _Segment) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == (seg.dev, seg.ino) and st.st_size == seg.offset:
                    os.ftruncate(fd, 0)
                    os.fsync(fd)
                    seg.offset = seg.scan = seg.lines = 0
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("store: cannot compact %s: %s", self.path, exc)
        self._save()

    # -- state -------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            with open(self.state_file, encoding="utf-8") as f:
                st = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("store: shipper state %s unreadable (%s): shipping %s from its start "
                        "(the store ignores what it has already)", self.state_file, exc,
                        self.path)
            return None
        if not isinstance(st, dict) or not isinstance(st.get("segments"), list):
            return None
        return st

    def _save(self, compact: bool = False) -> None:
        segs = []
        for s in self._segs:
            s.fp = s.fingerprints()
            segs.append({"dev": s.dev, "inode": s.ino, "offset": s.offset, "fp": s.fp})
        data: dict[str, Any] = {"version": STATE_VERSION, "journal": self.path, "segments": segs}
        if compact:
            data["compact"] = True
        atomic_write(self.state_file, json.dumps(data, separators=(",", ":")).encode())


# -- the in-process producer ----------------------------------------------------------------------
class Spool:
    """A never-blocking producer into the store: ``submit(item)`` (a JSON-able dict) from any
    thread (milter callbacks included); a writer thread appends batches to
    ``<directory>/<name>.jsonl`` (fsync per batch); a :class:`Shipper` applies the journal with
    ``apply(items)`` (raising unless the store committed).

    :param max_queue: items held in memory before :meth:`submit` refuses (counted, logged once).
    :param max_bytes: unshipped journal bytes beyond which the writer refuses new items.
    """

    def __init__(self, directory: str | os.PathLike, name: str,
                 apply: Callable[[list[dict]], Any], health: StoreHealth, *,
                 max_queue: int = 10000, max_bytes: int = 256 << 20,
                 gate: threading.Event | None = None, poll_interval: float = 0.5,
                 backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
                 compact_bytes: int = 1 << 20) -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.name = name
        self.path = os.path.join(directory, f"{name}.jsonl")
        self.health = health
        self._q: queue.Queue[dict] = queue.Queue(max(1, max_queue))
        self._max_bytes = max_bytes
        self._write_lock = threading.Lock()
        self._dropping = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self.shipper = Shipper(self.path, os.path.join(directory, f"{name}.shipped"), apply,
                               health, name=name, gate=gate, poll_interval=poll_interval,
                               backoff=backoff, compact_lock=self._write_lock,
                               compact_bytes=compact_bytes)

    @property
    def dropped(self) -> bool:
        return self._dropping

    def submit(self, item: dict) -> bool:
        """Queue ``item`` for the store; never blocks.  False: refused (the spool is full)."""
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            self._drop(1, "its queue is full")
            return False

    def _drop(self, n: int, why: str) -> None:
        self.health.metrics.dropped.inc(n)
        if not self._dropping:
            self._dropping = True
            log.warning("store: spool %s refuses new items (%s): they are not stored; the "
                        "items already spooled are kept", self.name, why)

    def start(self) -> "Spool":
        self._cut_torn_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.shipper.start()
        self._thread = threading.Thread(target=self._run, name=f"milterd-spool-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (local disk only), then stop the writer and the shipper."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.shipper.stop(timeout)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _cut_torn_tail(self) -> None:
        """A batch torn by a crash mid-write: cut back to the last complete line."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
            if tail and not tail.endswith(b"\n"):
                nl = tail.rfind(b"\n")
                keep = size - len(tail) + nl + 1 if nl >= 0 else (0 if size <= (1 << 16)
                                                                 else size)
                os.ftruncate(fd, keep)
                os.fsync(fd)
                log.warning("store: cut a torn line at the end of %s", self.path)
        finally:
            os.close(fd)

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [item]
            while len(batch) < BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: Sequence[dict]) -> None:
        assert self._fd is not None
        if self.shipper.pending_bytes >= self._max_bytes:
            self._drop(len(batch), f"{self._max_bytes >> 20} MB not yet in the store "
                       "([store] spool_max_mb)")
            return
        data = b"".join(json.dumps(i, separators=(",", ":"), sort_keys=True).encode() + b"\n"
                        for i in batch)
        with self._write_lock:
            before = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, before)
                except OSError:
                    pass
                self._drop(len(batch), f"cannot write {self.path}: {exc.strerror or exc}")
                return
        if self._dropping and self._q.qsize() < self._q.maxsize // 2:
            self._dropping = False
            log.info("store: spool %s accepts items again", self.name)
        self.shipper.notify()
