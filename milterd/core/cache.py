"""The one bounded, expiring cache of milterd: a thread-safe LRU whose entries have a lifetime.

Used for the policy-delegation views (:mod:`milterd.inbound.policy_views`), MTA-STS policies
(:mod:`milterd.outbound.mtasts`) and TLS policy answers (:mod:`milterd.outbound.tlspolicy`).

* **Bounded**: at most ``max_entries`` entries (at least 1).  Storing one more evicts the least
  recently used entry; :meth:`TtlLruCache.put` and a :meth:`TtlLruCache.get` that finds a live
  entry count as a use.
* **Expiring**: every entry has its own lifetime, ``ttl`` seconds from ``since`` (default: when it
  is stored; the cache's ``ttl`` when none is given).  An entry is expired from the moment
  ``clock() >= since + ttl``; an expired entry is never returned and is dropped when it is met.
  A lifetime that is already over (``ttl <= 0``) stores nothing and removes what the key held.
* **Clock**: :func:`time.monotonic` unless another one is given (tests; a wall clock where the
  lifetime is wall time, as for an MTA-STS ``max_age``).
* **Thread-safe**: every method holds one lock; values are stored as given, never copied.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

__all__ = ["TtlLruCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLruCache(Generic[K, V]):
    """A bounded LRU mapping whose entries expire (see the module docstring).

    :param max_entries: the most entries held (values below 1 count as 1).
    :param ttl: the default lifetime of an entry in seconds (``math.inf``: no default expiry).
    :param clock: a ``time.monotonic``-like function returning seconds.
    """

    def __init__(self, max_entries: int, ttl: float = math.inf, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max(1, int(max_entries))
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()  # key -> (value, expires)
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The live value stored under ``key`` (marked as recently used), else ``default``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            if entry[1] <= self._clock():
                del self._entries[key]
                return default
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, ttl: float | None = None, *,
            since: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (default: the cache's) from ``since``
        (a ``clock()`` reading; default: now), evicting the least recently used entry if full.
        A lifetime already over stores nothing and forgets ``key``."""
        lifetime = self.ttl if ttl is None else ttl
        with self._lock:
            now = self._clock()
            expires = (now if since is None else since) + lifetime
            if expires <= now:
                self._entries.pop(key, None)
                return
            self._entries[key] = (value, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Forget ``key``; its live value, else ``default``."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None or entry[1] <= self._clock():
                return default
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        """Entries held, including expired ones not yet dropped."""
        with self._lock:
            return len(self._entries)
