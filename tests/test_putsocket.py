"""The put socket on fakes: its HTTP parsing, group commit and the producer's fallback."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.client import _putclient
from dropr.client._puthttp import (
    ContinueNeeded,
    HTTPError,
    HTTPRequest,
    RequestParser,
    message_from_request,
)
from dropr.client._putsocket import GroupCommit, PutFactory, socket_path
from dropr.errors import InvalidMessage, StorageFull
from dropr.storage._limits import check_room

DEST = "http://central:8080/"
QDEST = "http%3A%2F%2Fcentral%3A8080%2F"


def post(query: str, body: bytes = b"hello", extra: str = "") -> bytes:
    return (
        f"POST /?{query} HTTP/1.1\r\nHost: spool\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# -- parsing ---------------------------------------------------------------------


def test_parser_reads_pipelined_requests_split_anywhere() -> None:
    stream = post(f"destination={QDEST}&channel=a", b"one") + post(
        f"destination={QDEST}&channel=b&priority=2", b"two!"
    )
    for step in (1, 7, len(stream)):
        parser = RequestParser(max_body=100)
        got: list[Any] = []
        for i in range(0, len(stream), step):
            got += parser.feed(stream[i : i + step])
        assert [r.body for r in got] == [b"one", b"two!"]
        assert all(isinstance(r, HTTPRequest) and r.keep_alive for r in got)


def test_parser_asks_for_continue_before_the_body() -> None:
    parser = RequestParser(max_body=100)
    head = post(f"destination={QDEST}", b"x" * 10, "Expect: 100-continue\r\n")[:-10]
    assert [type(x) for x in parser.feed(head)] == [ContinueNeeded]
    [request] = parser.feed(b"x" * 10)
    assert isinstance(request, HTTPRequest) and request.body == b"x" * 10


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413, "max_payload"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
        (b"hello there\r\n\r\n", 400, "not an HTTP request line"),
        (b"POST / HTTP/2.0\r\n\r\n", 505, "HTTP/1.1"),
        (b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 4000 + b"\r\n", 431, "16 KiB"),
    ],
)
def test_parser_refuses_what_it_cannot_read(raw: bytes, status: int, words: str) -> None:
    parser = RequestParser(max_body=100)
    out = parser.feed(raw)
    assert isinstance(out[-1], HTTPError)
    assert out[-1].status == status and words in out[-1].reason
    assert parser.feed(post(f"destination={QDEST}")) == []  # nothing more is trusted


def test_connection_close_and_http10_end_the_stream() -> None:
    for raw in (
        post(f"destination={QDEST}", extra="Connection: close\r\n"),
        post(f"destination={QDEST}").replace(b"HTTP/1.1", b"HTTP/1.0"),
    ):
        [request] = RequestParser(100).feed(raw + post(f"destination={QDEST}"))
        assert isinstance(request, HTTPRequest) and not request.keep_alive


def request(query: str, body: bytes = b"p", method: str = "POST", path: str = "/") -> HTTPRequest:
    return HTTPRequest(method, f"{path}?{query}", {}, body)


def test_message_from_request_takes_the_query_fields() -> None:
    given = new_id()
    m = message_from_request(request(f"destination={QDEST}&channel=orders&priority=2&id={given}"))
    assert (m.id, m.payload, m.channel, m.priority, m.destination) == (
        given,
        b"p",
        "orders",
        2,
        DEST,
    )
    made = message_from_request(request(f"destination={QDEST}"))
    assert (made.channel, made.priority) == ("common", 5) and len(made.id) == 32


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("channel=orders", 400, "no destination"),
        ("destination=ftp://x/", 400, "invalid destination"),
        (f"destination={QDEST}&channel=../etc", 400, "invalid channel"),
        (f"destination={QDEST}&priority=high", 400, "use 0 to 9"),
        (f"destination={QDEST}&priority=12", 400, "priority"),
        (f"destination={QDEST}&id=123", 400, "32 lowercase hex"),
        (f"destination={QDEST}&channel=a&channel=b", 400, "give it once"),
    ],
)
def test_bad_puts_are_refused_with_what_to_do(query: str, status: int, words: str) -> None:
    with pytest.raises(HTTPError) as e:
        message_from_request(request(query))
    assert e.value.status == status and words in e.value.reason


def test_only_post_to_the_root() -> None:
    with pytest.raises(HTTPError) as e:
        message_from_request(request(f"destination={QDEST}", method="DELETE"))
    assert e.value.status == 405
    with pytest.raises(HTTPError) as e:
        message_from_request(request(f"destination={QDEST}", path="/other"))
    assert e.value.status == 404


# -- group commit ------------------------------------------------------------------


class FakeDisk:
    """Stands in for the daemon's writer thread: runs a job when told to."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.jobs: list[tuple[Callable[[], object], defer.Deferred[object]]] = []
        self.fail_with: BaseException | None = None

    def write(self, messages: list[Message]) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.writes.append([m.id for m in messages])
        return f"segment-{len(self.writes)}"

    def run(self, job: Callable[[], object]) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.jobs.append((job, d))
        return d

    def finish_one(self) -> None:
        job, d = self.jobs.pop(0)
        try:
            result = job()
        except BaseException as e:
            d.errback(Failure(e))
        else:
            d.callback(result)


