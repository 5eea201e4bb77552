"""Spare files: empty files made ahead in ``tmp/``, so a store need not make one.

On ext4 a new inode costs more than writing a small batch and syncing it
(0.6 ms against 0.5 ms on an idle disk, several ms when other syncs are
under way), and a small store waits for it.  So the server makes a few
empty files ahead, off the answer's path, and a store fills one, syncs it
and renames it into its bucket as it would a file it had just made.

Nothing about durability changes: a spare's own entry in ``tmp/`` never
needs to survive a crash (a batch becomes durable by the sync of its data
and of its bucket, as before), and a spare left by a crash is a temporary
file of a dead writer, which recovery removes.  A spare that another
process removed meanwhile (recovery removes temporary files older than an
hour) only means the store makes its file itself.
"""

from __future__ import annotations

import contextlib
import os
import threading

from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import unlink_quietly

#: Spares kept ready, at most: a burst of more single stores than this
#: between two refills makes its own files, as without spares.
SPARES_KEPT = 8


class Spares:
    """A few empty files in ``tmp_dir`` of this process; safe to use from threads."""

    def __init__(self, tmp_dir: str, disk: Disk, kept: int = SPARES_KEPT) -> None:
        self.tmp_dir = tmp_dir
        self.disk = disk
        self.kept = kept
        self._ready: list[str] = []
        #: A store asked for a spare since the last refill: only a store
        #: that stores gets spares (an idle or refusing one keeps tmp/ empty).
        self._wanted = False
        self._closed = False
        self._lock = threading.Lock()
        # Refills are not worth running twice at once.
        self._filling = threading.Lock()

    def take(self) -> str | None:
        """An empty file's path, now the caller's; None when none is ready."""
        with self._lock:
            self._wanted = True
            return self._ready.pop() if self._ready else None

    def __len__(self) -> int:
        return len(self._ready)

    def refill(self) -> int:
        """Make spares up to ``kept`` if a store took one since; how many were made.

        Not synced: see the module docstring.
        """
        if not self._filling.acquire(blocking=False):
            return 0
        made = 0
        try:
            if not self._wanted:
                return 0
            self._wanted = False
            while len(self._ready) < self.kept and not self._closed:
                # The name says the pid, so that recovery knows a dead
                # writer's spare from a live one's (see _layout.TMP_RE).
                path = os.path.join(self.tmp_dir, f"spare.{os.getpid()}.{os.urandom(6).hex()}.tmp")
                self.disk.create(path, b"", sync=False)
                with self._lock:
                    if not self._closed:
                        self._ready.append(path)
                        made += 1
                        continue
                unlink_quietly(path, self.disk)  # closed meanwhile
        finally:
            self._filling.release()
        return made

    def clear(self) -> None:
        """Remove the spares (at close); a spare left behind is removed by recovery."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        with contextlib.suppress(OSError):
            for path in ready:
                unlink_quietly(path, self.disk)
