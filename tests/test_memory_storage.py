"""MemoryStorage beyond IStorage: the interfaces that let a test drive any daemon on it."""

from __future__ import annotations

import time

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from dropr._ids import id_at, new_ids
from dropr._message import Message
from dropr.errors import InvalidMessage, StorageFull
from dropr.interfaces import (
    IMessageAdmin,
    IReceivingStore,
    ISpoolStorage,
    IStorage,
    IUsage,
    IWakeSource,
)
from dropr.testing import MemoryStorage


def make(n: int, channel: str = "orders") -> list[Message]:
    return [Message(i, b"x" * 10, channel) for i in new_ids(n)]


@pytest.mark.parametrize(
    "interface", [IStorage, IUsage, ISpoolStorage, IReceivingStore, IWakeSource, IMessageAdmin]
)
def test_memory_storage_provides(interface: object) -> None:
    assert verifyObject(interface, MemoryStorage())


def test_store_is_all_or_nothing_across_channels() -> None:
    storage = MemoryStorage(dedup=True, max_messages=3)
    orders, mail = make(2), make(2, "mail")
    with pytest.raises(StorageFull):
        storage.store([("orders", orders), ("mail", mail)])
    assert storage.usage() == (0, 0) and storage.queues() == []
    assert storage.store([("orders", orders), ("mail", mail[:1])]) == [
        *(m.id for m in orders),
        mail[0].id,
    ]
    # Known ids are skipped, not stored twice, and not counted against the limit.
    assert storage.store([("orders", orders)]) == []
    assert storage.channel_count() == 2


def test_ids_older_than_the_window_are_refused_whole() -> None:
    now = time.time()
    storage = MemoryStorage(dedup=True, dedup_window=60, clock=lambda: now)
    assert storage.oldest_accepted_id() == f"{int((now - 60) * 1000):012x}"
    old = Message(id_at(now - 61), b"late", "orders")
    with pytest.raises(InvalidMessage, match="older than the dedup window"):
        storage.store([("orders", [*make(1), old])])
    assert storage.usage() == (0, 0)


def test_watch_calls_back_after_adds_to_its_queue_until_stopped() -> None:
    storage = MemoryStorage()
    calls: list[str] = []
    stop = storage.watch("orders", lambda: calls.append("orders"), Clock())
    storage.add("mail", make(1, "mail"))
    storage.add("orders", make(2))
    storage.store([("orders", make(1)), ("mail", make(1, "mail"))])
    assert calls == ["orders", "orders"]
    stop()
    storage.add("orders", make(1))
    assert calls == ["orders", "orders"]


def test_usage_is_exact_and_count_usage_agrees() -> None:
    storage = MemoryStorage()
    storage.add("http://h:1/", make(3))
    storage.ack(storage.take("http://h:1/", 1))
    assert storage.usage() == storage.count_usage() == (2, 20)
    assert storage.queue_names() == ["http://h:1/"]
