"""A disk that fails on purpose: ENOSPC, EIO or a crash at the i-th operation.

``FaultyDisk`` stands in for the storage's ``Disk`` (dropr/storage/files/
_disk.py).  It counts the operations that change the disk (create, fill, append,
sync, truncate, touch, rename, unlink, mkdir, rmdir) and, separately, the
reads (read, listdir).  At the chosen one it raises ``OSError(ENOSPC)`` or
``OSError(EIO)`` before the operation has any effect, or it *crashes*.

The crash model (see docs/faults.rst): the disk keeps a journal of what is
not yet durable, by the rules the storage relies on:

- file data is durable up to the size at its last sync (``create`` with
  ``sync``, ``fill``, ``append`` with ``sync``, ``sync_file``); data of a file first
  seen by an append counts as durable up to the size it had then;
- a new entry (created file, rename target, new directory, removal of a
  file or directory) is durable once its directory is synced.

At a crash every later operation raises ``Crash`` (the process is gone and
runs no more code against the disk), the lock descriptors it opened are
closed (the kernel drops a dead process's locks), and what was not durable
is rolled back: the pending entries are undone newest first (a renamed file
goes back, an unlinked one comes back from a hard link kept aside, a new
directory goes with everything in it), then every file is cut to its
durable size.  This is stricter than ext4, which usually keeps more, and
never keeps less than a POSIX file system promises after fsync.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from dataclasses import dataclass, field

from dropr.storage.files._disk import Disk


class Crash(BaseException):
    """The simulated process died at this operation (not an error to handle)."""


_STASH_COUNTER = itertools.count()


@dataclass
class _Pending:
    kind: str  # create | rename | unlink | mkdir | rmdir
    path: str
    #: The directory whose sync makes this durable.
    directory: str
    other: str = ""  # rename: the source; unlink: the stash


@dataclass
class FaultyDisk(Disk):
    """A ``Disk`` that fails the ``fail_at``-th operation with ``mode``.

    ``mode`` is ``"enospc"``, ``"eio"`` or ``"crash"`` for the counted
    changes (``effects``), or ``"read-eio"`` for the counted reads.  With
    ``fail_at`` None it only counts (and keeps its journal, so ``crash()``
    can be called at any moment).  ``stash`` is a directory on the same file
    system for the hard links that let an unsynced unlink be undone.
    """

    stash: str
    fail_at: int | None = None
    mode: str = "crash"
    effects: int = 0
    reads: int = 0
    crashed: bool = False
    failed: str = ""
    _pending: list[_Pending] = field(default_factory=list)
    _durable_size: dict[int, int] = field(default_factory=dict)
    _fds: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        os.makedirs(self.stash, exist_ok=True)

    # -- counting and failing ----------------------------------------------------------

    def _effect(self, what: str, path: str) -> None:
        if self.crashed:
            raise Crash(what)
        self.effects += 1
        if self.fail_at == self.effects and self.mode != "read-eio":
            self.failed = f"{what} {path}"
            if self.mode == "crash":
                self.crash()
                raise Crash(what)
            code = errno.ENOSPC if self.mode == "enospc" else errno.EIO
            raise OSError(code, os.strerror(code), path)

    def _read(self, what: str, path: str) -> None:
        if self.crashed:
            raise Crash(what)
        self.reads += 1
        if self.fail_at == self.reads and self.mode == "read-eio":
            self.failed = f"{what} {path}"
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    def _look(self) -> None:
        if self.crashed:
            raise Crash("look")

    # -- the journal --------------------------------------------------------------------

    def _ino(self, path: str) -> int | None:
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    def _note_size(self, path: str, *, synced: bool, new: bool = False) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if synced:
            self._durable_size[st.st_ino] = st.st_size
        elif new:
            self._durable_size[st.st_ino] = 0

    def crash(self) -> None:
        """Stop, and drop everything that was not durable."""
        self.crashed = True
        for fd in list(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        for p in reversed(self._pending):
            # An undo that fails was made moot by a later durable change.
            with contextlib.suppress(OSError):
                self._undo(p)
        self._pending.clear()
        root_dirs = {os.path.dirname(self.stash)}
        for top in root_dirs:
            for dirpath, _dirs, files in os.walk(top):
                if dirpath.startswith(self.stash):
                    continue
                for name in files:
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    durable = self._durable_size.get(st.st_ino)
                    if durable is not None and st.st_size > durable:
                        os.truncate(path, durable)

    @staticmethod
    def _undo(p: _Pending) -> None:
        if p.kind == "create":
            if os.path.isfile(p.path):
                os.unlink(p.path)
        elif p.kind == "rename":
            if os.path.exists(p.path) and not os.path.exists(p.other):
                os.rename(p.path, p.other)
        elif p.kind == "unlink":
            if not os.path.exists(p.path) and os.path.isdir(os.path.dirname(p.path)):
                os.link(p.other, p.path)
        elif p.kind == "mkdir":
            shutil.rmtree(p.path, ignore_errors=True)
        elif (
            p.kind == "rmdir"
            and not os.path.exists(p.path)
            and os.path.isdir(os.path.dirname(p.path))
        ):
            os.mkdir(p.path, 0o700)

    def _pend(self, kind: str, path: str, other: str = "") -> None:
        self._pending.append(_Pending(kind, path, os.path.dirname(path), other))

    # -- Disk ---------------------------------------------------------------------------

    def create(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = True) -> None:
        self._effect("create", path)
        existed = os.path.exists(path)
        super().create(path, data, sync=sync, exclusive=exclusive)
        if not existed:
            self._pend("create", path)
        self._note_size(path, synced=sync, new=True)

    def append(self, path: str, data: bytes, *, sync: bool) -> None:
        self._effect("append", path)
        ino = self._ino(path)
        if ino is None:
            super().append(path, data, sync=sync)
            self._pend("create", path)
            self._note_size(path, synced=sync, new=True)
            return
        if ino not in self._durable_size:
            self._durable_size[ino] = os.stat(path).st_size
        super().append(path, data, sync=sync)
        if sync:
            self._note_size(path, synced=True)

    def fill(self, path: str, data: bytes) -> None:
        self._effect("fill", path)
        super().fill(path, data)
        self._note_size(path, synced=True)

    def sync_file(self, path: str) -> None:
        self._effect("sync_file", path)
        super().sync_file(path)
        self._note_size(path, synced=True)

    def truncate(self, path: str, size: int) -> None:
        self._effect("truncate", path)
        super().truncate(path, size)
        ino = self._ino(path)
        if ino is not None:
            self._durable_size[ino] = min(self._durable_size.get(ino, size), size)

    def touch(self, path: str) -> None:
        self._effect("touch", path)
        existed = os.path.exists(path)
        super().touch(path)
        if not existed:
            self._pend("create", path)

    def rename(self, src: str, dst: str) -> None:
        self._effect("rename", dst)
        if os.path.exists(dst):
            # The replaced file comes back if the rename is undone.
            self.unlink_journaled(dst)
        super().rename(src, dst)
        self._pend("rename", dst, src)

    def unlink_journaled(self, path: str) -> None:
        stash = os.path.join(self.stash, str(next(_STASH_COUNTER)))
        os.link(path, stash)
        os.unlink(path)
        self._pend("unlink", path, stash)

    def sync_dir(self, path: str) -> None:
        self._effect("sync_dir", path)
        super().sync_dir(path)
        path = os.path.normpath(path)
        self._pending = [p for p in self._pending if os.path.normpath(p.directory) != path]

    def unlink(self, path: str) -> None:
        self._effect("unlink", path)
        if not os.path.isfile(path):
            super().unlink(path)  # the error the real disk gives
            return
        self.unlink_journaled(path)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        self._effect("mkdir", path)
        super().mkdir(path, mode)
        self._pend("mkdir", path)

    def rmdir(self, path: str) -> None:
        self._effect("rmdir", path)
        super().rmdir(path)
        self._pend("rmdir", path)

    def listdir(self, path: str) -> list[str]:
        self._read("listdir", path)
        return super().listdir(path)

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        self._read("read", path)
        return super().read(path, offset, size)

    def stat(self, path: str) -> os.stat_result:
        self._look()
        return super().stat(path)

    def isdir(self, path: str) -> bool:
        self._look()
        return super().isdir(path)

    def exists(self, path: str) -> bool:
        self._look()
        return super().exists(path)

    def open_lock(self, path: str) -> int:
        self._look()
        fd = super().open_lock(path)
        self._fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._fds.discard(fd)
        super().close(fd)
