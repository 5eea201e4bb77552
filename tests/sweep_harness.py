"""The failure sweep: every disk operation of a scenario, failed in turn.

A scenario is a list of steps on one or more ``FilesystemStorage`` objects
sharing one root and one ``FaultyDisk`` (several objects: several
consumers).  ``sweep`` runs it once to count its disk operations, then once
per operation i and per fault (ENOSPC, EIO, crash; EIO also at every read),
and after each checks the promises:

- the caller got a ``DroprError`` with a message (``StorageFull`` for
  ENOSPC, ``StorageIOError`` for EIO), or the fault was absorbed;
- every acknowledged add is present exactly once or acked; an acked
  message never comes back; nothing else is present; an add that failed
  is present whole or not at all, per batch (queue and priority);
- no lease leaked: after the caller released what it holds, everything
  open is takeable at once by the same objects (ENOSPC/EIO) or, after a
  crash, by a reopened store once the dead process's leases ran out;
- the channel order holds (priority, then the order of the adds);
- reopening recovers, and with a dedup index a resend stores nothing twice.

Used by tests/test_disk_sweep.py (a CI-sized subset) and bench/sweep.py
(every scenario, more seeds).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from faultydisk import Crash, FaultyDisk

import dropr.storage.files._storage as storage_module
from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import DroprError, StorageFull, StorageIOError
from dropr.storage.files._storage import FilesystemStorage

LEASE = 30.0


class Clock:
    """The storages' wall clock, moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class SyntheticIds:
    """Batch ids an hour old, one bucket (4 s) apart, so buckets are many and settled."""

    def __init__(self) -> None:
        self.ms = int((time.time() - 3600) * 1000)

    def __call__(self, now: float | None = None) -> str:
        self.ms += 5000
        return f"{self.ms:012x}0000{os.urandom(8).hex()}"


@dataclass
class Model:
    """What the caller was told, and what it may therefore expect."""

    #: id → (queue, priority, add sequence, position)
    added: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    #: ids of a failed add, grouped by batch (queue, priority): whole or absent
    uncertain_adds: list[list[str]] = field(default_factory=list)
    #: ids of a failed ack or fail: acked or not
    uncertain_acks: set[str] = field(default_factory=set)
    #: messages a failed add tried to store (for the resend)
    failed_add: list[tuple[str, list[Message]]] = field(default_factory=list)
    #: taken and not settled, per storage index
    held: dict[int, list[Message]] = field(default_factory=dict)
    seq: int = 0

    def expect_add(self, queue: str, messages: list[Message]) -> None:
        self.seq += 1
        for i, m in enumerate(messages):
            self.added[m.id] = (queue, m.priority, self.seq, i)

    def order_key(self, message_id: str) -> tuple[int, int, int]:
        _q, p, s, i = self.added[message_id]
        return (p, s, i)


