"""The client's sender against a real server socket: failures, limits, isolation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import Server
from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool

import dropr
from dropr._ids import id_at
from dropr._message import Message
from dropr.client._sender import DestinationSender
from dropr.client._transport import HTTPTransport
from dropr.interfaces import ITransport
from dropr.server._receiver import Limits
from dropr.testing import free_port


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


def until(condition: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    deadline = time.monotonic() + timeout

    async def poll() -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await task.deferLater(reactor, 0.01, lambda: None)

    return defer.ensureDeferred(poll())


def sender(spool: dropr.Spool, url: str, t: HTTPTransport, p: ThreadPool, **kw: Any) -> Any:
    return DestinationSender(spool, url, t, reactor, p, backoff_base=0.05, **kw)


def test_http_transport_provides_itransport(transport: HTTPTransport) -> None:
    from zope.interface.verify import verifyObject

    assert verifyObject(ITransport, transport)


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


@pytest_twisted.inlineCallbacks
def test_too_old_messages_fail_without_being_sent(
    tmp_path: Path, pool: ThreadPool, transport: HTTPTransport
) -> Any:
    server = Server(tmp_path, Limits())
    spool = dropr.Spool(str(tmp_path / "spool"))
    try:
        old = Message(id_at(time.time() - 3600), b"stale", "orders", 5, server.url)
        spool.storage.add(server.url, [old])
        s = sender(spool, server.url, transport, pool, max_age=60)
        s.wake()
        yield until(lambda: len(spool.failed(server.url)) == 1)
        [(m, reason)] = spool.failed(server.url)
        assert m.id == old.id and "maximum age of 60 s" in reason
        assert server.depth() == 0
    finally:
        spool.close()
        yield server.stop()


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
    finally:
        spool.close()
        yield server.stop()
