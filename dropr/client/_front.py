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

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from zope.interface import implementer

from dropr._message import Message
from dropr.client._putlog import PutLog, Segment
from dropr.interfaces import ISpoolStorage, QueueStats
from dropr.wire import WireBatch

#: Messages (of all destinations) held in memory before a destination's are
#: moved into the spool at once (a batch file each: keep it modest).
MAX_HELD_MESSAGES = 10_000
#: The same for payload bytes.
MAX_HELD_BYTES = 32 * 1024 * 1024

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
        return list(self._take(queue, lambda: self.inner.take(queue, limit, lease), limit))

    def take_wire(
        self, queue: str, limit: int, max_bytes: int, lease: float | None = None
    ) -> WireBatch | list[Message]:
        """``take``, with the spool's batch files as records ready for the wire."""
        take_wire = getattr(self.inner, "take_wire", None)
        if take_wire is None:
            return self.take(queue, limit, lease)
        found: WireBatch | list[Message] = self._take(
            queue, lambda: take_wire(queue, limit, max_bytes, lease), limit
        )
        return found

    def _take(self, queue: str, from_spool: Callable[[], Any], limit: int) -> Any:
        """The spool's messages, or else memory's; never one overtaking an older one.

        When both hold messages for ``queue`` (a producer wrote a batch of
        its own, say a ``put_many``, while its earlier put waited in memory),
        memory's go into the spool first, each filed by its own id, so the
        spool's order (by batch id, which follows creation) decides.
        """
        with self._lock:
            horizon = self._arrived
        found = from_spool()
        if not found:
            return self._take_held(queue, limit, horizon)
        with self._lock:
            also_in_memory = bool(self._waiting.get(queue))
        if not also_in_memory:
            return found
        self.inner.release(found)
        self.spill(queue)
        return from_spool()

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

    def _mine(self, messages: Iterable[Message], spools: Callable[[Any], None]) -> list[Entry]:
        """Hand the spool's messages to ``spools``; return the entries memory gave."""
        if isinstance(messages, WireBatch):
            spools(messages)  # taken from the spool's batch files
            return []
        mine, others = self._split(messages)
        if others:
            try:
                spools(others)
            except BaseException:
                self._retake(mine)  # the sender still holds them: all may come again
                raise
        return mine

    def _retake(self, entries: list[Entry]) -> None:
        with self._lock:
            for entry in entries:
                self._taken[id(entry[1])] = entry

    def ack(self, messages: Iterable[Message]) -> None:
        mine = self._mine(messages, self.inner.ack)
        if mine:
            self._forget(mine)

    def release(self, messages: Iterable[Message]) -> None:
        mine = self._mine(messages, self.inner.release)
        if mine:
            self._give_back(mine)

    def _give_back(self, mine: list[Entry]) -> None:
        """Entries a sender let go: into the spool, where they show, count and wait on disk."""
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
        mine = self._mine(messages, lambda spools: self.inner.fail(spools, reason))
        if not mine:
            return
        by_destination: dict[str, list[Message]] = {}
        for entry in mine:
            by_destination.setdefault(_destination(entry), []).append(entry[1])
        try:
            for destination, refused in by_destination.items():
                self.inner.add_failed(destination, refused, reason)
        except Exception:
            # The failed area could not take them (a full disk): they wait
            # in memory and in the log, are sent again and failed then.
            self._give_back(mine)
            return
        self._forget(mine)

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
            self.file_in_order(destination, messages)
        moved = (len(entries), sum(len(e[1].payload) for e in entries))
        with self._lock:
            # Counted as the spool's until its next count (for the room check).
            self._spool_usage = (
                self._spool_usage[0] + moved[0],
                self._spool_usage[1] + moved[1],
            )
        self._forget(entries)

    def file_in_order(self, destination: str, messages: list[Message]) -> None:
        """Store ``messages`` in the spool, each a batch filed by its own id.

        A producer's ids only grow, and the spool hands batches out in the
        order of their ids, so a message moved here goes after what its
        producer wrote before it and before what it wrote after (a batch
        file's id is made when it is written, after its messages' ids).
        Each gets a batch of its own because messages of other producers
        may lie between them in that order.
        """
        self.inner.add_filed(destination, [(filed_id(m.id), m) for m in messages])

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


def filed_id(message_id: str) -> str:
    """A batch id that sorts with ``message_id`` and is unique: its time and
    counter, then new randomness (two batches filed for one message, in a
    spill and again at a restart, must not share a name's id)."""
    return message_id[:16] + os.urandom(8).hex()


def _destination(entry: Entry) -> str:
    destination = entry[1].destination
    assert destination is not None
    return destination


def _arrival(entry: Entry) -> int:
    return entry[0]
