"""The SQLite storage when its writes fail, injected without a VFS hook: a
file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write past it
fail with EFBIG, which SQLite reports as a disk I/O error.

Python's sqlite3 has no VFS hook, so EIO and crashes at chosen operations
are not injected here; the crash suite kills processes that use it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dropr._message import Message
from dropr.storage._sqlite import SQLiteStorage

CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from dropr._ids import new_id
    from dropr._message import Message
    from dropr.errors import DroprError
    from dropr.storage._sqlite import SQLiteStorage
    path, limit = sys.argv[1], int(sys.argv[2])
    s = SQLiteStorage(path, dedup=True)
    acked, failed, error = [], [], None
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for i in range(5000):
        batch = [Message(new_id(), b"x" * 2000, "c", 5) for _ in range(10)]
        try:
            acked.extend(s.add("c", batch))
        except Exception as e:
            failed = [m.id for m in batch]
            error = [type(e).__name__, isinstance(e, DroprError), str(e)]
            break
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    print(json.dumps({"acked": acked, "failed": failed, "error": error}))
    """
)


@pytest.mark.parametrize("limit", [300_000, 1_000_000])
def test_a_write_error_under_sqlite_is_a_dropr_error_and_loses_nothing(
    tmp_path: Path, limit: int
) -> None:
    db = str(tmp_path / "store.sqlite")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, db, str(limit)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    name, is_dropr, message = result["error"]
    # SQLite reports EFBIG as an I/O error (SQLITE_IOERR_WRITE), not SQLITE_FULL.
    assert is_dropr and name in ("StorageFull", "StorageIOError"), result["error"]
    assert "retry" in message.lower()
    acked, failed = result["acked"], result["failed"]
    assert acked
    with SQLiteStorage(db, dedup=True) as store:
        # A resend of everything (the failed batch was never answered).
        resent = [Message(i, b"x" * 2000, "c", 5) for i in acked + failed]
        assert set(store.add("c", resent)) <= set(failed)
        ids: list[str] = []
        while batch := store.take("c", 1000):
            ids.extend(m.id for m in batch)
        assert len(ids) == len(set(ids)) == len(acked) + len(failed)
        assert ids == sorted(ids, key=(acked + failed).index)
