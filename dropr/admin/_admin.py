"""Messages of a spool or store by id: the core of the ``dropr`` command.

``dropr list``, ``show``, ``take``, ``ack``, ``fail``, ``requeue`` and
``purge`` are thin shells over these plain functions, which tests call
directly.  They need a storage's ``IStorage`` and ``IMessageAdmin`` only,
so they work on every store a spec can name.

States of a message, as listed:

``waiting``
    in its queue, not taken (or its lease ran out).
``taken``
    in its queue under a live lease: a consumer (or, in a spool, the
    client daemon sending it) holds it.
``failed``
    in the failed area, with the reason it failed.

Acked messages are gone from view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dropr._ids import id_time
from dropr._message import Message
from dropr.interfaces import IStorage, SetAside
from dropr.storage._adapt import message_admin

WAITING = "waiting"
TAKEN = "taken"
FAILED = "failed"
STATES = (WAITING, TAKEN, FAILED)

#: A sender's clock may run ahead of the server's by this much (the
#: receiver's MAX_CLOCK_SKEW), so a message may be dated after its batch.
_SKEW = 3600.0

#: ``progress(done, total)``; total is None when unknown.
Progress = Callable[[int, int | None], None]


def _no_progress(done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class Entry:
    """One message as the tools see it: where it is and in what state."""

    message: Message
    #: the queue: the channel in a store, the destination in a spool
    queue: str
    state: str
    #: where the storage keeps it (a batch file below the root, say)
    path: str
    #: lease expiry (seconds since the epoch) and owner, when it was taken
    lease_expires: float | None = None
    lease_owner: str | None = None
    #: why it failed, and when (failed messages only)
    reason: str = ""
    failed_at: float | None = None

    @property
    def id(self) -> str:
        return self.message.id

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The entry as JSON-ready data (without the payload)."""
        now = time.time() if now is None else now
        m = self.message
        data: dict[str, Any] = {
            "id": m.id,
            "state": self.state,
            "queue": self.queue,
            "channel": m.channel,
            "priority": m.priority,
            "size": len(m.payload),
            "created": m.created,
            "age": round(max(0.0, now - m.created), 3),
            "path": self.path,
        }
        if m.destination is not None:
            data["destination"] = m.destination
        if self.lease_expires is not None:
            data["lease_expires"] = self.lease_expires
            data["receipt"] = self.lease_owner
        if self.state == FAILED:
            data["reason"] = self.reason
            data["failed_at"] = self.failed_at
        return data


# -- looking -----------------------------------------------------------------------


def entries(
    storage: IStorage,
    queue: str | None = None,
    states: Iterable[str] = STATES,
    channel: str | None = None,
    since: float = 0.0,
    now: float | None = None,
) -> Iterator[Entry]:
    """Messages in ``states``, queue by queue, each queue in delivery order.

    ``queue`` and ``channel`` narrow the walk; ``since`` (seconds since the
    epoch) lets the storage skip what was put before then.
    """
    admin = message_admin(storage)
    wanted = set(states)
    now = time.time() if now is None else now
    for q in [queue] if queue is not None else storage.queues():
        if wanted & {WAITING, TAKEN}:
            for om in admin.open_messages(q, since):
                m = om.message
                if channel is not None and m.channel != channel:
                    continue
                live = om.lease_expires is not None and om.lease_expires > now
                state = TAKEN if live else WAITING
                if state in wanted:
                    yield Entry(m, q, state, om.location, om.lease_expires, om.lease_owner)
        if FAILED in wanted:
            for fm in admin.failed_messages(q):
                if channel is None or fm.message.channel == channel:
                    yield Entry(
                        fm.message,
                        q,
                        FAILED,
                        fm.location,
                        reason=fm.reason,
                        failed_at=fm.failed_at,
                    )


def find(
    storage: IStorage,
    ids: Iterable[str],
    states: Iterable[str] = STATES,
    progress: Progress = _no_progress,
) -> dict[str, Entry]:
    """The entries of ``ids``, wherever they are; ids not found are left out.

    Each queue is searched from the time of the oldest id on (a message is
    never stored before it was put, give or take the clock skew a server
    accepts), and the search stops once every id is found.
    """
    wanted = set(ids)
    found: dict[str, Entry] = {}
    if not wanted:
        return found
    since = max(0.0, min(id_time(i) for i in wanted) - _SKEW)
    names = storage.queues()
    for n, q in enumerate(names):
        progress(n, len(names))
        for entry in entries(storage, q, states, since=since):
            if entry.id in wanted and entry.id not in found:
                found[entry.id] = entry
                if len(found) == len(wanted):
                    progress(len(names), len(names))
                    return found
    progress(len(names), len(names))
    return found


