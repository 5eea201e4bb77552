"""The client daemon's side of the wake-up pipe in the spool.

The daemon creates the named pipe ``notify`` in its spool and keeps it open
read-write and non-blocking: read-write so that the pipe always has a writer
(no end-of-file when the last producer closes it), non-blocking so the
reactor never waits on it.  Producers write a byte after each put
(:mod:`dropr.client._notify`); each readable event here wakes the senders.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract
from twisted.python.failure import Failure

from dropr.client._notify import FIFO_NAME
from dropr.errors import DroprError


def ensure_fifo(spool_path: str) -> str:
    """Create the spool's named pipe (owner-only) if missing; return its path."""
    path = os.path.join(spool_path, FIFO_NAME)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise DroprError(
                f"{path} exists and is not a named pipe: remove it so dropr-client "
                "can make its wake-up pipe there"
            ) from None
    return path


class FifoNotifier(abstract.FileDescriptor):
    """Calls ``callback`` when producers poke the spool's pipe."""

    def __init__(self, spool_path: str, callback: Callable[[], None], reactor: Any) -> None:
        super().__init__(reactor)
        self.path = ensure_fifo(spool_path)
        self.callback = callback
        self.wakeups = 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        if data:
            self.wakeups += 1
            self.callback()
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stop(self) -> None:
        """Stop reading and close the pipe."""
        self.stopReading()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
