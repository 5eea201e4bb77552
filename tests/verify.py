"""Check end to end that every acknowledged message arrived exactly once.

Used by the fault-injection tests (``tests/test_chaos.py``) and the soak
bench (``bench/soak.py``).  Producers and consumers keep logs of their own,
each line written with one ``write`` and synced:

* a producer appends ``P <id> <sha256> <channel>`` for every message once
  ``put``/``put_many`` *returned* (and ``I <count>`` before it calls, so that a
  kill in the middle of a ``put_many`` can be counted);
* a consumer appends ``C <id> <sha256> <channel>`` for every message it took
  (``X`` instead of ``C`` for one it is about to fail), then ``K`` once its
  ``ack`` (or ``fail``) returned.

:func:`verify` reads those logs and the spools and store as they are on
disk (read-only: nothing is taken, moved or repaired) and holds every
logged id to the promise: it is waiting in the store, or was consumed
exactly once, or sits in a failed area with a reason; with the payload it
was put with, byte for byte (by checksum).

Payloads made by :func:`make_payload` check themselves, so a message that
arrived although its producer was killed before it could log the id (the
put returned, the log line never came) is still checked for damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dropr.storage import _batchfile as batchfile
from dropr.storage.files._layout import Layout, read_why
from dropr.storage.files._statelog import StateLog

PAYLOAD_MAGIC = b"dropr-chaos"
PLANTED_MAGIC = b"dropr-planted"


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def make_payload(tag: str, seq: int, body: bytes) -> bytes:
    """A payload that carries the checksum of its own body."""
    head = b"%s %s %d %s\n" % (PAYLOAD_MAGIC, tag.encode("ascii"), seq, sha256(body)[:32].encode())
    return head + body


def check_payload(payload: bytes) -> bool:
    """True if ``payload`` is an intact :func:`make_payload` payload."""
    head, sep, body = payload.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 4 or parts[0] != PAYLOAD_MAGIC:
        return False
    return sha256(body)[:32].encode() == parts[3]


def make_planted_payload(seq: int) -> bytes:
    """The payload of a message in a file planted by a fault injector."""
    body = os.urandom(40).hex().encode()
    return b"%s %d %s\n%s" % (PLANTED_MAGIC, seq, sha256(body)[:32].encode(), body)


def check_planted_payload(payload: bytes) -> bool:
    """True if ``payload`` is an intact :func:`make_planted_payload` payload."""
    head, sep, body = payload.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != PLANTED_MAGIC:
        return False
    return sha256(body)[:32].encode() == parts[2]


def _log_lines(path: str) -> Iterable[list[str]]:
    """Whole lines of a log, split; a line a kill cut short is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n")
    for raw in data[: end + 1].splitlines():
        try:
            yield raw.decode("ascii").split(" ")
        except UnicodeDecodeError:
            continue


@dataclass
class ProducerLog:
    """What the producers' logs say: ids whose put returned, and put calls."""

    #: id → (sha256 of the payload, channel)
    put: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: int = 0
    returned: int = 0
    full: int = 0

    @property
    def cut_short(self) -> int:
        """Put calls that never returned (their producer was killed in them)."""
        return self.calls - self.returned - self.full


_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def read_producer_logs(paths: Iterable[str]) -> ProducerLog:
    """Read producer logs (see the module docstring)."""
    out = ProducerLog()
    for path in paths:
        for parts in _log_lines(path):
            if parts[0] == "I" and len(parts) == 2:
                out.calls += 1
            elif parts[0] == "R" and len(parts) == 2:
                out.returned += 1
            elif parts[0] == "F":
                out.full += 1
            elif (
                # A producer killed inside its own log write leaves a torn
                # line that the next run's first line completes ("<sha
                # cut>I 400"): only a whole digest makes a logged put.
                parts[0] == "P"
                and len(parts) == 4
                and len(parts[1]) == 32
                and _SHA256.match(parts[2])
            ):
                out.put[parts[1]] = (parts[2], parts[3])
    return out


@dataclass
class Delivery:
    """One message handed to a consumer."""

    sha: str
    channel: str
    #: "C" consumed (acked), "X" failed by the consumer
    kind: str
    #: the payload checked itself: "v" valid, "p" a valid planted one, "x" damaged
    check: str
    #: the consumer's ack (or fail) returned
    confirmed: bool = False


@dataclass
class ConsumerLog:
    """What the consumers' logs say: every delivery of every id, in order."""

    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)


def read_consumer_logs(paths: Iterable[str]) -> ConsumerLog:
    """Read consumer logs (see the module docstring)."""
    out = ConsumerLog()
    for path in paths:
        pending: list[Delivery] = []
        for parts in _log_lines(path):
            if parts[0] in ("C", "X") and len(parts) == 5:
                d = Delivery(parts[2], parts[3], parts[0], parts[4])
                pending.append(d)
                out.deliveries.setdefault(parts[1], []).append(d)
            elif parts[0] == "K":
                for d in pending:
                    d.confirmed = True
                pending = []
            elif parts[0] == "S":  # a new consumer process: what was pending stays so
                pending = []
    return out


