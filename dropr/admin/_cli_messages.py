"""``dropr list``, ``show``, ``take``, ``ack`` and ``fail``: messages by id."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from dropr._ids import is_valid_id
from dropr._message import validate_channel
from dropr.admin import _admin as admin
from dropr.admin._common import Progress, UsageProblem, add_where, encode_payload, open_storage


def _ids(args: argparse.Namespace) -> list[str]:
    """The ids given, with ``-`` read from stdin (one per line); checked."""
    ids: list[str] = []
    for i in args.ids:
        if i == "-":
            ids.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            ids.append(i)
    bad = [i for i in ids if not is_valid_id(i)]
    if bad:
        raise UsageProblem(f"not a message id: {bad[0]!r} (32 lowercase hex digits)")
    return ids


# -- list ---------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    states = args.state or list(admin.STATES)
    storage = open_storage(args)
    shown = 0
    more = False
    now = time.time()
    try:
        rows = admin.entries(storage, args.to, states, args.channel, now=now)
        out: list[admin.Entry] = []
        for entry in rows:
            if shown >= args.limit:
                more = True
                break
            shown += 1
            if args.json:
                print(json.dumps(entry.to_dict(now)))
            else:
                out.append(entry)
    finally:
        storage.close()
    if not args.json:
        _print_table(out, now)
    if more:
        print(f"(more than {args.limit} messages; raise --limit to see more)", file=sys.stderr)
    return 0


def _note(entry: admin.Entry, now: float) -> str:
    parts = []
    if entry.message.destination is not None:
        parts.append(entry.message.destination)
    if entry.state == admin.TAKEN and entry.lease_expires is not None:
        parts.append(f"lease {entry.lease_expires - now:.0f} s more")
    if entry.state == admin.FAILED:
        parts.append(entry.reason)
    return "  ".join(parts)


def _print_table(rows: list[admin.Entry], now: float) -> None:
    if not rows:
        print("no messages")
        return
    cw = max(7, *(len(e.message.channel) for e in rows))
    print(f"{'id':<32}  {'state':<7}  {'channel':<{cw}}  p {'age s':>9} {'bytes':>9}  note")
    for e in rows:
        m = e.message
        print(
            f"{m.id:<32}  {e.state:<7}  {m.channel:<{cw}}  {m.priority} "
            f"{max(0.0, now - m.created):>9.1f} {len(m.payload):>9}  {_note(e, now)}".rstrip()
        )


# -- show ---------------------------------------------------------------------------


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def _show(args: argparse.Namespace) -> int:
    ids = _ids(argparse.Namespace(ids=[args.id]))
    storage = open_storage(args)
    progress = Progress("searching queues")
    try:
        found = admin.find(storage, ids, progress=progress)
    finally:
        progress.finish()
        storage.close()
    entry = found.get(ids[0])
    if entry is None:
        print(f"dropr show: no message {ids[0]} (acked already, or never here)", file=sys.stderr)
        return 1
    payload = entry.message.payload
    if args.raw:
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
        return 0
    now = time.time()
    if args.json:
        data = entry.to_dict(now)
        data["payload"], data["payload_encoding"] = encode_payload(payload, False)
        print(json.dumps(data, indent=2))
        return 0
    d = entry.to_dict(now)
    lines = [
        ("id", d["id"]),
        ("state", d["state"]),
        ("channel", d["channel"]),
        ("priority", str(d["priority"])),
        ("created", f"{_when(d['created'])} ({d['age']:.1f} s ago)"),
        ("size", f"{d['size']} bytes"),
    ]
    if "destination" in d:
        lines.append(("destination", d["destination"]))
    if "lease_expires" in d:
        lines.append(("lease until", f"{_when(d['lease_expires'])} (receipt {d['receipt']})"))
    if entry.state == admin.FAILED:
        lines.append(("failed at", _when(d["failed_at"])))
        lines.append(("reason", d["reason"]))
    if d["path"]:
        lines.append(("file", d["path"]))
    for key, value in lines:
        print(f"{key + ':':<13}{value}")
    text, encoding = encode_payload(payload, True)
    printable = encoding == "utf-8" and all(c.isprintable() or c in "\n\t\r" for c in text)
    print()
    if printable:
        print(text)
    else:
        print("(binary payload, in base64; --raw writes the bytes)")
        print(encode_payload(payload, False)[0])
    return 0


# -- take, ack, fail ---------------------------------------------------------------


def _take(args: argparse.Namespace) -> int:
    validate_channel(args.channel)
    storage = open_storage(args, store_only=True)
    try:
        receipt = admin.owner(storage)
        taken = storage.take(args.channel, args.limit, args.lease)
        expires = time.time() + args.lease
        for m in taken:
            if args.ids:
                print(m.id)
                continue
            text, encoding = encode_payload(m.payload, args.raw)
            line: dict[str, Any] = {
                "id": m.id,
                "channel": m.channel,
                "priority": m.priority,
                "created": m.created,
                "payload": text,
                "payload_encoding": encoding,
                "receipt": receipt,
                "lease_expires": round(expires, 3),
            }
            print(json.dumps(line))
    finally:
        storage.close()
    return 0


def _settle(args: argparse.Namespace) -> int:
    ids = _ids(args)
    storage = open_storage(args, store_only=True)
    progress = Progress("searching taken messages")
    try:
        result = admin.settle(
            storage,
            ids,
            args.command,
            reason=getattr(args, "reason", "") or "",
            receipt=args.receipt,
            progress=progress,
        )
    finally:
        progress.finish()
        storage.close()
    verb = "acked" if args.command == "ack" else "failed"
    if args.json:
        print(json.dumps({verb: result.done, "refused": result.refused}, indent=2))
    else:
        for i, why in result.refused.items():
            print(f"dropr {args.command}: {i}: {why}", file=sys.stderr)
        if sys.stdout.isatty():
            print(f"{verb} {len(result.done)} of {len(ids)}")
    return 1 if result.refused else 0


def add_parsers(sub: Any) -> None:
    """Add list, show, take, ack and fail to the ``dropr`` subparsers ``sub``."""
    p = sub.add_parser(
        "list",
        help="list messages of a spool or store: waiting, taken, failed",
        description="List messages, queue by queue, each queue in delivery order.",
    )
    add_where(p)
    p.add_argument("--channel", metavar="NAME", help="only this channel")
    p.add_argument(
        "--to", metavar="QUEUE", help="only this queue: a destination (spool) or channel (store)"
    )
    p.add_argument(
        "--state",
        action="append",
        choices=admin.STATES,
        help="only messages in this state (repeatable; default all)",
    )
    p.add_argument(
        "--limit", type=int, default=100, metavar="N", help="show at most N (default 100)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(run=_list)

    p = sub.add_parser(
        "show",
        help="show one message, its state and its payload",
        description="Find a message by id (waiting, taken or failed) and show it.",
    )
    add_where(p)
    p.add_argument("id", help="the message id")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--raw", action="store_true", help="write only the payload's bytes")
    out.add_argument("--json", action="store_true", help="print JSON (payload in base64)")
    p.set_defaults(run=_show)

    p = sub.add_parser(
        "take",
        help="take messages of a channel with a lease; print them as JSON lines",
        description=(
            "Claim up to --limit messages of a channel in delivery order and print one "
            "JSON object per message: id, channel, priority, created, payload (base64, "
            "or UTF-8 text with --raw), payload_encoding, receipt and lease_expires "
            "(or, with --ids, only the ids). No one else gets them until the lease runs "
            "out; settle them with 'dropr ack' or 'dropr fail'. Prints nothing when the "
            "channel is empty."
        ),
    )
    add_where(p, store_only=True)
    p.add_argument("--channel", default="common", metavar="NAME", help="channel (default common)")
    p.add_argument("--limit", type=int, default=1, metavar="N", help="take at most N (default 1)")
    p.add_argument(
        "--lease",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long no one else gets them (default 60)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--raw", action="store_true", help="payload as UTF-8 text where it is (else base64)"
    )
    out.add_argument(
        "--ids", action="store_true", help="print only the ids, one per line (for shell loops)"
    )
    p.set_defaults(run=_take)

    for name, text in (
        ("ack", "mark taken messages processed, by id"),
        ("fail", "move taken messages to the failed area with a reason, by id"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=(
                f"{text[0].upper()}{text[1:]}. An id qualifies while it is taken (its "
                "lease may have run out, as long as no one took it since). Exit 1 if "
                "any id did not qualify; each is named on stderr."
            ),
        )
        add_where(p, store_only=True)
        p.add_argument("ids", nargs="+", metavar="ID", help="message ids; - reads them from stdin")
        p.add_argument(
            "--receipt",
            metavar="RECEIPT",
            help="the receipt 'dropr take' printed: only leases of that take",
        )
        if name == "fail":
            p.add_argument(
                "--reason", required=True, metavar="TEXT", help="why they cannot be processed"
            )
        p.add_argument("--json", action="store_true", help="print what was done as JSON")
        p.set_defaults(run=_settle)
