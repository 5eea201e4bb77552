"""Test support for code that uses dropr, shipped with it (as ``treq.testing`` is).

Fast fakes, for unit tests without disks, sockets or real seconds:

* :class:`MemoryStorage`: a spool or store in memory with the semantics of
  the durable ones (ordering, leases, the failed area, dedup, limits); it
  provides every storage interface, so a sender, a consumer, the ``dropr``
  command's functions or your own code can run on it.
* :class:`FakeTransport`: an ``ITransport`` that records what was sent and
  answers as you tell it (stored, refused, unreachable, or held until you
  answer by hand).
* :class:`StubServer`: a dropr-server in memory.  Its ``transport`` carries
  batches over the wire format into a store (a ``MemoryStorage`` with dedup
  by default) and answers as dropr-server does: "stored" for new and
  already-known ids, a final refusal for ids older than the store's dedup
  window or dated far ahead.
* :func:`run_now`: runs spool operations at once, where the client daemon
  uses a thread, so a ``DestinationSender`` runs on a ``MemoryReactorClock``.

For end-to-end tests, :class:`ServerProcess` and :class:`ClientProcess` run
the real daemons as ``twistd`` processes (slow: real processes, real seconds).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from dropr._daemonprocess import (
    ClientProcess,
    DaemonDidNotStart,
    DaemonProcess,
    ServerProcess,
    free_port,
    twistd_command,
    wait_until,
)
from dropr._message import Message
from dropr.client._sender import run_now
from dropr.client._transport import BatchTooLarge, DestinationUnavailable
from dropr.errors import InvalidMessage, StorageFull
from dropr.interfaces import IReceivingStore, ITransport, SendResult
from dropr.storage._memory import MemoryStorage
from dropr.wire import decode_answer, encode_answer, encode_batch, parse_batch

__all__ = [
    "ClientProcess",
    "DaemonDidNotStart",
    "DaemonProcess",
    "FakeTransport",
    "MemoryStorage",
    "PendingSend",
    "ServerProcess",
    "StubServer",
    "free_port",
    "refused",
    "run_now",
    "stored",
    "twistd_command",
    "wait_until",
]

#: ``answer(destination, messages)``: the results of a send, or raise to fail it.
Answer = Callable[[str, Sequence[Message]], Sequence[SendResult]]


def stored(destination: str, messages: Sequence[Message]) -> list[SendResult]:
    """An ``Answer``: every message stored."""
    return [SendResult(m.id, True) for m in messages]


def refused(reason: str) -> Answer:
    """An ``Answer``: every message refused for good with ``reason``."""

    def answer(destination: str, messages: Sequence[Message]) -> list[SendResult]:
        return [SendResult(m.id, False, reason, permanent=True) for m in messages]

    return answer


@dataclass
class PendingSend:
    """A send a held :class:`FakeTransport` has not answered yet."""

    destination: str
    messages: list[Message]
    deferred: Deferred[list[SendResult]]

    def answer(self, results: Answer = stored) -> None:
        """Answer with ``results(destination, messages)``."""
        self.deferred.callback(list(results(self.destination, self.messages)))

    def fail(self, error: Exception | None = None) -> None:
        """Fail the send: the destination could not be reached."""
        self.deferred.errback(error or DestinationUnavailable("connection refused (fake)"))


@implementer(ITransport)
class FakeTransport:
    """An ``ITransport`` that records sends and answers with ``answer``.

    ``answer(destination, messages)`` returns the results or raises
    (:class:`~dropr.client._transport.DestinationUnavailable`, say, for a
    server that cannot be reached).  With ``hold=True`` every send waits in
    :attr:`pending` until the test answers it, to look at a sender with a
    batch in flight.
    """

    def __init__(self, answer: Answer = stored, *, hold: bool = False) -> None:
        self.answer = answer
        self.hold = hold
        #: Every send, in order: ``(destination, messages)``.
        self.sent: list[tuple[str, list[Message]]] = []
        self.pending: list[PendingSend] = []
        self.closed = False

    def send(self, destination: str, messages: Sequence[Message]) -> Deferred[list[SendResult]]:
        batch = list(messages)
        self.sent.append((destination, batch))
        if self.hold:
            d: Deferred[list[SendResult]] = Deferred()
            self.pending.append(PendingSend(destination, batch, d))
            return d
        try:
            return succeed(list(self.answer(destination, batch)))
        except Exception as e:
            return fail(e)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


class StubServer:
    """A dropr-server in memory: its :attr:`transport` delivers into :attr:`store`.

    Each send is encoded as a batch request, parsed as the server parses it
    and stored with one all-or-nothing ``store()``, so what a consumer takes
    from :attr:`store` is what a real server would hold.  Set :attr:`down`
    to make the server unreachable, :attr:`max_messages` to refuse larger
    requests as too large (HTTP 413).
    """

    def __init__(
        self,
        store: IReceivingStore | None = None,
        *,
        max_payload: int = 16 * 1024 * 1024,
        max_messages: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: Any = store if store is not None else MemoryStorage(dedup=True, clock=clock)
        self.max_payload = max_payload
        self.max_messages = max_messages
        self.down = False
        self._clock = clock
        self.transport = FakeTransport(self._answer)

    def _answer(self, destination: str, messages: Sequence[Message]) -> Sequence[SendResult]:
        if self.down:
            raise DestinationUnavailable(f"{destination} cannot be reached (stub server down)")
        if len(messages) > self.max_messages:
            raise BatchTooLarge(
                f"more than {self.max_messages} messages in one request; send smaller batches"
            )
        parsed = parse_batch(
            io.BytesIO(encode_batch(messages)), self.max_payload, self.max_messages
        )
        rejected = dict(parsed.rejected)
        oldest = self.store.oldest_accepted_id()
        newest = f"{int((self._clock() + 3600) * 1000):012x}"
        accepted: dict[str, list[Message]] = {}
        for m in parsed.messages:
            if m.id < oldest:
                rejected[m.id] = "message is older than this server's dedup window"
            elif m.id[:12] > newest:
                rejected[m.id] = "message id is dated more than an hour ahead of this server"
            else:
                accepted.setdefault(m.channel, []).append(m)
        try:
            self.store.store(list(accepted.items()))
        except StorageFull as e:
            raise DestinationUnavailable(f"{destination} answered HTTP 507: {e}") from e
        except InvalidMessage as e:
            return [SendResult(m.id, False, str(e), permanent=True) for m in messages]
        ids = [m.id for group in accepted.values() for m in group]
        return decode_answer(encode_answer(ids, rejected), messages)
