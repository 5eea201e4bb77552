"""One record codec: batch files and request bodies are framed by the same code."""

from __future__ import annotations

import io

import pytest

from dropr._ids import new_ids
from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.wire import WireError, encode_batch, parse_batch


def sample() -> list[Message]:
    a, b = new_ids(2)
    return [
        Message(a, b"first", "orders", 3, "http://central:8080/"),
        Message(b, b"\x00second", "mail", 0, "http://central:8080/"),
    ]


def test_a_request_body_is_a_batch_file_without_destinations() -> None:
    messages = sample()
    body = encode_batch(messages)
    assert body == b"".join(batchfile.encode(messages, destinations=False))
    decoded = batchfile.decode(body)
    assert decoded.error == ""
    assert [(m.id, m.payload, m.channel, m.priority, m.destination) for m in decoded.messages] == [
        (m.id, m.payload, m.channel, m.priority, None) for m in messages
    ]
    parsed = parse_batch(io.BytesIO(body), 1000, 10)
    assert [m.id for m in parsed.messages] == [m.id for m in messages]
    # What the server keeps per message is the record as a batch file holds it.
    rebuilt = batchfile.MAGIC + b"".join(parsed.records[m.id] for m in messages)
    assert rebuilt == body


@pytest.mark.parametrize(
    ("cut", "file_error", "wire_error"),
    [
        (2, "truncated record length", "body ends inside a record length"),
        (10, "truncated record at byte", "body ends inside the record"),
    ],
)
def test_damage_is_found_by_the_same_framing_on_both_sides(
    cut: int, file_error: str, wire_error: str
) -> None:
    body = encode_batch(sample()[:1])
    damaged = body[: len(batchfile.MAGIC) + cut]
    assert file_error in batchfile.decode(damaged).error
    with pytest.raises(WireError, match=wire_error):
        parse_batch(io.BytesIO(damaged), 1000, 10)


def test_a_flipped_byte_is_a_checksum_mismatch_on_both_sides() -> None:
    body = bytearray(encode_batch(sample()[:1]))
    body[-6] ^= 0xFF  # in the payload
    assert "checksum mismatch" in batchfile.decode(bytes(body)).error
    with pytest.raises(WireError, match="checksum mismatch") as caught:
        parse_batch(io.BytesIO(bytes(body)), 1000, 10)
    assert caught.value.retry is True
