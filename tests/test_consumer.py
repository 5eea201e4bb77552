"""The Twisted consumer: handler called per message, woken by inotify, acks and retries."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task

import dropr
from dropr._consumer import ChannelConsumer
from dropr._ids import new_id
from dropr._message import Message
from dropr.storage.files._storage import FilesystemStorage


def _messages(n: int, channel: str = "orders") -> list[Message]:
    return [Message(new_id(), b"m%d" % i, channel, 5) for i in range(n)]


def _wait(condition: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    """Fire when ``condition()`` holds, checking every 10 ms (test helper only)."""
    deadline = time.monotonic() + timeout

    async def poll() -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met")
            await task.deferLater(reactor, 0.01, lambda: None)

    return defer.ensureDeferred(poll())


@pytest_twisted.inlineCallbacks
def test_consumer_is_woken_by_new_messages_and_acks(tmp_path: Path) -> Any:
    server_side = FilesystemStorage(str(tmp_path / "store"), dedup=True)
    store = dropr.Store(str(tmp_path / "store"))
    seen: list[tuple[bytes, float]] = []

    def handler(m: dropr.Message) -> None:
        seen.append((m.payload, time.monotonic()))

    # Polling every 600 s: only the inotify wake-up can explain fast handling.
    consumer = ChannelConsumer(store, "orders", handler, reactor, poll=600)
    consumer.startService()
    try:
        yield task.deferLater(reactor, 0.2, lambda: None)  # first (empty) round done
        sent_at = time.monotonic()
        yield defer.maybeDeferred(server_side.add, "orders", _messages(3))
        yield _wait(lambda: len(seen) == 3)
        assert [p for p, _ in seen] == [b"m0", b"m1", b"m2"]
        assert seen[-1][1] - sent_at < 1.0
        yield _wait(lambda: consumer.handled == 3)
    finally:
        yield consumer.stopService()
    assert store.take("orders", 10) == []  # all acked
    store.close()
    server_side.close()


@pytest_twisted.inlineCallbacks
def test_deferred_handler_failures_are_retried_then_failed(tmp_path: Path) -> Any:
    server_side = FilesystemStorage(str(tmp_path / "store"), dedup=True)
    server_side.add("orders", _messages(2))
    store = dropr.Store(str(tmp_path / "store"))
    calls: dict[bytes, int] = {}

    def handler(m: dropr.Message) -> defer.Deferred[None]:
        calls[m.payload] = calls.get(m.payload, 0) + 1
        if m.payload == b"m1":
            return defer.fail(ValueError("cannot parse"))
        return task.deferLater(reactor, 0.001, lambda: None)

    consumer = ChannelConsumer(store, "orders", handler, reactor, poll=0.05, max_attempts=3)
    consumer.startService()
    try:
        yield _wait(lambda: consumer.failed == 1 and consumer.handled == 1)
    finally:
        yield consumer.stopService()
    assert calls == {b"m0": 1, b"m1": 3}
    failed = store.failed("orders")
    assert [(m.payload, "cannot parse" in why) for m, why in failed] == [(b"m1", True)]
    assert store.take("orders", 10) == []
    store.close()
    server_side.close()


@pytest_twisted.inlineCallbacks
def test_async_handler(tmp_path: Path) -> Any:
    server_side = FilesystemStorage(str(tmp_path / "store"), dedup=True)
    server_side.add("jobs", _messages(5, "jobs"))
    store = dropr.Store(str(tmp_path / "store"))
    got: list[bytes] = []

    async def handler(m: dropr.Message) -> None:
        await task.deferLater(reactor, 0.001, lambda: None)
        got.append(m.payload)

    consumer = ChannelConsumer(store, "jobs", handler, reactor, poll=600)
    consumer.startService()
    try:
        yield _wait(lambda: consumer.handled == 5)
    finally:
        yield consumer.stopService()
    assert got == [b"m%d" % i for i in range(5)]
    store.close()
    server_side.close()
