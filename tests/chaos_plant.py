"""Plant damage in a spool or store, the way crashes and bad disks leave it.

Used by the fault-injection runs (tests/test_chaos.py, bench/soak.py) and
by tests/test_fsck.py.  Damaged batch files hold *planted* messages only
(fresh ids, payloads made by :func:`dropr.verify.make_planted_payload`), so
planting never touches a message a producer put; what can be salvaged from
them is delivered like any other message and the verifier counts it apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from verify import make_planted_payload

from dropr._ids import new_id
from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._durable import ensure_dir, fsync_dir
from dropr.storage.files._statelog import STATE_NAME, line
from dropr.storage.files._storage import encode_queue

DAMAGE_KINDS = ("truncated", "bitflip", "garbage")


@dataclass
class Planted:
    """What was planted where, and how many of its messages can be read."""

    kind: str
    path: str
    salvageable: int = 0


def bucket_dir(root: str, queue: str, priority: int, batch_id: str) -> str:
    return os.path.join(
        root, "queues", encode_queue(queue), str(priority), batch_id[:7], batch_id[7:9]
    )


@contextlib.contextmanager
def queue_lock(root: str, queue: str) -> Iterator[None]:
    """Hold the lock a queue's takers hold while they append to state logs."""
    qpath = os.path.join(root, "queues", encode_queue(queue))
    ensure_dir(qpath)
    fd = os.open(os.path.join(qpath, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _place(bucket: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``bucket/name`` in one rename, so no reader sees less."""
    ensure_dir(bucket)
    tmp = os.path.join(bucket, f".plant-{os.getpid()}-{os.urandom(4).hex()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(bucket, name))
    fsync_dir(bucket)
    return os.path.join(bucket, name)


def plant_damaged_batch(
    root: str,
    queue: str,
    kind: str,
    rng: random.Random,
    destination: str | None = None,
    count: int = 6,
    priority: int | None = None,
) -> Planted:
    """A batch file of planted messages in ``queue``, damaged as ``kind`` says.

    ``truncated``: cut short inside a record; ``bitflip``: one byte of a
    record's body changed (its checksum no longer matches); ``garbage``: not
    a batch file at all, under a batch file's name.  ``destination`` is set
    on the messages of a spool (the queue of a spool is a destination).
    """
    channel = "orders" if destination is not None else queue
    prio = rng.randrange(10) if priority is None else priority
    messages = [
        Message(new_id(), make_planted_payload(i), channel, prio, destination) for i in range(count)
    ]
    chunks = batchfile.encode(messages)
    data = b"".join(chunks)
    # chunks: magic, then (length, body, crc) per message
    good = rng.randrange(1, count)
    start_of_bad = len(chunks[0]) + sum(len(c) for c in chunks[1 : 1 + 3 * good])
    bad_len = len(chunks[1 + 3 * good]) + len(chunks[2 + 3 * good]) + 4
    if kind == "truncated":
        data = data[: start_of_bad + rng.randrange(1, bad_len)]
        salvageable = good
    elif kind == "bitflip":
        pos = start_of_bad + 4 + rng.randrange(len(chunks[2 + 3 * good]))
        data = data[:pos] + bytes([data[pos] ^ 0x41]) + data[pos + 1 :]
        salvageable = good
    elif kind == "garbage":
        data = os.urandom(rng.randrange(10, 3000))
        salvageable = 0
    else:
        raise ValueError(kind)
    batch_id = new_id()
    name = BatchName(batch_id, count, sum(len(m.payload) for m in messages))
    path = _place(bucket_dir(root, queue, prio, batch_id), str(name), data)
    return Planted(f"batch-{kind}", path, salvageable)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_stale_tmp(root: str) -> Planted:
    """A half-written file in ``tmp/`` whose writer is gone."""
    tmp = os.path.join(root, "tmp")
    ensure_dir(tmp)
    path = os.path.join(tmp, f"{new_id()}.{dead_pid()}.{os.urandom(6).hex()}.tmp")
    with open(path, "wb") as f:
        f.write(b"DROPRB1\n" + os.urandom(100))
    return Planted("stale-tmp", path)


def plant_torn_state_line(root: str, queue: str, rng: random.Random) -> Planted | None:
    """Half a state-log line at the end of some bucket's log of ``queue``.

    Written under the queue's lock, as the line of a taker killed in the
    middle of its append would be.  None if the queue has no state log.
    """
    qpath = os.path.join(root, "queues", encode_queue(queue))
    with queue_lock(root, queue):
        logs = [
            os.path.join(d, STATE_NAME)
            for d, _sub, files in os.walk(qpath)
            if STATE_NAME in files and any(BatchName.parse(f) for f in files)
        ]
        if not logs:
            return None
        path = rng.choice(logs)
        whole = line("A", new_id(), "0-3")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, whole[: rng.randrange(3, len(whole) - 2)].encode("ascii"))
        finally:
            os.close(fd)
    return Planted("torn-state-line", path)


def plant_orphan_state(root: str, queue: str, age: float = 7200.0) -> Planted:
    """An old bucket holding a state log and no batch file (a crash in removal)."""
    # Not new_id(): the ids of one process never go back in time.
    batch_id = f"{int((time.time() - age) * 1000):012x}0000{os.urandom(8).hex()}"
    bucket = bucket_dir(root, queue, 5, batch_id)
    ensure_dir(bucket)
    path = os.path.join(bucket, STATE_NAME)
    with open(path, "w") as f:
        f.write(line("A", batch_id, "0-2"))
    return Planted("orphan-state", path)
