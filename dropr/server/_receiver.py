"""dropr-server's core: what a received request stores, on any ``IReceivingStore``.

Plain code without a reactor: it runs in the thread pool, and tests call it
directly.  The HTTP side is in :mod:`dropr.server._site` (connections,
bodies, limits before the body) and :mod:`dropr.server._resource` (routing
and answers).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from twisted.logger import Logger

from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import DroprError, StorageFull
from dropr.interfaces import IReceivingStore
from dropr.monitoring._metrics import ServerMetrics
from dropr.wire import WireError, parse_batch

#: A sender's clock may run this far ahead of the server's (seconds).
MAX_CLOCK_SKEW = 3600.0
#: Channels a server holds unless told otherwise (``--max-channels``).
DEFAULT_MAX_CHANNELS = 10_000


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request, and all of them together, may carry."""

    max_request_bytes: int = 64 * 1024 * 1024
    max_messages: int = 10_000
    max_payload: int = 16 * 1024 * 1024
    #: Seconds from a request's first byte to its last; a client that takes
    #: longer (a slow-loris, a byte now and then) is answered 408 and cut off.
    request_timeout: float = 300.0
    #: Connections open at once; more are answered 503 and closed.
    max_connections: int = 1000
    #: Channels the store may hold; a request that would open more is refused.
    max_channels: int = DEFAULT_MAX_CHANNELS
    #: Body bytes not yet verified and stored, per client and in total
    #: (0: twice ``max_request_bytes`` per client, 16 times in total).
    max_unverified_per_client: int = 0
    max_unverified: int = 0
    #: Request bytes parsed and stored at once (0: ``max_request_bytes``):
    #: what bounds the server's memory under many large uploads.
    max_parsing_bytes: int = 0

    @property
    def unverified_per_client(self) -> int:
        return self.max_unverified_per_client or 2 * self.max_request_bytes

    @property
    def unverified_total(self) -> int:
        return self.max_unverified or 16 * self.max_request_bytes

    @property
    def parsing_bytes(self) -> int:
        return self.max_parsing_bytes or self.max_request_bytes


class TooManyChannels(StorageFull):
    """A request would open channels beyond the server's ``--max-channels``."""


class _KnownChannels:
    """Channels the store is known to hold: decides which of a request's are new.

    Consulted only when the store is near its channel limit.  Filled from
    the store's own list once, then kept by what is stored; bounded, oldest
    forgotten first (a forgotten channel only counts as new again).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: OrderedDict[str, None] = OrderedDict()
        self.filled = False

    def fill(self, names: list[str]) -> None:
        for name in names[-self.limit :]:
            self._names[name] = None
        self.filled = True

    def new(self, names: set[str]) -> set[str]:
        return {n for n in names if n not in self._names}

    def saw(self, names: set[str]) -> None:
        for name in names:
            self._names[name] = None
            self._names.move_to_end(name)
        while len(self._names) > self.limit:
            self._names.popitem(last=False)


class Receiver:
    """Stores what arrives: parses, checks and hands one request to the store."""

    log = Logger()

    def __init__(
        self,
        store: IReceivingStore,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self._clock = clock
        self.metrics = metrics or ServerMetrics()
        self._known = _KnownChannels(limits.max_channels)

    def receive_batch(self, body: BinaryIO) -> tuple[list[str], dict[str, str]]:
        """Store the batch in ``body``; return (stored ids, rejected id → reason)."""
        parsed = parse_batch(body, self.limits.max_payload, self.limits.max_messages)
        return self._store(parsed.messages, parsed.rejected, parsed.records)

    def receive_one(
        self, body: BinaryIO, channel: str, priority: int, message_id: str | None
    ) -> tuple[list[str], dict[str, str]]:
        """Store one raw message (posted by curl and friends) from ``body``."""
        # The body's size was held to max_payload as it arrived; one more
        # byte read tells a body that grew since (it cannot) from the limit.
        payload = body.read(self.limits.max_payload + 1)
        if len(payload) > self.limits.max_payload:
            raise WireError(
                f"payload exceeds this server's maximum of {self.limits.max_payload} bytes",
                413,
            )
        message = Message(message_id or new_id(), payload, channel, priority)
        return self._store([message], {})

    def _store(
        self,
        messages: list[Message],
        rejected: dict[str, str],
        records: dict[str, bytes] | None = None,
    ) -> tuple[list[str], dict[str, str]]:
        now = self._clock()
        window = self.store.dedup_window
        oldest = self.store.oldest_accepted_id()
        if oldest:
            # A second of margin keeps an id at the window's edge from
            # passing here and then failing the store's own check.
            oldest = f"{int(oldest[:12].ljust(12, '0'), 16) + 1000:012x}"
        newest = f"{int((now + MAX_CLOCK_SKEW) * 1000):012x}"
        accepted: dict[str, list[Message]] = {}
        kinds = {"invalid": len(rejected), "too_old": 0, "clock_skew": 0}
        for m in messages:
            if oldest and m.id < oldest:
                kinds["too_old"] += 1
                rejected[m.id] = (
                    f"message is older than this server's dedup window ({window:.0f} s): "
                    "it may have been stored and forgotten already, so it is not stored again"
                )
            elif m.id[:12] > newest:
                kinds["clock_skew"] += 1
                rejected[m.id] = (
                    "message id is dated more than an hour ahead of this server's "
                    "clock: check the sender's clock"
                )
            else:
                accepted.setdefault(m.channel, []).append(m)
        self._check_channels(set(accepted))
        started = time.monotonic()
        # One call, all or nothing: a refusal (507, 413, a disk error) stores
        # none of the request's messages, whatever channels they are for.
        new = set(self.store.store(list(accepted.items()), records))
        seconds = time.monotonic() - started
        self._known.saw(set(accepted))
        stored: list[str] = []
        for channel, group in accepted.items():
            self.metrics.stored(
                channel,
                len(group),
                sum(1 for m in group if m.id in new),
                sum(len(m.payload) for m in group if m.id in new),
                seconds,
            )
            # Ids the store skipped were stored before: "stored" is the answer too.
            stored.extend(m.id for m in group)
        self.metrics.rejected_messages(kinds)
        return stored, rejected

    def prepare(self) -> None:
        """Get the store ready for the next request, off an answer's path; never raises.

        A store that can (the file-system one: spare files) does work ahead
        here that a store would otherwise wait for; one that cannot has no
        ``prepare``.  A failure (a full disk) is the next store's to report.
        """
        prepare = getattr(self.store, "prepare", None)
        if prepare is None:
            return
        try:
            prepare()
        except (DroprError, OSError) as e:
            self.log.debug("store not prepared: {error}", error=e)

    def _check_channels(self, channels: set[str]) -> None:
        """Refuse a request that would open channels beyond the limit."""
        limit = self.limits.max_channels
        count = self.store.channel_count()
        if count + len(channels) <= limit:
            return
        if not self._known.filled:
            self._known.fill(self.store.queues())
        new = self._known.new(channels)
        if new and count + len(new) > limit:
            raise TooManyChannels(
                f"the store holds {count} channels and its limit is {limit}: messages "
                f"for {len(new)} new channels are refused (nothing was stored). Retry "
                "once channels drain, or raise --max-channels"
            )
