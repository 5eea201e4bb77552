"""dropr-server's HTTP side: limits, bad input, dedup, answers.

The first tests run a server on a real socket in the test's reactor; the
unit tier below drives the site through a StringTransport, with a Clock
for time and the store's work done at once, without threads.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from inprocess import Server
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dropr._ids import new_id
from dropr._message import Message
from dropr.daemon._auth import NOT_AUTHENTICATED, Authenticator, Credentials, sign_request
from dropr.errors import InvalidMessage, StorageFull, StorageIOError
from dropr.server._answers import (
    STORE_FULL,
    Refusal,
    error_response,
    is_canonical_path,
    refusal_for,
    single_message_args,
)
from dropr.server._fds import NotEnoughDescriptors, plan_connections
from dropr.server._receiver import Limits
from dropr.server._resource import INLINE_MAX_BYTES, StorePlacement, make_site
from dropr.server._site import SMALL_BODY
from dropr.server._stats import CappedStats
from dropr.storage._spec import open_store
from dropr.wire import CONTENT_TYPE, WireError, encode_batch


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, Limits(max_request_bytes=200_000, max_messages=50, max_payload=10_000))
    yield s
    pytest_twisted.blockon(s.stop())


def msgs(n: int, channel: str = "orders", size: int = 10, priority: int = 5) -> list[Message]:
    return [Message(new_id(), b"%0*d" % (size, i), channel, priority) for i in range(n)]


def post(url: str, body: bytes, content_type: str = CONTENT_TYPE, **kw: Any) -> Any:
    return treq.post(url, data=body, headers={"Content-Type": [content_type]}, **kw)


@pytest_twisted.inlineCallbacks
def test_batch_is_stored_and_answered_per_id(server: Server) -> Any:
    batch = msgs(10) + msgs(5, "audit", priority=1)
    response = yield post(server.url, encode_batch(batch))
    assert response.code == 200
    answer = json.loads((yield response.content()))
    assert sorted(answer["stored"]) == sorted(m.id for m in batch)
    assert answer["rejected"] == {}
    assert server.depth() == 15


@pytest_twisted.inlineCallbacks
def test_resend_after_consumption_is_stored_once(server: Server) -> Any:
    batch = msgs(3)
    body = encode_batch(batch)
    yield (yield post(server.url, body)).content()
    taken = yield_take = server.storage.take("orders", 10)
    assert len(yield_take) == 3
    server.storage.ack(taken)
    response = yield post(server.url, body)
    answer = json.loads((yield response.content()))
    assert sorted(answer["stored"]) == sorted(m.id for m in batch)  # "stored" again
    assert server.storage.take("orders", 10) == []  # but not stored twice


@pytest_twisted.inlineCallbacks
def test_bad_fields_are_rejected_one_by_one(server: Server) -> Any:
    good = msgs(2)
    bad_channel = Message(new_id(), b"x", "ok", 5)
    bad_priority = Message(new_id(), b"y", "orders", 5)
    body = bytearray(encode_batch([*good, bad_channel, bad_priority]))
    # Patch the records in place (fixing their checksums) to carry what the
    # Message class itself would refuse: a channel "../x" and priority 12.
    body = _rewrite(body, 2, channel=b"..")
    body = _rewrite(body, 3, priority=12)
    response = yield post(server.url, bytes(body))
    answer = json.loads((yield response.content()))
    assert sorted(answer["stored"]) == sorted(m.id for m in good)
    assert "invalid channel" in answer["rejected"][bad_channel.id]
    assert "invalid priority 12" in answer["rejected"][bad_priority.id]
    assert server.storage.queues() == ["orders"]


def _rewrite(body: bytearray, index: int, **change: Any) -> bytearray:
    import zlib

    pos = 8
    for _ in range(index):
        (length,) = struct.unpack_from(">I", body, pos)
        pos += 4 + length + 4
    (length,) = struct.unpack_from(">I", body, pos)
    record = bytearray(body[pos + 4 : pos + 4 + length])
    raw_id, priority, clen, dlen = struct.unpack_from(">16sBBH", record)
    rest = record[20 + clen :]
    channel = bytes(record[20 : 20 + clen])
    channel = change.get("channel", channel)
    priority = change.get("priority", priority)
    new = struct.pack(">16sBBH", raw_id, priority, len(channel), dlen) + channel + rest
    frame = struct.pack(">I", len(new)) + new + struct.pack(">I", zlib.crc32(new))
    return body[:pos] + frame + body[pos + 4 + length + 4 :]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"hello", "not a dropr batch"),
        (encode_batch(msgs(2))[:-3], "ends inside"),
        (encode_batch(msgs(1))[:-1] + b"\x00", "checksum mismatch"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_malformed_bodies_get_400_and_change_nothing(
    server: Server, body: bytes, reason: str
) -> Any:
    response = yield post(server.url, body)
    assert response.code == 400
    answer = json.loads((yield response.content()))
    assert reason in answer["error"]
    # Damaged bytes may be a transit fault: the sender is told to try again
    # rather than to fail the messages for good.
    assert answer.get("retry", False) is (reason == "checksum mismatch")
    assert server.depth() == 0


@pytest_twisted.inlineCallbacks
def test_too_many_messages_or_too_large_payload_get_413(server: Server) -> Any:
    response = yield post(server.url, encode_batch(msgs(51)))
    assert response.code == 413
    assert "more than 50 messages" in json.loads((yield response.content()))["error"]
    # Just over the payload limit: that message alone is refused, for good.
    [big] = msgs(1, size=10_001)
    response = yield post(server.url, encode_batch([big, *msgs(1)]))
    answer = json.loads((yield response.content()))
    assert "exceeds this server's maximum" in answer["rejected"][big.id]
    assert len(answer["stored"]) == 1
    # A record far beyond any message this server takes: refused unread.
    response = yield post(server.url, encode_batch(msgs(1, size=100_000)))
    assert response.code == 413
    assert "largest message" in json.loads((yield response.content()))["error"]
    assert server.depth() == 1


@pytest_twisted.inlineCallbacks
def test_oversized_body_is_refused_before_it_is_read(server: Server) -> Any:
    """The answer comes after the headers alone; the body is never sent."""
    result: dict[str, bytes] = {}

    def client() -> None:
        with socket.create_connection(("127.0.0.1", int(server.url.split(":")[2][:-1]))) as s:
            s.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: "
                + CONTENT_TYPE.encode()
                + b"\r\nContent-Length: 100000000\r\n\r\n"
            )
            s.settimeout(10)
            data = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass  # the server hung up, as it should; what it said is in data
            result["answer"] = data

    thread = threading.Thread(target=client)
    thread.start()
    yield _wait_thread(thread)
    assert result["answer"].startswith(b"HTTP/1.1 413")
    assert b"larger than this server's limit" in result["answer"]
    assert server.depth() == 0


def _wait_thread(thread: threading.Thread) -> Any:
    from twisted.internet import task

    async def wait() -> None:
        while thread.is_alive():
            await task.deferLater(reactor, 0.01, lambda: None)

    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(wait())


@pytest_twisted.inlineCallbacks
def test_full_store_answers_507_and_stores_nothing(tmp_path: Path) -> Any:
    server = Server(tmp_path, Limits(), max_messages=5)
    try:
        response = yield post(server.url, encode_batch(msgs(4)))
        assert response.code == 200
        yield response.content()
        response = yield post(server.url, encode_batch(msgs(4)))
        assert response.code == 507
        assert "is full" in json.loads((yield response.content()))["error"]
        assert server.depth() == 4
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_single_message_by_query_string_and_bad_query(server: Server) -> Any:
    response = yield post(server.url + "?channel=jobs&priority=0", b"raw", "text/plain")
    answer = json.loads((yield response.content()))
    assert len(answer["stored"]) == 1
    [m] = server.storage.take("jobs", 10)
    assert (m.payload, m.priority, m.id) == (b"raw", 0, answer["stored"][0])
    for query, reason in [
        ("?channel=../../etc", "invalid channel"),
        ("?priority=-1", "invalid priority"),
        ("?priority=x", "invalid priority"),
        ("?id=zz", "invalid id"),
    ]:
        response = yield post(server.url + query, b"raw", "text/plain")
        assert response.code == 400
        assert reason in json.loads((yield response.content()))["error"]


@pytest_twisted.inlineCallbacks
def test_health_and_unknown_paths(server: Server) -> Any:
    response = yield treq.get(server.url + "health")
    assert json.loads((yield response.content())) == {"status": "ok"}
    response = yield treq.get(server.url + "nope")
    assert response.code == 404
    yield response.content()
    response = yield post(server.url + "elsewhere", encode_batch(msgs(1)))
    assert response.code == 404
    yield response.content()


@pytest_twisted.inlineCallbacks
def test_a_form_body_is_a_payload_not_a_form(server: Server) -> Any:
    """curl's default content type must not let the body rewrite the query."""
    body = b"channel=evil&priority=0&id=" + b"1" * 32
    response = yield post(
        server.url + "?channel=orders&priority=3", body, "application/x-www-form-urlencoded"
    )
    answer = json.loads((yield response.content()))
    assert len(answer["stored"]) == 1
    [m] = server.storage.take("orders", 10)
    assert (m.payload, m.priority, m.id) == (body, 3, answer["stored"][0])
    assert server.storage.queues() == ["orders"]