def owner(storage: IStorage) -> str:
    """The receipt ``dropr take`` prints: the lease owner of ``storage``'s takes."""
    return str(message_admin(storage).owner)


# -- settling by id ------------------------------------------------------------------


@dataclass
class Settled:
    """What :func:`settle` did: ids settled, and why the others were not."""

    done: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def settle(
    storage: IStorage,
    ids: Iterable[str],
    action: str,
    reason: str = "",
    receipt: str | None = None,
    progress: Progress = _no_progress,
) -> Settled:
    """Ack (``action="ack"``) or fail taken messages found by id.

    A message qualifies while it is taken, that is leased and not released
    (a lease that ran out still counts, so a slow consumer can ack what it
    processed, unless someone else took it since).  With ``receipt`` (what
    ``dropr take`` printed) only leases of that taker qualify: an id taken
    by another consumer since is refused, not acked twice.
    """
    if action not in ("ack", "fail"):
        raise ValueError(f"action must be 'ack' or 'fail', not {action!r}")
    ids = list(dict.fromkeys(ids))
    found = find(storage, ids, (WAITING, TAKEN), progress)
    result = Settled()
    chosen: list[Message] = []
    for i in ids:
        entry = found.get(i)
        if entry is None:
            result.refused[i] = "not found among waiting or taken messages (acked already?)"
        elif entry.lease_owner is None:
            result.refused[i] = "not taken: take it first (dropr take)"
        elif receipt is not None and entry.lease_owner != receipt:
            result.refused[i] = (
                f"taken under receipt {entry.lease_owner}, not {receipt}: your lease "
                "ran out and another take claimed it"
            )
        else:
            chosen.append(entry.message)
            result.done.append(i)
    if chosen:
        if action == "ack":
            storage.ack(chosen)
        else:
            storage.fail(chosen, reason)
    return result


# -- the failed area ---------------------------------------------------------------


def select_failed(
    storage: IStorage,
    queue: str | None = None,
    channel: str | None = None,
    ids: Iterable[str] | None = None,
    older_than: float | None = None,
    now: float | None = None,
) -> list[Entry]:
    """The failed messages that match every criterion given.

    ``ids`` picks messages by id; ``older_than`` (seconds) those that failed
    at least that long ago.
    """
    id_set = set(ids) if ids is not None else None
    now = time.time() if now is None else now
    return [
        e
        for e in entries(storage, queue, [FAILED], channel)
        if (id_set is None or e.id in id_set)
        and (older_than is None or now - (e.failed_at or 0.0) >= older_than)
    ]


@dataclass
class Moved:
    """What a requeue or a purge did."""

    messages: int = 0
    #: ids chosen but left in the failed area: their file cannot be read whole
    left: list[str] = field(default_factory=list)


def _move(
    selection: list[Entry],
    op: Callable[[str, list[str]], list[str]],
    progress: Progress,
) -> Moved:
    by_queue: dict[str, list[str]] = {}
    for e in selection:
        by_queue.setdefault(e.queue, []).append(e.id)
    moved = Moved()
    for n, (q, ids) in enumerate(by_queue.items()):
        progress(n, len(by_queue))
        done = set(op(q, ids))
        moved.messages += len(done)
        moved.left.extend(i for i in ids if i not in done)
    progress(len(by_queue), len(by_queue))
    return moved


def requeue_failed(
    storage: IStorage, selection: list[Entry], progress: Progress = _no_progress
) -> Moved:
    """Move the ``selection`` of failed messages back to their queues, behind what waits.

    They keep their ids (so a server still recognises them), their
    priority and, in a spool, their age: a message that failed for being
    older than the client's ``--max-age`` fails again at once.
    """
    return _move(selection, message_admin(storage).requeue_failed, progress)


def purge_failed(
    storage: IStorage, selection: list[Entry], progress: Progress = _no_progress
) -> Moved:
    """Delete the ``selection`` of failed messages for good."""
    return _move(selection, message_admin(storage).purge_failed, progress)


# -- what acked messages leave behind, and what was set aside ---------------------------------


def purge_processed(storage: IStorage, older_than: float, queue: str | None = None) -> int:
    """Delete what acked and failed messages left behind, older than ``older_than`` s."""
    return int(message_admin(storage).purge_processed(older_than, queue))


def quarantined(storage: IStorage) -> list[SetAside]:
    """What the storage set aside as unreadable, oldest first."""
    return list(message_admin(storage).set_aside())


def purge_quarantine(storage: IStorage, older_than: float) -> list[SetAside]:
    """Delete what was set aside at least ``older_than`` seconds ago."""
    return list(message_admin(storage).purge_set_aside(older_than))
