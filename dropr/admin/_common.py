"""What the subcommands of ``dropr`` share: where to look, progress, asking."""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import time
from typing import TextIO

from dropr.client._spool import default_spool_path
from dropr.errors import DroprError
from dropr.interfaces import IStorage
from dropr.storage._spec import open_store, redact, spec_kind, spec_path

_AGE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*\Z")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageProblem(DroprError):
    """The command line asks for something that cannot be done (exit 2)."""


def age(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` → seconds."""
    m = _AGE_RE.match(text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"not an age: {text!r} (use seconds, or a number with s, m, h, d or w: 15m, 7d)"
        )
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


#: What ``--store`` accepts, for the help texts.
STORE_HELP = "store of a dropr-server: a directory, sqlite:///path or postgresql://…"


def add_where(parser: argparse.ArgumentParser, store_only: bool = False) -> None:
    """``--spool DIR`` / ``--store SPEC`` (or only ``--store``)."""
    if store_only:
        parser.add_argument("--store", metavar="SPEC", help=STORE_HELP + " (default $DROPR_STORE)")
        return
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--spool", metavar="DIR", help="spool directory (default $DROPR_SPOOL)")
    where.add_argument("--store", metavar="SPEC", help=STORE_HELP)


def where(args: argparse.Namespace, store_only: bool = False) -> tuple[str, str]:
    """``(path, kind)`` the arguments name; kind is "store" or "spool"."""
    if store_only:
        path = args.store or os.environ.get("DROPR_STORE")
        if not path:
            raise UsageProblem("give --store SPEC (or set $DROPR_STORE)")
        return path, "store"
    if args.store:
        return args.store, "store"
    return args.spool or default_spool_path(), "spool"


def open_storage(args: argparse.Namespace, store_only: bool = False) -> IStorage:
    """The spool or store the arguments name; it must exist (none is made)."""
    spec, kind = where(args, store_only)
    storage_kind = spec_kind(spec)
    if storage_kind in ("files", "sqlite"):
        path = spec_path(spec)
        exists = (
            os.path.isdir(os.path.join(path, "queues"))
            if storage_kind == "files"
            else os.path.isfile(path)
        )
        if not exists:
            raise UsageProblem(
                f"no {kind} at {redact(spec)}: give the --{kind} of a "
                f"{'dropr-server' if kind == 'store' else 'producer and dropr-client'}"
            )
    return open_store(spec)


def location(storage: IStorage) -> str:
    """How to name ``storage`` to people: its path or redacted URL."""
    return redact(str(getattr(storage, "path", None) or getattr(storage, "spec", "the store")))


def encode_payload(payload: bytes, raw: bool) -> tuple[str, str]:
    """``(text, encoding)``: base64, or the text itself with ``raw`` when it is UTF-8."""
    if raw:
        try:
            return payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(payload).decode("ascii"), "base64"


class Progress:
    """``what: done/total`` on a terminal's stderr, rewritten in place; silent elsewhere.

    Call it as ``progress(done, total)``; ``finish()`` clears the line.
    Updates come at most ten times a second.
    """

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = 0.0
        self._dirty = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._shown < 0.1 and (total is None or done < total):
            return
        self._shown = now
        text = f"{self.what}: {done}" + (f"/{total}" if total is not None else "")
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._dirty = True

    def finish(self) -> None:
        if self.enabled and self._dirty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._dirty = False


def confirm(question: str, yes: bool) -> bool:
    """Ask ``question`` on the terminal; True with ``yes``.

    Without a terminal to ask on, refuse: a script must say ``--yes``.
    """
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageProblem(f"{question} -- not asked (stdin is not a terminal): add --yes")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
