"""The store's interface: a few primitives every fleet-wide feature is built on.

* **records** — append-only facts, idempotent by ``(kind, key)`` (TLS-RPT sessions: kind
  ``"tlsrpt-session"``).  Writing the same record twice (a retry after a lost acknowledgement,
  two shippers, a replayed spool) stores it once, so counts are exact.
* **cache** — a shared value with an expiry per ``(ns, key)`` (MTA-STS policies: ns ``"mta-sts"``).
* **jobs** — a claim with a lease plus a JSON state per ``(ns, key)``, for work every host may
  attempt but only one must do (``milterd tlsrpt send``: one report per day, domain and rua).
  A claim is a row in the database, not a file lock, so it holds across hosts.
* **observations** — first/last seen and a count per ``(kind, key)`` (partner certificates).

Every row names the host that wrote it.  Times are Unix seconds (float); days are ISO dates.
Implementations: :mod:`milterd.store.sqlite` and :mod:`milterd.store.postgres`, both on
:class:`milterd.store.sql.SqlStore`.  They are thread-safe; every method may raise
:class:`StoreError` (the database is down, locked or refused the statement).
"""

from __future__ import annotations

import abc
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 1


class StoreError(Exception):
    """The store could not do what was asked (down, unreachable, refused)."""


@dataclass(frozen=True)
class Record:
    kind: str
    key: str                       # unique within kind (fleet-wide: include the host if needed)
    day: str                       # "YYYY-MM-DD" (UTC) the record belongs to
    domain: str                    # the policy/partner domain it is about
    host: str                      # the host that made it
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheEntry:
    value: str
    expires_at: float
    host: str
    updated: float


@dataclass(frozen=True)
class JobState:
    owner: str
    lease_until: float
    state: dict[str, Any]
    updated: float


@dataclass(frozen=True)
class Observation:
    kind: str
    key: str
    domain: str
    attrs: dict[str, Any]
    first_seen: float
    last_seen: float
    count: int
    first_host: str
    last_host: str


class Store(abc.ABC):
    url: str

    # -- schema ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema (idempotent; safe when several hosts start at once);
        returns the schema version now in place."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The version in the database (0: empty)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- records --------------------------------------------------------------------------------
    @abc.abstractmethod
    def put_records(self, records: Sequence[Record]) -> int:
        """Store records not stored yet (by kind and key), in one transaction; returns how many
        were new.  All or nothing."""

    @abc.abstractmethod
    def records(self, kind: str, day_from: _dt.date | str, day_to: _dt.date | str | None = None,
                domain: str | None = None) -> list[Record]:
        """Records of ``kind`` for the days ``day_from`` … ``day_to`` (inclusive; default: the
        one day), of every host, optionally for one domain; ordered by day, domain, key."""

    @abc.abstractmethod
    def record_domains(self, kind: str, day: _dt.date | str) -> list[str]:
        """The domains with records of ``kind`` on ``day``."""

    # -- cache ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def cache_get(self, ns: str, key: str, now: float) -> CacheEntry | None:
        """The entry if it has not expired at ``now``."""

    @abc.abstractmethod
    def cache_put(self, ns: str, key: str, value: str, expires_at: float, host: str,
                  now: float) -> None: ...

    # -- jobs -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, ns: str, key: str, owner: str, lease_seconds: float,
              now: float) -> JobState | None:
        """Take the job for ``owner`` for ``lease_seconds`` — if nobody holds it, its lease has
        run out, or ``owner`` holds it already.  Returns the job's state (``{}`` for a new job)
        when ``owner`` now holds it, None when another owner does."""

    @abc.abstractmethod
    def job_put(self, ns: str, key: str, owner: str, state: dict[str, Any],
                lease_seconds: float, now: float) -> bool:
        """Save ``state`` (and extend the lease; 0 releases it) — only while ``owner`` holds the
        job; False when it does not (the lease ran out and another host took it)."""

    @abc.abstractmethod
    def job_get(self, ns: str, key: str) -> JobState | None: ...

    @abc.abstractmethod
    def jobs(self, ns: str, key_prefix: str = "") -> dict[str, JobState]: ...

    # -- observations ---------------------------------------------------------------------------
    @abc.abstractmethod
    def observe(self, kind: str, key: str, domain: str, attrs: dict[str, Any], seen_at: float,
                host: str, count: int = 1) -> Observation:
        """Record ``count`` sightings of ``key`` at ``seen_at``; returns the updated row
        (``count == first count`` and ``first_seen == seen_at`` for a key never seen before)."""

    @abc.abstractmethod
    def observations(self, kind: str, domain: str | None = None) -> list[Observation]: ...

    # -- housekeeping ---------------------------------------------------------------------------
    @abc.abstractmethod
    def prune(self, before_day: _dt.date | str, now: float) -> int:
        """Delete records older than ``before_day``, expired cache entries and released jobs
        whose state is older; returns rows deleted."""


def day_text(day: _dt.date | str) -> str:
    return day if isinstance(day, str) else day.isoformat()


def open_store(url: str) -> Store:
    """The store for ``[store] url``: ``sqlite:///ABSOLUTE/PATH`` or ``postgresql://…``.
    Opening does not connect yet for PostgreSQL (a down database is not an error until used)."""
    if url.startswith("sqlite:///"):
        from milterd.store.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from milterd.store.postgres import PostgresStore

        return PostgresStore(url)
    raise StoreError(f"unsupported store url {redact(url)!r} (sqlite:///path or postgresql://…)")


def redact(url: str) -> str:
    """``url`` without a password, for logs and errors."""
    import re

    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def iter_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
