"""What dropr-server answers: plain functions from a request's parts to a status and JSON.

No reactor and no request objects here: the resource and the site call
these, and the unit tests call them directly.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.web import http

from dropr._ids import is_valid_id
from dropr._message import DEFAULT_CHANNEL, DEFAULT_PRIORITY, validate_channel, validate_priority
from dropr.errors import InvalidMessage, StorageFull, StorageIOError, StorageUnavailable
from dropr.server._receiver import TooManyChannels
from dropr.wire import WireError

#: The methods dropr-server serves; others get 405 (in JSON, like every answer).
ALLOWED_METHODS = (b"GET", b"HEAD", b"POST")

#: What a full store is answered.  The store's own message names its path,
#: which is no business of an unauthenticated reader of ``/stats``; the
#: server's log keeps it.
STORE_FULL = "the store is full; nothing was stored. Retry later"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error answer: status, reason, and whether the client should retry it."""

    status: int
    reason: str
    retry: bool = False

    def body(self) -> bytes:
        """The JSON body of the answer."""
        answer: dict[str, Any] = {"error": self.reason}
        if self.retry:
            answer["retry"] = True
        return json.dumps(answer).encode("utf-8")


def disk_full(e: OSError) -> bool:
    """True for the errors of a file system out of space or quota."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_descriptors(e: OSError) -> bool:
    """True when this process (or the system) has no file descriptor left."""
    return e.errno in (errno.EMFILE, errno.ENFILE)


def refusal_for(error: BaseException) -> Refusal | None:
    """How an error raised while storing is answered; None for an unexpected one (500)."""
    if isinstance(error, WireError):
        return Refusal(error.status, str(error), error.retry)
    if isinstance(error, TooManyChannels):
        return Refusal(507, str(error))
    if isinstance(error, StorageFull):
        return Refusal(507, STORE_FULL)
    if isinstance(error, InvalidMessage):
        return Refusal(400, str(error))
    if isinstance(error, StorageUnavailable):
        # The store's database is down or restarting: nothing is lost, the
        # client keeps the messages and retries.  The reason names no host.
        return Refusal(503, "the store is unavailable; retry later", retry=True)
    if isinstance(error, StorageIOError):
        # The store's disk failed an operation: nothing of the request was
        # acknowledged; the client keeps it and retries, and the log (not
        # the unauthenticated answer) carries the detail.
        return Refusal(503, "the store could not write to its disk; retry later", retry=True)
    if isinstance(error, OSError) and disk_full(error):
        # (chaos) A full disk is the store being full too: 507, so the
        # client backs off and retries, not an internal error (500).
        return Refusal(507, f"the store's disk is full ({error.strerror}); retry later")
    if isinstance(error, OSError) and out_of_descriptors(error):
        return Refusal(503, "the server is out of file descriptors; retry later")
    return None


#: What an unexpected error is answered: nothing of the request is stored.
INTERNAL_ERROR = Refusal(500, "internal error while storing; nothing was acknowledged")


def error_response(refusal: Refusal, headers: Mapping[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error answer, after which the connection closes.

    Written straight to the transport when the request is refused before
    twisted.web would answer it (before the body, or while it arrives).
    """
    body = refusal.body()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"HTTP/1.1 {refusal.status} "
        f"{http.RESPONSES.get(refusal.status, b'Error').decode('ascii')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


def method_not_allowed(method: bytes) -> Refusal:
    """The answer to a method dropr-server does not serve."""
    shown = method.decode("ascii", "replace")[:20]
    return Refusal(405, f"method {shown} is not served here: POST messages, GET /health")


def is_canonical_path(path: bytes) -> bool:
    """True for a request path in its one plain form.

    A percent-escape, an empty or dot segment: each spells a path that
    twisted.web would serve as another one (``/%73tats`` as ``/stats``), and
    a proxy that filters the literal path would be walked around.  The
    paths dropr-server serves need none of them.
    """
    if not path.startswith(b"/") or b"%" in path or b"\\" in path:
        return False
    segments = path[1:].split(b"/")
    # A trailing slash is the one empty segment allowed (``/health/``).
    inner = segments[:-1]
    return not any(s in (b"", b".", b"..") for s in inner) and segments[-1] not in (b".", b"..")


def _one(args: Mapping[bytes, Sequence[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise WireError(f"query parameter {name.decode()} is given more than once")
    try:
        return bytes(values[0]).decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"query parameter {name.decode()} must be ASCII") from None


def single_message_args(
    args: Mapping[bytes, Sequence[bytes]], signed: bool = False
) -> tuple[str, int, str | None]:
    """``(channel, priority, id)`` of a raw single-message post, from its query.

    A signed post must name its id: the signature lets the same request be
    sent again for a while, and without an id each copy would be stored as
    a new message.  With an id the server's dedup record stores it once.
    """
    channel = validate_channel(_one(args, b"channel") or DEFAULT_CHANNEL)
    raw_priority = _one(args, b"priority")
    try:
        priority = DEFAULT_PRIORITY if raw_priority is None else int(raw_priority)
    except ValueError:
        raise InvalidMessage(f"invalid priority {raw_priority!r}: use 0 to 9") from None
    validate_priority(priority)
    message_id = _one(args, b"id")
    if message_id is not None and not is_valid_id(message_id):
        raise InvalidMessage(
            f"invalid id {message_id!r}: 32 lowercase hex digits (or leave it out)"
        )
    if signed and message_id is None:
        raise InvalidMessage(
            "a signed single message needs id= (32 hex digits, time first; see "
            "docs/wire-format): a replay of the request then stores nothing new"
        )
    return channel, priority, message_id


def body_limit(is_batch: bool, max_request_bytes: int, max_payload: int) -> int:
    """Most body bytes a request may carry: a raw message is one payload."""
    return max_request_bytes if is_batch else min(max_request_bytes, max_payload)


def too_large(length: int | None, limit: int) -> Refusal:
    """413 for a body over ``limit`` (``length`` when it was announced)."""
    said = f"of {length} bytes " if length is not None else ""
    return Refusal(
        413,
        f"request body {said}is larger than this server's limit of {limit} bytes; "
        "send smaller batches",
    )
