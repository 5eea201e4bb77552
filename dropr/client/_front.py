"""The spool as the client daemon's senders see it: the put log's messages in front.

A put through the socket is durable in the put log (:mod:`dropr.client._putlog`)
and handed here in memory, so its sender sends it without writing it to the
spool, waking up or reading it back.  To the sender this is one
``ISpoolStorage``: ``take`` gives the spool's own messages for a destination
first (batch files written by producers themselves, or moved here from the
log), and only when the spool has none, the messages held in memory.

Order: a producer whose put went to its own batch file (the daemon did not
answer) and whose next put went through the socket has the first in the
spool before the second reaches memory.  ``take`` notes how far memory goes
*before* it looks at the spool, and gives only messages that were in memory
by then; so a message reaches the sender after any the spool held before it
arrived.

Messages held in memory leave it by being stored by the server (``ack``:
done in the log) or by moving into the spool (:meth:`FrontedSpool.spill`:
when their sender cannot deliver, when too much waits in memory, when one
is refused and at the daemon's stop); either way the log no longer needs
them.  What a crash leaves in the log is moved into the spool at the next
start.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from zope.interface import implementer

from dropr._message import Message
from dropr.client._putlog import PutLog, Segment
from dropr.interfaces import ISpoolStorage, QueueStats
from dropr.wire import WireBatch

#: Messages (of all destinations) held in memory before a destination's are
#: moved into the spool at once.
MAX_HELD_MESSAGES = 50_000
#: The same for payload bytes.
MAX_HELD_BYTES = 64 * 1024 * 1024

#: An entry: arrival number, message, the log segment holding it.
Entry = tuple[int, Message, Segment]


@implementer(ISpoolStorage)
class FrontedSpool:
    """``inner`` (the spool) with the put log's messages in front of it.

    ``offer`` runs in the reactor thread; the queue operations run on the
    daemon's disk thread, as they do on the spool itself.
    """

    def __init__(self, inner: Any, log: PutLog) -> None:
        self.inner = inner
        self.log = log
        self._lock = threading.Lock()
        self._arrived = 0
        self._waiting: dict[str, list[Entry]] = {}
        #: Taken by a sender and not yet settled, by the message object.
        self._taken: dict[int, Entry] = {}
        self._held_bytes = 0
        self._held_count = 0
        #: The spool's own figures as last counted on the disk thread (the
        #: reactor must not wait for the spool's lock to read them).
        self._spool_usage = (0, 0)
        #: Messages handed to a sender from memory, and moved into the spool.
        self.sent_from_memory = 0
        self.spilled = 0

    # -- from the put socket -------------------------------------------------------------

    def offer(self, messages: Sequence[Message], segment: Segment) -> list[str]:
        """Hold ``messages`` (durable in ``segment``); their destinations."""
        destinations: dict[str, None] = {}
        with self._lock:
            for m in messages:
                assert m.destination is not None
                self._arrived += 1
                self._waiting.setdefault(m.destination, []).append((self._arrived, m, segment))
                destinations[m.destination] = None
                self._held_bytes += len(m.payload)
                self._held_count += 1
        return list(destinations)

    def held(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` held in memory (waiting or taken)."""
        with self._lock:
            return self._held_count, self._held_bytes

    def over_limit(self) -> bool:
        """Too much is held in memory: move waiting messages into the spool."""
        with self._lock:
            return self._held_count > MAX_HELD_MESSAGES or self._held_bytes > MAX_HELD_BYTES

    def waiting_destinations(self) -> list[str]:
        """Destinations with messages waiting in memory."""
        with self._lock:
            return [d for d, q in self._waiting.items() if q]

    # -- the sender's queue operations (disk thread) ---------------------------------------

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        with self._lock:
            horizon = self._arrived
        found = self.inner.take(queue, limit, lease)
        if found:
            return list(found)
        return self._take_held(queue, limit, horizon)

    def take_wire(
        self, queue: str, limit: int, max_bytes: int, lease: float | None = None
    ) -> WireBatch | list[Message]:
        """``take``, with the spool's batch files as records ready for the wire."""
        take_wire = getattr(self.inner, "take_wire", None)
        if take_wire is None:
            return self.take(queue, limit, lease)
        with self._lock:
            horizon = self._arrived
        found = take_wire(queue, limit, max_bytes, lease)
        if found:
            return found  # type: ignore[no-any-return]
        return self._take_held(queue, limit, horizon)

    def _take_held(self, queue: str, limit: int, horizon: int) -> list[Message]:
        with self._lock:
            waiting = self._waiting.get(queue)
            if not waiting:
                return []
            n = 0
            while n < len(waiting) and n < limit and waiting[n][0] <= horizon:
                n += 1
            taken, waiting[:n] = waiting[:n], []
            if not waiting:
                del self._waiting[queue]
            for entry in taken:
                self._taken[id(entry[1])] = entry
            self.sent_from_memory += len(taken)
        return [m for _n, m, _s in taken]

    def _split(self, messages: Iterable[Message]) -> tuple[list[Entry], list[Message]]:
        mine: list[Entry] = []
        others: list[Message] = []
        with self._lock:
            for m in messages:
                entry = self._taken.pop(id(m), None)
                if entry is None:
                    others.append(m)
                else:
                    mine.append(entry)
        return mine, others

    def _forget(self, entries: list[Entry]) -> None:
        """Entries no longer held: stored by the server or moved into the spool."""
        per_segment: dict[int, tuple[Segment, int]] = {}
        with self._lock:
            for _n, m, segment in entries:
                self._held_bytes -= len(m.payload)
                self._held_count -= 1
                seen = per_segment.get(id(segment))
                per_segment[id(segment)] = (segment, (seen[1] if seen else 0) + 1)
        for segment, count in per_segment.values():
            self.log.done(segment, count)

    def ack(self, messages: Iterable[Message]) -> None:
        if isinstance(messages, WireBatch):
            self.inner.ack(messages)  # taken from the spool's batch files
            return
        mine, others = self._split(messages)
        if others:
            self.inner.ack(others)
        if mine:
            self._forget(mine)

    def release(self, messages: Iterable[Message]) -> None:
        if isinstance(messages, WireBatch):
            self.inner.release(messages)  # taken from the spool's batch files
            return
        mine, others = self._split(messages)
        if others:
            self.inner.release(others)
        if not mine:
            return
        # Given back, mostly because the server could not be reached: into
        # the spool, where they show, count and wait on disk.  Filed under
        # their oldest id, they go before what memory still holds.
        try:
            self._move_into_spool(mine)
        except Exception:
            # No room in the spool: back in memory (still in the log), in
            # arrival order whatever order batches came back in; the
            # rescan tries the spool again.
            with self._lock:
                for entry in mine:
                    self._waiting.setdefault(_destination(entry), []).append(entry)
                for queue in self._waiting.values():
                    queue.sort(key=_arrival)

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        if isinstance(messages, WireBatch):
            self.inner.fail(messages, reason)
            return
        mine, others = self._split(messages)
        if others:
            self.inner.fail(others, reason)
        if mine:
            # A failure belongs in the spool's failed area, with its reason;
            # only a message the spool holds can get there.  Moved into the
            # spool, it is sent once more and, refused again, failed there.
            self._move_into_spool(mine)

    def spill(self, destination: str) -> int:
        """Move what waits in memory for ``destination`` into the spool; how many."""
        with self._lock:
            entries = self._waiting.pop(destination, [])
        if not entries:
            return 0
        try:
            self._move_into_spool(entries)
        except BaseException:
            with self._lock:
                queue = self._waiting.setdefault(destination, [])
                queue[:0] = entries
                queue.sort(key=_arrival)
            raise
        return len(entries)

    def spill_all(self) -> int:
        """Move everything waiting in memory into the spool (at the daemon's stop)."""
        return sum(self.spill(d) for d in self.waiting_destinations())

    def _move_into_spool(self, entries: list[Entry]) -> None:
        by_destination: dict[str, list[Message]] = {}
        for entry in entries:
            by_destination.setdefault(_destination(entry), []).append(entry[1])
        for destination, messages in by_destination.items():
            self.file_in_order(destination, messages, min(m.id for m in messages))
        self.spilled += len(entries)
        self._forget(entries)

    def file_in_order(self, destination: str, messages: list[Message], batch_id: str) -> None:
        """Store ``messages`` in the spool as one batch filed under ``batch_id``.

        Messages that waited in memory or in the log go into the spool under
        their oldest id, so before anything their producers wrote themselves
        meanwhile: a producer's ids only grow, and a producer writes itself
        only after the daemon stopped answering it.
        """
        self.inner.add(destination, messages, batch_id=batch_id)

    # -- everything else is the spool's -------------------------------------------------

    def add(self, queue: str, messages: Sequence[Message]) -> list[str]:
        return list(self.inner.add(queue, messages))

    def queues(self) -> list[str]:
        return list(self.inner.queues())

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        return dict(self.inner.stats(queues))

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        return list(self.inner.failed(queue, limit))

    def close(self) -> None:
        self.inner.close()

    def usage(self) -> tuple[int, int]:
        count, nbytes = self.inner.usage()
        held_count, held_bytes = self.held()
        return count + held_count, nbytes + held_bytes

    def queue_names(self) -> list[str]:
        names = list(self.inner.queue_names())
        extra = [d for d in self.waiting_destinations() if d not in names]
        return names + extra

    def count_usage(self) -> tuple[int, int]:
        count, nbytes = self.inner.count_usage()
        self._spool_usage = (count, nbytes)
        return count, nbytes

    def known_usage(self) -> tuple[int, int]:
        """``usage()`` without waiting: the spool's figures of the last count, plus memory."""
        count, nbytes = self._spool_usage
        held_count, held_bytes = self.held()
        return count + held_count, nbytes + held_bytes


def _destination(entry: Entry) -> str:
    destination = entry[1].destination
    assert destination is not None
    return destination


def _arrival(entry: Entry) -> int:
    return entry[0]
