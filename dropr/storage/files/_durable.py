"""The few file-system moves that make data durable, in one place.

Every acknowledged byte goes through these: write to a temporary file, sync
it, rename it into place, sync the directory.  A rename within one file
system is atomic, so a reader sees either nothing or the whole file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (new, renamed, removed) durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str, mode: int = 0o700) -> bool:
    """Create ``path`` and missing parents durably; True if anything was made.

    A new directory is only durable once its parent is synced, so each level
    that is created has its parent synced too.
    """
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path:
        ensure_dir(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return False
    fsync_dir(parent or ".")
    return True


def write_new_file(tmp_dir: str, prefix: str, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to a new file in ``tmp_dir``, synced; return its path.

    The name starts with ``prefix`` and carries the writer's pid, so
    recovery can tell a live writer's file from a crashed one's.
    """
    name = f"{prefix}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    path = os.path.join(tmp_dir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # One write for many small chunks: a syscall per record would cost
        # more than the records themselves.
        view = memoryview(b"".join(chunks))
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)
    return path


def rename_into(tmp_path: str, final_dir: str, name: str) -> None:
    """Rename ``tmp_path`` to ``final_dir/name``, creating the directory.

    The directory is not synced here so that callers can share one sync
    among many renames into it.
    """
    final = os.path.join(final_dir, name)
    try:
        os.rename(tmp_path, final)
    except FileNotFoundError:
        # The bucket directory may have been removed by a consumer that
        # emptied it a moment ago; make it again and retry once.
        if not os.path.exists(tmp_path):
            raise
        ensure_dir(final_dir)
        os.rename(tmp_path, final)


def remove_empty_dirs(*paths: str) -> None:
    """Remove each directory in turn while they are empty; stop at the first that is not."""
    for path in paths:
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return
            raise


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
