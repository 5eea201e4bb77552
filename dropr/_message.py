"""The message model: what a message is and which values are acceptable."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from dropr._ids import id_time, is_valid_id
from dropr.errors import InvalidMessage, PayloadTooLarge

DEFAULT_CHANNEL = "common"
DEFAULT_PRIORITY = 5
MIN_PRIORITY = 0
MAX_PRIORITY = 9
#: Default largest payload, in bytes.  Spools and stores can be given another.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024

CHANNEL_MAX_LENGTH = 64
_CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DESTINATION_MAX_LENGTH = 160
_DESTINATION_RE = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+\Z")


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it is a valid channel name, else raise.

    A channel name is 1 to 64 characters from ``A-Z a-z 0-9 . _ -`` and
    starts with a letter or digit, so it can be used as a file name as is.
    """
    if not isinstance(channel, str) or not _CHANNEL_RE.match(channel):
        raise InvalidMessage(
            f"invalid channel name {channel!r}: use 1 to {CHANNEL_MAX_LENGTH} "
            "characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return channel


def validate_priority(priority: object) -> int:
    """Return ``priority`` if it is an int from 0 (first) to 9 (last)."""
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise InvalidMessage(
            f"invalid priority {priority!r}: use an integer from "
            f"{MIN_PRIORITY} (delivered first) to {MAX_PRIORITY} (last)"
        )
    return priority


def validate_destination(destination: object) -> str:
    """Return ``destination`` if it is an acceptable server base URL.

    A destination is the ``http://`` or ``https://`` URL of a dropr-server,
    at most 160 characters of printable ASCII.
    """
    if (
        not isinstance(destination, str)
        or len(destination) > DESTINATION_MAX_LENGTH
        or not _DESTINATION_RE.match(destination)
    ):
        raise InvalidMessage(
            f"invalid destination {destination!r}: give the base URL of a "
            "dropr-server, e.g. 'http://host:8080/' (http or https, at most "
            f"{DESTINATION_MAX_LENGTH} printable ASCII characters)"
        )
    return destination


def coerce_payload(payload: object, max_size: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Return ``payload`` as bytes (``str`` is encoded as UTF-8), or raise."""
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
    else:
        raise InvalidMessage(
            f"payload must be bytes or str, not {type(payload).__name__}: "
            "serialise your data (e.g. json.dumps) before putting it"
        )
    if len(data) > max_size:
        raise PayloadTooLarge(
            f"payload of {len(data)} bytes is larger than the maximum of "
            f"{max_size} bytes: split it, or raise the spool's max_payload"
        )
    return data


def validate_messages(messages: Sequence[Message], max_payload: int) -> None:
    """``Message.validate`` for many messages, each distinct name checked once."""
    names: set[str] = set()
    for m in messages:
        if (
            m.priority.__class__ is not int
            or not MIN_PRIORITY <= m.priority <= MAX_PRIORITY
            or m.payload.__class__ is not bytes
            or len(m.payload) > max_payload
            or not is_valid_id(m.id)
            or (m.channel not in names and not _CHANNEL_RE.match(m.channel))
            or (
                m.destination is not None
                and m.destination not in names
                and not _DESTINATION_RE.match(m.destination)
            )
        ):
            m.validate(max_payload)  # raises with the precise reason
            raise InvalidMessage(f"invalid message {m!r}")
        names.add(m.channel)
        if m.destination is not None:
            if len(m.destination) > DESTINATION_MAX_LENGTH:
                validate_destination(m.destination)
            names.add(m.destination)


@dataclass(frozen=True, slots=True)
class Message:
    """One message: an opaque payload with its id, channel and priority.

    ``destination`` is set on the sending side (the spool), where it names
    the server the message goes to.  ``receipt`` is how the storage that
    handed the message out finds it again for ``ack``, ``release`` and
    ``fail``; it is not part of the message's value.
    """

    id: str
    payload: bytes
    channel: str = DEFAULT_CHANNEL
    priority: int = DEFAULT_PRIORITY
    destination: str | None = None
    receipt: object = field(default=None, compare=False, repr=False)

    @property
    def created(self) -> float:
        """When the message was put, in seconds since the epoch."""
        return id_time(self.id)

    def validate(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        """Raise :class:`InvalidMessage` unless every field is acceptable."""
        if not is_valid_id(self.id):
            raise InvalidMessage(f"invalid message id {self.id!r}: 32 lowercase hex digits")
        validate_channel(self.channel)
        validate_priority(self.priority)
        if self.destination is not None:
            validate_destination(self.destination)
        if not isinstance(self.payload, bytes):
            raise InvalidMessage("payload must be bytes")
        if len(self.payload) > max_payload:
            raise PayloadTooLarge(
                f"payload of {len(self.payload)} bytes is larger than the "
                f"maximum of {max_payload} bytes"
            )


_new_object = object.__new__
_set_id = Message.__dict__["id"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_channel = Message.__dict__["channel"].__set__
_set_priority = Message.__dict__["priority"].__set__
_set_destination = Message.__dict__["destination"].__set__
_set_receipt = Message.__dict__["receipt"].__set__

#: The slot setters of a ``Message``, in field order, for loops that make many.
SETTERS = (_set_id, _set_payload, _set_channel, _set_priority, _set_destination, _set_receipt)


def make_message(
    message_id: str,
    payload: bytes,
    channel: str,
    priority: int,
    destination: str | None,
    receipt: object,
) -> Message:
    """A ``Message`` of fields already checked, without the dataclass ``__init__``.

    For codecs that build thousands per batch: the frozen dataclass's
    ``__init__`` goes through ``object.__setattr__`` field by field and
    costs about twice as much.  The object is the same in every way.
    """
    m = _new_object(Message)
    _set_id(m, message_id)
    _set_payload(m, payload)
    _set_channel(m, channel)
    _set_priority(m, priority)
    _set_destination(m, destination)
    _set_receipt(m, receipt)
    return m
