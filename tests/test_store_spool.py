"""Shipping local journals into the store (#17 items 1-2): exactly once across crashes, nothing
lost while the store is down (SQLite locked, a PostgreSQL on a closed port, a real private
PostgreSQL stopped and started again), one log line per outage, the metrics the fleet rules use,
journal rotation and truncation, a never-blocking Spool, and kill -9 of a real ``milterd run``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from milterd.core.config import parse_config
from milterd.lab.metrics import parse, scrape
from milterd.lab.net import free_port
from milterd.lab.wait import wait_until
from milterd.store.api import Record, open_store
from milterd.store.service import TLSRPT_SHIPPER_STATE, current_store, start_store_services
from milterd.store.spool import (HOST_KIND, TLSRPT_KIND, WATERMARK_NS, Shipper, Spool,
                                 StoreHealth, StoreMetrics, records_apply, tlsrpt_converter,
                                 watermark_writer)
from prometheus_client import CollectorRegistry, generate_latest

HOST = "mx1.test"


def session(i: int, domain: str = "example.net", day: str = "2026-03-01") -> dict:
    return {"ts": f"{day}T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "key": f"s{i}",
            "queue_id": f"Q{i}", "policy_domain": domain, "policy_type": "sts",
            "policy_string": ["version: STSv1"], "mx_host": ["mx.example.net"],
            "receiving_mx_hostname": "mx.example.net", "receiving_ip": "192.0.2.1",
            "status": "sent", "tls_level": "verified", "result": "success", "result_type": "",
            "failure_reason_code": ""}


def append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def samples(registry: CollectorRegistry) -> dict[str, float]:
    return parse(generate_latest(registry).decode())


class Holder:
    """The store the shipper sees: swapped by the test ("down" / "back")."""

    def __init__(self, store):
        self.store = store

    def __call__(self):
        return self.store


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path}/db/milterd.db"
    (tmp_path / "db").mkdir()
    s = open_store(url)
    s.migrate()
    s.close()
    return url


def make_shipper(tmp_path, holder, metrics=None, **kw):
    metrics = metrics or StoreMetrics(CollectorRegistry())
    health = StoreHealth(metrics, "sqlite:///x")
    apply = records_apply(holder, tlsrpt_converter(HOST, "198.51.100.7"))
    return Shipper(tmp_path / "tlsrpt-sessions.jsonl", tmp_path / "ship.state", apply, health,
                   backoff=(0.05, 0.2), poll_interval=0.05, **kw)


def run_until_idle(shipper: Shipper, limit: int = 1000) -> list[str]:
    out = []
    for _ in range(limit):
        r = shipper.step()
        out.append(r)
        if r != "shipped":
            return out
    raise AssertionError("shipper never idle")


def drain(shipper: Shipper) -> None:
    """Step until nothing is left (a rotated file is let go one round after it is done)."""
    idle = 0
    for _ in range(1000):
        idle = idle + 1 if shipper.step() == "idle" else 0
        if idle == 3:
            return
    raise AssertionError("shipper never idle")


def stored(url: str) -> list[Record]:
    s = open_store(url)
    try:
        return s.records(TLSRPT_KIND, "2000-01-01", "2100-01-01")
    finally:
        s.close()


# -- the record contract ---------------------------------------------------------------------------
def test_tlsrpt_record_contract(tmp_path, sqlite_url):
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    rec = session(1, domain="Example.NET.", day="2026-03-01")
    rec["ts"] = "2026-03-01T23:59:59+00:00"
    late = dict(session(2), ts="2026-03-02T00:30:00+02:00")   # 2026-03-01 22:30 UTC
    append(journal, [rec, late])
    with journal.open("a") as f:                              # skipped, never stored
        f.write("not json\n" + json.dumps({"key": "k", "ts": "garbage",
                                           "policy_domain": "x.test"}) + "\n")
    shipper = make_shipper(tmp_path, Holder(open_store(sqlite_url)))
    assert run_until_idle(shipper) == ["shipped", "idle"]
    got = {r.key: r for r in stored(sqlite_url)}
    assert set(got) == {f"{HOST}:s1", f"{HOST}:s2"}
    r1 = got[f"{HOST}:s1"]
    assert (r1.kind, r1.day, r1.domain, r1.host) == (TLSRPT_KIND, "2026-03-01", "example.net", HOST)
    assert r1.data == {**rec, "host": HOST, "sending_ip": "198.51.100.7"}
    assert got[f"{HOST}:s2"].day == "2026-03-01"
    assert shipper.pending_records == 0


# -- exactly once ----------------------------------------------------------------------------------
class Crash(BaseException):
    pass


def test_crash_between_put_and_offset_save_stores_nothing_twice(tmp_path, sqlite_url):
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(1200)])       # three batches of 500
    store = open_store(sqlite_url)
    new_rows: list[int] = []
    real_put = store.put_records

    def put(records):
        n = real_put(records)
        new_rows.append(n)
        return n

    store.put_records = put
    first = make_shipper(tmp_path, Holder(store))
    assert first.step() == "shipped"                         # batch 1 committed and saved
    def crashing_save(*a, **kw):
        raise Crash("killed after the commit, before the offset was saved")

    first._save = crashing_save
    with pytest.raises(Crash):
        first.step()                                         # batch 2 committed, not saved
    assert new_rows == [500, 500]
    second = make_shipper(tmp_path, Holder(store))           # "the restarted process"
    assert run_until_idle(second) == ["shipped", "shipped", "idle"]
    assert new_rows == [500, 500, 0, 200]                    # the replay stored nothing
    keys = [r.key for r in stored(sqlite_url)]
    assert len(keys) == 1200 == len(set(keys))
    # and a third start finds nothing left to ship
    third = make_shipper(tmp_path, Holder(store))
    assert run_until_idle(third) == ["idle"] and new_rows == [500, 500, 0, 200]


# -- store down ------------------------------------------------------------------------------------
def test_store_down_keeps_records_logs_once_and_catches_up(tmp_path, sqlite_url, caplog):
    caplog.set_level(logging.INFO, logger="milterd.store")
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    down = open_store(f"postgresql://milterd:secret@127.0.0.1:{free_port()}/milterd"
                      "?connect_timeout=2")                  # nothing listens there
    holder = Holder(down)
    shipper = make_shipper(tmp_path, holder, metrics).start()
    try:
        append(journal, [session(i) for i in range(300)])
        wait_until(lambda: samples(registry).get("milterd_store_write_errors_total", 0) >= 3,
                   what="retries against the down store")
        m = samples(registry)
        assert m["milterd_store_up"] == 0
        assert m["milterd_store_spooled_records"] == 300
        append(journal, [session(i) for i in range(300, 450)])
        wait_until(lambda: samples(registry)["milterd_store_spooled_records"] == 450,
                   what="the spooled count to grow")
        assert stored(sqlite_url) == []
        holder.store = open_store(sqlite_url)                # the store is back
        # The count drops when the batch is committed, the health flips right after the
        # position is saved: wait for both.
        wait_until(lambda: (samples(registry)["milterd_store_spooled_records"],
                            samples(registry)["milterd_store_up"]) == (0, 1),
                   what="catching up, and the store up again")
    finally:
        shipper.stop()
    keys = [r.key for r in stored(sqlite_url)]
    assert len(keys) == 450 == len(set(keys))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not answer" in warnings[0].getMessage(), warnings
    assert "secret" not in caplog.text
    back = [r.getMessage() for r in caplog.records if "store back" in r.getMessage()]
    assert len(back) == 1 and "450 spooled records shipped" in back[0], back


def test_sqlite_locked_is_an_outage_too(tmp_path, sqlite_url, caplog):
    """Another process holds SQLite's write lock past the busy timeout: the batch fails, the
    records wait, and all of them land once the lock is gone."""
    caplog.set_level(logging.INFO, logger="milterd.store")
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(50)])
    locker = sqlite3.connect(sqlite_url[len("sqlite://"):], timeout=1)
    locker.execute("BEGIN EXCLUSIVE")
    store = open_store(sqlite_url)
    shipper = make_shipper(tmp_path, Holder(store))
    t0 = time.monotonic()
    assert shipper.step() == "failed"
    assert time.monotonic() - t0 < 10
    assert shipper.pending_records == 50
    locker.rollback()
    locker.close()
    assert run_until_idle(shipper) == ["shipped", "idle"]
    assert len(stored(sqlite_url)) == 50
    assert sum("does not answer" in r.getMessage() for r in caplog.records) == 1
    assert sum("store back" in r.getMessage() for r in caplog.records) == 1


# -- rotation and truncation of the journal --------------------------------------------------------
def test_rotation_while_down_and_across_restart(tmp_path, sqlite_url):
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    down = Holder(None)                                      # no store at all: a failure
    shipper = make_shipper(tmp_path, down)
    append(journal, [session(i) for i in range(10)])
    assert shipper.step() == "failed"
    shipper._stop.set()
    os.rename(journal, tmp_path / "tlsrpt-sessions.jsonl.1")   # rotated while down
    append(journal, [session(i) for i in range(10, 15)])
    # a restarted process finds the rotated file by inode and ships it first
    second = make_shipper(tmp_path, Holder(open_store(sqlite_url)))
    drain(second)
    assert len(second._segs) == 1                            # the rotated file is let go
    assert sorted(int(r.key.split(":s")[1]) for r in stored(sqlite_url)) == list(range(15))
    # rotation while running, more lines in both files before the shipper looks
    append(journal, [session(i) for i in range(15, 20)])
    os.rename(journal, tmp_path / "tlsrpt-sessions.jsonl.2")
    append(tmp_path / "tlsrpt-sessions.jsonl.2", [session(20)])  # a late writer
    append(journal, [session(i) for i in range(21, 25)])
    drain(second)
    assert sorted(int(r.key.split(":s")[1]) for r in stored(sqlite_url)) == list(range(25))


def test_copytruncate_finishes_the_copy(tmp_path, sqlite_url):
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    holder = Holder(open_store(sqlite_url))
    shipper = make_shipper(tmp_path, holder, batch=5)
    append(journal, [session(i) for i in range(5)])
    run_until_idle(shipper)
    holder.store = None                                      # down: lines 5..9 wait
    append(journal, [session(i) for i in range(5, 10)])
    assert shipper.step() == "failed"
    (tmp_path / "tlsrpt-sessions.jsonl.1").write_bytes(journal.read_bytes())   # copy
    os.truncate(journal, 0)                                  # … truncate
    append(journal, [session(i) for i in range(10, 40)])    # regrown past the old offset
    holder.store = open_store(sqlite_url)
    drain(shipper)
    assert sorted(int(r.key.split(":s")[1]) for r in stored(sqlite_url)) == list(range(40))


def test_over_the_bound_warns_and_drops_nothing(tmp_path, sqlite_url, caplog):
    caplog.set_level(logging.WARNING, logger="milterd.store")
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(100)])        # ~45 KB
    holder = Holder(None)
    shipper = make_shipper(tmp_path, holder, max_bytes=10_000)
    for _ in range(3):
        assert shipper.step() == "failed"
    assert sum("spool_max_mb" in r.getMessage() for r in caplog.records) == 1
    holder.store = open_store(sqlite_url)
    run_until_idle(shipper)
    assert len(stored(sqlite_url)) == 100


# -- Spool: the in-process producer ----------------------------------------------------------------
def test_spool_submit_never_blocks_on_a_hanging_store(tmp_path, sqlite_url):
    registry = CollectorRegistry()
    metrics = StoreMetrics(registry)
    health = StoreHealth(metrics, sqlite_url)
    release = threading.Event()
    store = open_store(sqlite_url)
    applied: list[int] = []

    def apply(items):
        release.wait()                                       # the store hangs
        for it in items:
            store.observe("cert", it["k"], "partner.test", {}, it["t"], HOST)
        applied.append(len(items))

    spool = Spool(tmp_path / "spool", "observations", apply, health, max_queue=200,
                  max_bytes=20_000, poll_interval=0.05, backoff=(0.05, 0.2)).start()
    try:
        worst, accepted = 0.0, 0
        for i in range(5000):
            t0 = time.perf_counter()
            accepted += spool.submit({"k": f"c{i % 7}", "t": 1000.0 + i})
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.05, worst
        assert 0 < accepted < 5000
        dropped = lambda: int(samples(registry).get("milterd_store_spool_dropped_total", 0))  # noqa: E731
        lines = lambda: Path(spool.path).read_bytes().count(b"\n")  # noqa: E731
        # every item is either in the journal or refused (counted): the total is exact
        wait_until(lambda: lines() + dropped() == 5000, what="the writer to drain the queue")
        written = lines()
        assert 0 < written < 5000
        assert os.path.getsize(spool.path) <= 20_000 + 500 * 40
        release.set()
        wait_until(lambda: spool.shipper.pending_records == 0, what="shipping")
        total = sum(o.count for o in store.observations("cert"))
        assert total == written
    finally:
        release.set()
        spool.stop()


def test_spool_compacts_and_survives_restart(tmp_path, sqlite_url):
    metrics = StoreMetrics(CollectorRegistry())
    health = StoreHealth(metrics, sqlite_url)
    store = open_store(sqlite_url)

    def apply(items):
        store.put_records([Record("obs", it["k"], "2026-03-01", "p.test", HOST, it)
                           for it in items])

    def mk():
        return Spool(tmp_path / "spool", "obs", apply, health, poll_interval=0.02,
                     compact_bytes=2000).start()

    spool = mk()
    for i in range(200):
        assert spool.submit({"k": f"a{i}"})
    wait_until(lambda: len(store.records("obs", "2026-03-01")) == 200, what="shipped")
    wait_until(lambda: os.path.getsize(spool.path) == 0, what="compaction")
    spool.stop()
    # a torn batch left by a crash is cut, the next ones are shipped
    with open(spool.path, "ab") as f:
        f.write(b'{"k":"torn')
    spool = mk()
    for i in range(200, 230):
        spool.submit({"k": f"a{i}"})
    wait_until(lambda: len(store.records("obs", "2026-03-01")) == 230, what="shipped again")
    spool.stop()


# -- the watermark ---------------------------------------------------------------------------------
def test_watermark_only_when_caught_up_never_back_and_throttled(tmp_path, sqlite_url):
    """The watermark is written after a pass that found the journal fully shipped — never while
    records wait (the store down) — with the clock's time, never going back; after shipping at
    once (then at most once a second), while idle every caught_up_every seconds."""
    from support import FakeClock

    clock = FakeClock(1_772_000_000.0)
    marks: list[float] = []
    fail = []

    def caught_up(ts):
        if fail:
            raise fail[0]
        marks.append(ts)

    store = open_store(sqlite_url)
    holder = Holder(store)
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(30)])
    shipper = make_shipper(tmp_path, holder, batch=10, caught_up=caught_up,
                           caught_up_every=3600, clock=clock)
    assert run_until_idle(shipper) == ["shipped"] * 3 + ["idle"]
    assert marks == [clock.now] and shipper.watermark == clock.now   # right after the backlog
    assert len(stored(sqlite_url)) == 30
    clock.now += 10
    assert shipper.step() == "idle" and len(marks) == 1       # idle, not due (every 3600 s)

    # the store goes down with records waiting: no watermark while they wait
    holder.store = None
    append(journal, [session(i) for i in range(30, 40)])
    clock.now += 5000
    assert shipper.step() == "failed" and shipper.step() == "failed"
    assert len(marks) == 1 and shipper.pending_records == 10
    holder.store = store
    time.sleep(1.05)        # WATERMARK_MIN_GAP: at most one a second after shipping
    assert run_until_idle(shipper) == ["shipped", "idle"]
    assert marks == [1_772_000_000.0, clock.now]

    # a clock stepped back does not move it back
    clock.now -= 3000
    shipper._caught_up_every = 0
    assert shipper.step() == "idle"
    assert marks[-1] == marks[-2] and shipper.watermark == marks[-2]

    # a failing watermark write is a failed store write (and retried)
    from milterd.store.api import StoreError

    fail.append(StoreError("down"))
    m = shipper.health.metrics
    before = m.write_errors._value.get()
    assert shipper.step() == "failed" and m.up._value.get() == 0
    assert m.write_errors._value.get() == before + 1
    fail.clear()
    clock.now += 7000
    assert shipper.step() == "idle" and marks[-1] == clock.now and m.up._value.get() == 1


def test_watermark_writer_roster_once_a_day(tmp_path, sqlite_url):
    store = open_store(sqlite_url)
    write = watermark_writer(lambda: store, HOST)
    day1 = 1_772_323_200.0                                     # 2026-03-01T00:00:00Z
    for ts in (day1 + 10, day1 + 3600, day1 + 86400 + 5):
        write(ts)
    entry = store.cache_get(WATERMARK_NS, HOST, day1 + 86400 + 6)
    assert json.loads(entry.value) == {"ts": day1 + 86400 + 5} and entry.host == HOST
    assert entry.expires_at > day1 + 300 * 86400                # far in the future
    roster = store.records(HOST_KIND, "2026-02-28", "2026-03-03")
    assert [(r.key, r.day, r.host) for r in roster] == [
        (f"{HOST}|2026-03-01", "2026-03-01", HOST), (f"{HOST}|2026-03-02", "2026-03-02", HOST)]
    with pytest.raises(Exception):
        watermark_writer(lambda: None, HOST)(day1)


def test_service_writes_the_watermark_after_shipping(tmp_path, sqlite_url):
    state = tmp_path / "state"
    state.mkdir()
    config = parse_config(f'[outbound]\nmaillog = "{tmp_path}/maillog"\nstate_dir = "{state}"\n'
                          f'[store]\nurl = "{sqlite_url}"\nhost = "{HOST}"\n')
    app = fake_app(config)
    append(state / "tlsrpt-sessions.jsonl", [session(i) for i in range(50)])
    t0 = time.time()
    service = start_store_services(app, config)
    store = open_store(sqlite_url)
    try:
        entry = wait_until(lambda: store.cache_get(WATERMARK_NS, HOST, time.time()),
                           what="the watermark")
        assert len(stored(sqlite_url)) == 50              # written after the records, not before
        assert t0 <= json.loads(entry.value)["ts"] <= time.time()
        today = time.strftime("%Y-%m-%d", time.gmtime(json.loads(entry.value)["ts"]))
        assert [r.host for r in store.records(HOST_KIND, today)] == [HOST]
    finally:
        service.stop()
        store.close()


# -- the service, on a real PostgreSQL -------------------------------------------------------------
@pytest.fixture(scope="module")
def pg():
    from milterd.lab.postgres import running_postgres

    with running_postgres() as lab:
        yield lab


def fake_app(config):
    from milterd.core.app import App

    return App(config)


def test_service_postgres_stopped_under_traffic(tmp_path, pg, caplog):
    caplog.set_level(logging.INFO, logger="milterd.store")
    state = tmp_path / "state"
    state.mkdir()
    config = parse_config(f'[outbound]\nmaillog = "{tmp_path}/maillog"\nstate_dir = "{state}"\n'
                          f'[store]\nurl = "{pg.url}"\nhost = "{HOST}"\n'
                          f'[tlsrpt]\nsending_ip = "198.51.100.7"\n')
    app = fake_app(config)
    journal = state / "tlsrpt-sessions.jsonl"
    append(journal, [session(i, day="2026-03-02") for i in range(100)])
    service = start_store_services(app, config)
    reg = app.metrics.registry
    try:
        wait_until(lambda: current_store(app) is not None, what="migrated")
        wait_until(lambda: (samples(reg)["milterd_store_spooled_records"],
                            samples(reg)["milterd_store_up"]) == (0, 1), what="shipped, up")
        pg.stop()
        append(journal, [session(i, day="2026-03-02") for i in range(100, 400)])
        # a failed write (the records' batch, or the watermark written once caught up)
        m = wait_until(lambda: (lambda m: m.get("milterd_store_write_errors_total", 0) >= 1
                                and m["milterd_store_spooled_records"] == 300 and m)(
            samples(reg)), timeout=30, what="a failed write with the records spooled")
        assert m["milterd_store_up"] == 0 and m["milterd_store_spooled_records"] == 300
        # the service restarts (a reload that changes the store's settings) during the outage
        service.reconfigure(parse_config(
            f'[outbound]\nmaillog = "{tmp_path}/maillog"\nstate_dir = "{state}"\n'
            f'[store]\nurl = "{pg.url}"\nhost = "{HOST}"\nspool_max_mb = 100\n'
            f'[tlsrpt]\nsending_ip = "198.51.100.7"\n'))
        append(journal, [session(i, day="2026-03-02") for i in range(400, 450)])
        wait_until(lambda: samples(reg)["milterd_store_spooled_records"] == 350,
                   what="the spool to grow")
        pg.start()
        wait_until(lambda: (samples(reg)["milterd_store_spooled_records"],
                            samples(reg)["milterd_store_up"]) == (0, 1), timeout=90,
                   what="catching up after PostgreSQL is back, and up")
    finally:
        service.stop()
    recs = stored(pg.url)
    assert len(recs) == 450 == len({r.key for r in recs})
    assert {r.host for r in recs} == {HOST}
    assert all(r.data["sending_ip"] == "198.51.100.7" for r in recs)
    assert (state / TLSRPT_SHIPPER_STATE).exists()
    text = caplog.text
    assert pg.url.split(":")[2].split("@")[0] not in text     # the password
    # one warning for the outage, though the service was restarted during it
    warnings = [r for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("milterd")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert sum("store back" in r.getMessage() for r in caplog.records) == 1


def test_service_without_anything_to_record_needs_no_store(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="milterd.store")
    config = parse_config("")                                # no [store], no state_dir
    app = fake_app(config)
    service = start_store_services(app, config)
    service.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- kill -9 of a real milterd run ----------------------------------------------------------------
def test_kill9_of_milterd_run_with_records_pending(tmp_path, milterd_factory):
    """Records pending in the journal (SQLite held locked by another process: the store "is
    down"), milterd killed with SIGKILL, the lock released, milterd started again: every record
    is in the store exactly once, and /metrics says so."""
    state = tmp_path / "state"
    state.mkdir()
    maillog = tmp_path / "maillog"
    maillog.write_text("")
    db = state / "milterd.db"
    url = f"sqlite://{db}"
    s = open_store(url)
    s.migrate()
    s.close()
    journal = state / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(700)])
    port = free_port()
    cfg = (f'[metrics]\nlisten = "127.0.0.1:{port}"\n[outbound]\nmaillog = "{maillog}"\n'
           f'state_dir = "{state}"\n[store]\nhost = "{HOST}"\n')
    proc = milterd_factory(cfg)
    wait_until(lambda: "milterd_store_up" in scrape(port), timeout=10,
               what="the store metrics: milterd run starts the store services "
               "(milterd.core.daemon calls milterd.store.service.start_store_services)")
    wait_until(lambda: scrape(port).get("milterd_store_spooled_records") == 0,
               what="the first 700 shipped")
    locker = sqlite3.connect(str(db), timeout=5)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        append(journal, [session(i) for i in range(700, 1500)])
        m = wait_until(lambda: (lambda m: m.get("milterd_store_write_errors_total", 0) >= 1
                                and m.get("milterd_store_spooled_records") == 800 and m)(
            scrape(port)), timeout=30, what="a failed write while SQLite is locked")
        assert m["milterd_store_up"] == 0 and m["milterd_store_spooled_records"] == 800
        proc.signal(signal.SIGKILL)
        proc.proc.wait(10)
    finally:
        locker.rollback()
        locker.close()
    proc.start()
    wait_until(lambda: scrape(port).get("milterd_store_spooled_records") == 0, timeout=30,
               what="catching up after the restart")
    keys = [r.key for r in stored(url)]
    assert len(keys) == 1500 == len(set(keys))
    assert proc.log_text().count("does not answer") == 1


def test_a_hanging_store_call_does_not_hold_up_stop_or_the_successor(tmp_path, sqlite_url):
    """stop() gives up on a shipper stuck in a store call; the stuck one saves nothing after
    (its successor owns the state now), and nothing is stored twice or lost."""
    journal = tmp_path / "tlsrpt-sessions.jsonl"
    append(journal, [session(i) for i in range(20)])
    release = threading.Event()
    store = open_store(sqlite_url)

    class Hanging:
        def put_records(self, records):
            release.wait(30)
            return store.put_records(records)

    stuck = make_shipper(tmp_path, Holder(Hanging()), batch=5).start()
    wait_until(lambda: stuck._loaded, what="the stuck shipper loaded")
    t0 = time.monotonic()
    stuck.stop(timeout=0.3)
    assert time.monotonic() - t0 < 2
    successor = make_shipper(tmp_path, Holder(store), batch=5)
    run_until_idle(successor)
    saved = (tmp_path / "ship.state").read_text()
    release.set()
    wait_until(lambda: not stuck._thread.is_alive(), what="the stuck call to return")
    assert (tmp_path / "ship.state").read_text() == saved
    keys = [r.key for r in stored(sqlite_url)]
    assert len(keys) == 20 == len(set(keys))
