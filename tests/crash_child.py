"""The victim of tests/test_crash.py: works a storage until it is killed.

Run as ``python crash_child.py MODE ROOT SIDELOG SEED``.  It opens the
storage at ROOT (recovery runs on open), prints ``ready`` and then loops
over random operations forever; the test kills it with SIGKILL.

MODE ``spool``: a producer puts through ``dropr.Spool`` (``put`` and
``put_many``) while a consumer in the same process takes, acks, releases
and fails through its own ``FilesystemStorage`` on the same directory,
opened the way the client daemon opens its spool (the sole taker, so a new
run may take at once what a killed run had leased).

MODE ``store``: a dedup store (``FilesystemStorage(dedup=True)``), as the
server keeps it: batches of new ids are added, ids offered before (also
those whose add was cut short by an earlier kill) are offered again, and a
consumer takes and acks.

Everything that happened is appended to SIDELOG, one line per event, each
written with one ``write`` and synced, and ending in `` .`` so that a line
cut short by the kill can be told from a whole one.  A line is written
*before* an operation (its intent: lower-case letter, or ``I``/``N``) and
*after* it returned (upper case).  The test reads the log to check what the
storage must hold.  Lines::

    S <pid> .                                   started, storage open
    I <prio> <channel> <sha> ... .              spool: about to put these payloads
    P <id>:<sha> ... .                          spool: put returned these ids
    I <id> ... .                                store: about to add these new ids
    N <id> ... .                                store: about to offer these again
    P <id> ... .                                store: add returned (stored) these
    T <t0> <t1> <id>:<sha>:<prio>:<channel> ... .  take returned these (t0/t1: clock
                                                before and after, for the lease check)
    a|A <id> ... .                              about to ack / ack returned
    r|R <id> ... .                              about to release / release returned
    f|F <id> ... .                              about to fail / fail returned
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import random
import signal
import sys
import time

from dropr._ids import new_id
from dropr._message import Message
from dropr.client._spool import Spool
from dropr.storage.files._storage import FilesystemStorage

DESTINATIONS = ("http://central:8080/", "https://other.example:8443/")
CHANNELS = ("orders", "audit", "c-3")
LEASE = 2.0
#: The consumer's clock runs this far ahead, so that completed buckets are
#: old enough to be removed while the test runs and removal gets killed too.
CLOCK_AHEAD = 15.0


def clock() -> float:
    return time.time() + CLOCK_AHEAD


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_payload(message_id: str) -> bytes:
    """The payload of a store-mode message is a function of its id.

    So any copy that is ever handed out can be checked byte for byte, and a
    resend offers exactly the bytes of the first offer, as a client would.
    """
    size = int(message_id[-4:], 16) % 3000
    seed = hashlib.sha256(message_id.encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def store_channel(message_id: str) -> str:
    return CHANNELS[int(message_id[-5], 16) % len(CHANNELS)]


def store_priority(message_id: str) -> int:
    return int(message_id[-6], 16) % 10


class SideLog:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        # A kill may have cut the previous run's last line; end it so ours
        # start on a line of their own (the reader ignores the fragment).
        size = os.fstat(self.fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self.fd, b"\n")

    def write(self, *fields: str) -> None:
        os.write(self.fd, (" ".join(fields) + " .\n").encode("ascii"))
        os.fsync(self.fd)


def read_lines(path: str) -> list[list[str]]:
    """The whole lines of a side log, split into fields (without the ``.``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = []
    for raw in data.split(b"\n"):
        fields = raw.decode("ascii", "replace").split(" ")
        if len(fields) >= 2 and fields[-1] == ".":
            lines.append(fields[:-1])
    return lines


def consume(
    rng: random.Random,
    log: SideLog,
    storage: FilesystemStorage,
    queue: str,
) -> None:
    """Take some messages and settle them the way consumers do."""
    t0 = clock()
    taken = storage.take(queue, rng.randint(1, 25), lease=LEASE)
    t1 = clock()
    if not taken:
        return
    log.write(
        "T",
        f"{t0:.6f}",
        f"{t1:.6f}",
        *(f"{m.id}:{sha(m.payload)}:{m.priority}:{m.channel}" for m in taken),
    )
    rng.shuffle(taken)
    # Most are acked; some released, some left to their lease, a few failed.
    cut1 = int(len(taken) * rng.uniform(0.6, 1.0))
    cut2 = cut1 + (len(taken) - cut1) // 2
    ack, release, rest = taken[:cut1], taken[cut1:cut2], taken[cut2:]
    fail: list[Message] = []
    if rest and rng.random() < 0.3:
        fail, rest = rest[:1], rest[1:]
    for op, group, call in (
        ("a", ack, storage.ack),
        ("r", release, storage.release),
    ):
        if group:
            log.write(op, *(m.id for m in group))
            call(group)
            log.write(op.upper(), *(m.id for m in group))
    if fail:
        log.write("f", *(m.id for m in fail))
        storage.fail(fail, "crash test: failed on purpose")
        log.write("F", *(m.id for m in fail))


def run_spool(root: str, log: SideLog, rng: random.Random) -> None:
    spool = Spool(root, lease=LEASE)
    # The consumer is opened as Spool(daemon=True) opens it for the client
    # daemon (sole taker, acks not synced), with the clock running ahead.
    consumer = FilesystemStorage(root, lease=LEASE, sync_acks=False, sole_taker=True, clock=clock)
    log.write("S", str(os.getpid()))
    print("ready", flush=True)
    while True:
        r = rng.random()
        destination = rng.choice(DESTINATIONS)
        if r < 0.45:
            count = 1 if r < 0.25 else rng.randint(2, 30)
            priority = rng.randrange(10)
            channel = rng.choice(CHANNELS)
            payloads = [os.urandom(rng.randint(16, 3000)) for _ in range(count)]
            shas = [sha(p) for p in payloads]
            log.write("I", str(priority), channel, *shas)
            if count == 1:
                ids = [spool.put(payloads[0], destination, channel, priority)]
            else:
                ids = spool.put_many(payloads, destination, channel, priority)
            log.write("P", *(f"{i}:{s}" for i, s in zip(ids, shas, strict=True)))
        else:
            consume(rng, log, consumer, destination)


def run_store(root: str, log: SideLog, rng: random.Random, earlier: list[list[str]]) -> None:
    storage = FilesystemStorage(root, dedup=True, exclusive=True, lease=LEASE, clock=clock)
    log.write("S", str(os.getpid()))
    print("ready", flush=True)

    def offer(ids: list[str], new: bool = False) -> None:
        by_channel: dict[str, list[Message]] = {}
        for i in ids:
            m = Message(i, store_payload(i), store_channel(i), store_priority(i))
            by_channel.setdefault(m.channel, []).append(m)
        log.write("I" if new else "N", *ids)
        for channel, group in by_channel.items():
            stored = storage.add(channel, group)
            if stored:
                log.write("P", *stored)

    # Whatever an earlier run offered and may not have finished storing is
    # offered again first, the way a client resends an unanswered batch.
    known = [i for fields in earlier if fields[0] in ("I", "N") for i in fields[1:]]
    known = list(dict.fromkeys(known))
    returned = {i for fields in earlier if fields[0] == "P" for i in fields[1:]}
    pending = [i for i in known if i not in returned]
    if pending:
        offer(pending)
    while True:
        r = rng.random()
        if r < 0.35:
            ids = [new_id() for _ in range(rng.randint(1, 30))]
            known.extend(ids)
            offer(ids, new=True)
        elif r < 0.5 and known:
            offer(rng.sample(known, min(len(known), rng.randint(1, 10))))
        else:
            consume(rng, log, storage, rng.choice(CHANNELS))


if __name__ == "__main__":
    # The test asks for a traceback with SIGUSR1 when a child seems stuck.
    faulthandler.register(signal.SIGUSR1)
    mode, root, log_path, seed = sys.argv[1:5]
    rng = random.Random(seed)
    earlier = read_lines(log_path)
    log = SideLog(log_path)
    if mode == "spool":
        run_spool(root, log, rng)
    elif mode == "store":
        run_store(root, log, rng, earlier)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
