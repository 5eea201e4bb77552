"""bench/floor.py runs, bounded, and reports every piece both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "floor.py"


def test_the_floor_benchmark_reports_each_piece_busy_and_after_a_pause(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--samples", "20", "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.read_text())
    assert json.loads(run.stdout) == result
    assert result["samples"] == 20 and set(result["cases"]) == {
        "unix round trip",
        "tcp round trip",
        "unix round trip to a Twisted reactor",
        "append + fdatasync",
        "file + fdatasync + rename + dir fsync",
    }
    for case in result["cases"].values():
        for way in ("busy", "after 10 ms"):
            assert 0 < case[way]["p50_ms"] <= case[way]["p90_ms"]
    assert os.listdir(tmp_path) == ["floor.json"]  # its files cleaned up
