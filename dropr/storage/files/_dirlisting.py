"""Directory listings that are only re-read when the directory changed.

A directory's mtime changes whenever an entry is added or removed, but only
at the granularity of the kernel's clock tick: two changes in one tick leave
one mtime.  A cached listing is therefore trusted only if it was read
clearly after the mtime it was read at; a directory modified moments before
it was listed is listed again next time.
"""

from __future__ import annotations

import os
import time

#: Changes closer together than this may share an mtime (several clock ticks).
_TICK_NS = 50_000_000


class DirListing:
    """Sorted listings of directories, cached by mtime."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, bool, list[str]]] = {}

    def names(self, path: str) -> list[str]:
        """The sorted entry names of ``path``; empty if it does not exist."""
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime and cached[1]:
            return cached[2]
        listed_at = time.time_ns()
        try:
            names = sorted(os.listdir(path))
        except FileNotFoundError:
            self._cache.pop(path, None)
            return []
        settled = listed_at - mtime > _TICK_NS
        self._cache[path] = (mtime, settled, names)
        return names

    def forget(self, path: str) -> None:
        """Drop the cached listing of ``path`` (and of everything below it)."""
        prefix = path.rstrip("/") + "/"
        for key in [k for k in self._cache if k == path or k.startswith(prefix)]:
            del self._cache[key]

    def __len__(self) -> int:
        return len(self._cache)
