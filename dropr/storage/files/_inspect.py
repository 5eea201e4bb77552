"""Looking at a root as a whole: its queues, their figures, their open messages.

For tools, metrics and the status page, not the hot path: these walk state
logs and read batch files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from dropr._ids import id_time
from dropr._message import Message
from dropr.interfaces import QueueStats
from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import Disk
from dropr.storage.files._failedarea import FailedArea
from dropr.storage.files._layout import BUCKET_MS, Layout, bucket_start_ms
from dropr.storage.files._reader import BatchReader
from dropr.storage.files._statelog import StateLog


class Inspector:
    """Read-only views of a root."""

    def __init__(
        self,
        layout: Layout,
        disk: Disk,
        reader: BatchReader,
        failed: FailedArea,
        buckets: Callable[[str], Iterator[str]],
        lease_free: Callable[[tuple[int, str] | None, int], bool],
    ) -> None:
        self.layout = layout
        self.disk = disk
        self.reader = reader
        self.failed_area = failed
        self.buckets = buckets
        self.lease_free = lease_free

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        names: set[str] = set()
        for top in (self.layout.queues_dir, self.layout.failed_dir):
            for name, path in self.layout.queue_dirs(top):
                if self.has_batches(path):
                    names.add(name)
        return sorted(names)

    def has_batches(self, path: str) -> bool:
        """True if any batch file lies at or below directory ``path``."""
        try:
            names = self.disk.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        for name in names:
            if BatchName.parse(name) is not None:
                return True
            sub = f"{path}/{name}"
            if self.disk.isdir(sub) and self.has_batches(sub):
                return True
        return False

    def holds(self, queue: str) -> bool:
        """True if ``queue`` holds messages, waiting or failed (as ``queues()``)."""
        return any(
            self.has_batches(path)
            for path in (self.layout.queue_dir(queue), self.layout.failed_queue_dir(queue))
        )

    def stats(self, now: float, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures for every queue, or for those of ``queues`` that hold messages."""
        now_ms = int(now * 1000)
        result = {}
        names = self.queues() if queues is None else sorted(q for q in set(queues) if self.holds(q))
        for queue in names:
            depth = nbytes = taken = 0
            oldest = 0.0
            for bucket in self.buckets(self.layout.queue_dir(queue)):
                log = StateLog(bucket, self.disk)
                log.refresh()
                for bn in self.layout.batches(bucket):
                    state = log.state(bn.batch_id)
                    open_idx = [i for i in range(bn.count) if i not in state.done]
                    if not open_idx:
                        continue
                    depth += len(open_idx)
                    if len(open_idx) == bn.count:
                        nbytes += bn.nbytes
                    else:
                        # (storage conformance) The name gives only the
                        # batch's total; count the open messages' own sizes.
                        msgs = self.reader.read(queue, bucket, bn) or []
                        nbytes += sum(len(msgs[i].payload) for i in open_idx if i < len(msgs))
                    taken += sum(
                        1 for i in open_idx if not self.lease_free(state.leases.get(i), now_ms)
                    )
                    if not oldest:
                        head = self.reader.read(queue, bucket, bn)
                        if head:
                            first = min(open_idx)
                            if first < len(head):
                                oldest = max(0.0, now - id_time(head[first].id))
            failed = self.failed_area.count(queue)
            result[queue] = QueueStats(depth, nbytes, oldest, taken, failed)
        return result

    def open_buckets(self, queue: str, since_ms: int = 0) -> list[str]:
        """The buckets of ``queue`` that end after ``since_ms``, in delivery order."""
        out = []
        for bucket in self.buckets(self.layout.queue_dir(queue)):
            start = bucket_start_ms(bucket)
            if start is None or start + BUCKET_MS > since_ms:
                out.append(bucket)
        return out

    def open_in(self, queue: str, bucket: str) -> list[tuple[Message, tuple[int, str] | None]]:
        """The messages of ``bucket`` not acked or failed, in order, with their leases."""
        found: list[tuple[Message, tuple[int, str] | None]] = []
        log = StateLog(bucket, self.disk)
        log.refresh()
        for bn in self.layout.batches(bucket):
            state = log.state(bn.batch_id)
            if state.complete(bn.count):
                continue
            messages = self.reader.read(queue, bucket, bn) or []
            for i, m in enumerate(messages):
                if i not in state.done:
                    found.append((m, state.leases.get(i)))
        return found