@pytest_twisted.inlineCallbacks
def test_an_id_twice_in_one_request_is_stored_once(server: Server) -> Any:
    [first] = msgs(1)
    twin = Message(first.id, b"other payload", "audit", 1)
    response = yield post(server.url, encode_batch([first, twin]))
    answer = json.loads((yield response.content()))
    assert answer["stored"] == [first.id]
    assert "appears twice" in answer["rejected"][first.id]
    [m] = server.storage.take("orders", 10)
    assert (m.payload, m.channel, m.priority) == (first.payload, "orders", 5)
    assert server.storage.take("audit", 10) == []


# --- the unit tier: the site on a StringTransport, time on a Clock ----------------


class FakeReactor(Clock):
    """A clock whose "threads" run at once, in the caller."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class SyncPool:
    """A thread pool that runs its work at once (for deferToThreadPool)."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Wire:
    """A dropr-server site driven by hand: bytes in, bytes out, no socket, no thread."""

    def __init__(
        self,
        tmp_path: Path,
        limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        spec: str | None = None,
        **store_options: Any,
    ) -> None:
        self.clock = FakeReactor()
        self.store: Any = open_store(spec or str(tmp_path / "store"), dedup=True, **store_options)
        self.work_dir = str(tmp_path / "work")
        self.site, self.resource = make_site(
            self.store,
            limits or Limits(),
            self.clock,  # type: ignore[arg-type]
            SyncPool(),  # type: ignore[arg-type]
            self.work_dir,
            authenticator=authenticator,
        )

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, *chunks: bytes) -> tuple[int, dict[str, Any], bytes]:
        """Send ``chunks`` on a new connection; the status, JSON and raw answer."""
        channel, transport = self.connect()
        for chunk in chunks:
            channel.dataReceived(chunk)
        return parse_answer(transport.value())

    def depth(self) -> int:
        return sum(s.depth for s in self.store.stats().values())

    def close(self) -> None:
        self.store.close()


