"""Directory listings that are only re-read when the directory changed.

A directory's mtime changes whenever an entry is added or removed, but only
at the granularity of the kernel's clock tick: two changes in one tick leave
one mtime.  A cached listing is therefore trusted only if it was read
clearly after the mtime it was read at; a directory modified moments before
it was listed is listed again next time.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from dropr.storage.files._disk import REAL_DISK, Disk

#: Changes closer together than this may share an mtime (several clock ticks).
_TICK_NS = 50_000_000
#: Directories whose listing is kept, at most (the least recently used go).
MAX_ENTRIES = 4096


class DirListing:
    """Sorted listings of directories, cached by mtime."""

    def __init__(self, disk: Disk = REAL_DISK) -> None:
        self.disk = disk
        self._cache: OrderedDict[str, tuple[int, bool, list[str]]] = OrderedDict()

    def names(self, path: str) -> list[str]:
        """The sorted entry names of ``path``; empty if it does not exist."""
        try:
            mtime = self.disk.stat(path).st_mtime_ns
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime and cached[1]:
            self._cache.move_to_end(path)
            return cached[2]
        listed_at = time.time_ns()
        try:
            names = sorted(self.disk.listdir(path))
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        settled = listed_at - mtime > _TICK_NS
        self._cache[path] = (mtime, settled, names)
        self._cache.move_to_end(path)
        while len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)
        return names

    def forget(self, *paths: str) -> None:
        """Drop the cached listings of ``paths`` (a removed or changed directory).

        Only these: a listing below them is checked against its own mtime
        anyway, and a scan of the whole cache made large stores slow.
        """
        for path in paths:
            self._cache.pop(path, None)

    def __len__(self) -> int:
        return len(self._cache)
