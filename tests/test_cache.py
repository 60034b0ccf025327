"""milterd.core.cache.TtlLruCache: bound, LRU order, lifetimes, injected clock, thread safety."""

from __future__ import annotations

import math
import threading
import time

import pytest

from milterd.core.cache import TtlLruCache

from support import FakeClock


def test_get_put_pop_clear_len():
    c: TtlLruCache[str, int] = TtlLruCache(10, clock=FakeClock())
    assert c.get("a") is None and c.get("a", -1) == -1 and len(c) == 0
    c.put("a", 1)
    c.put("b", 2)
    assert (c.get("a"), c.get("b"), len(c)) == (1, 2, 2)
    c.put("a", 3)                                  # replaces, does not add
    assert (c.get("a"), len(c)) == (3, 2)
    assert c.pop("a") == 3 and c.pop("a") is None and c.pop("a", 0) == 0
    assert c.get("a") is None and len(c) == 1
    c.clear()
    assert len(c) == 0 and c.get("b") is None


def test_stored_values_are_the_same_objects():
    c: TtlLruCache[str, object] = TtlLruCache(2)
    value = object()
    c.put("k", value)
    assert c.get("k") is value


def test_falsy_values_are_values():
    c: TtlLruCache[str, object] = TtlLruCache(4)
    for key, value in (("zero", 0), ("empty", ""), ("none", None), ("false", False)):
        c.put(key, value)
        assert c.get(key, "absent") == value


def test_bound_evicts_least_recently_used():
    c: TtlLruCache[str, int] = TtlLruCache(3, clock=FakeClock())
    for i, key in enumerate("abc"):
        c.put(key, i)
    assert c.get("a") == 0                          # a get is a use: "b" is now the oldest
    c.put("d", 3)
    assert len(c) == 3 and c.get("b") is None
    assert [c.get(k) for k in "acd"] == [0, 2, 3]
    c.put("c", 20)                                  # a put is a use too: "a" is the oldest now
    c.put("e", 4)
    assert c.get("a") is None and [c.get(k) for k in "cde"] == [20, 3, 4]


def test_a_miss_does_not_reorder():
    c: TtlLruCache[str, int] = TtlLruCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("x") is None
    c.put("c", 3)
    assert c.get("a") is None and c.get("b") == 2


@pytest.mark.parametrize("size", [0, -5, 1])
def test_at_least_one_entry(size):
    c: TtlLruCache[str, int] = TtlLruCache(size)
    assert c.max_entries == 1
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") is None and c.get("b") == 2 and len(c) == 1


def test_default_ttl_expires_at_the_boundary():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=60, clock=clock)
    c.put("a", 1)
    clock.now += 59.999
    assert c.get("a") == 1
    clock.now += 0.001                              # exactly stored + ttl: expired
    assert c.get("a") is None
    assert len(c) == 0                              # dropped when met


def test_per_entry_ttl_overrides_the_default():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=60, clock=clock)
    c.put("short", 1, ttl=5)
    c.put("long", 2, ttl=600)
    c.put("default", 3)
    clock.now += 5
    assert c.get("short") is None and c.get("long") == 2 and c.get("default") == 3
    clock.now += 55
    assert c.get("default") is None and c.get("long") == 2
    clock.now += 540
    assert c.get("long") is None


def test_no_default_ttl_never_expires():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, clock=clock)
    assert c.ttl == math.inf
    c.put("a", 1)
    clock.now += 1e12
    assert c.get("a") == 1


def test_a_get_does_not_extend_the_lifetime():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=10, clock=clock)
    c.put("a", 1)
    for _ in range(9):
        clock.now += 1
        assert c.get("a") == 1
    clock.now += 1
    assert c.get("a") is None


@pytest.mark.parametrize("ttl", [0, -1, -math.inf])
def test_a_lifetime_already_over_stores_nothing_and_forgets_the_key(ttl):
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=60, clock=FakeClock())
    c.put("a", 1)
    c.put("a", 2, ttl=ttl)
    assert c.get("a") is None and len(c) == 0


def test_since_counts_the_lifetime_from_an_earlier_moment():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=60, clock=clock)
    c.put("received-earlier", 1, since=clock.now - 50)
    c.put("long-ago", 2, since=clock.now - 60)      # already over: not stored
    assert c.get("long-ago") is None and len(c) == 1
    clock.now += 9.5
    assert c.get("received-earlier") == 1
    clock.now += 0.5
    assert c.get("received-earlier") is None


def test_pop_of_an_expired_entry_gives_the_default():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=1, clock=clock)
    c.put("a", 1)
    clock.now += 1
    assert c.pop("a", -1) == -1 and len(c) == 0


def test_expired_entries_still_count_until_met_and_are_evicted_first_when_oldest():
    clock = FakeClock()
    c: TtlLruCache[str, int] = TtlLruCache(2, clock=clock)
    c.put("old", 1, ttl=1)
    c.put("live", 2)
    clock.now += 2
    assert len(c) == 2                              # lazily dropped
    c.put("new", 3)
    assert len(c) == 2 and c.get("live") == 2 and c.get("new") == 3


def test_the_default_clock_is_monotonic_time():
    c: TtlLruCache[str, int] = TtlLruCache(10, ttl=0.05)
    c.put("a", 1)
    assert c.get("a") == 1
    time.sleep(0.1)
    assert c.get("a") is None


def test_threads_never_see_more_than_the_bound_nor_a_wrong_value():
    c: TtlLruCache[int, int] = TtlLruCache(64, ttl=60)
    errors: list[str] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        start.wait()
        for i in range(3000):
            key = (seed * 7919 + i) % 200
            c.put(key, key * 2)
            value = c.get(key)
            if value is not None and value != key * 2:
                errors.append(f"{key} -> {value}")
            if len(c) > 64:
                errors.append(f"size {len(c)}")
            if i % 97 == 0:
                c.pop(key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(c) <= 64
