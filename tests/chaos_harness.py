"""The fault-injection harness: real daemons, producers, a consumer, and faults.

Shared by the CI-sized run (tests/test_chaos.py) and the soak
(bench/soak.py).  What runs, all as separate processes except the proxy:

* ``twistd -n dropr-server`` on a fixed port, its store on a small tmpfs;
* a :class:`~dropr.faultproxy.FaultProxy` (threads in this process) in
  front of it;
* ``twistd -n dropr-client`` forwarding a spool (on another small tmpfs) to
  the proxy;
* producers (tests/chaos_worker.py) putting with ``put`` and ``put_many``;
* a consumer taking, acking and now and then failing messages.

Faults, at random instants from a seeded generator:

* ``kill -9`` of the server, of the client daemon and of producers (the
  daemons come back after a random pause, as systemd would bring them);
* the proxy answers 500 or 503 itself, drops a request half-way, drops the
  answer after the server stored the batch, or delays it;
* planted damage: truncated, bit-flipped and garbage batch files, stale
  temporary files, torn state-log lines and orphaned state logs, in the
  spool and in the store;
* disk full on the spool and on the store: the tmpfs is filled with a
  ballast file, held full, then emptied (without root, or where mounting is
  refused, the storages' own limits stand in: a spool limit the producers
  read from a file, and a server restarted with ``--store-max-bytes``);
* a kill and restart of the server while its store holds many thousand
  waiting messages (the consumer is paused), timed.

At the end every fault stops, the spool and store are drained, the daemons
are stopped, ``dropr fsck`` checks both, and :func:`dropr.verify.verify`
holds every logged id to the promises.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from faultproxy import FaultProxy
from verify import Report, scan, verify

from dropr.storage.files import _fsck as fsck
from dropr.testing import ClientProcess, DaemonProcess, ServerProcess, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import chaos_plant  # noqa: E402
import chaos_worker  # noqa: E402

WORKER = os.path.join(HERE, "chaos_worker.py")


@dataclass
class Config:
    """How big a run is; the defaults are the CI-sized run."""

    #: logged puts to reach (the soak runs by time instead when ``minutes``)
    messages: int = 10_000
    minutes: float | None = None
    server_kills: int = 20
    client_kills: int = 20
    producer_kills: int = 20
    producers: int = 3
    #: messages a second, all producers together
    rate: float = 120.0
    #: seconds between planted damages, on average
    plant_every: float = 6.0
    #: waiting messages in the store when the server is killed and restarted
    big_store: int = 5_000
    disk_full: bool = True
    #: seconds each disk stays full
    full_for: float = 4.0
    #: None: mount a tmpfs when possible, else fall back; False: never mount
    tmpfs: bool | None = None
    tmpfs_mb: int = 96
    seed: int = 0
    #: the chance that a request through the proxy meets a fault
    proxy_fault_rate: float = 0.3


@dataclass
class Outcome:
    """What a run did and found."""

    report: Report
    disk_full_mode: str
    faults: dict[str, int]
    #: behaviour that broke a promise or the brief, in words; empty when fine
    findings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    fsck: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "verify": self.report.to_dict(),
            "disk_full_mode": self.disk_full_mode,
            "faults": self.faults,
            "findings": self.findings,
            "timings": self.timings,
            "fsck": self.fsck,
            "seconds": round(self.seconds, 1),
        }

    def summary(self) -> str:
        lines = [self.report.summary(), f"disk full by: {self.disk_full_mode}"]
        lines += [
            f"{k}: {v:.0f} messages" if k.endswith("_waiting") else f"{k}: {v:.2f} s"
            for k, v in sorted(self.timings.items())
        ]
        lines += [f"FINDING: {f}" for f in self.findings]
        lines.append(f"run took {self.seconds:.0f} s")
        return "\n".join(lines)


class Area:
    """A directory for a spool or store, on its own small tmpfs when possible."""

    def __init__(self, path: str, size_mb: int, try_mount: bool) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.mounted = False
        self.ballast = os.path.join(path, "ballast")
        self.data = os.path.join(path, "data")
        if try_mount and os.geteuid() == 0:
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", path],
                capture_output=True,
            )
            self.mounted = r.returncode == 0
        os.makedirs(self.data, exist_ok=True)

    def fill(self) -> int:
        """Fill the file system to the last byte; return the ballast's size."""
        chunk = b"\0" * (1 << 20)
        written = 0
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 16 or 1]
        finally:
            os.close(fd)
        return written

    def empty(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ballast)

    def close(self) -> None:
        self.empty()
        if self.mounted:
            r = subprocess.run(["umount", self.path], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.path], capture_output=True)
            self.mounted = False


