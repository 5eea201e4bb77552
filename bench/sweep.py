"""The failure sweep, long mode: every scenario, plus random ones, every operation.

Runs the sweep of ``tests/sweep_harness.py``: each scenario once to count
its disk operations, then once per operation with ENOSPC, with EIO and with
a crash there (and EIO at every read), checking the promises after each.
The fixed scenarios are those of the CI run; ``--seeds N`` adds N random
scenarios (twelve random calls each: adds of mixed priorities and channels,
takes, acks, releases, fails, upkeep, reopens; one or two consumers).

Prints the JSON result (scenarios with their operation counts, runs,
failures found) to stdout; exit status 1 when any failure was found.

Usage::

    python bench/sweep.py [--seeds 20] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from _common import log, machine

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
import sweep_harness  # noqa: E402  (the harness lives with the tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="random scenarios to add")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--dir", default=None, help="scratch directory")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="dropr-sweep-", dir=args.dir)
    specs = list(sweep_harness.SCENARIOS) + [
        sweep_harness.random_scenario(seed)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    started = time.monotonic()
    result: dict[str, object] = {"machine": machine(base), "scenarios": {}, "runs": 0}
    failures: list[object] = []
    for spec in specs:
        figures = sweep_harness.sweep([spec], base=base)
        result["scenarios"][spec.name] = figures["scenarios"][spec.name]  # type: ignore[index]
        result["runs"] = int(result["runs"]) + int(figures["runs"])  # type: ignore[call-overload]
        failures.extend(figures["failures"])
        log(f"{spec.name}: {figures['scenarios'][spec.name]}, {len(figures['failures'])} failures")
    scenarios = result["scenarios"]
    assert isinstance(scenarios, dict)
    result["effects"] = sum(v["effects"] for v in scenarios.values())
    result["reads"] = sum(v["reads"] for v in scenarios.values())
    result["failures"] = failures
    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
