"""The disk seam: every effect the file-system storage has on the disk.

Every write, sync, rename, unlink, directory change, listing and read of a
``FilesystemStorage`` goes through one ``Disk`` object, so tests can put a
``FaultyDisk`` (tests/faultydisk.py) in its place that fails or "crashes" at
any chosen operation and sweep that operation over whole scenarios.

The methods are the storage's vocabulary, not the operating system's: a
file is created, written and synced in one call, an append is one call.  A
call either fails before it had any effect or after all of it (as far as the
storage can tell); the fault model of the tests relies on that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dropr.errors import StorageFull, StorageIOError

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


class Disk:
    """The real disk.  Stateless; one shared instance is ``REAL_DISK``."""

    # -- writing -----------------------------------------------------------------

    def create(self, path: str, data: bytes, *, sync: bool = True, exclusive: bool = True) -> None:
        """Create (or, not ``exclusive``, truncate) ``path``, write ``data``, sync it.

        On failure a file this call created is removed again.
        """
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            if exclusive:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        os.close(fd)

    def append(self, path: str, data: bytes, *, sync: bool) -> None:
        """Append ``data`` to ``path`` (created if missing); sync it if ``sync``."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def fill(self, path: str, data: bytes) -> None:
        """Write ``data`` into ``path``, an empty file made earlier (a spare), and sync it.

        Raises FileNotFoundError, having had no effect, if the file is gone.
        Cheaper than ``create`` on the hot path: a new inode costs more than
        the write and its sync together on ext4.
        """
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size:
                os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def sync_file(self, path: str) -> None:
        """Make the data of ``path`` durable (appended earlier without a sync)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def truncate(self, path: str, size: int) -> None:
        """Cut ``path`` to ``size`` bytes (a torn record's fragment)."""
        os.truncate(path, size)

    def touch(self, path: str) -> None:
        """Move the change time of ``path``, creating it empty if missing (no sync)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    # -- the namespace -----------------------------------------------------------

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (replacing it); durable once ``dst``'s directory is synced."""
        os.rename(src, dst)

    def sync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (new, renamed, removed) durable."""
        fd = os.open(path, _DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        """Remove file ``path``; durable once its directory is synced."""
        os.unlink(path)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        """Create directory ``path``; durable once its parent is synced."""
        os.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        """Remove the empty directory ``path``."""
        os.rmdir(path)

    # -- reading -----------------------------------------------------------------

    def listdir(self, path: str) -> list[str]:
        """The entry names of directory ``path`` (unsorted)."""
        return os.listdir(path)

    def stat(self, path: str) -> os.stat_result:
        """``os.stat`` of ``path``."""
        return os.stat(path)

    def isdir(self, path: str) -> bool:
        """True if ``path`` is a directory."""
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        """True if ``path`` exists."""
        return os.path.exists(path)

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        """``size`` bytes of ``path`` from ``offset`` (to the end when negative)."""
        with open(path, "rb") as f:
            if offset:
                f.seek(offset)
            return f.read(size)

    # -- locks -------------------------------------------------------------------

    def open_lock(self, path: str) -> int:
        """A descriptor of lock file ``path`` (created if missing), for ``lock``."""
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def lock(self, fd: int, *, blocking: bool = True) -> bool:
        """Take the exclusive ``flock`` of ``fd``; False if not ``blocking`` and it is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def unlock(self, fd: int) -> None:
        """Release the ``flock`` of ``fd``."""
        fcntl.flock(fd, fcntl.LOCK_UN)

    def same_file(self, fd: int, path: str) -> bool:
        """True if ``path`` still names the file open as ``fd`` (a lock file not replaced)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    def write_lock_note(self, fd: int, text: str) -> None:
        """Write who holds a lock into its file (for error messages only; no sync)."""
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)

    def read_lock_note(self, fd: int) -> str:
        """What ``write_lock_note`` wrote."""
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()

    def close(self, fd: int) -> None:
        """Close a descriptor from ``open_lock``."""
        os.close(fd)


REAL_DISK = Disk()


def is_disk_full(e: BaseException) -> bool:
    """True for the errors of a full disk or quota."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: str, e: OSError) -> StorageFull:
    """The StorageFull of a full disk under the root ``path``."""
    return StorageFull(
        f"{path} is full: its disk has no room ({e.strerror}); nothing was "
        "stored. Retry once there is room again"
    )


@contextmanager
def disk_errors(path: str) -> Iterator[None]:
    """Turn the disk's errors under root ``path`` into dropr's: StorageFull or StorageIOError."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, e) from e
        where = f" ({e.filename})" if e.filename else ""
        raise StorageIOError(
            f"{path}: the disk failed{where}: {e.strerror or e}. The call did "
            "not complete; what it acknowledged before is kept. Check the disk "
            "(dmesg), then retry"
        ) from e
