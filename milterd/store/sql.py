"""The SQL both stores share (SQLite ≥ 3.35 and PostgreSQL ≥ 12 accept the same statements:
``ON CONFLICT … DO UPDATE … WHERE`` and ``RETURNING``).  Statements are written with ``?``
placeholders; a dialect converts them.  One connection, used under a lock: the store's callers
are background threads (shippers, the socketmap's lookups, ``tlsrpt send``), never a milter
callback."""

from __future__ import annotations

import abc
import datetime as _dt
import json
import threading
from typing import Any, Callable, Sequence

from milterd.store.api import (SCHEMA_VERSION, CacheEntry, JobState, Observation, Record, Store,
                               StoreError, day_text)

#: version -> statements bringing the schema from version-1 to version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, key TEXT NOT NULL, "
        "day TEXT NOT NULL, domain TEXT NOT NULL, host TEXT NOT NULL, data TEXT NOT NULL, "
        "created DOUBLE PRECISION NOT NULL, PRIMARY KEY (kind, key))",
        "CREATE INDEX IF NOT EXISTS records_by_day ON records (kind, day, domain)",
        "CREATE TABLE IF NOT EXISTS cache (ns TEXT NOT NULL, key TEXT NOT NULL, "
        "value TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, host TEXT NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (ns, key))",
        "CREATE TABLE IF NOT EXISTS jobs (ns TEXT NOT NULL, key TEXT NOT NULL, "
        "owner TEXT NOT NULL, lease_until DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, "
        "updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (ns, key))",
        "CREATE TABLE IF NOT EXISTS observations (kind TEXT NOT NULL, key TEXT NOT NULL, "
        "domain TEXT NOT NULL, attrs TEXT NOT NULL, first_seen DOUBLE PRECISION NOT NULL, "
        "last_seen DOUBLE PRECISION NOT NULL, count BIGINT NOT NULL, first_host TEXT NOT NULL, "
        "last_host TEXT NOT NULL, PRIMARY KEY (kind, key))",
        "CREATE INDEX IF NOT EXISTS observations_by_domain ON observations (kind, domain)",
    ),
}
assert max(MIGRATIONS) == SCHEMA_VERSION


