"""One error tree: every exception dropr defines derives from DroprError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import dropr
from dropr.errors import DroprError, StorageClosed, StoreNotFound
from dropr.testing import MemoryStorage


def _modules() -> list[str]:
    names = ["dropr"]
    names.extend(info.name for info in pkgutil.walk_packages(dropr.__path__, "dropr."))
    return names


def test_every_exception_dropr_defines_is_a_dropr_error() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not issubclass(value, DroprError)
            ):
                strays.append(f"{name}.{attr}")
    assert strays == []


def test_a_closed_storage_says_so_and_is_still_a_value_error() -> None:
    storage = MemoryStorage()
    storage.close()
    with pytest.raises(StorageClosed, match="closed"):
        storage.take("orders", 1)
    assert issubclass(StorageClosed, ValueError)


def test_a_store_spec_naming_nothing_is_not_made(tmp_path: object) -> None:
    with pytest.raises(StoreNotFound, match="no store at"):
        dropr.Store(f"{tmp_path}/nowhere")
    with pytest.raises(FileNotFoundError):
        dropr.Store(f"sqlite://{tmp_path}/nowhere.db")
