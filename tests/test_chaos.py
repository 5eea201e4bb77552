"""Proven under faults: real daemons, producers and a consumer, while things break.

tests/chaos_harness.py runs a dropr-server and a dropr-client (real twistd
processes), producers putting with ``put`` and ``put_many`` and a consumer,
and injects faults at random instants: kill -9 of each daemon (20 times
each) and of producers in the middle of their puts, a proxy that answers
500/503, drops requests and answers and delays them, disk full on the
spool and on the store, a server restart on a store holding thousands of
waiting messages, and damaged files planted in spool and store.  Then it
drains everything and :func:`dropr.verify.verify` checks every message
whose put returned: stored or consumed exactly once, with its exact
payload, or failed with a reason.  ``DROPR_CHAOS_SEED`` replays a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from verify import make_payload, scan, sha256, verify

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import StorageFull
from dropr.storage.files._storage import FilesystemStorage

sys.path.insert(0, os.path.dirname(__file__))
import chaos_harness

# Chaos runs, full disks on tmpfs, kills: real processes and seconds.
pytestmark = pytest.mark.slow


def test_ci_sized_chaos_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("DROPR_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    config = chaos_harness.Config(seed=seed)
    print(f"DROPR_CHAOS_SEED={seed}")
    outcome = chaos_harness.run(str(tmp_path), config, say=lambda s: print(s, flush=True))
    chaos_harness.dump(outcome, str(tmp_path / "outcome.json"))
    print(outcome.summary())
    report = outcome.report
    assert outcome.findings == [], "\n".join(outcome.findings)
    assert report.lost == 0, report.examples
    assert report.duplicates == 0, report.examples
    assert report.corrupt == 0, report.examples
    assert report.ok, report.to_json()
    assert report.put >= config.messages
    faults = outcome.faults
    assert faults["kill-9-server"] >= config.server_kills
    assert faults["kill-9-client"] >= config.client_kills
    producer_kills = faults["kill-9-producer"] + faults["kill-9-producer-in-put-many"]
    assert producer_kills >= config.producer_kills
    assert report.puts_cut_short >= 1  # some kills did land inside a put
    assert faults["disk-full-spool"] >= 1 and faults["disk-full-store"] >= 1
    assert outcome.timings["big_store_waiting"] >= config.big_store
    # Planted damage was found, set aside with a reason, and logged.
    assert report.quarantined_files >= 1
    assert all(report.quarantine_reasons)
    assert report.puts_refused_full >= 1


# -- focused checks of single faults, fast --------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A small tmpfs at ``path`` for the test (root only), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Fill the file system of ``path`` to the last byte with a ballast file."""
    area = chaos_harness.Area.__new__(chaos_harness.Area)
    area.ballast = str(path / "ballast")
    area.fill()


def messages(n: int, channel: str = "orders") -> list[Message]:
    return [Message(new_id(), make_payload("t", i, os.urandom(50)), channel) for i in range(n)]


def test_store_full_while_indexing_ids_stores_a_resend_once(tmp_path: Path) -> None:
    # The batch file fits, the dedup index's file system is full: the batch
    # is stored, its ids are indexed later (before any look-up, or by
    # recovery).  The sender resends (while the disk is full, and after): the
    # store must hold the batch once.
    store = tmp_path / "store"
    with tmpfs(store / "ids", "64k"):
        storage = FilesystemStorage(str(store), dedup=True)
        try:
            storage.add("orders", messages(10))
            fill(store / "ids")
            batch = messages(300)
            assert storage.add("orders", batch) == [m.id for m in batch]
            with pytest.raises(StorageFull):
                storage.add("orders", batch)  # the resend, while still full
            os.unlink(store / "ids" / "ballast")
            storage.add("orders", batch)  # the resend once there is room
            storage.add("orders", batch)
            ids = [c.id for c in scan(str(store)).waiting]
            assert len(ids) == len(set(ids)) == 310
        finally:
            storage.close()
        # After a restart too (recovery indexes from the checkpoint):
        storage = FilesystemStorage(str(store), dedup=True)
        try:
            assert storage.add("orders", batch) == []
            ids = [c.id for c in scan(str(store)).waiting]
            assert len(ids) == len(set(ids)) == 310
        finally:
            storage.close()


