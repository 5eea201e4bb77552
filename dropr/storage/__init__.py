"""Storages: where messages wait (private; use dropr.Spool and dropr.Store)."""