class World:
    """The storages of one run, the disk under them and the model."""

    def __init__(self, root: str, disk: FaultyDisk, clock: Clock, *, dedup: bool, consumers: int):
        self.root = root
        self.disk = disk
        self.clock = clock
        self.dedup = dedup
        self.model = Model()
        self.storages = [self.open(disk) for _ in range(consumers)]

    def open(self, disk: Any = None) -> FilesystemStorage:
        kwargs: dict[str, Any] = {"clock": self.clock, "lease": LEASE, "usage_refresh": 3600.0}
        if disk is not None:
            kwargs["disk"] = disk
        if self.dedup:
            # The dedup index needs the root to itself: one object.
            return FilesystemStorage(self.root, dedup=True, **kwargs)
        return FilesystemStorage(self.root, **kwargs)

    # -- steps (each updates the model only when the call returned) ----------------------

    def add(self, queue: str, messages: list[Message], by: int = 0) -> None:
        self._pending_add([(queue, messages)])
        stored = self.storages[by].add(queue, messages)
        self._added([(queue, messages)], stored)

    def store(self, batches: list[tuple[str, list[Message]]]) -> None:
        self._pending_add(batches)
        stored = self.storages[0].store(batches)
        self._added(batches, stored)

    def _pending_add(self, batches: list[tuple[str, list[Message]]]) -> None:
        self.model.failed_add = batches
        self.model.uncertain_adds = []
        for _queue, messages in batches:
            fresh = [m for m in messages if m.id not in self.model.added]
            groups: dict[int, list[str]] = {}
            for m in fresh:
                groups.setdefault(m.priority, []).append(m.id)
            self.model.uncertain_adds.extend(groups.values())

    def _added(self, batches: list[tuple[str, list[Message]]], stored: list[str]) -> None:
        self.model.uncertain_adds = []
        self.model.failed_add = []
        for queue, messages in batches:
            fresh = [m for m in messages if m.id in set(stored)]
            if fresh:
                self.model.expect_add(queue, fresh)

    def take(self, queue: str, limit: int, by: int = 0) -> list[Message]:
        got = self.storages[by].take(queue, limit)
        self.model.held.setdefault(by, []).extend(got)
        return got

    def ack(self, messages: list[Message], by: int = 0) -> None:
        self.model.uncertain_acks = {m.id for m in messages}
        self.storages[by].ack(messages)
        self._settled(messages, by, acked=True)

    def fail(self, messages: list[Message], by: int = 0) -> None:
        self.model.uncertain_acks = {m.id for m in messages}
        self.storages[by].fail(messages, "rejected by the test")
        self._settled(messages, by, acked=True)

    def release(self, messages: list[Message], by: int = 0) -> None:
        self.storages[by].release(messages)
        self._settled(messages, by, acked=False)

    def _settled(self, messages: list[Message], by: int, acked: bool) -> None:
        self.model.uncertain_acks = set()
        ids = {m.id for m in messages}
        if acked:
            self.model.acked |= ids
        for held in self.model.held.values():
            held[:] = [m for m in held if m.id not in ids]

    def prepare(self) -> None:
        """What dropr-server does after each answer (spare files); it never fails a request."""
        with contextlib.suppress(DroprError):
            self.storages[0].prepare()

    def maintain(self) -> None:
        self.storages[0].maintain()

    def remove_finished(self, queue: str) -> None:
        self.storages[0].remove_finished(queue)

    def reopen(self) -> None:
        for s in self.storages:
            s.close()
        self.model.held.clear()
        # What the closed objects held stays leased until the leases run out
        # (a restarted consumer does not release them): let them run out.
        self.clock.now += 2 * LEASE
        count, self.storages = len(self.storages), []
        for _ in range(count):
            self.storages.append(self.open(self.disk))

    def queues(self) -> list[str]:
        return sorted({q for q, _p, _s, _i in self.model.added.values()} | {"a", "b"})


def make(n: int, priority: int = 5, channel: str = "a") -> list[Message]:
    return [Message(new_id(), f"m{i}".encode(), channel, priority) for i in range(n)]


Scenario = Callable[[World], None]


@dataclass
class ScenarioSpec:
    name: str
    setup: Scenario
    run: Scenario
    dedup: bool = False
    consumers: int = 1


# -- the scenarios ------------------------------------------------------------------------


def _nothing(w: World) -> None:
    pass


def _add_run(w: World) -> None:
    w.add("a", make(3))
    w.add("a", make(2, priority=0) + make(1, priority=9))
    w.add("b", make(2, channel="b"))


def _store_run(w: World) -> None:
    first = make(2)
    w.store([("a", first), ("b", make(2, channel="b"))])
    w.store([("a", first + make(1, priority=0))])
    w.add("b", make(2, channel="b"))


def _filled(w: World) -> None:
    for _ in range(4):
        w.add("a", make(2))
    w.add("a", make(1, priority=0))


def _take_ack_run(w: World) -> None:
    got = w.take("a", 5)
    w.ack(got[:2])
    w.release(got[2:3])
    w.fail(got[3:4], by=0)
    rest = w.take("a", 10)
    w.ack(rest + got[4:5])
    w.take("a", 10)  # removes the finished buckets on its way


def _two_consumers_run(w: World) -> None:
    a = w.take("a", 3, by=0)
    b = w.take("a", 3, by=1)
    w.ack(b, by=1)
    w.release(a[1:], by=0)
    rest = w.take("a", 10, by=1)
    w.ack(rest, by=1)
    w.take("a", 10, by=1)  # removes finished buckets
    w.ack(a[:1], by=0)  # a late ack: its bucket may be gone


def _removal_run(w: World) -> None:
    got = w.take("a", 100)
    w.ack(got)
    w.take("a", 10)
    w.remove_finished("a")
    w.storages[0].remove_idle_queues(idle=0)  # the drained channel's directory goes
    w.add("a", make(2))  # and comes back
    w.ack(w.take("a", 1))


def _dedup_setup(w: World) -> None:
    _filled(w)
    w.maintain()


