"""The messages of batch files already read, so a take hands out the same objects.

Kept by bucket, least recently used first out, within a byte and a batch
budget.  A bucket the storage forgets (removed, or dropped from its queue's
view) takes its batches with it, so what the cache holds follows what a
consumer is working on, not everything it has seen.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from operator import attrgetter

from dropr._message import Message

#: What a cached message costs beyond its payload (objects, receipt, id).
MESSAGE_OVERHEAD = 400


_payload = attrgetter("payload")


def payload_bytes(messages: list[Message]) -> int:
    """The payload bytes of ``messages`` (summed in C: it runs per take and ack)."""
    return sum(map(len, map(_payload, messages)))


def _cost(messages: list[Message]) -> int:
    return payload_bytes(messages) + MESSAGE_OVERHEAD * len(messages)


class BatchCache:
    """Read batches by path, bounded by ``max_bytes`` and ``max_batches``."""

    def __init__(self, max_bytes: int, max_batches: int) -> None:
        self.max_bytes = max_bytes
        self.max_batches = max_batches
        self._buckets: OrderedDict[str, dict[str, list[Message]]] = OrderedDict()
        #: What each cached batch was counted at, so dropping it costs no recount.
        self._costs: dict[str, int] = {}
        self.bytes = 0
        self.batches = 0

    def __len__(self) -> int:
        return self.batches

    def get(self, path: str) -> list[Message] | None:
        bucket, name = os.path.split(path)
        batches = self._buckets.get(bucket)
        if batches is None:
            return None
        self._buckets.move_to_end(bucket)
        return batches.get(name)

    def put(self, path: str, messages: list[Message]) -> None:
        bucket, name = os.path.split(path)
        batches = self._buckets.setdefault(bucket, {})
        self._buckets.move_to_end(bucket)
        old = batches.get(name)
        if old is not None:
            self._account(path, -1)
        batches[name] = messages
        self._costs[path] = _cost(messages)
        self._account(path, +1)
        while (self.bytes > self.max_bytes or self.batches > self.max_batches) and (
            len(self._buckets) > 1
        ):
            oldest = next(iter(self._buckets))
            self.drop_bucket(oldest)

    def drop(self, path: str) -> None:
        bucket, name = os.path.split(path)
        batches = self._buckets.get(bucket)
        if batches is None:
            return
        old = batches.pop(name, None)
        if old is not None:
            self._account(path, -1)
        if not batches:
            del self._buckets[bucket]

    def drop_bucket(self, bucket: str) -> None:
        for name in self._buckets.pop(bucket, {}):
            self._account(os.path.join(bucket, name), -1)

    def _account(self, path: str, sign: int) -> None:
        cost = self._costs[path] if sign > 0 else self._costs.pop(path)
        self.bytes += sign * cost
        self.batches += sign
