"""Edges of the client daemon's put path (put log, fronted spool, sender, put client).

Each test drives one hard sequence: a crash between a spill and a restart,
a producer mixing put and put_many, a full spool meeting a refusal, a put
log that cannot be moved at start, a stop with a put for a new
destination, a failed sync, a fork while a thread puts.  Fast tests on
fakes (a real spool in tmp_path, a fake transport, a MemoryReactorClock,
run_now), one real fork marked slow.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.client._front import FrontedSpool
from dropr.client._putlog import PutLog, recover
from dropr.client._sender import DestinationSender
from dropr.client.tap import ClientService, Options
from dropr.errors import StorageFull
from dropr.interfaces import SendResult
from dropr.testing import FakeTransport, run_now, stored

DEST = "http://central:8080/"
OTHER = "http://other:8080/"


def messages(n: int, destination: str = DEST, channel: str = "orders") -> list[Message]:
    return [Message(new_id(), b"m%d" % i, channel, 5, destination) for i in range(n)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[dropr.Spool]:
    s = dropr.Spool(str(tmp_path / "spool"), daemon=True, put_socket=False)
    yield s
    s.close()


def fronted(spool: dropr.Spool) -> tuple[FrontedSpool, PutLog]:
    log = PutLog(spool.path)
    log.open()
    return FrontedSpool(spool.storage, log), log


def offer(front: FrontedSpool, log: PutLog, batch: list[Message]) -> None:
    """What the put socket does with a group it answered: log, sync, hold."""
    front.offer(batch, log.append(batch))


def drain(front: Any, destination: str = DEST) -> list[str]:
    """Take and ack until nothing comes: the ids in the order a sender gets them."""
    ids: list[str] = []
    while batch := front.take(destination, 1000):
        ids += [m.id for m in batch]
        front.ack(batch)
    return ids


def service(
    tmp_path: Path, transport: Any, **spool_options: Any
) -> tuple[ClientService, MemoryReactorClock]:
    options = Options()
    options.parseOptions(["--spool", str(tmp_path / "spool"), "--rescan", "5"])
    clock = MemoryReactorClock()
    spool = dropr.Spool(options["spool"], daemon=True, **spool_options)
    client = ClientService(spool, transport, clock, options)
    client.run_on_disk = run_now
    return client, clock


def sent_ids(transport: FakeTransport, destination: str = DEST) -> list[str]:
    return [m.id for d, ms in transport.sent if d == destination for m in ms]


# -- 1. order: a producer's own batch file overtakes its earlier put held in memory ----


def test_put_then_put_many_of_one_producer_keep_their_order(spool: dropr.Spool) -> None:
    """dropr.put(a) goes through the socket (answered, held in memory);
    the same producer's next call, put_many([b, c]) on the same channel,
    writes its own batch file.  ``take`` gives the spool's messages first,
    so b and c reach the server before a."""
    front, log = fronted(spool)
    first = messages(1)  # put(): answered by the daemon, waits in memory
    offer(front, log, first)
    with dropr.Spool(spool.path, put_socket=False) as producer:
        later = producer.put_many([b"b", b"c"], DEST, "orders")
    assert drain(front) == [first[0].id, *later]


def test_a_put_the_daemon_refused_overtakes_the_one_it_answered(
    tmp_path: Path,
) -> None:
    """The same on the daemon's real sender: a1 is answered and held while
    the sender has a batch in flight; a2 is refused 507 by the daemon's room
    check (memory counts, the producer's own check does not) or times out,
    so the producer writes it itself.  The server gets a2 before a1."""
    transport = FakeTransport(hold=True)
    client, _ = service(tmp_path, transport)
    client.startService()
    try:
        a0 = [Message(new_id(), b"a0", "orders", 5, DEST)]
        client.wake_destinations(client.front.offer(a0, client.putlog.append(a0)))
        assert len(transport.pending) == 1  # a0 on the wire
        a1 = [Message(new_id(), b"a1", "orders", 5, DEST)]
        client.wake_destinations(client.front.offer(a1, client.putlog.append(a1)))
        # The producer's next put was not answered 200: it writes itself.
        with dropr.Spool(client.spool.path, put_socket=False) as producer:
            a2 = producer.put(b"a2", DEST, "orders")
        client.wake_all()
        while transport.pending:
            transport.pending.pop(0).answer(stored)
        assert sent_ids(transport) == [a0[0].id, a1[0].id, a2]
    finally:
        client.stopService()


# -- 2. a refusal that cannot move into a full spool wedges the destination ------------


def test_a_refused_put_meeting_a_full_spool_does_not_wedge_its_sender(
    tmp_path: Path,
) -> None:
    """The server refuses a put held in memory for good; ``fail`` moves it
    into the spool, which is full at that moment.  ``_split`` already took
    it out of ``_taken``, so nothing holds it any more: the sender keeps it
    and gives it back at its next round, and the spool refuses to release a
    message it never handed out (UnknownMessage) -- at every round, for
    ever, even once the spool has room.  Nothing for the destination is
    sent again until a restart; memory and the put log segment stay held."""
    inner = dropr.Spool(str(tmp_path / "spool"), daemon=True, put_socket=False, max_messages=1)
    try:
        front, log = fronted(inner)
        inner.storage.add(OTHER, messages(1, OTHER))  # the spool is full
        transport = FakeTransport(
            lambda d, ms: [SendResult(m.id, False, "rejected", permanent=True) for m in ms]
        )
        clock = MemoryReactorClock()
        sender = DestinationSender(front, DEST, transport, clock, run_now)
        refused = messages(1)
        offer(front, log, refused)
        sender.wake()
        assert transport.sent  # refused; moved into the spool (past its limit: admitted before)
        # The spool gets room again (OTHER's message delivered).
        drain(inner.storage, OTHER)
        for _ in range(10):
            sender.wake(force=True)
            clock.advance(120)
        assert [m.id for m, _why in inner.storage.failed(DEST)] == [refused[0].id]
        assert sender.state != "backoff", sender.last_error
        assert front.held() == (0, 0) and log.needed == 0
    finally:
        inner.close()


# -- 3. order at restart: a put log that cannot be moved yet is overtaken --------------


def test_while_the_put_log_waits_the_producers_own_files_do_not_overtake_it(
    tmp_path: Path,
) -> None:
    """a1 was answered through the socket, then the daemon died.  At the
    restart the log cannot be moved into the spool yet (full for its
    batch, a disk error); the socket stays shut, so the producer's next put
    a2 is its own batch file -- and the senders run meanwhile and send it.
    When the log moves at a later rescan, a1 goes after a2."""
    transport = FakeTransport()
    client, clock = service(tmp_path, transport)
    log = PutLog(client.spool.path)
    log.open()
    a1 = [Message(new_id(), b"a1", "orders", 5, DEST)]
    log.append(a1)  # answered; then kill -9
    real = client.front.file_in_order

    def full(*args: Any) -> None:
        raise StorageFull("no room for the put log's batch yet")

    client.front.file_in_order = full  # type: ignore[method-assign]
    client.startService()
    try:
        with dropr.Spool(client.spool.path, put_socket=False) as producer:
            a2 = producer.put(b"a2", DEST, "orders")  # no socket: its own file
        clock.advance(5)
        client.front.file_in_order = real  # type: ignore[method-assign]
        clock.advance(5)
        assert client.put_socket.parent is client
        assert sent_ids(transport) == [a1[0].id, a2]
    finally:
        client.stopService()


# -- 4. two batch files under one batch id share one state-log entry: a loss -----------


class _Full:
    """The spool while it has no room: every add is refused."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def add(self, *args: Any, **kwargs: Any) -> list[str]:
        raise StorageFull("the spool is full")

    def take(self, *args: Any) -> list[Message]:
        return []

    def release(self, messages: Any) -> None:
        assert not messages  # none of these came from the spool


def test_a_log_moved_at_restart_under_an_id_the_spool_already_files_loses_none(
    spool: dropr.Spool,
) -> None:
    """Files are named <batch id>-<count>-<bytes> and the state log keys
    acks by batch id only.  Spilled memory and the log moved at a restart
    are both filed under their *oldest* id, so both can be filed under m1:

    1. m1 (channel a) and m2 (channel b) arrive; the sender has both on the
       wire (two batches, distinct channels);
    2. m1's send fails and the spool is full: m1 goes back into memory;
    3. m3 (channel a) arrives; the sender backs off and memory is spilled:
       file m1-2 = [m1, m3];
    4. that file is sent and acked ("A m1 0,1");
    5. kill -9 while m2 is still unanswered on the wire;
    6. at the restart the log's [m1, m2, m3] are filed as m1-3 in the same
       bucket: its indexes 0 and 1 read as acked, so m2 -- answered to its
       producer, never stored by the server -- is never sent."""
    front, log = fronted(spool)
    m1 = Message(new_id(), b"m1", "a", 5, DEST)
    m2 = Message(new_id(), b"m2", "b", 5, DEST)
    offer(front, log, [m1, m2])
    first, second = front.take(DEST, 1), front.take(DEST, 1)  # both on the wire
    assert [m.id for m in first + second] == [m1.id, m2.id]
    front.inner = _Full(spool.storage)
    front.release(first)  # m1's send failed; no room: back into memory
    front.inner = spool.storage
    m3 = Message(new_id(), b"m3", "a", 5, DEST)
    offer(front, log, [m3])
    assert front.spill(DEST) == 2  # the sender backs off: [m1, m3] into the spool
    again = front.take(DEST, 10)
    assert [m.id for m in again] == [m1.id, m3.id]
    front.ack(again)  # stored by the server
    # kill -9: m2 is still on the wire, unanswered.
    spool.close()
    with dropr.Spool(spool.path, daemon=True, put_socket=False) as restarted:
        front2 = FrontedSpool(restarted.storage, PutLog(restarted.path))
        assert recover(restarted.path, front2.file_in_order) == 3
        assert m2.id in drain(front2)


# -- 5. the room check forgets what memory moved into the spool ------------------------


def test_what_moves_from_memory_into_the_spool_still_counts_for_the_room_check(
    spool: dropr.Spool,
) -> None:
    """The put socket's room check reads ``known_usage()``: the spool's
    figures of the last count (a rescan, every 5 s) plus memory.  A spill
    (backoff, over the memory limit) moves messages from memory into the
    spool: memory drops at once, the spool's figure only at the next count,
    so for up to a rescan the daemon admits that many puts past the
    spool's limits."""
    front, log = fronted(spool)
    front.count_usage()
    offer(front, log, messages(3))
    assert front.known_usage()[0] == 3
    assert front.spill(DEST) == 3  # still 3 messages waiting, now on disk
    assert front.known_usage()[0] == 3


# -- 6. the put log after its close ----------------------------------------------------


def test_done_after_close_does_not_close_a_stranger_file(spool: dropr.Spool) -> None:
    """``close`` closes every segment's fd; a segment with records still
    needed stays in ``Segment`` objects that FrontedSpool holds.  A later
    ``done`` (an ack of a sender still running after the stop, see the next
    test) calls ``_remove``, which closes ``segment.fd`` again: by then the
    number may be another file's, which gets closed under its owner."""
    log = PutLog(spool.path)
    log.open()
    segment = log.append(messages(1))
    number = segment.fd
    log.close()
    # Another file of the process now has the segment's old number.
    stranger = os.open(os.devnull, os.O_RDONLY)
    if stranger != number:
        os.dup2(stranger, number)
        os.close(stranger)
    try:
        log.done(segment, 1)
        os.fstat(number)  # still the stranger's
    finally:
        with contextlib.suppress(OSError):
            os.close(number)


# -- 7. the stop: a sender made while the daemon stops is never stopped -----------------


def test_a_put_for_a_new_destination_during_the_stop_is_not_sent_after_it(
    tmp_path: Path,
) -> None:
    """``stopService`` stops the senders that exist, then waits for the put
    socket to answer what it accepted.  A group written meanwhile is handed
    to ``wake_destinations``, which makes a sender for a destination it has
    not seen and starts it: that sender is not stopped, is not waited for,
    takes the put from memory (so ``spill_all`` leaves it in the put log)
    and is still on the wire after the daemon stopped, its spool closed."""
    transport = FakeTransport(hold=True)
    client, clock = service(tmp_path, transport)
    client.startService()
    a = [Message(new_id(), b"a", "orders", 5, DEST)]
    client.wake_destinations(client.front.offer(a, client.putlog.append(a)))
    assert len(transport.pending) == 1
    stopped = client.stopService()  # DEST's batch gets its grace period
    # A put accepted before the socket closed, written now: a new destination.
    b = [Message(new_id(), b"b", "orders", 5, OTHER)]
    client.wake_destinations(client.front.offer(b, client.putlog.append(b)))
    clock.advance(10)  # DEST's grace runs out
    assert stopped.called
    try:
        assert sent_ids(transport, OTHER) == []  # nothing leaves after the stop began
        assert all(s.state != "running" for s in client.senders.values())
    finally:
        for p in transport.pending:
            if not p.deferred.called:
                p.deferred.cancel()


# -- 8. the producer's client across fork() ---------------------------------------------


@pytest.mark.slow
def test_a_child_forked_while_a_thread_puts_does_not_hang(tmp_path: Path) -> None:
    """``PutSocketClient`` is shared by every thread of a producer and its
    lock is taken around each connection pick; ``register_at_fork`` only
    bumps the generation.  A fork while another thread holds the lock (a
    threaded app with a pre-fork worker model) leaves the child's copy
    locked for ever: the child's first ``put()`` hangs, it never falls back
    to writing its own batch."""
    import signal
    import threading

    from dropr.client._putclient import PutSocketClient

    client = PutSocketClient(str(tmp_path / "put.sock"), timeout=1.0)
    held, release = threading.Event(), threading.Event()

    def another_thread() -> None:  # mid _connection(): holds the lock a moment
        with client._lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=another_thread)
    t.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: one put, which finds no daemon and would write itself
        signal.alarm(3)
        client.put(messages(1))
        os._exit(0)
    release.set()
    t.join()
    _pid, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        "the child hung on the client's lock (killed by SIGALRM)"
    )