def parse_answer(raw: bytes) -> tuple[int, dict[str, Any], bytes]:
    if not raw:
        return 0, {}, raw
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"raw": body.decode("latin-1")}
    return status, data, raw


def request(
    body: bytes,
    *,
    target: bytes = b"/",
    method: bytes = b"POST",
    content_type: str = CONTENT_TYPE,
    headers: dict[str, str] | None = None,
    length: int | None = None,
) -> bytes:
    lines = [
        method + b" " + target + b" HTTP/1.1",
        b"Host: x",
        b"Content-Type: " + content_type.encode(),
    ]
    lines.append(b"Content-Length: %d" % (len(body) if length is None else length))
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


SECRET = b"s" * 16 + b"-alice"
ALICE = Credentials("alice", SECRET)


def signed(body: bytes, query: str = "", content_type: str = CONTENT_TYPE, **kw: Any) -> bytes:
    headers = sign_request(ALICE, body, query=query, content_type=content_type)
    target = b"/" + (b"?" + query.encode() if query else b"")
    return request(body, target=target, content_type=content_type, headers=headers, **kw)


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[Wire]:
    w = Wire(tmp_path)
    yield w
    w.close()


@pytest.fixture
def secured_wire(tmp_path: Path) -> Iterator[Wire]:
    w = Wire(tmp_path, authenticator=Authenticator({"alice": SECRET}))
    yield w
    w.close()


