"""Storages: where messages wait (private; use dropr.Spool and dropr.Store).

Outside this package, code opens a storage by spec
(:func:`dropr.storage._spec.open_store`) and asks for interfaces; the
spool, which is always a directory, names :class:`FilesystemStorage` here.
"""

from dropr.storage.files._storage import FilesystemStorage

__all__ = ["FilesystemStorage"]
