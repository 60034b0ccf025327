"""The fleet's store: ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (psycopg 3).

Every milterd of the fleet (and ``milterd tlsrpt send`` on each host) connects to the same
database; the shared SQL of :mod:`milterd.store.sql` makes writes idempotent and claims atomic
(``INSERT … ON CONFLICT … DO UPDATE … WHERE … RETURNING`` takes the row lock, so two hosts
claiming a job at the same instant get exactly one winner).

* Opening does not connect; the first use does, with a ``connect_timeout`` (default 5 s) and TCP
  keepalives, so a down or unreachable database is a :class:`StoreError` within seconds, never a
  hang.  A connection lost while idle (PostgreSQL restarted) is replaced transparently on the next
  call; a lost connection in the middle of a call is a StoreError and a fresh connection next time.
* Statements time out after 60 s (``options=-c statement_timeout=60000``) unless the url sets
  ``options`` itself (e.g. behind PgBouncer, which refuses unknown startup parameters).
* Hosts migrating at once serialise on a transaction-scoped advisory lock.
* Errors never carry the password (:func:`milterd.store.api.redact`, and the password is masked
  wherever the driver would repeat it).

Any libpq connection parameter may be given in the url's query (``?sslmode=verify-full&
sslrootcert=/etc/milterd/pg-ca.pem``, ``?connect_timeout=10``, ``?host=/run/postgresql`` for a
unix socket).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from milterd.store.api import StoreError, redact
from milterd.store.sql import SqlStore

#: pg_advisory_xact_lock key serialising migrations ("milterd" schema), per database.
MIGRATION_LOCK = 0x6D696C7465726400 >> 8   # b"milterd" as a 56-bit integer

#: Defaults for libpq parameters the url does not set.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "application_name": "milterd",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",     # ms: unacknowledged writes fail instead of hanging
}
STATEMENT_TIMEOUT_MS = 60000


class PostgresStore(SqlStore):
    placeholder = "%s"

    def __init__(self, url: str):
        super().__init__(url)
        if not url.startswith(("postgresql://", "postgres://")):
            raise StoreError(f"not a postgresql url: {redact(url)!r}")
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        self._password = unquote(password) if password else None
        self._raw_password = password

    # -- dialect --------------------------------------------------------------------------------
    def _secrets(self) -> tuple[str, ...]:
        return tuple(p for p in (self._raw_password, self._password) if p)

    def _connect(self) -> Any:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise StoreError(f"PostgreSQL store needs psycopg 3 ({exc})") from None
        try:
            given = conninfo_to_dict(self.url)
        except psycopg.Error as exc:
            raise StoreError(f"bad store url {redact(self.url)!r}: "
                             f"{self._mask(str(exc)).strip()}") from None
        extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        if "options" not in given:
            extra["options"] = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
        try:
            return psycopg.connect(self.url, autocommit=False, **extra)
        except psycopg.Error as exc:
            # libpq's message spans lines ("\n\tIs the server running …"): one log line
            raise StoreError(f"cannot connect to {redact(self.url)}: "
                             f"{' '.join(self._mask(str(exc)).split())}") from None

    def _errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)

    def _lost_connection(self, exc: BaseException) -> bool:
        conn = self._conn
        return conn is not None and bool(getattr(conn, "broken", False) or conn.closed)

    def _begin_migration(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def _table_exists(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(cur.fetchone()[0])
