"""``dropr fsck``: check a spool or store, and repair what is safe to repair.

What is looked at (see docs/faults.rst for what each finding means):

* ``tmp/``: half-written files whose writer is gone (*stale-tmp*; removed);
* every bucket of every queue: each batch file read whole and its record
  checksums checked (*damaged-batch*: quarantined with its readable records
  kept in the queue); the state log, for lines a crash cut short
  (*torn-state-line*: dropped in a spool, neutralised in a store, see
  below); a state log left alone in a bucket whose batches are gone
  (*orphan-state*: removed with the bucket); empty buckets (removed);
  leases, live and expired (expired ones need no repair: they count as
  free, and are reported);
* ``failed/``: every failed batch readable and with its reason;
* ``quarantine/``: what is there, with the reasons (reported);
* ``ids/`` of a store: dedup slot files cut short (*torn-id*; the fragment
  is cut off) and the checkpoint.

Repairs need the root's ``lock``: the daemon that owns the spool or store
holds it while it runs.  If it is held, every check still runs but nothing
is changed, and the report says so; stop the daemon and run fsck again to
repair.  Producers (on a spool) and consumers (on a store) may keep running
during a repair: it takes the same per-queue locks they take.  In a store,
consumers keep their place in a state log by byte offset, so fsck does not
rewrite a store's state log; a torn last line is ended with a newline
instead, after which every reader ignores it (as they ignore torn lines in
the middle).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._durable import fsync_dir, pid_alive, remove_empty_dirs, write_new_file
from dropr.storage.files._layout import (
    BUCKET_SETTLE,
    LOCK_NAME,
    ROOT_ENTRIES,
    STATE_NAME,
    TMP_MAX_AGE,
    TMP_RE,
    USAGE_TMP_RE,
    WAKE_NAME,
    Layout,
    bucket_end_ms,
    decode_queue,
    read_why,
    why_bytes,
)
from dropr.storage.files._statelog import StateLog
from dropr.storage.files._storage import FilesystemStorage

_TMP_RE = TMP_RE
_ROOT_ENTRIES = ROOT_ENTRIES
_QUEUE_ENTRIES = {LOCK_NAME, WAKE_NAME}
_USAGE_TMP_RE = USAGE_TMP_RE
_SLOT_RE = re.compile(r"[0-9a-f]{11}\.ids\Z")

DAMAGE = "damage"
NOTE = "note"


@dataclass
class Finding:
    """One thing fsck found."""

    kind: str
    #: relative to the root
    path: str
    detail: str
    #: "damage" (needs repair) or "note" (worth knowing, harmless)
    severity: str = DAMAGE
    repaired: bool = False
    #: what was done, or why nothing was
    action: str = ""


@dataclass
class Report:
    """Everything fsck found in one spool or store."""

    root: str
    kind: str
    read_only: bool
    #: why repairs were not made (empty when they were allowed)
    read_only_reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def repaired(self) -> list[Finding]:
        return [f for f in self.findings if f.repaired]

    @property
    def unrepaired(self) -> list[Finding]:
        """Damage still there: fsck could not (or was not allowed to) repair it."""
        return [f for f in self.findings if f.severity == DAMAGE and not f.repaired]

    @property
    def exit_code(self) -> int:
        """0: clean or all repaired; 1: damage left."""
        return 1 if self.unrepaired else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "kind": self.kind,
            "read_only": self.read_only,
            "read_only_reason": self.read_only_reason,
            "counts": dict(sorted(self.counts.items())),
            "findings": [asdict(f) for f in self.findings],
            "repaired": len(self.repaired),
            "unrepaired": len(self.unrepaired),
            "exit_code": self.exit_code,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        """The report for people."""
        mode = (
            f"read-only: {self.read_only_reason}"
            if self.read_only
            else "repairs allowed (fsck holds the lock)"
        )
        c = self.counts
        out = [
            f"dropr fsck {self.root} ({self.kind}), {mode}",
            f"  {c['queues']} queues, {c['buckets']} buckets, {c['batch_files']} batch files, "
            f"{c['waiting']} messages waiting ({c['leased']} leased, {c['lease_expired']} "
            f"with an expired lease), {c['failed']} failed, {c['quarantined']} quarantined files",
        ]
        for f in self.findings:
            label = "REPAIRED" if f.repaired else ("DAMAGE" if f.severity == DAMAGE else "note")
            action = f"; {f.action}" if f.action else ""
            out.append(f"  {label:<8} {f.kind:<16} {f.path}: {f.detail}{action}")
        if self.unrepaired:
            verdict = f"{len(self.unrepaired)} damaged, not repaired"
        elif self.repaired:
            verdict = f"repaired {len(self.repaired)}; now clean"
        else:
            verdict = "clean"
        out.append(f"result: {verdict}")
        return "\n".join(out)


class _Checker:
    def __init__(self, root: str, kind: str, repair: bool, now: float) -> None:
        self.root = os.path.abspath(root)
        self.kind = kind
        self.now = now
        self.report = Report(self.root, kind, read_only=not repair)
        if not repair:
            self.report.read_only_reason = "asked not to repair (--no-repair)"
        self._lock_fd = -1
        self._storage: FilesystemStorage | None = None

    # -- the root lock -----------------------------------------------------------------

    def lock(self) -> None:
        """Take the root's lock for repairs; fall back to read-only if it is held."""
        if self.report.read_only:
            return
        path = os.path.join(self.root, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            daemon = "dropr-client" if self.kind == "spool" else "dropr-server"
            self.report.read_only = True
            self.report.read_only_reason = (
                f"the {daemon} (pid {holder}) holds the lock, so nothing was repaired; "
                "stop it and run fsck again to repair"
            )
            return
        self._lock_fd = fd

    def close(self) -> None:
        if self._storage is not None:
            self._storage.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def may_repair(self) -> bool:
        return not self.report.read_only

    def storage(self) -> FilesystemStorage:
        if self._storage is None:
            self._storage = FilesystemStorage(self.root)
        return self._storage

    def add(self, kind: str, path: str, detail: str, severity: str = DAMAGE) -> Finding:
        f = Finding(kind, os.path.relpath(path, self.root), detail, severity)
        self.report.findings.append(f)
        if severity == DAMAGE and self.report.read_only:
            f.action = "not repaired (read-only)"
        return f

    # -- the checks ----------------------------------------------------------------------

    def run(self) -> Report:
        for name in sorted(os.listdir(self.root)):
            m = _USAGE_TMP_RE.match(name)
            if m is not None:
                self._root_tmp(os.path.join(self.root, name), int(m.group(1)))
            elif name not in _ROOT_ENTRIES:
                self.add("foreign", os.path.join(self.root, name), "not dropr's; left alone", NOTE)
        self.check_tmp()
        self.check_queues()
        self.check_failed()
        self.check_quarantine()
        if self.kind == "store":
            self.check_ids()
        return self.report

    def _root_tmp(self, path: str, pid: int) -> None:
        """The shared usage figures, half-written by a process that is gone."""
        if pid_alive(pid):
            return
        f = self.add("stale-tmp", path, f"half-written usage figures: pid {pid} is gone")
        if self.may_repair:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            f.repaired, f.action = True, "removed"

    def check_tmp(self) -> None:
        tmp = os.path.join(self.root, "tmp")
        for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
            path = os.path.join(tmp, name)
            m = _TMP_RE.match(name)
            try:
                age = self.now - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if m is not None and pid_alive(int(m.group(1))) and age <= TMP_MAX_AGE:
                self.report.counts["tmp_in_use"] += 1
                continue
            why = (
                "not named by a dropr writer"
                if m is None
                else f"its writer (pid {m.group(1)}) is gone"
                if not pid_alive(int(m.group(1)))
                else f"{age:.0f} s old"
            )
            f = self.add("stale-tmp", path, f"half-written file: {why}")
            if self.may_repair:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                f.repaired, f.action = True, "removed (it was never acknowledged)"

    def check_queues(self) -> None:
        qroot = os.path.join(self.root, "queues")
        for qdir in sorted(os.listdir(qroot)) if os.path.isdir(qroot) else []:
            qpath = os.path.join(qroot, qdir)
            if decode_queue(qdir) is None or not os.path.isdir(qpath):
                self.add("foreign", qpath, "not a queue directory; left alone", NOTE)
                continue
            self.report.counts["queues"] += 1
            for name in sorted(os.listdir(qpath)):
                if name in _QUEUE_ENTRIES or (len(name) == 1 and name.isdigit()):
                    continue
                self.add("foreign", os.path.join(qpath, name), "not dropr's; left alone", NOTE)
            for bucket in self._buckets(qpath):
                self.report.counts["buckets"] += 1
                with self._queue_lock(qpath):
                    self.check_bucket(qpath, bucket)

    def _buckets(self, qpath: str) -> Iterator[str]:
        return (b for b in Layout(self.root).buckets(qpath) if os.path.isdir(b))

    @contextlib.contextmanager
    def _queue_lock(self, qpath: str) -> Iterator[None]:
        """The queue's lock, as takers hold it, while a bucket is checked."""
        if not self.may_repair:
            yield
            return
        fd = os.open(os.path.join(qpath, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _settled(self, bucket: str) -> bool:
        end_ms = bucket_end_ms(bucket)
        return end_ms is not None and end_ms / 1000.0 < self.now - BUCKET_SETTLE

    def check_bucket(self, qpath: str, bucket: str) -> None:
        try:
            names = sorted(os.listdir(bucket))
        except FileNotFoundError:
            return
        batches = [bn for bn in (BatchName.parse(n) for n in names) if bn is not None]
        for name in names:
            if name != STATE_NAME and BatchName.parse(name) is None:
                self.add("foreign", os.path.join(bucket, name), "not dropr's; left alone", NOTE)
        if not batches:
            self._empty_bucket(bucket, has_state=STATE_NAME in names)
            return
        log = StateLog(bucket)
        log.refresh()
        self._check_state_log(bucket, log)
        now_ms = int(self.now * 1000)
        expired = 0
        for bn in batches:
            self.report.counts["batch_files"] += 1
            path = os.path.join(bucket, str(bn))
            state = log.state(bn.batch_id)
            try:
                with open(path, "rb") as f:
                    decoded = batchfile.decode(f.read())
            except FileNotFoundError:
                continue
            got = len(decoded.messages)
            if decoded.error and got < bn.count:
                self._damaged(path, bn, decoded.error, decoded.messages)
            elif got < bn.count:
                self._damaged(path, bn, f"holds {got} messages, its name says {bn.count}", [])
            elif got > bn.count or decoded.error:
                self.add(
                    "trailing-bytes",
                    path,
                    f"more than the {bn.count} messages its name promises; the rest is ignored",
                    NOTE,
                )
            for i in range(min(got, bn.count)):
                if i in state.done:
                    continue
                self.report.counts["waiting"] += 1
                lease = state.leases.get(i)
                if lease is not None:
                    if lease[0] > now_ms:
                        self.report.counts["leased"] += 1
                    else:
                        expired += 1
        self.report.counts["lease_expired"] += expired
        if expired:
            self.add(
                "expired-lease",
                bucket,
                f"{expired} messages were taken and never acked; their leases ran out, so "
                "they are handed out again (no repair needed)",
                NOTE,
            )

    def _empty_bucket(self, bucket: str, has_state: bool) -> None:
        if not self._settled(bucket):
            return  # may be about to receive a batch
        if has_state:
            f = self.add(
                "orphan-state",
                os.path.join(bucket, STATE_NAME),
                "a state log in a bucket whose batch files are gone (a crash while "
                "the bucket was being removed)",
            )
        else:
            f = self.add("empty-bucket", bucket, "a bucket with nothing in it", NOTE)
        if not self.may_repair:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(bucket, STATE_NAME))
        remove_empty_dirs(bucket, os.path.dirname(bucket))
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(os.path.dirname(os.path.dirname(bucket)))
        f.repaired, f.action = True, "removed the bucket"

    def _check_state_log(self, bucket: str, log: StateLog) -> None:
        path = log.path
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return
        unterminated = bool(data) and not data.endswith(b"\n")
        if not log.bad_lines and not unterminated:
            return
        bad = log.bad_lines + (1 if unterminated else 0)
        f = self.add(
            "torn-state-line",
            path,
            f"{bad} lines cut short or unreadable (readers ignore them: at worst a "
            "message is handed out again)",
        )
        if not self.may_repair:
            return
        if self.kind == "spool":
            # The spool's only reader is its daemon, stopped (fsck holds the
            # lock): rewrite the log with its good lines only.
            good = [raw + b"\n" for raw in data.split(b"\n") if raw and _good_line(raw)]
            tmp = write_new_file(os.path.join(self.root, "tmp"), "state", good)
            os.replace(tmp, path)
            fsync_dir(bucket)
            f.repaired, f.action = True, f"rewrote the state log without the {bad} bad lines"
        else:
            # Consumers may be reading this log by offset: never rewrite it.
            if unterminated:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, b"\n")
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            f.repaired, f.action = True, "ended the torn line so every reader skips it"

    def _damaged(self, path: str, bn: BatchName, reason: str, salvage: list[Any]) -> None:
        f = self.add(
            "damaged-batch",
            path,
            f"{reason}; {len(salvage)} of {bn.count} messages readable",
        )
        if not self.may_repair:
            return
        self.storage().quarantine(path, reason, salvage=salvage, name=bn)
        f.repaired = True
        f.action = (
            f"quarantined with its reason; {len(salvage)} readable messages kept in the queue"
        )

    def check_failed(self) -> None:
        froot = os.path.join(self.root, "failed")
        for qdir in sorted(os.listdir(froot)) if os.path.isdir(froot) else []:
            fpath = os.path.join(froot, qdir)
            if not os.path.isdir(fpath):
                continue
            names = set(os.listdir(fpath))
            for name in sorted(names):
                bn = BatchName.parse(name)
                if bn is None:
                    if name.endswith(".why") and not any(
                        n.startswith(name[:-4] + "-") for n in names
                    ):
                        self.add("orphan-reason", os.path.join(fpath, name), "no batch", NOTE)
                    continue
                path = os.path.join(fpath, name)
                with open(path, "rb") as fh:
                    decoded = batchfile.decode(fh.read())
                self.report.counts["failed"] += min(len(decoded.messages), bn.count)
                if decoded.error and len(decoded.messages) < bn.count:
                    self._damaged(path, bn, decoded.error, decoded.messages)
                why = os.path.join(fpath, f"{bn.batch_id}.why")
                if f"{bn.batch_id}.why" not in names:
                    f = self.add("missing-reason", path, "a failed batch without its .why file")
                    if self.may_repair:
                        lost = {"reason": "(the reason was lost; found by dropr fsck)"}
                        text = why_bytes({**lost, "time": self.now})
                        tmp = write_new_file(os.path.join(self.root, "tmp"), "why", [text])
                        os.replace(tmp, why)
                        fsync_dir(fpath)
                        f.repaired, f.action = True, "wrote a .why saying the reason was lost"

    def check_quarantine(self) -> None:
        qdir = os.path.join(self.root, "quarantine")
        for name in sorted(os.listdir(qdir)) if os.path.isdir(qdir) else []:
            if name.endswith(".why"):
                continue
            self.report.counts["quarantined"] += 1
            why = read_why(os.path.join(qdir, name + ".why"))
            reason = str(why.get("reason", "")) if why is not None else "(no reason recorded)"
            self.add(
                "quarantined",
                os.path.join(qdir, name),
                f"set aside earlier: {reason}; inspect it, then delete it",
                NOTE,
            )

    def check_ids(self) -> None:
        ids = os.path.join(self.root, "ids")
        if not os.path.isdir(ids):
            return
        for name in sorted(os.listdir(ids)):
            path = os.path.join(ids, name)
            if name == "checkpoint":
                try:
                    with open(path, "rb") as fh:
                        int(fh.read().strip() or b"0")
                except ValueError:
                    f = self.add("bad-checkpoint", path, "the dedup checkpoint cannot be read")
                    if self.may_repair:
                        os.unlink(path)
                        fsync_dir(ids)
                        f.repaired = True
                        f.action = "removed; the server re-indexes every stored batch at its start"
                continue
            if name == "checkpoint.tmp":
                f = self.add("stale-tmp", path, "a checkpoint a crash left half-written")
                if self.may_repair:
                    os.unlink(path)
                    f.repaired, f.action = True, "removed"
                continue
            if not _SLOT_RE.match(name):
                self.add("foreign", path, "not dropr's; left alone", NOTE)
                continue
            size = os.stat(path).st_size
            if size % 16:
                f = self.add("torn-id", path, f"ends in {size % 16} bytes of a cut-short id")
                if self.may_repair:
                    with open(path, "r+b") as fh:
                        fh.truncate(size - size % 16)
                        os.fdatasync(fh.fileno())
                    f.repaired, f.action = True, "cut off the fragment"


def _good_line(raw: bytes) -> bool:
    """True if ``raw`` (without its newline) is a state-log line readers accept."""
    probe = StateLog(os.devnull)  # never read: only its parser is used
    probe._apply(raw)
    return probe.bad_lines == 0


def guess_kind(root: str) -> str:
    """ "store" if ``root`` has a dedup index, else "spool"."""
    return "store" if os.path.isdir(os.path.join(root, "ids")) else "spool"


def check(
    root: str, kind: str | None = None, repair: bool = True, now: float | None = None
) -> Report:
    """Check the spool or store at ``root``; repair what is safe unless told not to.

    ``kind`` is "spool" or "store" (guessed from the directory when None).
    Repairs happen only if the root's lock can be taken (no daemon runs);
    the report says which mode ran.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no spool or store at {root}")
    kind = kind or guess_kind(root)
    if kind not in ("spool", "store"):
        raise ValueError(f"kind must be spool or store, not {kind!r}")
    checker = _Checker(root, kind, repair, time.time() if now is None else now)
    try:
        checker.lock()
        return checker.run()
    finally:
        checker.close()
