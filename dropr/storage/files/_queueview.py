"""What one storage object knows of one queue: its lock, state logs and scans.

Each ``QueueView`` keeps the state logs and scans of at most
``BUCKETS_KEPT`` buckets, the least recently used dropped; ``QueueViews``
keeps at most ``QUEUES_KEPT`` views (and so that many lock files open).  A
bucket another process removed is forgotten here too, in time, so memory
follows what a consumer works on, not what it has seen.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable

from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import ensure_dir
from dropr.storage.files._layout import LOCK_NAME
from dropr.storage.files._statelog import StateLog, line

#: Queues whose view (and lock file) a storage object keeps, at most.
QUEUES_KEPT = 256
#: Buckets of one queue whose state log and scan are kept, at most.
BUCKETS_KEPT = 256


def release_line(take_line: str) -> str:
    """The ``R`` line that undoes the lease of ``take_line`` (``T batch expiry idx owner crc``)."""
    _op, batch_id, _expiry, indexes, owner, _crc = take_line.split()
    return line("R", batch_id, indexes, owner)


class BucketScan:
    """A bucket's listing, parsed once, and how far it is known finished."""

    __slots__ = ("cursor", "names", "parsed")

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.parsed = [BatchName.parse(n) for n in names]
        self.cursor = 0

    def relisted(self, names: list[str]) -> BucketScan:
        """The scan of a new listing, keeping the cursor if nothing moved before it."""
        new = BucketScan(names)
        if self.cursor and self.cursor <= len(self.names):
            # Entries before the cursor may only have vanished (a salvaged
            # or removed batch) or arrived late (a slow producer): in either
            # case start over, else keep the place.
            position = bisect.bisect_left(names, self.names[self.cursor - 1])
            if (
                position == self.cursor - 1
                and position < len(names)
                and names[position] == self.names[self.cursor - 1]
            ):
                new.cursor = self.cursor
        return new


class QueueView:
    """One queue's directory, its lock and what this process knows of it."""

    def __init__(self, name: str, path: str, disk: Disk, on_forget: Callable[[str], None]) -> None:
        self.name = name
        self.path = path
        self.disk = disk
        #: Called with a bucket this view drops, so caches of it go too.
        self.on_forget = on_forget
        self._lock_fd = -1
        self.logs: OrderedDict[str, StateLog] = OrderedDict()
        self.scans: OrderedDict[str, BucketScan] = OrderedDict()
        #: Leases of a take that failed half-way and could not be released
        #: at once: (bucket, lines), released at the next call.
        self.pending_releases: list[tuple[str, list[str]]] = []

    def scan(self, bucket: str, names: list[str]) -> BucketScan:
        """The parsed listing of ``bucket`` (``names`` is the current one)."""
        scan = self.scans.get(bucket)
        if scan is None:
            scan = self.scans[bucket] = BucketScan(names)
            while len(self.scans) > BUCKETS_KEPT:
                self.forget(next(iter(self.scans)))
        else:
            self.scans.move_to_end(bucket)
            if scan.names is not names:
                scan = self.scans[bucket] = scan.relisted(names)
        return scan

    def log(self, bucket: str) -> StateLog:
        """The state log of ``bucket``, read incrementally."""
        log = self.logs.get(bucket)
        if log is None:
            log = self.logs[bucket] = StateLog(bucket, self.disk)
            while len(self.logs) > BUCKETS_KEPT:
                self.forget(next(iter(self.logs)))
        else:
            self.logs.move_to_end(bucket)
        return log

    def forget(self, bucket: str) -> None:
        """Drop what is known of a bucket (removed, or least recently used)."""
        self.logs.pop(bucket, None)
        self.scans.pop(bucket, None)
        self.on_forget(bucket)

    def lock(self) -> None:
        """Take the queue's lock (blocking): take, ack, release and fail hold it.

        Upkeep removes an idle queue's directory, lock file included, while
        holding this lock; a lock taken on a file that is no longer the
        queue's is let go and taken again on the new one.
        """
        path = os.path.join(self.path, LOCK_NAME)
        while True:
            if self._lock_fd < 0:
                ensure_dir(self.path, disk=self.disk)
                self._lock_fd = self.disk.open_lock(path)
            self.disk.lock(self._lock_fd)
            if self.disk.same_file(self._lock_fd, path):
                return
            self.close()

    def unlock(self) -> None:
        self.disk.unlock(self._lock_fd)

    def close(self) -> None:
        if self._lock_fd >= 0:
            self.disk.close(self._lock_fd)
            self._lock_fd = -1


class QueueViews:
    """The views of the queues a storage object works on, least recently used out."""

    def __init__(self, disk: Disk, path_of: Callable[[str], str], on_forget: Callable[[str], None]):
        self.disk = disk
        self.path_of = path_of
        self.on_forget = on_forget
        self._views: OrderedDict[str, QueueView] = OrderedDict()

    def __len__(self) -> int:
        return len(self._views)

    def get(self, name: str) -> QueueView:
        q = self._views.get(name)
        if q is not None:
            self._views.move_to_end(name)
            return q
        q = self._views[name] = QueueView(name, self.path_of(name), self.disk, self.on_forget)
        while len(self._views) > QUEUES_KEPT:
            _old, evicted = next(iter(self._views.items()))
            if evicted.pending_releases:
                break  # its leases must still be released: keep it
            del self._views[_old]
            evicted.close()
        return q

    def peek(self, name: str) -> QueueView | None:
        """The view of ``name`` if there is one (for tests and tools)."""
        return self._views.get(name)

    def close(self) -> None:
        for q in self._views.values():
            with contextlib.suppress(OSError):
                q.close()
        self._views.clear()
