"""The record codec, and the batch file: the unit of durability of the file-system storage.

The same framed records are the body of a batch request on the wire
(:mod:`dropr.wire`, with the destination left empty) and the content of a
batch file, so a server can write what it received as it is.  This module
is the one place that writes and frames them.

One ``add()`` writes one batch file per queue and priority, synced once.
Layout (all integers big-endian)::

    magic    8 bytes   b"DROPRB1\\n"
    record*  4 bytes   length L of the body
             L bytes   body
             4 bytes   CRC-32 of the body
    body     16 bytes  message id (the 32 hex digits as raw bytes)
             1 byte    priority
             1 byte    length C of the channel name
             2 bytes   length D of the destination
             C bytes   channel name (ASCII)
             D bytes   destination (ASCII; empty in a server store)
             rest      payload

The file's name says what it holds, so listings need no reads::

    <batch id>-<message count>-<payload bytes>.b

A record whose CRC does not match, or a file cut short, is detected on read;
the records before it are still good.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dropr._message import SETTERS as _SETTERS
from dropr._message import Message
from dropr.errors import DroprError

MAGIC = b"DROPRB1\n"
SUFFIX = ".b"
#: A record's length and its CRC-32 frame its body.
FRAME = struct.Struct(">I")
#: The fixed head of a record body: id, priority, channel and destination lengths.
HEAD = struct.Struct(">16sBBH")
_FRAME = FRAME
_HEAD = HEAD
_HEAD_SIZE = HEAD.size
#: A record's length and the head of its body, read in one call.
_RECORD = struct.Struct(">I16sBBH")
#: Marks a name not yet looked up.
_UNKNOWN: Any = object()
#: Largest record body accepted on read (payload limit plus headroom).
MAX_BODY = 256 * 1024 * 1024
#: The largest payload a record can hold and be read back: the body limit
#: less the head and the longest names.  A storage refuses a larger
#: ``max_payload`` at start.
MAX_PAYLOAD = MAX_BODY - _HEAD.size - 255 - 65535
_NAME_RE = re.compile(r"([0-9a-f]{32})-([0-9]{1,9})-([0-9]{1,15})\.b\Z")


@dataclass(frozen=True, slots=True)
class BatchName:
    """The parts of a batch file's name."""

    batch_id: str
    count: int
    nbytes: int

    def __str__(self) -> str:
        return f"{self.batch_id}-{self.count}-{self.nbytes}{SUFFIX}"

    @classmethod
    def parse(cls, name: str) -> BatchName | None:
        """The parts of ``name``, or None if it is not a batch file name."""
        m = _NAME_RE.match(name)
        if m is None:
            return None
        return cls(m.group(1), int(m.group(2)), int(m.group(3)))


def encode(messages: Sequence[Message], destinations: bool = True) -> list[bytes]:
    """The chunks of a batch holding ``messages``, in order: the magic, then a record each.

    ``destinations=False`` leaves each record's destination empty, as a
    request body and a server's store have it.
    """
    chunks = [MAGIC]
    append = chunks.append
    pack_head = _HEAD.pack
    pack_frame = _FRAME.pack
    crc32 = zlib.crc32
    fromhex = bytes.fromhex
    # (channel, destination) → the encoded names and their lengths: a batch
    # names few of them, and encoding each per record was a good part of
    # the cost.
    names: dict[tuple[str, str | None], tuple[bytes, int, int]] = {}
    for m in messages:
        key = (m.channel, m.destination if destinations else None)
        known = names.get(key)
        if known is None:
            channel = m.channel.encode("ascii")
            destination = (key[1] or "").encode("ascii")
            known = names[key] = (channel + destination, len(channel), len(destination))
        body = pack_head(fromhex(m.id), m.priority, known[1], known[2]) + known[0] + m.payload
        append(pack_frame(len(body)))
        append(body)
        append(pack_frame(crc32(body)))
    return chunks


