"""The store's figures for ``/metrics`` and ``/stats``, from a store object of their own."""

from __future__ import annotations

import threading

from dropr.interfaces import IStorage, QueueStats
from dropr.storage._spec import open_store


class StatsSource:
    """``stats()`` of the store ``spec`` names, opened on first use (in a thread).

    The serving store object serialises its work; counting there would hold
    up adds.  This one is opened without the serving store's lock, dedup
    index or limits, and closed with the daemon.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._store: IStorage | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, QueueStats]:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.spec)
            return dict(self._store.stats())

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
