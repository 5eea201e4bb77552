"""The conformance suite every ``IStorage`` passes.

One set of tests, written against the interface only, run against each
storage by ``test_storage_conformance.py``.  A new storage is added there with
a function that opens it; nothing here changes.

The suite drives time with a ``twisted.internet.task.Clock`` (started at the
wall-clock time, because message ids carry the time they were made) handed
to the storage as its ``clock``, so lease expiry is tested without sleeping.

``StorageConformance`` is not collected by itself (no ``Test`` prefix, and
this module's name does not start with ``test_``): a ``Test...`` subclass in
a test module, with a ``backend`` fixture, runs it.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from dropr._ids import new_id, new_ids
from dropr._message import Message
from dropr.errors import (
    InvalidMessage,
    PayloadTooLarge,
    StorageClosed,
    StorageFull,
    UnknownMessage,
)
from dropr.interfaces import IMessageAdmin, IStorage, QueueStats
from dropr.storage._adapt import message_admin

QUEUE = "orders"
#: A spool's queues are destinations: names that are no file names.
URL_QUEUE = "http://central.example:8080/"
_EMPTY = QueueStats(depth=0, bytes=0, oldest_age=0.0, taken=0, failed=0)


class Storage(Protocol):
    """What the suite calls: ``IStorage`` with its types spelled out."""

    def add(self, queue: str, messages: Sequence[Message]) -> list[str]: ...
    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]: ...
    def ack(self, messages: Iterable[Message]) -> None: ...
    def release(self, messages: Iterable[Message]) -> None: ...
    def fail(self, messages: Iterable[Message], reason: str) -> None: ...
    def queues(self) -> list[str]: ...
    def stats(self) -> dict[str, QueueStats]: ...
    def failed(self, queue: str, limit: int) -> list[tuple[Message, str]]: ...
    def close(self) -> None: ...


#: ``opener(place, clock, **options)`` opens the storage kept at ``place``
#: (a path that need not exist yet), reading the time from ``clock``.
Opener = Callable[..., Storage]


class Backend:
    """One kind of storage under test: opens it, reopens it, closes it all.

    :param durable: the storage keeps its messages across close and open
        (the tests of durability are skipped otherwise).
    """

    def __init__(self, name: str, opener: Opener, durable: bool, root: Path) -> None:
        self.name = name
        self.durable = durable
        self.clock = Clock()
        self.clock.advance(time.time())
        self._opener = opener
        self._root = root
        self._open: list[Storage] = []
        self._options: dict[int, tuple[str, dict[str, Any]]] = {}

    def open(self, place: str = "main", **options: Any) -> Storage:
        """Open the storage at ``place``; ``dedup=True`` unless said otherwise."""
        options.setdefault("dedup", True)
        storage = self._opener(self._root / place, self.clock.seconds, **options)
        self._open.append(storage)
        self._options[id(storage)] = (place, options)
        return storage

    def reopen(self, storage: Storage) -> Storage:
        """Close ``storage`` and open it again, with the same options."""
        if not self.durable:
            pytest.skip(f"{self.name} storage keeps nothing across close")
        place, options = self._options.pop(id(storage))
        storage.close()
        self._open.remove(storage)
        return self.open(place, **options)

    def close_all(self) -> None:
        for storage in self._open:
            storage.close()
        self._open.clear()


def make(
    count: int,
    *,
    priority: int = 5,
    channel: str = "common",
    destination: str | None = None,
    size: int | None = None,
) -> list[Message]:
    """``count`` new messages with distinct payloads (of ``size`` bytes if given)."""
    out = []
    for i, message_id in enumerate(new_ids(count)):
        payload = f"{message_id}:{i}".encode()
        if size is not None:
            payload = (payload * (size // len(payload) + 1))[:size]
        out.append(Message(message_id, payload, channel, priority, destination))
    return out


def ids(messages: Iterable[Message]) -> list[str]:
    return [m.id for m in messages]


def take_all(storage: Storage, queue: str = QUEUE, lease: float | None = None) -> list[Message]:
    return storage.take(queue, 1_000_000, lease)


class StorageConformance:
    """The tests.  Each gets ``backend`` (a :class:`Backend`) from a fixture."""

    # -- the interface -----------------------------------------------------------

    def test_provides_istorage(self, backend: Backend) -> None:
        assert verifyObject(IStorage, backend.open())

    def test_empty_storage(self, backend: Backend) -> None:
        storage = backend.open()
        assert storage.queues() == []
        assert storage.stats() == {}
        assert storage.take(QUEUE, 10) == []
        assert storage.failed(QUEUE, 10) == []

    def test_close_twice_is_harmless(self, backend: Backend) -> None:
        storage = backend.open()
        storage.close()
        storage.close()

    # -- adding and taking ---------------------------------------------------------

    def test_round_trip_keeps_every_field_and_byte(self, backend: Backend) -> None:
        storage = backend.open()
        payloads = [
            b"",
            bytes(range(256)),
            b"\x00" * 3 + b"\xff\n\r",
            "é€😀".encode(),
            b"x" * 70_000,
        ]
        sent = [
            Message(i, p, "orders.v2-eu_1", 3, "https://central.example:8443/path?q=1")
            for i, p in zip(new_ids(len(payloads)), payloads, strict=True)
        ]
        assert storage.add(URL_QUEUE, sent) == ids(sent)
        got = take_all(storage, URL_QUEUE)
        assert got == sent  # receipts do not take part in equality
        for g, s in zip(got, sent, strict=True):
            assert type(g.payload) is bytes
            assert (g.id, g.payload, g.channel, g.priority, g.destination) == (
                s.id,
                s.payload,
                s.channel,
                s.priority,
                s.destination,
            )
            assert g.receipt is not None

    def test_queues_are_separate(self, backend: Backend) -> None:
        storage = backend.open()
        a, b = make(2), make(3)
        storage.add("a", a)
        storage.add(URL_QUEUE, b)
        assert take_all(storage, "b") == []
        assert take_all(storage, URL_QUEUE) == b
        assert take_all(storage, "a") == a

    def test_order_is_priority_then_insertion(self, backend: Backend) -> None:
        storage = backend.open()
        batches = [
            make(2, priority=9),
            make(3, priority=1),
            make(1, priority=0) + make(2, priority=9) + make(1, priority=1),
            make(2, priority=1),
            make(1, priority=5),
        ]
        sent = [m for batch in batches for m in batch]
        for batch in batches:
            storage.add(QUEUE, batch)
        expected = sorted(sent, key=lambda m: m.priority)  # stable: insertion order kept
        assert ids(take_all(storage)) == ids(expected)

    def test_take_returns_at_most_limit_in_order(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(10)
        storage.add(QUEUE, sent)
        assert storage.take(QUEUE, 0) == []
        assert ids(storage.take(QUEUE, 3)) == ids(sent[:3])
        assert ids(storage.take(QUEUE, 1)) == ids(sent[3:4])
        assert ids(storage.take(QUEUE, 100)) == ids(sent[4:])
        assert storage.take(QUEUE, 100) == []

    def test_a_taken_message_is_not_handed_out_again(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(8)
        storage.add(QUEUE, sent)
        first = storage.take(QUEUE, 5)
        second = storage.take(QUEUE, 5)
        assert ids(first) == ids(sent[:5])
        assert ids(second) == ids(sent[5:])
        assert storage.take(QUEUE, 5) == []

    def test_threads_taking_at_once_never_share_a_message(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(400)
        storage.add(QUEUE, sent)
        got: list[list[str]] = [[] for _ in range(4)]
        errors: list[BaseException] = []

        def consume(mine: list[str]) -> None:
            try:
                while batch := storage.take(QUEUE, 7):
                    mine.extend(ids(batch))
                    storage.ack(batch)
            except BaseException as e:  # re-raised in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=consume, args=(g,)) for g in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        everything = [i for g in got for i in g]
        assert sorted(everything) == sorted(ids(sent))  # each exactly once
        assert storage.stats().get(QUEUE, _EMPTY).depth == 0

    # -- leases ----------------------------------------------------------------------

    def test_expired_lease_makes_messages_free_again(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(3)
        storage.add(QUEUE, sent)
        assert ids(storage.take(QUEUE, 2, lease=30)) == ids(sent[:2])
        backend.clock.advance(29)
        assert ids(storage.take(QUEUE, 10, lease=30)) == ids(sent[2:])
        backend.clock.advance(2)  # the first two are free now, the last is not
        assert ids(take_all(storage, lease=30)) == ids(sent[:2])
        backend.clock.advance(31)
        assert ids(take_all(storage)) == ids(sent)

    def test_default_lease_is_the_storages(self, backend: Backend) -> None:
        storage = backend.open(lease=10)
        sent = make(2)
        storage.add(QUEUE, sent)
        assert ids(take_all(storage)) == ids(sent)
        backend.clock.advance(9)
        assert take_all(storage) == []
        backend.clock.advance(2)
        assert ids(take_all(storage)) == ids(sent)

    def test_release_makes_messages_free_at_once(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(4)
        storage.add(QUEUE, sent)
        taken = storage.take(QUEUE, 3, lease=3600)
        storage.release(taken[1:])
        assert ids(take_all(storage)) == ids(sent[1:])

    # -- settling --------------------------------------------------------------------

    def test_ack_removes_messages_for_good(self, backend: Backend) -> None:
        storage = backend.open(lease=10)
        sent = make(5)
        storage.add(QUEUE, sent)
        taken = storage.take(QUEUE, 3)
        storage.ack([taken[0], taken[2]])
        storage.ack([taken[0]])  # twice is harmless
        backend.clock.advance(11)
        left = [sent[1], sent[3], sent[4]]
        assert ids(take_all(storage)) == ids(left)
        assert storage.stats()[QUEUE].depth == 3
        storage = backend.reopen(storage)
        backend.clock.advance(11)
        again = take_all(storage)
        assert again == left
        storage.ack(again)
        backend.clock.advance(11)
        assert take_all(storage) == []
        storage = backend.reopen(storage)
        assert take_all(storage) == []

    def test_fail_moves_messages_to_the_failed_area(self, backend: Backend) -> None:
        storage = backend.open(lease=10)
        sent = make(4, priority=2, destination="http://h:1/")
        storage.add(QUEUE, sent)
        taken = storage.take(QUEUE, 3)
        storage.fail(taken[:2], "not JSON: expected '{' at byte 0")
        storage.fail(taken[2:], "rejected by the server")
        backend.clock.advance(11)
        assert ids(take_all(storage)) == ids(sent[3:])
        assert storage.failed(QUEUE, 10) == [
            (sent[0], "not JSON: expected '{' at byte 0"),
            (sent[1], "not JSON: expected '{' at byte 0"),
            (sent[2], "rejected by the server"),
        ]
        assert storage.failed(QUEUE, 2) == storage.failed(QUEUE, 10)[:2]
        assert storage.failed("other", 10) == []
        stats = storage.stats()[QUEUE]
        assert (stats.depth, stats.failed) == (1, 3)
        storage = backend.reopen(storage)
        assert [m for m, _ in storage.failed(QUEUE, 10)] == sent[:3]
        backend.clock.advance(11)
        assert ids(take_all(storage)) == ids(sent[3:])

    def test_fail_needs_a_reason(self, backend: Backend) -> None:
        storage = backend.open()
        storage.add(QUEUE, make(1))
        taken = storage.take(QUEUE, 1, lease=3600)
        with pytest.raises(InvalidMessage):
            storage.fail(taken, "")
        assert storage.failed(QUEUE, 10) == []
        assert storage.stats()[QUEUE].failed == 0

    def test_settling_what_was_not_taken_here_raises(self, backend: Backend) -> None:
        storage = backend.open()
        other = backend.open("other")
        sent = make(3)
        storage.add(QUEUE, sent)
        other.add(QUEUE, sent)
        mine = storage.take(QUEUE, 3, lease=3600)
        theirs = other.take(QUEUE, 3, lease=3600)
        never_taken = sent[0]
        for foreign in (never_taken, theirs[0]):
            with pytest.raises(UnknownMessage):
                storage.ack([mine[0], foreign])
            with pytest.raises(UnknownMessage):
                storage.release([mine[1], foreign])
            with pytest.raises(UnknownMessage):
                storage.fail([mine[2], foreign], "bad")
        # Nothing of a refused call happened, and ``other`` is untouched.
        stats = storage.stats()[QUEUE]
        assert (stats.depth, stats.taken, stats.failed) == (3, 3, 0)
        assert storage.take(QUEUE, 3) == []
        assert other.stats()[QUEUE].taken == 3
        storage.ack(mine)
        assert storage.stats().get(QUEUE, _EMPTY).depth == 0
        assert other.stats()[QUEUE].depth == 3

    # -- looking -----------------------------------------------------------------

    def test_stats(self, backend: Backend) -> None:
        storage = backend.open(lease=10)
        a = [
            Message(i, b"x" * n, priority=p)
            for i, n, p in zip(new_ids(3), (1, 10, 100), (7, 7, 2), strict=True)
        ]
        storage.add(QUEUE, a)
        storage.add(URL_QUEUE, make(2, size=50))
        every = storage.stats()
        assert set(every) == {QUEUE, URL_QUEUE}
        assert every[QUEUE] == QueueStats(3, 111, every[QUEUE].oldest_age, 0, 0)
        assert every[URL_QUEUE] == QueueStats(2, 100, every[URL_QUEUE].oldest_age, 0, 0)
        backend.clock.advance(100)
        assert 99.0 < storage.stats()[QUEUE].oldest_age <= 101.0
        taken = storage.take(QUEUE, 2)
        assert storage.stats()[QUEUE].taken == 2
        storage.fail(taken[:1], "bad")
        stats = storage.stats()[QUEUE]
        assert (stats.depth, stats.taken, stats.failed) == (2, 1, 1)
        backend.clock.advance(11)
        stats = storage.stats()[QUEUE]
        assert (stats.depth, stats.taken, stats.failed) == (2, 0, 1)
        storage.ack(take_all(storage))
        stats = storage.stats()[QUEUE]
        assert (stats.depth, stats.bytes, stats.taken, stats.failed) == (0, 0, 0, 1)
        assert storage.stats()[URL_QUEUE].depth == 2

    def test_stats_of_named_queues(self, backend: Backend) -> None:
        """``stats(queues=...)``: the figures of those named that hold messages, no others."""
        storage = backend.open(lease=10)
        storage.add(QUEUE, make(3, size=10))
        storage.add(URL_QUEUE, make(2, size=50))
        storage.add("only.failed", make(1, size=5))
        storage.fail(storage.take("only.failed", 1), "bad")
        every = storage.stats()
        named = storage.stats(queues=[QUEUE, "only.failed", "never.used", QUEUE])
        assert named == {QUEUE: every[QUEUE], "only.failed": every["only.failed"]}
        assert named["only.failed"] == QueueStats(0, 0, 0.0, 0, 1)
        assert storage.stats(queues=[URL_QUEUE]) == {URL_QUEUE: every[URL_QUEUE]}
        assert storage.stats(queues=[]) == {}
        storage.ack(take_all(storage, URL_QUEUE))
        assert storage.stats(queues=[URL_QUEUE]).get(URL_QUEUE, _EMPTY).depth == 0

    def test_bytes_after_partial_ack(self, backend: Backend) -> None:
        storage = backend.open()
        storage.add(QUEUE, make(4, size=25))
        storage.ack(storage.take(QUEUE, 1))
        assert storage.stats()[QUEUE].bytes == 75

    def test_queues_lists_queues_with_waiting_or_failed_messages(self, backend: Backend) -> None:
        storage = backend.open()
        storage.add("b", make(1))
        storage.add(URL_QUEUE, make(1))
        storage.add("a", make(2))
        assert storage.queues() == sorted(["a", "b", URL_QUEUE])
        storage.fail(take_all(storage, "a"), "bad")
        assert "a" in storage.queues()
        assert "c" not in storage.queues()

    # -- dedup -------------------------------------------------------------------

    def test_add_is_idempotent_by_id(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(3)
        assert storage.add(QUEUE, sent) == ids(sent)
        assert storage.add(QUEUE, sent) == []
        more = make(2)
        assert storage.add(QUEUE, [sent[1], more[0], more[0], sent[2], more[1]]) == ids(more)
        assert ids(take_all(storage)) == ids(sent + more)
        assert storage.stats()[QUEUE].depth == 5

    def test_add_is_idempotent_within_one_call(self, backend: Backend) -> None:
        storage = backend.open()
        m = make(1)[0]
        assert storage.add(QUEUE, [m, m, m]) == [m.id]
        assert ids(take_all(storage)) == [m.id]

    def test_add_is_idempotent_after_ack_and_reopen(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(3)
        storage.add(QUEUE, sent)
        storage.ack(take_all(storage))
        assert storage.add(QUEUE, sent) == []
        assert take_all(storage) == []
        storage = backend.reopen(storage)
        assert storage.add(QUEUE, sent) == []
        assert take_all(storage) == []

    def test_add_records_ids(self, backend: Backend) -> None:
        storage = backend.open()
        sent = make(3)
        assert storage.add(QUEUE, sent) == ids(sent)
        assert storage.add(QUEUE, sent) == []
        assert storage.add(QUEUE, sent[1:]) == []
        assert ids(take_all(storage)) == ids(sent)

    def test_ids_older_than_the_window_are_refused(self, backend: Backend) -> None:
        storage = backend.open(dedup_window=3600)
        # Made by hand: new_id() never dates an id before one it made already.
        old_ms = int((backend.clock.seconds() - 3700) * 1000)
        old = Message(f"{old_ms:012x}0000{os.urandom(8).hex()}", b"old")
        recent = make(1)
        with pytest.raises(InvalidMessage):
            storage.add(QUEUE, [*recent, old])
        assert take_all(storage) == []
        assert storage.add(QUEUE, recent) == ids(recent)

    # -- limits --------------------------------------------------------------------

    def test_max_messages_refuses_the_whole_call(self, backend: Backend) -> None:
        storage = backend.open(max_messages=5)
        first, refused = make(3), make(3)
        storage.add(QUEUE, first)
        with pytest.raises(StorageFull):
            storage.add(QUEUE, refused)
        with pytest.raises(StorageFull):
            storage.add("elsewhere", refused)
        assert storage.queues() == [QUEUE]
        assert storage.stats()[QUEUE].depth == 3
        assert storage.add(QUEUE, refused[:2]) == ids(refused[:2])
        # The refused call left no trace in the dedup index either.
        storage.max_messages = None  # type: ignore[attr-defined]
        assert storage.add(QUEUE, refused) == ids(refused[2:])
        assert ids(take_all(storage)) == ids(first + refused)

    def test_max_bytes_refuses_the_whole_call(self, backend: Backend) -> None:
        storage = backend.open(max_bytes=1000)
        storage.add(QUEUE, make(2, size=400))
        refused = make(2, size=150)
        with pytest.raises(StorageFull):
            storage.add(QUEUE, refused)
        assert storage.stats()[QUEUE] == QueueStats(2, 800, storage.stats()[QUEUE].oldest_age, 0, 0)
        assert storage.add(QUEUE, refused[:1]) == ids(refused[:1])
        storage.max_bytes = None  # type: ignore[attr-defined]
        assert storage.add(QUEUE, refused) == ids(refused[1:])

    def test_duplicates_do_not_count_against_the_limit(self, backend: Backend) -> None:
        storage = backend.open(max_messages=3)
        sent = make(3)
        storage.add(QUEUE, sent)
        assert storage.add(QUEUE, sent) == []

    # -- validation ----------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param(lambda: Message("nothex" * 5 + "ab", b"x"), id="id"),
            pytest.param(lambda: Message(new_id().upper(), b"x"), id="uppercase-id"),
            pytest.param(lambda: Message(new_id(), b"x", priority=10), id="priority-10"),
            pytest.param(lambda: Message(new_id(), b"x", priority=-1), id="priority--1"),
            pytest.param(lambda: Message(new_id(), b"x", priority="1"), id="priority-str"),  # type: ignore[arg-type]
            pytest.param(lambda: Message(new_id(), b"x", priority=True), id="priority-bool"),
            pytest.param(lambda: Message(new_id(), b"x", channel="../etc"), id="channel-path"),
            pytest.param(lambda: Message(new_id(), b"x", channel=""), id="channel-empty"),
            pytest.param(lambda: Message(new_id(), b"x", destination="file:///"), id="dest"),
            pytest.param(lambda: Message(new_id(), "text"), id="payload-str"),  # type: ignore[arg-type]
        ],
    )
    def test_invalid_message_stores_nothing(
        self, backend: Backend, bad: Callable[[], Message]
    ) -> None:
        storage = backend.open()
        good = make(2)
        with pytest.raises(InvalidMessage):
            storage.add(QUEUE, [good[0], bad(), good[1]])
        assert storage.queues() == []
        assert storage.add(QUEUE, good) == ids(good)

    def test_payload_too_large_stores_nothing(self, backend: Backend) -> None:
        storage = backend.open(max_payload=100)
        good = make(1, size=100)
        with pytest.raises(PayloadTooLarge):
            storage.add(QUEUE, good + make(1, size=101))
        assert storage.queues() == []
        assert storage.add(QUEUE, good) == ids(good)

    def test_invalid_queue_name(self, backend: Backend) -> None:
        storage = backend.open()
        with pytest.raises(InvalidMessage):
            storage.add("", make(1))
        assert storage.queues() == []

    # -- durability ----------------------------------------------------------------

    def test_reopen_keeps_unacked_messages(self, backend: Backend) -> None:
        storage = backend.open(lease=10)
        low, high = make(3, priority=8), make(2, priority=1)
        storage.add(QUEUE, low)
        storage.add(QUEUE, high)
        storage.add(URL_QUEUE, make(1))
        taken = storage.take(QUEUE, 2)
        storage.ack(taken[:1])
        storage = backend.reopen(storage)
        # The lease outlives the storage object that took the message.
        assert ids(take_all(storage)) == ids(low)
        backend.clock.advance(11)
        assert take_all(storage) == high[1:] + low
        assert storage.queues() == sorted([QUEUE, URL_QUEUE])

    # -- a model of it all ---------------------------------------------------------

    @pytest.mark.parametrize("seed", range(4))
    def test_random_operations_match_a_model(self, backend: Backend, seed: int) -> None:
        """Random adds, takes, acks, releases, fails and clock moves.

        Checked step by step against a model: a list in delivery order.
        Leases and clock steps never coincide to the millisecond, so the
        storages' rounding of times cannot matter.
        """
        rng = random.Random(seed)
        storage = backend.open(lease=45.5)
        waiting: list[Message] = []  # not acked or failed, in delivery order
        lease_until: dict[str, float] = {}
        known: list[Message] = []  # every message ever stored
        held: dict[str, Message] = {}  # the copy taken last of each message
        failed: list[str] = []
        for step in range(150):
            now = backend.clock.seconds()
            op = rng.random()
            if op < 0.3:
                batch = [
                    Message(i, rng.randbytes(rng.randrange(50)), priority=rng.choice((0, 1, 5, 9)))
                    for i in new_ids(rng.randrange(1, 6))
                ]
                if known and rng.random() < 0.3:
                    batch.insert(rng.randrange(len(batch)), rng.choice(known))  # a resend
                new = [m for m in batch if m.id not in lease_until]
                assert storage.add(QUEUE, batch) == ids(new)
                known.extend(new)
                waiting.extend(new)
                waiting.sort(key=lambda m: m.priority)  # stable: insertion order kept
                lease_until.update((m.id, 0.0) for m in new)
            elif op < 0.6:
                limit = rng.randrange(1, 8)
                lease = rng.choice((None, 10.5, 30.5))
                expected = [m for m in waiting if lease_until[m.id] <= now][:limit]
                got = storage.take(QUEUE, limit, lease)
                assert got == expected
                for m in got:
                    lease_until[m.id] = now + (45.5 if lease is None else lease)
                    held[m.id] = m
            elif op < 0.9 and held:
                chosen = rng.sample(sorted(held), rng.randrange(1, len(held) + 1))
                messages = [held.pop(i) for i in chosen]
                action = rng.choice(("ack", "release", "fail"))
                if action == "release":
                    # Releasing a claim that ran out is not specified: skip those.
                    messages = [m for m in messages if lease_until[m.id] > now]
                    storage.release(messages)
                    lease_until.update((m.id, 0.0) for m in messages)
                else:
                    if action == "ack":
                        storage.ack(messages)
                    else:
                        storage.fail(messages, f"step {step}")
                        failed.extend(ids(messages))
                    gone = set(ids(messages))
                    waiting[:] = [m for m in waiting if m.id not in gone]
            else:
                backend.clock.advance(rng.choice((1, 5, 20)))
            now = backend.clock.seconds()
            stats = storage.stats().get(QUEUE, _EMPTY)
            assert stats.depth == len(waiting)
            assert stats.bytes == sum(len(m.payload) for m in waiting)
            assert stats.taken == sum(1 for m in waiting if lease_until[m.id] > now)
            assert stats.failed == len(failed)
        assert ids(m for m, _ in storage.failed(QUEUE, 1000)) == failed

    # -- a closed storage ----------------------------------------------------------

    def test_a_closed_storage_raises_storage_closed(self, backend: Backend) -> None:
        storage = backend.open()
        storage.add(QUEUE, make(1))
        storage.close()
        for call in (
            lambda: storage.add(QUEUE, make(1)),
            lambda: storage.take(QUEUE, 1),
            lambda: storage.stats(),
        ):
            with pytest.raises(StorageClosed):
                call()

    # -- IMessageAdmin: what the dropr command needs ---------------------------------

    def test_provides_imessage_admin(self, backend: Backend) -> None:
        assert verifyObject(IMessageAdmin, message_admin(backend.open()))

    def test_open_messages_shows_waiting_and_taken_in_order(self, backend: Backend) -> None:
        storage = backend.open()
        admin = message_admin(storage)
        low, high = make(2, priority=7), make(1, priority=1)
        storage.add(QUEUE, low)
        storage.add(QUEUE, high)
        assert ids(storage.take(QUEUE, 1, lease=30)) == ids(high)
        listed = list(admin.open_messages(QUEUE))
        assert ids(o.message for o in listed) == ids(high + low)
        assert [o.queue for o in listed] == [QUEUE] * 3
        assert listed[0].lease_owner == admin.owner
        assert listed[0].lease_expires == pytest.approx(backend.clock.seconds() + 30, abs=0.01)
        assert [(o.lease_owner, o.lease_expires) for o in listed[1:]] == [(None, None)] * 2
        assert listed[1].message.payload == low[0].payload
        assert list(admin.open_messages("other")) == []

    def test_what_open_messages_lists_can_be_settled(self, backend: Backend) -> None:
        storage = backend.open()
        admin = message_admin(storage)
        sent = make(3)
        storage.add(QUEUE, sent)
        storage.take(QUEUE, 2, lease=30)
        first, second, _ = (o.message for o in admin.open_messages(QUEUE))
        storage.ack([first])
        storage.fail([second], "bad address")
        assert ids(o.message for o in admin.open_messages(QUEUE)) == ids(sent[2:])
        [failed] = admin.failed_messages(QUEUE)
        assert (failed.message.id, failed.reason) == (sent[1].id, "bad address")
        assert failed.queue == QUEUE
        assert failed.failed_at == pytest.approx(backend.clock.seconds(), abs=1)

    def test_requeue_failed_moves_messages_behind_what_waits(self, backend: Backend) -> None:
        # As the dropr command opens a store: beside its daemon, without dedup.
        storage = backend.open(dedup=False)
        admin = message_admin(storage)
        sent = make(3, destination="http://h:1/")
        storage.add(QUEUE, sent)
        storage.fail(storage.take(QUEUE, 2), "refused")
        later = make(1)
        storage.add(QUEUE, later)
        moved = admin.requeue_failed(QUEUE, [sent[1].id, "f" * 32])
        assert moved == [sent[1].id]
        assert ids(f.message for f in admin.failed_messages(QUEUE)) == [sent[0].id]
        back = take_all(storage)
        assert ids(back) == [sent[2].id, later[0].id, sent[1].id]
        assert (back[2].payload, back[2].destination) == (sent[1].payload, "http://h:1/")
        storage.ack(back)
        assert storage.stats()[QUEUE].depth == 0

    def test_purge_failed_forgets_only_the_ids_named(self, backend: Backend) -> None:
        storage = backend.open()
        admin = message_admin(storage)
        sent = make(3)
        storage.add(QUEUE, sent)
        storage.fail(storage.take(QUEUE, 3), "refused")
        assert sorted(admin.purge_failed(QUEUE, [sent[0].id, sent[2].id])) == sorted(
            [sent[0].id, sent[2].id]
        )
        assert ids(m for m, _ in storage.failed(QUEUE, 10)) == [sent[1].id]
        assert admin.purge_failed(QUEUE, [sent[0].id]) == []
        assert admin.set_aside() == []


# -- several storage objects, threads or processes on one store -------------------


def take_and_ack_worker(
    opener: Callable[[], Storage],
    queue: str,
    start: Any,
    results: Any,
    seed: int,
) -> None:
    """Take and ack from ``queue`` until it is empty; report the ids taken.

    Runs in a child process (so everything it gets is picklable): ``start``
    is a Barrier that lets all workers go at once, once each has opened the
    store, and ``results`` a Queue.
    """
    rng = random.Random(seed)
    taken: list[str] = []
    try:
        storage = opener()
        try:
            start.wait(60)
            while batch := storage.take(queue, rng.randrange(1, 20), lease=3600):
                taken.extend(ids(batch))
                storage.ack(batch)
                # Stands for the work on the batch.  Without it one process
                # can starve the other: SQLite's lock is not fair, and a
                # waiter polls while the holder takes it again at once.
                time.sleep(0.001)
        finally:
            storage.close()
    finally:
        results.put(taken)
