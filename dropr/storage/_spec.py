"""Stores named by a spec, the same everywhere: daemons, ``dropr.Store``, the ``dropr`` command.

A spec is one of:

* a directory path (or ``file:///path``): the file-system storage, the default;
* ``sqlite:///path/to/store.db`` (or a path ending ``.sqlite``, ``.sqlite3``
  or ``.db``): the SQLite storage;
* ``postgresql://…`` or ``postgres://…`` (a libpq URL; credentials in it, in a
  service file or in ``PGPASSFILE``): the PostgreSQL storage.

Only this module and the storage package know the concrete classes; the
rest of dropr asks for interfaces.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from dropr.errors import DroprError
from dropr.interfaces import ISpoolStorage, IStorage

_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


class BadStoreSpec(DroprError, ValueError):
    """A store spec that names no storage dropr knows."""


def spec_kind(spec: str) -> str:
    """``"files"``, ``"sqlite"`` or ``"postgresql"``: which storage ``spec`` names."""
    if not isinstance(spec, str) or not spec:
        raise BadStoreSpec(
            f"invalid store {spec!r}: give a directory, sqlite:///path or postgresql://…"
        )
    scheme = spec.split(":", 1)[0].lower() if "://" in spec else ""
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("", "file"):
        return "sqlite" if spec.endswith(_SQLITE_SUFFIXES) else "files"
    raise BadStoreSpec(
        f"unknown store scheme {scheme!r} in {redact(spec)}: give a directory, "
        "sqlite:///path or postgresql://…"
    )


def spec_path(spec: str) -> str:
    """The local path of a file-system or SQLite spec."""
    if "://" not in spec:
        return spec
    parts = urlsplit(spec)
    if parts.netloc not in ("", "localhost"):
        raise BadStoreSpec(
            f"{redact(spec)} names a host; a file or SQLite store is local: "
            "write sqlite:///absolute/path (three slashes)"
        )
    if not parts.path:
        raise BadStoreSpec(f"{redact(spec)} names no path")
    return unquote(parts.path)


def redact(spec: str) -> str:
    """``spec`` with any password replaced by ``***``: safe to log and show."""
    if "://" not in spec:
        return spec
    parts = urlsplit(spec)
    if parts.password is None:
        return spec
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def open_spool(path: str, **options: Any) -> ISpoolStorage:
    """The spool at ``path``: always a directory on this host's file system."""
    from dropr.storage.files._storage import FilesystemStorage

    return FilesystemStorage(path, **options)


def open_store(spec: str, **options: Any) -> IStorage:
    """Open the storage ``spec`` names, with ``options`` for its constructor."""
    kind = spec_kind(spec)
    if kind == "postgresql":
        from dropr.storage._postgres import PostgresStorage

        return PostgresStorage(spec, **options)
    if kind == "sqlite":
        from dropr.storage._sqlite import SQLiteStorage

        options.pop("sole_taker", None)
        return SQLiteStorage(spec_path(spec), **options)
    from dropr.storage.files._storage import FilesystemStorage

    return FilesystemStorage(spec_path(spec), **options)
