"""The put log and the messages the daemon holds in front of its spool."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from dropr._ids import new_id
from dropr._message import Message
from dropr.client._front import FrontedSpool
from dropr.client._putlog import PutLog, log_dir, recover, segments
from dropr.client._putsocket import SyncRunner
from dropr.client._spool import Spool
from dropr.errors import StorageFull

DEST = "http://central:8080/"
OTHER = "http://other:8080/"


def messages(n: int, destination: str = DEST, channel: str = "orders") -> list[Message]:
    return [Message(new_id(), b"m%d" % i, channel, 5, destination) for i in range(n)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(str(tmp_path / "spool"), daemon=True, put_socket=False)
    yield s
    s.close()


def drained(spool: Spool, destination: str = DEST) -> list[str]:
    ids: list[str] = []
    while batch := spool.storage.take(destination, 1000):
        ids += [m.id for m in batch]
        spool.storage.ack(batch)
    return ids


# -- the log --------------------------------------------------------------------------


def test_what_a_crash_leaves_in_the_log_goes_into_the_spool_in_order(spool: Spool) -> None:
    log = PutLog(spool.path)
    log.open()
    first, second = messages(3), messages(2) + messages(1, OTHER)
    log.append(first)
    log.append(second)
    # A crash: the files stay as they are, nothing was sent.
    front = FrontedSpool(spool.storage, log)
    assert recover(spool.path, front.file_in_order) == 6
    assert segments(spool.path) == []
    assert drained(spool) == [m.id for m in first + second[:2]]
    assert drained(spool, OTHER) == [second[2].id]
    assert recover(spool.path, front.file_in_order) == 0  # nothing twice


def test_a_record_cut_short_by_a_crash_was_never_answered_and_is_dropped(spool: Spool) -> None:
    log = PutLog(spool.path)
    log.open()
    kept = messages(2)
    log.append(kept)
    segment = log.append(messages(1))
    os.truncate(segment.path, os.path.getsize(segment.path) - 3)
    front = FrontedSpool(spool.storage, log)
    assert recover(spool.path, front.file_in_order) == 2
    assert drained(spool) == [m.id for m in kept]


def test_the_log_goes_before_what_producers_wrote_after_the_daemon_died(spool: Spool) -> None:
    log = PutLog(spool.path)
    log.open()
    answered = messages(2)  # through the socket, then the daemon died
    log.append(answered)
    with Spool(spool.path, put_socket=False) as producer:
        later = producer.put(b"written by the producer itself", DEST, "orders")
    front = FrontedSpool(spool.storage, log)
    recover(spool.path, front.file_in_order)
    assert drained(spool) == [m.id for m in answered] + [later]


def test_a_segment_is_removed_once_every_record_is_done(spool: Spool) -> None:
    log = PutLog(spool.path, segment_bytes=1)
    log.open()
    one = log.append(messages(2))
    two = log.append(messages(1))  # the first is full: a new segment
    assert one is not two and os.path.exists(one.path)
    log.done(one, 1)
    assert os.path.exists(one.path) and log.needed == 2
    log.done(one, 1)
    assert not os.path.exists(one.path)  # no longer current: gone
    log.done(two, 1)
    assert os.path.exists(two.path)  # current: written on
    log.close()
    assert segments(spool.path) == []  # nothing needed: removed at close


def test_a_write_that_fails_starts_a_new_segment(spool: Spool) -> None:
    log = PutLog(spool.path)
    log.open()
    good = log.append(messages(1))
    os.close(good.fd)  # the next write fails, as on a broken disk
    with pytest.raises(OSError):
        log.append(messages(1))
    after = log.append(messages(1))
    assert after is not good
    assert [n for n, _p in segments(spool.path)] == [good.number, after.number]


def test_the_log_is_owner_only(spool: Spool) -> None:
    log = PutLog(spool.path)
    log.open()
    segment = log.append(messages(1))
    assert os.stat(log_dir(spool.path)).st_mode & 0o777 == 0o700
    assert os.stat(segment.path).st_mode & 0o777 == 0o600


# -- the front ------------------------------------------------------------------------


def fronted(spool: Spool) -> tuple[FrontedSpool, PutLog]:
    log = PutLog(spool.path)
    log.open()
    return FrontedSpool(spool.storage, log), log


def offer(front: FrontedSpool, log: PutLog, batch: list[Message]) -> None:
    front.offer(batch, log.append(batch))


def test_take_gives_memory_alone_only_while_the_spool_holds_nothing(spool: Spool) -> None:
    front, log = fronted(spool)
    in_memory = messages(2)
    offer(front, log, in_memory)
    got = front.take(DEST, 10)
    assert [m.id for m in got] == [m.id for m in in_memory]  # no disk: sent from memory
    front.ack(got)
    assert log.needed == 0 and front.held() == (0, 0)


def test_with_both_the_order_of_creation_decides(spool: Spool) -> None:
    front, log = fronted(spool)
    older = messages(2)  # through the socket, waiting while a batch is on the wire
    offer(front, log, older)
    with Spool(spool.path, put_socket=False) as producer:  # then a put_many of its own
        newer = producer.put_many([b"b", b"c"], DEST, "orders")
    got = front.take(DEST, 10)
    assert [m.id for m in got] == [m.id for m in older] + newer
    front.ack(got)
    assert front.take(DEST, 10) == [] and log.needed == 0 and front.held() == (0, 0)


def test_a_message_that_arrives_after_the_spool_was_looked_at_waits(spool: Spool) -> None:
    front, log = fronted(spool)
    early, late = messages(1), messages(1)
    offer(front, log, early)

    class Racing:
        """The spool, while a producer's put lands in memory mid-take."""

        def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
            offer(front, log, late)
            return list(spool.storage.take(queue, limit, lease))

    front.inner = Racing()
    assert [m.id for m in front.take(DEST, 10)] == [early[0].id]
    front.inner = spool.storage
    assert [m.id for m in front.take(DEST, 10)] == [late[0].id]