def _dedup_run(w: World) -> None:
    resend = make(2)
    w.add("a", resend)
    w.maintain()
    w.add("a", resend + make(1))
    got = w.take("a", 100)
    w.ack(got)
    w.maintain()
    w.take("a", 10)


def _recovery_run(w: World) -> None:
    sent = make(3)
    w.add("a", sent)
    w.add("b", make(1, channel="b"))
    w.reopen()
    w.add("a", sent + make(1))
    got = w.take("a", 2)
    w.ack(got)


def _spares_run(w: World) -> None:
    """dropr-server's small stores: each fills a spare file made after the one before."""
    sent = make(2)
    w.store([("a", sent)])
    w.prepare()
    w.store([("a", sent + make(1)), ("b", make(1, channel="b"))])
    w.prepare()
    w.maintain()
    w.store([("a", make(1, priority=0))])
    w.reopen()
    w.store([("a", make(1))])


SCENARIOS = [
    ScenarioSpec("add", _nothing, _add_run),
    ScenarioSpec("store-all-or-nothing", _nothing, _store_run, dedup=True),
    ScenarioSpec("take-ack-release-fail", _filled, _take_ack_run),
    ScenarioSpec("two-consumers", _filled, _two_consumers_run, consumers=2),
    ScenarioSpec("bucket-removal", _filled, _removal_run),
    ScenarioSpec("dedup-upkeep", _dedup_setup, _dedup_run, dedup=True),
    ScenarioSpec("recovery", _nothing, _recovery_run, dedup=True),
    ScenarioSpec("server-spares", _nothing, _spares_run, dedup=True),
]


def random_scenario(seed: int, steps: int = 12) -> ScenarioSpec:
    """A scenario of ``steps`` random calls (the long mode's extra scenarios)."""
    shape = random.Random(seed)
    dedup = shape.random() < 0.4
    consumers = 1 if dedup else shape.choice((1, 2))

    def run(w: World) -> None:
        rnd = random.Random(seed)
        for _ in range(steps):
            by = rnd.randrange(consumers)
            held = w.model.held.get(by, [])
            action = rnd.choice(("add", "add", "take", "take", "settle", "upkeep"))
            if action == "add":
                channel = rnd.choice("ab")
                group = [
                    *make(rnd.randint(1, 3), rnd.choice((0, 5, 9)), channel),
                    *make(rnd.randint(0, 2), rnd.choice((0, 5, 9)), channel),
                ]
                w.add(channel, group, by=0 if dedup else by)
            elif action == "take":
                w.take(rnd.choice("ab"), rnd.randint(1, 5), by=by)
            elif action == "settle" and held:
                chosen = rnd.sample(held, rnd.randint(1, len(held)))
                getattr(w, rnd.choice(("ack", "ack", "release", "fail")))(chosen, by=by)
            elif action == "upkeep":
                if dedup and rnd.random() < 0.5:
                    w.maintain()
                elif rnd.random() < 0.3:
                    w.reopen()
                else:
                    w.remove_finished(rnd.choice("ab"))

    return ScenarioSpec(f"random-{seed}", _filled, run, dedup=dedup, consumers=consumers)


# -- running and checking -----------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    mode: str
    at: int
    fired: bool
    error: str
    problems: list[str]


@contextmanager
def _synthetic_ids() -> Iterator[None]:
    with mock.patch.object(storage_module, "new_id", SyntheticIds()):
        yield


