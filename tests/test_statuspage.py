"""The status page of a real dropr-server, as headless Chromium draws it.

The page is plain HTML whose JavaScript fetches ``/stats`` and fills in the
channels, the chart and the recent errors; ``chromium --dump-dom`` prints
the document once that script ran, and the test reads it.  Chromium is
Debian's ``chromium`` package (``make test`` installs it when it runs as
root); without it this test fails and says so, unless
``DROPR_NO_BROWSER=1`` is set to leave it out on purpose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

import dropr
from dropr._ids import new_ids
from dropr._message import Message
from dropr.testing import ServerProcess
from dropr.wire import CONTENT_TYPE, encode_batch

# A real dropr-server, and the page in headless Chromium.
pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=3000",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("DROPR_NO_BROWSER") == "1":
        pytest.skip("DROPR_NO_BROWSER=1: the browser test is left out on purpose")
    pytest.fail(
        "no chromium to load the status page with: apt-get install chromium "
        "(make test does it when run as root), or set DROPR_NO_BROWSER=1 to leave this out"
    )


def dump_dom(url: str) -> str:
    """The document at ``url`` after its scripts ran, as Chromium serialises it."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Cells(HTMLParser):
    """Table rows of the document: ``{table id: [{cell class: text}]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.polylines: list[dict[str, str | None]] = []
        self.texts: dict[str, str] = {}
        self._table = ""
        self._row: dict[str, str] | None = None
        self._cell: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split(" ")[0] or "td"
            self._row[self._cell] = ""
        elif tag == "polyline":
            self.polylines.append(a)
        if a.get("id"):
            self._id = a["id"]
            self.texts.setdefault(self._id, "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data
        if self._id is not None:
            self.texts[self._id] += data


def post(url: str, body: bytes, content_type: str = CONTENT_TYPE) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--max-request", "64K"]
    ).start_and_wait()
    yield s
    s.stop()


def test_the_status_page_shows_channels_depths_rates_and_errors(server: ServerProcess) -> None:
    orders = [Message(i, b"order", "orders") for i in new_ids(7)]
    mail = [Message(i, b"mail", "mail-out") for i in new_ids(2)]
    assert post(server.url, encode_batch(orders + mail)) == 200
    assert post(server.url, encode_batch(orders[:3])) == 200  # duplicates
    assert post(server.url, b"x" * 70_000) == 413
    assert post(server.url + "?channel=<script>alert(1)</script>", b"x", "text/plain") == 400
    with dropr.Store(server.store) as store:
        store.take("orders", 2)  # taken, still in the depth
        store.fail(store.take("mail-out", 1), "bounced")

    dom = dump_dom(server.url + "status")
    page = Cells()
    page.feed(dom)
    channels = {row["channel"]: row for row in page.tables["channels"]}
    assert set(channels) == {"orders", "mail-out"}
    assert (channels["orders"]["depth"], channels["orders"]["taken"]) == ("7", "2")
    assert (channels["mail-out"]["depth"], channels["mail-out"]["failed"]) == ("1", "1")
    assert channels["orders"]["bytes"] == "35 B"
    assert "12 received, 9 stored, 3 duplicates" in page.texts["summary"]
    # The chart: one line per series, the newest slot holding what just came.
    series = {p["data-series"]: p["points"] for p in page.polylines}
    assert set(series) == {"received", "stored", "duplicates", "rejected", "refused"}
    assert all(len((pts or "").split()) == 60 for pts in series.values())
    assert "stored (9)" in page.texts["legend"] and "refused (2)" in page.texts["legend"]
    # Recent errors, newest first; text stays text (no markup from the network).
    errors = page.tables["errors"]
    assert [e["status"] for e in errors] == ["400", "413"]
    assert "invalid channel name '<script>alert(1)</script>'" in errors[0]["reason"]
    assert "<script>alert" not in dom.replace("&lt;script&gt;", "")
    assert errors[1]["peer"] == "127.0.0.1"
    assert "larger than this server's limit" in errors[1]["reason"]


def test_the_status_page_is_plain_files(server: ServerProcess) -> None:
    with urllib.request.urlopen(server.url + "status", timeout=10) as r:
        html = r.read().decode()
        assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="status.js"></script>' in html
    with urllib.request.urlopen(server.url + "status.js", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/javascript")
        js = r.read().decode()
    # Network text goes in with textContent only.
    assert "innerHTML" not in js and "textContent" in js
    with urllib.request.urlopen(server.url + "stats", timeout=10) as r:
        stats = json.loads(r.read())
    assert stats["service"] == "dropr-server" and stats["channels"] == {}
    assert re.fullmatch(r"[0-9.]+", str(stats["uptime"]))