class SqlStore(Store):
    """Everything but connecting and locking; subclasses set those."""

    placeholder = "?"

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.RLock()
        self._conn: Any = None

    # -- dialect --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _connect(self) -> Any:
        """A DB-API connection (autocommit off)."""

    @abc.abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception types that mean "the store failed"."""

    def _begin_migration(self, cur: Any) -> None:
        """Serialise concurrent migrations (several hosts starting at once)."""

    def _table_exists(self, cur: Any, name: str) -> bool:
        """Whether table ``name`` exists (default: SQLite's catalogue).  A read, never a
        ``CREATE … IF NOT EXISTS``: concurrent creators of one table race on PostgreSQL."""
        cur.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (name,))
        return bool(cur.fetchone()[0])

    def _lost_connection(self, exc: BaseException) -> bool:
        """True if ``exc`` means the connection itself is gone (the server restarted while it
        sat idle): the call is then retried once on a fresh connection."""
        return False

    def _secrets(self) -> tuple[str, ...]:
        """Strings never to show in an error (the url's password)."""
        return ()

    def _mask(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _sql(self, statement: str) -> str:
        if self.placeholder == "?":
            return statement
        # pyformat drivers: a literal % must be doubled (no shared statement has a ? in a literal)
        return statement.replace("%", "%%").replace("?", self.placeholder)

    # -- plumbing -------------------------------------------------------------------------------
    def _run(self, work: Callable[[Any], Any]) -> Any:
        """``work(cursor)`` in one transaction, committed; any driver error → StoreError (and a
        fresh connection next time).  A connection found dead before anything was committed
        (the server restarted since the last call) is replaced and the call retried once: an
        uncommitted transaction had no effect, so the retry cannot apply anything twice."""
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                committing = False
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    cur = self._conn.cursor()
                    try:
                        result = work(cur)
                        committing = True
                        self._conn.commit()
                        return result
                    except BaseException:
                        try:
                            self._conn.rollback()
                        except Exception:  # noqa: BLE001 - the connection may be gone
                            pass
                        raise
                    finally:
                        try:
                            cur.close()
                        except Exception:  # noqa: BLE001
                            pass
                except self._errors() as exc:
                    retry = (attempt == 1 and reused and not committing
                             and self._lost_connection(exc))
                    self._drop()
                    if retry:
                        continue
                    raise StoreError(self._mask(f"{type(exc).__name__}: {exc}".strip())) from None
            raise AssertionError("unreachable")  # pragma: no cover

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def _x(self, cur: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(statement), tuple(params))
        return cur

    def close(self) -> None:
        with self._lock:
            self._drop()

    def ping(self) -> None:
        self._run(lambda cur: self._x(cur, "SELECT 1").fetchall())

    # -- schema ---------------------------------------------------------------------------------
    def schema_version(self) -> int:
        def work(cur: Any) -> int:
            if not self._table_exists(cur, "milterd_schema"):
                return 0
            row = self._x(cur, "SELECT max(version) FROM milterd_schema").fetchone()
            return int(row[0] or 0)
        return self._run(work)

    def migrate(self) -> int:
        def work(cur: Any) -> int:
            self._begin_migration(cur)
            self._x(cur, "CREATE TABLE IF NOT EXISTS milterd_schema (version INTEGER NOT NULL)")
            row = self._x(cur, "SELECT max(version) FROM milterd_schema").fetchone()
            current = int(row[0] or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(f"the store's schema is version {current}, newer than this "
                                 f"milterd's {SCHEMA_VERSION}: upgrade milterd")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    self._x(cur, statement)
                self._x(cur, "INSERT INTO milterd_schema (version) VALUES (?)", (version,))
            return SCHEMA_VERSION
        return self._run(work)

    # -- records --------------------------------------------------------------------------------
    def put_records(self, records: Sequence[Record]) -> int:
        if not records:
            return 0

        def work(cur: Any) -> int:
            import time

            now = time.time()
            # One executemany (psycopg pipelines it: one round trip, not one per record); both
            # drivers sum the rows each INSERT added, and a conflict (DO NOTHING) adds none.
            cur.executemany(self._sql(
                "INSERT INTO records (kind, key, day, domain, host, data, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO NOTHING"),
                [(r.kind, r.key, r.day, r.domain, r.host,
                  json.dumps(r.data, sort_keys=True, separators=(",", ":")), now)
                 for r in records])
            return max(cur.rowcount, 0)
        return self._run(work)

    def records(self, kind: str, day_from: _dt.date | str, day_to: _dt.date | str | None = None,
                domain: str | None = None) -> list[Record]:
        lo, hi = day_text(day_from), day_text(day_to if day_to is not None else day_from)
        q = "SELECT kind, key, day, domain, host, data FROM records WHERE kind = ? AND day >= ? " \
            "AND day <= ?"
        params: list[Any] = [kind, lo, hi]
        if domain is not None:
            q += " AND domain = ?"
            params.append(domain)
        q += " ORDER BY day, domain, key"
        rows = self._run(lambda cur: self._x(cur, q, params).fetchall())
        return [Record(k, key, d, dom, h, json.loads(data)) for k, key, d, dom, h, data in rows]

    def record_domains(self, kind: str, day: _dt.date | str) -> list[str]:
        rows = self._run(lambda cur: self._x(
            cur, "SELECT DISTINCT domain FROM records WHERE kind = ? AND day = ? ORDER BY domain",
            (kind, day_text(day))).fetchall())
        return [r[0] for r in rows]

    # -- cache ----------------------------------------------------------------------------------
    def cache_get(self, ns: str, key: str, now: float) -> CacheEntry | None:
        row = self._run(lambda cur: self._x(
            cur, "SELECT value, expires_at, host, updated FROM cache WHERE ns = ? AND key = ? "
            "AND expires_at > ?", (ns, key, now)).fetchone())
        return CacheEntry(row[0], float(row[1]), row[2], float(row[3])) if row else None

    def cache_put(self, ns: str, key: str, value: str, expires_at: float, host: str,
                  now: float) -> None:
        self._run(lambda cur: self._x(
            cur, "INSERT INTO cache (ns, key, value, expires_at, host, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at, host = excluded.host, updated = excluded.updated",
            (ns, key, value, expires_at, host, now)))

    # -- jobs -----------------------------------------------------------------------------------
    def claim(self, ns: str, key: str, owner: str, lease_seconds: float,
              now: float) -> JobState | None:
        def work(cur: Any) -> JobState | None:
            row = self._x(
                cur, "INSERT INTO jobs (ns, key, owner, lease_until, state, updated) "
                "VALUES (?, ?, ?, ?, '{}', ?) ON CONFLICT (ns, key) DO UPDATE SET "
                "owner = excluded.owner, lease_until = excluded.lease_until "
                "WHERE jobs.lease_until <= excluded.updated OR jobs.owner = excluded.owner "
                "RETURNING owner, lease_until, state, updated",
                (ns, key, owner, now + lease_seconds, now)).fetchone()
            return None if row is None else JobState(row[0], float(row[1]), json.loads(row[2]),
                                                     float(row[3]))
        return self._run(work)

    def job_put(self, ns: str, key: str, owner: str, state: dict[str, Any],
                lease_seconds: float, now: float) -> bool:
        def work(cur: Any) -> bool:
            self._x(cur, "UPDATE jobs SET state = ?, lease_until = ?, updated = ? "
                    "WHERE ns = ? AND key = ? AND owner = ?",
                    (json.dumps(state, sort_keys=True), now + lease_seconds if lease_seconds
                     else 0.0, now, ns, key, owner))
            return cur.rowcount == 1
        return self._run(work)

    def job_get(self, ns: str, key: str) -> JobState | None:
        row = self._run(lambda cur: self._x(
            cur, "SELECT owner, lease_until, state, updated FROM jobs WHERE ns = ? AND key = ?",
            (ns, key)).fetchone())
        return None if row is None else JobState(row[0], float(row[1]), json.loads(row[2]),
                                                 float(row[3]))

    def jobs(self, ns: str, key_prefix: str = "") -> dict[str, JobState]:
        rows = self._run(lambda cur: self._x(
            cur, "SELECT key, owner, lease_until, state, updated FROM jobs WHERE ns = ? "
            "AND substr(key, 1, ?) = ? ORDER BY key",
            (ns, len(key_prefix), key_prefix)).fetchall())
        return {k: JobState(o, float(lu), json.loads(s), float(u)) for k, o, lu, s, u in rows}

    # -- observations ---------------------------------------------------------------------------
    def observe(self, kind: str, key: str, domain: str, attrs: dict[str, Any], seen_at: float,
                host: str, count: int = 1) -> Observation:
        def work(cur: Any) -> Observation:
            row = self._x(
                cur, "INSERT INTO observations (kind, key, domain, attrs, first_seen, last_seen, "
                "count, first_host, last_host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, key) DO UPDATE SET "
                "count = observations.count + excluded.count, "
                "first_seen = CASE WHEN excluded.first_seen < observations.first_seen "
                "THEN excluded.first_seen ELSE observations.first_seen END, "
                "first_host = CASE WHEN excluded.first_seen < observations.first_seen "
                "THEN excluded.first_host ELSE observations.first_host END, "
                "last_host = CASE WHEN excluded.last_seen >= observations.last_seen "
                "THEN excluded.last_host ELSE observations.last_host END, "
                "attrs = CASE WHEN excluded.last_seen >= observations.last_seen "
                "THEN excluded.attrs ELSE observations.attrs END, "
                "last_seen = CASE WHEN excluded.last_seen > observations.last_seen "
                "THEN excluded.last_seen ELSE observations.last_seen END "
                "RETURNING kind, key, domain, attrs, first_seen, last_seen, count, first_host, "
                "last_host",
                (kind, key, domain, json.dumps(attrs, sort_keys=True), seen_at, seen_at, count,
                 host, host)).fetchone()
            return _observation(row)
        return self._run(work)

    def observations(self, kind: str, domain: str | None = None) -> list[Observation]:
        q = ("SELECT kind, key, domain, attrs, first_seen, last_seen, count, first_host, "
             "last_host FROM observations WHERE kind = ?")
        params: list[Any] = [kind]
        if domain is not None:
            q += " AND domain = ?"
            params.append(domain)
        q += " ORDER BY domain, last_seen DESC, key"
        return [_observation(r) for r in self._run(lambda cur: self._x(cur, q, params).fetchall())]

    # -- housekeeping ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Rows per table, and records per kind (``records[KIND]``), for ``milterd store status``."""
        def work(cur: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for table in ("records", "cache", "jobs", "observations"):
                out[table] = int(self._x(cur, f"SELECT count(*) FROM {table}").fetchone()[0])
            for kind, n in self._x(cur, "SELECT kind, count(*) FROM records GROUP BY kind "
                                   "ORDER BY kind").fetchall():
                out[f"records[{kind}]"] = int(n)
            return out
        return self._run(work)

    def prune(self, before_day: _dt.date | str, now: float) -> int:
        def work(cur: Any) -> int:
            n = self._x(cur, "DELETE FROM records WHERE day < ?", (day_text(before_day),)).rowcount
            n += self._x(cur, "DELETE FROM cache WHERE expires_at <= ?", (now,)).rowcount
            n += self._x(cur, "DELETE FROM jobs WHERE lease_until <= ? AND updated < ?",
                         (now, now - 30 * 86400)).rowcount
            return n
        return self._run(work)


def _observation(row: Sequence[Any]) -> Observation:
    return Observation(row[0], row[1], row[2], json.loads(row[3]), float(row[4]), float(row[5]),
                       int(row[6]), row[7], row[8])