def test_answers_are_plain_functions() -> None:
    assert single_message_args({}) == ("common", 5, None)
    mid = new_id()
    args = {b"channel": [b"jobs"], b"priority": [b"1"], b"id": [mid.encode()]}
    assert single_message_args(args, signed=True) == ("jobs", 1, mid)
    with pytest.raises(InvalidMessage, match="needs id="):
        single_message_args({b"channel": [b"jobs"]}, signed=True)
    with pytest.raises(WireError, match="more than once"):
        single_message_args({b"channel": [b"a", b"b"]})
    assert refusal_for(StorageFull("/secret/path is full")) == Refusal(507, STORE_FULL)
    assert refusal_for(OSError(errno.ENOSPC, "No space left")).status == 507  # type: ignore[union-attr]
    assert refusal_for(OSError(errno.EMFILE, "Too many open files")).status == 503  # type: ignore[union-attr]
    assert refusal_for(WireError("bad", 413)) == Refusal(413, "bad")
    assert refusal_for(RuntimeError("bug")) is None
    # A failing disk is retried, and the answer keeps the store's path to itself.
    io = refusal_for(StorageIOError("/secret/path: Input/output error"))
    assert io is not None and io.status == 503 and io.retry and "/secret" not in io.reason
    for path in (b"/", b"/health", b"/health/", b"/stats"):
        assert is_canonical_path(path), path
    for path in (b"/%73tats", b"//stats", b"/./stats", b"/a/../stats", b"stats", b"/a\\b"):
        assert not is_canonical_path(path), path
    raw = error_response(Refusal(503, "busy", retry=True), {"Retry-After": "5"})
    assert parse_answer(raw)[:2] == (503, {"error": "busy", "retry": True})
    assert b"Connection: close" in raw and b"Retry-After: 5" in raw


def test_a_batch_through_the_site(wire: Wire) -> None:
    batch = msgs(3)
    status, answer, _ = wire.exchange(request(encode_batch(batch)))
    assert status == 200
    assert sorted(answer["stored"]) == sorted(m.id for m in batch)
    assert wire.depth() == 3
    assert os.listdir(wire.work_dir) == []  # the spooled body is gone


def test_other_methods_get_405_in_json(wire: Wire) -> None:
    for method in (b"PUT", b"DELETE", b"PATCH", b"TRACE"):
        status, answer, raw = wire.exchange(request(b"x" * 100, method=method))
        assert status == 405, method
        assert "is not served here" in answer["error"]
        assert b"Allow: GET, HEAD, POST" in raw
        status, answer, raw = wire.exchange(request(b"", method=method))
        assert status == 405, method
        assert "is not served here" in answer["error"]
    assert wire.depth() == 0


def test_escaped_paths_are_not_served(wire: Wire) -> None:
    assert wire.exchange(request(b"", method=b"GET", target=b"/health"))[:2] == (
        200,
        {"status": "ok"},
    )
    for target in (b"/%68ealth", b"//health", b"/./health", b"/%2e/health"):
        status, answer, _ = wire.exchange(request(b"", method=b"GET", target=target))
        assert status == 404, target
        assert "plainly" in answer["error"]
    status, _, _ = wire.exchange(request(encode_batch(msgs(1)), target=b"/%2F"))
    assert status == 404
    assert wire.depth() == 0


