"""``dropr fsck``: finds what crashes and bad disks leave, repairs what is safe."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from verify import check_planted_payload, make_payload

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.storage.files import _fsck as fsck
from dropr.storage.files._statelog import STATE_NAME
from dropr.storage.files._storage import FilesystemStorage

sys.path.insert(0, os.path.dirname(__file__))
import chaos_plant

DEST = "http://central:8080/"


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dropr.admin.cli", "fsck", *args], capture_output=True, timeout=60
    )


def kinds(report: fsck.Report) -> dict[str, list[fsck.Finding]]:
    out: dict[str, list[fsck.Finding]] = {}
    for f in report.findings:
        out.setdefault(f.kind, []).append(f)
    return out


def spool_with_messages(path: Path, n: int = 50) -> list[str]:
    with dropr.Spool(str(path)) as sp:
        return sp.put_many([make_payload("t", i, b"body %d" % i) for i in range(n)], DEST)


def take_all(storage: FilesystemStorage, queue: str) -> list[Message]:
    out = []
    while batch := storage.take(queue, 1000):
        out.extend(batch)
        storage.ack(batch)
    return out


def test_a_clean_spool_is_clean(tmp_path: Path) -> None:
    spool_with_messages(tmp_path / "spool")
    report = fsck.check(str(tmp_path / "spool"), "spool")
    assert report.exit_code == 0
    assert report.unrepaired == [] and report.repaired == []
    assert report.counts["waiting"] == 50
    assert report.text().endswith("result: clean")
    assert json.loads(report.to_json())["exit_code"] == 0


def test_spool_damage_is_repaired_and_the_rest_flows(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    ids = spool_with_messages(root)
    rng = random.Random(7)
    # A take whose lease ran out, left by a consumer that is gone.
    with FilesystemStorage(str(root)) as st:
        st.take(DEST, 5, lease=0.01)
    planted = chaos_plant.plant_damaged_batch(str(root), DEST, "truncated", rng, destination=DEST)
    garbage = chaos_plant.plant_damaged_batch(str(root), DEST, "garbage", rng, destination=DEST)
    tmp = chaos_plant.plant_stale_tmp(str(root))
    torn = chaos_plant.plant_torn_state_line(str(root), DEST, rng)
    assert torn is not None
    orphan = chaos_plant.plant_orphan_state(str(root), DEST)
    time.sleep(0.05)

    report = fsck.check(str(root), "spool")
    found = kinds(report)
    assert not report.read_only
    assert report.exit_code == 0, report.text()
    assert {f.path for f in found["damaged-batch"]} == {
        os.path.relpath(planted.path, root),
        os.path.relpath(garbage.path, root),
    }
    assert all(f.repaired for f in report.findings if f.severity == fsck.DAMAGE)
    assert found["stale-tmp"][0].path == os.path.relpath(tmp.path, root)
    assert found["torn-state-line"][0].repaired
    assert found["orphan-state"][0].repaired
    assert found["expired-lease"][0].severity == fsck.NOTE
    assert "5 messages" in found["expired-lease"][0].detail
    assert not os.path.exists(tmp.path)
    assert not os.path.exists(os.path.dirname(orphan.path))
    with open(torn.path, "rb") as f:
        assert f.read().endswith(b"\n")  # only whole, good lines are left
    # Quarantined with reasons; a second run finds nothing left to repair.
    q = sorted(os.listdir(root / "quarantine"))
    assert len(q) == 4 and sum(n.endswith(".why") for n in q) == 2
    again = fsck.check(str(root), "spool")
    assert again.exit_code == 0 and again.repaired == []
    assert [f.kind for f in again.findings if f.severity == fsck.DAMAGE] == []
    # Everything put is still there, and the salvaged planted messages too.
    with FilesystemStorage(str(root), sole_taker=True) as st:
        got = take_all(st, DEST)
    got_ids = [m.id for m in got]
    assert set(ids) <= set(got_ids) and len(got_ids) == len(set(got_ids))
    salvaged = [m for m in got if m.id not in set(ids)]
    assert len(salvaged) == planted.salvageable
    assert all(check_planted_payload(m.payload) for m in salvaged)


def test_store_state_log_is_not_rewritten_and_torn_ids_are_cut(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FilesystemStorage(str(root), dedup=True) as st:
        st.add("orders", [Message(new_id(), b"m%d" % i, "orders") for i in range(20)])
    with FilesystemStorage(str(root)) as st:
        st.ack(st.take("orders", 3))
    torn = chaos_plant.plant_torn_state_line(str(root), "orders", random.Random(1))
    assert torn is not None
    size = os.path.getsize(torn.path)
    slot = next(n for n in os.listdir(root / "ids") if n.endswith(".ids"))
    with open(root / "ids" / slot, "ab") as f:
        f.write(b"\x01\x02\x03")
    report = fsck.check(str(root), "store")
    found = kinds(report)
    assert report.exit_code == 0, report.text()
    # Consumers read state logs by offset: the log only gets its line ended.
    assert found["torn-state-line"][0].repaired
    assert os.path.getsize(torn.path) == size + 1
    assert found["torn-id"][0].repaired
    assert os.path.getsize(root / "ids" / slot) % 16 == 0
    with FilesystemStorage(str(root), dedup=True) as st:
        assert len(take_all(st, "orders")) == 17


def test_read_only_while_the_daemon_holds_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool_with_messages(root)
    tmp = chaos_plant.plant_stale_tmp(str(root))
    planted = chaos_plant.plant_damaged_batch(
        str(root), DEST, "bitflip", random.Random(3), destination=DEST
    )
    daemon = dropr.Spool(str(root), daemon=True)  # holds the root lock, as dropr-client
    try:
        # (its open already removed the stale file; plant another)
        tmp = chaos_plant.plant_stale_tmp(str(root))
        report = fsck.check(str(root), "spool")
        assert report.read_only
        assert f"pid {os.getpid()}" in report.read_only_reason
        assert "stop it" in report.read_only_reason
        assert report.exit_code == 1
        assert {f.kind for f in report.unrepaired} == {"stale-tmp", "damaged-batch"}
        assert os.path.exists(tmp.path) and os.path.exists(planted.path)
        assert "read-only" in report.text()
    finally:
        daemon.close()
    # Stopped: now it repairs.
    assert fsck.check(str(root), "spool").exit_code == 0
    assert not os.path.exists(planted.path)


def test_no_repair_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool_with_messages(root)
    tmp = chaos_plant.plant_stale_tmp(str(root))
    report = fsck.check(str(root), "spool", repair=False)
    assert report.read_only and report.exit_code == 1
    assert os.path.exists(tmp.path)


def test_failed_area_without_reason_gets_one(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FilesystemStorage(str(root), dedup=True) as st:
        st.add("orders", [Message(new_id(), b"x", "orders")])
        st.fail(st.take("orders", 1), "bad order")
    fdir = root / "failed" / "orders"
    why = next(n for n in os.listdir(fdir) if n.endswith(".why"))
    os.unlink(fdir / why)
    report = fsck.check(str(root), "store")
    assert kinds(report)["missing-reason"][0].repaired
    with FilesystemStorage(str(root)) as st:
        [(m, reason)] = st.failed("orders")
    assert m.payload == b"x" and "reason was lost" in reason


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool_with_messages(root)
    out = run_cli("--spool", str(root))
    assert out.returncode == 0, out.stderr
    assert b"result: clean" in out.stdout
    chaos_plant.plant_stale_tmp(str(root))
    out = run_cli("--spool", str(root), "--no-repair", "--json")
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert data["read_only"] and data["unrepaired"] == 1
    assert data["findings"][0]["kind"] == "stale-tmp"
    out = run_cli("--spool", str(root), "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["repaired"] == 1
    out = run_cli("--store", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and b"no spool or store" in out.stderr


@pytest.mark.parametrize("kind", ["spool", "store"])
def test_empty_directory_is_clean(tmp_path: Path, kind: str) -> None:
    (tmp_path / kind).mkdir()
    assert fsck.check(str(tmp_path / kind), kind).exit_code == 0
    assert not os.path.exists(tmp_path / kind / STATE_NAME)
