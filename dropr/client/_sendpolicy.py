"""What a sender decides, as plain functions: no reactor, no disk, no clock of their own.

:class:`~dropr.client._sender.DestinationSender` wires these to the spool,
the transport and the reactor; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from dropr._ids import id_time
from dropr._message import Message
from dropr.interfaces import SendResult
from dropr.wire import AnswerResults, WireBatch


def split_too_old(
    batch: Sequence[Message], now: float, max_age: float
) -> tuple[list[Message], list[Message]]:
    """``(fresh, too_old)``: messages put more than ``max_age`` seconds before ``now`` fail."""
    if not batch:
        return [], []
    # Ids sort by time: when the oldest is young enough, all are, and no id
    # needs its time parsed.
    if now - id_time(min(m.id for m in batch)) <= max_age:
        return list(batch), []
    fresh = [m for m in batch if now - m.created <= max_age]
    too_old = [m for m in batch if now - m.created > max_age]
    return fresh, too_old


def any_too_old(ids: Sequence[str], now: float, max_age: float) -> bool:
    """True if an id of ``ids`` was made more than ``max_age`` seconds before ``now``."""
    return bool(ids) and now - id_time(min(ids)) > max_age


def too_old_reason(destination: str, max_age: float) -> str:
    """The reason a message that outlived ``max_age`` fails with."""
    return f"not delivered to {destination} within the maximum age of {max_age:.0f} s"


def trim_to_bytes(batch: Sequence[Message], max_bytes: int) -> tuple[list[Message], list[Message]]:
    """``(send, give_back)``: the longest head of ``batch`` within ``max_bytes`` of payload.

    The first message always goes, however large: a batch of one is the
    least a sender can send, and the server judges its size.
    """
    size = 0
    for n, m in enumerate(batch):
        size += len(m.payload)
        if size > max_bytes and n > 0:
            return list(batch[:n]), list(batch[n:])
    return list(batch), []


@dataclass
class Answer:
    """A server's answer to a batch, sorted by what the sender does next."""

    #: Durable at the server: ack them.
    stored: list[Message] | WireBatch = field(default_factory=list)
    #: Refused for good, by reason: fail them with it.
    refused: dict[str, list[Message]] = field(default_factory=dict)
    #: Refused for now, or not answered at all: release them to send again.
    retry: list[Message] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(len(group) for group in self.refused.values())


def sort_answer(batch: Sequence[Message], results: Sequence[SendResult]) -> Answer:
    """Sort ``batch`` by the server's ``results``.

    A message the answer does not name is sent again: only a "stored" lets
    a message go, and a failure needs a reason from the server.
    """
    if isinstance(results, AnswerResults) and results.all_stored:
        ids = batch.ids if isinstance(batch, WireBatch) else [m.id for m in batch]
        if results.ids == ids:
            # A wire batch stays one: its storage acks it without objects.
            return Answer(stored=batch if isinstance(batch, WireBatch) else list(batch))
    by_id = {r.id: r for r in results}
    stored: list[Message] = []
    answer = Answer(stored=stored)
    for m in batch:
        r = by_id.get(m.id)
        if r is not None and r.stored:
            stored.append(m)
        elif r is not None and r.permanent:
            answer.refused.setdefault(r.reason, []).append(m)
        else:
            answer.retry.append(m)
    return answer


class Next(Enum):
    """What a sender does after a batch was answered."""

    #: All settled: take the next batch.
    SENT = "sent"
    #: Some are to be sent again, and the server made progress: at once.
    AGAIN = "again"
    #: The server stored nothing and failed nothing: wait before trying again.
    BACKOFF = "backoff"


def next_step(answer: Answer) -> Next:
    """What follows ``answer``."""
    if not answer.retry:
        return Next.SENT
    if answer.stored or answer.failed:
        return Next.AGAIN
    return Next.BACKOFF


def backoff_delay(failures: int, base: float, cap: float, random: Callable[[], float]) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1, 2, ...).

    Exponential from ``base``, at most ``cap``, with jitter: a factor
    between 0.5 and 1 from ``random()`` (in [0, 1)), so that clients cut off
    together do not come back together.
    """
    delay = min(cap, base * 2.0 ** max(0, failures - 1))
    return delay * (0.5 + 0.5 * random())


def smaller_batch(count: int) -> int:
    """The batch limit after a batch of ``count`` was refused as too large."""
    return max(1, count // 2)
