"""The edges where the promises once broke, each with its regression test.

Every test here names the breach it guards.  The sender tests run a real
sender against an in-process server on a real socket.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from faultydisk import FaultyDisk
from inprocess import Server
from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.client._sender import DestinationSender, thread_pool_runner
from dropr.client._transport import HTTPTransport
from dropr.errors import InvalidMessage, StorageFull
from dropr.server._receiver import Limits
from dropr.storage import _batchfile as batchfile
from dropr.storage.files._disk import Disk
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import ClientProcess

Q = "orders"


@pytest.fixture(autouse=True)
def buckets_apart() -> Iterator[None]:
    """Each batch of a test in a bucket of its own, starting a day ago."""
    from unittest import mock

    import dropr.storage.files._storage as storage_module

    ms = [int((time.time() - 86400) * 1000)]

    def ids(now: float | None = None) -> str:
        ms[0] += 4096
        return f"{ms[0]:012x}0000{os.urandom(8).hex()}"

    with mock.patch.object(storage_module, "new_id", ids):
        yield


def make(n: int, priority: int = 5) -> list[Message]:
    return [Message(new_id(), b"p%d" % i, Q, priority) for i in range(n)]


class Clock:
    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(1, 1, "test-spool")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def transport() -> Iterator[HTTPTransport]:
    t = HTTPTransport(reactor, connect_timeout=2, timeout=10)
    yield t
    pytest_twisted.blockon(t.close())


def until(condition: Any, timeout: float = 15.0) -> defer.Deferred[None]:
    deadline = time.monotonic() + timeout

    async def poll() -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await task.deferLater(reactor, 0.02, lambda: None)

    return defer.ensureDeferred(poll())


class _AckAppendFails(Disk):
    """The first append of an ack line fails with ENOSPC (then the disk is fine)."""

    def __init__(self) -> None:
        self.failed = 0

    def append(self, path: str, data: bytes, *, sync: bool) -> None:
        if not self.failed and data.lstrip(b"\n").startswith(b"A "):
            self.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        super().append(path, data, sync=sync)


def _server_copies(server: Server) -> list[str]:
    ids = []
    while batch := server.storage.take(Q, 1000):
        ids.extend(m.id for m in batch)
    return ids


def _spool_with(path: Path, disk: Disk) -> dropr.Spool:
    spool = dropr.Spool(str(path))
    spool.storage.close()
    spool.storage = FilesystemStorage(str(path), sync_acks=False, lease=0.3, disk=disk)
    return spool


def _spool_depth(spool: dropr.Spool, destination: str) -> int:
    stats = spool.stats().get(destination)
    return 0 if stats is None else stats.depth


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_breach1_a_failed_spool_ack_does_not_store_twice(
    tmp_path: Path, pool: ThreadPool, transport: HTTPTransport
) -> Any:
    """(breach 1) A running client sends a batch put after it started; the
    server stores it; the client's ack append fails (ENOSPC, once).  The next
    rescan sends the batch again, and the server still holds one copy."""
    server = Server(tmp_path, Limits())
    disk = _AckAppendFails()
    spool = _spool_with(tmp_path / "spool", disk)
    sender = DestinationSender(
        spool.storage,
        server.url,
        transport,
        reactor,
        thread_pool_runner(reactor, pool),
        backoff_base=0.05,
    )
    # The client daemon's rescan: it wakes every sender now and then, which
    # is what sends a batch whose ack failed again.
    rescan = task.LoopingCall(sender.wake)
    try:
        yield task.deferLater(reactor, 0.05, lambda: None)  # the client runs a while
        put = spool.put_many([b"a", b"b", b"c"], server.url, Q)
        rescan.start(0.1)
        yield until(lambda: disk.failed == 1 and _spool_depth(spool, server.url) == 0)
        rescan.stop()
        yield sender.stop()
        assert sender.sent == 6  # sent, its ack failed, sent again
        ids = _server_copies(server)
        assert sorted(ids) == sorted(put), f"stored {len(ids)} copies of {len(put)} messages"
    finally:
        if rescan.running:
            rescan.stop()
        spool.close()
        yield server.stop()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_breach2_an_empty_future_bucket_does_not_store_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """(breach 2) The wall clock stepped back ten minutes.  Before the step, a
    message was put, stored by the server and never acked (the client died),
    and a producer was killed between mkdir and rename, leaving an empty
    bucket newer than any batch.  A dropr-client started after the step
    sends the message again, and the server still holds one copy."""
    import dropr._ids as ids_module
    import dropr.storage.files._storage as storage_module

    server = Server(tmp_path, Limits())
    spool = dropr.Spool(str(tmp_path / "spool"))
    client = ClientProcess(str(tmp_path / "spool"), str(tmp_path / "client.log"))
    try:
        before_step = time.time() + 600
        # Before the step the clock read ten minutes later than it does now:
        # the producer's ids and its batch's bucket date from then (as does
        # every later id of this process, until the "restart" below).
        monkeypatch.setattr(ids_module, "_last_ms", ids_module._last_ms)
        with monkeypatch.context() as ahead:
            ahead.setattr(ids_module, "time", SimpleNamespace(time=lambda: before_step))
            ahead.setattr(storage_module, "new_id", ids_module.new_id)
            spool.put(b"stored, not acked", server.url, Q)
            [m] = spool.storage.take(server.url, 1)
            # The client sent it, the server stored it, the client died
            # before its ack: its lease is a dead owner's, free again.
            assert server.storage.add(Q, [Message(m.id, m.payload, Q, m.priority)]) == [m.id]
            spool.storage.release([m])
            # A producer killed between mkdir and rename, a little later.
            killed = new_id(before_step + 60)
            qdir = os.listdir(tmp_path / "spool" / "queues")[0]
            pdir = tmp_path / "spool" / "queues" / qdir / "5"
            (pdir / killed[:7] / killed[7:9]).mkdir(parents=True)
        # The step back; the daemon below is a new process on the real clock.
        monkeypatch.setattr(ids_module, "_last_ms", 0)
        assert m.created > time.time() + 500  # it dates after the client's start
        assert not any(max(pdir.glob("*/*")).iterdir())  # the newest bucket is the empty one
        client.start()
        yield until(lambda: _spool_depth(spool, server.url) == 0 or not client.alive(), 30)
        assert client.alive(), client.log_text()
        assert "sent 1 to" in client.log_text()  # the daemon sent it again
        assert _server_copies(server) == [m.id]
    finally:
        client.stop()
        spool.close()
        yield server.stop()


def test_breach3_a_take_that_fails_half_way_leaks_no_lease(tmp_path: Path) -> None:
    """(breach 3) The second bucket's lease append fails: the take raises
    StorageFull, and everything can be taken at once, in order."""
    disk = FaultyDisk(stash=str(tmp_path / "stash"))
    storage = FilesystemStorage(str(tmp_path / "store"), disk=disk)
    first, second = make(2), make(2)
    storage.add(Q, first)
    storage.add(Q, second)
    appends: list[str] = []
    real_append = FaultyDisk.append

    def failing_append(self: FaultyDisk, path: str, data: bytes, *, sync: bool) -> None:
        appends.append(path)
        if data.startswith(b"T ") and len({os.path.dirname(p) for p in appends}) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_append(self, path, data, sync=sync)

    disk.append = failing_append.__get__(disk)  # type: ignore[method-assign]
    with pytest.raises(StorageFull):
        storage.take(Q, 10)
    disk.append = real_append.__get__(disk)  # type: ignore[method-assign]
    assert [m.id for m in storage.take(Q, 10)] == [m.id for m in first + second]
    storage.close()


def test_breach4_a_late_ack_after_the_bucket_is_gone_counts_for_all(tmp_path: Path) -> None:
    """(breach 4) A's lease ran out, B took, acked and removed the bucket;
    A's late ack names that bucket and another: no error, and the other
    bucket's message is acked."""
    clock = Clock()
    root = str(tmp_path / "store")
    a = FilesystemStorage(root, clock=clock, lease=10)
    b = FilesystemStorage(root, clock=clock, lease=10)
    a.add(Q, make(1))
    a.add(Q, make(1))
    old, other = a.take(Q, 2)
    clock.now += 30  # A's leases run out
    [again] = b.take(Q, 1)
    assert again.id == old.id
    b.ack([again])
    b.take(Q, 1)  # passes the finished bucket and removes it
    assert not os.path.isdir(os.path.dirname(old.receipt.bucket + "/x"))  # type: ignore[union-attr]
    a.ack([old, other])  # must not raise
    clock.now += 30
    assert b.take(Q, 10) == []  # other is acked, not handed out again
    a.close()
    b.close()


