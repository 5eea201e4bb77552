"""The ``dropr`` command: look at and repair spools and stores; put and take from scripts.

Each subcommand's work is in a module of its own: ``_cli_messages`` (list,
show, take, ack, fail), ``_cli_repair`` (requeue, purge) and ``_fsck``, over
the plain functions of :mod:`dropr.admin._admin`.  Stores are named by a
spec (see :mod:`dropr.storage._spec`); only ``fsck`` is for the file system
alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from dropr.admin import _admin as admin
from dropr.admin import _cli_messages as cli_messages
from dropr.admin import _cli_repair as cli_repair
from dropr.admin._common import STORE_HELP, UsageProblem, location, open_storage
from dropr.client._spool import Spool, default_spool_path
from dropr.errors import DroprError
from dropr.storage._spec import redact, spec_kind


def _status(args: argparse.Namespace) -> int:
    kind = "channel" if args.store else "destination"
    storage = open_storage(args)
    path = location(storage)
    try:
        stats = storage.stats()
        quarantined = len(admin.quarantined(storage))
    finally:
        storage.close()
    if args.json:
        print(json.dumps({name: asdict(s) for name, s in stats.items()}, indent=2))
        return 0
    if quarantined:
        print(f"{path}: {quarantined} files in quarantine (dropr purge quarantine --help)")
    if not stats:
        print(f"{path}: empty")
        return 0
    width = max(len(kind), *(len(n) for n in stats))
    print(f"{kind:<{width}}  {'depth':>9} {'bytes':>12} {'oldest s':>9} {'taken':>7} {'failed':>7}")
    for name, s in stats.items():
        print(
            f"{name:<{width}}  {s.depth:>9} {s.bytes:>12} {s.oldest_age:>9.1f} "
            f"{s.taken:>7} {s.failed:>7}"
        )
    return 0


def _put(args: argparse.Namespace) -> int:
    if args.file in (None, "-"):
        data = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as f:
            data = f.read()
    with Spool(args.spool) as spool:
        message_id = spool.put(data, args.to, args.channel, args.priority)
    print(message_id)
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from dropr.storage.files import _fsck as fsck

    kind = "store" if args.store else "spool"
    spec = args.store or args.spool or default_spool_path()
    if spec_kind(spec) != "files":
        raise UsageProblem(
            f"fsck checks file-system spools and stores only; {redact(spec)} is a "
            f"{spec_kind(spec)} store: use its own tools (sqlite3's PRAGMA integrity_check, "
            "PostgreSQL's amcheck)"
        )
    report = fsck.check(spec, kind, not args.no_repair)
    print(report.to_json() if args.json else report.text())
    return report.exit_code


def parser() -> argparse.ArgumentParser:
    """The command line, for ``dropr --help`` and the docs."""
    top = argparse.ArgumentParser(
        prog="dropr",
        description=(
            "Look at and repair dropr spools and stores; put and take messages from "
            "scripts. 'dropr COMMAND --help' tells more of each command."
        ),
        epilog=(
            "Exit status: 0 done; 1 done in part, or nothing found (the reasons on "
            "stderr); 2 a wrong command line, or an error (on stderr)."
        ),
    )
    sub = top.add_subparsers(dest="command", required=True)

    status = sub.add_parser(
        "status",
        help="queues of a spool or channels of a store",
        description=(
            "Per destination of a spool, or channel of a store: messages waiting or "
            "taken (depth), their payload bytes, the age of the oldest in seconds, how "
            "many are taken (under a lease) and how many failed."
        ),
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument("--spool", metavar="DIR", help="spool directory (default $DROPR_SPOOL)")
    where.add_argument("--store", metavar="SPEC", help=STORE_HELP)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_status)

    put = sub.add_parser(
        "put",
        help="put one message (from FILE or stdin) in a spool",
        description=(
            "Put one message in a spool, durably, and print its id; the dropr-client "
            "of that spool sends it to --to."
        ),
    )
    put.add_argument("file", nargs="?", metavar="FILE", help="payload file; - or nothing for stdin")
    put.add_argument("--to", required=True, metavar="URL", help="the server's base URL")
    put.add_argument("--channel", default="common", metavar="NAME", help="default common")
    put.add_argument(
        "--priority", type=int, default=5, metavar="N", help="0 (first) to 9 (default 5)"
    )
    put.add_argument("--spool", metavar="DIR", help="spool directory (default $DROPR_SPOOL)")
    put.set_defaults(run=_put)

    check = sub.add_parser(
        "fsck", help="check a spool or store; repair what is safe (exit 1: damage left)"
    )
    where = check.add_mutually_exclusive_group()
    where.add_argument("--spool", metavar="DIR", help="spool directory (default $DROPR_SPOOL)")
    where.add_argument("--store", metavar="DIR", help="store directory of a dropr-server")
    check.add_argument("--no-repair", action="store_true", help="only look; change nothing")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(run=_fsck)

    cli_messages.add_parsers(sub)
    cli_repair.add_parsers(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dropr`` console script."""
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (DroprError, OSError) as e:
        print(f"dropr {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
