"""What the daemons count: Prometheus metrics, a JSON ``/stats``, recent rates and errors.

Each daemon has its own :class:`ServerMetrics` or :class:`ClientMetrics`,
with a ``CollectorRegistry`` of its own (never prometheus_client's global
one, so two daemons in one process, as in tests, do not mix).  Counters
are kept as events happen; the depth of each queue is read at scrape time
by a custom collector, from ``stats()`` of a storage opened for that alone,
at most once every ``stats_ttl`` seconds and one walk at a time, so a scrape
never runs a walk of its own while another is under way.

Names are checked against a cap: a peer can name any channel, and each
label value costs memory, so past ``MAX_LABELS`` distinct values the rest
are counted under ``"_other"``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from dropr.interfaces import IStorage, IUsage, QueueStats
from dropr.storage._spec import open_store

if TYPE_CHECKING:
    from dropr.client._sender import DestinationSender

#: Distinct channel (or destination) label values kept; the rest are "_other".
MAX_LABELS = 200
OTHER = "_other"
#: Seconds per slot of the rate ring, and how many slots it keeps (10 minutes).
RATE_INTERVAL = 10.0
RATE_SLOTS = 60
#: Refused requests and errors kept for the status page.
RECENT_ERRORS = 50

#: Latency buckets, in seconds: a sync takes milliseconds, an upload up to minutes.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

StatsFunc = Callable[[], Mapping[str, QueueStats]]


class ShownStats(dict[str, QueueStats]):
    """The figures of the queues shown, with how many queues there are in all.

    ``usage`` is the storage's running ``(messages, bytes)`` over all its
    queues, when it keeps them (``IUsage``); None otherwise.
    """

    def __init__(
        self,
        figures: Mapping[str, QueueStats],
        total: int,
        usage: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(figures)
        self.total = total
        self.usage = usage


def queues_total(stats: Mapping[str, QueueStats]) -> int:
    """How many queues there are: more than those in ``stats`` if it shows a few."""
    return stats.total if isinstance(stats, ShownStats) else len(stats)


class LabelCap:
    """Label values, at most ``limit`` distinct ones; later ones become ``"_other"``."""

    def __init__(self, limit: int = MAX_LABELS) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class RateRing:
    """Counts per ``interval`` seconds over the last ``slots`` intervals, per series.

    Thread-safe; ``add`` costs a lock and a dict update.  Slots are aligned
    on multiples of ``interval`` since the epoch.
    """

    def __init__(
        self,
        interval: float = RATE_INTERVAL,
        slots: int = RATE_SLOTS,
        clock: Callable[[], float] = time.time,
        max_series: int = MAX_LABELS + 8,
    ) -> None:
        self.interval = interval
        self.slots = slots
        self.max_series = max_series
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, deque[int]] = {}
        self._slot = self._now_slot()

    def _now_slot(self) -> int:
        return int(self._clock() // self.interval)

    def _advance(self) -> None:
        now = self._now_slot()
        steps = now - self._slot
        if steps <= 0:
            return
        for counts in self._series.values():
            counts.extend([0] * min(steps, self.slots))
        self._slot = now

    def add(self, series: str, n: int = 1) -> None:
        """Count ``n`` events of ``series`` now."""
        if n <= 0:
            return
        with self._lock:
            self._advance()
            counts = self._series.get(series)
            if counts is None:
                if len(self._series) >= self.max_series:
                    return
                counts = self._series[series] = deque([0] * self.slots, maxlen=self.slots)
            counts[-1] += n

    def snapshot(self, names: Iterable[str] = ()) -> dict[str, Any]:
        """``{"interval", "end", "series": {name: [oldest ... newest]}}``.

        ``end`` is when the newest (still running) slot ends; ``names`` are
        included even when nothing was counted for them yet.
        """
        with self._lock:
            self._advance()
            series = {name: list(counts) for name, counts in self._series.items()}
            end = (self._slot + 1) * self.interval
        for name in names:
            series.setdefault(name, [0] * self.slots)
        return {"interval": self.interval, "end": end, "series": series}

    def last(self, series: str, seconds: float = 60.0) -> float:
        """Events per second of ``series`` over the last ``seconds`` of whole slots."""
        n = max(1, int(seconds // self.interval))
        with self._lock:
            self._advance()
            counts = self._series.get(series)
            if counts is None:
                return 0.0
            whole = list(counts)[-n - 1 : -1]
        return sum(whole) / (len(whole) * self.interval) if whole else 0.0


class RecentErrors:
    """The last ``size`` errors, newest first, each a small dict."""

    def __init__(self, size: int = RECENT_ERRORS, clock: Callable[[], float] = time.time) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._clock = clock

    def add(self, **fields: Any) -> None:
        item = {"time": round(self._clock(), 3), **fields}
        with self._lock:
            self._items.appendleft(item)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)


class StatsCache:
    """``stats()`` at most once every ``ttl`` seconds, and one walk at a time.

    A caller that finds a walk under way gets the previous figures instead
    of starting another.
    """

    def __init__(
        self, stats: StatsFunc, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stats = stats
        self.ttl = ttl
        self._clock = clock
        self._walk = threading.Lock()
        self._value: Mapping[str, QueueStats] = {}
        self._at: float | None = None
        #: Seconds the last walk took.
        self.walk_seconds = 0.0
        self.error = ""

    def get(self) -> tuple[Mapping[str, QueueStats], float]:
        """``(figures per queue, their age in seconds)``."""
        stale = self._at is None or self._clock() - self._at >= self.ttl
        if stale and self._walk.acquire(blocking=self._at is None):
            try:
                if self._at is None or self._clock() - self._at >= self.ttl:
                    started = self._clock()
                    try:
                        value = self._stats()
                        self._value = value if isinstance(value, ShownStats) else dict(value)
                        self.error = ""
                    except Exception as e:  # a scrape must not fail: keep the old
                        self.error = f"{type(e).__name__}: {e}"
                    self._at = self._clock()
                    self.walk_seconds = self._at - started
            finally:
                self._walk.release()
        age = 0.0 if self._at is None else max(0.0, self._clock() - self._at)
        return self._value, age


class StatsReader:
    """``stats()`` of the spool or store ``spec`` names, from a storage opened for that alone.

    A daemon's own storage object serialises its work under one lock; a
    walk for the metrics there would hold up adds and takes.  Opened on
    first use (in a thread) with :func:`~dropr.storage._spec.open_store`,
    closed with the daemon.

    Only the first ``limit`` queues by name are shown, so only their
    figures are read: the names come from a cheap listing
    (``queue_names()`` where the storage has one), and the totals over all
    queues from its running ``usage()``.  A reading costs what it shows,
    not the whole storage.
    """

    def __init__(
        self,
        spec: str,
        limit: int = MAX_LABELS,
        opener: Callable[[str], IStorage] = open_store,
    ) -> None:
        self.spec = spec
        self.limit = limit
        self._open = opener
        self._storage: IStorage | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ShownStats:
        with self._lock:
            if self._storage is None:
                self._storage = self._open(self.spec)
            return read_shown(self._storage, self.limit)

    def close(self) -> None:
        with self._lock:
            if self._storage is not None:
                self._storage.close()
                self._storage = None


def read_shown(storage: IStorage, limit: int) -> ShownStats:
    """The figures of the first ``limit`` queues of ``storage`` by name, and totals."""
    listing = getattr(storage, "queue_names", None)
    names = sorted(listing() if callable(listing) else storage.queues())
    usage = storage.usage() if IUsage.providedBy(storage) else None
    return ShownStats(storage.stats(queues=names[:limit]), len(names), usage)


class QueueCollector:
    """Gauges per queue (``prefix_depth{label=...}`` and so on), read at scrape time."""

    _GAUGES = (
        ("depth", "Messages waiting or taken, not yet acked or failed."),
        ("bytes", "Payload bytes of those messages."),
        ("oldest_age_seconds", "Seconds since the oldest of them was put."),
        ("taken", "Messages under a lease that has not expired."),
        ("failed", "Messages in the failed area."),
    )

    def __init__(self, prefix: str, label: str, cache: StatsCache) -> None:
        self.prefix = prefix
        self.label = label
        self.cache = cache

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(f"{self.prefix}_{name}", doc, labels=[self.label])
            for name, doc in self._GAUGES
        ]

    def describe(self) -> Iterator[Metric]:
        yield from self._families()
        yield GaugeMetricFamily(f"{self.prefix}_queues", "")
        yield GaugeMetricFamily(f"{self.prefix}_stats_seconds", "")
        yield GaugeMetricFamily(f"{self.prefix}_stats_age_seconds", "")

    def collect(self) -> Iterator[Metric]:
        stats, age = self.cache.get()
        families = self._families()
        cap = LabelCap()
        merged: dict[str, list[float]] = {}
        for name, s in stats.items():
            values = [s.depth, s.bytes, s.oldest_age, s.taken, s.failed]
            key = cap(name)
            if key in merged:  # "_other": sums, and the oldest of the ages
                old = merged[key]
                merged[key] = [old[0] + values[0], old[1] + values[1], max(old[2], values[2])]
                merged[key] += [old[3] + values[3], old[4] + values[4]]
            else:
                merged[key] = [float(v) for v in values]
        for key, values in merged.items():
            for family, value in zip(families, values, strict=True):
                family.add_metric([key], value)
        yield from families
        yield GaugeMetricFamily(
            f"{self.prefix}_queues",
            f"Queues in all; the gauges per {self.label} cover the first few by name.",
            value=queues_total(stats),
        )
        yield GaugeMetricFamily(
            f"{self.prefix}_stats_seconds",
            "Seconds the last walk of the queues for these figures took.",
            value=self.cache.walk_seconds,
        )
        yield GaugeMetricFamily(
            f"{self.prefix}_stats_age_seconds",
            "Seconds since the queue figures were read (they are cached).",
            value=age,
        )


def _stats_dict(stats: Mapping[str, QueueStats]) -> dict[str, dict[str, Any]]:
    return {name: asdict(s) for name, s in sorted(stats.items())}


def _usage_dict(stats: Mapping[str, QueueStats]) -> dict[str, int]:
    """``{"messages", "bytes"}`` waiting over all queues: running totals if kept."""
    usage = stats.usage if isinstance(stats, ShownStats) else None
    if usage is None:
        shown = stats.values()
        usage = (sum(s.depth for s in shown), sum(s.bytes for s in shown))
    return {"messages": usage[0], "bytes": usage[1]}


class _Daemon:
    """What both daemons' metrics share: a registry, a stats cache, rates and errors."""

    def __init__(
        self,
        service: str,
        stats: StatsFunc | None,
        stats_ttl: float,
        prefix: str,
        label: str,
        clock: Callable[[], float],
    ) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = clock()
        self._clock = clock
        self.rates = RateRing(clock=clock)
        self.errors = RecentErrors(clock=clock)
        self.labels = LabelCap()
        self.cache = StatsCache(stats or dict, stats_ttl)
        self.registry.register(QueueCollector(prefix, label, self.cache))
        ProcessCollector(registry=self.registry)
        self._lock = threading.Lock()
        self.totals: dict[str, int] = {}

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self.totals[name] = self.totals.get(name, 0) + n

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition (may walk the queues: call it in a thread)."""
        return bytes(generate_latest(self.registry))

    def _base_stats(self) -> dict[str, Any]:
        stats, age = self.cache.get()
        now = self._clock()
        with self._lock:
            totals = dict(self.totals)
        return {
            "service": self.service,
            "time": round(now, 3),
            "uptime": round(now - self.started, 3),
            "totals": totals,
            "queues": _stats_dict(stats),
            "queues_total": queues_total(stats),
            "usage": _usage_dict(stats),
            "stats_age": round(age, 3),
            "stats_error": self.cache.error,
        }


class ServerMetrics(_Daemon):
    """The counters of a dropr-server; the receiver calls the hooks below.

    :param stats: returns ``stats()`` of the store (read at scrape time).
    """

    #: the rate series the status page draws
    SERIES = ("received", "stored", "duplicates", "rejected", "refused")

    def __init__(
        self,
        stats: StatsFunc | None = None,
        stats_ttl: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("dropr-server", stats, stats_ttl, "dropr_store", "channel", clock)
        r = self.registry
        self.received_messages = Counter(
            "dropr_server_received_messages", "Messages in answered requests.", registry=r
        )
        self.received_bytes = Counter(
            "dropr_server_received_bytes", "Bytes of request bodies received.", registry=r
        )
        self.stored_messages = Counter(
            "dropr_server_stored_messages",
            "Messages stored (new ones, not duplicates).",
            ["channel"],
            registry=r,
        )
        self.stored_bytes = Counter(
            "dropr_server_stored_bytes", "Payload bytes stored.", ["channel"], registry=r
        )
        self.duplicates = Counter(
            "dropr_server_duplicate_messages",
            "Messages received again and recognised by their id (answered stored).",
            ["channel"],
            registry=r,
        )
        self.rejected = Counter(
            "dropr_server_rejected_messages",
            "Messages refused one by one: invalid, too_old, clock_skew.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "dropr_server_requests", "POST requests answered, by status code.", ["code"], registry=r
        )
        self.request_seconds = Histogram(
            "dropr_server_request_seconds",
            "Seconds from a POST's first body byte to its answer.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.sync_seconds = Histogram(
            "dropr_server_sync_seconds",
            "Seconds to write, sync and rename one batch into the store (per channel).",
            buckets=_BUCKETS,
            registry=r,
        )

    # -- hooks (receiver) ------------------------------------------------------

    def stored(self, channel: str, received: int, new: int, new_bytes: int, seconds: float) -> None:
        """A channel's part of a request went to the store (in a disk thread)."""
        label = self.labels(channel)
        self.sync_seconds.observe(seconds)
        self.stored_messages.labels(label).inc(new)
        self.stored_bytes.labels(label).inc(new_bytes)
        if received > new:
            self.duplicates.labels(label).inc(received - new)
        self.rates.add("stored", new)
        self.rates.add("duplicates", received - new)
        self.rates.add("channel:" + label, new)
        self._count("stored", new)
        self._count("duplicates", received - new)

    def rejected_messages(self, counts: Mapping[str, int]) -> None:
        """Messages refused one by one, by kind of reason."""
        for kind, n in counts.items():
            if n:
                self.rejected.labels(kind).inc(n)
                self.rates.add("rejected", n)
                self._count("rejected", n)

    def answered(
        self,
        status: int,
        seconds: float,
        nbytes: int,
        messages: int = 0,
        reason: str = "",
        peer: str = "",
    ) -> None:
        """A POST was answered ``status`` (in the reactor thread)."""
        self.requests.labels(str(status)).inc()
        self.request_seconds.observe(seconds)
        self.received_bytes.inc(nbytes)
        if status == 200:
            self.received_messages.inc(messages)
            self.rates.add("received", messages)
            self._count("received", messages)
            return
        self.rates.add("refused")
        self._count(f"refused_{status}", 1)
        self.errors.add(status=status, reason=reason[:500], peer=peer)

    # -- reading -----------------------------------------------------------------

    def stats_json(self) -> dict[str, Any]:
        """What ``GET /stats`` answers (may walk the store: call it in a thread)."""
        data = self._base_stats()
        data["channels"] = data.pop("queues")
        data["channels_total"] = data.pop("queues_total")
        rates = self.rates.snapshot(self.SERIES)
        channel_rates = {
            name.removeprefix("channel:"): counts
            for name, counts in rates["series"].items()
            if name.startswith("channel:")
        }
        rates["series"] = {k: v for k, v in rates["series"].items() if not k.startswith("channel:")}
        rates["channels"] = channel_rates
        data["rates"] = rates
        data["errors"] = self.errors.snapshot()
        return data


