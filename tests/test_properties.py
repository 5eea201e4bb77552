"""Property tests of the plain functions dropr's promises rest on.

Ids, names that become paths, the batch file format, the state log's index
lists and delivery order, each checked against arbitrary input.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
from collections.abc import Iterator
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import dropr._ids
import dropr.storage.files._storage
from dropr._ids import id_millis, id_time, is_valid_id, new_id, new_ids
from dropr._message import (
    DESTINATION_MAX_LENGTH,
    Message,
    validate_channel,
    validate_destination,
)
from dropr.client._spool import Spool
from dropr.errors import InvalidMessage
from dropr.storage import _batchfile as batchfile
from dropr.storage.files._statelog import format_indexes, parse_indexes
from dropr.storage.files._storage import decode_queue, encode_queue, validate_queue

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
DEST = "http://central:8080/"
#: Longest file name Linux file systems accept, in bytes.
_NAME_MAX = 255


@contextlib.contextmanager
def _fresh_id_state() -> Iterator[None]:
    """Run with the id generator's memory cleared, and restore it afterwards.

    Tests that hand ``new_id`` arbitrary times must not leave the process's
    "last millisecond" in the future: every later id (and so every bucket
    other tests write) would inherit it.
    """
    saved = dropr._ids._last_ms, dropr._ids._counter
    dropr._ids._last_ms, dropr._ids._counter = 0, 0
    try:
        yield
    finally:
        dropr._ids._last_ms, dropr._ids._counter = saved


# Seconds since the epoch that fit the id's 48-bit millisecond field.
# Up to a second short of the 48-bit millisecond field's end: a batch of
# ids may run the time on by a few milliseconds (65,536 ids a millisecond).
_times = st.floats(min_value=0.0, max_value=(2**48 - 1001) / 1000.0, allow_nan=False)

# -- ids -------------------------------------------------------------------------


@given(st.lists(_times, min_size=1, max_size=200))
def test_ids_are_well_formed_unique_and_increase_whatever_the_clock_does(
    times: list[float],
) -> None:
    """Ids of one process strictly increase even when ``now`` jumps back."""
    with _fresh_id_state():
        ids = [new_id(t) for t in times]
    for i in ids:
        assert _HEX32.match(i), i
        assert is_valid_id(i)
    assert len(set(ids)) == len(ids)
    assert all(a < b for a, b in itertools.pairwise(ids)), ids
    # An id is never dated before the clock reading it was made at.
    for t, i in zip(times, ids, strict=True):
        assert id_millis(i) >= int(t * 1000)


@given(_times)
def test_id_time_round_trips_to_the_millisecond(now: float) -> None:
    with _fresh_id_state():
        i = new_id(now)
    assert id_millis(i) == int(now * 1000)
    assert id_time(i) == int(now * 1000) / 1000.0
    assert abs(id_time(i) - now) < 0.001


def test_ids_stay_increasing_past_the_per_millisecond_counter() -> None:
    """More than 65536 ids in one millisecond borrow the next millisecond."""
    with _fresh_id_state():
        ids = [new_id(1_000_000.0) for _ in range(70_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert id_millis(ids[0]) == 1_000_000_000
    assert id_millis(ids[-1]) == 1_000_000_001


@given(st.lists(st.tuples(_times, st.integers(min_value=0, max_value=70_000)), max_size=6))
@settings(max_examples=30, deadline=None)
def test_batches_of_ids_increase_with_single_ids_whatever_the_clock_does(
    calls: list[tuple[float, int]],
) -> None:
    """``new_ids`` (one random draw per call) and ``new_id`` share one strictly rising sequence."""
    with _fresh_id_state():
        ids: list[str] = []
        for t, count in calls:
            batch = new_ids(count, now=t)
            assert len(batch) == count
            assert all(id_millis(i) >= int(t * 1000) for i in batch[:1])
            assert len({i[16:] for i in batch}) <= 1  # one draw per batch
            ids.extend(batch)
            ids.append(new_id(t))
    assert all(_HEX32.match(i) for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_new_ids_are_increasing_and_distinct_across_calls() -> None:
    ids = new_ids(500) + new_ids(500) + [new_id() for _ in range(500)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


@given(st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers(), st.none()))
@example("0" * 31 + "G")
@example("0" * 31 + "A")
@example("0" * 33)
def test_is_valid_id_accepts_only_32_lowercase_hex(value: object) -> None:
    expected = isinstance(value, str) and _HEX32.match(value) is not None
    assert is_valid_id(value) is expected


# -- channel and queue names ------------------------------------------------------

_valid_channels = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# Text with the characters that make names dangerous as paths.
_nasty_text = st.one_of(
    st.text(max_size=300),
    st.text(
        alphabet=st.sampled_from(["/", ".", "\0", "~", "a", "é", "=", "\n", "\\"]), max_size=20
    ),
    st.sampled_from(["", ".", "..", "../x", "a/../../etc", "~", "~~", "/", "\0", "a\0b", "~Zm9v"]),
    st.text(min_size=170, max_size=400),
)


def _assert_safe_component(component: str) -> None:
    """``component`` can be joined to a directory and stays one entry in it."""
    assert component
    assert component not in (".", "..")
    assert "/" not in component
    assert "\0" not in component
    assert len(component.encode("utf-8")) <= _NAME_MAX
    # Nothing a shell or another tool could take for an option or hidden file.
    assert component[0] not in "-."


@given(_valid_channels)
def test_valid_channels_are_accepted_and_are_their_own_directory(channel: str) -> None:
    assert validate_channel(channel) == channel
    assert encode_queue(channel) == channel
    assert decode_queue(channel) == channel
    _assert_safe_component(channel)


@given(_nasty_text)
def test_arbitrary_text_is_rejected_as_channel_or_is_a_safe_file_name(text: str) -> None:
    try:
        validate_channel(text)
    except InvalidMessage as e:
        # The error explains what a channel name may be.
        assert "channel" in str(e)
        assert "A-Z a-z 0-9" in str(e)
        return
    _assert_safe_component(text)
    assert encode_queue(text) == text


@given(_nasty_text)
@example("é" * 180)
@example("\ud800")
def test_any_accepted_queue_name_encodes_to_one_safe_component(name: str) -> None:
    """Whatever ``validate_queue`` lets through becomes one safe directory name.

    Queue names are channels in a store and destination URLs in a spool;
    names that are not safe file names as they are get encoded, and the
    encoding must still be a single path component of legal length.
    """
    try:
        validate_queue(name)
    except InvalidMessage:
        return
    component = encode_queue(name)
    _assert_safe_component(component)
    assert decode_queue(component) == name


@given(_valid_channels, _nasty_text)
def test_encoded_names_never_collide(a: str, b: str) -> None:
    assume(a != b)
    for x, y in ((a, b), (b, a)):
        try:
            validate_queue(x)
            validate_queue(y)
        except InvalidMessage:
            continue
        assert encode_queue(x) != encode_queue(y)


@given(st.text(max_size=30))
def test_decode_queue_never_raises(dirname: str) -> None:
    result = decode_queue(dirname)
    assert result is None or isinstance(result, str)


_destinations = st.builds(
    lambda scheme, rest: f"{scheme}://{rest}",
    st.sampled_from(["http", "https"]),
    st.from_regex(r"\A[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,150}\Z"),
)


@given(_destinations)
@example("http://central:8080/")
@example("https://" + "a/" * 76)
@example("http://../../../etc/passwd")
def test_destinations_encode_to_one_safe_component(destination: str) -> None:
    assume(len(destination) <= DESTINATION_MAX_LENGTH)
    assert validate_destination(destination) == destination
    component = encode_queue(destination)
    _assert_safe_component(component)
    assert component.startswith("~")
    assert decode_queue(component) == destination


@given(_nasty_text)
def test_arbitrary_text_is_rejected_as_destination_unless_it_is_a_url(text: str) -> None:
    try:
        validate_destination(text)
    except InvalidMessage as e:
        assert "destination" in str(e)
        return
    assert text.startswith(("http://", "https://"))
    assert text.isascii() and text.isprintable()


# -- batch files -------------------------------------------------------------------

_messages = st.builds(
    Message,
    id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    payload=st.binary(max_size=300),
    channel=_valid_channels,
    priority=st.integers(0, 9),
    destination=st.one_of(st.none(), st.just("http://central:8080/"), _destinations),
)
_batches = st.lists(_messages, max_size=12)


def _encoded(messages: list[Message]) -> bytes:
    return b"".join(batchfile.encode(messages))


@given(_batches)
def test_batch_files_round_trip(messages: list[Message]) -> None:
    assume(all(m.destination is None or len(m.destination) < 2**16 for m in messages))
    decoded = batchfile.decode(_encoded(messages))
    assert decoded.error == ""
    assert decoded.messages == messages
    # Equality of Message ignores nothing that matters; check payloads by hand too.
    assert [m.payload for m in decoded.messages] == [m.payload for m in messages]


def _assert_prefix_only(decoded: batchfile.Decoded, messages: list[Message]) -> None:
    """What was read is an exact prefix of what was written; nothing invented."""
    got = decoded.messages
    assert got == messages[: len(got)]
    for a, b in zip(got, messages, strict=False):
        assert (a.id, a.payload, a.channel, a.priority, a.destination) == (
            b.id,
            b.payload,
            b.channel,
            b.priority,
            b.destination,
        )


@given(_batches, st.data())
def test_any_truncation_of_a_batch_is_detected(
    messages: list[Message], data: st.DataObject
) -> None:
    encoded = _encoded(messages)
    cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")
    decoded = batchfile.decode(encoded[:cut])
    _assert_prefix_only(decoded, messages)
    # Cut at a record boundary the file reads cleanly but short; anywhere
    # else the damage is reported.  Either way it cannot pass for whole.
    assert decoded.error or len(decoded.messages) < len(messages)


@given(_batches, st.data())
def test_any_flipped_byte_in_a_batch_is_detected(
    messages: list[Message], data: st.DataObject
) -> None:
    encoded = bytearray(_encoded(messages))
    pos = data.draw(st.integers(0, len(encoded) - 1), label="pos")
    mask = data.draw(st.integers(1, 255), label="mask")
    encoded[pos] ^= mask
    decoded = batchfile.decode(bytes(encoded))
    _assert_prefix_only(decoded, messages)
    assert decoded.error
    assert len(decoded.messages) < len(messages) or not messages


@given(_batches, st.binary(min_size=1, max_size=50))
def test_garbage_after_a_batch_does_not_change_its_messages(
    messages: list[Message], garbage: bytes
) -> None:
    decoded = batchfile.decode(_encoded(messages) + garbage)
    _assert_prefix_only(decoded, messages)
    assert len(decoded.messages) == len(messages)
    assert decoded.error


@given(st.binary(max_size=200))
def test_decoding_random_bytes_never_raises(data: bytes) -> None:
    decoded = batchfile.decode(batchfile.MAGIC + data)
    assert isinstance(decoded.messages, list)


@given(
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.integers(0, 10**9 - 1),
    st.integers(0, 10**15 - 1),
)
def test_batch_names_round_trip(batch_id: str, count: int, nbytes: int) -> None:
    name = batchfile.BatchName(batch_id, count, nbytes)
    assert batchfile.BatchName.parse(str(name)) == name
    _assert_safe_component(str(name))


@given(st.text(max_size=60))
def test_batch_name_parse_accepts_nothing_else(text: str) -> None:
    parsed = batchfile.BatchName.parse(text)
    if parsed is not None:
        assert str(parsed) == text


# -- state log index lists -----------------------------------------------------------


@given(st.lists(st.integers(0, 100_000), min_size=1, max_size=200))
def test_index_lists_round_trip(indexes: list[int]) -> None:
    text = format_indexes(indexes)
    assert parse_indexes(text) == sorted(indexes)
    # A log line is split on spaces; the list must be one token of ASCII.
    assert " " not in text and "\n" not in text and text.isascii()


@given(st.sets(st.integers(0, 10_000), min_size=1))
def test_index_lists_of_distinct_indexes_are_compact(indexes: set[int]) -> None:
    text = format_indexes(indexes)
    runs = text.split(",")
    # One part per maximal run of consecutive indexes.
    ordered = sorted(indexes)
    breaks = sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1)
    assert len(runs) == breaks + 1


@given(st.text(alphabet="0123456789-, x", max_size=8))
def test_parse_indexes_raises_only_value_error(text: str) -> None:
    try:
        result = parse_indexes(text)
    except ValueError:
        return
    assert all(i >= 0 for i in result)


# -- delivery order ------------------------------------------------------------------


class _SyntheticIds:
    """Batch ids whose time walks forward by chosen steps from a past instant.

    Real batch ids of one test fall into one bucket; these let a property
    spread batches over many buckets (and hour directories) so the order
    across directories is exercised too.
    """

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms
        self.counter = 0

    def advance(self, ms: int) -> None:
        if ms:
            self.ms += ms
            self.counter = 0

    def __call__(self, now: float | None = None) -> str:
        self.counter += 1
        return f"{self.ms:012x}{self.counter:04x}{os.urandom(8).hex()}"


# One put: its priority, how many messages (put_many when > 1), and how far
# the clock moved before it (0: same millisecond; large: another bucket).
_puts = st.lists(
    st.tuples(
        st.integers(0, 9),
        st.integers(1, 4),
        st.sampled_from([0, 0, 0, 1, 3000, 5000, 20 * 60 * 1000]),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_puts, st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_take_returns_priority_order_then_fifo(
    puts: list[tuple[int, int, int]], limits: list[int]
) -> None:
    batch_ids = _SyntheticIds((1_700_000_000 - 86400) * 1000)
    expected: list[tuple[int, int, str]] = []  # (priority, put sequence, id)
    seq = 0
    with (
        tempfile.TemporaryDirectory() as root,
        mock.patch.object(dropr.storage.files._storage, "new_id", batch_ids),
        Spool(root) as spool,
    ):
        for priority, count, step in puts:
            batch_ids.advance(step)
            payloads = [f"m{seq + i}".encode() for i in range(count)]
            if count == 1:
                put_ids = [spool.put(payloads[0], DEST, "orders", priority)]
            else:
                put_ids = spool.put_many(payloads, DEST, "orders", priority)
            for message_id in put_ids:
                expected.append((priority, seq, message_id))
                seq += 1
        taken: list[Message] = []
        round_ = 0
        while True:
            got = spool.take(DEST, limits[round_ % len(limits)])
            round_ += 1
            if not got:
                break
            taken.extend(got)
            spool.ack(got)
    expected.sort(key=lambda e: (e[0], e[1]))
    assert [m.id for m in taken] == [e[2] for e in expected]
    assert [m.payload for m in taken] == [f"m{e[1]}".encode() for e in expected]


def test_priorities_are_single_digits_so_directory_order_is_numeric() -> None:
    """Priority directories sort as strings; that is numeric order only for 0-9."""
    for bad in (10, 11, -1):
        with pytest.raises(InvalidMessage):
            Message(new_id(), b"x", "c", bad).validate()
