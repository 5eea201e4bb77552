"""TLS for both daemons: the client's trust in servers, and the server's endpoints.

dropr-server speaks HTTPS on Twisted's ``ssl:`` endpoints (key and
certificate from PEM files).  dropr-client checks a server's certificate
and host name against the system's trusted roots, or against the
certificate authorities of a file given with ``--ca-file`` (a private CA).
See docs/security.rst.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import BrowserLikePolicyForHTTPS

from dropr.daemon._auth import CredentialsError, check_private_file
from dropr.errors import DroprError

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(DroprError):
    """A TLS setting that cannot be used; the daemon does not start."""


def load_ca_certificates(path: str) -> list[Certificate]:
    """Every certificate of a PEM file (a CA, or a bundle of them)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read CA file {path}: {e.strerror}") from None
    blocks = _PEM_CERT_RE.findall(data)
    if not blocks:
        raise TLSConfigError(f"CA file {path} holds no PEM certificate")
    certificates = []
    for block in blocks:
        try:
            certificates.append(Certificate.loadPEM(block))
        except Exception as e:  # OpenSSL's errors have no common base worth naming
            raise TLSConfigError(f"CA file {path}: unreadable certificate: {e}") from None
    return certificates


def client_policy(ca_file: str | None = None) -> BrowserLikePolicyForHTTPS:
    """How dropr-client checks ``https`` servers.

    Without ``ca_file``: the system's trusted roots, as a browser would.
    With it: only the certificate authorities in that PEM file.  The
    server's certificate must name the host of the destination URL (a DNS
    name or an IP address in its subjectAltName) in both cases.
    """
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(
        trustRoot=trustRootFromCertificates(load_ca_certificates(ca_file))
    )


def parse_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """A server endpoint string split as Twisted does: type, positional and keyword arguments.

    ``:`` separates arguments, ``=`` a keyword from its value, and a
    backslash escapes either.
    """
    pieces: list[tuple[str, int]] = []  # text, index of its first unescaped "=" or -1
    current: list[str] = []
    equals = -1
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            pieces.append(("".join(current), equals))
            current, equals = [], -1
        else:
            if ch == "=" and equals < 0:
                equals = len(current)
            current.append(ch)
    pieces.append(("".join(current), equals))
    kind = pieces[0][0]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for text, eq in pieces[1:]:
        if eq >= 0:
            kwargs[text[:eq]] = text[eq + 1 :]
        else:
            args.append(text)
    return kind, args, kwargs


def _argument(args: list[str], kwargs: dict[str, str], name: str, position: int) -> str | None:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """The endpoint ``description`` names, as ``serverFromString`` reads it.

    A ``unix:`` socket is made owner-only (``mode=600``) unless the
    description gives a ``mode=`` of its own: Twisted's default lets every
    local user connect.
    """
    kind, _args, kwargs = parse_endpoint(description)
    if kind.lower() == "unix" and "mode" not in kwargs:
        description += ":mode=600"
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    except Exception as e:  # a bad string, a missing or unreadable key file, ...
        raise TLSConfigError(f"cannot listen on {description}: {e}") from None


def is_local(endpoint: IStreamServerEndpoint) -> bool:
    """True when only this host can connect: a loopback interface or a UNIX socket.

    Judged from the endpoint as parsed (its ``interface=``, positional or
    keyword), not from the text.
    """
    if isinstance(endpoint, UNIXServerEndpoint):
        return True
    # TCP4, TCP6 and SSL4 endpoints keep the interface they bind to here.
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        return False
    if not interface:
        return False  # every interface
    try:
        return ipaddress.ip_address(str(interface).strip("[]")).is_loopback
    except ValueError:
        return bool(interface == "localhost")


def is_local_endpoint(description: str, reactor: Any = None) -> bool:
    """:func:`is_local` of the endpoint ``description`` names."""
    if reactor is None:
        from twisted.internet import reactor
    return is_local(server_endpoint(reactor, description))


def check_endpoint_key(description: str) -> None:
    """Refuse an ``ssl:`` endpoint whose private key file other users can read."""
    kind, args, kwargs = parse_endpoint(description)
    if kind.lower() != "ssl":
        return
    key = _argument(args, kwargs, "privateKey", 1) or "server.pem"
    try:
        check_private_file(key, "TLS private key file")
    except CredentialsError as e:
        raise TLSConfigError(str(e)) from None