def test_given_back_in_any_order_they_come_again_in_arrival_order(spool: Spool) -> None:
    front, log = fronted(spool)
    batch = messages(4)
    offer(front, log, batch)
    first, second = front.take(DEST, 2), front.take(DEST, 2)
    front.release(second)  # a prefetched batch comes back first
    front.release(first)
    assert front.held() == (0, 0) and log.needed == 0  # into the spool
    assert drained(spool) == [m.id for m in batch]


def test_given_back_to_a_full_spool_they_wait_in_memory_in_order(spool: Spool) -> None:
    front, log = fronted(spool)
    batch = messages(4)
    offer(front, log, batch)
    first, second = front.take(DEST, 2), front.take(DEST, 2)

    class Full:
        def add_filed(self, *args: Any, **kwargs: Any) -> list[str]:
            raise StorageFull("the spool is full")

        def take(self, *args: Any) -> list[Message]:
            return []

        def release(self, messages: Any) -> None:
            assert not messages  # none of these came from the spool

    front.inner = Full()
    front.release(second)
    front.release(first)
    assert front.held() == (4, 8) and log.needed == 4
    assert [m.id for m in front.take(DEST, 10)] == [m.id for m in batch]


def test_a_refused_message_goes_straight_to_the_spools_failed_area(spool: Spool) -> None:
    front, log = fronted(spool)
    batch = messages(2)
    offer(front, log, batch)
    taken = front.take(DEST, 10)
    front.fail(taken[:1], "refused: too large")
    front.ack(taken[1:])
    assert log.needed == 0 and front.held() == (0, 0)  # the spool holds it now
    assert front.take(DEST, 10) == []  # not sent again
    assert [(m.id, why) for m, why in spool.storage.failed(DEST)] == [
        (batch[0].id, "refused: too large")
    ]


def test_a_refusal_the_failed_area_cannot_take_waits_in_memory(spool: Spool) -> None:
    front, log = fronted(spool)
    batch = messages(1)
    offer(front, log, batch)
    taken = front.take(DEST, 10)

    class Full:
        def add_failed(self, *args: Any) -> None:
            raise StorageFull("the spool's disk is full")

        def add_filed(self, *args: Any) -> list[str]:
            raise StorageFull("the spool's disk is full")

    front.inner = Full()
    front.fail(taken, "refused: too large")
    assert front.held() == (1, 2) and log.needed == 1  # kept, not lost
    front.inner = spool.storage
    again = front.take(DEST, 10)
    assert [m.id for m in again] == [batch[0].id]
    front.fail(again, "refused: too large")
    assert [m.id for m, _why in spool.storage.failed(DEST)] == [batch[0].id]
    assert log.needed == 0


def test_spilled_messages_go_before_what_producers_wrote_meanwhile(spool: Spool) -> None:
    front, log = fronted(spool)
    answered = messages(3)
    offer(front, log, answered)
    with Spool(spool.path, put_socket=False) as producer:
        later = producer.put(b"written by the producer itself", DEST, "orders")
    assert front.spill(DEST) == 3
    assert log.needed == 0 and front.held() == (0, 0)
    assert drained(spool) == [m.id for m in answered] + [later]


