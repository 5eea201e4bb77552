"""Client authentication: an identity and a shared secret per client (HMAC-SHA256).

A dropr-client signs every request with the secret it shares with the
server; the server recomputes the signature and refuses (401) what does
not match.  Three headers carry it::

    X-Dropr-Client:     <identity>
    X-Dropr-Timestamp:  <seconds since the epoch, an integer>
    X-Dropr-Signature:  <hex HMAC-SHA256 of the string below, keyed by the secret>

The string signed is these eight lines joined by ``\\n`` (no newline at
the end)::

    dropr-hmac-v1
    <identity>
    <timestamp>
    <method, e.g. POST>
    <query string as sent, without the "?" (often empty)>
    <media type of Content-Type, lowercase, without parameters>
    <value of X-Dropr-Fresh, or empty>
    <hex SHA-256 of the request body>

The path is left out so that a proxy may mount the server under a prefix;
everything that decides what is stored (body, query, content type, fresh
hint) is in.  See docs/security.rst for why HMAC and not client
certificates, and for the threat model.

The files holding secrets must not be readable by anyone but their owner:
:func:`check_private_file` refuses them otherwise, and
:func:`check_not_world_writable` refuses a spool or store anyone may write to.
"""

from __future__ import annotations

import collections
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

SCHEME = "dropr-hmac-v1"
CLIENT_HEADER = "X-Dropr-Client"
TIMESTAMP_HEADER = "X-Dropr-Timestamp"
SIGNATURE_HEADER = "X-Dropr-Signature"
#: A request's timestamp may be this far from the server's clock (seconds).
MAX_SKEW = 300.0
#: Fewest characters of a secret; ``openssl rand -hex 32`` makes 64.
MIN_SECRET_LENGTH = 16
#: Most fresh requests remembered for replay detection; beyond, the fresh
#: hint is ignored (the dedup index then catches every replay).
MAX_REMEMBERED = 1_000_000

_IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_SECRET_RE = re.compile(r"[\x21-\x7e]+\Z")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}\Z")
_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}\Z")


class AuthError(DroprError):
    """A request that is not authenticated: answered 401, nothing stored."""


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


