"""The client daemon's service tree on fakes: a spool, a fake transport, a fake clock.

The spool is real (files in tmp_path); the reactor is a MemoryReactorClock,
the transport a FakeTransport and the disk runner run_now, so rescans and
senders run in virtual time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.client._putlog import PutLog, segments
from dropr.client.tap import ClientService, Options
from dropr.errors import StorageFull
from dropr.interfaces import SendResult
from dropr.testing import FakeTransport, run_now

A = "http://a.example:8080/"
B = "http://b.example:8080/"


def service(tmp_path: Path, transport: Any) -> tuple[ClientService, MemoryReactorClock]:
    options = Options()
    options.parseOptions(["--spool", str(tmp_path / "spool"), "--rescan", "5"])
    clock = MemoryReactorClock()
    spool = dropr.Spool(options["spool"], daemon=True)
    client = ClientService(spool, transport, clock, options)
    client.run_on_disk = run_now
    return client, clock


def sent_to(transport: FakeTransport, destination: str) -> list[bytes]:
    return [m.payload for d, ms in transport.sent if d == destination for m in ms]


def test_each_destination_gets_its_sender_and_a_rescan_finds_new_messages(
    tmp_path: Path,
) -> None:
    transport = FakeTransport()
    client, clock = service(tmp_path, transport)
    with dropr.Spool(str(tmp_path / "spool")) as producer:
        producer.put_many([b"a1", b"a2"], A)
        producer.put(b"b1", B)
        client.startService()
        try:
            assert sorted(client.senders) == [A, B]
            assert sent_to(transport, A) == [b"a1", b"a2"]
            assert sent_to(transport, B) == [b"b1"]
            producer.put(b"a3", A)
            assert sent_to(transport, A) == [b"a1", b"a2"]
            clock.advance(5)  # the rescan, where the pipe's poke did not reach
            assert sent_to(transport, A) == [b"a1", b"a2", b"a3"]
            assert client.storage.usage()[0] == 0
        finally:
            client.stopService()
    assert transport.closed


def test_a_failing_destination_backs_off_alone(tmp_path: Path) -> None:
    def answer(destination: str, messages: Any) -> Any:
        if destination == A:
            raise dropr.DroprError("connection refused")
        return [SendResult(m.id, True) for m in messages]

    transport = FakeTransport(answer)
    client, _ = service(tmp_path, transport)
    with dropr.Spool(str(tmp_path / "spool")) as producer:
        producer.put(b"a1", A)
        producer.put(b"b1", B)
        client.startService()
        try:
            assert client.senders[A].state == "backoff"
            assert client.senders[B].state == "idle"
            assert client.spool.stats()[A].depth == 1
            assert sent_to(transport, B) == [b"b1"]
            assert client.storage.usage()[0] == 1
        finally:
            client.stopService()


def answered_in_log(spool_path: str, payloads: list[bytes], destination: str) -> list[str]:
    """Puts a daemon answered and had in its put log when it died."""
    log = PutLog(spool_path)
    log.open()
    messages = [Message(new_id(), p, "common", 5, destination) for p in payloads]
    log.append(messages)
    return [m.id for m in messages]


def test_what_a_crash_left_in_the_put_log_is_sent_first(tmp_path: Path) -> None:
    transport = FakeTransport()
    client, _ = service(tmp_path, transport)
    answered_in_log(client.spool.path, [b"a1", b"a2"], A)
    with dropr.Spool(str(tmp_path / "spool"), put_socket=False) as producer:
        producer.put(b"a3", A)  # written by the producer after the daemon died
    client.startService()
    try:
        assert client.put_socket.parent is client  # listening once the log is moved
        assert sent_to(transport, A) == [b"a1", b"a2", b"a3"]
        assert len(segments(client.spool.path)) == 1  # a new, current segment
    finally:
        client.stopService()
    assert segments(client.spool.path) == []


def test_a_put_log_that_cannot_be_moved_keeps_the_socket_shut(tmp_path: Path) -> None:
    transport = FakeTransport()
    client, clock = service(tmp_path, transport)
    answered_in_log(client.spool.path, [b"a1"], A)
    real = client.front.file_in_order

    def full(*args: Any) -> None:
        raise StorageFull("the spool's disk is full")

    client.front.file_in_order = full  # type: ignore[method-assign]
    client.startService()
    try:
        assert client.put_socket.parent is None and transport.sent == []
        clock.advance(5)
        assert client.put_socket.parent is None  # still full
        client.front.file_in_order = real  # type: ignore[method-assign]
        clock.advance(5)  # the rescan tries again
        assert client.put_socket.parent is client
        assert sent_to(transport, A) == [b"a1"]
    finally:
        client.stopService()


def test_puts_for_a_destination_that_fails_move_into_the_spool(tmp_path: Path) -> None:
    def answer(destination: str, messages: Any) -> Any:
        raise dropr.DroprError("connection refused")

    transport = FakeTransport(answer)
    client, _ = service(tmp_path, transport)
    client.startService()
    try:
        first = [Message(new_id(), b"a%d" % i, "common", 5, A) for i in range(3)]
        client.wake_destinations(client.front.offer(first, client.putlog.append(first)))
        # Sent, not delivered, given back: into the spool, where they show.
        assert client.senders[A].state == "backoff"
        assert client.front.held() == (0, 0) and client.putlog.needed == 0
        assert client.spool.stats()[A].depth == 3
        # Arriving while their sender backs off: the same, at once.
        later = [Message(new_id(), b"b", "common", 5, A)]
        client.wake_destinations(client.front.offer(later, client.putlog.append(later)))
        assert client.front.held() == (0, 0) and client.spool.stats()[A].depth == 4
        assert len(transport.sent) == 1  # no new attempt before the backoff ends
    finally:
        client.stopService()
    with dropr.Spool(str(tmp_path / "spool"), daemon=True) as spool:
        assert [m.id for m in spool.take(A, 10)] == [m.id for m in first + later]


def test_at_the_stop_what_memory_holds_moves_into_the_spool(tmp_path: Path) -> None:
    def answer(destination: str, messages: Any) -> Any:
        raise dropr.DroprError("connection refused")

    transport = FakeTransport(answer)
    client, _ = service(tmp_path, transport)
    client.startService()
    messages = [Message(new_id(), b"a%d" % i, "common", 5, A) for i in range(2)]
    client.wake_destinations(client.front.offer(messages, client.putlog.append(messages)))
    client.stopService()
    assert segments(client.spool.path) == []
    with dropr.Spool(str(tmp_path / "spool"), daemon=True) as spool:
        assert [m.id for m in spool.take(A, 10)] == [m.id for m in messages]
