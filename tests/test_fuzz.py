"""Fuzzing what a remote peer controls: the batch parser and the names that reach the disk.

Bounded here (``DROPR_FUZZ_EXAMPLES``, 300 by default) so that every test
run fuzzes a little; ``bench/fuzz.py`` runs the same properties for long.

The parser must only ever raise :class:`WireError`, and must never return
a message whose record did not pass its checksum, whatever the bytes.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import zlib

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dropr._ids import new_id
from dropr._message import Message, validate_channel
from dropr.errors import InvalidMessage
from dropr.storage._batchfile import MAGIC
from dropr.storage.files._storage import decode_queue, encode_queue, validate_queue
from dropr.wire import WireError, _parse, encode_batch, parse_batch

EXAMPLES = int(os.environ.get("DROPR_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PAYLOAD = 2000
MAX_MESSAGES = 40
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_ID = re.compile(r"[0-9a-f]{32}\Z")

_channels = st.from_regex(_CHANNEL, fullmatch=True)
_messages = st.builds(
    lambda channel, priority, payload: Message(new_id(), payload, channel, priority),
    _channels,
    st.integers(0, 9),
    st.binary(max_size=300),
)
_batches = st.lists(_messages, max_size=12)


def _valid_frames(data: bytes) -> dict[bytes, list[bytes]]:
    """A reference walk of the frames: raw id → record bodies whose checksum holds."""
    frames: dict[bytes, list[bytes]] = {}
    pos = len(MAGIC)
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 4 + length
        if length < 20 or end + 4 > len(data):
            break
        body = data[pos + 4 : end]
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(body) == crc:
            frames.setdefault(body[:16], []).append(body)
        pos = end + 4
    return frames


def _check(data: bytes) -> list[Message]:
    """Parse ``data``; assert everything a caller relies on; return the messages."""
    try:
        parsed = _parse(data, MAX_PAYLOAD, MAX_MESSAGES)
    except WireError as e:
        assert 400 <= e.status < 500
        return []
    frames = _valid_frames(data)
    assert len(parsed.messages) + len(parsed.rejected) <= MAX_MESSAGES
    for m in parsed.messages:
        assert _ID.match(m.id)
        assert _CHANNEL.match(m.channel), m.channel
        assert 0 <= m.priority <= 9
        assert len(m.payload) <= MAX_PAYLOAD
        # Its record is a real frame of the body, and its checksum held.
        bodies = frames.get(bytes.fromhex(m.id), [])
        assert any(b[16] == m.priority and b.endswith(m.payload) for b in bodies), (
            "a message from a record whose checksum failed"
        )
        validate_channel(m.channel)
        record = parsed.records.get(m.id)
        if record is not None:
            assert zlib.crc32(record[4:-4]) == struct.unpack(">I", record[-4:])[0]
    for message_id, reason in parsed.rejected.items():
        assert _ID.match(message_id) and reason
    return parsed.messages


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    _check(data)
    _check(MAGIC + data)


@FUZZ
@given(_batches, st.data())
def test_mutated_batches_never_yield_a_message_that_was_not_sent(
    batch: list[Message], data: st.DataObject
) -> None:
    body = bytearray(encode_batch(batch))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete", "dup", "len"]))
        at = data.draw(st.integers(0, max(0, len(body) - 1)), label="at")
        if kind == "flip" and body:
            body[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del body[at:]
        elif kind == "insert":
            body[at:at] = data.draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del body[at : at + data.draw(st.integers(1, 40))]
        elif kind == "dup":
            body += body[len(MAGIC) :][: data.draw(st.integers(0, len(body)))]
        elif kind == "len" and len(body) >= at + 4:
            body[at : at + 4] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1)))
    sent = {(m.id, m.payload, m.channel, m.priority) for m in batch}
    for m in _check(bytes(body)):
        assert (m.id, m.payload, m.channel, m.priority) in sent


@FUZZ
@given(st.one_of(st.binary(max_size=600), _batches.map(encode_batch)))
def test_a_body_in_a_file_parses_as_the_same_bytes(data: bytes) -> None:
    """The server maps its spooled body file: same answer as from bytes."""

    def outcome(f: object) -> object:
        try:
            parsed = f()  # type: ignore[operator]
        except WireError as e:
            return ("error", str(e), e.status)
        return (parsed.messages, parsed.rejected)

    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        from_file = outcome(lambda: parse_batch(f, MAX_PAYLOAD, MAX_MESSAGES))
    assert from_file == outcome(lambda: _parse(data, MAX_PAYLOAD, MAX_MESSAGES))


# --- names ------------------------------------------------------------------

_pieces = st.sampled_from(
    ["..", ".", "/", "\\", "\0", "~", "%2e", "%2f", "\u2215", "\u202e", "\uff0f", "\ud800", " "]
)
_nasty = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30).map("".join),
    st.text(alphabet=st.characters(codec="ascii"), max_size=300),
)


def _is_safe_component(name: str) -> bool:
    return (
        bool(name)
        and "/" not in name
        and "\0" not in name
        and name not in (".", "..")
        and len(name.encode("utf-8")) <= 255
    )


@FUZZ
@given(_nasty)
def test_any_queue_name_is_refused_or_becomes_one_safe_file_name(name: str) -> None:
    try:
        valid = validate_queue(name)
    except InvalidMessage:
        return
    encoded = encode_queue(valid)
    assert _is_safe_component(encoded)
    assert decode_queue(encoded) == valid
    if encoded != valid:
        assert encoded.startswith("~") and re.fullmatch(r"~[A-Za-z0-9_-]+", encoded)


@FUZZ
@given(_nasty)
def test_any_channel_name_is_refused_or_is_its_own_safe_file_name(name: str) -> None:
    try:
        channel = validate_channel(name)
    except InvalidMessage:
        return
    assert _is_safe_component(channel) and not channel.startswith((".", "-", "~"))
    assert encode_queue(channel) == channel


@FUZZ
@given(_nasty)
def test_decoding_any_directory_name_never_raises(dirname: str) -> None:
    decoded = decode_queue(dirname)
    assert decoded is None or isinstance(decoded, str)
    if decoded is not None and dirname == encode_queue(decoded):
        assert decode_queue(encode_queue(decoded)) == decoded


@FUZZ
@given(_nasty, _nasty)
def test_two_different_queues_never_share_a_directory(a: str, b: str) -> None:
    assume(a != b)
    try:
        validate_queue(a)
        validate_queue(b)
    except InvalidMessage:
        return
    assert encode_queue(a) != encode_queue(b)
