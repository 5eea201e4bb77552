"""dropr: a store-and-forward message queue on the file system.

Producers::

    import dropr
    dropr.put(b"hello", "http://central:8080/", channel="orders", priority=3)

Consumers, on the receiving host (the store is named as dropr-server's
``--store``: a directory, ``sqlite:///path`` or ``postgresql://...``)::

    store = dropr.Store("/var/lib/dropr/store")
    messages = store.take("orders", limit=100)
    for message in messages:
        handle(message.payload)
    store.ack(messages)

Everything dropr raises on purpose is a :class:`DroprError`.  Tests of code
that uses dropr find fakes in :mod:`dropr.testing`.
"""

from dropr._message import Message
from dropr._store import Store
from dropr.client._spool import Spool, put, put_deferred, put_many
from dropr.errors import (
    DroprError,
    InvalidMessage,
    PayloadTooLarge,
    StorageClosed,
    StorageFull,
    StorageIOError,
    StorageLocked,
    UnknownMessage,
    UnsupportedByStore,
)

#: The one place the version is set; setup.py reads it from here.
__version__ = "0.1.0"

__all__ = [
    "DroprError",
    "InvalidMessage",
    "Message",
    "PayloadTooLarge",
    "Spool",
    "StorageClosed",
    "StorageFull",
    "StorageIOError",
    "StorageLocked",
    "Store",
    "UnknownMessage",
    "UnsupportedByStore",
    "__version__",
    "put",
    "put_deferred",
    "put_many",
]
