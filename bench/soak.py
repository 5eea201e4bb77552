"""The long fault-injection soak: the CI chaos run, for as long as you like.

Runs the harness of ``tests/chaos_harness.py`` (real ``twistd`` daemons,
producers, a consumer; kill -9 of each, a misbehaving proxy, planted damage,
disk full on spool and store, restarts on a big store) in cycles for
``--minutes``, then drains everything, runs ``dropr fsck`` on spool and
store and checks every message whose put returned with
:func:`dropr.verify.verify`.  Each cycle is a minute of kills (about one
of each daemon every four seconds) and proxy faults, then one of: spool
full, store full, or a server restart with thousands of waiting messages.

Disk full uses a small tmpfs mounted for the run (``mount -t tmpfs``, so
root is needed) and falls back to the storages' own limits otherwise; the
result says which ran.  Everything it mounts is unmounted at the end.

Exit status 0 when nothing was lost, duplicated or damaged and nothing
misbehaved; 1 otherwise.  Progress goes to stderr, the JSON result to
stdout (and to ``--out``).

Usage::

    python bench/soak.py --minutes 30 [--seed N] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile

from _common import emit, log, machine

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
import chaos_harness  # noqa: E402  (the harness lives with the tests)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    p.add_argument("--seed", type=int, help="replay a run (default: random, printed)")
    p.add_argument("--producers", type=int, default=3, help="producer processes (default 3)")
    p.add_argument("--rate", type=float, default=120.0, help="messages/s, all producers")
    p.add_argument("--big-store", type=int, default=5000, help="waiting at a big restart")
    p.add_argument("--no-tmpfs", action="store_true", help="disk full by storage limits only")
    p.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    workdir = args.dir or tempfile.mkdtemp(prefix="dropr-soak-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    config = chaos_harness.Config(
        minutes=args.minutes,
        producers=args.producers,
        rate=args.rate,
        big_store=args.big_store,
        tmpfs=False if args.no_tmpfs else None,
        seed=seed,
    )
    log(f"soak for {args.minutes:g} min, seed {seed}, in {workdir}")
    outcome = chaos_harness.run(workdir, config, say=log)
    result = {
        "benchmark": "soak",
        "minutes": args.minutes,
        "seed": seed,
        "machine": machine(workdir),
        **outcome.to_dict(),
    }
    emit(result, args.out)
    for line in outcome.summary().splitlines():
        log(line)
    ok = outcome.report.ok and not outcome.findings
    if args.keep or not ok:
        log(f"logs kept in {workdir}/logs")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
