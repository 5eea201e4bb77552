"""Placing batch files: write and sync, rename into their buckets, sync; all or none."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence

from dropr._ids import new_id
from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import ensure_dir, rename_into, unlink_quietly, write_new_file
from dropr.storage.files._layout import WAKE_NAME, Layout
from dropr.storage.files._spares import Spares

#: Buckets whose directory chain is remembered as durable, at most.
_SETTLED_KEPT = 10_000


class BatchWriter:
    """Puts new batch files in place durably."""

    def __init__(self, layout: Layout, disk: Disk, ids: Callable[[], str] = new_id) -> None:
        self.layout = layout
        self.disk = disk
        #: Makes batch ids (time-ordered, so a sorted listing is delivery order).
        self.ids = ids
        #: Buckets whose directory chain this process knows to be durable.
        self._settled: set[str] = set()
        #: Empty files made ahead (by ``prepare``), filled instead of made.
        self.spares = Spares(layout.tmp_dir, disk)

    def place(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None,
        batch_ids: Sequence[str] | None = None,
    ) -> list[BatchName]:
        """One batch file per queue and priority: written, renamed, synced; all or none.

        The files are named by a new batch id, or by ``batch_ids[i]`` for
        the i-th of ``batches`` when given (messages that waited elsewhere,
        filed where their time puts them).

        Every file is written and synced first, then all are renamed into
        their buckets and the buckets synced.  Any error takes back
        (durably) what was placed, so nothing of the call stays.  A crash in
        the middle leaves each file whole or absent.
        """
        disk = self.disk
        synced: set[str] = set()
        written: list[tuple[str, str, BatchName]] = []
        placed: list[str] = []
        try:
            for n, (queue, messages) in enumerate(batches):
                given = batch_ids[n] if batch_ids is not None else None
                qpath = self.layout.queue_dir(queue)
                by_priority: dict[int, list[Message]] = {}
                for m in messages:
                    by_priority.setdefault(m.priority, []).append(m)
                for priority in sorted(by_priority):
                    group = by_priority[priority]
                    name = BatchName(
                        given or self.ids(), len(group), sum(len(m.payload) for m in group)
                    )
                    if records is not None and all(m.id in records for m in group):
                        chunks = [batchfile.MAGIC, *(records[m.id] for m in group)]
                    else:
                        chunks = batchfile.encode(group)
                    tmp = self._write_tmp(name.batch_id, chunks)
                    bucket = self.layout.bucket_dir(qpath, priority, name.batch_id)
                    written.append((tmp, bucket, name))
            for tmp, bucket, name in written:
                if ensure_dir(bucket, disk=disk):
                    self._remember(bucket)
                elif bucket not in self._settled:
                    self._settle_dir(bucket)
                rename_into(tmp, bucket, str(name), disk)
                placed.append(os.path.join(bucket, str(name)))
                synced.add(bucket)
            for bucket in sorted(synced):
                disk.sync_dir(bucket)
        except BaseException:
            # All or nothing: take back what this call placed already,
            # durably (an undone batch must not come back after a power loss).
            with contextlib.suppress(OSError):
                for path in placed + [tmp for tmp, _b, _n in written]:
                    unlink_quietly(path, disk)
                for bucket in sorted({os.path.dirname(p) for p in placed}):
                    disk.sync_dir(bucket)
            raise
        return [name for _tmp, _bucket, name in written]

    def _write_tmp(self, prefix: str, chunks: list[bytes]) -> str:
        """A synced temporary file holding ``chunks``: a spare filled, or a new file."""
        spare = self.spares.take()
        if spare is not None:
            try:
                self.disk.fill(spare, b"".join(chunks))
                return spare
            except FileNotFoundError:
                pass  # another process's recovery removed an old spare
            except BaseException:
                # Half filled: never handed out again.
                with contextlib.suppress(OSError):
                    unlink_quietly(spare, self.disk)
                raise
        return write_new_file(self.layout.tmp_dir, prefix, chunks, self.disk)

    def prepare(self) -> int:
        """Make spare files for the next stores (off the answer's path); how many."""
        return self.spares.refill()

    def _settle_dir(self, bucket: str) -> None:
        """Sync the chain of directories above ``bucket`` up to the root.

        Another process may have made the bucket (or a parent) and not yet
        synced its entry; syncing the bucket alone would then not make a
        batch renamed into it durable.  Once per bucket per process.
        """
        path = bucket
        while len(path) > len(self.layout.root):
            parent = os.path.dirname(path)
            self.disk.sync_dir(parent)
            path = parent
        self._remember(bucket)

    def _remember(self, bucket: str) -> None:
        self._settled.add(bucket)
        if len(self._settled) > _SETTLED_KEPT:
            self._settled.clear()

    def touch_wake(self, queue: str) -> None:
        """Touch the queue's ``wake`` file: consumers watch it with inotify."""
        self.disk.touch(os.path.join(self.layout.queue_dir(queue), WAKE_NAME))

    def wake_file(self, queue: str) -> str:
        """The file whose change time moves each time ``queue`` gets messages."""
        qpath = self.layout.queue_dir(queue)
        ensure_dir(qpath, disk=self.disk)
        path = os.path.join(qpath, WAKE_NAME)
        if not self.disk.exists(path):
            self.disk.touch(path)
        return path
