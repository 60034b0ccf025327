"""The store's contract (#17), one suite run against both engines: SQLite in tmp_path, and a real
PostgreSQL (Debian's server, a private cluster on loopback started by these tests:
:mod:`milterd.lab.postgres`, provisioned by scripts/setup-postgres.sh).  A PostgreSQL that cannot
be started fails the tests, it never skips them.

Every PostgreSQL test gets a database of its own in the session's cluster; "two hosts" are two
Store objects (two connections) on the same database."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import os
import sqlite3
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql

from milterd.lab.postgres import PostgresLab
from milterd.store.api import SCHEMA_VERSION, Record, StoreError, open_store, redact
from milterd.store.postgres import PostgresStore
from milterd.store.sqlite import SqliteStore

ENGINES = ["sqlite", "postgresql"]
REPO = Path(__file__).resolve().parents[1]
_db_names = itertools.count()


@pytest.fixture(scope="session")
def pg_lab():
    from milterd.lab.postgres import running_postgres

    with running_postgres() as lab:
        yield lab


class Engine:
    """One engine's database for one test: ``store()`` opens another Store ("another host")."""

    def __init__(self, name: str, url: str, lab: PostgresLab | None, path: Path | None = None):
        self.name, self.url, self.lab, self.path = name, url, lab, path
        self.stores: list = []

    def store(self, migrate: bool = True):
        s = open_store(self.url)
        self.stores.append(s)
        if migrate:
            s.migrate()
        return s

    def query(self, statement: str, params: tuple = ()) -> list[tuple]:
        """A read (or write) beside the store, on the engine's own driver."""
        if self.name == "sqlite":
            conn = sqlite3.connect(str(self.path))
            try:
                rows = conn.execute(statement, params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def close_all(self) -> None:
        for s in self.stores:
            s.close()


def _engine(name: str, request, tmp_path: Path):
    if name == "sqlite":
        path = tmp_path / "state" / "milterd.db"
        path.parent.mkdir()
        e = Engine("sqlite", f"sqlite://{path}", None, path)
        yield e
        e.close_all()
        return
    lab: PostgresLab = request.getfixturevalue("pg_lab")
    db = f"t{os.getpid()}_{next(_db_names)}"
    with psycopg.connect(lab.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {} OWNER milterd").format(pgsql.Identifier(db)))
    e = Engine("postgresql", lab.url_with(database=db), lab)
    e.database = db
    yield e
    e.close_all()
    if not lab.running:                     # a test that took it down and failed before restarting
        lab.start()
    with psycopg.connect(lab.admin_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP DATABASE {} WITH (FORCE)").format(pgsql.Identifier(db)))


@pytest.fixture(params=ENGINES)
def engine(request, tmp_path):
    """The contract's database: each test runs once per engine."""
    yield from _engine(request.param, request, tmp_path)


@pytest.fixture
def pg_engine(request, tmp_path):
    """A PostgreSQL-only database (server sessions, passwords)."""
    yield from _engine("postgresql", request, tmp_path)


def rec(key: str, day: str = "2024-03-01", domain: str = "a.example", host: str = "mx1",
        kind: str = "tlsrpt-session", **data) -> Record:
    return Record(kind, key, day, domain, host, data or {"n": key})


def run_threads(n: int, target) -> list:
    """``target(i)`` in ``n`` threads released at the same instant; their results (or raise)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


# -- engines and urls ---------------------------------------------------------------------------

def test_open_store_picks_the_engine(engine):
    s = engine.store(migrate=False)
    assert isinstance(s, SqliteStore if engine.name == "sqlite" else PostgresStore)
    assert s.url == engine.url


# -- records ------------------------------------------------------------------------------------

def test_records_idempotent_by_kind_and_key(engine):
    s = engine.store()
    batch = [rec(f"k{i}", host=f"mx{i % 2}") for i in range(50)]
    assert s.put_records(batch) == 50
    assert s.put_records(batch) == 0                       # a retry stores nothing twice
    assert s.put_records(list(reversed(batch))) == 0
    # a batch half old, half new: only the new count; a key repeated inside one batch counts once
    mixed = batch[:10] + [rec(f"n{i}") for i in range(7)] + [rec("n0")]
    assert s.put_records(mixed) == 7
    # same key, another kind: another record
    assert s.put_records([rec("k0", kind="other")]) == 1
    assert engine.query("SELECT count(*) FROM records")[0][0] == 58
    got = s.records("tlsrpt-session", "2024-03-01")
    assert len(got) == 57 and len({r.key for r in got}) == 57
    # the first write wins: a later record with the same key does not change the stored one
    assert s.put_records([rec("k1", host="elsewhere", n="changed")]) == 0
    (k1,) = [r for r in s.records("tlsrpt-session", "2024-03-01") if r.key == "k1"]
    assert k1 == rec("k1", host="mx1")
    # another host's store sees the same records and adds none of them again
    other = engine.store()
    assert other.put_records(batch) == 0
    assert len(other.records("tlsrpt-session", "2024-03-01")) == 57
    assert s.put_records([]) == 0


def test_put_records_is_all_or_nothing(engine):
    s = engine.store()
    assert s.put_records([rec("old")]) == 1
    bad = Record("tlsrpt-session", "bad", None, "a.example", "mx1", {})  # day NOT NULL
    batch = [rec("g1"), rec("old"), rec("g2"), bad, rec("g3")]
    with pytest.raises(StoreError):
        s.put_records(batch)
    assert [r.key for r in s.records("tlsrpt-session", "2024-03-01")] == ["old"]
    assert engine.query("SELECT count(*) FROM records")[0][0] == 1
    # the store is usable right after, and the good records go in exactly once
    assert s.put_records([r for r in batch if r is not bad]) == 3
    assert s.put_records([r for r in batch if r is not bad]) == 0
    assert [r.key for r in s.records("tlsrpt-session", "2024-03-01")] == ["g1", "g2", "g3", "old"]


def test_records_day_range_domain_filter_and_order(engine):
    s = engine.store()
    days = ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01", "2024-03-02"]
    batch = []
    for i, day in enumerate(days):
        for dom in ("b.example", "a.example"):
            batch += [rec(f"{day}/{dom}/z", day, dom, i=i),
                      rec(f"{day}/{dom}/a", day, dom, host="mx2")]
    batch.append(rec("other-kind", "2024-02-28", kind="mta-sts-fetch"))
    assert s.put_records(batch) == len(batch)

    one_day = s.records("tlsrpt-session", "2024-02-29")
    assert [r.key for r in one_day] == ["2024-02-29/a.example/a", "2024-02-29/a.example/z",
                                        "2024-02-29/b.example/a", "2024-02-29/b.example/z"]
    assert one_day[1].data == {"i": 2} and one_day[0].host == "mx2"
    span = s.records("tlsrpt-session", dt.date(2024, 2, 28), dt.date(2024, 3, 1))
    assert [r.day for r in span] == ["2024-02-28"] * 4 + ["2024-02-29"] * 4 + ["2024-03-01"] * 4
    assert [(r.day, r.domain, r.key) for r in span] == sorted((r.day, r.domain, r.key)
                                                              for r in span)
    only_b = s.records("tlsrpt-session", "2024-02-27", "2024-03-02", domain="b.example")
    assert len(only_b) == 10 and {r.domain for r in only_b} == {"b.example"}
    assert s.records("tlsrpt-session", "2024-03-03") == []
    assert s.records("tlsrpt-session", "2024-03-02", "2024-02-27") == []     # empty range
    assert s.records("tlsrpt-session", "2024-02-28", domain="nobody.example") == []
    assert [r.key for r in s.records("mta-sts-fetch", "2024-02-28")] == ["other-kind"]
    assert s.record_domains("tlsrpt-session", "2024-03-01") == ["a.example", "b.example"]
    assert s.record_domains("tlsrpt-session", dt.date(2024, 3, 3)) == []
    assert s.record_domains("mta-sts-fetch", "2024-02-28") == ["a.example"]


def test_record_data_round_trips(engine):
    s = engine.store()
    data = {"policy": {"type": "sts", "mx": ["*.a.example"]}, "ok": True, "n": 3, "x": 0.5,
            "text": "ümlaut ☃ 'quote' \"dq\" %s ? %% \\", "none": None}
    assert s.put_records([Record("k", "key?%s", "2024-03-01", "ü.example", "mx-ü", data)]) == 1
    (r,) = s.records("k", "2024-03-01")
    assert r == Record("k", "key?%s", "2024-03-01", "ü.example", "mx-ü", data)


# -- cache --------------------------------------------------------------------------------------

def test_cache_expiry_and_overwrite(engine):
    a, b = engine.store(), engine.store()
    assert a.cache_get("mta-sts", "a.example", 1000.0) is None
    a.cache_put("mta-sts", "a.example", "policy-1", 2000.0, "mx1", 1000.0)
    e = b.cache_get("mta-sts", "a.example", 1999.5)          # another host sees it
    assert (e.value, e.expires_at, e.host, e.updated) == ("policy-1", 2000.0, "mx1", 1000.0)
    assert b.cache_get("mta-sts", "a.example", 2000.0) is None    # expired at expires_at
    assert b.cache_get("other-ns", "a.example", 1500.0) is None
    b.cache_put("mta-sts", "a.example", "policy-2", 5000.0, "mx2", 1600.0)
    e = a.cache_get("mta-sts", "a.example", 4000.0)
    assert (e.value, e.expires_at, e.host, e.updated) == ("policy-2", 5000.0, "mx2", 1600.0)
    assert engine.query("SELECT count(*) FROM cache")[0][0] == 1


# -- jobs ---------------------------------------------------------------------------------------

def test_claim_lease_takeover_and_release(engine):
    a, b = engine.store(), engine.store()
    ns, key = "tlsrpt-send", "2024-03-01/a.example/mailto:r@a.example"
    j = a.claim(ns, key, "mx1", 60, 1000.0)
    assert (j.owner, j.lease_until, j.state, j.updated) == ("mx1", 1060.0, {}, 1000.0)
    assert b.claim(ns, key, "mx2", 60, 1030.0) is None              # held by mx1
    assert b.claim(ns, key, "mx2", 60, 1059.9) is None
    j = a.claim(ns, key, "mx1", 60, 1030.0)                        # the owner re-claims
    assert (j.owner, j.lease_until) == ("mx1", 1090.0)
    assert a.job_put(ns, key, "mx1", {"sent": 1, "id": "r1"}, 60, 1040.0) is True
    j = b.job_get(ns, key)
    assert (j.owner, j.lease_until, j.state, j.updated) == ("mx1", 1100.0,
                                                            {"sent": 1, "id": "r1"}, 1040.0)
    assert b.job_put(ns, key, "mx2", {"stolen": True}, 60, 1050.0) is False  # not the owner
    assert a.job_get(ns, key).state == {"sent": 1, "id": "r1"}
    # the lease runs out (at lease_until exactly): mx2 takes over, with the state mx1 left
    j = b.claim(ns, key, "mx2", 60, 1100.0)
    assert (j.owner, j.lease_until, j.state) == ("mx2", 1160.0, {"sent": 1, "id": "r1"})
    assert a.job_put(ns, key, "mx1", {"late": True}, 60, 1101.0) is False
    assert a.claim(ns, key, "mx1", 60, 1101.0) is None
    # release (lease 0): anyone may claim at once
    assert b.job_put(ns, key, "mx2", {"sent": 2}, 0, 1102.0) is True
    assert a.job_get(ns, key).lease_until == 0.0
    j = a.claim(ns, key, "mx1", 60, 1103.0)
    assert (j.owner, j.state) == ("mx1", {"sent": 2})
    assert a.job_get(ns, "never") is None
    assert b.job_put(ns, "never", "mx2", {}, 60, 1.0) is False      # no job: nothing to put


def test_jobs_by_prefix(engine):
    s = engine.store()
    keys = ["2024-03-01/a", "2024-03-01/b", "2024-03-02/a", "2024-03-0%", "2024-03-0_/x", "x"]
    for k in keys:
        assert s.claim("send", k, "mx1", 60, 1000.0) is not None
    s.claim("other", "2024-03-01/z", "mx1", 60, 1000.0)
    assert list(s.jobs("send", "2024-03-01/")) == ["2024-03-01/a", "2024-03-01/b"]
    assert sorted(s.jobs("send")) == sorted(keys)
    # no LIKE: % and _ in a prefix are plain characters
    assert list(s.jobs("send", "2024-03-0%")) == ["2024-03-0%"]
    assert list(s.jobs("send", "2024-03-0_")) == ["2024-03-0_/x"]
    assert s.jobs("send", "nothing") == {}
    assert s.jobs("send", "2024-03-01/a")["2024-03-01/a"].owner == "mx1"


@pytest.mark.parametrize("takeover", [False, True], ids=["new-job", "expired-lease"])
def test_two_hosts_claiming_at_once_exactly_one_wins(engine, takeover):
    a, b = engine.store(), engine.store()
    stores = [a, b]
    rounds = 40
    for i in range(rounds):
        key = f"day/{i}"
        if takeover:
            assert a.claim("send", key, "old-host", 10, 1000.0) is not None  # expires at 1010
        results = run_threads(2, lambda n: stores[n].claim("send", key, f"mx{n}", 60, 1010.0))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, (i, results)
        owner = winners[0].owner
        assert engine.stores[0].job_get("send", key).owner == owner
        loser = 1 - results.index(winners[0])
        assert stores[loser].job_put("send", key, f"mx{loser}", {"x": 1}, 60, 1011.0) is False
        assert stores[1 - loser].job_put("send", key, owner, {"x": 1}, 60, 1011.0) is True


def test_many_hosts_many_threads_one_winner_per_job(engine):
    stores = [engine.store() for _ in range(4)]
    keys = [f"job/{i}" for i in range(25)]

    def host(n: int) -> list[str]:
        return [k for k in keys if stores[n].claim("send", k, f"mx{n}", 60, 5000.0)]
    won = run_threads(4, host)
    assert sorted(itertools.chain.from_iterable(won)) == sorted(keys)   # each once, none lost
    for n, mine in enumerate(won):
        for k in mine:
            assert stores[0].job_get("send", k).owner == f"mx{n}"


# -- observations -------------------------------------------------------------------------------

def test_observations_first_last_count_hosts_out_of_order(engine):
    a, b = engine.store(), engine.store()
    o = a.observe("cert", "sha256:1", "p.example", {"subject": "v1"}, 200.0, "mx1")
    assert (o.first_seen, o.last_seen, o.count, o.first_host, o.last_host, o.attrs) == \
        (200.0, 200.0, 1, "mx1", "mx1", {"subject": "v1"})
    # an older sighting arrives late (a spooled host): first_* move back, last_* stay
    o = b.observe("cert", "sha256:1", "p.example", {"subject": "v0"}, 100.0, "mx2", count=3)
    assert (o.first_seen, o.last_seen, o.count, o.first_host, o.last_host, o.attrs) == \
        (100.0, 200.0, 4, "mx2", "mx1", {"subject": "v1"})
    # a newer one: last_* and the attributes move on
    o = b.observe("cert", "sha256:1", "p.example", {"subject": "v2"}, 300.0, "mx3", count=2)
    assert (o.first_seen, o.last_seen, o.count, o.first_host, o.last_host, o.attrs) == \
        (100.0, 300.0, 6, "mx2", "mx3", {"subject": "v2"})
    # one in between changes only the count
    o = a.observe("cert", "sha256:1", "p.example", {"subject": "mid"}, 150.0, "mx4")
    assert (o.first_seen, o.last_seen, o.count, o.first_host, o.last_host, o.attrs) == \
        (100.0, 300.0, 7, "mx2", "mx3", {"subject": "v2"})
    a.observe("cert", "sha256:2", "p.example", {}, 250.0, "mx1")
    a.observe("cert", "sha256:3", "q.example", {}, 50.0, "mx1")
    a.observe("other", "sha256:1", "p.example", {}, 50.0, "mx1")
    assert [x.key for x in b.observations("cert", "p.example")] == ["sha256:1", "sha256:2"]
    assert [(x.domain, x.key) for x in b.observations("cert")] == [
        ("p.example", "sha256:1"), ("p.example", "sha256:2"), ("q.example", "sha256:3")]
    assert b.observations("cert", "none.example") == []
    assert b.observations("cert", "p.example")[0] == o


def test_observation_counts_exact_under_concurrency(engine):
    stores = [engine.store() for _ in range(4)]

    def host(n: int) -> None:
        for i in range(30):
            stores[n].observe("cert", "k", "p.example", {"n": n}, 1000.0 + i * 4 + n, f"mx{n}")
    run_threads(4, host)
    (o,) = stores[0].observations("cert")
    assert o.count == 120
    assert (o.first_seen, o.first_host) == (1000.0, "mx0")
    assert (o.last_seen, o.last_host, o.attrs) == (1000.0 + 29 * 4 + 3, "mx3", {"n": 3})


def test_one_store_shared_by_threads(engine):
    s = engine.store()

    def worker(n: int) -> int:
        return sum(s.put_records([rec(f"t{n}-{i}"), rec("shared")]) for i in range(20))
    added = run_threads(6, worker)
    assert sum(added) == 6 * 20 + 1
    assert len(s.records("tlsrpt-session", "2024-03-01")) == 121


# -- housekeeping -------------------------------------------------------------------------------

def test_prune(engine):
    s = engine.store()
    now = 100 * 86400.0
    s.put_records([rec("r1", "2024-02-28"), rec("r2", "2024-02-29"), rec("r3", "2024-03-01"),
                   rec("r4", "2024-03-02", kind="x")])
    s.cache_put("c", "expired", "v", now - 1, "mx1", now - 100)
    s.cache_put("c", "at-now", "v", now, "mx1", now - 100)
    s.cache_put("c", "valid", "v", now + 1, "mx1", now - 100)
    s.claim("j", "released-old", "mx1", 60, now - 40 * 86400)
    s.job_put("j", "released-old", "mx1", {"done": True}, 0, now - 40 * 86400)
    s.claim("j", "released-recent", "mx1", 60, now - 86400)
    s.job_put("j", "released-recent", "mx1", {"done": True}, 0, now - 86400)
    s.claim("j", "leased-old", "mx1", 90 * 86400, now - 40 * 86400)      # still leased
    assert s.prune("2024-03-01", now) == 2 + 2 + 1
    assert [r.key for r in s.records("tlsrpt-session", "2024-02-01", "2024-03-31")] == ["r3"]
    assert [r.key for r in s.records("x", "2024-03-02")] == ["r4"]
    assert s.cache_get("c", "valid", now) is not None
    assert engine.query("SELECT key FROM cache") == [("valid",)]
    assert sorted(s.jobs("j")) == ["leased-old", "released-recent"]
    assert s.prune("2024-03-01", now) == 0
    assert s.prune(dt.date(2024, 3, 2), now) == 1


# -- schema -------------------------------------------------------------------------------------

def test_migrate_idempotent(engine):
    s = engine.store(migrate=False)
    assert s.schema_version() == 0
    assert s.migrate() == SCHEMA_VERSION
    assert s.schema_version() == SCHEMA_VERSION
    s.put_records([rec("kept")])
    assert s.migrate() == SCHEMA_VERSION                   # again: nothing recreated or lost
    assert engine.store(migrate=False).migrate() == SCHEMA_VERSION
    assert [r.key for r in s.records("tlsrpt-session", "2024-03-01")] == ["kept"]
    assert engine.query("SELECT version, count(*) FROM milterd_schema GROUP BY version") == \
        [(v, 1) for v in range(1, SCHEMA_VERSION + 1)]


def test_schema_version_reads_without_creating(engine):
    s = engine.store(migrate=False)
    assert s.schema_version() == 0
    assert s.schema_version() == 0
    if engine.name == "sqlite":
        tables = engine.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        tables = engine.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []


def _empty_database(engine) -> None:
    """The database exists (for SQLite: the file, in WAL mode) and has no schema yet: what
    several hosts starting at once for the first time find.  (Creating a *new* SQLite file from
    several processes at once is another race: milterd/store/sqlite.py's WAL switch.)"""
    assert engine.store(migrate=False).schema_version() == 0


def test_concurrent_migrations_threads(engine):
    _empty_database(engine)
    for round_ in range(3):
        stores = [engine.store(migrate=False) for _ in range(6)]
        results = run_threads(6, lambda n: stores[n].migrate())
        assert results == [SCHEMA_VERSION] * 6
        assert engine.query("SELECT version, count(*) FROM milterd_schema GROUP BY version") \
            == [(v, 1) for v in range(1, SCHEMA_VERSION + 1)]
        if round_ == 0:
            assert stores[0].put_records([rec("x")]) == 1
    assert len(engine.store().records("tlsrpt-session", "2024-03-01")) == 1


def test_concurrent_migrations_processes(engine):
    """Hosts starting at once: separate processes migrating the same empty database, released
    together once every one of them is ready."""
    _empty_database(engine)
    code = ("import os, sys\n"
            "from milterd.store.api import open_store\n"
            "s = open_store(os.environ['MILTERD_TEST_STORE_URL'])\n"
            "print('ready', flush=True)\n"
            "os.read(int(os.environ['GO_FD']), 1)\n"     # released together: EOF on the pipe
            "print(s.migrate(), s.schema_version())\n")
    go_r, go_w = os.pipe()
    env = dict(os.environ, MILTERD_TEST_STORE_URL=engine.url,   # not in argv: no password in ps
               GO_FD=str(go_r))
    procs = []
    try:
        for _ in range(4):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, pass_fds=(go_r,)))
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.stderr.read()
    finally:
        os.close(go_r)
        os.close(go_w)
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == [str(SCHEMA_VERSION), str(SCHEMA_VERSION)]
    assert engine.query("SELECT version, count(*) FROM milterd_schema GROUP BY version") == \
        [(v, 1) for v in range(1, SCHEMA_VERSION + 1)]


def test_schema_newer_than_code_is_refused(engine):
    s = engine.store()
    s.put_records([rec("kept")])
    engine.query("INSERT INTO milterd_schema (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    assert s.schema_version() == SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer"):
        s.migrate()
    with pytest.raises(StoreError, match="newer"):
        engine.store(migrate=False).migrate()
    # refusing changed nothing, and the store still answers
    assert engine.query("SELECT max(version) FROM milterd_schema")[0][0] == SCHEMA_VERSION + 1
    assert [r.key for r in s.records("tlsrpt-session", "2024-03-01")] == ["kept"]


# -- the database goes away and comes back ------------------------------------------------------

def _every_call_fails(s) -> None:
    calls = [
        lambda: s.ping(),
        lambda: s.schema_version(),
        lambda: s.migrate(),
        lambda: s.put_records([rec("during")]),
        lambda: s.records("tlsrpt-session", "2024-03-01"),
        lambda: s.record_domains("tlsrpt-session", "2024-03-01"),
        lambda: s.cache_get("c", "k", 1.0),
        lambda: s.cache_put("c", "k", "v", 10.0, "mx1", 1.0),
        lambda: s.claim("j", "k", "mx1", 60, 1.0),
        lambda: s.job_put("j", "k", "mx1", {}, 60, 1.0),
        lambda: s.job_get("j", "k"),
        lambda: s.jobs("j"),
        lambda: s.observe("o", "k", "d", {}, 1.0, "mx1"),
        lambda: s.observations("o"),
        lambda: s.prune("2024-01-01", 1.0),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(StoreError):
            call()


def _assert_no_secret(exc: BaseException, *secrets: str) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for secret in secrets:
        for text in texts:
            assert secret not in text, "the password leaked into an error"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_store_down_then_back_same_object(engine, mode):
    s = engine.store()
    assert s.put_records([rec("before")]) == 1
    s.claim("j", "k", "mx1", 60, 1000.0)
    if engine.name == "postgresql":
        engine.lab.stop(mode)
        assert not engine.lab.running
    else:
        # SQLite "down": the state directory is gone (an unmounted volume); an open connection
        # would still see the unlinked file, so the store is closed first (a restart).
        s.close()
        engine.path.parent.rename(engine.path.parent.with_name("away"))
    try:
        _every_call_fails(s)
        with pytest.raises(StoreError) as info:
            s.put_records([rec("during")])
        if engine.name == "postgresql":
            _assert_no_secret(info.value, engine.lab.password)
            assert redact(engine.url) in str(info.value)
    finally:
        if engine.name == "postgresql":
            engine.lab.start()
        else:
            engine.path.parent.with_name("away").rename(engine.path.parent)
    # the same Store object works again, and nothing was lost or doubled
    s.ping()
    assert s.put_records([rec("before"), rec("after")]) == 1
    assert [r.key for r in s.records("tlsrpt-session", "2024-03-01")] == ["after", "before"]
    assert s.claim("j", "k", "mx2", 60, 1001.0) is None                # the claim survived
    assert s.job_get("j", "k").owner == "mx1"


def test_postgres_idle_connection_lost_is_replaced(pg_engine):
    """PostgreSQL ended the session while the store sat idle (restart, failover, idle timeout):
    the next call succeeds on a fresh connection, no StoreError, applied once."""
    lab = pg_engine.lab
    a, b = pg_engine.store(), pg_engine.store()
    assert a.put_records([rec("one")]) == 1
    b.ping()
    with psycopg.connect(lab.admin_url, autocommit=True) as conn:
        ended = conn.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                             "pg_stat_activity WHERE datname = %s) t",
                             (pg_engine.database,)).fetchone()[0]
    assert ended == 2
    assert a.put_records([rec("one"), rec("two")]) == 1
    assert b.observe("o", "k", "d", {}, 1.0, "mx2").count == 1          # applied once
    assert b.observations("o")[0].count == 1
    lab.stop("fast")
    lab.start()
    assert a.put_records([rec("three")]) == 1
    assert [r.key for r in b.records("tlsrpt-session", "2024-03-01")] == ["one", "three", "two"]


def test_password_never_in_error_text(pg_lab):
    secret = "S3cr3t-Pa55word-xyz"
    cases = [
        pg_lab.url_with(password=secret),                                     # refused login
        pg_lab.url_with(password=secret, port=pg_lab.port + 1 if pg_lab.port < 65535 else 1),
        f"postgresql://milterd:{secret}@127.0.0.1:{pg_lab.port}/milterd?bogus_option=1",
        f"postgresql://milterd:{secret}@127.0.0.1:notaport/milterd",
        f"postgresql://milterd:{secret}@127.0.0.1:{pg_lab.port}/milterd?sslmode=nonsense",
        f"postgresql://milterd:{secret.replace('-', '%2D')}@127.0.0.1:{pg_lab.port}/milterd",
    ]
    for url in cases:
        s = open_store(url)
        try:
            with pytest.raises(StoreError) as info:
                s.migrate()
            _assert_no_secret(info.value, secret, secret.replace("-", "%2D"))
            assert "***" in str(info.value) or "milterd:" not in str(info.value)
        finally:
            s.close()
    with pytest.raises(StoreError) as info:
        open_store(f"mysql://milterd:{secret}@127.0.0.1/milterd")
    _assert_no_secret(info.value, secret)
    # and a working store's errors (a refused statement) carry no password either
    s = open_store(pg_lab.url)
    try:
        s.migrate()
        with pytest.raises(StoreError) as info:
            s.put_records([Record("k", "x", None, "d", "h", {})])
        _assert_no_secret(info.value, pg_lab.password)
    finally:
        s.close()


# -- `milterd store migrate` / `status` ---------------------------------------------------------

def _cli(argv: list[str]) -> tuple[int, str, str]:
    from milterd.store import cli

    parser = argparse.ArgumentParser(prog="milterd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


def test_cli_migrate_and_status(engine, tmp_path):
    config = tmp_path / "milterd.toml"
    config.write_text(f'[store]\nurl = "{engine.url}"\n')
    rc, out, err = _cli(["store", "status", "-c", str(config)])
    assert rc == 1 and "schema version: 0" in out and "migrate" in out, (out, err)
    rc, out, err = _cli(["store", "migrate", "-c", str(config)])
    assert rc == 0, err
    assert f"store: {redact(engine.url)}" in out
    assert "schema version before: 0" in out and f"schema version after: {SCHEMA_VERSION}" in out
    rc, out, _ = _cli(["store", "migrate", "-c", str(config)])
    assert rc == 0 and f"before: {SCHEMA_VERSION}" in out and "already up to date" in out
    s = engine.store()
    s.put_records([rec("a"), rec("b"), rec("c", kind="x")])
    s.cache_put("c", "k", "v", 10.0, "mx1", 1.0)
    rc, out, _ = _cli(["store", "status", "-c", str(config)])
    assert rc == 0
    assert f"schema version: {SCHEMA_VERSION}" in out
    for line in ("records: 3", "records[tlsrpt-session]: 2", "records[x]: 1", "cache: 1",
                 "jobs: 0", "observations: 0"):
        assert line + "\n" in out, out
    if engine.name == "postgresql":
        assert engine.lab.password not in out


def test_cli_unreachable_store_exits_2(pg_lab, tmp_path):
    config = tmp_path / "milterd.toml"
    for url in (pg_lab.url_with(password="wrong-password-123"),
                pg_lab.url_with(port=pg_lab.port + 1 if pg_lab.port < 65535 else 1),
                f"sqlite://{tmp_path}/missing-dir/milterd.db"):
        config.write_text(f'[store]\nurl = "{url}"\n')
        for cmd in ("migrate", "status"):
            rc, out, err = _cli(["store", cmd, "-c", str(config)])
            assert rc == 2, (cmd, out, err)
            assert "unreachable" in err
            assert "wrong-password-123" not in out + err and pg_lab.password not in out + err
    config.write_text('[store]\nurl = "mysql://x"\n')
    rc, out, err = _cli(["store", "migrate", "-c", str(config)])
    assert rc == 2 and "store.url" in err


# -- the lab itself -----------------------------------------------------------------------------

def test_lab_postgres_is_private_loopback_and_password_only(pg_lab):
    pid = pg_lab.pid
    assert pid is not None
    with open(f"/proc/{pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    assert uid != 0                                                  # never as root
    with psycopg.connect(pg_lab.admin_url, autocommit=True) as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()[0]
        socket_dir = conn.execute("SHOW unix_socket_directories").fetchone()[0]
        hba = conn.execute("SELECT type, address, auth_method FROM pg_hba_file_rules "
                           "WHERE error IS NULL").fetchall()
    assert set(listen.split(",")) <= {"127.0.0.1", "::1"}
    assert socket_dir == str(pg_lab.data_dir)
    assert {m for _, _, m in hba} == {"scram-sha-256"}
    assert {a for t, a, _ in hba if t == "host"} <= {"127.0.0.1", "::1"}
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://milterd@127.0.0.1:{pg_lab.port}/milterd",
                        connect_timeout=5).close()
    assert pg_lab.url.startswith(f"postgresql://milterd:{pg_lab.password}@127.0.0.1:"
                                 f"{pg_lab.port}/milterd")
    assert pg_lab.password not in pg_lab.log_text()


def test_lab_stop_start_cleanup(tmp_path):
    lab = PostgresLab(tmp_path)
    # as root the server runs as postgres, which cannot reach pytest's 0700 tmp_path
    assert lab.dir.is_relative_to(tmp_path) == (os.getuid() != 0)
    try:
        lab.start()
        first_pid, url = lab.pid, lab.url
        s = open_store(lab.url)
        assert s.migrate() == SCHEMA_VERSION
        lab.stop()
        assert lab.pid is None and not PostgresLab._alive(first_pid)
        with pytest.raises(StoreError):
            s.ping()
        lab.start()
        assert lab.url == url and lab.pid not in (None, first_pid)
        assert s.schema_version() == SCHEMA_VERSION                   # data kept across restarts
        s.close()
        assert lab.sessions() == 0
    finally:
        lab.cleanup()
    assert not lab.dir.exists() and lab.pid is None
