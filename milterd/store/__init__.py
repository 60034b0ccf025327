"""State that outlives a process and is shared by a fleet: ``[store] url``.

``sqlite:///path`` (the default, one host) or ``postgresql://…`` (several MX hosts).  The
interface is :class:`milterd.store.api.Store`; :func:`open_store` picks the implementation.
Nothing on a milter callback ever waits for a store: writers go through
:mod:`milterd.store.spool`.
"""

from milterd.store.api import (CacheEntry, JobState, Observation, Record, Store, StoreError,
                               open_store)

__all__ = ["CacheEntry", "JobState", "Observation", "Record", "Store", "StoreError", "open_store"]
