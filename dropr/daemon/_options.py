"""Option values both daemons parse the same way: sizes and log formats.

Each tap's ``Options`` names these as the ``coerce`` of its parameters, so
``twistd dropr-client`` and ``twistd dropr-server`` accept the same spellings
without one tap importing the other.
"""

from __future__ import annotations

from twisted.python import usage

from dropr.daemon import logs

_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def size(text: str) -> int:
    """``"64M"`` → 67108864; plain digits are bytes (``K``, ``M``, ``G``, ``T``, ``KiB``…)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = _UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise usage.UsageError(f"not a size: {text!r} (use e.g. 1048576, 512K, 64M, 2G)") from None
    if value < 0:
        raise usage.UsageError(f"a size cannot be negative: {text!r}")
    return value


def log_format(text: str) -> str:
    """``text`` if it names a log format (``text`` or ``json``)."""
    if text not in logs.FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(logs.FORMATS)}")
    return text
