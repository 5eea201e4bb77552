"""kill -9 at random moments loses nothing acknowledged and shows nothing torn.

A child process (tests/crash_child.py, a fresh interpreter) works a spool or
a dedup store and writes what it did to a side log; the test kills it with
SIGKILL at random moments, many times, each new child reopening the storage
(recovery runs on open) and carrying on.  At the end the test drains the
storage and holds it to the side log:

* every message whose ``put``/``add`` returned is still there, or a consumer
  started to ack or fail it (promise A1);
* no message is there twice, none is handed out again after its ack (or
  fail) returned, and none is handed out twice within one lease (A2, and
  the lease contract of ``take``; the spool's daemon is its sole taker, so
  there only within one run); the dedup store refuses every id it ever
  stored, also after kills, acks and bucket removal;
* every payload ever handed out is byte for byte one that was put, under
  the id it was put with (no half-written or mixed-up message is visible),
  and nothing lands in quarantine: a kill never leaves a damaged file;
* after the drain, order within each queue is priority, then put order (A3);
* recovery leaves no temporary file behind.

A message taken but not acked before a kill comes back once its lease ends:
that is redelivery, which the promises allow, not a duplicate.

``DROPR_CRASH_KILLS`` sets the number of kills per storage (default 25);
``DROPR_CRASH_SEED`` replays a run.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import crash_child
import pytest

from dropr._message import Message
from dropr.storage.files._storage import FilesystemStorage

# kill -9 loops on real processes.
pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DROPR_CRASH_KILLS", "25"))
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_child.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Slack for clock rounding (ms) when telling whether a lease had ended.
LEASE_SLACK = 0.005


def _seed() -> int:
    return int(os.environ.get("DROPR_CRASH_SEED") or random.SystemRandom().randrange(2**32))


@dataclass
class Figures:
    kills: int = 0
    killed_before_ready: int = 0
    runs_with_work: int = 0
    puts_returned: int = 0
    taken: int = 0
    acked: int = 0
    released: int = 0
    failed: int = 0
    resent: int = 0
    drained: int = 0


@dataclass
class IdHistory:
    """What the side log says happened to one message id, in order."""

    put_sha: str | None = None
    stored: int = 0  # add/put calls that returned it as stored
    ack_intent: bool = False
    acked: int = 0  # ack calls on it that returned
    fail_intents: int = 0
    failed: bool = False
    # The last take: (run, clock before, clock after, settled since?)
    last_take: tuple[int, float, float, bool] | None = None
    problems: list[str] = field(default_factory=list)


def _kill_loop(mode: str, root: Path, side_log: Path, seed: int, figures: Figures) -> None:
    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    stderr_path = root.parent / f"{mode}-child.err"
    for run in range(KILLS):
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, CHILD, mode, str(root), str(side_log), f"{seed}-{run}"],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        assert child.stdout is not None
        try:
            if rng.random() < 0.2:
                # Anywhere in start-up, often in the middle of recovery.
                time.sleep(rng.uniform(0.0, 0.25))
                figures.killed_before_ready += 1
            else:
                ready, _, _ = select.select([child.stdout], [], [], 60.0)
                if not ready:
                    child.send_signal(signal.SIGUSR1)  # crash_child dumps its stack
                    time.sleep(1.0)
                    pytest.fail(
                        f"crash child (run {run}, seed {seed}) not ready within 60 s:\n"
                        + stderr_path.read_text()
                    )
                line = child.stdout.readline()
                if line != b"ready\n":
                    child.wait(10)
                    pytest.fail(
                        f"crash child (run {run}, seed {seed}) died on its own:\n"
                        + stderr_path.read_text()
                    )
                time.sleep(rng.uniform(0.0, 0.3))
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        if child.returncode != -signal.SIGKILL:
            pytest.fail(
                f"crash child (run {run}, seed {seed}) exited with {child.returncode} "
                "before it was killed:\n" + stderr_path.read_text()
            )
        figures.kills += 1


class Ledger:
    """The side log replayed in order, each event checked against the past."""

    def __init__(self, mode: str, figures: Figures) -> None:
        self.mode = mode
        self.figures = figures
        self.ids: dict[str, IdHistory] = defaultdict(IdHistory)
        #: spool: sha of each payload put -> (priority, channel)
        self.intents: dict[str, tuple[int, str]] = {}
        #: store: every id offered to add
        self.offered: set[str] = set()
        #: spool: which id each payload was put (or seen) under
        self.sha_owner: dict[str, str] = {}
        #: (line, position) of the put or add that returned each id
        self.put_order: dict[str, tuple[int, int]] = {}

    def check_payload(
        self, message_id: str, digest: str, priority: int, channel: str, where: str
    ) -> None:
        """A message handed out is exactly one that was put, under its own id."""
        h = self.ids[message_id]
        if self.mode == "spool":
            if digest not in self.intents:
                h.problems.append(f"{where}: payload {digest[:12]} was never put")
            elif self.intents[digest] != (priority, channel):
                h.problems.append(
                    f"{where}: priority/channel {(priority, channel)} but put with "
                    f"{self.intents[digest]}"
                )
            owner = self.sha_owner.setdefault(digest, message_id)
            if owner != message_id:
                h.problems.append(f"{where}: payload of {owner} handed out as {message_id}")
            if h.put_sha is not None and h.put_sha != digest:
                h.problems.append(f"{where}: payload differs from the one put")
        else:
            if message_id not in self.offered:
                h.problems.append(f"{where}: id was never offered")
            expected = (
                crash_child.sha(crash_child.store_payload(message_id)),
                crash_child.store_priority(message_id),
                crash_child.store_channel(message_id),
            )
            if (digest, priority, channel) != expected:
                h.problems.append(f"{where}: message differs from the one offered")

    def replay(self, lines: list[list[str]]) -> None:
        figures, ids = self.figures, self.ids
        runs_with_work = set()
        run = 0
        for n, fields in enumerate(lines):
            tag, args = fields[0], fields[1:]
            if tag == "S":
                run += 1
            elif tag == "I" and self.mode == "spool":
                priority, channel = int(args[0]), args[1]
                for digest in args[2:]:
                    self.intents[digest] = (priority, channel)
            elif tag in ("I", "N"):
                self.offered.update(args)
                if tag == "N":
                    figures.resent += len(args)
            elif tag == "P":
                runs_with_work.add(run)
                for pos, item in enumerate(args):
                    message_id, _, digest = item.partition(":")
                    h = ids[message_id]
                    h.stored += 1
                    figures.puts_returned += 1
                    self.put_order.setdefault(message_id, (n, pos))
                    if self.mode == "spool":
                        h.put_sha = digest
                        owner = self.sha_owner.setdefault(digest, message_id)
                        if owner != message_id:
                            h.problems.append(f"put returned {message_id} for {owner}'s payload")
                    if h.stored > 1:
                        h.problems.append(f"stored {h.stored} times (line {n})")
            elif tag == "T":
                self._taken(n, run, float(args[0]), float(args[1]), args[2:])
            elif tag in ("a", "r", "f"):
                for message_id in args:
                    h = ids[message_id]
                    if h.last_take is not None:
                        h.last_take = (*h.last_take[:3], True)
                    if tag == "a":
                        h.ack_intent = True
                    elif tag == "f":
                        h.fail_intents += 1
            elif tag == "A":
                for message_id in args:
                    ids[message_id].acked += 1
                    figures.acked += 1
            elif tag == "R":
                figures.released += len(args)
            elif tag == "F":
                for message_id in args:
                    ids[message_id].failed = True
                    figures.failed += 1
        figures.runs_with_work = len(runs_with_work)

    def _taken(self, n: int, run: int, t0: float, t1: float, items: list[str]) -> None:
        for item in items:
            message_id, digest, priority, channel = item.split(":")
            self.figures.taken += 1
            h = self.ids[message_id]
            self.check_payload(message_id, digest, int(priority), channel, f"take (line {n})")
            if h.acked:
                h.problems.append(f"handed out again after its ack returned (line {n})")
            if h.failed:
                h.problems.append(f"handed out again after its fail returned (line {n})")
            if h.last_take is not None:
                p_run, p0, _p1, settled = h.last_take
                # The spool's daemon is its sole taker: a lease of a killed
                # run is void for the next one, by design.
                same_taker = self.mode == "store" or p_run == run
                if same_taker and not settled and t1 < p0 + crash_child.LEASE - LEASE_SLACK:
                    h.problems.append(
                        f"handed out twice within one lease (line {n}: taken "
                        f"{t1 - p0:.3f} s after the previous take)"
                    )
            h.last_take = (run, t0, t1, False)


def _drain_and_check(mode: str, root: Path, side_log: Path, figures: Figures) -> None:
    ledger = Ledger(mode, figures)
    ledger.replay(crash_child.read_lines(str(side_log)))
    ids, check_payload, put_order = ledger.ids, ledger.check_payload, ledger.put_order
    queues = crash_child.DESTINATIONS if mode == "spool" else crash_child.CHANNELS
    far_future = time.time() + 10_000.0  # every lease has ended
    storage = FilesystemStorage(
        str(root),
        dedup=mode == "store",
        exclusive=True,
        lease=3600.0,
        clock=lambda: far_future,
    )
    try:
        assert os.listdir(root / "tmp") == [], "recovery left temporary files of dead writers"
        quarantined = os.listdir(root / "quarantine")
        assert quarantined == [], f"a kill left damaged files: {quarantined[:4]}"
        present: dict[str, Message] = {}
        order_problems: list[str] = []
        for queue in queues:
            drained: list[Message] = []
            seen_here: set[str] = set()
            while True:
                got = storage.take(queue, 1000)
                if not got:
                    break
                again = [m for m in got if m.id in seen_here]
                if again:
                    # Taken messages are leased for an hour: handing one out
                    # twice in this loop breaks the lease contract.
                    for m in again:
                        ids[m.id].problems.append("handed out twice in the final drain")
                    break
                seen_here.update(m.id for m in got)
                drained.extend(got)
            figures.drained += len(drained)
            for m in drained:
                if m.id in present:
                    ids[m.id].problems.append("present twice in the storage")
                present[m.id] = m
                check_payload(
                    m.id, crash_child.sha(m.payload), m.priority, m.channel, "final drain"
                )
            order_problems.extend(_check_order(mode, queue, drained, put_order))
        in_failed: dict[str, int] = defaultdict(int)
        for queue in queues:
            for m, reason in storage.failed(queue, limit=10**9):
                in_failed[m.id] += 1
                assert reason == "crash test: failed on purpose"
                check_payload(
                    m.id, crash_child.sha(m.payload), m.priority, m.channel, "failed area"
                )
        for message_id, h in ids.items():
            if message_id in present and h.acked:
                h.problems.append("still waiting although its ack returned")
            if message_id in present and h.failed:
                h.problems.append("still waiting although its fail returned")
            if (
                h.stored
                and message_id not in present
                and not h.ack_intent
                and not in_failed[message_id]
            ):
                h.problems.append("put returned, never acked or failed, and it is gone")
            if h.failed and not in_failed[message_id]:
                h.problems.append("fail returned but it is not in the failed area")
            if in_failed[message_id] > h.fail_intents:
                h.problems.append(
                    f"{in_failed[message_id]} times in the failed area after "
                    f"{h.fail_intents} fail calls"
                )
        if mode == "store":
            # The dedup index remembers every id it stored, acked and cleaned
            # up or not, across every kill.
            stored = [i for i, h in ids.items() if h.stored]
            again = [
                Message(
                    i,
                    crash_child.store_payload(i),
                    crash_child.store_channel(i),
                    crash_child.store_priority(i),
                )
                for i in stored
            ]
            for channel in crash_child.CHANNELS:
                group = [m for m in again if m.channel == channel]
                if group:
                    accepted = storage.add(channel, group)
                    for i in accepted:
                        ids[i].problems.append("stored again after the kills: dedup forgot it")
    finally:
        storage.close()
    problems = [f"{i}: {p}" for i, h in sorted(ids.items()) for p in h.problems]
    problems += order_problems
    assert not problems, f"{len(problems)} violations, e.g.:\n" + "\n".join(problems[:30])


def _check_order(
    mode: str, queue: str, drained: list[Message], put_order: dict[str, tuple[int, int]]
) -> list[str]:
    """With every lease over, a queue is handed out by priority, then put order."""
    if mode == "spool":
        # Spool ids are made by put in one process at a time, so id order is
        # put order.
        keys = [(m.priority, m.id) for m in drained]
    else:
        # Store ids are the sender's; what counts is the order of the adds.
        keys = [(m.priority, *put_order[m.id]) for m in drained if m.id in put_order]
    return [
        f"{queue}: delivered out of order: {a} before {b}"
        for a, b in itertools.pairwise(keys)
        if a > b
    ]


def _crash_test(mode: str, tmp_path: Path) -> Figures:
    seed = _seed()
    root = tmp_path / mode
    side_log = tmp_path / f"{mode}.log"
    figures = Figures()
    start = time.monotonic()
    _kill_loop(mode, root, side_log, seed, figures)
    _drain_and_check(mode, root, side_log, figures)
    print(
        f"\ncrash test {mode} (seed {seed}): {figures} in {time.monotonic() - start:.1f} s",
        flush=True,
    )
    # A run in which the child never got to work proves nothing: make sure
    # most kills hit a working child, and that all kinds of work were done.
    assert figures.runs_with_work >= KILLS // 2, figures
    assert figures.puts_returned and figures.taken and figures.acked, figures
    return figures


def test_kill_9_spool_put_take_ack(tmp_path: Path) -> None:
    """A spool with producer and consumer killed at random loses nothing."""
    figures = _crash_test("spool", tmp_path)
    assert figures.released and figures.drained, figures


def test_kill_9_dedup_store_add_resend_take_ack(tmp_path: Path) -> None:
    """A dedup store killed at random stores each id exactly once."""
    figures = _crash_test("store", tmp_path)
    assert figures.resent, figures


def test_side_log_reader_ignores_torn_lines(tmp_path: Path) -> None:
    """The accounting above trusts only whole side-log lines."""
    path = tmp_path / "log"
    path.write_bytes(b"S 1 .\nA abc def .\nA abc d")
    assert crash_child.read_lines(str(path)) == [["S", "1"], ["A", "abc", "def"]]
    log = crash_child.SideLog(str(path))
    log.write("A", "x")
    assert crash_child.read_lines(str(path))[-1] == ["A", "x"]
    assert hashlib.sha256(b"").hexdigest() == crash_child.sha(b"")