class Restartable:
    """A daemon that the harness kills and brings back, one log file per life."""

    def __init__(self, name: str, logdir: str, make: Callable[[str], DaemonProcess]) -> None:
        self.name = name
        self.logdir = logdir
        self.make = make
        self.lives = 0
        self.proc: DaemonProcess | None = None
        self.killed = 0
        self.unexpected: list[str] = []
        self.restart_at: float | None = None
        self.logs: list[str] = []

    def start(self) -> None:
        self.lives += 1
        logfile = os.path.join(self.logdir, f"{self.name}-{self.lives:03d}.log")
        self.logs.append(logfile)
        self.proc = self.make(logfile)
        self.proc.start()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.killed += 1

    def check(self) -> None:
        """Notice an exit the harness did not cause, and start again."""
        if self.proc is None or self.restart_at is not None or self.proc.alive():
            return
        err = ""
        if self.proc.proc is not None and self.proc.proc.stderr is not None:
            with contextlib.suppress(ValueError, OSError):
                err = self.proc.proc.stderr.read().decode("utf-8", "replace")
        tail = self.proc.log_text()[-1500:]
        status = self.proc.proc.returncode if self.proc.proc is not None else None
        self.unexpected.append(f"{self.name} exited by itself ({status}): {err.strip()}\n{tail}")
        self.proc.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.proc.stop()

    def log_text(self) -> str:
        out = []
        for path in self.logs:
            with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
                out.append(f.read())
        return "".join(out)


