"""Client authentication: an identity and a shared secret per client (HMAC-SHA256).

A dropr-client signs every request with the secret it shares with the
server; the server recomputes the signature and refuses (401) what does
not match.  Four headers carry it::

    X-Dropr-Client:          <identity>
    X-Dropr-Timestamp:       <seconds since the epoch: digits, no leading zero>
    X-Dropr-Content-SHA256:  <hex SHA-256 of the request body, lowercase>
    X-Dropr-Signature:       <hex HMAC-SHA256 of the string below, lowercase>

The string signed is these seven lines joined by ``\\n`` (no newline at
the end)::

    dropr-hmac-v2
    <identity>
    <timestamp>
    <method, e.g. POST>
    <query string as sent, without the "?" (often empty)>
    <media type of Content-Type, lowercase, without parameters>
    <hex SHA-256 of the request body>

Everything the server needs to check the signature is in the headers, so
it is checked before a byte of the body is read: a request that is not
signed by a known client is refused at once and its body never reaches the
disk.  The body is then held to the signed hash as it arrives, and a
request whose body does not match is refused (401) before anything is
stored.  The path is left out so that a proxy may mount the server under a
prefix; everything that decides what is stored (body, query, content type)
is in.  See docs/security.rst for why HMAC and not client certificates, and
for the threat model.

The files holding secrets must not be readable by anyone but their owner:
:func:`check_private_file` refuses them otherwise, and
:func:`check_not_world_writable` refuses a spool or store anyone may write to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.web.http_headers import Headers

from dropr.errors import DroprError

SCHEME = "dropr-hmac-v2"
CLIENT_HEADER = "X-Dropr-Client"
TIMESTAMP_HEADER = "X-Dropr-Timestamp"
CONTENT_SHA256_HEADER = "X-Dropr-Content-SHA256"
SIGNATURE_HEADER = "X-Dropr-Signature"
#: A request's timestamp may be this far from the server's clock (seconds).
MAX_SKEW = 300.0
#: Fewest characters of a secret; ``openssl rand -hex 32`` makes 64.
MIN_SECRET_LENGTH = 16
#: What every refused request is told, whatever was wrong with it: a
#: prober learns nothing (which identities exist, whether its clock is
#: right) from the answer.  The server's log says what was wrong.
NOT_AUTHENTICATED = (
    "request not authenticated: sign it as a client this server knows, with "
    "its secret and the current time (see docs/security)"
)

_IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_SECRET_RE = re.compile(r"[\x21-\x7e]+\Z")
#: One canonical form: no sign, no leading zero, no padding.
_TIMESTAMP_RE = re.compile(r"(?:0|[1-9][0-9]{0,11})\Z")
_HEX256_RE = re.compile(r"[0-9a-f]{64}\Z")


class AuthError(DroprError):
    """A request that is not authenticated: answered 401, nothing stored.

    Its text says what was wrong, for the server's log; the client is only
    ever told :data:`NOT_AUTHENTICATED`.
    """


class CredentialsError(DroprError):
    """A credentials file that cannot be used; the daemon does not start."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A client's identity and the secret it shares with its servers."""

    identity: str
    secret: bytes

    def __repr__(self) -> str:  # never print a secret into a log
        return f"Credentials(identity={self.identity!r}, secret=<hidden>)"


