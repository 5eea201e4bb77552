"""``/stats`` of dropr-server: the store's figures, shown capped."""

from __future__ import annotations

from typing import Any

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
