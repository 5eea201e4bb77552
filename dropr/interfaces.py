"""Every interface of dropr, in one place.

Implementations declare themselves with ``@implementer`` and the tests check
each with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface

from dropr.message import Message


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Figures of one queue (a destination in a spool, a channel in a store)."""

    #: Messages waiting or taken, not yet acked or failed.
    depth: int
    #: Payload bytes of those messages.
    bytes: int
    #: Seconds since the oldest of them was put; 0.0 when there is none.
    oldest_age: float
    #: Messages under a lease that has not expired.
    taken: int
    #: Messages in the failed area.
    failed: int


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a server answered for one message."""

    id: str
    #: True when the message is durable in the server's store (or was already).
    stored: bool
    #: Why the server refused the message; empty when stored.
    reason: str = ""
    #: True when the refusal is final (retrying the same bytes cannot help).
    permanent: bool = False


class IStorage(Interface):
    """Durable named queues of messages, handed out in delivery order.

    A queue is named by a string: the destination in a client spool, the
    channel in a server store.  Delivery order within a queue is priority
    (0 first), then the order messages were added.
    """

    def add(queue: str, messages: Sequence[Message], fresh: bool = False) -> list[str]:
        """Store ``messages`` (a sequence of ``Message``) in ``queue``.

        Returns the ids of the messages that were stored by this call.
        Durable on return: a crash or power loss after the return loses none
        of them.  Idempotent by id where the storage keeps a dedup index: a
        message whose id is already known is not stored again, and its id is
        not in the returned list.  ``fresh=True`` promises that none of the
        ids was ever offered before, which lets a storage skip the lookup.
        Raises ``StorageFull`` (storing nothing) when the limit is reached.
        """

    def take(queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue`` in delivery order.

        A claimed message is not handed to anyone else until its lease
        (seconds; the storage's default when None) expires or it is released.
        """

    def ack(messages: Iterable[Message]) -> None:
        """Forget ``messages`` (taken from this storage): they are done."""

    def release(messages: Iterable[Message]) -> None:
        """Return taken ``messages`` to their queue, to be taken again."""

    def fail(messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area, with ``reason``."""

    def queues() -> list[str]:
        """The names of the queues that hold messages (waiting or failed)."""

    def stats() -> dict[str, QueueStats]:
        """A ``QueueStats`` for every queue in ``queues()``."""

    def failed(queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` messages of the failed area of ``queue``, with reasons.

        Returns ``(message, reason)`` pairs, oldest first.
        """

    def close() -> None:
        """Release files and locks.  The storage is unusable afterwards."""


class ITransport(Interface):
    """Carries batches of messages to a destination."""

    def send(destination: str, messages: Sequence[Message], fresh: bool = False) -> Any:
        """Send ``messages`` to ``destination``; a Deferred of ``SendResult`` objects.

        ``fresh`` says that none of the messages was ever sent before.

        Returns a Deferred that fires with a list of ``SendResult``, one per
        message, or fails when the destination could not be reached (in
        which case nothing can be assumed stored).
        """


class INotifier(Interface):
    """Wakes the sender when a producer put something in the spool."""

    wakeups = Attribute("How many wakeups were received since start.")
