"""The client's sender: its decisions as plain functions, then the sender itself.

The fast tests drive ``DestinationSender`` in virtual time: a
``MemoryStorage`` spool, a fake transport or an in-memory stub server, and a
``MemoryReactorClock``; no socket, no thread, no real second.  The tests at
the end run it against a real server socket (``slow``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import Server, until
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

import dropr
from dropr._ids import id_at, new_ids
from dropr._message import Message
from dropr.client import _sendpolicy as policy
from dropr.client._sender import DestinationSender, thread_pool_runner
from dropr.client._transport import BatchTooLarge, DestinationUnavailable, HTTPTransport
from dropr.interfaces import ITransport, SendResult
from dropr.server._receiver import Limits
from dropr.testing import (
    FakeTransport,
    MemoryStorage,
    StubServer,
    free_port,
    refused,
    run_now,
    stored,
)

DEST = "http://central:8080/"


def messages(n: int, size: int = 10, created: float | None = None) -> list[Message]:
    ids = new_ids(n) if created is None else [id_at(created + i / 1000) for i in range(n)]
    return [Message(i, b"%0*d" % (size, k), "orders", 5, DEST) for k, i in enumerate(ids)]


# -- the decisions -----------------------------------------------------------------


def test_split_too_old_keeps_what_is_within_the_age() -> None:
    now = time.time()
    old = messages(2, created=now - 100)
    young = messages(1, created=now - 10)
    fresh, too_old = policy.split_too_old(old + young, now, max_age=60)
    assert (fresh, too_old) == (young, old)
    assert "maximum age of 60 s" in policy.too_old_reason(DEST, 60)


def test_trim_to_bytes_keeps_the_longest_head_and_always_the_first() -> None:
    batch = messages(5, size=100)
    assert policy.trim_to_bytes(batch, 250) == (batch[:2], batch[2:])
    assert policy.trim_to_bytes(batch, 500) == (batch, [])
    # One message larger than the limit still goes, alone: the server judges it.
    assert policy.trim_to_bytes(batch, 10) == (batch[:1], batch[1:])
    assert policy.trim_to_bytes([], 10) == ([], [])


def test_sort_answer_groups_refusals_by_reason_and_retries_the_unanswered() -> None:
    a, b, c, d, e = messages(5)
    results = [
        SendResult(a.id, True),
        SendResult(b.id, False, "bad channel", permanent=True),
        SendResult(c.id, False, "busy"),
        SendResult(d.id, False, "bad channel", permanent=True),
    ]  # e is not in the answer
    answer = policy.sort_answer([a, b, c, d, e], results)
    assert answer.stored == [a]
    assert answer.refused == {"bad channel": [b, d]}
    assert answer.retry == [c, e]
    assert answer.failed == 2


def test_next_step_backs_off_only_when_nothing_moved() -> None:
    a, b = messages(2)
    assert policy.next_step(policy.Answer(stored=[a])) is policy.Next.SENT
    assert policy.next_step(policy.Answer(stored=[a], retry=[b])) is policy.Next.AGAIN
    assert policy.next_step(policy.Answer(refused={"x": [a]}, retry=[b])) is policy.Next.AGAIN
    assert policy.next_step(policy.Answer(retry=[a, b])) is policy.Next.BACKOFF


def test_backoff_doubles_up_to_the_cap_with_jitter_from_the_random_source() -> None:
    top = 0.999999
    assert [policy.backoff_delay(n, 0.5, 10, lambda: top) for n in (1, 2, 3, 6)] == [
        pytest.approx(0.5),
        pytest.approx(1.0),
        pytest.approx(2.0),
        pytest.approx(10.0),
    ]
    assert policy.backoff_delay(3, 0.5, 10, lambda: 0.0) == 1.0  # half of 2.0
    assert policy.smaller_batch(1000) == 500
    assert policy.smaller_batch(1) == 1


# -- DestinationSender in virtual time ------------------------------------------------


class Rig:
    """A sender to DEST on a memory spool, a fake clock and ``transport``."""

    def __init__(self, transport: Any, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        self.spool = MemoryStorage(clock=self.clock.seconds)
        self.transport = transport
        self.jitter = 1.0 - 1e-9
        options.setdefault("backoff_base", 1.0)
        self.sender = DestinationSender(
            self.spool,
            DEST,
            transport,
            self.clock,
            run_now,
            clock=self.clock.seconds,
            random=lambda: self.jitter,
            **options,
        )

    def put(self, n: int, size: int = 10) -> list[Message]:
        batch = messages(n, size, created=self.clock.seconds())
        self.spool.add(DEST, batch)
        return batch

    def waiting(self) -> int:
        return self.spool.usage()[0]

    def failed(self) -> list[tuple[Message, str]]:
        return self.spool.failed(DEST, 1000)


def test_sender_delivers_everything_in_order_in_batches() -> None:
    rig = Rig(FakeTransport(), max_batch=3)
    sent = rig.put(7)
    rig.sender.wake()
    batches = [ms for _, ms in rig.transport.sent]
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [m.id for b in batches for m in b] == [m.id for m in sent]
    assert rig.waiting() == 0 and rig.sender.state == "idle"
    assert (rig.sender.sent, rig.sender.stored, rig.sender.failed) == (7, 7, 0)
    assert rig.clock.getDelayedCalls() == []


def test_sender_keeps_batches_within_the_byte_limit() -> None:
    rig = Rig(FakeTransport(), max_batch_bytes=250)
    rig.put(5, size=100)
    rig.sender.wake()
    assert [len(ms) for _, ms in rig.transport.sent] == [2, 2, 1]


def test_refused_messages_fail_with_the_reason_and_are_not_sent_again() -> None:
    rig = Rig(FakeTransport(refused("invalid channel name")))
    sent = rig.put(2)
    rig.sender.wake()
    assert [(m.id, why) for m, why in rig.failed()] == [
        (m.id, "invalid channel name") for m in sent
    ]
    assert len(rig.transport.sent) == 1 and rig.waiting() == 0


def test_too_old_messages_fail_without_being_sent() -> None:
    rig = Rig(FakeTransport(), max_age=60)
    old = rig.put(2)
    rig.clock.advance(61)
    young = rig.put(1)
    rig.sender.wake()
    assert [m.id for m, _ in rig.failed()] == [m.id for m in old]
    assert "maximum age of 60 s" in rig.failed()[0][1]
    assert [m.id for _, ms in rig.transport.sent for m in ms] == [young[0].id]


def test_an_unreachable_server_means_backoff_growing_to_the_cap_and_nothing_lost() -> None:
    def unreachable(destination: str, ms: Sequence[Message]) -> list[SendResult]:
        raise DestinationUnavailable("connection refused")

    rig = Rig(FakeTransport(unreachable), backoff_base=1.0, backoff_cap=4.0)
    rig.put(3)
    rig.sender.wake()
    waits = []
    for _ in range(5):
        assert rig.sender.state == "backoff"
        [call] = rig.clock.getDelayedCalls()
        waits.append(round(call.getTime() - rig.clock.seconds(), 3))
        rig.clock.advance(call.getTime() - rig.clock.seconds())
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert "connection refused" in rig.sender.last_error
    assert rig.waiting() == 3 and rig.failed() == []
    # The server is back: the next retry delivers, and the backoff starts over.
    rig.transport.answer = stored
    rig.clock.advance(4.0)
    assert rig.waiting() == 0 and rig.sender.state == "idle" and rig.sender.failures == 0


def test_jitter_comes_from_the_injected_random_source() -> None:
    def unreachable(destination: str, ms: Sequence[Message]) -> list[SendResult]:
        raise DestinationUnavailable("down")

    rig = Rig(FakeTransport(unreachable), backoff_base=8.0)
    rig.jitter = 0.0
    rig.put(1)
    rig.sender.wake()
    [call] = rig.clock.getDelayedCalls()
    assert call.getTime() - rig.clock.seconds() == pytest.approx(4.0)


def test_a_wake_cuts_a_backoff_short_only_when_forced() -> None:
    rig = Rig(FakeTransport(refused("x")))
    rig.transport.answer = lambda d, ms: [SendResult(m.id, False, "busy") for m in ms]
    rig.put(1)
    rig.sender.wake()
    assert rig.sender.state == "backoff" and len(rig.transport.sent) == 1
    rig.sender.wake()
    assert len(rig.transport.sent) == 1
    rig.transport.answer = stored
    rig.sender.wake(force=True)
    assert len(rig.transport.sent) == 2 and rig.waiting() == 0
    assert rig.clock.getDelayedCalls() == []


def test_a_batch_too_large_is_halved_and_a_single_one_fails() -> None:
    def limit(destination: str, ms: Sequence[Message]) -> list[SendResult]:
        if sum(len(m.payload) for m in ms) > 300:
            raise BatchTooLarge("request body too large")
        return stored(destination, ms)

    rig = Rig(FakeTransport(limit), max_batch=8)
    rig.put(8, size=100)
    huge = rig.put(1, size=400)
    rig.sender.wake()
    assert rig.sender.max_batch == 2  # 8 → 4 → 2 messages of 100 bytes fit in 300
    assert rig.sender.stored == 8
    [(m, why)] = rig.failed()
    assert m.id == huge[0].id and "too large for" in why


def test_messages_put_while_a_batch_is_in_flight_follow_it() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=10)
    first = rig.put(2)
    rig.sender.wake()
    later = rig.put(2)
    rig.sender.wake()  # running: noted, not a second batch in flight
    [pending] = rig.transport.pending
    assert [m.id for m in pending.messages] == [m.id for m in first]
    pending.answer()
    [_, pending2] = rig.transport.pending
    assert [m.id for m in pending2.messages] == [m.id for m in later]
    pending2.answer()
    assert rig.waiting() == 0 and rig.sender.state == "idle"


def test_a_failed_send_gives_the_batch_and_the_prefetched_one_back_in_order() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=2)
    sent = rig.put(4)
    rig.sender.wake()
    rig.transport.pending[0].fail()
    assert rig.sender.state == "backoff"
    rig.transport.hold = False
    rig.clock.advance(1.0)
    later = [m.id for _, ms in rig.transport.sent[1:] for m in ms]
    assert later == [m.id for m in sent]
    assert rig.waiting() == 0


def put_on(rig: Rig, channel: str, n: int) -> list[Message]:
    batch = [
        Message(m.id, m.payload, channel, m.priority, DEST)
        for m in messages(n, created=rig.clock.seconds())
    ]
    rig.spool.add(DEST, batch)
    return batch


def test_batches_of_other_channels_fly_together_and_a_channel_waits_for_its_own() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=2)
    a1, b1, a2 = put_on(rig, "a", 2), put_on(rig, "b", 2), put_on(rig, "a", 2)
    rig.sender.wake()
    # a1 and b1 are on the wire together; a2 waits for a1 (same channel).
    assert [[m.id for m in p.messages] for p in rig.transport.pending] == [
        [m.id for m in a1],
        [m.id for m in b1],
    ]
    rig.transport.pending[1].answer()  # b1 first: a2 still waits for a1
    assert len(rig.transport.pending) == 2
    rig.transport.pending[0].answer()
    [_, _, p3] = rig.transport.pending
    assert [m.id for m in p3.messages] == [m.id for m in a2]
    p3.answer()
    assert rig.waiting() == 0 and rig.sender.state == "idle"
    assert rig.sender.stored == 6


def test_at_most_max_in_flight_batches_fly_at_once() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=1, max_in_flight=2)
    for channel in ("a", "b", "c"):
        put_on(rig, channel, 1)
    rig.sender.wake()
    assert len(rig.transport.pending) == 2
    rig.transport.pending[0].answer()
    assert len(rig.transport.pending) == 3
    rig.transport.pending[1].answer()
    rig.transport.pending[2].answer()
    assert rig.waiting() == 0


def test_a_failed_batch_with_another_in_flight_keeps_each_channel_in_order() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=2)
    a1, b1, a2, b2 = (put_on(rig, c, 2) for c in ("a", "b", "a", "b"))
    rig.sender.wake()
    first, second = rig.transport.pending
    first.fail()  # a1 fails while b1 is in flight; a2 must not go before it
    assert len(rig.transport.pending) == 2
    second.answer()  # b1 stored
    assert rig.sender.state == "backoff"
    rig.transport.hold = False
    rig.clock.advance(1.0)
    assert rig.waiting() == 0
    sent = [m for _, ms in rig.transport.sent for m in ms]
    for channel, expected in (("a", a1 + a2), ("b", b1 + b2)):
        stored_order = [m.id for m in sent if m.channel == channel]
        # b1 once; a1 twice (failed, then sent again), each time before a2.
        assert sorted(set(stored_order), key=stored_order.index) == [m.id for m in expected]
    assert rig.sender.stored == 8


def test_a_partly_answered_batch_goes_again_before_the_next_of_its_channel() -> None:
    rig = Rig(FakeTransport(hold=True), max_batch=2)
    a1, _b1, a2 = put_on(rig, "a", 2), put_on(rig, "b", 2), put_on(rig, "a", 2)
    rig.sender.wake()
    first, second = rig.transport.pending
    first.deferred.callback([SendResult(a1[0].id, True), SendResult(a1[1].id, False, "busy")])
    rig.transport.hold = False
    second.answer()
    assert rig.waiting() == 0
    order = [m.id for _, ms in rig.transport.sent for m in ms if m.channel == "a"]
    assert order == [a1[0].id, a1[1].id, a1[1].id, a2[0].id, a2[1].id]


def test_stop_cancels_a_send_that_outlives_the_grace() -> None:
    rig = Rig(FakeTransport(hold=True))
    rig.put(2)
    rig.sender.wake()
    stopped = rig.sender.stop(grace=5.0)
    assert not stopped.called
    rig.clock.advance(5.0)
    assert stopped.called
    # Cut short, the batch stays in the spool to be sent again.
    assert rig.waiting() == 2 and rig.failed() == []
    assert rig.clock.getDelayedCalls() == []


def test_sender_to_a_stub_server_stores_each_message_once() -> None:
    rig = Rig(None, max_batch=4)
    server = StubServer(clock=rig.clock.seconds)
    rig.sender.transport = server.transport
    sent = rig.put(10)
    rig.sender.wake()
    got = server.store.take("orders", 100)
    assert [m.payload for m in got] == [m.payload for m in sent]
    # A resend (a lost answer, say) is answered "stored" and not stored twice.
    again = server.transport.send(DEST, sent[:3])
    assert [r.stored for r in again.result] == [True] * 3
    assert server.store.take("orders", 100) == []


def test_a_stub_server_that_is_down_holds_messages_back() -> None:
    rig = Rig(None)
    server = StubServer(clock=rig.clock.seconds)
    rig.sender.transport = server.transport
    server.down = True
    rig.put(3)
    rig.sender.wake()
    assert rig.sender.state == "backoff" and rig.waiting() == 3
    server.down = False
    rig.clock.advance(1.0)
    assert rig.waiting() == 0 and server.store.usage() == (3, 30)


def test_the_example_in_the_api_docs_runs() -> None:
    text = (Path(__file__).parent.parent / "docs" / "api.rst").read_text(encoding="utf-8")
    start = text.index("virtual time: a memory spool")
    block = text[text.index("::\n\n", start) + 3 : text.index(".. automodule:: dropr.testing")]
    code = "\n".join(line[4:] for line in block.splitlines())
    exec(compile(code, "docs/api.rst", "exec"), {})


def test_fake_transport_provides_itransport() -> None:
    assert verifyObject(ITransport, FakeTransport())
    assert verifyObject(ITransport, StubServer().transport)


# -- against a real server socket (slow) ------------------------------------------------


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


def sender(spool: dropr.Spool, url: str, t: HTTPTransport, p: ThreadPool, **kw: Any) -> Any:
    return DestinationSender(
        spool.storage, url, t, reactor, thread_pool_runner(reactor, p), backoff_base=0.05, **kw
    )


def test_http_transport_provides_itransport(transport: HTTPTransport) -> None:
    assert verifyObject(ITransport, transport)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_refused_messages_move_to_failed_with_the_servers_reason(
    tmp_path: Path, pool: ThreadPool, transport: HTTPTransport
) -> Any:
    server = Server(tmp_path, Limits())
    spool = dropr.Spool(str(tmp_path / "spool"))
    try:
        # An id dated ten days ago is older than the server's dedup window.
        old = Message(id_at(time.time() - 10 * 86400), b"late", "orders", 5, server.url)
        spool.storage.add(server.url, [old])
        spool.put(b"fine", server.url, "orders")
        s = sender(spool, server.url, transport, pool, max_age=30 * 86400)
        s.wake()
        yield until(lambda: len(spool.failed(server.url)) == 1)
        [(m, reason)] = spool.failed(server.url)
        assert m.id == old.id and "older than this server's dedup window" in reason
        assert [x.payload for x in server.storage.take("orders", 10)] == [b"fine"]
        yield until(lambda: spool.take(server.url, 10) == [])  # "fine" acked
    finally:
        spool.close()
        yield server.stop()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_dead_destination_does_not_delay_another(
    tmp_path: Path, pool: ThreadPool, transport: HTTPTransport
) -> Any:
    server = Server(tmp_path, Limits())
    dead = f"http://127.0.0.1:{free_port()}/"
    spool = dropr.Spool(str(tmp_path / "spool"))
    try:
        spool.put_many([b"d%d" % i for i in range(10)], dead, "orders")
        spool.put_many([b"a%d" % i for i in range(10)], server.url, "orders")
        to_dead = sender(spool, dead, transport, pool)
        to_live = sender(spool, server.url, transport, pool)
        started = time.monotonic()
        to_dead.wake()
        to_live.wake()
        yield until(lambda: server.depth() == 10)
        assert time.monotonic() - started < 2.0
        yield until(lambda: to_dead.failures >= 2)  # backing off, retrying
        assert to_dead.state == "backoff" and "ConnectionRefused" in to_dead.last_error
        assert spool.stats()[dead].depth == 10  # all kept, none failed
        yield to_dead.stop()
    finally:
        spool.close()
        yield server.stop()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_batches_too_large_for_the_server_are_split(
    tmp_path: Path, pool: ThreadPool, transport: HTTPTransport
) -> Any:
    server = Server(tmp_path, Limits(max_request_bytes=30_000))
    spool = dropr.Spool(str(tmp_path / "spool"))
    try:
        payloads = [b"%0999d" % i for i in range(100)]  # 100 kB in all
        spool.put_many(payloads, server.url, "orders")
        s = sender(spool, server.url, transport, pool, max_batch=100)
        s.wake()
        yield until(lambda: server.depth() == 100, 20)
        assert s.max_batch < 30
        got = server.storage.take("orders", 200)
        assert [m.payload for m in got] == payloads  # in order, each once
        yield s.stop()
    finally:
        spool.close()
        yield server.stop()
