"""A long fuzz run of the parser and the storage names, on demand.

    python bench/fuzz.py                      # 20,000 examples per property
    DROPR_FUZZ_EXAMPLES=200000 python bench/fuzz.py
    python bench/fuzz.py -k arbitrary_bytes   # one property (pytest's -k)

Runs the properties of tests/test_fuzz.py (which every test run runs with
300 examples) with many more examples; arguments are passed to pytest.
Hypothesis keeps what it found in .hypothesis/, so a failure is replayed
first next time, in the short run too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    os.environ.setdefault("DROPR_FUZZ_EXAMPLES", "20000")
    print(f"fuzzing with {os.environ['DROPR_FUZZ_EXAMPLES']} examples per property")
    args = [str(REPO / "tests" / "test_fuzz.py"), "-q", "--hypothesis-show-statistics", *argv]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
