"""The client daemon's put log: where a put through the socket is durable first.

A group of puts is appended to the current segment of the log and synced
with one ``fdatasync``: the cheapest durable write there is (no new file,
no rename, no directory sync), so a put answered from the socket costs one
flush shared by everything that arrived with it.  The daemon then sends the
messages from memory (:mod:`dropr.client._front`); a record is no longer
needed once the server stored its message or it was moved into the spool.

Layout: ``<spool>/putlog/<16 digits>.log``, each segment the batch file's
magic followed by its records (:mod:`dropr.storage._batchfile`, destination
included).  A segment is created, synced and its directory synced before
anything is written to it, so an answered record is never in a file whose
name a power loss could take away.  A segment whose records are all done
is removed once a newer one is current.

At start, before the socket accepts anything and before any sender runs,
the daemon moves what the segments left behind hold into the spool (one
batch per destination and priority, in the log's order), syncs, and
removes them.  A record whose message the server had already stored is
sent again, and the server's dedup keeps one copy; a record cut short by a
crash was never answered (its caller got no 200), so it is dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Sequence

from dropr._message import Message
from dropr.storage import _batchfile as batchfile

LOG_DIR = "putlog"
#: A segment that grew past this is closed and a new one started.
SEGMENT_BYTES = 8 * 1024 * 1024
_SEGMENT_RE = re.compile(r"([0-9]{16})\.log\Z")


def log_dir(spool_path: str) -> str:
    """The put log's directory in the spool at ``spool_path``."""
    return os.path.join(spool_path, LOG_DIR)


class Segment:
    """One file of the log and how many of its records are still needed."""

    __slots__ = ("fd", "needed", "number", "path", "size")

    def __init__(self, number: int, path: str, fd: int, size: int) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size
        self.needed = 0

    def __repr__(self) -> str:
        return f"<Segment {self.number} needed={self.needed}>"


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segments(spool_path: str) -> list[tuple[int, str]]:
    """The log's segments in the spool, oldest first: ``(number, path)``."""
    where = log_dir(spool_path)
    try:
        names = os.listdir(where)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _SEGMENT_RE.match(name)
        if m is not None:
            found.append((int(m.group(1)), os.path.join(where, name)))
    return sorted(found)


def recover(spool_path: str, add: Callable[[str, list[Message], str], object]) -> int:
    """Move what the log's segments hold into the spool, then remove them.

    ``add(destination, messages, batch_id)`` stores a destination's
    messages as one batch filed under ``batch_id``: the oldest of their ids,
    so that they go before anything their producers wrote themselves after
    the daemon stopped answering (a producer's ids only grow).  Called at
    the daemon's start, before anything is accepted or sent.  Returns how
    many messages were moved.  Should ``add`` fail, it raises and the
    segments stay for the next start: nothing is lost.
    """
    found = segments(spool_path)
    groups: dict[str, list[Message]] = {}
    for _number, path in found:
        with open(path, "rb") as f:
            data = f.read()
        # A record cut short at the end was never answered: what decodes is
        # what was synced before some caller got its 200.
        for m in batchfile.decode(data).messages:
            if m.destination is not None:
                groups.setdefault(m.destination, []).append(m)
    for destination, messages in groups.items():
        add(destination, messages, min(m.id for m in messages))
    for _number, path in found:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if found:
        _sync_dir(log_dir(spool_path))
    return sum(len(ms) for ms in groups.values())


class PutLog:
    """The daemon's log of answered puts, segment by segment.

    ``append`` runs on one writer thread; ``done`` may be called from any
    thread.  :meth:`open` it after :func:`recover`.
    """

    def __init__(self, spool_path: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.spool_path = spool_path
        self.dir = log_dir(spool_path)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: dict[int, Segment] = {}
        self._closed = True
        self._next = 1
        self._current: Segment | None = None

    def open(self) -> None:
        """Start a new segment (after :func:`recover` emptied the log)."""
        if not os.path.isdir(self.dir):
            os.mkdir(self.dir, 0o700)
            _sync_dir(os.path.dirname(self.dir))
        existing = segments(self.spool_path)
        with self._lock:
            self._next = existing[-1][0] + 1 if existing else 1
            self._current = self._new_segment()
            self._closed = False

    def _new_segment(self) -> Segment:
        number = self._next
        self._next += 1
        path = os.path.join(self.dir, f"{number:016d}.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, batchfile.MAGIC)
            os.fsync(fd)
            _sync_dir(self.dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        segment = Segment(number, path, fd, len(batchfile.MAGIC))
        self._segments[number] = segment
        return segment

    def append(self, messages: Sequence[Message]) -> Segment:
        """Write ``messages`` and sync them; the segment now holds them.

        Each message counts as needed in the segment until :meth:`done`.
        Raises ``OSError`` (the disk is full, say) having counted nothing:
        a torn record at the end is skipped by :func:`recover`, and the
        next append starts a new segment so nothing follows it.
        """
        chunks = batchfile.encode(messages)
        data = b"".join(chunks[1:])
        with self._lock:
            if self._closed or self._current is None:
                raise OSError("the put log is not open")
            segment = self._current
            if segment.size >= self.segment_bytes:
                segment = self._rotate()
        try:
            written = os.write(segment.fd, data)
            while written < len(data):
                written += os.write(segment.fd, data[written:])
            os.fdatasync(segment.fd)
        except BaseException:
            with self._lock:
                # Whatever part of this write reached the file is garbage in
                # the middle of a segment: start afresh for the next group.
                segment.size = self.segment_bytes
            raise
        with self._lock:
            segment.size += len(data)
            segment.needed += len(messages)
        return segment

    def _rotate(self) -> Segment:
        old = self._current
        current = self._current = self._new_segment()
        if old is not None and old.needed == 0:
            self._remove(old)
        return current

    def done(self, segment: Segment, count: int) -> None:
        """``count`` messages of ``segment`` are stored by the server or in the spool."""
        with self._lock:
            segment.needed -= count
            if segment.needed <= 0 and segment is not self._current:
                self._remove(segment)

    def _remove(self, segment: Segment) -> None:
        # No directory sync: a removal a power loss undoes only has the
        # segment's messages moved into the spool again at the next start,
        # and the server's dedup keeps one copy of each.
        self._segments.pop(segment.number, None)
        with contextlib.suppress(OSError):
            os.close(segment.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segment.path)

    @property
    def needed(self) -> int:
        """Messages in the log not yet stored by a server or moved to the spool."""
        with self._lock:
            return sum(s.needed for s in self._segments.values())

    def close(self) -> None:
        """Close the files; segments whose records are all done are removed."""
        with self._lock:
            self._closed = True
            for segment in list(self._segments.values()):
                if segment.needed <= 0:
                    self._remove(segment)
                else:
                    with contextlib.suppress(OSError):
                        os.close(segment.fd)
            self._segments.clear()
            self._current = None