@pytest.mark.slow
def test_breach5_memory_of_two_consumers_is_bounded(tmp_path: Path) -> None:
    """(breach 5) Two consumers alternate over 1,600 buckets: what each keeps
    (state logs, scans, listings, read batches) stays flat, not one entry per
    bucket seen."""
    root = str(tmp_path / "store")
    producer = FilesystemStorage(root)
    for _ in range(1600):
        producer.add(Q, make(1))
    producer.close()
    consumers = [FilesystemStorage(root), FilesystemStorage(root)]
    sizes = []
    for n in range(1600):
        c = consumers[n % 2]
        [m] = c.take(Q, 1)
        c.ack([m])
        if n % 200 == 199:
            q = c._views.peek(Q)
            assert q is not None
            sizes.append((len(q.logs), len(q.scans), len(c._listing), len(c._reader.cache)))
    assert consumers[0].take(Q, 1) == []
    for size in sizes:
        assert size[0] <= 256 and size[1] <= 256 and size[2] <= 4096 and size[3] <= 256, sizes
    assert sizes[-1][:2] == sizes[-3][:2] and sizes[-1][3] == sizes[-3][3], sizes  # flat
    for c in consumers:
        c.close()


@pytest.mark.slow
def test_breach6_descriptors_do_not_grow_with_channels(tmp_path: Path) -> None:
    """(breach 6) A store touching 2,000 channels under RLIMIT_NOFILE 1024."""
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        from dropr._ids import new_id
        from dropr._message import Message
        from dropr.storage.files._storage import FilesystemStorage
        s = FilesystemStorage({str(tmp_path / "store")!r}, dedup=True)
        for i in range(2000):
            c = f"c{{i}}"
            s.add(c, [Message(new_id(), b"x", c, 5)])
            [m] = s.take(c, 1)
            s.ack([m])
        s.maintain()
        s.close()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # this process untouched


