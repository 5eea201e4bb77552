"""The producer's side of the wake-up pipe in a spool.

The client daemon holds a named pipe ``notify`` in the spool open for
reading.  After a put, the producer writes one byte to it so the daemon
sends at once instead of at its next rescan.  The poke is best effort: no
reader, a full pipe or no pipe at all cost nothing and raise nothing.
"""

from __future__ import annotations

import os

FIFO_NAME = "notify"


def poke(spool_path: str) -> bool:
    """Write one byte to the spool's pipe if someone reads it; True if written."""
    try:
        fd = os.open(os.path.join(spool_path, FIFO_NAME), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        # ENXIO: no reader; ENOENT: no pipe yet.  The rescan will find the message.
        return False
    try:
        os.write(fd, b"!")
        return True
    except OSError:
        # EAGAIN: the pipe is full, so the daemon has wake-ups pending anyway.
        return False
    finally:
        os.close(fd)