def test_a_slow_loris_is_answered_408_on_the_clock(tmp_path: Path) -> None:
    w = Wire(tmp_path, Limits(request_timeout=30.0))
    try:
        channel, transport = w.connect()
        channel.dataReceived(request(b"", length=100))
        for _ in range(29):  # a byte a second: never idle, never done
            w.clock.advance(1.0)
            channel.dataReceived(b"D")
        assert transport.value() == b""
        w.clock.advance(1.5)
        status, answer, _ = parse_answer(transport.value())
        assert status == 408
        assert "within 30 seconds" in answer["error"]
        assert transport.disconnecting
        assert w.depth() == 0
        assert w.site.in_flight.held == 0
    finally:
        w.close()


def test_an_unsigned_head_is_refused_before_its_body(secured_wire: Wire) -> None:
    """(attack 1) Headers alone are enough to refuse; nothing of the body is spooled."""
    w = secured_wire
    zeros = {
        "X-Dropr-Client": "alice",
        "X-Dropr-Timestamp": str(int(time.time())),
        "X-Dropr-Content-SHA256": "0" * 64,
        "X-Dropr-Signature": "0" * 64,
    }
    for headers in ({}, zeros, dict(zeros, **{"X-Dropr-Client": "nobody"})):
        channel, transport = w.connect()
        channel.dataReceived(request(b"", headers=headers, length=64 * 1024 * 1024))
        status, answer, _ = parse_answer(transport.value())
        assert status == 401
        assert answer == {"error": NOT_AUTHENTICATED}
        # What the client goes on sending is read and dropped.
        channel.dataReceived(b"D" * 1_000_000)
        assert os.listdir(w.work_dir) == []
        assert w.site.in_flight.held == 0
    assert w.depth() == 0


def test_a_body_that_is_not_the_one_signed_is_refused(secured_wire: Wire) -> None:
    body = encode_batch(msgs(2))
    raw = signed(body)
    tampered = raw[: -len(body)] + encode_batch(msgs(2))
    status, answer, _ = secured_wire.exchange(tampered)
    assert (status, answer) == (401, {"error": NOT_AUTHENTICATED})
    assert secured_wire.depth() == 0
    status, answer, _ = secured_wire.exchange(raw)
    assert status == 200 and len(answer["stored"]) == 2


def test_a_signed_single_message_needs_its_id(secured_wire: Wire) -> None:
    """(attack 2) Replayed, a signed single message is stored once."""
    status, answer, _ = secured_wire.exchange(signed(b"hello", "channel=jobs", "text/plain"))
    assert status == 400 and "needs id=" in answer["error"]
    query = f"channel=jobs&id={new_id()}"
    raw = signed(b"hello", query, "text/plain")
    for _ in range(3):  # the request, then two replays byte for byte
        status, answer, _ = secured_wire.exchange(raw)
        assert status == 200
    assert secured_wire.depth() == 1


def test_unverified_bytes_in_flight_are_capped_per_client_and_in_all(tmp_path: Path) -> None:
    limits = Limits(max_request_bytes=1000, max_unverified_per_client=1500, max_unverified=2500)
    w = Wire(tmp_path, limits, authenticator=Authenticator({"alice": SECRET}, allow_anonymous=True))
    try:
        body = encode_batch([Message(new_id(), b"x" * 900, "orders", 5)])
        raw = signed(body)
        first, first_t = w.connect()
        first.dataReceived(raw[:-10])  # all but the last bytes: held
        assert w.site.in_flight.of("alice") == len(body)
        second, second_t = w.connect()
        second.dataReceived(raw[:-10])
        status, answer, raw_answer = parse_answer(second_t.value())
        assert status == 503 and answer["retry"] is True
        assert b"Retry-After" in raw_answer
        # Anonymous requests count against the total as well.
        other, _other_t = w.connect()
        other.dataReceived(request(body)[:-10])
        assert w.site.in_flight.held == 2 * len(body)
        third, third_t = w.connect()
        third.dataReceived(request(body)[:-10])
        assert parse_answer(third_t.value())[0] == 503
        # Once a body is whole and matches its signature, it no longer counts.
        first.dataReceived(raw[-10:])
        assert parse_answer(first_t.value())[0] == 200
        assert w.site.in_flight.of("alice") == 0
        # A connection lost midway gives its bytes back.
        other.connectionLost(Failure(ConnectionDone()))
        assert w.site.in_flight.held == 0
    finally:
        w.close()