class SenderCollector:
    """Counters and gauges of the client's senders, read from them at scrape time."""

    _COUNTERS = (
        ("sent_messages", "sent", "Messages sent (each attempt counts)."),
        ("stored_messages", "stored", "Messages the server answered stored."),
        ("failed_messages", "failed", "Messages moved to the failed area."),
        ("sent_bytes", "sent_bytes", "Payload bytes sent."),
        ("send_errors", "errors", "Attempts that failed: no answer, or an error answer."),
    )

    def __init__(self, senders: Callable[[], Mapping[str, DestinationSender]]) -> None:
        self.senders = senders

    def describe(self) -> Iterator[Metric]:
        for name, _attr, doc in self._COUNTERS:
            yield CounterMetricFamily(f"dropr_client_{name}", doc, labels=["destination"])
        yield GaugeMetricFamily("dropr_client_backoff", "", labels=["destination"])
        yield GaugeMetricFamily("dropr_client_consecutive_failures", "", labels=["destination"])

    def collect(self) -> Iterator[Metric]:
        senders = dict(self.senders())
        for name, attr, doc in self._COUNTERS:
            family = CounterMetricFamily(f"dropr_client_{name}", doc, labels=["destination"])
            for dest, s in senders.items():
                family.add_metric([dest], float(getattr(s, attr, 0)))
            yield family
        backoff = GaugeMetricFamily(
            "dropr_client_backoff",
            "1 while the destination's sender waits to retry.",
            labels=["destination"],
        )
        failures = GaugeMetricFamily(
            "dropr_client_consecutive_failures",
            "Failed attempts since the last answered batch.",
            labels=["destination"],
        )
        for dest, s in senders.items():
            backoff.add_metric([dest], 1.0 if s.state == "backoff" else 0.0)
            failures.add_metric([dest], float(s.failures))
        yield backoff
        yield failures


