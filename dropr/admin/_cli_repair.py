"""``dropr requeue`` and ``dropr purge``: empty the failed area, tidy up."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from dropr._ids import is_valid_id
from dropr.admin import _admin as admin
from dropr.admin._common import (
    Progress,
    UsageProblem,
    add_where,
    age,
    confirm,
    location,
    open_storage,
)
from dropr.interfaces import IStorage


def _describe(selection: list[admin.Entry]) -> str:
    per_queue = Counter(e.queue for e in selection)
    return ", ".join(f"{q}: {n}" for q, n in sorted(per_queue.items()))


def _select(args: argparse.Namespace, storage: IStorage) -> list[admin.Entry]:
    ids = list(args.ids or [])
    bad = [i for i in ids if not is_valid_id(i)]
    if bad:
        raise UsageProblem(f"not a message id: {bad[0]!r} (32 lowercase hex digits)")
    if not (ids or args.channel or args.to or args.all or args.older_than is not None):
        raise UsageProblem("say which failed messages: IDs, --channel, --to, --older-than or --all")
    return admin.select_failed(
        storage,
        queue=args.to,
        channel=args.channel,
        ids=ids or None,
        older_than=args.older_than,
    )


def _report(args: argparse.Namespace, verb: str, moved: admin.Moved) -> None:
    if args.json:
        print(json.dumps({verb: moved.messages, "left": moved.left}))
        return
    print(f"{verb} {moved.messages} messages")
    for i in moved.left:
        print(
            f"dropr {args.command}: left {i} alone: it cannot be read whole, or changed "
            "meanwhile (run dropr fsck, then again)",
            file=sys.stderr,
        )


def _requeue(args: argparse.Namespace) -> int:
    storage = open_storage(args)
    progress = Progress("requeueing")
    try:
        selection = _select(args, storage)
        count = len(selection)
        if not count:
            print("no failed messages match")
            return 0
        where = location(storage)
        question = f"requeue {count} failed messages ({_describe(selection)}) in {where}?"
        if not confirm(question, args.yes):
            print("nothing done")
            return 1
        moved = admin.requeue_failed(storage, selection, progress)
    finally:
        progress.finish()
        storage.close()
    _report(args, "requeued", moved)
    return 1 if moved.left else 0


def _purge(args: argparse.Namespace) -> int:
    storage = open_storage(args)
    progress = Progress("purging")
    try:
        if args.what == "failed":
            selection = _select(args, storage)
            count = len(selection)
            if not count:
                print("no failed messages match")
                return 0
            question = (
                f"delete {count} failed messages ({_describe(selection)}) from "
                f"{location(storage)} for good?"
            )
            if not confirm(question, args.yes):
                print("nothing done")
                return 1
            moved = admin.purge_failed(storage, selection, progress)
            _report(args, "purged", moved)
            return 1 if moved.left else 0
        if args.ids or args.channel or args.all:
            raise UsageProblem(f"purge {args.what} takes --older-than (and --to), not ids")
        older = 0.0 if args.older_than is None else args.older_than
        if args.what == "processed":
            # Only acked and failed messages go, which nobody can take any
            # more: nothing to ask.
            removed = admin.purge_processed(storage, older, args.to)
            text = {"purged_buckets": removed}
            print(json.dumps(text) if args.json else f"deleted {removed} finished buckets")
            return 0
        files = [q for q in admin.quarantined(storage) if q.time <= time.time() - older]
        if not files:
            print("nothing in quarantine matches")
            return 0
        question = f"delete {len(files)} quarantined files from {location(storage)} for good?"
        if not confirm(question, args.yes):
            print("nothing done")
            return 1
        gone = admin.purge_quarantine(storage, older)
        done = {"purged_files": len(gone)}
        print(json.dumps(done) if args.json else f"deleted {len(gone)} files")
        return 0
    finally:
        progress.finish()
        storage.close()


def _add_selection(p: argparse.ArgumentParser, what: str) -> None:
    """Where, which failed messages, and how: what requeue and purge share."""
    add_where(p)
    p.add_argument("ids", nargs="*", metavar="ID", help=f"{what} by id")
    p.add_argument("--channel", metavar="NAME", help=f"{what} of this channel")
    p.add_argument(
        "--to", metavar="QUEUE", help="only this queue: a destination (spool) or channel (store)"
    )
    p.add_argument(
        "--older-than",
        type=age,
        metavar="AGE",
        help="only what failed (or arrived) at least AGE ago: 90s, 15m, 2h, 7d",
    )
    p.add_argument("--all", action="store_true", help="every failed message")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")


def add_parsers(sub: Any) -> None:
    """Add requeue and purge to the ``dropr`` subparsers ``sub``."""
    p = sub.add_parser(
        "requeue",
        help="move failed messages back to their queue (by id, channel or all)",
        description=(
            "Move failed messages back to the end of their queue, keeping their id and "
            "priority (and, in a spool, their age). Asks first unless --yes."
        ),
    )
    _add_selection(p, "failed messages")
    p.set_defaults(run=_requeue)

    p = sub.add_parser(
        "purge",
        help="delete failed messages, finished buckets or quarantined files for good",
        description=(
            "failed: delete failed messages (by id, channel, age or all); processed: "
            "delete finished buckets (every message acked or failed) that takes left "
            "behind; quarantine: delete quarantined files. Asks first unless --yes."
        ),
    )
    p.add_argument("what", choices=("failed", "processed", "quarantine"), help="what to delete")
    _add_selection(p, "failed messages")
    p.set_defaults(run=_purge)
