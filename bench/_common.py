"""What the benchmarks share: machine facts, summaries, scratch directories, output.

Not a module of dropr: the scripts beside it import it by file name
(``python bench/put.py`` puts ``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

#: Where scratch directories go when ``--dir`` is not given.  ``/var/tmp`` is
#: on the real disk on most systems, where ``/tmp`` may be a tmpfs.
DEFAULT_BASE = "/var/tmp/dropr-bench"
#: A destination URL for spooled messages; nothing is ever sent to it.
DESTINATION = "http://127.0.0.1:8080/"
TRASH_PREFIX = ".trash-"


def summary(values: Sequence[float], digits: int = 6) -> dict[str, Any]:
    """Median, min and max of ``values``, with the values themselves."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
        "values": [round(v, digits) for v in values],
    }


def fmt_summary(s: dict[str, Any], unit: str = "", digits: int = 0) -> str:
    """``median [min-max]`` for a :func:`summary` (an en dash between min and max)."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} [{f.format(s['min'])}\u2013{f.format(s['max'])}]{unit}"


def _first_line_with(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _mount_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry of the file system holding ``path``."""
    path = os.path.realpath(path)
    best: dict[str, str] = {}
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best.get("mountpoint", "")):
                    best = {"device": dev, "mountpoint": mnt, "type": fstype, "options": opts}
    except OSError:
        pass
    return best


def _ext4_has_journal(device: str) -> bool | None:
    """Whether an ext4 file system has a journal (None: cannot tell).

    A mounted ext4 with a journal has a jbd2 entry ``/proc/fs/jbd2/<dev>-<n>``.
    """
    dev = os.path.basename(device)
    if not dev or not os.path.isdir(os.path.join("/proc/fs/ext4", dev)):
        return None
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except FileNotFoundError:
        return False
    return any(j.rsplit("-", 1)[0] == dev for j in journals)


def _sources_digest() -> str:
    """SHA-1 over dropr's ``*.py`` files as they are now (the tree may be dirty)."""
    import dropr

    top = os.path.dirname(os.path.abspath(dropr.__file__))
    digest = hashlib.sha1()
    for root, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, top).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def machine(path: str) -> dict[str, Any]:
    """Facts about this machine and the file system holding ``path``."""
    mount = _mount_of(path)
    df = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        df = subprocess.run(
            ["df", "-T", path], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    journal = _ext4_has_journal(mount.get("device", "")) if mount.get("type") == "ext4" else None
    commit = "unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "dropr_sources_sha1": _sources_digest(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_model": _first_line_with("/proc/cpuinfo", "model name"),
        "mem_total": _first_line_with("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "dir": os.path.abspath(path),
        "filesystem": {**mount, "has_journal": journal, "df_T": df},
        "dropr_commit": commit,
    }


class Scratch:
    """Fresh directories for one run, cleaned up at the end, never in between.

    The journal-less ext4 here creates files several times slower for
    minutes after a mass delete, so nothing is deleted while a run is timing:
    finished trees are only renamed aside (``.trash-*``), and :meth:`cleanup`
    deletes them, and those of earlier runs that died, once the run is over.
    """

    def __init__(self, base: str, name: str) -> None:
        self.base = os.path.abspath(base)
        os.makedirs(self.base, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.root = os.path.join(self.base, f"{name}-{stamp}-{os.getpid()}")
        os.makedirs(self.root)
        self._count = 0

    def fresh(self, label: str) -> str:
        """A new empty directory under this run's root."""
        self._count += 1
        path = os.path.join(self.root, f"{self._count:03d}-{label}")
        os.makedirs(path)
        return path

    def cleanup(self, keep: bool) -> list[str]:
        """Rename this run's tree aside, then delete every trash tree unless ``keep``."""
        if keep:
            return [self.root]
        if os.path.isdir(self.root):
            os.rename(
                self.root, os.path.join(self.base, TRASH_PREFIX + os.path.basename(self.root))
            )
        for name in os.listdir(self.base):
            if name.startswith(TRASH_PREFIX):
                shutil.rmtree(os.path.join(self.base, name), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.base)
        return []


def peak_rss_kib() -> int:
    """Peak resident set size of this process so far, KiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """Resident set size of this process now, KiB."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print ``result`` as JSON on stdout and, if ``out`` is given, write it there."""
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays pure JSON."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()