class FrameError(DroprError):
    """A record that cannot be framed: where, and which of the ``KINDS`` of damage."""

    KINDS = ("truncated-length", "impossible-length", "too-long", "truncated", "checksum")

    def __init__(self, kind: str, pos: int, length: int = 0) -> None:
        super().__init__(kind, pos, length)
        self.kind = kind
        self.pos = pos
        self.length = length


def frame_at(data: bytes | Any, pos: int, end: int, max_body: int) -> tuple[int, int]:
    """``(body_start, body_end)`` of the record at ``pos``, its length and CRC checked.

    Raises :class:`FrameError` for a record cut short, of an impossible or
    too large length (more than ``max_body``), or whose checksum does not
    match.  The next record starts at ``body_end + 4``.
    """
    if pos + 4 > end:
        raise FrameError("truncated-length", pos)
    (length,) = _FRAME.unpack_from(data, pos)
    if length < _HEAD.size:
        raise FrameError("impossible-length", pos, length)
    if length > max_body:
        raise FrameError("too-long", pos, length)
    body_start = pos + 4
    body_end = body_start + length
    if body_end + 4 > end:
        raise FrameError("truncated", pos, length)
    (crc,) = _FRAME.unpack_from(data, body_end)
    if zlib.crc32(memoryview(data)[body_start:body_end]) != crc:
        raise FrameError("checksum", pos, length)
    return body_start, body_end


@dataclass(slots=True)
class Decoded:
    """What could be read of a batch file."""

    messages: list[Message]
    #: Why reading stopped early; empty when the whole file was read.
    error: str = ""


def decode(
    data: bytes,
    receipt: Callable[[int], object] | None = None,
    receipts: Sequence[object] | None = None,
) -> Decoded:
    """Read the messages of a batch file's bytes, stopping at the first damage.

    ``receipt``, when given, makes the ``receipt`` of the message at each
    index, so a storage builds each message object once; ``receipts`` gives
    them ready made, by index (those past its end get None).
    """
    if not data.startswith(MAGIC):
        return Decoded([], "not a dropr batch file (bad magic)")
    messages: list[Message] = []
    append = messages.append
    pos = len(MAGIC)
    end = len(data)
    view = memoryview(data)
    unpack_record = _RECORD.unpack_from
    unpack_frame = _FRAME.unpack_from
    crc32 = zlib.crc32
    new = object.__new__
    set_id, set_payload, set_channel, set_priority, set_destination, set_receipt = _SETTERS
    names: dict[bytes, str | None] = {b"": None}
    # A record needs its frame, head and CRC: 28 bytes at least.
    last_start = end - (4 + _HEAD.size + 4)
    index = 0
    marks: Sequence[object] = ()
    if receipts is not None:
        marks = receipts
    given = len(marks)
    while pos < end:
        # The fast path checks what frame_at checks; any doubt goes to
        # frame_at, which names the damage.
        if pos > last_start:
            return _damaged(data, pos, end, messages)
        length, raw_id, priority, clen, dlen = unpack_record(data, pos)
        body_start = pos + 4
        body_end = body_start + length
        if (
            length < _HEAD_SIZE
            or length > MAX_BODY
            or body_end + 4 > end
            or crc32(view[body_start:body_end]) != unpack_frame(data, body_end)[0]
        ):
            return _damaged(data, pos, end, messages)
        p = body_start + _HEAD_SIZE
        q = p + clen
        r = q + dlen
        if r > body_end:
            return Decoded(messages, f"field lengths exceed record at byte {pos}")
        channel = names.get(data[p:q], _UNKNOWN)
        if channel is _UNKNOWN:
            channel = names[data[p:q]] = _ascii(data[p:q])
        if channel is None:
            return Decoded(messages, f"non-ASCII name in record at byte {pos}")
        destination: str | None = None
        if dlen:
            destination = names.get(data[q:r], _UNKNOWN)
            if destination is _UNKNOWN:
                destination = names[data[q:r]] = _ascii(data[q:r])
            if destination is None:
                return Decoded(messages, f"non-ASCII name in record at byte {pos}")
        if index < given:
            mark = marks[index]
        elif receipt is not None:
            mark = receipt(index)
        else:
            mark = None
        # make_message, inline: this loop runs once per message read.
        m = new(Message)
        set_id(m, raw_id.hex())
        set_payload(m, data[r:body_end])
        set_channel(m, channel)
        set_priority(m, priority)
        set_destination(m, destination)
        set_receipt(m, mark)
        append(m)
        index += 1
        pos = body_end + 4
    return Decoded(messages)


