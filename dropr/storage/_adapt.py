"""The optional interfaces of a storage, for code that holds only an ``IStorage``.

A storage provides ``IMessageAdmin`` and ``IWakeSource`` itself where it
can.  Until the file-system storage provides ``IMessageAdmin``, a thin
wrapper here gives it one, so that the ``dropr`` command never names a
concrete storage.
"""

from __future__ import annotations

from dropr.errors import UnsupportedByStore
from dropr.interfaces import IMessageAdmin, IStorage, IWakeSource, SetAside


def message_admin(storage: IStorage) -> IMessageAdmin:
    """``storage``'s ``IMessageAdmin``: itself where it provides it.

    Raises :class:`~dropr.errors.UnsupportedByStore` for a storage that
    cannot list and repair its messages.
    """
    if IMessageAdmin.providedBy(storage):
        return storage
    from dropr.storage.files._storage import FilesystemStorage

    if isinstance(storage, FilesystemStorage):
        from dropr.storage.files._admin import FilesystemAdmin

        return FilesystemAdmin(storage)
    raise UnsupportedByStore(
        f"{type(storage).__name__} cannot list or repair messages by id; "
        "use a file-system, SQLite or PostgreSQL store"
    )


def wake_source(storage: IStorage) -> IWakeSource | None:
    """``storage``'s ``IWakeSource``, or None when consumers must poll it."""
    if IWakeSource.providedBy(storage):
        return storage
    return None


class NothingLeftBehind:
    """The housekeeping part of ``IMessageAdmin`` for a storage that needs none.

    Where an ack deletes a message at once and nothing unreadable is ever
    kept apart (SQLite, memory), there is nothing to purge.
    """

    def purge_processed(self, older_than: float, queue: str | None = None) -> int:
        """Nothing to do: an ack deletes at once."""
        return 0

    def set_aside(self) -> list[SetAside]:
        """Nothing is set aside."""
        return []

    def purge_set_aside(self, older_than: float) -> list[SetAside]:
        """Nothing to delete."""
        return []
