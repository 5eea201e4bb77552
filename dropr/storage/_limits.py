"""The limits of a spool or store: one check, one message, for every storage."""

from __future__ import annotations

from dropr.errors import StorageFull


def check_room(
    where: str,
    waiting: int,
    waiting_bytes: int,
    count: int,
    nbytes: int,
    max_messages: int | None,
    max_bytes: int | None,
) -> None:
    """Raise :class:`StorageFull` if ``count`` more messages of ``nbytes`` pass a limit.

    ``waiting`` and ``waiting_bytes`` are what ``where`` holds now; a limit
    of None is no limit.
    """
    if max_messages is not None and waiting + count > max_messages:
        raise StorageFull(
            f"{where} is full: {waiting} messages wait and the limit is "
            f"{max_messages}; nothing was stored. Retry once messages "
            "are delivered, or raise max_messages"
        )
    if max_bytes is not None and waiting_bytes + nbytes > max_bytes:
        raise StorageFull(
            f"{where} is full: {waiting_bytes} payload bytes wait, "
            f"{nbytes} more would pass the limit of {max_bytes}; nothing "
            "was stored. Retry once messages are delivered, or raise max_bytes"
        )
