"""The failed area: messages that cannot be delivered, each batch with its reason."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace

from dropr._ids import new_id
from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import ensure_dir, unlink_quietly, write_new_file
from dropr.storage.files._layout import Layout, read_why, why_bytes


class FailedArea:
    """``failed/<queue>/``: batch files beside their ``.why``."""

    def __init__(self, layout: Layout, disk: Disk) -> None:
        self.layout = layout
        self.disk = disk

    def write(self, queue: str, messages: Sequence[Message], reason: str) -> None:
        """Store ``messages`` in the failed area of ``queue`` with ``reason``, durably."""
        disk, tmp_dir = self.disk, self.layout.tmp_dir
        fdir = self.layout.failed_queue_dir(queue)
        ensure_dir(fdir, disk=disk)
        clean = [replace(m, receipt=None) for m in messages]
        name = BatchName(new_id(), len(clean), sum(len(m.payload) for m in clean))
        why = {"reason": reason, "time": time.time(), "queue": queue}
        tmp_why = write_new_file(tmp_dir, "why", [why_bytes(why)], disk)
        try:
            tmp = write_new_file(tmp_dir, name.batch_id, batchfile.encode(clean), disk)
        except BaseException:
            with contextlib.suppress(OSError):
                unlink_quietly(tmp_why, disk)
            raise
        # The reason first: a failed batch is never without its .why.
        disk.rename(tmp_why, self.layout.why_of_failed(fdir, name))
        disk.rename(tmp, f"{fdir}/{name}")
        disk.sync_dir(fdir)

    def count(self, queue: str) -> int:
        """How many messages the failed area of ``queue`` holds (from file names)."""
        return sum(bn.count for bn in self.layout.batches(self.layout.failed_queue_dir(queue)))

    def messages(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons, oldest first."""
        fdir = self.layout.failed_queue_dir(queue)
        out: list[tuple[Message, str]] = []
        for bn in self.layout.batches(fdir):
            why = read_why(self.layout.why_of_failed(fdir, bn), self.disk)
            reason = str(why.get("reason", "")) if why is not None else "(reason unreadable)"
            decoded = batchfile.decode(self.disk.read(f"{fdir}/{bn}"))
            for m in decoded.messages:
                out.append((m, reason))
                if len(out) >= limit:
                    return out
        return out
