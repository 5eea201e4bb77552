"""The wire format between dropr-client and dropr-server.

A batch is one ``POST`` to the destination URL with
``Content-Type: application/x-dropr-batch`` and a body in the batch file
format of :mod:`dropr.storage._batchfile` (magic, then framed, checksummed
records; the destination field is left empty), written and framed by that
module's one record codec.  The server looks every id up in its own dedup
record; ``X-Dropr-Fresh``, which old clients send, is only part of the
signed text of a request.

A single message can be posted by any HTTP client (``curl``): any other
content type, the body is the payload, and the query string carries
``channel`` (default ``common``), ``priority`` (default 5) and, for
exactly-once delivery across retries, ``id`` (32 hex digits; the server makes
one when it is missing).

The answer to both is JSON::

    {"stored": ["<id>", ...], "rejected": {"<id>": "<reason>", ...}}

Every id in the request is in exactly one of the two.  "stored" means
durable in the server's store (now or before: a resent id is answered
"stored" again).  A rejection is final; sending the same message again
gets the same answer.  A request that cannot be read at all is answered
4xx with ``{"error": "<reason>"}`` (plus ``"retry": true`` when the bytes
may have been damaged on the way, e.g. a checksum mismatch, so that sending
again may work); a server that cannot store for now
(store full: 507, shutting down: 503) answers 5xx, and the client retries
later.  See docs/wire-format.rst.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, overload

from dropr._message import MAX_PRIORITY, Message, make_message
from dropr.errors import DroprError
from dropr.interfaces import SendResult
from dropr.storage._batchfile import FRAME, HEAD, MAGIC, FrameError, encode, frame_at

CONTENT_TYPE = "application/x-dropr-batch"
FRESH_HEADER = "X-Dropr-Fresh"
#: Bytes of a mapped body parsed between two releases of its pages.
_RELEASE_EVERY = 8 * 1024 * 1024
_CHANNEL_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: A record's length and the head of its body, read in one call.
_RECORD = struct.Struct(">I16sBBH")


class WireError(DroprError, ValueError):
    """A request body that cannot be read; the whole request is refused."""

    def __init__(self, reason: str, status: int = 400, retry: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        #: The bytes may have been damaged on the way: sending again may work.
        self.retry = retry


class WireBatch(Sequence[Message]):
    """Taken messages as the records of a request body, their objects made only if asked for.

    A spool that can (the file system's ``take_wire``) hands its sender the
    records of its batch files ready for the wire, with their ids and
    payload sizes: forwarding a batch then builds no object per message.
    As a sequence it is the taken ``Message`` objects, made on first use
    (by ``materialize``, with their receipts), so any path that needs them
    (a refusal, a retry, too old) works unchanged.  ``ack`` of the storage
    that made it settles it without them (``settle`` is that storage's own
    record of where the messages lie).
    """

    __slots__ = ("_materialize", "_messages", "channels", "ids", "nbytes", "records", "settle")

    def __init__(
        self,
        records: list[bytes],
        ids: list[str],
        nbytes: int,
        materialize: Callable[[], list[Message]],
        settle: object,
        channels: set[str] | None = None,
    ) -> None:
        self.records = records
        self.ids = ids
        self.nbytes = nbytes
        self.settle = settle
        #: The channels of these messages (perhaps more: never fewer).
        self.channels = channels if channels is not None else set()
        self._materialize = materialize
        self._messages: list[Message] | None = None

    def body(self) -> bytes:
        """The request body carrying these messages."""
        return b"".join([MAGIC, *self.records])

    def messages(self) -> list[Message]:
        """The taken messages as objects (made once)."""
        if self._messages is None:
            self._messages = self._materialize()
            if [m.id for m in self._messages] != self.ids:
                raise AssertionError("a wire batch's messages do not match its records")
        return self._messages

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> list[Message]: ...
    def __getitem__(self, index: int | slice) -> Message | list[Message]:
        return self.messages()[index]

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages())


def encode_batch(messages: Sequence[Message]) -> bytes:
    """The request body carrying ``messages`` (destinations left out)."""
    if isinstance(messages, WireBatch):
        return messages.body()
    return b"".join(encode(messages, destinations=False))


@dataclass(slots=True)
class ParsedBatch:
    """The messages of a request, and those refused one by one."""

    messages: list[Message] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    #: id → the message's record exactly as a store batch file holds it,
    #: so the store can write it without encoding it again.
    records: dict[str, bytes] = field(default_factory=dict)


def parse_batch(body: BinaryIO, max_payload: int, max_messages: int) -> ParsedBatch:
    """Read a batch request body from ``body``, checking every record.

    The body is a file (the server spools requests to disk); it is mapped,
    not read into memory.  Each record's announced length is checked against
    ``max_payload`` before the record is looked at.  Raises
    :class:`WireError` for a body that cannot be trusted as a whole (bad
    framing or checksum, too many messages); a record that is well framed
    but carries a bad field is refused alone, in ``rejected``.
    """
    try:
        body.flush()  # what twisted.web wrote may still sit in a buffer
        fileno = body.fileno()
        size = os.fstat(fileno).st_size
    except (AttributeError, OSError, ValueError):
        return _parse(body.read(), max_payload, max_messages)
    if size == 0:
        return _parse(b"", max_payload, max_messages)
    with mmap.mmap(fileno, 0, access=mmap.ACCESS_READ) as data:
        return _parse(data, max_payload, max_messages)


def _parse(data: bytes | mmap.mmap, max_payload: int, max_messages: int) -> ParsedBatch:
    if data[: len(MAGIC)] != MAGIC:
        raise WireError(
            f"body is not a dropr batch (it must start with {MAGIC!r}); to post "
            "one raw message, use another Content-Type"
        )
    result = ParsedBatch()
    messages, rejected, records = result.messages, result.rejected, result.records
    max_body = HEAD.size + 64 + 0xFFFF + max_payload
    channels: dict[bytes, str] = {}
    seen: set[str] = set()
    unpack_record = _RECORD.unpack_from
    unpack_frame = FRAME.unpack_from
    crc32 = zlib.crc32
    make = make_message
    head_size = HEAD.size
    end = len(data)
    view = memoryview(data)
    # A record needs its frame, head and CRC: 28 bytes at least.
    last_start = end - (4 + head_size + 4)
    pos = len(MAGIC)
    count = 0
    mapped = isinstance(data, mmap.mmap)
    released = 0
    try:
        while pos < end:
            if mapped and pos - released >= _RELEASE_EVERY:
                # The mapped pages already parsed count in the process's memory
                # until the map is closed; give them back as parsing goes on, so
                # a large body costs its messages, not their copy as well.
                upto = pos - pos % mmap.PAGESIZE
                data.madvise(mmap.MADV_DONTNEED, 0, upto)  # type: ignore[union-attr]
                released = upto
            count += 1
            if count > max_messages:
                raise WireError(
                    f"more than {max_messages} messages in one request; send smaller batches",
                    413,
                )
            # The checks of frame_at, inline; any doubt goes to frame_at,
            # which names the damage.
            if pos > last_start:
                _check_frame(data, pos, end, max_body, count - 1, max_payload)
            length, raw_id, priority, clen, dlen = unpack_record(data, pos)
            body_start = pos + 4
            stop = body_start + length
            if (
                length < head_size
                or length > max_body
                or stop + 4 > end
                or crc32(view[body_start:stop]) != unpack_frame(data, stop)[0]
            ):
                _check_frame(data, pos, end, max_body, count - 1, max_payload)
            record = data[pos : stop + 4]
            message_id = raw_id.hex()
            pos = stop + 4
            p = 4 + head_size
            payload_start = p + clen + dlen
            if payload_start > 4 + length:
                rejected[message_id] = "field lengths exceed the record"
                continue
            raw_channel = record[p : p + clen]
            channel = channels.get(raw_channel)
            if channel is None:
                if not _CHANNEL_RE.match(raw_channel):
                    rejected[message_id] = (
                        f"invalid channel name {raw_channel!r}: use 1 to 64 characters "
                        "from A-Z a-z 0-9 . _ - starting with a letter or digit"
                    )
                    continue
                channel = channels[raw_channel] = raw_channel.decode("ascii")
            if priority > MAX_PRIORITY:
                rejected[message_id] = f"invalid priority {priority}: use 0 to 9"
                continue
            payload = record[payload_start : 4 + length]
            if len(payload) > max_payload:
                rejected[message_id] = (
                    f"payload of {len(payload)} bytes exceeds this server's maximum "
                    f"of {max_payload} bytes"
                )
                continue
            if message_id in seen:
                # One id names one message: a second record with it is refused
                # (it could differ in channel, priority or payload).
                rejected.setdefault(message_id, "the same id appears twice in this request")
                continue
            seen.add(message_id)
            messages.append(make(message_id, payload, channel, priority, None, None))
            if not dlen:
                records[message_id] = record
    finally:
        view.release()
    return result


def _check_frame(
    data: bytes | mmap.mmap, pos: int, end: int, max_body: int, index: int, max_payload: int
) -> None:
    """Raise the ``WireError`` for the record at ``pos`` that failed the fast checks."""
    try:
        frame_at(data, pos, end, max_body)
    except FrameError as e:
        raise _frame_error(e, index, max_payload) from None
    raise AssertionError(f"record at byte {pos} failed a check frame_at passes")


def _frame_error(e: FrameError, index: int, max_payload: int) -> WireError:
    if e.kind == "too-long":
        return WireError(
            f"record {index}: {e.length} bytes is more than the largest message "
            f"this server accepts ({max_payload} bytes of payload)",
            413,
        )
    if e.kind == "checksum":
        return WireError(f"record {index}: checksum mismatch (corrupted in transit?)", retry=True)
    reason = {
        "truncated-length": "body ends inside a record length",
        "impossible-length": f"impossible length {e.length}",
        "truncated": "body ends inside the record",
    }[e.kind]
    return WireError(f"record {index}: {reason}")


def encode_answer(stored: Sequence[str], rejected: dict[str, str]) -> bytes:
    """The JSON answer to a request."""
    return json.dumps({"stored": list(stored), "rejected": rejected}).encode("utf-8")


class AnswerResults(Sequence[SendResult]):
    """A server's answer as one ``SendResult`` per message, made only when asked for.

    A bulk sender mostly hears "all stored"; it asks ``all_stored`` and acks
    the whole batch without an object per message.
    """

    __slots__ = ("_ids", "_rejected", "_stored", "all_stored")

    def __init__(self, ids: list[str], stored: set[str] | None, rejected: dict[str, object]):
        self._ids = ids
        #: None when every id of the request was stored.
        self._stored = stored
        self._rejected = rejected
        #: True when the server stored every message of the request.
        self.all_stored = stored is None

    @property
    def ids(self) -> list[str]:
        """The ids of the request, in its order."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def _result(self, message_id: str) -> SendResult:
        if self._stored is None or message_id in self._stored:
            return SendResult(message_id, True)
        if message_id in self._rejected:
            return SendResult(message_id, False, str(self._rejected[message_id]), permanent=True)
        return SendResult(message_id, False, "not mentioned in the server's answer")

    @overload
    def __getitem__(self, index: int) -> SendResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[SendResult]: ...
    def __getitem__(self, index: int | slice) -> SendResult | list[SendResult]:
        if isinstance(index, slice):
            return [self._result(i) for i in self._ids[index]]
        return self._result(self._ids[index])

    def __iter__(self) -> Iterator[SendResult]:
        return (self._result(i) for i in self._ids)


def decode_answer(body: bytes, messages: Sequence[Message]) -> AnswerResults:
    """One ``SendResult`` per message from a server's JSON answer.

    A message the answer does not mention is reported not stored, to be
    sent again (transient): the server never stores a message silently.
    """
    try:
        data = json.loads(body)
        stored_ids = data.get("stored")
        if not isinstance(stored_ids, list):
            raise TypeError("stored is not a list")
        rejected = data.get("rejected", {})
        if not isinstance(rejected, dict):
            raise TypeError("rejected is not an object")
        ids = messages.ids if isinstance(messages, WireBatch) else [m.id for m in messages]
        # The usual answer names every id of the request as stored, in its
        # order: one comparison in C instead of a set and an object per id.
        stored = None if not rejected and stored_ids == ids else set(stored_ids)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # (security) Whatever a server or a man in the middle answers, the
        # sender gets a WireError (retry later) and acks nothing.
        raise WireError(f"unreadable answer from server: {e}") from e
    return AnswerResults(ids, stored, rejected)
