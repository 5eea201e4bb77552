"""Every interface of dropr, in one place.

Implementations declare themselves with ``@implementer`` and the tests check
each with ``verifyObject``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface

from dropr._message import Message


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


@dataclass(frozen=True, slots=True)
class OpenMessage:
    """A message waiting or taken, as the ``dropr`` command lists it."""

    #: The message, with a receipt: ``ack``, ``fail`` and ``release`` of the
    #: storage that listed it accept it (settling it as its taker would).
    message: Message
    queue: str
    #: When its lease runs out (seconds since the epoch); None when it was
    #: never taken or was released.  A lease in the past means waiting.
    lease_expires: float | None = None
    #: Whose lease it is: the ``owner`` of the storage object that took it.
    lease_owner: str | None = None
    #: Where the storage keeps it, for people (a file below the store, say).
    location: str = ""


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """A message in a failed area, with why and when it failed."""

    message: Message
    queue: str
    reason: str
    #: Seconds since the epoch.
    failed_at: float
    location: str = ""


@dataclass(frozen=True, slots=True)
class SetAside:
    """Something a storage could not read and set aside (a quarantined file, say)."""

    location: str
    reason: str
    #: When it was set aside, in seconds since the epoch.
    time: float
    size: int


class IStorage(Interface):
    """Durable named queues of messages, handed out in delivery order.

    A queue is named by a string: the destination in a client spool, the
    channel in a server store.  Delivery order within a queue is priority
    (0 first), then the order messages were added.
    """

    def add(queue: str, messages: Sequence[Message]) -> list[str]:
        """Store ``messages`` (a sequence of ``Message``) in ``queue``.

        Returns the ids of the messages that were stored by this call.
        Durable on return: a crash or power loss after the return loses none
        of them.  Idempotent by id where the storage keeps a dedup record: a
        message whose id is already known is not stored again, and its id is
        not in the returned list.  The record is the storage's own; no word
        of the caller lets it skip the look-up.  Raises ``StorageFull``
        (storing nothing) when the limit is reached.
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

    def stats(queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """A ``QueueStats`` for every queue in ``queues()``.

        Given ``queues``, only for those of them that hold messages (waiting
        or failed): the cost is that of the named queues, not of the whole
        storage, so a caller that shows a few of many pays for those few.
        """

    def failed(queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` messages of the failed area of ``queue``, with reasons.

        Returns ``(message, reason)`` pairs, oldest first.
        """

    def close() -> None:
        """Release files and locks.  The storage is unusable afterwards."""


class IUsage(Interface):
    """What a storage holds, cheaply: for limits, metrics and the status page."""

    def usage() -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting (not acked or failed).

        Kept as running figures, not counted by a walk of the storage, so it
        may be called often; another process's changes may show a little late.
        """


class IReceivingStore(IStorage, IUsage):
    """What dropr-server needs of a store, beyond ``IStorage``.

    Exactly once rests on the store's own record of ids: ``store`` is
    idempotent by id within ``dedup_window``, and refuses older ids.
    """

    dedup_window = Attribute("Seconds a stored id is remembered (float).")

    def oldest_accepted_id() -> str:
        """Ids that sort below this are older than the dedup window.

        Such an id may have been stored and forgotten, so the server refuses
        it (permanently) rather than risk storing it twice.
        """

    def store(
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store one request's messages: ``(channel, messages)`` pairs.

        All or nothing: on any error (``StorageFull``, ``InvalidMessage``,
        a disk error) nothing of the call is stored.  Idempotent by id: ids
        already stored are skipped.  Returns the ids stored by this call.
        ``records`` may give, by id, a message already framed as the
        storage's batch files hold it; a storage may write it as it is.
        Durable on return.
        """

    def channel_count() -> int:
        """How many channels exist (hold or held messages and are not yet removed)."""

    def upkeep() -> None:
        """The serving daemon's periodic work (about once a second, in a thread).

        Checkpoints, pruning of ids older than the window, removal of
        drained channels; never raises for a full disk.
        """


class ISpoolStorage(IStorage, IUsage):
    """What dropr-client needs of its spool, beyond ``IStorage``."""

    def queue_names() -> list[str]:
        """Queues (destinations) that may hold messages; cheap, no walk."""

    def count_usage() -> tuple[int, int]:
        """Count what waits now (a walk, perhaps) and make it the figure ``usage`` reports.

        The client daemon calls it at each rescan, in its disk thread, so
        producers' limit checks read fresh figures without a walk of their own.
        """


class IWakeSource(Interface):
    """Tells a consumer that a queue got messages, instead of polling."""

    def watch(queue: str, callback: Callable[[], None], reactor: Any) -> Callable[[], None]:
        """Call ``callback`` (in the reactor thread) after messages were added to ``queue``.

        Returns a function that stops the watch.  A missed wake-up must only
        delay a consumer until its next poll, never lose a message.
        """


class ITransport(Interface):
    """Carries batches of messages to a destination."""

    def send(destination: str, messages: Sequence[Message]) -> Any:
        """Send ``messages`` to ``destination``; a Deferred of ``SendResult`` objects.

        Returns a Deferred that fires with a list of ``SendResult``, one per
        message, or fails when the destination could not be reached (in
        which case nothing can be assumed stored).
        """

    def close() -> Any:
        """Let go of connections; a Deferred that fires once they are closed."""


class IMessageAdmin(Interface):
    """What the ``dropr`` command needs of a spool or store beyond ``IStorage``.

    Lists messages by state, settles them by id, and empties the failed
    area.  Safe beside a running daemon: the storage's own locking orders
    these calls with its takes and adds.
    """

    owner = Attribute(
        "The lease owner (str) of what this object's take() claims: the receipt "
        "``dropr take`` prints and ``OpenMessage.lease_owner`` shows."
    )

    def open_messages(queue: str, since: float = 0.0) -> Iterator[OpenMessage]:
        """The messages of ``queue`` waiting or taken, in delivery order.

        ``since`` (seconds since the epoch) lets the storage skip messages
        put before then where that is cheap (a search by id starts at the
        id's time); it may yield older ones too.
        """

    def failed_messages(queue: str) -> Iterator[FailedMessage]:
        """The failed area of ``queue``, oldest failure first."""

    def requeue_failed(queue: str, ids: Collection[str]) -> list[str]:
        """Move the failed messages ``ids`` of ``queue`` back behind what waits there.

        They keep their id, priority and creation time.  Each is durable in
        the queue before it leaves the failed area (a crash in between leaves
        it in both, never in neither).  Returns the ids moved; ids not in the
        failed area, or that cannot be read whole, are left where they are.
        """

    def purge_failed(queue: str, ids: Collection[str]) -> list[str]:
        """Delete the failed messages ``ids`` of ``queue`` for good; return the ids deleted."""

    def purge_processed(older_than: float, queue: str | None = None) -> int:
        """Delete what acked and failed messages left behind, older than ``older_than`` s.

        Returns how many pieces went (buckets of batch files, say); 0 where
        an ack deletes at once.
        """

    def set_aside() -> list[SetAside]:
        """What the storage could not read and set aside, oldest first."""

    def purge_set_aside(older_than: float) -> list[SetAside]:
        """Delete what was set aside at least ``older_than`` seconds ago; return it."""
