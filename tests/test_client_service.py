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
from dropr.client.tap import ClientService, Options
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