@dataclass
class StoredCopy:
    """One copy of a message found on disk."""

    id: str
    sha: str
    channel: str
    payload_ok: bool
    planted: bool


@dataclass
class DiskContents:
    """What a spool or store holds, read without changing anything."""

    #: copies of messages not yet acked or failed, in queues
    waiting: list[StoredCopy] = field(default_factory=list)
    #: copies in the failed area, with their reason ("" if the reason is missing)
    failed: list[tuple[StoredCopy, str]] = field(default_factory=list)
    #: quarantined files: name → reason
    quarantined: dict[str, str] = field(default_factory=dict)
    #: batch files in queues that cannot be read whole
    damaged: list[str] = field(default_factory=list)


def _copy(m: Any) -> StoredCopy:
    return StoredCopy(
        m.id,
        sha256(m.payload),
        m.channel,
        check_payload(m.payload) or check_planted_payload(m.payload),
        m.payload.startswith(PLANTED_MAGIC),
    )


def _read_batch_file(path: str) -> tuple[list[Any], str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], ""
    decoded = batchfile.decode(data)
    return decoded.messages, decoded.error


def scan(root: str) -> DiskContents:
    """Read what the spool or store at ``root`` holds (read-only)."""
    out = DiskContents()
    layout = Layout(root)
    for _queue, qpath in layout.queue_dirs():
        for bucket in layout.buckets(qpath):
            batches = layout.batches(bucket)
            if not batches:
                continue
            log = StateLog(bucket)
            log.refresh()
            for bn in batches:
                messages, error = _read_batch_file(os.path.join(bucket, str(bn)))
                if error or len(messages) < bn.count:
                    out.damaged.append(os.path.relpath(os.path.join(bucket, str(bn)), root))
                state = log.state(bn.batch_id)
                for i, m in enumerate(messages[: bn.count]):
                    if i not in state.done:
                        out.waiting.append(_copy(m))
    for _queue, fpath in layout.queue_dirs(layout.failed_dir):
        for fbn in layout.batches(fpath):
            why = read_why(Layout.why_of_failed(fpath, fbn))
            reason = str(why.get("reason", "")) if why is not None else ""
            messages, _error = _read_batch_file(os.path.join(fpath, str(fbn)))
            out.failed.extend((_copy(m), reason) for m in messages)
    qdir = layout.quarantine_dir
    for name in sorted(os.listdir(qdir)) if os.path.isdir(qdir) else []:
        if name.endswith(".why"):
            continue
        why = read_why(os.path.join(qdir, name + ".why"))
        out.quarantined[name] = str(why.get("reason", "")) if why is not None else ""
    return out


