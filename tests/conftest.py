"""Shared fixtures."""

from __future__ import annotations

# A throwaway PostgreSQL cluster (fixture ``pg_cluster``) for the PostgreSQL store's tests.
pytest_plugins = ["pgcluster"]
