"""The Twisted consumer: handler called per message, woken by the store, acks and retries.

The fast tests run ``ChannelConsumer`` on a ``MemoryStorage`` (an
``IWakeSource``) or SQLite (which is polled) with a ``Clock`` and
``run_now``; the slow ones on the file-system store with real inotify and
the reactor's threads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import until
from twisted.internet import defer, reactor, task

import dropr
from dropr._consumer import ChannelConsumer
from dropr._ids import new_id
from dropr._message import Message
from dropr.storage._sqlite import SQLiteStorage
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import MemoryStorage, run_now


def _messages(n: int, channel: str = "orders") -> list[Message]:
    return [Message(new_id(), b"m%d" % i, channel, 5) for i in range(n)]


# -- in virtual time -------------------------------------------------------------------


def _consumer(storage: Any, handler: Any, **options: Any) -> tuple[ChannelConsumer, task.Clock]:
    clock = task.Clock()
    consumer = ChannelConsumer(
        dropr.Store(storage), "orders", handler, clock, run_on_disk=run_now, **options
    )
    return consumer, clock


def test_a_wake_source_brings_new_messages_without_polling() -> None:
    storage = MemoryStorage()
    seen: list[bytes] = []
    consumer, _ = _consumer(storage, lambda m: seen.append(m.payload), poll=600)
    consumer.startService()
    storage.add("orders", _messages(3))
    assert seen == [b"m0", b"m1", b"m2"]  # at the add, not at the next poll
    assert consumer.handled == 3 and storage.usage() == (0, 0)
    storage.add("other", _messages(1, "other"))
    assert consumer.handled == 3  # another channel does not wake it
    consumer.stopService()
    storage.add("orders", _messages(1))
    assert consumer.handled == 3  # stopped: the watch is gone


def test_handler_failures_are_retried_then_failed_with_the_reason() -> None:
    storage = MemoryStorage()
    calls: dict[bytes, int] = {}

    def handler(m: dropr.Message) -> defer.Deferred[None]:
        calls[m.payload] = calls.get(m.payload, 0) + 1
        if m.payload == b"m1":
            return defer.fail(ValueError("cannot parse"))
        return defer.succeed(None)

    consumer, clock = _consumer(storage, handler, poll=5, max_attempts=3)
    storage.add("orders", _messages(2))
    consumer.startService()
    # A released message is taken again in the same round, up to the limit.
    assert calls == {b"m0": 1, b"m1": 3}
    clock.advance(5)
    assert calls == {b"m0": 1, b"m1": 3}
    assert (consumer.handled, consumer.failed) == (1, 1)
    [(m, why)] = storage.failed("orders")
    assert m.payload == b"m1" and "handler failed 3 times: ValueError: cannot parse" in why
    consumer.stopService()


def test_a_store_without_wake_source_is_polled(tmp_path: Path) -> None:
    storage = SQLiteStorage(str(tmp_path / "store.db"))
    seen: list[bytes] = []
    clock = task.Clock()
    # The consumer opens the store by spec, as dropr-server's --store names it.
    store = dropr.Store(f"sqlite://{tmp_path}/store.db")
    consumer = ChannelConsumer(
        store, "orders", lambda m: seen.append(m.payload), clock, run_on_disk=run_now, poll=5
    )
    consumer.startService()
    storage.add("orders", _messages(2))
    assert seen == []
    clock.advance(5)
    assert seen == [b"m0", b"m1"]
    consumer.stopService()
    assert storage.take("orders", 10) == []  # acked through the store the spec named
    store.close()
    storage.close()


def test_stop_waits_for_the_handler_and_releases_the_rest() -> None:
    storage = MemoryStorage()
    pending: list[defer.Deferred[None]] = []

    def handler(m: dropr.Message) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        pending.append(d)
        return d

    consumer, _ = _consumer(storage, handler, poll=600)
    storage.add("orders", _messages(3))
    consumer.startService()
    assert len(pending) == 1
    stopped = consumer.stopService()
    assert not stopped.called
    pending[0].callback(None)
    assert stopped.called and consumer.handled == 1
    # The two not handled were given back, for the next consumer.
    assert [m.payload for m in storage.take("orders", 10)] == [b"m1", b"m2"]


# -- on the file system, with real inotify and threads (slow) ------------------------------


@pytest.mark.slow
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
        yield until(lambda: len(seen) == 3)
        assert [p for p, _ in seen] == [b"m0", b"m1", b"m2"]
        assert seen[-1][1] - sent_at < 1.0
        yield until(lambda: consumer.handled == 3)
    finally:
        yield consumer.stopService()
    assert store.take("orders", 10) == []  # all acked
    store.close()
    server_side.close()


@pytest.mark.slow
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
        yield until(lambda: consumer.failed == 1 and consumer.handled == 1)
    finally:
        yield consumer.stopService()
    assert calls == {b"m0": 1, b"m1": 3}
    failed = store.failed("orders")
    assert [(m.payload, "cannot parse" in why) for m, why in failed] == [(b"m1", True)]
    assert store.take("orders", 10) == []
    store.close()
    server_side.close()


@pytest.mark.slow
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
        yield until(lambda: consumer.handled == 5)
    finally:
        yield consumer.stopService()
    assert got == [b"m%d" % i for i in range(5)]
    store.close()
    server_side.close()
