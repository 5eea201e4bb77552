"""``IMessageAdmin`` for the file-system storage: what the ``dropr`` command needs.

Messages are listed from the batch files and state logs; the failed area is
rewritten file by file.  Moves out of the failed area keep messages safe at
every instant: a requeued message is durable in its queue before it leaves
the failed area, so a crash in between leaves it in both (it is then
delivered and still listed as failed), never in neither.

Provided by a wrapper around a :class:`FilesystemStorage`, opened beside the
daemon (as producers and consumers open it): no lock of the daemon is
needed, and the daemon may run meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from zope.interface import implementer

from dropr._ids import id_time
from dropr._message import Message
from dropr.interfaces import FailedMessage, IMessageAdmin, OpenMessage, SetAside
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._durable import fsync_dir, rename_into, write_new_file
from dropr.storage.files._layout import Layout, encode_queue, read_why
from dropr.storage.files._storage import FilesystemStorage


@dataclass
class _FailedFile:
    """One file of a queue's failed area."""

    path: str
    name: BatchName
    reason: str
    failed_at: float
    messages: list[Message]
    #: why the file could not be read whole ("" when it could)
    damage: str = ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[None]:
    # Two tools rewriting one failed file at once could each keep messages
    # the other removed; the directory's own flock orders them.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_why(path: str, reason: str, when: float) -> tuple[str, float]:
    why = read_why(path)
    if why is None:
        return reason, when
    try:
        return str(why.get("reason", reason)), float(why.get("time", when))
    except (ValueError, TypeError):
        return reason, when


