"""The examples the documentation shows are real programs: run them.

Each runs in a fresh interpreter, as a reader would run it, against a spool
and a store in ``tmp_path``; the checks are on what it prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The examples, run as real processes against real daemons.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
ID = r"[0-9a-f]{32}"


def run_example(name: str, *args: Path, env: dict[str, str] | None = None) -> list[str]:
    """Run ``docs/examples/<name>`` with ``args``; return its output lines."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.pop("DROPR_SPOOL", None)
    full_env.pop("DROPR_STORE", None)
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        env=full_env,
        cwd=args[0].parent if args else None,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def test_produce_forward_consume(tmp_path: Path) -> None:
    """The tutorial's three steps, in order, on one spool and one store."""
    spool = tmp_path / "spool"
    store = tmp_path / "store"

    produced = run_example("produce.py", spool)
    assert re.fullmatch(f"put 1 message: {ID}", produced[0])
    assert re.fullmatch(f"put_many 4 messages: {ID} \\.\\. {ID}", produced[1])
    assert produced[2:] == ["http://127.0.0.1:8080/: 7 messages, 94 bytes waiting"]

    forwarded = run_example("forward.py", spool, store)
    assert forwarded == ["http://127.0.0.1:8080/ -> orders: stored 7, 7 recognised when sent again"]

    consumed = run_example("consume.py", store)
    # Priority 0 first, then first in, first out; the released message
    # (order 6, taken first) comes back first.
    assert consumed[:6] == [
        "order 6 (priority 0)",
        "order 1 (priority 5)",
        "order 2 (priority 5)",
        "order 3 (priority 5)",
        "order 4 (priority 5)",
        "order 5 (priority 5)",
    ]
    assert re.fullmatch(f"failed {ID}: payload is not JSON: b'not json'", consumed[6])
    assert consumed[7:] == ["orders: 0 waiting, 1 failed"]

    # Everything was acked or failed: a second consumer finds nothing new.
    again = run_example("consume.py", store)
    assert again[-1] == "orders: 0 waiting, 1 failed"
    assert not any(line.startswith("order ") for line in again)


def test_produce_with_spool_from_environment(tmp_path: Path) -> None:
    """Without an argument the examples use ``$DROPR_SPOOL``, like ``put()``."""
    spool = tmp_path / "env-spool"
    produced = run_example("produce.py", env={"DROPR_SPOOL": str(spool)})
    assert produced[-1] == "http://127.0.0.1:8080/: 7 messages, 94 bytes waiting"
    assert (spool / "queues").is_dir()


def test_produce_twisted(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    produced = run_example("produce_twisted.py", spool)
    assert len(produced) == 1
    assert re.fullmatch(f"put 1 message: {ID}", produced[0])


def test_every_example_is_shown_and_run() -> None:
    """Each file in docs/examples is included by a page and run above."""
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.rst"))
    tests = "".join(
        p.read_text(encoding="utf-8") for p in Path(__file__).parent.glob("test_docs_*.py")
    )
    for example in sorted(EXAMPLES.glob("*.py")):
        assert f"literalinclude:: examples/{example.name}" in pages, example.name
        assert f'"{example.name}"' in tests, example.name
