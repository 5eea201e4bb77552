"""``/stats`` and ``/metrics`` cost what they show: the channels listed, not the store.

A file store of many channels is read through a disk that notes every
path it is asked about; the figures must come from the directories of the
channels shown alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dropr._ids import new_id
from dropr._message import Message
from dropr.monitoring._metrics import MAX_LABELS, ServerMetrics, StatsReader
from dropr.server._stats import CappedStats
from dropr.storage.files._disk import Disk
from dropr.storage.files._layout import decode_queue, encode_queue
from dropr.storage.files._storage import FilesystemStorage

CHANNELS = 3000


class ReadNotingDisk(Disk):
    """The real disk, noting each queue directory a read looks into."""

    def __init__(self, queues_dir: str) -> None:
        self.queues_dir = queues_dir.rstrip(os.sep) + os.sep
        self.queues_read: set[str] = set()

    def _note(self, path: str) -> None:
        if path.startswith(self.queues_dir):
            name = decode_queue(path[len(self.queues_dir) :].split(os.sep)[0])
            if name is not None:
                self.queues_read.add(name)

    def listdir(self, path: str) -> list[str]:
        self._note(path)
        return super().listdir(path)

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        self._note(path)
        return super().read(path, offset, size)

    def isdir(self, path: str) -> bool:
        self._note(path)
        return super().isdir(path)

    def exists(self, path: str) -> bool:
        self._note(path)
        return super().exists(path)

    def stat(self, path: str) -> os.stat_result:
        self._note(path)
        return super().stat(path)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A store of ``CHANNELS`` channels, built once for the module: its path and names."""
    path = tmp_path_factory.mktemp("many") / "store"
    return path, _store_of_many_channels(path)


def _store_of_many_channels(path: Path) -> list[str]:
    """A file store with one message in each of ``CHANNELS`` channels.

    One channel is stored; the others are copies of its directory (the
    figures read only names, state logs and batch heads), which is quicker
    by far than storing each.
    """
    names = [f"ch{i:05d}" for i in range(CHANNELS)]
    store = FilesystemStorage(str(path))
    try:
        store.add(names[0], [Message(new_id(), b"x" * 7, names[0])])
    finally:
        store.close()
    queues = path / "queues"
    for name in names[1:]:
        shutil.copytree(queues / encode_queue(names[0]), queues / encode_queue(name))
    return names


def _read_shown_twice(reader: StatsReader, disk: Callable[[], ReadNotingDisk]) -> None:
    """Open the store and take the first reading, then forget what it read.

    Opening counts the running usage figures once (a walk of every
    channel, as any opening of the store does); the readings that follow
    are what the cost bound is about.
    """
    reader()
    disk().queues_read.clear()


def test_stats_read_only_the_channels_shown(many: tuple[Path, list[str]]) -> None:
    path, names = many
    disks: list[ReadNotingDisk] = []

    def opener(spec: str) -> FilesystemStorage:
        disks.append(ReadNotingDisk(os.path.join(spec, "queues")))
        return FilesystemStorage(spec, disk=disks[0])

    reader = StatsReader(str(path), opener=opener)
    try:
        _read_shown_twice(reader, lambda: disks[0])
        data = CappedStats(ServerMetrics(reader)).stats_json()
        shown = names[:MAX_LABELS]
        assert data["channels_total"] == CHANNELS
        assert data["channels_shown"] == MAX_LABELS
        assert list(data["channels"]) == shown  # the first by name
        assert all(c["depth"] == 1 and c["bytes"] == 7 for c in data["channels"].values())
        assert data["usage"] == {"messages": CHANNELS, "bytes": 7 * CHANNELS}
        # The figures came from the shown channels' directories alone.
        assert disks[0].queues_read == set(shown)
    finally:
        reader.close()


def test_metrics_read_only_the_channels_they_label(many: tuple[Path, list[str]]) -> None:
    path, names = many
    disk = ReadNotingDisk(str(path / "queues"))
    reader = StatsReader(str(path), opener=lambda s: FilesystemStorage(s, disk=disk))
    try:
        _read_shown_twice(reader, lambda: disk)
        text = ServerMetrics(reader).render_metrics().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        labels = {s.labels["channel"] for s in families["dropr_store_depth"].samples}
        assert labels == set(names[:MAX_LABELS])
        assert families["dropr_store_queues"].samples[0].value == CHANNELS
        assert disk.queues_read == set(names[:MAX_LABELS])
    finally:
        reader.close()
