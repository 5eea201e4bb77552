"""dropr.admin._admin: the plain functions under ``dropr list/show/ack/fail/requeue/purge``.

Real spools and stores in ``tmp_path``, opened the way the command opens
them: beside the owner, without its lock.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import dropr
from dropr._ids import new_ids
from dropr._message import Message
from dropr.admin import _admin as admin
from dropr.admin._common import Progress
from dropr.storage.files._storage import FilesystemStorage, encode_queue

DEST = "http://central:8080/"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    """A store as a dropr-server leaves it: orders (5 waiting) and mail (1)."""
    path = str(tmp_path / "store")
    server = FilesystemStorage(path, dedup=True, exclusive=True)
    ids = new_ids(6)
    server.add("orders", [Message(i, b"order %d" % n, "orders", 5) for n, i in enumerate(ids[:5])])
    server.add("mail", [Message(ids[5], b"\xffbinary", "mail", 2)])
    server.close()
    yield path


def open_store(path: str, **kw: object) -> FilesystemStorage:
    return FilesystemStorage(path, **kw)  # type: ignore[arg-type]


def test_entries_show_each_state_in_delivery_order(store: str) -> None:
    with dropr.Store(store) as consumer:
        [first] = consumer.take("orders", 1)
        [second] = consumer.take("orders", 1)
        consumer.fail([second], "payload is not JSON")
    s = open_store(store)
    try:
        listed = list(admin.entries(s))
        by_state = {st: [e for e in listed if e.state == st] for st in admin.STATES}
        assert [e.id for e in by_state[admin.TAKEN]] == [first.id]
        assert [e.message.payload for e in by_state[admin.WAITING]] == [
            b"\xffbinary",
            b"order 2",
            b"order 3",
            b"order 4",
        ]
        [failed] = by_state[admin.FAILED]
        assert (failed.id, failed.reason, failed.queue) == (
            second.id,
            "payload is not JSON",
            "orders",
        )
        assert failed.path.startswith("failed/orders/")
        taken = by_state[admin.TAKEN][0]
        assert taken.lease_expires is not None and taken.lease_expires > time.time()
        data = taken.to_dict()
        assert data["state"] == "taken" and data["receipt"] == taken.lease_owner
        assert os.path.exists(os.path.join(store, data["path"]))
        # Narrowed by queue, channel and state.
        assert [e.id for e in admin.entries(s, "mail")] == [listed[0].id]
        assert len(list(admin.entries(s, states=[admin.WAITING], channel="orders"))) == 3
    finally:
        s.close()


def test_find_by_id_anywhere(store: str) -> None:
    with dropr.Store(store) as consumer:
        taken = consumer.take("orders", 2)
        consumer.fail(taken[1:], "bad")
    s = open_store(store)
    try:
        everything = {e.id: e for e in admin.entries(s)}
        wanted = list(everything)
        found = admin.find(s, [*wanted, "0" * 32])
        assert set(found) == set(everything)
        assert {e.state for e in found.values()} == {"waiting", "taken", "failed"}
        assert admin.find(s, []) == {}
    finally:
        s.close()


def test_ack_by_id_needs_a_take_and_honours_the_receipt(store: str) -> None:
    taker = open_store(store)
    taken = taker.take("orders", 2, lease=60)
    receipt = taker.owner
    taker.close()
    s = open_store(store)
    try:
        waiting = [e.id for e in admin.entries(s, "orders", [admin.WAITING])]
        result = admin.settle(s, [taken[0].id, waiting[0], "f" * 32], "ack", receipt=receipt)
        assert result.done == [taken[0].id]
        assert "not taken" in result.refused[waiting[0]]
        assert "not found" in result.refused["f" * 32]
        # Acked for good: a second ack finds nothing, a consumer never sees it.
        again = admin.settle(s, [taken[0].id], "ack")
        assert again.done == [] and "not found" in again.refused[taken[0].id]
        # Another receipt: refused, and the message stays taken.
        other = admin.settle(s, [taken[1].id], "ack", receipt="000000000000")
        assert other.done == [] and "not 000000000000" in other.refused[taken[1].id]
        assert admin.find(s, [taken[1].id])[taken[1].id].state == admin.TAKEN
    finally:
        s.close()
    with dropr.Store(store) as consumer:
        ids = [m.id for m in consumer.take("orders", 10)]
        assert taken[0].id not in ids and taken[1].id not in ids and len(ids) == 3


def test_a_lease_that_ran_out_can_still_be_acked_unless_taken_again(store: str) -> None:
    taker = open_store(store)
    [m] = taker.take("orders", 1, lease=0.05)
    receipt = taker.owner
    taker.close()
    time.sleep(0.1)
    s = open_store(store)
    try:
        assert admin.find(s, [m.id])[m.id].state == admin.WAITING
        assert admin.settle(s, [m.id], "ack", receipt=receipt).done == [m.id]
    finally:
        s.close()
    taker = open_store(store)
    [m2] = taker.take("orders", 1, lease=0.05)
    taker.close()
    time.sleep(0.1)
    thief = open_store(store)
    [same] = thief.take("orders", 1, lease=60)
    assert same.id == m2.id
    thief.close()
    s = open_store(store)
    try:
        result = admin.settle(s, [m2.id], "ack", receipt=receipt)
        assert result.done == [] and "another take claimed it" in result.refused[m2.id]
    finally:
        s.close()


def test_fail_by_id_moves_to_the_failed_area(store: str) -> None:
    taker = open_store(store)
    [m] = taker.take("mail", 1)
    taker.close()
    s = open_store(store)
    try:
        assert admin.settle(s, [m.id], "fail", reason="no such mailbox").done == [m.id]
        [entry] = admin.entries(s, "mail")
        assert (entry.state, entry.reason, entry.message.payload) == (
            admin.FAILED,
            "no such mailbox",
            b"\xffbinary",
        )
        with pytest.raises(ValueError):
            admin.settle(s, [m.id], "release")
    finally:
        s.close()


def failed_orders(store: str, n: int = 3) -> list[Message]:
    with dropr.Store(store) as consumer:
        taken = consumer.take("orders", n)
        consumer.fail(taken, "consumer bug")
    return taken


def test_requeue_by_id_keeps_the_rest_in_the_failed_area(store: str) -> None:
    failed = failed_orders(store)
    s = open_store(store)
    try:
        selection = admin.select_failed(s, ids=[failed[1].id])
        assert [e.id for e in selection] == [failed[1].id]
        moved = admin.requeue_failed(s, selection)
        assert moved.messages == 1 and moved.left == []
        left = [(e.id, e.reason) for e in admin.entries(s, states=[admin.FAILED])]
        assert left == [(failed[0].id, "consumer bug"), (failed[2].id, "consumer bug")]
    finally:
        s.close()
    with dropr.Store(store) as consumer:
        got = consumer.take("orders", 10)
        # Back at the end of its queue, with its id and payload.
        assert [m.payload for m in got] == [b"order 3", b"order 4", b"order 1"]
        assert got[-1].id == failed[1].id
        assert consumer.stats()["orders"].failed == 2


def test_requeue_by_channel_and_all_then_purge(store: str) -> None:
    failed_orders(store, 2)
    with dropr.Store(store) as consumer:
        consumer.fail(consumer.take("mail", 1), "bounced")
    s = open_store(store)
    try:
        assert len(admin.select_failed(s, channel="mail")) == 1
        assert len(admin.select_failed(s)) == 3
        assert admin.requeue_failed(s, admin.select_failed(s, channel="mail")).messages == 1
        assert admin.select_failed(s, older_than=3600) == []
        # "Failed an hour ago", seen from an hour later.
        later = time.time() + 3600
        old = admin.select_failed(s, older_than=3000, now=later)
        assert len(old) == 2
        assert admin.purge_failed(s, old).messages == 2
        assert admin.select_failed(s) == []
        assert os.listdir(os.path.join(s.failed_dir, "orders")) == []
    finally:
        s.close()
    with dropr.Store(store) as consumer:
        assert consumer.stats()["orders"].failed == 0
        assert [m.payload for m in consumer.take("mail", 5)] == [b"\xffbinary"]


def test_requeue_in_a_spool_keeps_the_destination(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    with dropr.Spool(spool) as sp:
        ids = sp.put_many([b"a", b"b"], DEST, channel="orders")
        sp.fail(sp.take(DEST, 10), "refused by server: HTTP 400")
        s = open_store(spool)
        try:
            assert admin.requeue_failed(s, admin.select_failed(s, queue=DEST)).messages == 2
        finally:
            s.close()
        again = sp.take(DEST, 10)
        assert [(m.id, m.destination, m.channel) for m in again] == [
            (ids[0], DEST, "orders"),
            (ids[1], DEST, "orders"),
        ]


def test_a_damaged_failed_file_is_left_alone(store: str) -> None:
    failed_orders(store, 2)
    s = open_store(store)
    try:
        first, second = admin.select_failed(s)
        path = os.path.join(store, first.path)
        assert second.path == first.path  # one failed batch file
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"XXX")  # the last record's checksum no longer matches
        [readable] = admin.select_failed(s)
        assert readable.id == first.id
        moved = admin.requeue_failed(s, [readable])
        assert moved.messages == 0 and moved.left == [first.id]
        assert os.path.exists(path)
        # Everything readable chosen, a purge deletes it.
        assert admin.purge_failed(s, [readable]).messages == 1
        assert not os.path.exists(path)
    finally:
        s.close()


def test_purge_processed_deletes_finished_buckets_only(tmp_path: Path) -> None:
    path = str(tmp_path / "spool")
    with dropr.Spool(path) as sp:
        sp.put_many([b"x"] * 3, DEST)
        sp.put_many([b"y"], "http://other:8080/")
        taken = sp.take(DEST, 10)
        sp.ack(taken)
    # A minute on, the buckets have settled; nothing took from DEST since.
    later = open_store(path, clock=lambda: time.time() + 60)

    def batch_files(destination: str) -> int:
        qdir = os.path.join(later.queues_dir, encode_queue(destination))
        return sum(f.endswith(".b") for _r, _d, files in os.walk(qdir) for f in files)

    try:
        assert batch_files(DEST) == 1
        assert admin.purge_processed(later, older_than=3600) == 0
        assert admin.purge_processed(later, older_than=30) == 1
        assert batch_files(DEST) == 0
        assert batch_files("http://other:8080/") == 1
        assert later.stats()["http://other:8080/"].depth == 1
        assert admin.purge_processed(later, older_than=30) == 0
    finally:
        later.close()


def test_purge_quarantine_by_age(tmp_path: Path) -> None:
    s = open_store(str(tmp_path / "spool"))
    try:
        old = os.path.join(s.quarantine_dir, "1-queues_x_5_a_b_bad.b")
        with open(old, "wb") as f:
            f.write(b"garbage")
        with open(old + ".why", "w") as f:
            f.write('{"reason": "bad magic", "time": %f}' % (time.time() - 86400 * 8))
        new = os.path.join(s.quarantine_dir, "2-new.b")
        with open(new, "wb") as f:
            f.write(b"garbage")
        listed = admin.quarantined(s)
        assert [(q.location, q.reason) for q in listed] == [
            (old, "bad magic"),
            (new, "(no .why file)"),
        ]
        gone = admin.purge_quarantine(s, older_than=7 * 86400)
        assert [q.location for q in gone] == [old]
        assert sorted(os.listdir(s.quarantine_dir)) == ["2-new.b"]
    finally:
        s.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_only() -> None:
    quiet = io.StringIO()
    p = Progress("searching", quiet)
    p(1, 10)
    p(10, 10)
    p.finish()
    assert quiet.getvalue() == ""
    tty = Terminal()
    p = Progress("searching", tty)
    p(1, 10)
    p(2, 10)  # within a tenth of a second: not drawn
    p(10, 10)  # the last one always is
    p.finish()
    assert tty.getvalue() == ("\rsearching: 1/10\x1b[K" + "\rsearching: 10/10\x1b[K" + "\r\x1b[K")