class PutSocketCollector:
    """The put socket's figures, read from the daemon at scrape time.

    :param figures: returns ``{"puts": n, "writes": n, "held_messages": n,
        "held_bytes": n}``.
    """

    _FAMILIES = (
        ("puts", "dropr_client_put_socket_puts", "Puts made durable through the put socket."),
        ("writes", "dropr_client_put_socket_writes", "Synced writes of the put log (groups)."),
    )

    def __init__(self, figures: Callable[[], Mapping[str, int]]) -> None:
        self.figures = figures

    def describe(self) -> Iterator[Metric]:
        for _key, name, doc in self._FAMILIES:
            yield CounterMetricFamily(name, doc)
        yield GaugeMetricFamily("dropr_client_held_messages", "")
        yield GaugeMetricFamily("dropr_client_held_bytes", "")

    def collect(self) -> Iterator[Metric]:
        figures = dict(self.figures())
        for key, name, doc in self._FAMILIES:
            yield CounterMetricFamily(name, doc, value=float(figures.get(key, 0)))
        yield GaugeMetricFamily(
            "dropr_client_held_messages",
            "Puts answered from the put log and held in memory for their sender.",
            value=float(figures.get("held_messages", 0)),
        )
        yield GaugeMetricFamily(
            "dropr_client_held_bytes",
            "Payload bytes of those puts.",
            value=float(figures.get("held_bytes", 0)),
        )


