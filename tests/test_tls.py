"""HTTPS: a dropr-server on an ``ssl:`` endpoint, clients that check its certificate.

A private CA and a server certificate for 127.0.0.1 and localhost are made
here with ``cryptography``; the servers are real (in this reactor on a real
socket, or ``twistd`` processes) and so are the TLS handshakes.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from inprocess import Server
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

import dropr
from dropr._ids import new_id
from dropr._message import Message
from dropr.client import tap as client_tap
from dropr.client._transport import HTTPTransport
from dropr.daemon._tls import TLSConfigError, client_policy, is_local_endpoint, load_ca_certificates
from dropr.server import tap as server_tap
from dropr.server._receiver import Limits
from dropr.testing import ClientProcess, ServerProcess, free_port, wait_until

# Real daemons and sockets over TLS.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@dataclass
class PKI:
    ca: str
    key: str
    cert: str
    other_ca: str
    wrong_name_key: str
    wrong_name_cert: str


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[x509.GeneralName]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("dropr test server"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    return str(path)


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("dropr test CA")
    _other_key, other_cert = _ca("someone else's CA")
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    key, cert = _leaf(ca_key, ca_cert, names)
    wrong_key, wrong_cert = _leaf(ca_key, ca_cert, [x509.DNSName("elsewhere.example")])
    return PKI(
        ca=_write_cert(d / "ca.pem", ca_cert),
        key=_write_key(d / "key.pem", key),
        cert=_write_cert(d / "cert.pem", cert),
        other_ca=_write_cert(d / "other-ca.pem", other_cert),
        wrong_name_key=_write_key(d / "wrong-key.pem", wrong_key),
        wrong_name_cert=_write_cert(d / "wrong-cert.pem", wrong_cert),
    )


class TLSServer(Server):
    """The in-process server, listening on an ``ssl:`` endpoint string."""

    def __init__(self, tmp_path: Path, key: str, cert: str) -> None:
        super().__init__(tmp_path, Limits())
        self._tcp = self.port
        port = free_port()
        endpoint = serverFromString(
            reactor, f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        )
        # A TCP-based endpoint listens at once: its Deferred has fired.
        listening: list[Any] = []
        endpoint.listen(self.site).addCallback(listening.append)
        self.tls_port = listening[0]
        self.url = f"https://127.0.0.1:{port}/"
        self.localhost_url = f"https://localhost:{port}/"

    def stop(self) -> Any:
        self.tls_port.stopListening()
        return super().stop()


@pytest.fixture
def tls_server(tmp_path: Path, pki: PKI) -> Iterator[TLSServer]:
    s = TLSServer(tmp_path, pki.key, pki.cert)
    yield s
    pytest_twisted.blockon(s.stop())


def msgs(n: int) -> list[Message]:
    return [Message(new_id(), b"tls %d" % i, "orders", 5) for i in range(n)]


@pytest_twisted.inlineCallbacks
def test_a_client_trusting_the_ca_file_delivers_over_https(tls_server: TLSServer, pki: PKI) -> Any:
    transport = HTTPTransport(reactor, context_factory=client_policy(pki.ca))
    try:
        for url in (tls_server.url, tls_server.localhost_url):
            results = yield transport.send(url, msgs(3))
            assert all(r.stored for r in results)
        assert tls_server.depth() == 6
    finally:
        yield transport.close()


@pytest.mark.parametrize("trust", ["system", "other"])
@pytest_twisted.inlineCallbacks
def test_a_certificate_from_an_untrusted_ca_is_refused(
    tls_server: TLSServer, pki: PKI, trust: str
) -> Any:
    policy = client_policy(None if trust == "system" else pki.other_ca)
    transport = HTTPTransport(reactor, context_factory=policy)
    try:
        with pytest.raises(Exception) as caught:
            yield transport.send(tls_server.url, msgs(1))
        assert "certificate verify failed" in str(caught.value) or "SSL" in repr(caught.value)
        assert tls_server.depth() == 0
    finally:
        yield transport.close()


@pytest_twisted.inlineCallbacks
def test_a_certificate_for_another_name_is_refused(tmp_path: Path, pki: PKI) -> Any:
    server = TLSServer(tmp_path, pki.wrong_name_key, pki.wrong_name_cert)
    transport = HTTPTransport(reactor, context_factory=client_policy(pki.ca))
    try:
        with pytest.raises(Exception) as caught:
            yield transport.send(server.url, msgs(1))
        assert "127.0.0.1" in str(caught.value) or "SSL" in repr(caught.value)
        assert server.depth() == 0
    finally:
        yield transport.close()
        yield server.stop()


def test_ca_files_are_read_whole_or_refused(tmp_path: Path, pki: PKI) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(pki.other_ca).read_bytes() + b"\n" + Path(pki.ca).read_bytes())
    assert len(load_ca_certificates(str(bundle))) == 2
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        client_policy(str(empty))
    with pytest.raises(TLSConfigError, match="cannot read"):
        client_policy(str(tmp_path / "missing.pem"))
    options = client_tap.Options()
    options.parseOptions(["--spool", str(tmp_path / "spool"), "--ca-file", str(empty)])
    with pytest.raises(SystemExit, match="no PEM certificate"):
        client_tap.makeService(options)
    assert not (tmp_path / "spool").exists()


def test_the_server_refuses_a_private_key_others_can_read(tmp_path: Path, pki: PKI) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(pki.key, key)
    os.chmod(key, 0o644)
    options = server_tap.Options()
    options.parseOptions(
        [
            "--store",
            str(tmp_path / "store"),
            "--listen",
            f"ssl:0:privateKey={key}:certKey={pki.cert}:interface=127.0.0.1",
            "--allow-anonymous-local",
        ]
    )
    with pytest.raises(SystemExit, match=r"TLS private key file .* 'chmod 600"):
        server_tap.makeService(options)


def test_an_ssl_listener_is_judged_local_by_its_parsed_interface(pki: PKI) -> None:
    keys = f"privateKey={pki.key}:certKey={pki.cert}"
    assert is_local_endpoint(f"ssl:443:{keys}:interface=127.0.0.1")
    assert is_local_endpoint(f"ssl:443:{pki.key}:{pki.cert}:TLSv1_2_METHOD:127.0.0.1")
    assert not is_local_endpoint(f"ssl:443:{keys}")
    assert not is_local_endpoint(f"ssl:443:{keys}:interface=0.0.0.0")


@pytest.mark.slow
def test_twistd_daemons_over_https_with_credentials(tmp_path: Path, pki: PKI) -> None:
    """The whole path: put → dropr-client (--ca-file, --credentials) → ssl: dropr-server."""
    secret = "s3cr3t-" + "x" * 20
    clients = tmp_path / "clients"
    clients.write_text(f"app1 {secret}\n")
    os.chmod(clients, 0o600)
    own = tmp_path / "app1"
    own.write_text(f"app1 {secret}\n")
    os.chmod(own, 0o600)
    server = ServerProcess(
        str(tmp_path / "store"),
        str(tmp_path / "server.log"),
        tls=(pki.key, pki.cert),
        ca_file=pki.ca,
        extra=["--credentials", str(clients)],
    ).start_and_wait()
    client = None
    try:
        assert server.url.startswith("https://")
        client = ClientProcess(
            str(tmp_path / "spool"),
            str(tmp_path / "client.log"),
            extra=["--ca-file", pki.ca, "--credentials", str(own)],
        ).start_and_wait()
        ids = [dropr.put(b"over tls %d" % i, server.url, spool=client.spool) for i in range(20)]
        with dropr.Store(server.store) as store:
            wait_until(
                lambda: sum(s.depth for s in store.stats().values()) >= 20, 30, what="delivery"
            )
            got = store.take("common", 100)
        assert sorted(m.id for m in got) == sorted(ids)
        # curl and openssl alone can post there too (docs/examples/signed_post.sh).
        if shutil.which("curl") and shutil.which("openssl"):
            done = subprocess.run(
                ["sh", str(REPO / "docs/examples/signed_post.sh"), server.url, str(own), pki.ca],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr + done.stdout
            answer = json.loads(done.stdout)
            assert len(answer["stored"]) == 1 and answer["rejected"] == {}
            with dropr.Store(server.store) as store:
                [m] = store.take("orders", 10)
                assert (m.payload, m.priority) == (b'{"order": 3}', 3)
    finally:
        if client is not None:
            client.stop()
        server.stop()


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_the_openssl_recipe_of_the_docs_makes_a_working_ca(tmp_path: Path) -> Any:
    """docs/security.rst's private CA, run as written (its IP replaced by 127.0.0.1)."""
    if not shutil.which("openssl") or not shutil.which("bash"):
        pytest.skip("needs openssl and bash")
    text = (REPO / "docs" / "security.rst").read_text(encoding="utf-8")
    section = text[text.index("A private certificate authority") : text.index("go to the server")]
    commands = []
    for block in section.split(".. code-block:: console")[1:]:
        lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
        joined = " ".join(line[:-1] if line.endswith("\\") else line for line in lines)
        commands += [c.strip() for c in joined.split("$ ") if c.strip()]
    assert len(commands) == 4
    for command in commands:
        command = command.replace("IP:10.0.0.5", "IP:127.0.0.1")
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    assert oct(os.stat(tmp_path / "key.pem").st_mode & 0o777) == "0o600"
    server = TLSServer(tmp_path, str(tmp_path / "key.pem"), str(tmp_path / "cert.pem"))
    transport = HTTPTransport(reactor, context_factory=client_policy(str(tmp_path / "ca.pem")))
    try:
        results = yield transport.send(server.url, msgs(2))
        assert all(r.stored for r in results)
        assert server.depth() == 2
    finally:
        yield transport.close()
        yield server.stop()
