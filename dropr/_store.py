"""The consumer's side: ``dropr.Store``, the messages a server received."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from dropr._message import Message, validate_channel
from dropr.errors import StoreNotFound
from dropr.interfaces import IStorage, QueueStats
from dropr.storage._spec import open_store, redact, spec_kind, spec_path


def _check_exists(spec: str) -> None:
    """Refuse a file-system or SQLite spec where nothing is: a typo must not make a store."""
    kind = spec_kind(spec)
    if kind == "postgresql":
        return
    path = spec_path(spec)
    if not (os.path.isdir(path) if kind == "files" else os.path.isfile(path)):
        raise StoreNotFound(
            f"no store at {redact(spec)}: give the --store of a dropr-server "
            "(a directory, sqlite:///path or postgresql://…)"
        )


class Store:
    """A server's store, read by consumers: one queue per channel.

    Several consumers, in one process or many, may take from the same
    channel: a taken message is leased to its taker and no one else gets it
    until the lease expires or it is released.  Ack what you processed, fail
    what you cannot process (it moves to the failed area with your reason).

    :param spec: the store as dropr-server's ``--store`` names it: a
        directory, ``sqlite:///path`` or ``postgresql://…`` (see
        :func:`dropr.storage._spec.open_store`); or an ``IStorage`` provider,
        such as :class:`dropr.testing.MemoryStorage` in tests.
    :param lease: default seconds a taken message stays yours.
    """

    def __init__(self, spec: str | IStorage, *, lease: float = 60.0) -> None:
        if isinstance(spec, str):
            _check_exists(spec)
            self.storage: IStorage = open_store(spec, lease=lease)
        else:
            self.storage = spec

    def take(self, channel: str, limit: int = 100, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``channel`` in delivery order."""
        validate_channel(channel)
        return self.storage.take(channel, limit, lease)

    def ack(self, messages: Iterable[Message]) -> None:
        """Mark taken messages processed; they will not be handed out again."""
        self.storage.ack(list(messages))

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken messages to the failed area with ``reason``."""
        self.storage.fail(list(messages), reason)

    def release(self, messages: Iterable[Message]) -> None:
        """Give taken messages back, to be taken again."""
        self.storage.release(list(messages))

    def queues(self) -> list[str]:
        """Channels holding messages (waiting or failed)."""
        return self.storage.queues()

    def stats(self, channels: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Depth, bytes, oldest age, taken and failed counts per channel (or of ``channels``)."""
        return self.storage.stats(channels)

    def failed(self, channel: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Failed messages of ``channel`` with their reasons."""
        return self.storage.failed(channel, limit)

    def take_deferred(
        self, channel: str, limit: int = 100, lease: float | None = None
    ) -> Deferred[list[Message]]:
        """``take`` for Twisted code, run in the reactor's thread pool."""
        return deferToThread(self.take, channel, limit, lease)

    def ack_deferred(self, messages: Iterable[Message]) -> Deferred[None]:
        """``ack`` for Twisted code, run in the reactor's thread pool."""
        return deferToThread(self.ack, list(messages))

    def fail_deferred(self, messages: Iterable[Message], reason: str) -> Deferred[None]:
        """``fail`` for Twisted code, run in the reactor's thread pool."""
        return deferToThread(self.fail, list(messages), reason)

    def release_deferred(self, messages: Iterable[Message]) -> Deferred[None]:
        """``release`` for Twisted code, run in the reactor's thread pool."""
        return deferToThread(self.release, list(messages))

    def close(self) -> None:
        """Release the store's files and locks."""
        self.storage.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
