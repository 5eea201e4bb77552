"""``/stats`` of dropr-server: the store's figures, shown capped."""

from __future__ import annotations

from typing import Any

from dropr.monitoring._metrics import MAX_LABELS

#: Channels ``/stats`` lists at most: the first ones by name.
STATS_CHANNELS = MAX_LABELS


class CappedStats:
    """What ``/stats`` answers, with at most ``limit`` channels listed.

    The store's figures are read once per few seconds whatever the number
    of readers (see the metrics' stats cache), and only for the channels
    shown: the first by name of a cheap listing (see ``StatsReader``).  The
    answer says how many channels there are (``channels_total``) and holds
    the store's running totals (``usage``), so that neither its size nor
    its cost grows with the store.  A reading that brings more channels
    than ``limit`` is cut here to the first by name.
    """

    def __init__(self, metrics: Any, limit: int = STATS_CHANNELS) -> None:
        self.metrics = metrics
        self.limit = limit

    def stats_json(self) -> dict[str, Any]:
        data: dict[str, Any] = self.metrics.stats_json()
        channels: dict[str, dict[str, Any]] = data.get("channels", {})
        data.setdefault("channels_total", len(channels))
        if len(channels) > self.limit:
            kept = sorted(channels)[: self.limit]
            data["channels"] = {n: channels[n] for n in kept}
            rates = data.get("rates", {})
            if isinstance(rates.get("channels"), dict):
                rates["channels"] = {n: v for n, v in rates["channels"].items() if n in kept}
        data["channels_shown"] = len(data.get("channels", {}))
        return data
