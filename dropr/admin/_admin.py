"""Messages of a spool or store by id: the core of the ``dropr`` command.

``dropr list``, ``show``, ``take``, ``ack``, ``fail``, ``requeue`` and
``purge`` are thin shells over these plain functions, which tests call
directly.  They work on a :class:`~dropr.storage.files._storage.FilesystemStorage`
opened beside the daemon (as producers and consumers open it): no lock of
the daemon is needed, and the daemon may run meanwhile.

States of a message, as listed:

``waiting``
    in its queue, not taken (or its lease ran out).
``taken``
    in its queue under a live lease: a consumer (or, in a spool, the
    client daemon sending it) holds it.
``failed``
    in the failed area, with the reason it failed.

Acked messages are gone from view; their files are deleted as soon as
their whole bucket is done (see :func:`purge_processed`).

Moves out of the failed area (requeue, purge) keep messages safe at every
instant: a requeued message is durable in its queue before it leaves the
failed area, so a crash in between leaves it in both (it is then delivered
and still listed as failed), never in neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dropr._ids import id_millis, id_time
from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._durable import fsync_dir, rename_into, write_new_file
from dropr.storage.files._layout import Layout, encode_queue, read_why
from dropr.storage.files._storage import FilesystemStorage

WAITING = "waiting"
TAKEN = "taken"
FAILED = "failed"
STATES = (WAITING, TAKEN, FAILED)

#: A sender's clock may run ahead of the server's by this much (the
#: receiver's MAX_CLOCK_SKEW), so a message may be dated after its batch.
_SKEW_MS = 3600 * 1000

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
    #: the batch file that holds it, relative to the root
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


def queues(storage: FilesystemStorage) -> list[str]:
    """Every queue with a directory or a failed area, sorted."""
    layout = Layout(storage.path)
    names: set[str] = set()
    for top in (layout.queues_dir, layout.failed_dir):
        names.update(name for name, _path in layout.queue_dirs(top))
    return sorted(names)


def entries(
    storage: FilesystemStorage,
    queue: str | None = None,
    states: Iterable[str] = STATES,
    channel: str | None = None,
    since_ms: int = 0,
    now: float | None = None,
) -> Iterator[Entry]:
    """Messages in ``states``, queue by queue, each queue in delivery order.

    ``queue`` and ``channel`` narrow the walk; ``since_ms`` skips buckets
    older than that (a search by id starts at the id's time).
    """
    wanted = set(states)
    now_ms = int((time.time() if now is None else now) * 1000)
    paths: dict[tuple[str, str], str] = {}
    for q in [queue] if queue is not None else queues(storage):
        if wanted & {WAITING, TAKEN}:
            for m, lease in storage.open_messages(q, since_ms):
                if channel is not None and m.channel != channel:
                    continue
                live = lease is not None and lease[0] > now_ms
                state = TAKEN if live else WAITING
                if state not in wanted:
                    continue
                key = (getattr(m.receipt, "bucket", ""), getattr(m.receipt, "batch_id", ""))
                path = paths.get(key)
                if path is None:
                    path = paths[key] = _batch_path(storage, *key)
                yield Entry(
                    m,
                    q,
                    state,
                    path,
                    lease[0] / 1000.0 if lease is not None else None,
                    lease[1] if lease is not None else None,
                )
        if FAILED in wanted:
            for fb in failed_batches(storage, q):
                for m in fb.messages:
                    if channel is None or m.channel == channel:
                        yield Entry(
                            m,
                            q,
                            FAILED,
                            os.path.relpath(fb.path, storage.path),
                            reason=fb.reason,
                            failed_at=fb.failed_at,
                        )


def _batch_path(storage: FilesystemStorage, bucket: str, batch_id: str) -> str:
    for name in _listdir(bucket):
        if name.startswith(batch_id):
            return os.path.relpath(os.path.join(bucket, name), storage.path)
    return os.path.relpath(bucket, storage.path) if bucket else ""


def find(
    storage: FilesystemStorage,
    ids: Iterable[str],
    states: Iterable[str] = STATES,
    progress: Progress = _no_progress,
) -> dict[str, Entry]:
    """The entries of ``ids``, wherever they are; ids not found are left out.

    Each queue is searched from the time of the oldest id on (a message
    never sits in a bucket older than itself, give or take the clock skew
    a server accepts), and the search stops once every id is found.
    """
    wanted = set(ids)
    found: dict[str, Entry] = {}
    if not wanted:
        return found
    since_ms = max(0, min(id_millis(i) for i in wanted) - _SKEW_MS)
    names = queues(storage)
    for n, q in enumerate(names):
        progress(n, len(names))
        for entry in entries(storage, q, states, since_ms=since_ms):
            if entry.id in wanted and entry.id not in found:
                found[entry.id] = entry
                if len(found) == len(wanted):
                    progress(len(names), len(names))
                    return found
    progress(len(names), len(names))
    return found


# -- taking and settling by id ---------------------------------------------------------


@dataclass
class Settled:
    """What :func:`settle` did: ids settled, and why the others were not."""

    done: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def settle(
    storage: FilesystemStorage,
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


@dataclass
class FailedBatch:
    """One file of a queue's failed area, and which of its messages are chosen."""

    queue: str
    path: str
    name: BatchName
    reason: str
    failed_at: float
    messages: list[Message]
    #: indexes of the messages an operation applies to
    chosen: list[int] = field(default_factory=list)
    #: why the file could not be read whole ("" when it could)
    damage: str = ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def failed_batches(storage: FilesystemStorage, queue: str) -> Iterator[FailedBatch]:
    """The failed area of ``queue``, oldest failure first."""
    fdir = os.path.join(storage.failed_dir, encode_queue(queue))
    for name in _listdir(fdir):
        bn = BatchName.parse(name)
        if bn is None:
            continue
        path = os.path.join(fdir, name)
        reason, failed_at = "(reason unreadable)", id_time(bn.batch_id)
        why = read_why(Layout.why_of_failed(fdir, bn))
        if why is not None:
            reason = str(why.get("reason", reason))
            with contextlib.suppress(ValueError, TypeError):
                failed_at = float(why.get("time", failed_at))
        try:
            with open(path, "rb") as f:
                decoded = batchfile.decode(f.read())
        except FileNotFoundError:
            continue  # requeued or purged meanwhile
        damage = decoded.error
        if not damage and len(decoded.messages) != bn.count:
            damage = f"holds {len(decoded.messages)} messages, its name says {bn.count}"
        yield FailedBatch(queue, path, bn, reason, failed_at, decoded.messages, damage=damage)


def select_failed(
    storage: FilesystemStorage,
    queue: str | None = None,
    channel: str | None = None,
    ids: Iterable[str] | None = None,
    older_than: float | None = None,
    now: float | None = None,
) -> list[FailedBatch]:
    """Failed batches with the messages that match every criterion given chosen.

    ``ids`` picks messages by id; ``older_than`` (seconds) those that failed
    at least that long ago.  Batches with nothing chosen are left out.
    """
    id_set = set(ids) if ids is not None else None
    now = time.time() if now is None else now
    out: list[FailedBatch] = []
    for q in [queue] if queue is not None else queues(storage):
        for fb in failed_batches(storage, q):
            if older_than is not None and now - fb.failed_at < older_than:
                continue
            fb.chosen = [
                i
                for i, m in enumerate(fb.messages)
                if (channel is None or m.channel == channel) and (id_set is None or m.id in id_set)
            ]
            if fb.chosen:
                out.append(fb)
    return out


def count_chosen(selection: Iterable[FailedBatch]) -> int:
    """How many messages ``selection`` applies to."""
    return sum(len(fb.chosen) for fb in selection)


@contextlib.contextmanager
def _failed_dir_lock(path: str) -> Iterator[None]:
    # Two tools rewriting one failed file at once could each keep messages
    # the other removed; the directory's own flock orders them.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite_failed(storage: FilesystemStorage, fb: FailedBatch) -> None:
    """Take the chosen messages out of ``fb``'s file, keeping the rest there."""
    fdir = os.path.dirname(fb.path)
    chosen = set(fb.chosen)
    keep = [m for i, m in enumerate(fb.messages) if i not in chosen]
    if keep and not fb.damage:
        name = BatchName(fb.name.batch_id, len(keep), sum(len(m.payload) for m in keep))
        tmp = write_new_file(storage.tmp_dir, fb.name.batch_id, batchfile.encode(keep))
        rename_into(tmp, fdir, str(name))
        if str(name) != os.path.basename(fb.path):
            os.unlink(fb.path)
    else:
        os.unlink(fb.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(fdir, f"{fb.name.batch_id}.why"))
    fsync_dir(fdir)


def _still_there(fb: FailedBatch) -> bool:
    """True if ``fb``'s file is as it was read (no other tool changed it since)."""
    return os.path.exists(fb.path)


@dataclass
class Moved:
    """What a requeue or a purge did."""

    messages: int = 0
    #: failed files left alone because they could not be read whole
    damaged: list[str] = field(default_factory=list)


def requeue_failed(
    storage: FilesystemStorage,
    selection: list[FailedBatch],
    progress: Progress = _no_progress,
) -> Moved:
    """Move the chosen failed messages back to their queues, behind what waits.

    They keep their ids (so a server still recognises them), their
    priority and, in a spool, their age: a message that failed for being
    older than the client's ``--max-age`` fails again at once.
    """
    moved = Moved()
    for n, fb in enumerate(selection):
        progress(n, len(selection))
        if fb.damage:
            moved.damaged.append(os.path.relpath(fb.path, storage.path))
            continue
        with _failed_dir_lock(os.path.dirname(fb.path)):
            if not _still_there(fb):
                continue
            chosen = [fb.messages[i] for i in fb.chosen]
            # Durable in the queue first: a crash between the two steps
            # leaves a copy in both places, never in neither.
            storage.add(fb.queue, chosen)
            _rewrite_failed(storage, fb)
        moved.messages += len(chosen)
    progress(len(selection), len(selection))
    return moved


def purge_failed(
    storage: FilesystemStorage,
    selection: list[FailedBatch],
    progress: Progress = _no_progress,
) -> Moved:
    """Delete the chosen failed messages for good.

    A file that cannot be read whole is deleted only when every message
    that could be read from it is chosen (what could not be read is lost
    already; ``dropr fsck`` reports such files); otherwise it is left alone
    and named in the result.
    """
    moved = Moved()
    for n, fb in enumerate(selection):
        progress(n, len(selection))
        with _failed_dir_lock(os.path.dirname(fb.path)):
            if not _still_there(fb):
                continue
            if fb.damage and len(fb.chosen) < len(fb.messages):
                moved.damaged.append(os.path.relpath(fb.path, storage.path))
                continue
            _rewrite_failed(storage, fb)
        moved.messages += len(fb.chosen)
    progress(len(selection), len(selection))
    return moved


# -- processed messages and the quarantine -------------------------------------------------


def purge_processed(
    storage: FilesystemStorage,
    older_than: float,
    queue: str | None = None,
    progress: Progress = _no_progress,
) -> int:
    """Delete finished buckets (every message acked or failed) older than ``older_than`` s.

    A take deletes them on its way through a queue; a queue no one takes
    from any more keeps its last ones until this runs.  Returns how many
    buckets were deleted.
    """
    names = [queue] if queue is not None else queues(storage)
    removed = 0
    for n, q in enumerate(names):
        progress(n, len(names))
        removed += storage.remove_finished(q, older_than)
    progress(len(names), len(names))
    return removed


@dataclass(frozen=True)
class Quarantined:
    """A file in ``quarantine/`` and what its ``.why`` says."""

    path: str
    reason: str
    time: float
    size: int


def quarantined(storage: FilesystemStorage) -> list[Quarantined]:
    """What ``quarantine/`` holds, oldest first."""
    out: list[Quarantined] = []
    for name in _listdir(storage.quarantine_dir):
        if name.endswith(".why"):
            continue
        path = os.path.join(storage.quarantine_dir, name)
        reason, when = "(no .why file)", 0.0
        why = read_why(path + ".why")
        if why is not None:
            reason = str(why.get("reason", reason))
            with contextlib.suppress(ValueError, TypeError):
                when = float(why.get("time", 0.0))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        out.append(Quarantined(path, reason, when or st.st_mtime, st.st_size))
    return sorted(out, key=lambda q: q.time)


def purge_quarantine(
    storage: FilesystemStorage, older_than: float, now: float | None = None
) -> list[Quarantined]:
    """Delete quarantined files (and their ``.why``) older than ``older_than`` s."""
    now = time.time() if now is None else now
    gone = [q for q in quarantined(storage) if now - q.time >= older_than]
    for q in gone:
        for p in (q.path, q.path + ".why"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    if gone:
        fsync_dir(storage.quarantine_dir)
    return gone
