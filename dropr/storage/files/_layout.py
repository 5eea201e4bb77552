"""The on-disk layout of a file-system spool or store, in one place.

The storage, ``dropr fsck``, the admin commands and the test verifier all
read the tree through this module (see docs/on-disk-format.rst)::

    lock                           held by the one daemon that owns the root
    usage                          advisory figures shared between processes
    tmp/                           files being written (<prefix>.<pid>.<rand>.tmp)
    queues/<queue>/lock            serialises take/ack/release/fail
    queues/<queue>/wake            touched at every add (consumers watch it)
    queues/<queue>/<p>/<hi>/<lo>/  a bucket: batch files and their state log
    failed/<queue>/                failed batches, each with <batch id>.why
    quarantine/                    files that could not be read, each with a .why
    ids/                           the dedup index (server stores)

``<p>`` is the priority digit; ``<hi>`` and ``<lo>`` are the first 7 and
next 2 hex digits of the batch id (about 17 minutes and 4.096 seconds of
time), so directories stay small and a sorted walk is delivery order.
Nothing here writes; it names, parses and walks.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from dropr.errors import InvalidMessage
from dropr.storage._batchfile import BatchName
from dropr.storage.files._disk import REAL_DISK, Disk
from dropr.storage.files._statelog import STATE_NAME

__all__ = [
    "BUCKET_MS",
    "BUCKET_SETTLE",
    "ROOT_ENTRIES",
    "STATE_NAME",
    "TMP_MAX_AGE",
    "TMP_RE",
    "USAGE_NAME",
    "USAGE_TMP_RE",
    "WAKE_NAME",
    "Layout",
    "bucket_end_ms",
    "bucket_start_ms",
    "decode_queue",
    "encode_queue",
    "read_why",
    "validate_queue",
    "why_bytes",
]

LOCK_NAME = "lock"
WAKE_NAME = "wake"
USAGE_NAME = "usage"
#: What may lie in a root; anything else is foreign and left alone.
#: (``put.sock`` and ``putlog``: dropr-client's put socket and put log in a spool.)
ROOT_ENTRIES = {
    "lock",
    "tmp",
    "queues",
    "failed",
    "quarantine",
    "ids",
    "notify",
    "usage",
    "put.sock",
    "putlog",
}
#: A file being written: ``<prefix>.<pid>.<12 hex>.tmp``.
TMP_RE = re.compile(r".*\.(\d+)\.[0-9a-f]{12}\.tmp\Z")
#: The usage file being rewritten: ``usage.<pid>.tmp``.
USAGE_TMP_RE = re.compile(r"usage\.(\d+)\.tmp\Z")
#: A temporary file this old is a leftover whatever its writer's pid says.
TMP_MAX_AGE = 3600.0
#: A bucket spans this many milliseconds of batch-id time (4.096 s).
BUCKET_MS = 1 << 12
#: Buckets whose time ended less than this ago may still receive batches.
BUCKET_SETTLE = 10.0

_SAFE_QUEUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def encode_queue(name: str) -> str:
    """The directory name of queue ``name``.

    Names that are safe file names (every valid channel name) are used as
    they are; anything else (a destination URL) is written ``~`` followed by
    its URL-safe base64, which can never collide with a safe name.
    """
    if _SAFE_QUEUE.match(name):
        return name
    raw = base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")
    return "~" + raw.rstrip("=")


def decode_queue(dirname: str) -> str | None:
    """The queue name of directory ``dirname``; None for foreign entries."""
    if _SAFE_QUEUE.match(dirname):
        return dirname
    if dirname.startswith("~") and len(dirname) > 1:
        raw = dirname[1:]
        try:
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def validate_queue(name: object) -> str:
    """Return ``name`` if it can name a queue, else raise InvalidMessage."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 180
        or "\0" in name
        # (test_properties) It must also encode to one legal file name: lone
        # surrogates do not encode, and 180 non-ASCII characters pass the
        # 255 bytes a name may have.
        or not name.isascii()
    ):
        raise InvalidMessage(
            f"invalid queue name {name!r}: a channel name or a destination URL "
            "of at most 180 ASCII characters"
        )
    return name


