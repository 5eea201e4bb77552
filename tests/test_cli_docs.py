"""docs/cli.rst shows what ``dropr NAME --help`` prints, and its example runs.

Run this file (``python tests/test_cli_docs.py``) to rewrite the help
blocks of docs/cli.rst from the parser after changing an option.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI_RST = REPO / "docs" / "cli.rst"
EXAMPLE = REPO / "docs" / "examples" / "consume_shell.sh"
sys.path.insert(0, str(REPO))

from dropr._ids import new_ids  # noqa: E402
from dropr._message import Message  # noqa: E402
from dropr.admin import cli as cli  # noqa: E402
from dropr.storage.files._storage import FilesystemStorage  # noqa: E402

#: Documented by the page of its own author, not here.
ELSEWHERE = {"fsck"}


def subcommands() -> list[str]:
    [sub] = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def help_text(name: str) -> str:
    """What ``dropr NAME --help`` prints at 80 columns (argparse reads $COLUMNS)."""
    [sub] = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        return str(sub.choices[name].format_help()).rstrip("\n")
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def _block_re(name: str) -> re.Pattern[str]:
    # The indented block after "   $ dropr NAME --help", up to the next
    # line that is not indented (or the end).
    return re.compile(
        rf"(?m)^(   \$ dropr {name} --help\n)((?:   .*\n|\n(?=   ))*)",
    )


def documented_help(name: str) -> str | None:
    m = _block_re(name).search(CLI_RST.read_text(encoding="utf-8"))
    if m is None:
        return None
    return "\n".join(line[3:] for line in m.group(2).splitlines()).rstrip("\n")


def test_every_subcommand_is_on_the_page() -> None:
    lines = CLI_RST.read_text(encoding="utf-8").splitlines()
    titles = [
        set(re.findall(r"[a-z]+", title))
        for title, under in itertools.pairwise(lines)
        if title.startswith("dropr ") and under == "-" * len(title)
    ]
    for name in subcommands():
        assert any(name in t for t in titles), f"dropr {name} has no section in docs/cli.rst"


def test_help_blocks_match_the_parser() -> None:
    for name in subcommands():
        if name in ELSEWHERE:
            continue
        shown = documented_help(name)
        assert shown is not None, f"no '$ dropr {name} --help' block in docs/cli.rst"
        assert shown == help_text(name), (
            f"docs/cli.rst shows an old 'dropr {name} --help'; "
            "run python tests/test_cli_docs.py to rewrite it"
        )


@pytest.mark.slow
def test_the_shell_consumer_example(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = FilesystemStorage(str(store), dedup=True, exclusive=True)
    ids = new_ids(3)
    payloads = [b'{"order": 1}', b"not json", b'{"order": 3}']
    server.add("orders", [Message(i, p, "orders") for i, p in zip(ids, payloads, strict=True)])
    server.close()
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPR_")}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        ["sh", str(EXAMPLE), str(store), "orders", "python3", "-m", "json.tool"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["{", '"order":', "1", "}", "{", '"order":', "3", "}"]
    with FilesystemStorage(str(store)) as s:
        stats = s.stats()["orders"]
        assert (stats.depth, stats.failed) == (0, 1)
        [(failed, reason)] = s.failed("orders")
    assert failed.id == ids[1]
    assert reason == "python3 exited with status 1"


def rewrite() -> None:
    """Put the parser's help in every help block of docs/cli.rst."""
    text = CLI_RST.read_text(encoding="utf-8")
    for name in subcommands():
        if name in ELSEWHERE:
            continue
        block = "".join(("   " + line).rstrip() + "\n" for line in help_text(name).splitlines())
        text, n = _block_re(name).subn(lambda m, b=block: m.group(1) + b, text)
        if n != 1:
            print(f"no block for dropr {name}; add '   $ dropr {name} --help' first")
    CLI_RST.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    rewrite()