def test_full_spool_disk_raises_storage_full_and_recovers(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    with tmpfs(spool_dir, "1m"):
        spool = dropr.Spool(str(spool_dir / "data"))
        try:
            spool.put(b"before", "http://central:8080/")
            fill(spool_dir)
            with pytest.raises(StorageFull, match="no room"):
                spool.put_many([b"x" * 5000] * 20, "http://central:8080/")
            # Nothing of the refused call is left behind, not even in tmp/.
            assert os.listdir(spool_dir / "data" / "tmp") == []
            os.unlink(spool_dir / "ballast")
            spool.put_many([b"x" * 5000] * 20, "http://central:8080/")
            assert spool.stats()["http://central:8080/"].depth == 21
        finally:
            spool.close()


def test_store_opens_on_a_full_disk_and_catches_up_when_there_is_room(tmp_path: Path) -> None:
    # A server restarting while its disk is full must come up (no crash
    # loop), answer "full" (StorageFull: 507) and carry on once there is room.
    area = tmp_path / "fs"
    store = area / "store"
    with tmpfs(area, "2m"):
        old = messages(50)
        with FilesystemStorage(str(store), dedup=True, exclusive=True) as st:
            st.add("orders", old)
        os.unlink(store / "ids" / "checkpoint")  # so the open has ids to index again
        fill(area)
        storage = FilesystemStorage(str(store), dedup=True, exclusive=True)
        try:
            with pytest.raises(StorageFull):
                storage.add("orders", messages(5))
            storage.maintain()  # still full: no checkpoint, no error
            os.unlink(area / "ballast")
            storage.maintain()
            assert storage.add("orders", old) == []  # the resend is recognised
            assert len(storage.add("orders", messages(5))) == 5
        finally:
            storage.close()
        ids = [c.id for c in scan(str(store)).waiting]
        assert len(ids) == len(set(ids)) == 55


CRASH_IN_RECOVERY = """
import os, sys
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._storage import FilesystemStorage
real = DedupIndex.record
calls = []
def record(self, ids, batch_id=None):
    real(self, ids, batch_id)
    calls.append(1)
    if len(calls) == 1:
        self.checkpoint()
        os._exit(9)  # killed right after the first batch was indexed
DedupIndex.record = record
FilesystemStorage(sys.argv[1], dedup=True, exclusive=True)
"""


def test_a_kill_during_recovery_leaves_no_batch_unindexed(tmp_path: Path) -> None:
    # Batches of two queues, the later one in the queue listed first.  The
    # open after a crash indexes them again; killed after the first one, the
    # checkpoint must not have passed the other.
    store = str(tmp_path / "store")
    earlier, later = messages(3, "zz"), messages(3, "aa")
    with FilesystemStorage(store, dedup=True, exclusive=True) as st:
        st.add("zz", earlier)
        st.add("aa", later)
    for name in os.listdir(tmp_path / "store" / "ids"):
        os.unlink(tmp_path / "store" / "ids" / name)  # the index lost, as if never synced
    child = subprocess.run([sys.executable, "-c", CRASH_IN_RECOVERY, store], timeout=60)
    assert child.returncode == 9
    with FilesystemStorage(store, dedup=True, exclusive=True) as st:
        assert st.add("zz", earlier) == []
        assert st.add("aa", later) == []


# -- the verifier itself ----------------------------------------------------------------


def write_log(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def test_verifier_counts_lost_duplicated_damaged_and_redelivered(tmp_path: Path) -> None:
    store, spool = str(tmp_path / "store"), str(tmp_path / "spool")
    ms = messages(8)
    plog, clog = tmp_path / "producer.log", tmp_path / "consumer.log"
    write_log(plog, [f"I {len(ms)}", *(f"P {m.id} {sha256(m.payload)} orders" for m in ms)])
    write_log(plog, ["R 8", "I 3", f"P {new_id()} {'0' * 64} orders"])  # [8]: lost
    write_log(plog, ["P " + ms[0].id[:10]])  # a line a kill cut short: ignored
    with FilesystemStorage(store) as st:
        st.add("orders", ms[:6])
        taken = st.take("orders", 3)  # [0] [1] [2] consumed...
        st.ack(taken)
        st.add("orders", [ms[0]])  # ...and [0] stored again: a duplicate
        st.fail(st.take("orders", 1), "on purpose")  # [3] failed with a reason
    with FilesystemStorage(spool) as sp:
        sp.add("http://central:8080/", [ms[6]])  # [6] not delivered yet: pending
    c = [f"C {m.id} {sha256(m.payload)} orders v" for m in ms[:3]]
    c[2] = f"C {ms[2].id} {'f' * 64} orders v"  # [2] delivered with other bytes
    write_log(clog, ["S 1", c[0], "S 2", c[0], c[1], c[2], "K"])  # [0] redelivered once
    report = verify([str(plog)], [str(clog)], store, [spool], faults={"kill-9-server": 3})
    assert report.put == 9
    assert report.lost == 2  # [7] nowhere, and the unknown id
    assert report.duplicates == 1 and report.pending == 1
    assert report.corrupt == 1 and report.failed == 1
    assert report.redelivered == 1 and report.puts_cut_short == 1
    assert report.stored == 6 and report.consumed == 3 and report.waiting == 3
    assert not report.ok
    data = json.loads(report.to_json())
    assert data["faults_injected_total"] == 3 and data["ok"] is False
    assert "verdict: FAILED" in report.summary()


def test_verifier_passes_a_clean_run_and_wants_reasons_for_failures(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ms = messages(4)
    plog, clog = tmp_path / "producer.log", tmp_path / "consumer.log"
    write_log(plog, [f"P {m.id} {sha256(m.payload)} orders" for m in ms])
    with FilesystemStorage(store) as st:
        st.add("orders", ms)
        st.ack(st.take("orders", 2))
        st.fail(st.take("orders", 1), "bad")
    write_log(clog, [*(f"C {m.id} {sha256(m.payload)} orders v" for m in ms[:2]), "K"])
    report = verify([str(plog)], [str(clog)], store)
    assert report.ok, report.to_json()
    assert (report.stored, report.consumed, report.failed, report.waiting) == (4, 2, 1, 1)
    fdir = tmp_path / "store" / "failed" / "orders"
    for name in os.listdir(fdir):
        if name.endswith(".why"):
            os.unlink(fdir / name)
    report = verify([str(plog)], [str(clog)], store)
    assert report.failed_without_reason == 1 and not report.ok


def test_a_fresh_batch_arriving_after_its_resend_is_stored_once(tmp_path: Path) -> None:
    # A client sends a batch marked fresh (never offered before), dies while
    # it is on its way (the soak's proxy delayed it), and its successor
    # resends the batch; the resend arrives first and is stored.  The late
    # fresh copy must not be stored again, also after a server restart.
    store = str(tmp_path / "store")
    batch, other = messages(200), messages(50)
    with FilesystemStorage(store, dedup=True, exclusive=True) as st:
        assert len(st.add("orders", batch)) == 200  # the resend, not fresh
        assert st.add("orders", batch) == []  # the late original
        assert len(st.add("orders", other)) == 50
    resent, late = messages(30), messages(30)
    with FilesystemStorage(store, dedup=True, exclusive=True) as st:
        st.add("orders", resent)
    with FilesystemStorage(store, dedup=True, exclusive=True) as st:  # restarted
        assert st.add("orders", resent) == []
        assert len(st.add("orders", late)) == 30
    ids = [c.id for c in scan(store).waiting]
    assert len(ids) == len(set(ids)) == 310
