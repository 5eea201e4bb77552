"""The exceptions dropr raises.  Every message says what to do about it.

Every exception a user of dropr can see derives from :class:`DroprError`,
so ``except dropr.DroprError`` catches all of them.  Some also derive from
the built-in exception their callers used to catch (``ValueError``,
``KeyError``), so older code keeps working.
"""

from __future__ import annotations


class DroprError(Exception):
    """Base class of every error dropr raises on purpose."""


class InvalidMessage(DroprError, ValueError):
    """A message, or one of its fields, is not acceptable."""


class PayloadTooLarge(InvalidMessage):
    """A payload is larger than the configured maximum."""


class StorageFull(DroprError):
    """A spool or store reached its configured size limit.

    Nothing was stored by the call that raised it; everything stored before
    is untouched.  Retry once the daemon has forwarded (or consumers have
    taken) messages, or raise the limit.
    """


class StorageUnavailable(DroprError):
    """The store's database cannot be reached (down, restarting, unreachable).

    Retry once the database is back: a store is idempotent by id, so a call
    whose commit was cut off is never stored twice by its retry.
    dropr-server answers 503 meanwhile, and clients retry by themselves.
    """


class StorageIOError(DroprError):
    """The disk under a spool or store failed (an I/O error other than a full disk).

    The call that raised it did not complete; everything it acknowledged
    before is kept.  Check the disk (``dmesg``), then retry; ``dropr fsck``
    checks the directory.
    """


class StorageLocked(DroprError):
    """Another process holds the exclusive lock of a spool or store."""


class StoreNotFound(DroprError, FileNotFoundError):
    """No spool or store where one was named: check the path or spec."""


class StorageClosed(DroprError, ValueError):
    """A spool or store was used after ``close()``: open it again."""


class UnsupportedByStore(DroprError):
    """The store at hand cannot do what was asked (a file-system-only repair, say)."""


class UnknownMessage(DroprError, KeyError):
    """An ack, release or fail named a message that is not taken here."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "unknown message"
