"""Receipts: how a storage knows a message was taken from it, and from which claim.

A storage hands out messages whose ``receipt`` points at a token object of
its own (never at ``id(self)``: an id is reused once an object is gone, and
a stale receipt must not match a later storage).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from dropr._message import Message
from dropr.errors import UnknownMessage

R = TypeVar("R")


def own_receipts(messages: Iterable[Message], kind: type[R], token: object) -> list[R]:
    """The receipts of ``messages``, each a ``kind`` whose ``storage`` is ``token``.

    Raises :class:`~dropr.errors.UnknownMessage` before anything changes if
    one message was not taken from the storage that owns ``token``.
    """
    out: list[R] = []
    for m in messages:
        r: Any = m.receipt
        if not isinstance(r, kind) or getattr(r, "storage", None) is not token:
            raise UnknownMessage(
                f"message {m.id} was not taken from this storage: ack, release "
                "and fail the Message objects that take() returned"
            )
        out.append(r)
    return out