def test_a_spill_the_spool_refuses_keeps_the_messages_in_memory(spool: Spool) -> None:
    front, log = fronted(spool)
    batch = messages(2)
    offer(front, log, batch)

    class Full:
        def add_filed(self, *args: Any, **kwargs: Any) -> list[str]:
            raise StorageFull("the spool is full")

    front.inner = Full()
    with pytest.raises(StorageFull):
        front.spill(DEST)
    assert log.needed == 2 and front.waiting_destinations() == [DEST]
    front.inner = spool.storage
    assert [m.id for m in front.take(DEST, 10)] == [m.id for m in batch]


def test_memory_counts_in_the_spools_figures(spool: Spool) -> None:
    front, log = fronted(spool)
    spool.storage.add(DEST, messages(1))
    offer(front, log, messages(2))
    assert front.usage() == (3, 6)
    front.count_usage()
    assert front.known_usage() == (3, 6)
    assert sorted(front.queue_names()) == [DEST]
    offer(front, log, messages(1, OTHER))
    assert sorted(front.queue_names()) == sorted([DEST, OTHER])


# -- where the write runs ---------------------------------------------------------------


class FakePool:
    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], f: Callable[..., object], *args: Any
    ) -> None:
        def job() -> None:
            try:
                on_result(True, f(*args))
            except BaseException:
                on_result(False, Failure())

        self.jobs.append(job)


class FakeReactor:
    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        f(*args)


def test_writes_run_in_the_reactor_while_quick_and_on_the_thread_when_slow() -> None:
    now = [0.0]
    pool = FakePool()
    runner = SyncRunner(FakeReactor(), pool, inline_max=0.002, clock=lambda: now[0])

    def write(seconds: float) -> Callable[[], object]:
        def f() -> object:
            now[0] += seconds
            return "written"

        return f

    results: list[object] = []
    d: Deferred[object] = runner(write(0.0003))
    d.addCallback(results.append)
    assert results == ["written"] and runner.inline == 1  # no thread: done at once
    while runner.average <= 0.002:
        runner(write(0.05))  # the disk turns slow
    inline = runner.inline
    d = runner(write(0.05))
    d.addCallback(results.append)
    assert runner.inline == inline and runner.threaded == 1 and len(pool.jobs) == 1
    pool.jobs.pop()()
    assert results[-1] == "written"
    while runner.average > 0.002:
        runner(write(0.0001)).addCallback(results.append)
        for job in pool.jobs:
            job()
        pool.jobs.clear()
    runner(write(0.0001))
    assert runner.inline == inline + 1  # quick again: back in the reactor


def test_a_cut_at_any_byte_keeps_every_record_synced_before_it(tmp_path: Path) -> None:
    """A crash keeps a prefix of the segment: every group whose sync ended
    before the cut comes back, whole, in order; nothing after it does."""
    path = str(tmp_path / "spool")
    os.makedirs(path)
    log = PutLog(path)
    log.open()
    groups = [messages(n) for n in (1, 3, 2)]
    ends = [log.append(group).size for group in groups]  # synced size after each
    [(_n, segment)] = segments(path)
    with open(segment, "rb") as f:
        data = f.read()
    for cut in range(len(data) + 1):
        with open(segment, "wb") as f:
            f.write(data[:cut])
        got: list[str] = []

        def add(_d: str, ms: list[Message], got: list[str] = got) -> None:
            got.extend(m.id for m in ms)

        recover(path, add)
        synced = [
            m.id for group, end in zip(groups, ends, strict=True) if end <= cut for m in group
        ]
        assert got[: len(synced)] == synced, f"lost an answered put at cut {cut}"
        assert got == [m.id for g in groups for m in g][: len(got)], f"junk at cut {cut}"
        with open(segment, "wb") as f:  # recover removed it: put it back whole
            f.write(data)


def test_straight_into_the_failed_area_needs_a_reason(spool: Spool) -> None:
    from dropr.errors import InvalidMessage

    with pytest.raises(InvalidMessage, match="needs a reason"):
        spool.storage.add_failed(DEST, messages(1), "")
    assert spool.storage.failed(DEST) == []
    refused = messages(2)
    spool.storage.add_failed(DEST, refused, "refused: no such channel")
    assert [(m.id, why) for m, why in spool.storage.failed(DEST)] == [
        (m.id, "refused: no such channel") for m in refused
    ]
    assert spool.storage.usage() == (0, 0)  # never waiting