def _damaged(data: bytes, pos: int, end: int, messages: list[Message]) -> Decoded:
    """The ``Decoded`` of a file whose record at ``pos`` failed the fast checks."""
    try:
        frame_at(data, pos, end, MAX_BODY)
    except FrameError as e:
        return Decoded(messages, _DAMAGE[e.kind].format(pos=pos, length=e.length))
    raise AssertionError(f"record at byte {pos} failed a check frame_at passes")


@dataclass(slots=True)
class WireRecords:
    """The records of a batch file as a request body carries them, one entry per record."""

    #: Each record framed for the wire: the file's own bytes when its
    #: destination is empty, else rewritten without it.
    records: list[bytes]
    ids: list[str]
    #: Payload bytes of each record.
    sizes: list[int]
    #: The channels the records name.
    channels: set[str]


def wire_records(data: bytes, count: int) -> WireRecords | None:
    """The first ``count`` records of a batch file, ready to be sent; None if damaged.

    Every record's CRC is checked, as ``decode`` checks it; a file that is
    damaged or holds fewer records is for ``decode`` to report (and a
    storage to quarantine).  A spool's records name their destination,
    which the wire leaves empty: such a record is rewritten without it (a
    new head and CRC); a record without one is sent as it is.
    """
    if not data.startswith(MAGIC):
        return None
    records: list[bytes] = []
    ids: list[str] = []
    sizes: list[int] = []
    raw_channels: set[bytes] = set()
    add_record, add_id, add_size = records.append, ids.append, sizes.append
    add_channel = raw_channels.add
    pos = len(MAGIC)
    end = len(data)
    view = memoryview(data)
    unpack_record = _RECORD.unpack_from
    unpack_frame = _FRAME.unpack_from
    pack_frame = _FRAME.pack
    pack_head = _HEAD.pack
    crc32 = zlib.crc32
    last_start = end - (4 + _HEAD.size + 4)
    with view:
        for _ in range(count):
            if pos > last_start:
                return None
            length, raw_id, priority, clen, dlen = unpack_record(data, pos)
            body_start = pos + 4
            body_end = body_start + length
            p = body_start + _HEAD_SIZE
            r = p + clen + dlen
            if (
                length < _HEAD.size
                or length > MAX_BODY
                or body_end + 4 > end
                or r > body_end
                or crc32(view[body_start:body_end]) != unpack_frame(data, body_end)[0]
            ):
                return None
            add_id(raw_id.hex())
            add_size(body_end - r)
            add_channel(data[p : p + clen])
            if dlen:
                body = pack_head(raw_id, priority, clen, 0) + data[p : p + clen] + data[r:body_end]
                add_record(pack_frame(len(body)) + body + pack_frame(crc32(body)))
            else:
                add_record(data[pos : body_end + 4])
            pos = body_end + 4
    channels = {_ascii(c) for c in raw_channels}
    if None in channels:
        return None
    return WireRecords(records, ids, sizes, channels)  # type: ignore[arg-type]


_DAMAGE = {
    "truncated-length": "truncated record length at byte {pos}",
    "impossible-length": "impossible record length {length} at byte {pos}",
    "too-long": "impossible record length {length} at byte {pos}",
    "truncated": "truncated record at byte {pos}",
    "checksum": "checksum mismatch in record at byte {pos}",
}


def _ascii(raw: bytes) -> str | None:
    try:
        return raw.decode("ascii") or None
    except UnicodeDecodeError:
        return None