@dataclass
class Report:
    """The verdict: figures, and the ids behind any bad figure (a few of each)."""

    #: messages whose put returned, per the producers' logs
    put: int = 0
    #: of those, how many reached the store (waiting, consumed or failed there)
    stored: int = 0
    #: of those, how many still wait in the store
    waiting: int = 0
    consumed: int = 0
    failed: int = 0
    duplicates: int = 0
    lost: int = 0
    #: logged ids still only in a spool (not delivered yet)
    pending: int = 0
    #: copies whose payload is not what was put (or is damaged)
    corrupt: int = 0
    #: messages in a failed area without a reason
    failed_without_reason: int = 0
    #: messages that arrived whose put never logged its return (producer killed)
    unlogged_arrived: int = 0
    #: messages from planted files that were salvaged and delivered
    planted_delivered: int = 0
    #: deliveries again after a consumer died before its ack returned
    redelivered: int = 0
    #: put calls cut short by a kill, and puts refused because storage was full
    puts_cut_short: int = 0
    puts_refused_full: int = 0
    quarantined_files: int = 0
    quarantine_reasons: list[str] = field(default_factory=list)
    damaged_files_left: list[str] = field(default_factory=list)
    faults_injected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing was lost, duplicated, damaged or left undelivered."""
        return not (
            self.lost
            or self.duplicates
            or self.corrupt
            or self.pending
            or self.failed_without_reason
            or self.damaged_files_left
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["faults_injected_total"] = sum(self.faults_injected.values())
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        """The figures on a few lines, for people."""
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_injected.items()))
        return (
            f"messages put {self.put}, stored {self.stored} (consumed {self.consumed}, "
            f"waiting {self.waiting}), failed {self.failed}; "
            f"duplicates {self.duplicates}, lost {self.lost}, "
            f"pending {self.pending}, corrupt {self.corrupt}\n"
            f"unlogged puts that arrived {self.unlogged_arrived}, planted messages "
            f"salvaged {self.planted_delivered}, redelivered {self.redelivered}, "
            f"put calls cut short {self.puts_cut_short}, puts refused as full "
            f"{self.puts_refused_full}, quarantined files {self.quarantined_files}\n"
            f"faults injected {sum(self.faults_injected.values())}: {faults or 'none'}\n"
            f"verdict: {'OK' if self.ok else 'FAILED'}"
        )


def verify(
    producer_logs: Iterable[str],
    consumer_logs: Iterable[str],
    store: str | DiskContents,
    spools: Iterable[str] = (),
    faults: Mapping[str, int] | None = None,
) -> Report:
    """Hold the logs to what the store (and spools) hold; see the module docstring.

    ``store`` is a store directory, or what a store that is no directory
    holds, read by the caller (a database).
    """
    produced = read_producer_logs(producer_logs)
    consumed = read_consumer_logs(consumer_logs)
    in_store = store if isinstance(store, DiskContents) else scan(store)
    in_spools = [scan(s) for s in spools]
    report = Report(
        put=len(produced.put),
        puts_cut_short=produced.cut_short,
        puts_refused_full=produced.full,
        faults_injected=dict(faults or {}),
    )
    examples: dict[str, list[str]] = {}

    def example(kind: str, text: str) -> None:
        lst = examples.setdefault(kind, [])
        if len(lst) < 10:
            lst.append(text)

    # Every copy anywhere at the end of the line, per id.
    copies: dict[str, int] = Counter()
    waiting_ids: set[str] = set()
    failed_ids: set[str] = set()
    store_failed_ids = {c.id for c, _reason in in_store.failed}
    planted: set[str] = set()
    unknown: set[str] = set()

    def check_copy(c: StoredCopy, where: str) -> None:
        expected = produced.put.get(c.id)
        if c.planted:
            planted.add(c.id)
        elif expected is None:
            unknown.add(c.id)
        if not c.payload_ok or (expected is not None and expected != (c.sha, c.channel)):
            report.corrupt += 1
            example("corrupt", f"{c.id} in {where}")

    for c in in_store.waiting:
        copies[c.id] += 1
        waiting_ids.add(c.id)
        check_copy(c, "store")
    for c, reason in in_store.failed + [f for s in in_spools for f in s.failed]:
        copies[c.id] += 1
        failed_ids.add(c.id)
        check_copy(c, "failed area")
        if not reason:
            report.failed_without_reason += 1
            example("failed_without_reason", c.id)
    consumed_ids: set[str] = set()
    for mid, deliveries in consumed.deliveries.items():
        expected = produced.put.get(mid)
        if expected is None and not any(d.check == "p" for d in deliveries):
            unknown.add(mid)
        if any(d.check == "p" for d in deliveries):
            planted.add(mid)
        for d in deliveries:
            if d.check == "x" or (expected is not None and expected != (d.sha, d.channel)):
                report.corrupt += 1
                example("corrupt", f"{mid} as consumed")
        # A message the consumer failed is counted where it went: the failed area.
        acked = [d for d in deliveries if d.kind == "C"]
        confirmed = sum(1 for d in acked if d.confirmed)
        unconfirmed = len(acked) - confirmed
        if acked:
            consumed_ids.add(mid)
        copies[mid] += confirmed
        if unconfirmed and not copies[mid]:
            # Taken, and the consumer died before its ack returned, and it is
            # nowhere else: the ack landed.  That is one delivery.
            copies[mid] += 1
            unconfirmed -= 1
        report.redelivered += unconfirmed
    pending_ids: set[str] = set()
    for s in in_spools:
        for c in s.waiting:
            check_copy(c, "spool")
            if c.id not in copies:
                pending_ids.add(c.id)
    unknown -= set(produced.put)
    for mid, n in copies.items():
        if n > 1:
            report.duplicates += n - 1
            example("duplicates", f"{mid} x{n}")
    for mid in produced.put:
        if copies.get(mid, 0) == 0:
            if mid in pending_ids:
                report.pending += 1
                example("pending", mid)
            else:
                report.lost += 1
                example("lost", mid)
    known = set(produced.put)
    report.waiting = len(waiting_ids & known)
    report.stored = len((waiting_ids | store_failed_ids | consumed_ids) & known)
    report.failed = len(failed_ids & known)
    report.consumed = len(consumed_ids & known)
    report.unlogged_arrived = len(unknown)
    report.planted_delivered = len(planted)
    for s in [in_store, *in_spools]:
        report.quarantined_files += len(s.quarantined)
        report.quarantine_reasons.extend(sorted(set(s.quarantined.values())))
        report.damaged_files_left.extend(s.damaged)
    report.examples = examples
    return report