def bucket_start_ms(bucket: str) -> int | None:
    """When the bucket at path ``bucket`` begins (ms since the epoch); None if not a bucket."""
    lo = os.path.basename(bucket)
    hi = os.path.basename(os.path.dirname(bucket))
    if len(hi) != 7 or len(lo) != 2:
        return None
    try:
        return int(hi + lo, 16) * BUCKET_MS
    except ValueError:
        return None


def bucket_end_ms(bucket: str) -> int | None:
    """When the bucket at path ``bucket`` ends (ms); None if not a bucket."""
    start = bucket_start_ms(bucket)
    return None if start is None else start + BUCKET_MS


def why_bytes(fields: dict[str, Any]) -> bytes:
    """The contents of a ``.why`` file."""
    return json.dumps(fields, indent=1).encode("utf-8") + b"\n"


def read_why(path: str, disk: Disk = REAL_DISK) -> dict[str, Any] | None:
    """What the ``.why`` file at ``path`` says; None if it is missing or unreadable."""
    try:
        why = json.loads(disk.read(path))
    except (OSError, ValueError):
        return None
    return why if isinstance(why, dict) else None


def _listing(disk: Disk) -> Callable[[str], list[str]]:
    def names(path: str) -> list[str]:
        try:
            return sorted(disk.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    return names


class Layout:
    """The paths of one root, and walks of its tree."""

    def __init__(self, root: str, disk: Disk = REAL_DISK) -> None:
        self.root = os.path.abspath(root)
        self.disk = disk
        self.lock_file = os.path.join(self.root, LOCK_NAME)
        self.usage_file = os.path.join(self.root, USAGE_NAME)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.queues_dir = os.path.join(self.root, "queues")
        self.failed_dir = os.path.join(self.root, "failed")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        self.ids_dir = os.path.join(self.root, "ids")

    def top_dirs(self) -> tuple[str, ...]:
        """The directories every root has."""
        return (self.root, self.tmp_dir, self.queues_dir, self.failed_dir, self.quarantine_dir)

    def queue_dir(self, queue: str) -> str:
        return os.path.join(self.queues_dir, encode_queue(queue))

    def failed_queue_dir(self, queue: str) -> str:
        return os.path.join(self.failed_dir, encode_queue(queue))

    @staticmethod
    def bucket_dir(queue_dir: str, priority: int, batch_id: str) -> str:
        """The bucket of a batch: by priority, then the time in its id."""
        return os.path.join(queue_dir, str(priority), batch_id[:7], batch_id[7:9])

    @staticmethod
    def why_of_failed(failed_queue_dir: str, batch: BatchName) -> str:
        return os.path.join(failed_queue_dir, f"{batch.batch_id}.why")

    def queue_dirs(self, top: str | None = None) -> Iterator[tuple[str, str]]:
        """``(queue name, directory)`` under ``queues/`` (or ``top``), sorted."""
        top = top or self.queues_dir
        for d in _listing(self.disk)(top):
            name = decode_queue(d)
            if name is not None:
                yield name, os.path.join(top, d)

    def priority_dirs(self, queue_dir: str) -> list[str]:
        """The priority directories of a queue, lowest number (first delivered) first."""
        names = _listing(self.disk)(queue_dir)
        return [
            os.path.join(queue_dir, p)
            for p in sorted((n for n in names if len(n) == 1 and n.isdigit()), key=int)
        ]

    def buckets(
        self, queue_dir: str, names: Callable[[str], list[str]] | None = None
    ) -> Iterator[str]:
        """Every bucket directory of a queue, in delivery order.

        ``names`` lists a directory sorted (a cached listing); the disk's by default.
        """
        names = names or _listing(self.disk)
        for p in names(queue_dir):
            if len(p) != 1 or not p.isdigit():
                continue
            pdir = os.path.join(queue_dir, p)
            for hi in names(pdir):
                hidir = os.path.join(pdir, hi)
                for lo in names(hidir):
                    yield os.path.join(hidir, lo)

    def batches(self, directory: str) -> list[BatchName]:
        """The batch files of a bucket or failed area, in order."""
        parsed = (BatchName.parse(n) for n in _listing(self.disk)(directory))
        return [b for b in parsed if b is not None]
