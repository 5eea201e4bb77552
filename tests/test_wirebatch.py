"""A spool's batches forwarded as records: ``take_wire``, ``WireBatch`` and the sender on them.

The file-system spool hands its sender the records of its batch files
ready for the wire; these tests hold that path to what ``take`` promises
(leases, order, the byte limit, damage reported and quarantined) and show
that a sender on it delivers every message once, in order, also when
some are too old, refused or to be sent again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from dropr._ids import id_at, new_ids
from dropr._message import Message
from dropr.client._sender import DestinationSender
from dropr.interfaces import SendResult
from dropr.storage import _batchfile as batchfile
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import FakeTransport, MemoryStorage, StubServer, run_now
from dropr.wire import WireBatch, decode_answer, encode_answer, encode_batch

DEST = "http://central:8080/"


def messages(n: int, channel: str = "orders", created: float | None = None) -> list[Message]:
    ids = new_ids(n) if created is None else [id_at(created + i / 1000) for i in range(n)]
    return [Message(i, b"payload %d" % k, channel, 5, DEST) for k, i in enumerate(ids)]


@pytest.fixture
def spool(tmp_path: Path) -> FilesystemStorage:
    s = FilesystemStorage(str(tmp_path / "spool"))
    yield s
    s.close()


# -- the codec -----------------------------------------------------------------------


def test_wire_records_are_the_request_body_of_the_messages_without_destinations() -> None:
    batch = [*messages(5), Message(new_ids(1)[0], b"", "other", 0)]
    data = b"".join(batchfile.encode(batch))
    records = batchfile.wire_records(data, len(batch))
    assert records is not None
    assert batchfile.MAGIC + b"".join(records.records) == encode_batch(batch)
    assert records.ids == [m.id for m in batch]
    assert records.sizes == [len(m.payload) for m in batch]
    assert records.channels == {"orders", "other"}


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_wire_records_of_a_damaged_or_short_file_are_none(cut: int) -> None:
    batch = messages(3)
    data = b"".join(batchfile.encode(batch))
    assert batchfile.wire_records(data[:-cut], 3) is None
    flipped = bytearray(data)
    flipped[-cut] ^= 0xFF
    assert batchfile.wire_records(bytes(flipped), 3) is None
    assert batchfile.wire_records(data, 4) is None
    assert batchfile.wire_records(b"not a batch", 0) is None


# -- take_wire -------------------------------------------------------------------------


def test_take_wire_leases_in_order_within_the_byte_limit(spool: FilesystemStorage) -> None:
    first, second = messages(3), messages(3)
    spool.add(DEST, first)
    spool.add(DEST, second)
    size = len(first[0].payload)
    batch = spool.take_wire(DEST, 10, max_bytes=4 * size)
    assert isinstance(batch, WireBatch)
    assert batch.ids == [m.id for m in first + second[:1]]
    assert batch.nbytes == 4 * size and batch.channels == {"orders"}
    assert batch.body() == encode_batch(first + second[:1])
    # Leased: neither kind of take hands them out again.
    assert batch._messages is None
    rest = spool.take(DEST, 10)
    assert [m.id for m in rest] == [m.id for m in second[1:]]
    spool.release(rest)
    # One message always goes, however large.
    one = spool.take_wire(DEST, 10, max_bytes=1)
    assert isinstance(one, WireBatch) and one.ids == [second[1].id]
    spool.release(one)
    assert one._messages is None  # given back by its indexes
    spool.ack(batch)
    assert batch._messages is None
    assert spool.usage() == (2, 2 * size)
    assert [m.id for m in spool.take(DEST, 10)] == [m.id for m in second[1:]]


def test_a_wire_batch_is_its_messages_when_asked(spool: FilesystemStorage) -> None:
    sent = messages(4)
    spool.add(DEST, sent)
    batch = spool.take_wire(DEST, 3, max_bytes=10_000)
    assert isinstance(batch, WireBatch)
    assert list(batch) == sent[:3] and batch[1] == sent[1] and len(batch) == 3
    # Released through its messages, it is taken again first.
    spool.release(batch)
    again = spool.take_wire(DEST, 10, max_bytes=10_000)
    assert isinstance(again, WireBatch) and again.ids == [m.id for m in sent]
    spool.fail(list(again)[:1], "refused")
    spool.ack(list(again)[1:])
    assert spool.usage() == (0, 0)
    assert [m.id for m, _why in spool.failed(DEST)] == [sent[0].id]


def test_a_wire_batch_is_acked_by_its_own_storage_only(tmp_path: Path) -> None:
    a, b = FilesystemStorage(str(tmp_path / "a")), FilesystemStorage(str(tmp_path / "b"))
    try:
        a.add(DEST, messages(2))
        batch = a.take_wire(DEST, 10, max_bytes=10_000)
        with pytest.raises(Exception, match="not taken from this storage"):
            b.ack(batch)
    finally:
        a.close()
        b.close()


def test_a_damaged_batch_file_makes_take_wire_a_take_that_reports_it(
    spool: FilesystemStorage, tmp_path: Path
) -> None:
    good, damaged = messages(2), messages(3)
    spool.add(DEST, good)
    spool.add(DEST, damaged)
    files = sorted((tmp_path / "spool").rglob("*.b"))
    assert len(files) == 2
    data = bytearray(files[1].read_bytes())
    data[-10] ^= 0xFF  # the last record's payload
    files[1].write_bytes(bytes(data))
    taken = spool.take_wire(DEST, 10, max_bytes=10_000)
    # A plain take: the readable prefix is kept, the file quarantined.
    assert not isinstance(taken, WireBatch)
    assert [m.id for m in taken] == [m.id for m in good + damaged[:2]]
    assert list((tmp_path / "spool" / "quarantine").iterdir())


def test_the_answer_to_a_wire_batch_needs_no_message_objects(spool: FilesystemStorage) -> None:
    sent = messages(3)
    spool.add(DEST, sent)
    batch = spool.take_wire(DEST, 10, max_bytes=10_000)
    assert isinstance(batch, WireBatch)
    results = decode_answer(encode_answer(batch.ids, {}), batch)
    assert results.all_stored and results.ids is batch.ids
    partial = decode_answer(encode_answer(batch.ids[:2], {batch.ids[2]: "no"}), batch)
    assert not partial.all_stored
    assert [r.stored for r in partial] == [True, True, False]
    assert partial[2] == SendResult(batch.ids[2], False, "no", permanent=True)


# -- the sender on a file-system spool ---------------------------------------------------


class Rig:
    def __init__(self, spool: FilesystemStorage, **options: object) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        self.spool = spool
        self.server = StubServer(clock=self.clock.seconds)
        self.sender = DestinationSender(
            spool,
            DEST,
            self.server.transport,
            self.clock,
            run_now,
            clock=self.clock.seconds,
            random=lambda: 0.5,
            **options,  # type: ignore[arg-type]
        )

    def stored(self, channel: str = "orders") -> list[Message]:
        return self.server.store.take(channel, 100_000)


def test_a_sender_forwards_records_once_and_in_order(spool: FilesystemStorage) -> None:
    rig = Rig(spool, max_batch=4)
    sent = [messages(3, channel) for channel in ("a", "b", "a", "b")]
    for batch in sent:
        spool.add(DEST, batch)
    rig.sender.wake()
    assert spool.usage() == (0, 0)
    for channel, expected in (("a", sent[0] + sent[2]), ("b", sent[1] + sent[3])):
        got = rig.stored(channel)
        assert [(m.id, m.payload, m.destination) for m in got] == [
            (m.id, m.payload, None) for m in expected
        ]
    assert rig.sender.stored == 12 and rig.sender.sent_bytes == sum(
        len(m.payload) for b in sent for m in b
    )


def test_a_stored_wire_batch_is_sent_and_acked_without_message_objects(
    spool: FilesystemStorage,
) -> None:
    made: list[bool] = []

    class Transport:
        def send(self, destination: str, batch: WireBatch) -> object:
            from twisted.internet.defer import succeed

            body = encode_batch(batch)
            assert body.startswith(batchfile.MAGIC)
            made.append(batch._messages is not None)
            return succeed(decode_answer(encode_answer(batch.ids, {}), batch))

    clock = MemoryReactorClock()
    sender = DestinationSender(
        spool,
        DEST,
        Transport(),
        clock,
        run_now,
        max_batch=2,  # type: ignore[arg-type]
    )
    spool.add(DEST, messages(5))
    sender.wake()
    assert made == [False, False, False] and spool.usage() == (0, 0)
    assert sender.stored == 5


def test_a_sender_on_records_fails_the_too_old_and_sends_the_rest(
    spool: FilesystemStorage,
) -> None:
    rig = Rig(spool, max_age=60)
    old = messages(2, created=rig.clock.seconds())
    spool.add(DEST, old)
    rig.clock.advance(61)
    young = messages(2, created=rig.clock.seconds())
    spool.add(DEST, young)
    rig.sender.wake()
    assert [m.id for m, _why in spool.failed(DEST)] == [m.id for m in old]
    assert [m.id for m in rig.stored()] == [m.id for m in young]
    assert spool.usage() == (0, 0)


def test_a_sender_on_records_fails_the_refused_and_retries_the_unanswered(
    spool: FilesystemStorage,
) -> None:
    rig = Rig(spool)
    sent = messages(3)
    spool.add(DEST, sent)
    answers: list[list[SendResult]] = [
        [
            SendResult(sent[0].id, True),
            SendResult(sent[1].id, False, "bad", permanent=True),
            SendResult(sent[2].id, False, "busy"),
        ]
    ]
    transport = FakeTransport(
        lambda d, ms: answers.pop(0) if answers else [SendResult(m.id, True) for m in ms]
    )
    rig.sender.transport = transport
    rig.sender.wake()
    assert [m.id for m, why in spool.failed(DEST)] == [sent[1].id]
    assert [[m.id for m in ms] for _d, ms in transport.sent] == [
        [m.id for m in sent],
        [sent[2].id],
    ]
    assert spool.usage() == (0, 0)


def test_a_spool_without_take_wire_is_sent_from_message_objects() -> None:
    clock = MemoryReactorClock()
    spool = MemoryStorage(clock=clock.seconds)
    transport = FakeTransport()
    sender = DestinationSender(spool, DEST, transport, clock, run_now, clock=clock.seconds)
    spool.add(DEST, messages(2))
    sender.wake()
    assert [type(ms) for _d, ms in transport.sent] == [list]
    assert spool.usage() == (0, 0)


def test_the_daemons_fronted_spool_hands_out_batch_files_as_records_then_memory(
    tmp_path: Path,
) -> None:
    from dropr.client._front import FrontedSpool
    from dropr.client._putlog import PutLog
    from dropr.client._spool import Spool

    spool = Spool(str(tmp_path / "fronted"), daemon=True, put_socket=False)
    try:
        log = PutLog(spool.path)
        log.open()
        front = FrontedSpool(spool.storage, log)
        in_memory, on_disk = messages(2), messages(3)
        front.offer(in_memory, log.append(in_memory))
        spool.storage.add(DEST, on_disk)
        batch = front.take_wire(DEST, 10, 10_000)
        assert isinstance(batch, WireBatch) and batch.ids == [m.id for m in on_disk]
        front.release(batch)  # back to the spool, by its indexes
        batch = front.take_wire(DEST, 10, 10_000)
        assert isinstance(batch, WireBatch) and batch.ids == [m.id for m in on_disk]
        front.ack(batch)
        assert batch._messages is None
        held = front.take_wire(DEST, 10, 10_000)
        assert [m.id for m in held] == [m.id for m in in_memory]
        front.ack(held)
        assert front.take_wire(DEST, 10, 10_000) == [] and front.usage() == (0, 0)
    finally:
        spool.close()