def check_not_world_writable(path: str, what: str) -> None:
    """Raise :class:`CredentialsError` if the existing directory ``path`` is writable by all.

    Anyone could then plant files or links in a spool or store and have a
    daemon read or move them.  dropr makes its directories owner-only
    (0700); a missing directory is fine (it is made so).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CredentialsError(f"cannot use {what} {path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        raise CredentialsError(
            f"{what} {path} is writable by every user (mode {mode:04o}): anyone could "
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
    fresh: str,
    body_sha256: str,
) -> bytes:
    """The bytes a request's signature is the HMAC of (see the module's doc)."""
    return "\n".join(
        (SCHEME, identity, str(timestamp), method, query, content_type, fresh, body_sha256)
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
    fresh: str = "",
    now: float | None = None,
) -> dict[str, str]:
    """The headers that authenticate a request with ``credentials``."""
    timestamp = int(time.time() if now is None else now)
    message = string_to_sign(
        credentials.identity,
        timestamp,
        method,
        query,
        media_type(content_type),
        fresh,
        hashlib.sha256(body).hexdigest(),
    )
    return {
        CLIENT_HEADER: credentials.identity,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(credentials.secret, message),
    }


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request says about who sent it, not yet verified."""

    identity: str
    timestamp: int
    signature: bytes


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
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self.secrets = dict(secrets)
        self.allow_anonymous = allow_anonymous
        self.max_skew = max_skew
        self.max_remembered = max_remembered
        self._clock = clock
        self.started = clock()
        self._seen: set[bytes] = set()
        self._expiry: collections.deque[tuple[float, bytes]] = collections.deque()

    def check_headers(self, headers: Headers, has_body: bool) -> Claim | None:
        """The claim of a request's headers, checked as far as headers go.

        Returns None for a request without any of the headers when that is
        acceptable: anonymous requests are allowed, or the request has no
        body (a ``GET``; a ``POST`` without a body is refused later, by
        :meth:`require`).  Raises :class:`AuthError` for everything else:
        headers missing or malformed, an unknown identity, a timestamp too
        far from the server's clock.  The signature itself needs the body
        and is checked by :meth:`verify`.
        """
        identity = _header(headers, CLIENT_HEADER)
        timestamp = _header(headers, TIMESTAMP_HEADER)
        sig = _header(headers, SIGNATURE_HEADER)
        if identity is None and timestamp is None and sig is None:
            if self.allow_anonymous or not has_body:
                return None
            raise AuthError(
                f"authentication required: sign the request ({CLIENT_HEADER}, "
                f"{TIMESTAMP_HEADER}, {SIGNATURE_HEADER}; see docs/security)"
            )
        if identity is None or timestamp is None or sig is None:
            raise AuthError(
                f"incomplete authentication: {CLIENT_HEADER}, {TIMESTAMP_HEADER} "
                f"and {SIGNATURE_HEADER} go together"
            )
        if identity not in self.secrets:
            # The same answer as a wrong signature would tell a prober which
            # identities exist; this one is no more helpful than that.
            raise AuthError("unknown client or wrong signature")
        if not _TIMESTAMP_RE.match(timestamp):
            raise AuthError(f"{TIMESTAMP_HEADER} must be seconds since the epoch")
        if not _SIGNATURE_RE.match(sig):
            raise AuthError(f"{SIGNATURE_HEADER} must be 64 hex digits (HMAC-SHA256)")
        ts = int(timestamp)
        skew = ts - self._clock()
        if abs(skew) > self.max_skew:
            raise AuthError(
                f"request timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} "
                f"this server's clock (at most {self.max_skew:.0f} s allowed): check "
                "the client's clock; a replayed old request is refused this way too"
            )
        return Claim(identity, ts, bytes.fromhex(sig))

    def require(self, claim: Claim | None) -> None:
        """Raise :class:`AuthError` if a request that stores must be signed and is not."""
        if claim is None and not self.allow_anonymous:
            raise AuthError(
                f"authentication required: sign the request ({CLIENT_HEADER}, "
                f"{TIMESTAMP_HEADER}, {SIGNATURE_HEADER}; see docs/security)"
            )

    def verify(
        self,
        claim: Claim,
        method: str,
        query: str,
        content_type: str,
        fresh: str,
        body_sha256: str,
    ) -> None:
        """Raise :class:`AuthError` unless ``claim``'s signature is right for this request."""
        message = string_to_sign(
            claim.identity,
            claim.timestamp,
            method,
            query,
            media_type(content_type),
            fresh,
            body_sha256,
        )
        expected = hmac.new(self.secrets[claim.identity], message, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, claim.signature):
            raise AuthError("unknown client or wrong signature")

    def fresh_allowed(self, claim: Claim) -> bool:
        """Whether a signed request may use the fresh hint (skip dedup lookups).

        A fresh request replayed verbatim would be stored twice, since its
        ids are not looked up.  So the hint holds only the first time a
        signature is seen, and only for requests signed after this server
        started (plus the allowed skew): one sent to a previous run of the
        server may be replayed to this one, which never saw it.  Every other
        request is looked up in the dedup index, where a replay stores
        nothing.
        """
        now = self._clock()
        while self._expiry and self._expiry[0][0] < now:
            _, old = self._expiry.popleft()
            self._seen.discard(old)
        if claim.timestamp < self.started + self.max_skew:
            return False
        if claim.signature in self._seen or len(self._seen) >= self.max_remembered:
            return False
        self._seen.add(claim.signature)
        # Beyond timestamp + skew the request is refused by its timestamp
        # anyway, so it need not be remembered longer.
        self._expiry.append((claim.timestamp + self.max_skew + 1, claim.signature))
        return True


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
