"""The consumer's side: ``dropr.Store``, the messages a server received."""

from __future__ import annotations

import os
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from dropr._message import Message, validate_channel
from dropr.interfaces import IStorage, QueueStats
from dropr.storage.files._storage import FilesystemStorage


def open_storage(path: str, **options: object) -> IStorage:
    """The storage at ``path``: SQLite for a ``.sqlite`` file, else a directory."""
    if path.endswith((".sqlite", ".sqlite3", ".db")):
        from dropr.storage._sqlite import SQLiteStorage

        return SQLiteStorage(path, **options)  # type: ignore[arg-type]
    return FilesystemStorage(path, **options)  # type: ignore[arg-type]


class Store:
    """A server's store, read by consumers: one queue per channel.

    Several consumers, in one process or many, may take from the same
    channel: a taken message is leased to its taker and no one else gets it
    until the lease expires or it is released.  Ack what you processed, fail
    what you cannot process (it moves to the failed area with your reason).

    :param path: the store directory the dropr-server writes (or an
        ``IStorage`` provider).
    :param lease: default seconds a taken message stays yours.
    """

    def __init__(self, path: str | IStorage, *, lease: float = 60.0) -> None:
        if isinstance(path, str):
            if not os.path.isdir(path) and not os.path.isfile(path):
                raise FileNotFoundError(
                    f"no store at {path}: give the --store directory of a dropr-server"
                )
            self.storage: IStorage = open_storage(path, lease=lease)
        else:
            self.storage = path

    def take(self, channel: str, limit: int = 100, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``channel`` in delivery order."""
        validate_channel(channel)
        return self.storage.take(channel, limit, lease)  # type: ignore[return-value]

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
        return self.storage.queues()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, QueueStats]:
        """Depth, bytes, oldest age, taken and failed counts per channel."""
        return self.storage.stats()  # type: ignore[no-any-return]

    def failed(self, channel: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Failed messages of ``channel`` with their reasons."""
        return self.storage.failed(channel, limit)  # type: ignore[no-any-return]

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