def check_private_file(path: str, what: str = "credentials file") -> None:
    """Raise :class:`CredentialsError` unless ``path`` is a regular file only its owner can read.

    A secret that other users can read is no secret: the daemon refuses to
    start rather than run with it.  Symbolic links are followed (a file
    kept in a secrets directory and linked is common); the mode checked is
    the target's.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CredentialsError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialsError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CredentialsError(
            f"{what} {path} can be read or written by other users (mode {mode:04o}); "
            f"it holds secrets: make it owner-only with 'chmod 600 {path}'"
        )


def check_not_world_writable(path: str, what: str, *, group_too: bool = False) -> None:
    """Raise :class:`CredentialsError` if the existing directory ``path`` is writable by all.

    Anyone could then plant files or links in a spool or store and have a
    daemon read or move them.  dropr makes its directories owner-only
    (0700); a missing directory is fine (it is made so).  With
    ``group_too`` a directory its group may write is refused as well (the
    server's store: a member of the group could plant messages).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CredentialsError(f"cannot use {what} {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o022 if group_too else 0o002):
        who = "every user" if mode & 0o002 else "its group"
        raise CredentialsError(
            f"{what} {path} is writable by {who} (mode {mode:04o}): they could "
            f"plant files in it; make it owner-only with 'chmod 700 {path}'"
        )


def read_credentials_file(path: str) -> dict[str, bytes]:
    """Identity → secret from a credentials file, checked for its permissions.

    One client per line, its identity and its secret separated by
    whitespace; blank lines and lines starting with ``#`` are skipped.  An
    identity is 1 to 64 characters from ``A-Z a-z 0-9 . _ @ -`` starting
    with a letter or digit; a secret is at least 16 printable ASCII
    characters without spaces.
    """
    check_private_file(path)
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e}") from None
    entries: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        where = f"credentials file {path}, line {number}"
        if len(fields) != 2:
            raise CredentialsError(f"{where}: expected '<identity> <secret>'")
        identity, secret = fields
        if not _IDENTITY_RE.match(identity):
            raise CredentialsError(
                f"{where}: invalid identity {identity!r}: use 1 to 64 characters from "
                "A-Z a-z 0-9 . _ @ - starting with a letter or digit"
            )
        if len(secret) < MIN_SECRET_LENGTH or not _SECRET_RE.match(secret):
            raise CredentialsError(
                f"{where}: the secret of {identity!r} must be at least "
                f"{MIN_SECRET_LENGTH} printable characters (make one with "
                "'openssl rand -hex 32')"
            )
        if identity in entries:
            raise CredentialsError(f"{where}: {identity!r} is listed twice")
        entries[identity] = secret.encode("ascii")
    return entries


def load_client_credentials(path: str) -> Credentials:
    """The one identity and secret of a client's credentials file."""
    entries = read_credentials_file(path)
    if len(entries) != 1:
        raise CredentialsError(
            f"credentials file {path} must hold exactly one '<identity> <secret>' "
            f"line for a client, not {len(entries)}"
        )
    [(identity, secret)] = entries.items()
    return Credentials(identity, secret)


def load_server_credentials(path: str) -> dict[str, bytes]:
    """The identities and secrets of the clients a server accepts."""
    entries = read_credentials_file(path)
    if not entries:
        raise CredentialsError(f"credentials file {path} lists no client")
    return entries


def media_type(content_type: bytes | str | None) -> str:
    """The media type of a Content-Type value: lowercase, parameters dropped."""
    if content_type is None:
        return ""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower()


def string_to_sign(
    identity: str,
    timestamp: int,
    method: str,
    query: str,
    content_type: str,
    body_sha256: str,
) -> bytes:
    """The bytes a request's signature is the HMAC of (see the module's doc)."""
    return "\n".join(
        (SCHEME, identity, str(timestamp), method, query, content_type, body_sha256)
    ).encode("latin-1")


def signature(secret: bytes, message: bytes) -> str:
    """Hex HMAC-SHA256 of ``message`` keyed with ``secret``."""
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(
    credentials: Credentials,
    body: bytes,
    *,
    method: str = "POST",
    query: str = "",
    content_type: str = "",
    now: float | None = None,
) -> dict[str, str]:
    """The headers that authenticate a request with ``credentials``."""
    timestamp = int(time.time() if now is None else now)
    body_sha256 = hashlib.sha256(body).hexdigest()
    message = string_to_sign(
        credentials.identity, timestamp, method, query, media_type(content_type), body_sha256
    )
    return {
        CLIENT_HEADER: credentials.identity,
        TIMESTAMP_HEADER: str(timestamp),
        CONTENT_SHA256_HEADER: body_sha256,
        SIGNATURE_HEADER: signature(credentials.secret, message),
    }


