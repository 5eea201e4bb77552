"""The few file-system moves that make data durable, in one place.

Every acknowledged byte goes through these: write to a temporary file, sync
it, rename it into place, sync the directory.  A rename within one file
system is atomic, so a reader sees either nothing or the whole file.  Each
takes the ``Disk`` it works through (the real one by default).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from dropr.storage.files._disk import REAL_DISK, Disk


def fsync_dir(path: str, disk: Disk = REAL_DISK) -> None:
    """Make the entries of directory ``path`` (new, renamed, removed) durable."""
    disk.sync_dir(path)


def ensure_dir(path: str, mode: int = 0o700, disk: Disk = REAL_DISK) -> bool:
    """Create ``path`` and missing parents durably; True if anything was made.

    A new directory is only durable once its parent is synced, so each level
    that is created has its parent synced too.
    """
    gone: FileNotFoundError | None = None
    for _attempt in range(3):
        if disk.isdir(path):
            return False
        parent = os.path.dirname(path.rstrip("/"))
        if parent and parent != path:
            ensure_dir(parent, mode, disk)
        try:
            disk.mkdir(path, mode)
        except FileExistsError:
            return False
        except FileNotFoundError as e:
            # Upkeep removed an idle queue's directory between the parent's
            # creation and ours: make the chain again.
            gone = e
            continue
        disk.sync_dir(parent or ".")
        return True
    assert gone is not None
    raise gone


def write_new_file(
    tmp_dir: str, prefix: str, chunks: Iterable[bytes], disk: Disk = REAL_DISK
) -> str:
    """Write ``chunks`` to a new file in ``tmp_dir``, synced; return its path.

    The name starts with ``prefix`` and carries the writer's pid, so
    recovery can tell a live writer's file from a crashed one's.
    """
    name = f"{prefix}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    path = os.path.join(tmp_dir, name)
    # One write for many small chunks: a syscall per record would cost
    # more than the records themselves.
    disk.create(path, b"".join(chunks))
    return path


def rename_into(tmp_path: str, final_dir: str, name: str, disk: Disk = REAL_DISK) -> None:
    """Rename ``tmp_path`` to ``final_dir/name``, creating the directory.

    The directory is not synced here so that callers can share one sync
    among many renames into it.
    """
    final = os.path.join(final_dir, name)
    try:
        disk.rename(tmp_path, final)
    except FileNotFoundError:
        # The bucket directory may have been removed by a consumer that
        # emptied it a moment ago; make it again and retry once.
        if not disk.exists(tmp_path):
            raise
        ensure_dir(final_dir, disk=disk)
        disk.rename(tmp_path, final)


def remove_empty_dirs(*paths: str, disk: Disk = REAL_DISK) -> None:
    """Remove each directory in turn while they are empty; stop at the first that is not."""
    for path in paths:
        try:
            disk.rmdir(path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return
            raise


def unlink_quietly(path: str, disk: Disk = REAL_DISK) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        disk.unlink(path)


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