class Chaos:
    """One run; ``run()`` returns its :class:`Outcome`."""

    def __init__(self, workdir: str, config: Config, say: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.cfg = config
        self.say = say
        self.rng = random.Random(config.seed)
        self.faults: Counter[str] = Counter()
        self.findings: list[str] = []
        self.timings: dict[str, float] = {}
        self.logdir = os.path.join(workdir, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        try_mount = config.tmpfs is not False
        self.spool_area = Area(os.path.join(workdir, "spool-fs"), config.tmpfs_mb, try_mount)
        self.store_area = Area(os.path.join(workdir, "store-fs"), config.tmpfs_mb * 2, try_mount)
        self.mounted = self.spool_area.mounted and self.store_area.mounted
        if config.tmpfs and not self.mounted:
            raise RuntimeError("a tmpfs was asked for and could not be mounted")
        self.spool = self.spool_area.data
        self.store = self.store_area.data
        self.port = free_port()
        self.server_extra: list[str] = []
        self.server = Restartable("server", self.logdir, self._make_server)
        self.proxy_faults_on = True
        self.proxy = FaultProxy(self.port, self._plan)
        self.client = Restartable("client", self.logdir, self._make_client)
        self.limit_file = os.path.join(workdir, "spool-limit")
        self.producer_logs = [
            os.path.join(self.logdir, f"producer-{i}.log") for i in range(config.producers)
        ]
        self.producers: list[subprocess.Popen[bytes] | None] = [None] * config.producers
        self.producer_lives = [0] * config.producers
        self.producer_errors: list[str] = []
        self.consumer_log = os.path.join(self.logdir, "consumer.log")
        self.consumer: subprocess.Popen[bytes] | None = None
        #: file systems kept full: topped up while consumers free room
        self.keep_full: list[Area] = []
        self._topped_at = 0.0
        self._put_counted = [0] * config.producers
        self._put_offsets = [0] * config.producers
        self.started = time.monotonic()

    # -- processes --------------------------------------------------------------

    def _make_server(self, logfile: str) -> DaemonProcess:
        return ServerProcess(self.store, logfile, self.port, extra=self.server_extra)

    def _make_client(self, logfile: str) -> DaemonProcess:
        extra = ["--backoff-cap", "1", "--rescan", "1", "--max-batch", "300", "--timeout", "15"]
        return ClientProcess(self.spool, logfile, extra=extra)

    def _plan(self, n: int) -> str:
        if not self.proxy_faults_on or self.rng.random() >= self.cfg.proxy_fault_rate:
            return "pass"
        action = self.rng.choice(
            [
                "500",
                "503",
                "drop-request",
                "drop-request",
                "drop-response",
                "drop-response",
                "delay",
            ]
        )
        if action == "delay":
            self.faults["proxy-delay"] += 1
            return f"delay:{self.rng.uniform(0.05, 1.5):.2f}"
        self.faults[f"proxy-{action}"] += 1
        return action

    def _start_producer(self, i: int) -> None:
        self.producer_lives[i] += 1
        rate = self.cfg.rate / self.cfg.producers
        err = open(os.path.join(self.logdir, f"producer-{i}.stderr"), "ab")  # noqa: SIM115
        self.producers[i] = subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "produce",
                "--spool",
                self.spool,
                "--dest",
                self.proxy.url,
                "--log",
                self.producer_logs[i],
                "--name",
                f"p{i}",
                "--seed",
                str(self.rng.randrange(2**32)),
                "--rate",
                str(rate),
                "--limit-file",
                self.limit_file,
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()

    def _check_producers(self, restart: bool = True) -> None:
        for i, p in enumerate(self.producers):
            if p is None or p.poll() is None:
                continue
            if p.returncode == 3:
                with open(os.path.join(self.logdir, f"producer-{i}.stderr"), errors="replace") as f:
                    self.producer_errors.append(f.read()[-1500:])
            elif p.returncode not in (-signal.SIGKILL, -signal.SIGTERM):
                self.producer_errors.append(f"producer {i} exited with {p.returncode}")
            self.producers[i] = None
            if restart:
                self._start_producer(i)

    def _start_consumer(self) -> None:
        err = open(os.path.join(self.logdir, "consumer.stderr"), "ab")  # noqa: SIM115
        self.consumer = subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "consume",
                "--store",
                self.store,
                "--log",
                self.consumer_log,
                "--seed",
                str(self.rng.randrange(2**32)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()

    def puts_logged(self) -> int:
        """Messages whose put returned, per the producers' logs (read incrementally)."""
        for i, path in enumerate(self.producer_logs):
            try:
                with open(path, "rb") as f:
                    f.seek(self._put_offsets[i])
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            self._put_counted[i] += data[:end].count(b"\nP ") + data[:end].startswith(b"P ")
            self._put_offsets[i] += end
        return sum(self._put_counted)

    def full_refusals(self) -> int:
        n = 0
        for path in self.producer_logs:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                n += f.read().count(b"\nF ")
        return n

    def tick(self) -> None:
        """Bring back what died; called often from every phase."""
        if self.keep_full and time.monotonic() - self._topped_at > 0.25:
            self._topped_at = time.monotonic()
            for area in self.keep_full:
                area.fill()
        for d in (self.server, self.client):
            if d.restart_at is not None and time.monotonic() >= d.restart_at:
                d.start()
            d.check()
        self._check_producers()
        if self.consumer is not None and self.consumer.poll() is not None:
            self.findings.append(f"the consumer exited with {self.consumer.returncode}")
            self._start_consumer()

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.05)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.tick()
            if cond():
                return True
            time.sleep(0.1)
        self.findings.append(f"timed out after {timeout:.0f} s waiting for {what}")
        return False

    # -- the run ----------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            self.proxy.start()
            self.server.start()
            self.client.start()
            self._start_consumer()
            for i in range(self.cfg.producers):
                self._start_producer(i)
            if self.cfg.minutes is None:
                self._ci_phases()
            else:
                self._soak_phases(self.cfg.minutes * 60)
            self._drain()
        finally:
            self._stop_all()
        return self._finish()

    def _ci_phases(self) -> None:
        c = self.cfg
        half = c.messages // 2
        self.chaos(
            half, (c.server_kills + 1) // 2, (c.client_kills + 1) // 2, (c.producer_kills + 1) // 2
        )
        self.big_store_restart()
        if c.disk_full:
            self.spool_full()
            self.store_full()
        self.chaos(c.messages, c.server_kills // 2, c.client_kills // 2, c.producer_kills // 2)

    def _soak_phases(self, seconds: float) -> None:
        """Cycles of chaos, each followed by a full spool, a full store or a big restart."""
        c = self.cfg
        end = time.monotonic() + seconds
        # A minute of chaos per cycle in a long soak, shorter in a short one.
        span = min(60.0, max(15.0, seconds / 6))
        cycle = 0
        while time.monotonic() < end:
            cycle += 1
            length = min(span, max(5.0, end - time.monotonic()))
            kills = max(1, int(length / 4))
            target = self.puts_logged() + int(length * c.rate * 0.8)
            self.chaos(target, kills, kills, kills, deadline=time.monotonic() + length)
            if time.monotonic() >= end:
                break
            step = cycle % 3
            if step == 1 and c.disk_full:
                self.spool_full()
            elif step == 2 and c.disk_full:
                self.store_full()
            elif step == 0:
                self.big_store_restart()

    def chaos(
        self,
        target: int,
        server_kills: int,
        client_kills: int,
        producer_kills: int,
        deadline: float | None = None,
    ) -> None:
        """Kill, plant and let the proxy misbehave until the quotas are met."""
        self.say(f"chaos: to {target} puts, kills {server_kills}/{client_kills}/{producer_kills}")
        self.proxy_faults_on = True
        start = time.monotonic()
        left = max(1, target - self.puts_logged())
        span = left / self.cfg.rate
        quota = {"server": server_kills, "client": client_kills, "producer": producer_kills}
        done: Counter[str] = Counter()
        next_at = {k: start + self._gap(span, q) for k, q in quota.items()}
        next_plant = start + self.rng.expovariate(1 / self.cfg.plant_every)
        while True:
            now = time.monotonic()
            finished = all(done[k] >= q for k, q in quota.items())
            if deadline is not None and now >= deadline:
                break
            if finished and self.puts_logged() >= target:
                break
            for kind, q in quota.items():
                if done[kind] >= q or now < next_at[kind]:
                    continue
                if self._kill(kind):
                    done[kind] += 1
                    next_at[kind] = now + self._gap(span, q)
                else:
                    next_at[kind] = now + 0.3  # it is down already: soon again
            if now >= next_plant:
                self.plant()
                next_plant = now + self.rng.expovariate(1 / self.cfg.plant_every)
            self.tick()
            time.sleep(0.02)
        self.timings.setdefault("chaos_seconds", 0.0)
        self.timings["chaos_seconds"] += time.monotonic() - start

    def _gap(self, span: float, quota: int) -> float:
        mean = span / max(1, quota)
        return self.rng.uniform(0.4, 1.6) * max(1.5, mean)

    def _kill(self, kind: str) -> bool:
        """kill -9 one process of ``kind``; False if there was none to kill."""
        if kind == "producer":
            i = self.rng.randrange(self.cfg.producers)
            p = self.producers[i]
            if p is None or p.poll() is not None:
                return False
            if self.rng.random() < 0.5:
                # In the middle of a put_many: the producer arms a SIGKILL
                # for a random instant of its next (big) call.
                open(self.producer_logs[i] + ".killme", "w").close()
                self.faults["kill-9-producer-in-put-many"] += 1
            else:
                p.kill()
                p.wait()
                self.faults["kill-9-producer"] += 1
            return True
        d = self.server if kind == "server" else self.client
        if d.restart_at is not None or not d.alive():
            return False
        ready = "storing in" if kind == "server" else "forwarding spool"
        assert d.proc is not None
        if ready not in d.proc.log_text():
            self.faults[f"kill-9-{kind}-while-starting"] += 1
        d.kill()
        self.faults[f"kill-9-{kind}"] += 1
        d.restart_at = time.monotonic() + self.rng.uniform(0.0, 1.0)
        return True

    def plant(self) -> None:
        """Plant one piece of damage in the spool or the store."""
        where = self.rng.choice(("spool", "store"))
        root = self.spool if where == "spool" else self.store
        kind = self.rng.choice(
            (
                "truncated",
                "bitflip",
                "garbage",
                "truncated",
                "stale-tmp",
                "torn-state-line",
                "orphan-state",
            )
        )
        if where == "spool":
            queue, dest = self.proxy.url, self.proxy.url
        else:
            queue, dest = self.rng.choice(chaos_worker.CHANNELS), None
        try:
            if kind in chaos_plant.DAMAGE_KINDS:
                chaos_plant.plant_damaged_batch(root, queue, kind, self.rng, destination=dest)
            elif kind == "stale-tmp":
                chaos_plant.plant_stale_tmp(root)
            elif kind == "orphan-state":
                chaos_plant.plant_orphan_state(root, queue)
            elif chaos_plant.plant_torn_state_line(root, queue, self.rng) is None:
                return
        except OSError as e:
            self.say(f"could not plant {kind} in the {where}: {e}")
            return
        self.faults[f"plant-{kind}-{where}"] += 1

    def big_store_restart(self) -> None:
        """Let the store fill up with the consumer paused, then kill -9 and restart."""
        self.say(f"big store: pausing the consumer until {self.cfg.big_store} wait")
        self.proxy_faults_on = False
        pause = self.consumer_log + ".pause"
        open(pause, "w").close()
        try:
            waiting = 0

            def enough() -> bool:
                nonlocal waiting
                waiting = len(scan(self.store).waiting)
                return waiting >= self.cfg.big_store

            self.wait_for(f"{self.cfg.big_store} messages waiting in the store", enough, 180)
            self.wait_for("the server to be up", self.server.alive, 30)
            self.server.kill()
            self.faults["kill-9-server-big-store"] += 1
            t0 = time.monotonic()
            self.server.start()
            proc = self.server.proc
            assert isinstance(proc, ServerProcess)
            self.wait_for("the server to restart on a big store", proc.healthy, 120)
            self.timings["big_store_restart"] = time.monotonic() - t0
            self.timings["big_store_waiting"] = float(waiting)
            self.say(f"big store: {waiting} waiting, restart took {time.monotonic() - t0:.2f} s")
        finally:
            os.unlink(pause)
            self.proxy_faults_on = True

    def spool_full(self) -> None:
        """Fill the spool's disk; producers must get StorageFull and carry on later."""
        self.say("spool full")
        before = self.full_refusals()
        t0 = time.monotonic()
        if self.spool_area.mounted:
            self.spool_area.fill()
            self.keep_full.append(self.spool_area)
        else:
            with open(self.limit_file, "w") as f:
                f.write("1")
        self.faults["disk-full-spool"] += 1
        try:
            if not self.wait_for(
                "producers to be refused with StorageFull",
                lambda: self.full_refusals() > before,
                max(10.0, self.cfg.full_for * 3),
            ):
                pass
            # A crash while the disk is full: the client must come back all the same.
            self.client.kill()
            self.faults["kill-9-client-disk-full"] += 1
            self.client.start()
            self.wait(self.cfg.full_for)
            if not self.client.alive():
                self.findings.append("dropr-client is not running while its spool is full")
        finally:
            self.keep_full.clear()
            self.spool_area.empty()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.limit_file)
        self.timings["spool_full_seconds"] = time.monotonic() - t0
        put = self.puts_logged()
        self.wait_for(
            "puts to resume after the spool had room again",
            lambda: self.puts_logged() > put + 50,
            30,
        )
        self._check_flow("after the spool had room again")

    def store_full(self) -> None:
        """Fill the store's disk; the server must answer 507 and the client back off."""
        self.say("store full")
        t0 = time.monotonic()
        if self.store_area.mounted:
            self.store_area.fill()
            self.keep_full.append(self.store_area)
        else:
            self.server_extra = ["--store-max-bytes", "1"]
            self.server.kill()
            self.server.start()
        self.faults["disk-full-store"] += 1
        try:
            self.wait_for(
                "the server to answer 507",
                lambda: "refused a request: 507" in self.server.log_text(),
                max(10.0, self.cfg.full_for * 3),
            )
            if self.store_area.mounted:
                self.server.kill()
                self.faults["kill-9-server-disk-full"] += 1
                self.server.start()
            self.wait(self.cfg.full_for)
            if not self.server.alive():
                self.findings.append("dropr-server is not running while its store is full")
        finally:
            self.keep_full.clear()
            if self.store_area.mounted:
                self.store_area.empty()
            else:
                self.server_extra = []
                self.server.kill()
                self.server.start()
        self.timings["store_full_seconds"] = time.monotonic() - t0
        if "cannot deliver" not in self.client.log_text():
            self.findings.append(
                "dropr-client did not log that it backs off while the store was full"
            )
        self._check_flow("after the store had room again")

    def _check_flow(self, when: str) -> None:
        """Messages must reach the store again, without help."""
        consumed = self._consumer_lines()
        self.wait_for(
            f"messages to reach the consumer {when}",
            lambda: self._consumer_lines() > consumed + 50,
            40,
        )

    def _consumer_lines(self) -> int:
        try:
            with open(self.consumer_log, "rb") as f:
                return f.read().count(b"\nC ")
        except FileNotFoundError:
            return 0

    def _drain(self) -> None:
        """Stop every fault and wait until everything was delivered and consumed."""
        self.say("drain")
        t0 = time.monotonic()
        self.proxy_faults_on = False
        for p in self.producers:
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait()
        self._check_producers(restart=False)
        self.producers = [None] * self.cfg.producers
        for d in (self.server, self.client):
            if d.restart_at is not None or not d.alive():
                d.start()
        self.wait_for("the spool to empty", lambda: not scan(self.spool).waiting, 180)
        self.wait_for("the store to be consumed", lambda: not scan(self.store).waiting, 180)
        # A resend still on its way would show up now as a duplicate.
        self.wait(1.5)
        self.timings["drain_seconds"] = time.monotonic() - t0

    def _stop_all(self) -> None:
        self.proxy_faults_on = False
        for p in self.producers:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if self.consumer is not None and self.consumer.poll() is None:
            self.consumer.send_signal(signal.SIGTERM)
            try:
                self.consumer.wait(30)
            except subprocess.TimeoutExpired:
                self.consumer.kill()
                self.consumer.wait()
        for d in (self.client, self.server):
            d.stop()
        self.proxy.stop()

    def _finish(self) -> Outcome:
        for d in (self.server, self.client):
            if d.unexpected:
                self.findings.extend(d.unexpected)
        self.findings.extend(f"producer failed: {e}" for e in self.producer_errors)
        for d in (self.server, self.client):
            errors = unhandled_errors(d.log_text())
            if errors:
                said = "; ".join(f"{n} x {e}" for e, n in errors.most_common())
                self.findings.append(f"{d.name} logged unhandled errors: {said}")
        checks = {}
        for name, root, kind in (("spool", self.spool, "spool"), ("store", self.store, "store")):
            result = fsck.check(root, kind=kind, repair=True)
            checks[name] = result.to_dict()
            if result.unrepaired:
                self.findings.append(f"fsck of the {name} found damage it could not repair")
        report = verify(
            self.producer_logs,
            [self.consumer_log],
            self.store,
            [self.spool],
            faults=dict(self.faults),
        )
        quarantine_logged = "quarantined" in (
            self.client.log_text() + self.server.log_text() + self._consumer_twisted_log()
        )
        if report.quarantined_files and not quarantine_logged:
            self.findings.append("files were quarantined but no log says so")
        mode = (
            "tmpfs (mount -t tmpfs) filled with a ballast file"
            if self.mounted
            else "storage limits (Spool max_bytes, --store-max-bytes)"
        )
        return Outcome(
            report,
            mode,
            dict(self.faults),
            self.findings,
            self.timings,
            checks,
            time.monotonic() - self.started,
        )

    def _consumer_twisted_log(self) -> str:
        try:
            with open(self.consumer_log + ".twisted", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Unmount what was mounted (call it in a ``finally``)."""
        self._stop_all()
        self.spool_area.close()
        self.store_area.close()


def unhandled_errors(log: str) -> Counter[str]:
    """The exceptions of the ``Unhandled Error`` tracebacks in a twistd log."""
    found: Counter[str] = Counter()
    for block in log.split("Unhandled Error")[1:]:
        lines = []
        for line in block.splitlines()[1:]:
            if line and not line[0].isspace():
                break  # the next log event
            if line.strip():
                lines.append(line.strip())
        found[lines[-1] if lines else "(no traceback)"] += 1
    return found


def run(workdir: str, config: Config, say: Callable[[str], None] = print) -> Outcome:
    """Run the harness in ``workdir``; unmounts whatever it mounted."""
    chaos = Chaos(workdir, config, say)
    try:
        return chaos.run()
    finally:
        chaos.close()


def dump(outcome: Outcome, path: str) -> None:
    with open(path, "w") as f:
        json.dump(outcome.to_dict(), f, indent=2, sort_keys=True)