def test_a_give_back_that_fails_once_can_be_tried_again(spool: dropr.Spool) -> None:
    """The same root as the wedge above: ``_split`` drops memory's entries
    from ``_taken`` before the spool's part of the call has run.  A sender
    whose settle failed keeps the messages and gives them back at its next
    round, spool's and memory's together (a spool without ``take_wire``,
    SQLite say, hands out lists); if the spool's release fails once (EIO),
    memory's messages are known to no one and every later give-back raises
    UnknownMessage."""
    front, log = fronted(spool)
    spool.storage.add(DEST, messages(1))
    from_spool = list(spool.storage.take(DEST, 10))
    offer(front, log, messages(1))
    from_memory = front.take(DEST, 10)
    assert len(from_spool) == len(from_memory) == 1

    class FlakyOnce:
        failed = False

        def __getattr__(self, name: str) -> Any:
            return getattr(spool.storage, name)

        def release(self, messages: Any) -> None:
            if not FlakyOnce.failed:
                FlakyOnce.failed = True
                raise OSError(5, "Input/output error")
            spool.storage.release(messages)

    front.inner = FlakyOnce()
    held = from_spool + from_memory  # what the sender holds after the failed settle
    with pytest.raises(OSError):
        front.release(held)
    front.release(held)  # the next round tries again
    assert front.held() == (0, 0) and log.needed == 0