def run_once(spec: ScenarioSpec, mode: str, at: int | None, base: str) -> tuple[Outcome, int, int]:
    """Run ``spec`` with the fault ``mode`` at operation ``at`` (None: count only)."""
    work = tempfile.mkdtemp(dir=base)
    try:
        root = os.path.join(work, "store")
        disk = FaultyDisk(stash=os.path.join(work, "stash"))
        clock = Clock()
        with _synthetic_ids():
            w = World(root, disk, clock, dedup=spec.dedup, consumers=spec.consumers)
            spec.setup(w)
            start_effects, start_reads = disk.effects, disk.reads
            if at is not None:
                offset = start_reads if mode == "read-eio" else start_effects
                disk.fail_at = offset + at
                disk.mode = mode
            error: BaseException | None = None
            try:
                spec.run(w)
            except (Exception, Crash) as e:
                error = e
            problems = _check(w, mode, error)
        outcome = Outcome(
            spec.name,
            mode,
            at or 0,
            bool(disk.failed),
            f"{type(error).__name__}: {error}" if error is not None else "",
            problems,
        )
        return outcome, disk.effects - start_effects, disk.reads - start_reads
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(w: World, mode: str, error: BaseException | None) -> list[str]:
    problems: list[str] = []
    if error is not None and not isinstance(error, Crash):
        if not isinstance(error, DroprError) or not str(error):
            problems.append(f"the caller got {type(error).__name__}: {error!r}, not a dropr error")
        elif mode == "enospc" and not isinstance(error, StorageFull):
            problems.append(f"ENOSPC gave {type(error).__name__}, not StorageFull")
        elif mode in ("eio", "read-eio") and not isinstance(error, StorageIOError):
            problems.append(f"EIO gave {type(error).__name__}, not StorageIOError")
    crashed = w.disk.crashed
    if not crashed:
        # The same objects, the disk healthy again: release what the caller
        # holds; everything open must be takeable at once, in order.
        w.disk.fail_at = None
        for by, held in w.model.held.items():
            if held:
                try:
                    w.storages[by].release(held)
                except DroprError as e:
                    problems.append(f"release after the fault failed: {e}")
        if not w.storages:
            w.storages.append(w.open(w.disk))  # the failure was in an open
        problems += _check_contents(w, w.storages[0], "same objects")
        for s in w.storages:
            s.close()
    # Reopen on the real disk, after the leases of the dead ran out.
    w.clock.now += 2 * LEASE
    reopened = w.open()
    try:
        problems += _check_contents(w, reopened, "reopened")
        if w.dedup:
            problems += _check_resend(w, reopened)
    finally:
        reopened.close()
    return problems


def _check_contents(w: World, s: FilesystemStorage, where: str) -> list[str]:
    problems: list[str] = []
    m = w.model
    for queue in w.queues():
        got: list[Message] = []
        while True:
            batch = s.take(queue, 1000)
            if not batch:
                break
            got.extend(batch)
        ids = [x.id for x in got]
        if len(set(ids)) != len(ids):
            problems.append(f"{where}: {queue}: an id handed out twice")
        present = set(ids)
        expected = {i for i, (q, *_r) in m.added.items() if q == queue} - m.acked
        missing = expected - m.uncertain_acks - present
        if missing:
            problems.append(f"{where}: {queue}: {len(missing)} acknowledged messages missing")
        back = (m.acked - m.uncertain_acks) & present
        if back:
            problems.append(f"{where}: {queue}: {len(back)} acked messages came back")
        uncertain = {i for group in m.uncertain_adds for i in group}
        for group in m.uncertain_adds:
            inside = [i for i in group if i in present]
            if inside and len(inside) != len(group):
                problems.append(f"{where}: {queue}: a failed add is half visible")
        unknown = present - set(m.added) - uncertain
        if unknown:
            problems.append(f"{where}: {queue}: {len(unknown)} messages no add stored")
        known = [i for i in ids if i in m.added]
        if known != sorted(known, key=m.order_key):
            problems.append(f"{where}: {queue}: out of order")
        s.release(got)
    return problems


def _check_resend(w: World, s: FilesystemStorage) -> list[str]:
    """A resend of everything (the client was not answered) stores each id once."""
    problems: list[str] = []
    for queue, messages in w.model.failed_add:
        try:
            s.add(queue, messages)
        except DroprError as e:
            problems.append(f"resend refused: {e}")
    for queue in w.queues():
        ids: list[str] = []
        while True:
            batch = s.take(queue, 1000)
            if not batch:
                break
            ids.extend(x.id for x in batch)
        if len(set(ids)) != len(ids):
            problems.append(f"after a resend: {queue}: an id stored twice")
    return problems


def sweep(
    specs: list[ScenarioSpec],
    modes: tuple[str, ...] = ("enospc", "eio", "crash", "read-eio"),
    base: str | None = None,
    stride: int = 1,
) -> dict[str, Any]:
    """Sweep every operation of every scenario; figures and the failures found."""
    base = base or tempfile.mkdtemp(prefix="dropr-sweep-")
    figures: dict[str, Any] = {"scenarios": {}, "runs": 0, "failures": []}
    for spec in specs:
        counted, effects, reads = run_once(spec, "count", None, base)
        if counted.problems:
            figures["failures"].append(counted.__dict__)
        points = {"effects": effects, "reads": reads}
        figures["scenarios"][spec.name] = points
        for mode in modes:
            total = reads if mode == "read-eio" else effects
            for at in range(1, total + 1, stride):
                outcome, _e, _r = run_once(spec, mode, at, base)
                figures["runs"] += 1
                if outcome.problems:
                    figures["failures"].append(outcome.__dict__)
    return figures
