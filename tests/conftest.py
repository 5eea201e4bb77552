"""Shared fixtures."""

from __future__ import annotations

import importlib.util

import pytest

# Run outside the project's environment, every module would fail to import
# one by one; say once what to do instead.
_NEEDED = ("twisted.internet", "treq", "pytest_twisted", "psycopg", "dropr")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


# (twisted.internet, not twisted: the repo's twisted/plugins directory alone
# makes "twisted" importable.)
_missing = [name for name in _NEEDED if not _importable(name)]
if _missing:
    pytest.exit(
        f"the tests need {', '.join(_missing)}, which this Python cannot import: "
        "run `make test` (it installs dropr and its test dependencies into .venv), "
        "or `make install` and then `.venv/bin/python -m pytest`",
        returncode=4,
    )

# A throwaway PostgreSQL cluster (fixture ``pg_cluster``) for the PostgreSQL store's tests.
pytest_plugins = ["pgcluster"]
