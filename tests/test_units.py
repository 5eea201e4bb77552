"""The shipped systemd units start what they say, with options the daemons accept."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from dropr.client import tap as client_tap
from dropr.server import tap as server_tap
from dropr.server._fds import DEFAULT_CONNECTIONS, plan_connections

UNITS = Path(__file__).parent.parent / "contrib" / "systemd"


def _service(unit: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((UNITS / unit).read_text().replace("\\\n", " "))
    return parser["Service"]


def _exec_start(unit: str) -> list[str]:
    assert _service(unit)["Restart"] == "always"
    return shlex.split(_service(unit)["ExecStart"])


@pytest.mark.parametrize(
    ("unit", "plugin", "options"),
    [
        ("dropr-server.service", "dropr-server", server_tap.Options),
        ("dropr-client.service", "dropr-client", client_tap.Options),
    ],
)
def test_unit_runs_twistd_in_foreground_with_valid_options(
    unit: str, plugin: str, options: type
) -> None:
    argv = _exec_start(unit)
    assert argv[0].endswith("twistd")
    assert "-n" in argv  # systemd supervises a foreground process
    rest = argv[argv.index(plugin) + 1 :]
    parsed = options()
    parsed.parseOptions(rest)  # raises UsageError on a bad option
    assert parsed["store" if plugin == "dropr-server" else "spool"].startswith("/var/")


def test_the_server_unit_gives_descriptors_for_its_connections() -> None:
    """LimitNOFILE carries the default --max-connections (the server checks at start)."""
    limit = int(_service("dropr-server.service")["LimitNOFILE"])
    argv = _exec_start("dropr-server.service")
    options = server_tap.Options()
    options.parseOptions(argv[argv.index("dropr-server") + 1 :])
    assert plan_connections(options["max-connections"], descriptors=limit) == DEFAULT_CONNECTIONS
