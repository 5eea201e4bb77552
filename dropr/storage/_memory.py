"""An ``IStorage`` in memory: the semantics of the others, without durability.

For tests of code that uses a storage (senders, receivers, consumers), where
the disk only costs time; :mod:`dropr.testing` offers it to users.  It also
provides what the daemons and tools need beyond ``IStorage`` (a spool's
queue names, usage figures, wake-ups for consumers, listing and repair by
id), so a test can drive any of them on it.  Everything is lost when the
object goes away; never use it where a message was acknowledged to someone.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from zope.interface import implementer

from dropr._ids import id_millis, id_time
from dropr._message import DEFAULT_MAX_PAYLOAD, MAX_PRIORITY, MIN_PRIORITY, Message
from dropr.errors import InvalidMessage, StorageClosed
from dropr.interfaces import (
    FailedMessage,
    IMessageAdmin,
    IReceivingStore,
    ISpoolStorage,
    IStorage,
    IUsage,
    IWakeSource,
    OpenMessage,
    QueueStats,
)
from dropr.storage._adapt import NothingLeftBehind
from dropr.storage._limits import check_room
from dropr.storage._receipts import own_receipts
from dropr.storage.files._storage import validate_queue

#: Seconds between two prunes of the dedup index.
_PRUNE_EVERY = 60.0


@dataclass(slots=True)
class _Entry:
    """A stored message and its claim (``lease_until`` in seconds)."""

    message: Message
    lease_until: float = 0.0
    claim: int = 0


@dataclass(frozen=True, slots=True)
class _Receipt:
    storage: object
    queue: str
    priority: int
    seq: int
    claim: int


@implementer(IStorage, IReceivingStore, ISpoolStorage, IUsage, IWakeSource, IMessageAdmin)
class MemoryStorage(NothingLeftBehind):
    """Queues in memory, with the semantics of the durable storages.

    Takes the keywords of :class:`~dropr.storage.files._storage.FilesystemStorage` that
    mean something without a disk: ``max_bytes``, ``max_messages``,
    ``max_payload``, ``lease``, ``dedup``, ``dedup_window`` and ``clock``.
    """

    def __init__(
        self,
        *,
        max_bytes: int | None = None,
        max_messages: int | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        lease: float = 60.0,
        dedup: bool = False,
        dedup_window: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.dedup = dedup
        self.dedup_window = dedup_window
        self._clock = clock
        # Receipts point at this object, never at id(self): an id is reused
        # once an object is gone, and a stale receipt must not match anew.
        self._token = object()
        #: The lease owner of this object's takes (IMessageAdmin).
        self.owner = os.urandom(6).hex()
        self._mutex = threading.RLock()
        self._closed = False
        # queue → priority → seq → entry; dicts keep insertion order, which is
        # the delivery order within a priority, and delete in O(1).
        self._queues: dict[str, dict[int, dict[int, _Entry]]] = {}
        self._failed: dict[str, list[FailedMessage]] = {}
        self._watchers: dict[str, list[Callable[[], None]]] = {}
        self._seen: dict[str, int] = {}
        self._pruned_at = float("-inf")
        self._seq = itertools.count(1)
        self._claims = itertools.count(1)
        self._count = 0
        self._bytes = 0

    def close(self) -> None:
        """Refuse every further call; the messages go with the object."""
        with self._mutex:
            self._closed = True

    def __enter__(self) -> MemoryStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("this memory storage is closed: make a new one")

    def add(self, queue: str, messages: Sequence[Message]) -> list[str]:
        """Store ``messages`` in ``queue``; see ``IStorage.add``."""
        return self.store([(queue, messages)])

    def store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store ``(queue, messages)`` pairs, all or nothing; see ``IReceivingStore.store``.

        ``records`` is ignored: memory keeps ``Message`` objects.
        """
        checked = []
        for queue, messages in batches:
            validate_queue(queue)
            messages = list(messages)
            for m in messages:
                m.validate(self.max_payload)
            checked.append((queue, messages))
        with self._mutex:
            self._check_open()
            now = self._clock()
            if self.dedup:
                self._prune(now)
            plan: list[tuple[str, list[Message]]] = []
            ids: set[str] = set()
            for queue, messages in checked:
                new = []
                for m in messages:
                    if self.dedup:
                        self._refuse_too_old(m, now)
                        if m.id in self._seen or m.id in ids:
                            continue
                        ids.add(m.id)
                    new.append(m)
                if new:
                    plan.append((queue, new))
            count = sum(len(new) for _, new in plan)
            nbytes = sum(len(m.payload) for _, new in plan for m in new)
            self._check_limits(count, nbytes)
            watchers: list[Callable[[], None]] = []
            for queue, new in plan:
                by_priority = self._queues.setdefault(queue, {})
                for m in new:
                    entry = _Entry(replace(m, receipt=None))
                    by_priority.setdefault(m.priority, {})[next(self._seq)] = entry
                    if self.dedup:
                        self._seen[m.id] = id_millis(m.id)
                watchers.extend(self._watchers.get(queue, ()))
            self._count += count
            self._bytes += nbytes
        for callback in watchers:
            callback()
        return [m.id for _, new in plan for m in new]

    def _refuse_too_old(self, m: Message, now: float) -> None:
        # An id older than the window may have been stored and forgotten
        # since; storing it again could deliver it twice.
        if id_millis(m.id) < (now - self.dedup_window) * 1000:
            raise InvalidMessage(
                f"message {m.id} is older than the dedup window of "
                f"{self.dedup_window:g} seconds, so it may have been "
                "stored already; nothing was stored. Fail it at the sender"
            )

    def _check_limits(self, count: int, nbytes: int) -> None:
        check_room(
            "memory storage",
            self._count,
            self._bytes,
            count,
            nbytes,
            self.max_messages,
            self.max_bytes,
        )

    def oldest_accepted_id(self) -> str:
        """Ids sorting below this are older than the dedup window; see IReceivingStore."""
        if not self.dedup:
            return ""
        return f"{max(0, int((self._clock() - self.dedup_window) * 1000)):012x}"

    def channel_count(self) -> int:
        """How many queues hold messages, waiting or failed."""
        return len(self.queues())

    def upkeep(self) -> None:
        """Prune the dedup record; nothing else needs doing in memory."""
        with self._mutex:
            if self.dedup and not self._closed:
                self._prune(self._clock())

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = now
        oldest_ms = (now - self.dedup_window) * 1000
        for i in [i for i, ms in self._seen.items() if ms < oldest_ms]:
            del self._seen[i]

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``."""
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex:
            self._check_open()
            now = self._clock()
            claim = next(self._claims)
            taken: list[Message] = []
            by_priority = self._queues.get(queue, {})
            for priority in range(MIN_PRIORITY, MAX_PRIORITY + 1):
                for seq, entry in by_priority.get(priority, {}).items():
                    if len(taken) >= limit:
                        return taken
                    if entry.lease_until > now:
                        continue
                    entry.lease_until = now + lease_s
                    entry.claim = claim
                    receipt = _Receipt(self._token, queue, priority, seq, claim)
                    taken.append(replace(entry.message, receipt=receipt))
            return taken

    def _receipts(self, messages: Iterable[Message]) -> list[_Receipt]:
        """The receipts of ``messages``; raise before any change if one is foreign."""
        return own_receipts(messages, _Receipt, self._token)

    def _entry(self, r: _Receipt) -> _Entry | None:
        return self._queues.get(r.queue, {}).get(r.priority, {}).get(r.seq)

    def _remove(self, r: _Receipt) -> _Entry | None:
        by_priority = self._queues.get(r.queue, {})
        entry = by_priority.get(r.priority, {}).pop(r.seq, None)
        if entry is not None:
            self._count -= 1
            self._bytes -= len(entry.message.payload)
            if not by_priority[r.priority]:
                del by_priority[r.priority]
            if not by_priority:
                del self._queues[r.queue]
        return entry

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget taken ``messages`` (again: harmless)."""
        with self._mutex:
            self._check_open()
            for r in self._receipts(messages):
                self._remove(r)

    def release(self, messages: Iterable[Message]) -> None:
        """Hand taken ``messages`` out again, unless someone else took them since."""
        with self._mutex:
            self._check_open()
            for r in self._receipts(messages):
                entry = self._entry(r)
                if entry is not None and entry.claim == r.claim:
                    entry.lease_until = 0.0

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area with ``reason``."""
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("fail() needs a reason: a short text saying what went wrong")
        with self._mutex:
            self._check_open()
            for r in self._receipts(messages):
                entry = self._remove(r)
                if entry is not None:
                    failed = FailedMessage(entry.message, r.queue, reason, self._clock())
                    self._failed.setdefault(r.queue, []).append(failed)

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        with self._mutex:
            self._check_open()
            return sorted(set(self._queues) | set(self._failed))

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures for every queue, or for those of ``queues`` that hold messages."""
        with self._mutex:
            self._check_open()
            now = self._clock()
            result = {}
            held = self.queues()
            names = held if queues is None else sorted(set(queues).intersection(held))
            for queue in names:
                entries = [
                    e for by_seq in self._queues.get(queue, {}).values() for e in by_seq.values()
                ]
                oldest = min((id_time(e.message.id) for e in entries), default=now)
                result[queue] = QueueStats(
                    depth=len(entries),
                    bytes=sum(len(e.message.payload) for e in entries),
                    oldest_age=max(0.0, now - oldest),
                    taken=sum(1 for e in entries if e.lease_until > now),
                    failed=len(self._failed.get(queue, ())),
                )
            return result

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons, oldest first."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            return [(f.message, f.reason) for f in self._failed.get(queue, [])[: max(0, limit)]]

    # -- ISpoolStorage and IUsage --------------------------------------------------------

    def queue_names(self) -> list[str]:
        """Queues that hold waiting or taken messages."""
        with self._mutex:
            self._check_open()
            return sorted(self._queues)

    def usage(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting or taken."""
        with self._mutex:
            return self._count, self._bytes

    def count_usage(self) -> tuple[int, int]:
        """The same: memory keeps exact figures."""
        return self.usage()

    # -- IWakeSource -------------------------------------------------------------------

    def watch(self, queue: str, callback: Callable[[], None], reactor: Any) -> Callable[[], None]:
        """Call ``callback`` after each add to ``queue``.

        Through ``reactor.callFromThread`` where the reactor has it (adds
        may come from a thread pool); directly on a fake reactor without
        threads, such as ``MemoryReactorClock``.
        """
        call_from_thread = getattr(reactor, "callFromThread", None)

        def wake() -> None:
            if call_from_thread is not None:
                call_from_thread(callback)
            else:
                callback()

        with self._mutex:
            self._watchers.setdefault(queue, []).append(wake)

        def stop() -> None:
            with self._mutex:
                callbacks = self._watchers.get(queue, [])
                if wake in callbacks:
                    callbacks.remove(wake)

        return stop

    # -- IMessageAdmin -------------------------------------------------------------------

    def open_messages(self, queue: str, since: float = 0.0) -> Iterator[OpenMessage]:
        """Waiting and taken messages of ``queue``, in delivery order."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            found = []
            by_priority = self._queues.get(queue, {})
            for priority in sorted(by_priority):
                for seq, entry in by_priority[priority].items():
                    receipt = _Receipt(self._token, queue, priority, seq, entry.claim)
                    taken = entry.claim != 0 and entry.lease_until > 0
                    found.append(
                        OpenMessage(
                            replace(entry.message, receipt=receipt),
                            queue,
                            entry.lease_until if taken else None,
                            self.owner if taken else None,
                        )
                    )
        yield from found

    def failed_messages(self, queue: str) -> Iterator[FailedMessage]:
        """The failed area of ``queue``, oldest failure first."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            found = list(self._failed.get(queue, []))
        yield from found

    def _take_failed(self, queue: str, ids: Collection[str]) -> list[FailedMessage]:
        wanted = set(ids)
        failed = self._failed.get(queue, [])
        chosen = [f for f in failed if f.message.id in wanted]
        self._failed[queue] = [f for f in failed if f.message.id not in wanted]
        if not self._failed[queue]:
            del self._failed[queue]
        return chosen

    def requeue_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Move failed messages back behind what waits in ``queue``."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            chosen = self._take_failed(queue, ids)
            by_priority = self._queues.setdefault(queue, {})
            for f in chosen:
                by_priority.setdefault(f.message.priority, {})[next(self._seq)] = _Entry(f.message)
                self._count += 1
                self._bytes += len(f.message.payload)
            if not by_priority:
                del self._queues[queue]
            return [f.message.id for f in chosen]

    def purge_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Forget failed messages for good."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            return [f.message.id for f in self._take_failed(queue, ids)]
