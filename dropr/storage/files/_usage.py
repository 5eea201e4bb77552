"""How much waits in a root: the figures behind the size limits and the metrics.

Counted from batch file names less what the state logs say is finished,
cached per bucket by its mtime and its state log's size, so a count costs a
stat per bucket plus a look at the buckets that changed.  Between counts
(at most every ``refresh`` seconds) the figures are running totals: what
this process adds, acks and fails changes them at once; other processes'
changes show at the next count.

Processes share the work: whoever counts writes the figures to the root's
``usage`` file, and another process trusts that file while it is younger
than ``USAGE_FILE_FRESH`` seconds (the client daemon rewrites it at every
rescan), so a short-lived producer does not walk a large spool for its
first put.  The limits are therefore kept to within a few seconds' worth of
puts, not to the message.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator

from dropr.storage._batchfile import BatchName
from dropr.storage._limits import check_room
from dropr.storage.files._disk import Disk
from dropr.storage.files._layout import STATE_NAME, Layout
from dropr.storage.files._statelog import StateLog

#: Seconds another process's count in the ``usage`` file is trusted.
USAGE_FILE_FRESH = 6.0
#: A bucket changed less than this ago (ns) may change again unseen in the same mtime.
_TICK_NS = 50_000_000


class UsageCounter:
    """``(messages, payload bytes)`` waiting in one root."""

    def __init__(
        self, layout: Layout, disk: Disk, buckets: Callable[[], Iterator[str]], refresh: float
    ) -> None:
        self.layout = layout
        self.disk = disk
        self._buckets = buckets
        self.refresh = refresh
        #: (monotonic time of the count, messages, bytes)
        self._figures: tuple[float, int, int] | None = None
        #: bucket → (mtime or -1, state log size, messages, bytes); only buckets that exist
        self._by_bucket: dict[str, tuple[int, int, int, int]] = {}

    def usage(self) -> tuple[int, int]:
        """The figures, counted again when older than ``refresh`` seconds."""
        now = time.monotonic()
        if self._figures is not None and now - self._figures[0] < self.refresh:
            return self._figures[1], self._figures[2]
        if self._figures is None:
            # The first look of this process: a recent count by another one
            # spares a walk of the whole spool; later looks count (cheaply,
            # bucket by changed bucket) for themselves.
            shared = self._read_file()
            if shared is not None:
                self._figures = (now, shared[0], shared[1])
                return shared
        return self.count()

    def check_limits(
        self, count: int, nbytes: int, max_messages: int | None, max_bytes: int | None
    ) -> None:
        """Raise StorageFull if ``count`` more messages of ``nbytes`` pass a limit."""
        if max_bytes is None and max_messages is None:
            return
        waiting, waiting_bytes = self.usage()
        check_room(self.layout.root, waiting, waiting_bytes, count, nbytes, max_messages, max_bytes)

    def added(self, count: int, nbytes: int) -> None:
        """This process stored ``count`` messages of ``nbytes``: add them at once."""
        if self._figures is not None:
            at, c, b = self._figures
            self._figures = (at, c + count, b + nbytes)

    def settled(self, count: int, nbytes: int) -> None:
        """This process acked or failed ``count`` messages of ``nbytes``: take them off."""
        if self._figures is not None:
            at, c, b = self._figures
            self._figures = (at, max(0, c - count), max(0, b - nbytes))

    def count(self) -> tuple[int, int]:
        """Count what waits now, and share the figures in the ``usage`` file."""
        count = nbytes = 0
        seen: dict[str, tuple[int, int, int, int]] = {}
        for bucket in self._buckets():
            cached = self._bucket(bucket)
            if cached is None:
                continue
            seen[bucket] = cached
            count += cached[2]
            nbytes += cached[3]
        self._by_bucket = seen
        self._figures = (time.monotonic(), count, nbytes)
        self._write_file(count, nbytes)
        return count, nbytes

    def _bucket(self, bucket: str) -> tuple[int, int, int, int] | None:
        disk = self.disk
        try:
            mtime = disk.stat(bucket).st_mtime_ns
            state_size = disk.stat(os.path.join(bucket, STATE_NAME)).st_size
        except FileNotFoundError:
            state_size = 0
            if not disk.isdir(bucket):
                return None
        cached = self._by_bucket.get(bucket)
        if cached is not None and cached[0] == mtime and cached[1] == state_size:
            return cached
        try:
            names = disk.listdir(bucket)
        except FileNotFoundError:
            return None
        log = StateLog(bucket, disk)
        if state_size:
            log.refresh()
        c = b = 0
        for name in names:
            bn = BatchName.parse(name)
            if bn is not None:
                done = len(log.state(bn.batch_id).done) if state_size else 0
                left = max(0, bn.count - done)
                c += left
                b += bn.nbytes * left // bn.count if bn.count else 0
        # A bucket listed within a tick of its last change is listed again
        # next time (see dirlisting).
        settled = time.time_ns() - mtime > _TICK_NS
        return (mtime if settled else -1, state_size, c, b)

    def _read_file(self) -> tuple[int, int] | None:
        path = self.layout.usage_file
        try:
            if time.time() - self.disk.stat(path).st_mtime > USAGE_FILE_FRESH:
                return None
            data = json.loads(self.disk.read(path))
            return int(data["messages"]), int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_file(self, count: int, nbytes: int) -> None:
        # Advisory figures: no sync, and a failure to write costs nothing.
        path = self.layout.usage_file
        tmp = f"{path}.{os.getpid()}.tmp"
        figures = {"messages": count, "bytes": nbytes, "time": time.time()}
        with contextlib.suppress(OSError):
            self.disk.create(tmp, json.dumps(figures).encode(), sync=False, exclusive=False)
            self.disk.rename(tmp, path)
