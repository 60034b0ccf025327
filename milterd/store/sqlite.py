"""The embedded store for one host: ``sqlite:///var/lib/milterd/milterd.db``.

WAL mode, so the daemon and ``milterd tlsrpt send`` (another process) can use it at once; a busy
database is waited for up to 5 s, then reported as a StoreError.  The file is created 0640.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from milterd.store.api import StoreError
from milterd.store.sql import SqlStore


class SqliteStore(SqlStore):
    def __init__(self, url: str):
        super().__init__(url)
        if not url.startswith("sqlite:///"):
            raise StoreError(f"not a sqlite url: {url!r}")
        self.path = url[len("sqlite://"):]
        if not os.path.isabs(self.path):
            raise StoreError(f"sqlite path must be absolute: {url!r}")

    def _connect(self) -> Any:
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            raise StoreError(f"{directory}: no such directory for the store")
        if not os.path.exists(self.path):
            # Create it in WAL mode under a private name, then link it into place: switching a
            # shared new file to WAL from several processes at once fails with "locked" at once.
            tmp = f"{self.path}.new-{os.getpid()}-{threading.get_ident()}"
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
            try:
                init = sqlite3.connect(tmp)
                try:
                    init.execute("PRAGMA journal_mode=WAL")
                finally:
                    init.close()
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass
            finally:
                for p in (tmp, tmp + "-wal", tmp + "-shm"):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False,
                               isolation_level="DEFERRED")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed record survives a power cut
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, OSError)

    def _begin_migration(self, cur: Any) -> None:
        # Take the write lock before reading the version: two processes migrating at once
        # serialise here instead of both creating tables.
        self._conn.commit()
        cur.execute("BEGIN IMMEDIATE")