def test_a_raw_message_is_held_to_the_payload_limit_before_it_is_read(wire: Wire) -> None:
    limit = Limits().max_payload
    channel, transport = wire.connect()
    channel.dataReceived(request(b"", content_type="text/plain", length=limit + 1))
    status, _answer, _ = parse_answer(transport.value())
    assert status == 413
    assert os.listdir(wire.work_dir) == []


def test_out_of_descriptors_is_answered_503(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    """(attack 4) A file that cannot be opened for a body is a 503, never a 500."""

    def no_descriptor(*_a: Any, **_kw: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_descriptor)
    # A body large enough to be spooled to a file (small ones wait in memory).
    status, answer, _ = wire.exchange(request(encode_batch(msgs(1, size=SMALL_BODY))))
    assert status == 503
    assert "file descriptors" in answer["error"]


def test_connection_limits_follow_the_descriptor_limit() -> None:
    assert plan_connections(None, descriptors=1_048_576) == 1000
    assert plan_connections(None, descriptors=256) == (256 - 64) // 4
    assert plan_connections(40, descriptors=256) == 40
    with pytest.raises(NotEnoughDescriptors, match="LimitNOFILE"):
        plan_connections(1000, descriptors=1024)


@pytest.mark.parametrize("kind", ["files", "sqlite"])
def test_a_refused_request_stores_nothing_on_any_store(tmp_path: Path, kind: str) -> None:
    """(attack 6) 507 for a batch over ten channels: none of its messages is stored."""
    spec = str(tmp_path / "store") if kind == "files" else f"sqlite://{tmp_path}/store.db"
    w = Wire(tmp_path, spec=spec, max_messages=5)
    try:
        batch = [m for i in range(10) for m in msgs(1, channel=f"c{i}")]
        status, answer, _ = w.exchange(request(encode_batch(batch)))
        assert status == 507
        assert answer["error"] == STORE_FULL  # and no path of the store in it
        assert w.depth() == 0
        status, _, _ = w.exchange(request(encode_batch(msgs(5))))
        assert status == 200
    finally:
        w.close()


@pytest.mark.parametrize("kind", ["files", "sqlite"])
def test_channels_are_capped(tmp_path: Path, kind: str) -> None:
    """(attack 5) Beyond --max-channels new channels are refused; known ones still store."""
    spec = str(tmp_path / "store") if kind == "files" else f"sqlite://{tmp_path}/store.db"
    w = Wire(tmp_path, Limits(max_channels=3), spec=spec)
    try:
        for name in ("a", "b"):
            assert w.exchange(request(encode_batch(msgs(1, channel=name))))[0] == 200
        flood = [m for name in ("c", "d", "e") for m in msgs(1, channel=name)]
        status, answer, _ = w.exchange(request(encode_batch(flood)))
        assert status == 507
        assert "--max-channels" in answer["error"]
        assert w.depth() == 2
        assert w.exchange(request(encode_batch(msgs(1, channel="c"))))[0] == 200
        assert (
            w.exchange(request(encode_batch(msgs(1, channel="a") + msgs(1, channel="b"))))[0] == 200
        )
        assert w.exchange(request(encode_batch(msgs(1, channel="z"))))[0] == 507
        assert w.store.channel_count() == 3
    finally:
        w.close()


def test_stats_list_a_bounded_number_of_channels() -> None:
    class Metrics:
        def stats_json(self) -> dict[str, Any]:
            channels = {f"c{i:05d}": {"depth": i % 7} for i in range(1000)}
            rates = {"channels": {name: [1] for name in channels}}
            return {"channels": channels, "rates": rates}

    data = CappedStats(Metrics(), limit=10).stats_json()
    assert data["channels_total"] == 1000 and data["channels_shown"] == 10
    assert list(data["channels"]) == [f"c{i:05d}" for i in range(10)]  # the first by name
    assert set(data["rates"]["channels"]) == set(data["channels"])
    assert len(json.dumps(data)) < 2000


def test_sqlite_is_a_receiving_store(tmp_path: Path) -> None:
    """All or nothing across channels, running figures, drained channels forgotten."""
    from zope.interface.verify import verifyObject

    from dropr.interfaces import IReceivingStore
    from dropr.storage._sqlite import SQLiteStorage

    store = SQLiteStorage(str(tmp_path / "store.db"), dedup=True, max_messages=5)
    try:
        assert verifyObject(IReceivingStore, store)
        a, b = msgs(3, channel="a"), msgs(3, channel="b")
        with pytest.raises(StorageFull):
            store.store([("a", a), ("b", b)])
        assert store.usage() == (0, 0) and store.channel_count() == 0
        assert sorted(store.store([("a", a), ("b", b[:2])])) == sorted(m.id for m in a + b[:2])
        assert store.store([("a", a)]) == []  # known ids: skipped
        assert store.usage() == (5, 50) and store.channel_count() == 2
        assert store.oldest_accepted_id() < a[0].id[:12]
        store.ack(store.take("b", 10))
        store.upkeep()
        assert store.channel_count() == 1
    finally:
        store.close()


def test_a_small_body_waits_in_memory_a_large_one_in_a_file(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file costs a small request more than its store: only large bodies get one."""
    files: list[object] = []
    real = tempfile.TemporaryFile

    def counted(*a: Any, **kw: Any) -> Any:
        f = real(*a, **kw)
        files.append(f)
        return f

    monkeypatch.setattr(tempfile, "TemporaryFile", counted)
    status, _answer, _ = wire.exchange(request(encode_batch(msgs(3))))
    assert status == 200
    assert files == []
    status, _answer, _ = wire.exchange(request(encode_batch(msgs(1, size=SMALL_BODY))))
    assert status == 200
    assert len(files) == 1


def test_after_an_answer_the_store_gets_ready_for_the_next_request(wire: Wire) -> None:
    tmp = os.path.join(wire.store.path, "tmp")
    assert wire.exchange(request(encode_batch(msgs(1))))[0] == 200
    assert os.listdir(tmp) == []  # not before the answer is on its way
    wire.clock.advance(0)
    spares = {n for n in os.listdir(tmp) if n.startswith("spare.")}
    assert spares  # made after the answer, in the pool
    assert wire.exchange(request(encode_batch(msgs(1))))[0] == 200
    assert len(spares - set(os.listdir(tmp))) == 1  # the second store filled one


class CountingPool(SyncPool):
    def __init__(self) -> None:
        self.jobs = 0

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.jobs += 1
        super().callInThreadWithCallback(on_result, f, *args, **kw)


def test_a_small_request_at_an_idle_server_is_stored_without_the_pool(tmp_path: Path) -> None:
    """Two thread hops cost as much as a small sync: an idle server stores a
    small request in its reactor; overlapping or large ones go to the pool."""
    w = Wire(tmp_path)
    try:
        pool = CountingPool()
        w.resource.pool = pool  # type: ignore[assignment]
        now = [100.0]
        w.resource.placement = StorePlacement(True, clock=lambda: now[0])

        def stores(body: bytes) -> int:
            before = pool.jobs
            assert w.exchange(request(body))[0] == 200
            return pool.jobs - before

        assert stores(encode_batch(msgs(1))) == 0  # idle: in the reactor
        assert stores(encode_batch(msgs(1))) == 1  # right after another: the pool
        now[0] += 1.0
        assert stores(encode_batch(msgs(1, size=INLINE_MAX_BYTES))) == 1  # large: the pool
        now[0] += 1.0
        assert stores(encode_batch(msgs(2))) == 0
        # A store under way in the pool sends the next one there too.
        now[0] += 1.0
        w.resource.placement.in_pool = 1
        assert stores(encode_batch(msgs(1))) == 1
        # A store that says nothing of its speed always goes to the pool.
        now[0] += 1.0
        w.resource.placement = StorePlacement(False, clock=lambda: now[0])
        assert stores(encode_batch(msgs(1))) == 1
        assert not w.resource.placement.in_pool
    finally:
        w.close()


def test_the_file_store_says_its_small_stores_are_quick(wire: Wire) -> None:
    assert wire.resource.placement.allowed