def test_breach7_a_max_payload_the_reader_refuses_is_refused_at_start(tmp_path: Path) -> None:
    """(breach 7) max_payload above what a batch file can hold fails at open."""
    with pytest.raises(InvalidMessage, match="largest payload a batch file can hold"):
        FilesystemStorage(str(tmp_path), max_payload=batchfile.MAX_PAYLOAD + 1)
    FilesystemStorage(str(tmp_path), max_payload=batchfile.MAX_PAYLOAD).close()
    assert batchfile.MAX_PAYLOAD + 16 + 255 + 65535 + 4 <= batchfile.MAX_BODY


def test_breach8_ids_is_synced_into_its_parent(tmp_path: Path) -> None:
    """(breach 8) A crash right after a store made ids/ keeps it."""
    disk = FaultyDisk(stash=str(tmp_path / "stash"))
    FilesystemStorage(str(tmp_path / "store"), dedup=True, disk=disk)
    disk.crash()
    assert (tmp_path / "store" / "ids").is_dir()


def test_prune_at_open_does_not_trust_a_clock_that_jumped(tmp_path: Path) -> None:
    """A store opened once with its clock 30 days ahead forgets no ids."""
    root = str(tmp_path / "store")
    sent = make(3)
    with FilesystemStorage(root, dedup=True) as store:
        store.add(Q, sent)
    FilesystemStorage(root, dedup=True, clock=lambda: time.time() + 30 * 86400).close()
    with FilesystemStorage(root, dedup=True) as store:
        assert store.add(Q, sent) == []


def test_leases_across_a_wall_clock_step(tmp_path: Path) -> None:
    """Leases are wall-clock times shared by processes: a step forward past
    a lease hands the message out again (never loses it, and either ack
    counts); a step back holds it longer until it is released."""
    clock = Clock()
    root = str(tmp_path / "store")
    a = FilesystemStorage(root, clock=clock, lease=60)
    b = FilesystemStorage(root, clock=clock, lease=60)
    a.add(Q, make(1))
    [m] = a.take(Q, 1)
    clock.now += 3600  # forward step
    [again] = b.take(Q, 1)
    assert again.id == m.id
    a.ack([m])
    b.ack([again])
    assert b.take(Q, 1) == []
    a.add(Q, make(1))
    [m] = a.take(Q, 1)
    clock.now -= 7200  # backward step: the lease now runs two hours longer
    assert b.take(Q, 1) == []
    a.release([m])
    assert [x.id for x in b.take(Q, 1)] == [m.id]
    a.close()
    b.close()


def test_upkeep_removes_drained_idle_channels_and_takers_follow(tmp_path: Path) -> None:
    """A channel with nothing left and no add for a while loses its directory
    (channel_count follows the live channels); a taker that held the old
    lock file takes the new one, and the channel works as before."""
    clock = Clock()
    root = str(tmp_path / "store")
    store = FilesystemStorage(root, dedup=True, clock=clock)
    consumer = FilesystemStorage(root, clock=clock)
    for name in ("busy", "idle"):
        store.add(name, [Message(new_id(), b"x", name, 5)])
    [m] = consumer.take("idle", 1)
    consumer.ack([m])
    store.add("busy", [Message(new_id(), b"later", "busy", 5)])
    store.maintain()  # the checkpoint passes the idle channel's bucket
    clock.now += 3600
    consumer.take("idle", 1)  # removes the finished bucket
    assert store.channel_count() == 2
    assert store.remove_idle_queues(idle=600) == 1
    assert store.channel_count() == 1 and store.queue_names() == ["busy"]
    # The consumer's view still holds the removed lock file.
    again = Message(new_id(), b"y", "idle", 5)
    store.add("idle", [again])
    assert [x.id for x in consumer.take("idle", 5)] == [again.id]
    assert store.remove_idle_queues(idle=0) == 0  # not drained: kept
    store.close()
    consumer.close()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_watch_survives_the_removal_of_an_idle_channel(tmp_path: Path) -> Any:
    store = FilesystemStorage(str(tmp_path / "store"))
    woken: list[int] = []
    stop = store.watch("idle", lambda: woken.append(1), reactor)
    try:
        assert store.remove_idle_queues(idle=0) == 1
        yield task.deferLater(reactor, 0.2, lambda: None)
        woken.clear()
        store.add("idle", [Message(new_id(), b"x", "idle", 5)])
        yield until(lambda: woken, timeout=5)
    finally:
        stop()
        store.close()