@dataclass(frozen=True, slots=True)
class Claim:
    """A request whose signed headers were verified; its body is still to be held to them."""

    identity: str
    timestamp: int
    #: Hex SHA-256 the body must have (the signature covers it).
    body_sha256: str


class Authenticator:
    """Checks the signatures of requests against the clients' secrets.

    :param secrets: identity → secret of every client accepted.
    :param allow_anonymous: accept requests that carry no signature at all
        (a request that carries one must still carry a valid one).
    :param clock: the wall clock, in seconds since the epoch.
    """

    def __init__(
        self,
        secrets: Mapping[str, bytes],
        allow_anonymous: bool = False,
        clock: Callable[[], float] = time.time,
        max_skew: float = MAX_SKEW,
    ) -> None:
        self.secrets = dict(secrets)
        self.allow_anonymous = allow_anonymous
        self.max_skew = max_skew
        self._clock = clock
        # A key for unknown identities, so that refusing one costs the same
        # HMAC as refusing a wrong signature of a known one.
        self._decoy = os.urandom(32)

    def check(
        self, headers: Headers, method: str, query: str, content_type: str, has_body: bool
    ) -> Claim | None:
        """Verify a request's signature from its head alone, before its body is read.

        Returns the verified :class:`Claim`, or None for a request without
        any of the headers when that is acceptable (anonymous requests are
        allowed, or it has no body, like a ``GET``).  Raises
        :class:`AuthError` for everything else; its text is for the log,
        since every refusal is answered alike (:data:`NOT_AUTHENTICATED`).
        """
        fields = [
            _header(headers, name)
            for name in (CLIENT_HEADER, TIMESTAMP_HEADER, CONTENT_SHA256_HEADER, SIGNATURE_HEADER)
        ]
        identity, timestamp, body_sha256, sig = fields
        if all(f is None for f in fields):
            if self.allow_anonymous or not has_body:
                return None
            raise AuthError("unsigned request")
        if identity is None or timestamp is None or body_sha256 is None or sig is None:
            raise AuthError(
                f"incomplete authentication: {CLIENT_HEADER}, {TIMESTAMP_HEADER}, "
                f"{CONTENT_SHA256_HEADER} and {SIGNATURE_HEADER} go together"
            )
        # Every check below runs, and the HMAC is computed, whatever fails
        # first: a refusal takes the same time for every reason.
        problems = []
        secret = self.secrets.get(identity)
        if secret is None:
            problems.append(f"unknown client {identity[:64]!r}")
        ts = int(timestamp) if _TIMESTAMP_RE.match(timestamp) else None
        if ts is None:
            problems.append(f"{TIMESTAMP_HEADER} is not seconds since the epoch")
        else:
            skew = ts - self._clock()
            if abs(skew) > self.max_skew:
                problems.append(
                    f"timestamp {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                    f"this server's clock (at most {self.max_skew:.0f} s): check the "
                    "client's clock, or an old request was replayed"
                )
        if not _HEX256_RE.match(body_sha256):
            problems.append(f"{CONTENT_SHA256_HEADER} is not 64 lowercase hex digits")
        if not _HEX256_RE.match(sig):
            problems.append(f"{SIGNATURE_HEADER} is not 64 lowercase hex digits")
        message = string_to_sign(
            identity, ts or 0, method, query, media_type(content_type), body_sha256
        )
        expected = hmac.new(secret or self._decoy, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii", "replace")):
            problems.append("wrong signature")
        if problems:
            raise AuthError(f"client {identity[:64]!r}: {'; '.join(problems)}")
        assert ts is not None
        return Claim(identity, ts, body_sha256)

    def require(self, claim: Claim | None) -> None:
        """Raise :class:`AuthError` if a request that stores must be signed and is not."""
        if claim is None and not self.allow_anonymous:
            raise AuthError("unsigned request")


def _header(headers: Headers, name: str) -> str | None:
    values = headers.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise AuthError(f"{name} is given more than once")
    try:
        return bytes(values[0]).decode("ascii").strip()
    except UnicodeDecodeError:
        raise AuthError(f"{name} must be ASCII") from None
