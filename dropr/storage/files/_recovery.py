"""What an open does after a crash: temporary files, and ids not yet indexed.

Cheap enough to run at every open: leftover temporary files are removed,
and the batches stored since the dedup checkpoint are found for the index.
Batch files are checked when first read (a damaged one is quarantined then)
and by ``dropr fsck``; expired leases need no work, they count as free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from dropr._message import Message
from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import pid_alive
from dropr.storage.files._layout import TMP_MAX_AGE, TMP_RE, Layout


def remove_stale_tmp(layout: Layout, disk: Disk) -> int:
    """Remove temporary files whose writer is gone (or that are very old); how many."""
    removed = 0
    now = time.time()
    for name in disk.listdir(layout.tmp_dir):
        path = os.path.join(layout.tmp_dir, name)
        m = TMP_RE.match(name)
        try:
            age = now - disk.stat(path).st_mtime
        except FileNotFoundError:
            continue
        if m is None or not pid_alive(int(m.group(1))) or age > TMP_MAX_AGE:
            try:
                disk.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def batches_since(
    layout: Layout,
    ms: int,
    read: Callable[[str, str, BatchName], list[Message] | None],
) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(batch id, message ids)`` of every batch added at or after ``ms``, oldest first.

    (chaos) Oldest first, not queue by queue: the dedup index checkpoints
    as it goes, at the newest batch it indexed, so a crash in the middle
    of a recovery must not leave older batches of another queue behind
    that checkpoint unindexed (a resend of them would be stored twice).
    Directories a consumer removes meanwhile are skipped.
    """
    first_hi = f"{ms:012x}"[:7]
    found: list[tuple[str, str, str, BatchName]] = []
    for queue, qpath in layout.queue_dirs():
        for pdir in layout.priority_dirs(qpath):
            for hi in _names(disk := layout.disk, pdir):
                if hi < first_hi:
                    continue
                hidir = os.path.join(pdir, hi)
                for lo in _names(disk, hidir):
                    bucket = os.path.join(hidir, lo)
                    for bn in layout.batches(bucket):
                        if int(bn.batch_id[:12], 16) >= ms:
                            found.append((bn.batch_id, queue, bucket, bn))
    found.sort(key=lambda f: f[0])
    for _batch_id, queue, bucket, bn in found:
        messages = read(queue, bucket, bn)
        if messages is not None:
            yield bn.batch_id, [m.id for m in messages]


def _names(disk: Disk, path: str) -> list[str]:
    try:
        return disk.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
