"""Memory given back to the system after large requests (glibc's allocator).

A large batch is parsed into many payloads of a megabyte or so, in one of
the disk threads.  glibc raises its threshold for serving allocations from
fresh mappings after the first such payload is freed, and keeps freed
memory in per-thread arenas; so each disk thread would keep the high-water
mark of the largest batch it parsed.  Fixing the threshold makes large
payloads separate mappings, given back when freed; a trim after a large
request returns what the arenas still hold.  Elsewhere (not glibc) both
do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

#: mallopt(3) parameter: allocations of at least this many bytes are mapped.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
#: Requests this large are followed by a trim.
TRIM_AFTER = 4 * 1024 * 1024


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def fix_mmap_threshold() -> bool:
    """Serve allocations of 128 KiB and more from their own mappings, for good."""
    return bool(_LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Give memory the allocator holds free back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