def message(destination: str = DEST, payload: bytes = b"p") -> Message:
    return Message(new_id(), payload, "orders", 5, destination)


def fired(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_puts_of_one_turn_are_one_write_answered_after_its_sync() -> None:
    clock, disk = Clock(), FakeDisk()
    handed: list[tuple[list[str], object]] = []
    commit = GroupCommit(
        disk.write, disk.run, clock, lambda ms, token: handed.append(([m.id for m in ms], token))
    )
    ms = [message(), message(), message("http://other:1/")]
    results = [fired(commit.put(m)) for m in ms]
    assert disk.jobs == []  # nothing before the end of the turn
    clock.advance(0)
    assert len(disk.jobs) == 1
    assert results == [[], [], []] and handed == []  # not before the sync
    disk.finish_one()
    assert disk.writes == [[m.id for m in ms]]  # every destination in one write
    assert results == [[None], [None], [None]]
    # The messages go to their senders after the sync, with where they are.
    assert handed == [([m.id for m in ms], "segment-1")]
    assert commit.batches == 1 and commit.stored == 3


def test_what_arrives_during_a_write_is_the_next_write() -> None:
    clock, disk = Clock(), FakeDisk()
    commit = GroupCommit(disk.write, disk.run, clock)
    first = fired(commit.put(message()))
    clock.advance(0)
    later = [fired(commit.put(message())) for _ in range(3)]
    clock.advance(0)
    assert len(disk.jobs) == 1  # one write at a time
    idle = fired(commit.idle())
    disk.finish_one()
    assert first == [None] and later == [[], [], []] and idle == []
    assert len(disk.jobs) == 1  # the three, together, at once
    disk.finish_one()
    assert later == [[None]] * 3 and idle == [None]
    assert [len(ids) for ids in disk.writes] == [1, 3]


def test_a_retried_id_is_written_once() -> None:
    clock, disk = Clock(), FakeDisk()
    commit = GroupCommit(disk.write, disk.run, clock)
    m = message()
    a, b = fired(commit.put(m)), fired(commit.put(m))
    clock.advance(0)
    disk.finish_one()
    assert disk.writes == [[m.id]] and a == b == [None]


def test_a_failed_write_fails_every_caller_of_the_group() -> None:
    clock, disk = Clock(), FakeDisk()
    disk.fail_with = OSError(28, "No space left on device")
    handed: list[object] = []
    commit = GroupCommit(disk.write, disk.run, clock, lambda ms, token: handed.append(token))
    results = [fired(commit.put(message())) for _ in range(2)]
    clock.advance(0)
    disk.finish_one()
    for r in results:
        assert isinstance(r[0], Failure) and r[0].check(OSError)
    assert handed == []  # nothing to send
    disk.fail_with = None
    again = fired(commit.put(message()))
    clock.advance(0)
    disk.finish_one()
    assert again == [None]  # the next group is written


def test_a_put_past_the_spools_limits_is_refused_at_once() -> None:
    clock, disk = Clock(), FakeDisk()

    def room(count: int, nbytes: int) -> None:
        check_room("/spool", 9, 0, count, nbytes, 10, None)

    commit = GroupCommit(disk.write, disk.run, clock, room=room)
    assert fired(commit.put(message())) == []
    refused = fired(commit.put(message()))
    assert isinstance(refused[0], Failure) and refused[0].check(StorageFull)
    assert "/spool is full: 9 messages wait and the limit is 10" in str(refused[0].value)
    clock.advance(0)
    disk.finish_one()
    assert disk.writes and len(disk.writes[0]) == 1


def test_too_much_waiting_is_refused_not_buffered() -> None:
    clock, disk = Clock(), FakeDisk()
    commit = GroupCommit(disk.write, disk.run, clock, max_pending_bytes=10)
    fired(commit.put(message(payload=b"x" * 8)))
    refused = fired(commit.put(message(payload=b"x" * 8)))
    assert isinstance(refused[0], Failure) and refused[0].check(StorageFull)


# -- the protocol --------------------------------------------------------------------


def connection(disk: FakeDisk, clock: Clock) -> tuple[Any, StringTransport]:
    factory = PutFactory(GroupCommit(disk.write, disk.run, clock), max_payload=1000)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def answers(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
        out.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        raw = rest[length:]
    return out


def test_pipelined_puts_are_answered_in_order_after_the_sync() -> None:
    clock, disk = Clock(), FakeDisk()
    proto, transport = connection(disk, clock)
    given = new_id()
    proto.dataReceived(
        post(f"destination={QDEST}&id={given}")
        + post("channel=nodestination")
        + post(f"destination={QDEST}")
    )
    # The refusal is known at once but waits for the answer before it.
    assert transport.value() == b""
    clock.advance(0)
    disk.finish_one()
    got = answers(transport.value())
    assert [s for s, _ in got] == [200, 400, 200]
    assert got[0][1] == {"stored": [given], "rejected": {}}
    assert "no destination" in got[1][1]["error"]
    assert not transport.disconnecting


def test_puts_arriving_while_the_daemon_stops_are_turned_away() -> None:
    clock, disk = Clock(), FakeDisk()
    proto, transport = connection(disk, clock)
    proto.factory.stopping = True
    proto.dataReceived(post(f"destination={QDEST}"))
    [(status, body)] = answers(transport.value())
    assert status == 503 and "stopping" in body["error"]
    assert transport.disconnecting and disk.jobs == []


def test_a_full_spool_is_507_and_an_unreadable_request_closes() -> None:
    clock, disk = Clock(), FakeDisk()
    disk.fail_with = StorageFull("the spool is full; retry later")
    proto, transport = connection(disk, clock)
    proto.dataReceived(post(f"destination={QDEST}"))
    clock.advance(0)
    disk.finish_one()
    assert answers(transport.value()) == [(507, {"error": "the spool is full; retry later"})]
    transport.clear()
    proto.dataReceived(b"nonsense\r\n\r\n")
    [(status, body)] = answers(transport.value())
    assert status == 400 and "not an HTTP request line" in body["error"]
    assert transport.disconnecting


# -- the producer's side ---------------------------------------------------------------


def batch_files(spool: Path) -> list[str]:
    return [n for _d, _s, files in os.walk(spool / "queues") for n in files if n.endswith(".b")]


def test_put_without_a_daemon_writes_its_own_batch(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    mid = dropr.Spool(str(spool)).put(b"x", DEST)
    assert len(mid) == 32
    with dropr.Spool(str(spool), put_socket=False) as s:
        [m] = s.take(DEST, 10)
        assert m.id == mid


def test_put_to_a_dead_daemons_socket_falls_back(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    os.makedirs(spool)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(socket_path(str(spool)))
    stale.close()  # left behind, nobody listens: connection refused
    with dropr.Spool(str(spool)) as s:
        mid = s.put(b"x", DEST)
        assert [m.id for m in s.take(DEST, 10)] == [mid]


@pytest.fixture
def mute_daemon(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A socket that accepts and reads but never answers (a stuck daemon)."""
    spool = tmp_path / "spool"
    os.makedirs(spool)
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path(str(spool)))
    server.listen(8)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.05)
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                seen.append(data)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield spool, seen
    stop.set()
    thread.join()
    server.close()


def test_a_stuck_daemon_times_out_and_the_put_writes_itself(
    mute_daemon: tuple[Path, list[bytes]],
) -> None:
    spool, seen = mute_daemon
    with dropr.Spool(str(spool), put_timeout=0.2) as s:
        mid = s.put(b"x", DEST)
        assert any(mid.encode() in chunk for chunk in seen)  # offered with its id
        # The same id is in the spool: should the daemon have stored it too,
        # the server keeps one.
        assert [m.id for m in s.take(DEST, 10)] == [mid]
        # Held off for a while: the next put does not wait again.
        before = len(seen)
        s.put(b"y", DEST)
        assert len(seen) == before


def test_dropr_put_socket_0_keeps_puts_off_the_socket(
    mute_daemon: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, seen = mute_daemon
    monkeypatch.setenv("DROPR_PUT_SOCKET", "0")
    with dropr.Spool(str(spool), put_timeout=5) as s:
        s.put(b"x", DEST)
        assert seen == [] and s.written_here == 1


def test_the_client_reads_answers_and_keeps_its_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    accepted: list[int] = []

    def serve() -> None:
        conn, _ = server.accept()
        accepted.append(1)
        buf = b""
        replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            b'HTTP/1.1 507 Insufficient Storage\r\nContent-Length: 17\r\n\r\n{"error": "full"}',
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ]
        while replies:
            buf += conn.recv(65536)
            while b"\r\n\r\n" in buf and replies:
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(rest) < length:
                    break
                buf = rest[length:]
                conn.sendall(replies.pop(0))
        conn.recv(1)  # until the client closes
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = _putclient.PutSocketClient(path, timeout=2)
    assert client.put([message(), message()]) == [
        _putclient.STORED,
        _putclient.Refused(507, "full"),
    ]
    assert client.put([message()]) == [_putclient.STORED]
    client.close()
    thread.join(5)
    server.close()
    assert accepted == [1]  # one connection for both calls


@pytest_twisted.inlineCallbacks
def test_put_deferred_calls_of_one_turn_share_one_batch(tmp_path: Path) -> Any:
    spool = tmp_path / "spool"
    s = dropr.Spool(str(spool))
    try:
        ids = yield defer.gatherResults(
            [s.put_deferred(b"%d" % i, DEST, "orders") for i in range(5)]
        )
        assert len(batch_files(spool)) == 1
        assert [m.id for m in s.take(DEST, 10)] == ids
        with pytest.raises(InvalidMessage):
            yield s.put_deferred(b"x", "not a url")
    finally:
        s.close()


@pytest.mark.parametrize(
    "query",
    [
        f"destination={QDEST}&channel=orders&priority=2&id={'a' * 32}",
        "destination=http://central:8080/&channel=c",
        "a=1&a=2&b",
        "x=a+b%20c&&y=",
        "k%20x=v&%zz=1",
    ],
)
def test_the_quick_query_parser_reads_what_parse_qs_reads(query: str) -> None:
    from urllib.parse import parse_qs

    from dropr.client._puthttp import _parse_query

    assert _parse_query(query) == parse_qs(query, keep_blank_values=True)


def test_a_forked_child_never_uses_its_parents_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    client = _putclient.PutSocketClient(path, timeout=2)
    conn = client._connection(fresh=False)
    assert conn is not None
    client._give_back(conn)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh connection, never the parent's
        mine = client._connection(fresh=False)
        os.write(write_end, b"fresh" if mine is not None and mine is not conn else b"reused")
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 16) == b"fresh"
    os.waitpid(pid, 0)
    assert client._connection(fresh=False) is conn  # the parent keeps its own
    client.close()
    server.close()
