"""The store's figures for ``/metrics`` and ``/stats``: read apart, shown capped."""

from __future__ import annotations

import threading
from typing import Any

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


#: Channels ``/stats`` lists at most: the ones holding most messages.
STATS_CHANNELS = 200


class CappedStats:
    """What ``/stats`` answers, with at most ``limit`` channels listed.

    The figures of every channel are read once per few seconds whatever
    the number of readers (see the metrics' stats cache); the answer lists
    the channels holding most, and says how many there are, so that its
    size, and what a reader that never reads it holds in memory, does not
    grow with the store.
    """

    def __init__(self, metrics: Any, limit: int = STATS_CHANNELS) -> None:
        self.metrics = metrics
        self.limit = limit

    def stats_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.metrics.stats_json()
        channels: dict[str, dict[str, Any]] = data.get("channels", {})
        data["channels_total"] = len(channels)
        if len(channels) > self.limit:
            biggest = sorted(channels, key=lambda n: (-channels[n].get("depth", 0), n))
            kept = sorted(biggest[: self.limit])
            data["channels"] = {n: channels[n] for n in kept}
            rates = data.get("rates", {})
            if isinstance(rates.get("channels"), dict):
                rates["channels"] = {n: v for n, v in rates["channels"].items() if n in kept}
        data["channels_shown"] = len(data.get("channels", {}))
        return data