class ClientMetrics(_Daemon):
    """The counters of a dropr-client.

    :param senders: returns the client's senders by destination.
    :param stats: returns ``stats()`` of the spool (read at scrape time).
    :param put_figures: returns the put socket's figures (see
        :class:`PutSocketCollector`).
    """

    SERIES = ("sent", "stored", "failed", "retry")

    def __init__(
        self,
        senders: Callable[[], Mapping[str, DestinationSender]],
        stats: StatsFunc | None = None,
        stats_ttl: float = 5.0,
        clock: Callable[[], float] = time.time,
        put_figures: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        super().__init__("dropr-client", stats, stats_ttl, "dropr_spool", "destination", clock)
        self.senders = senders
        self.put_figures = put_figures
        self.registry.register(SenderCollector(senders))
        if put_figures is not None:
            self.registry.register(PutSocketCollector(put_figures))
        self.batch_seconds = Histogram(
            "dropr_client_batch_seconds",
            "Seconds from sending a batch to its answer.",
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def batch(self, sender: DestinationSender, stored: int, failed: int, retry: int) -> None:
        """A batch was answered (``DestinationSender``'s ``on_batch`` hook)."""
        self.batch_seconds.observe(sender.last_batch_seconds)
        self.rates.add("sent", stored + failed + retry)
        self.rates.add("stored", stored)
        self.rates.add("failed", failed)
        self.rates.add("retry", retry)

    def stats_json(self) -> dict[str, Any]:
        """What ``GET /stats`` answers (may walk the spool: call it in a thread)."""
        data = self._base_stats()
        queues = data.pop("queues")
        destinations: dict[str, dict[str, Any]] = {}
        for dest, s in sorted(dict(self.senders()).items()):
            destinations[dest] = {
                "state": s.state,
                "failures": s.failures,
                "last_error": s.last_error,
                "sent": s.sent,
                "stored": s.stored,
                "failed": s.failed,
                "sent_bytes": s.sent_bytes,
                "send_errors": s.errors,
            }
        for dest, figures in queues.items():
            destinations.setdefault(dest, {}).update(figures)
        data["destinations"] = destinations
        data["totals"] = {
            key: sum(d.get(key, 0) for d in destinations.values())
            for key in ("sent", "stored", "failed", "sent_bytes", "send_errors")
        }
        data["destinations_total"] = data.pop("queues_total")
        if self.put_figures is not None:
            data["put_socket"] = dict(self.put_figures())
        data["rates"] = self.rates.snapshot(self.SERIES)
        return data