@implementer(IMessageAdmin)
class FilesystemAdmin:
    """The ``IMessageAdmin`` of a :class:`FilesystemStorage`."""

    def __init__(self, storage: FilesystemStorage) -> None:
        self.storage = storage

    @property
    def owner(self) -> str:
        return self.storage.owner

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.storage.path)

    # -- looking -----------------------------------------------------------------------

    def queues(self) -> list[str]:
        """Every queue with a directory or a failed area, sorted."""
        layout = self.storage.layout
        names: set[str] = set()
        for top in (layout.queues_dir, layout.failed_dir):
            names.update(name for name, _path in layout.queue_dirs(top))
        return sorted(names)

    def open_messages(self, queue: str, since: float = 0.0) -> Iterator[OpenMessage]:
        """See ``IMessageAdmin.open_messages``."""
        paths: dict[tuple[str, str], str] = {}
        for m, lease in self.storage.open_messages(queue, int(since * 1000)):
            key = (getattr(m.receipt, "bucket", ""), getattr(m.receipt, "batch_id", ""))
            path = paths.get(key)
            if path is None:
                path = paths[key] = self._batch_path(*key)
            yield OpenMessage(
                m,
                queue,
                lease[0] / 1000.0 if lease is not None else None,
                lease[1] if lease is not None else None,
                path,
            )

    def _batch_path(self, bucket: str, batch_id: str) -> str:
        for name in _listdir(bucket):
            if name.startswith(batch_id):
                return self._relative(os.path.join(bucket, name))
        return self._relative(bucket) if bucket else ""

    def _failed_files(self, queue: str) -> Iterator[_FailedFile]:
        fdir = os.path.join(self.storage.failed_dir, encode_queue(queue))
        for name in _listdir(fdir):
            bn = BatchName.parse(name)
            if bn is None:
                continue
            path = os.path.join(fdir, name)
            why = Layout.why_of_failed(fdir, bn)
            reason, failed_at = _read_why(why, "(reason unreadable)", id_time(bn.batch_id))
            try:
                with open(path, "rb") as f:
                    decoded = batchfile.decode(f.read())
            except FileNotFoundError:
                continue  # requeued or purged meanwhile
            damage = decoded.error
            if not damage and len(decoded.messages) != bn.count:
                damage = f"holds {len(decoded.messages)} messages, its name says {bn.count}"
            yield _FailedFile(path, bn, reason, failed_at, decoded.messages, damage)

    def failed_messages(self, queue: str) -> Iterator[FailedMessage]:
        """See ``IMessageAdmin.failed_messages``."""
        for ff in self._failed_files(queue):
            location = self._relative(ff.path)
            for m in ff.messages:
                yield FailedMessage(m, queue, ff.reason, ff.failed_at, location)

    # -- the failed area -----------------------------------------------------------------

    def requeue_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """See ``IMessageAdmin.requeue_failed``; damaged files are left alone."""
        return self._move_failed(queue, set(ids), requeue=True)

    def purge_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """See ``IMessageAdmin.purge_failed``.

        A file that cannot be read whole is deleted only when every message
        that could be read from it is named (what could not be read is lost
        already; ``dropr fsck`` reports such files).
        """
        return self._move_failed(queue, set(ids), requeue=False)

    def _move_failed(self, queue: str, wanted: set[str], requeue: bool) -> list[str]:
        moved: list[str] = []
        for ff in self._failed_files(queue):
            chosen = [i for i, m in enumerate(ff.messages) if m.id in wanted]
            if not chosen:
                continue
            if ff.damage and (requeue or len(chosen) < len(ff.messages)):
                continue
            with _dir_lock(os.path.dirname(ff.path)):
                if not os.path.exists(ff.path):
                    continue  # another tool changed it since it was read
                if requeue:
                    # Durable in the queue first: a crash between the two
                    # steps leaves a copy in both places, never in neither.
                    # A storage with a dedup index skips ids it knows: those
                    # stay in the failed area rather than vanish.
                    stored = set(self.storage.add(queue, [ff.messages[i] for i in chosen]))
                    chosen = [i for i in chosen if ff.messages[i].id in stored]
                    if not chosen:
                        continue
                self._rewrite_failed(ff, set(chosen))
            moved.extend(ff.messages[i].id for i in chosen)
        return moved

    def _rewrite_failed(self, ff: _FailedFile, chosen: set[int]) -> None:
        """Take the ``chosen`` messages out of ``ff``'s file, keeping the rest there."""
        fdir = os.path.dirname(ff.path)
        keep = [m for i, m in enumerate(ff.messages) if i not in chosen]
        if keep and not ff.damage:
            name = BatchName(ff.name.batch_id, len(keep), sum(len(m.payload) for m in keep))
            tmp = write_new_file(self.storage.tmp_dir, ff.name.batch_id, batchfile.encode(keep))
            rename_into(tmp, fdir, str(name))
            if str(name) != os.path.basename(ff.path):
                os.unlink(ff.path)
        else:
            os.unlink(ff.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(fdir, f"{ff.name.batch_id}.why"))
        fsync_dir(fdir)

    # -- processed messages and the quarantine -------------------------------------------

    def purge_processed(self, older_than: float, queue: str | None = None) -> int:
        """Delete finished buckets (every message acked or failed) older than ``older_than`` s.

        A take deletes them on its way through a queue; a queue no one takes
        from any more keeps its last ones until this runs.
        """
        names = [queue] if queue is not None else self.queues()
        return sum(self.storage.remove_finished(q, older_than) for q in names)

    def set_aside(self) -> list[SetAside]:
        """What ``quarantine/`` holds, oldest first."""
        qdir = self.storage.quarantine_dir
        out: list[SetAside] = []
        for name in _listdir(qdir):
            if name.endswith(".why"):
                continue
            path = os.path.join(qdir, name)
            reason, when = _read_why(path + ".why", "(no .why file)", 0.0)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            out.append(SetAside(path, reason, when or st.st_mtime, st.st_size))
        return sorted(out, key=lambda q: q.time)

    def purge_set_aside(self, older_than: float) -> list[SetAside]:
        """Delete quarantined files (and their ``.why``) older than ``older_than`` s."""
        now = time.time()
        gone = [q for q in self.set_aside() if now - q.time >= older_than]
        for q in gone:
            for p in (q.location, q.location + ".why"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        if gone:
            fsync_dir(self.storage.quarantine_dir)
        return gone
