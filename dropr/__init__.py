"""dropr: a store-and-forward message queue on the file system.

Producers::

    import dropr
    dropr.put(b"hello", "http://central:8080/", channel="orders", priority=3)

Consumers, on the receiving host::

    store = dropr.Store("/var/lib/dropr/store")
    for message in store.take("orders", limit=100):
        handle(message.payload)
    store.ack(messages)
"""

from dropr._message import Message
from dropr._store import Store
from dropr.client._spool import Spool, put, put_deferred, put_many
from dropr.errors import (
    DroprError,
    InvalidMessage,
    PayloadTooLarge,
    StorageFull,
    StorageIOError,
    StorageLocked,
    UnknownMessage,
)

__version__ = "0.1.0"

__all__ = [
    "DroprError",
    "InvalidMessage",
    "Message",
    "PayloadTooLarge",
    "Spool",
    "StorageFull",
    "StorageIOError",
    "StorageLocked",
    "Store",
    "UnknownMessage",
    "__version__",
    "put",
    "put_deferred",
    "put_many",
]