# -- 9. a group whose sync failed comes back after a crash -----------------------------


def test_a_group_whose_sync_failed_is_not_moved_into_the_spool_after_a_crash(
    spool: dropr.Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``append`` writes the group, then ``fdatasync`` fails (ENOSPC, EIO):
    every caller is answered 507/500, and a producer whose own write fails
    too gets StorageFull from put() -- the message was *not* put, and the
    application may put the payload again under a new id.  But the records
    are whole in the segment; the next append goes to a new segment and the
    old one stays while its earlier records are needed.  After a crash,
    ``recover`` moves them into the spool like answered ones: a put that
    raised is delivered (and, put again, delivered twice under two ids)."""
    import errno

    from dropr.client import _putlog

    log = PutLog(spool.path)
    log.open()
    answered = messages(1)
    log.append(answered)  # answered, on the wire when the crash comes
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_putlog.os, "fdatasync", failing)
    refused = messages(1)
    with pytest.raises(OSError):
        log.append(refused)  # its caller got 507 and no copy was stored
    monkeypatch.setattr(_putlog.os, "fdatasync", real)
    # kill -9; at the next start:
    front = FrontedSpool(spool.storage, PutLog(spool.path))
    recover(spool.path, front.file_in_order)
    assert drain(front) == [answered[0].id]
