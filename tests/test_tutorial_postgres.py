"""The tutorial's PostgreSQL section, followed verbatim on a cluster of the test's own.

Every console block of docs/tutorial.rst captioned "PostgreSQL terminal N"
is typed into shell N, in order, and what each command prints must match
the page (ids, times and figures aside), as ``test_tutorial`` does for the
rest of the page.  Only these change: ``.venv/bin/`` is this interpreter's,
``/tmp/dropr-*`` lives in ``tmp_path``, port 5432 and the password
``secret`` are the throwaway cluster's, and ports 8081 and 8082 are free
ones.  The cluster listens on 127.0.0.1 and on 127.0.0.3, the consumer's
"other host".
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from pgcluster import PASSWORD, PgCluster, find_bindir
from test_tutorial import TUTORIAL, Terminal, console_blocks, pattern, squeeze, stop_leftovers

from dropr.testing import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_bindir() is None, reason="PostgreSQL missing: apt-get install postgresql"
    ),
]

#: Commands whose output depends on a daemon's progress: tried again for a while.
EVENTUALLY = ("curl ", ".venv/bin/dropr status")


def test_the_postgresql_section_verbatim(tmp_path: Path) -> None:
    bindir = find_bindir()
    assert bindir is not None
    cluster = PgCluster(bindir, hosts=("127.0.0.1", "127.0.0.3"))
    ports = {"8081": str(free_port()), "8082": str(free_port())}

    def local(text: str) -> str:
        text = text.replace(".venv/bin/", os.path.dirname(sys.executable) + "/")
        text = text.replace("/tmp/dropr-", str(tmp_path) + "/dropr-")
        text = text.replace(":5432", f":{cluster.port}").replace(":secret'", f":{PASSWORD}'")
        for page, real in ports.items():
            text = text.replace(page, real)
        return text

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DROPR_", "PG"))}
    terminals = {"1": Terminal(env), "2": Terminal(env)}
    ran = 0
    try:
        for caption, commands in console_blocks(TUTORIAL.read_text(encoding="utf-8")):
            m = re.match(r"PostgreSQL terminal (\d)", caption)
            if m is None:
                continue
            terminal = terminals[m.group(1)]
            for command, expected_lines in commands:
                want = pattern(squeeze(local("\n".join(expected_lines))))
                deadline = time.monotonic() + (30 if command.startswith(EVENTUALLY) else 0)
                while True:
                    status, output = terminal.run(local(command))
                    if status == 0 and want.fullmatch(squeeze(output)):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{command}\nexit status {status}; printed:\n{output}\n"
                            f"the tutorial shows:\n{squeeze(local(chr(10).join(expected_lines)))}"
                        )
                    time.sleep(0.2)
                ran += 1
    finally:
        for t in terminals.values():
            t.close()
        stop_leftovers(tmp_path)
        cluster.destroy()
    assert ran >= 12
    for name in ("pg1", "pg2"):
        log = (tmp_path / f"dropr-{name}.log").read_text()
        assert "dropr-server stopped" in log, log[-2000:]
        assert PASSWORD not in log
