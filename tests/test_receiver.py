"""dropr-server's HTTP side on a real socket: limits, bad input, dedup, answers."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from inprocess import Server
from twisted.internet import reactor

from dropr._ids import new_id
from dropr._message import Message
from dropr.server._receiver import Limits
from dropr.wire import CONTENT_TYPE, encode_batch


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
