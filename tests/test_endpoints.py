"""
Tests for the TLS ends in L{mailrelay.endpoints}: the relay's certificate
and key, its listening endpoint, and the client's endpoint with its
certificate check, through real TLS handshakes in memory (pyOpenSSL over
memory BIOs), and the TLS versions both ends speak over real loopback TCP.

L{PKI} makes throwaway CAs and certificates with C{cryptography}; the
integration tests use it too.
"""

from __future__ import annotations

import datetime
import os
import pwd
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import endpoints as twisted_endpoints
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailrelay import wire
from mailrelay.client.protocol import describe_disconnect
from mailrelay.endpoints import (
    ServerTLS,
    TLSClientEndpoint,
    TLSSetupError,
    VerifyingClientCreator,
    client_description,
    client_endpoint,
    load_ca_certificates,
    load_server_tls,
    server_endpoint,
    ssl_server_files,
    tls_refusal,
)
from mailrelay.relay.protocol import RelayFactory
from mailrelay.relay.store.memory import MemoryStore
from tests.skips import unavailable

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


class PKI:
    """A throwaway CA, and certificates it signs, written as PEM files under C{directory}."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.directory / f"{self._slug}-ca.pem"
        self.ca_file.write_bytes(_pem(self.certificate))

    @property
    def _slug(self) -> str:
        return self.name.lower().replace(" ", "-")

    def issue(self, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = (),
              not_before=None, not_after=None, prefix: str = "relay"):
        """A server certificate: (its key, cert and combined-file paths, the certificate)."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(n) for n in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                  for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        (dns or ips or ("none",))[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 7 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_file = self.directory / f"{prefix}-key.pem"
        cert_file = self.directory / f"{prefix}-cert.pem"
        key_file.write_bytes(_key_pem(key))
        key_file.chmod(0o600)
        cert_file.write_bytes(_pem(certificate))
        return key_file, cert_file, certificate


class _App:
    """What C{set_app_data} holds on a real connection: the TLS protocol."""

    def failVerification(self, reason) -> None:  # pragma: no cover - not called here
        pass


def handshake(server: SSL.Connection, client: SSL.Connection) -> Exception | None:
    """Run a TLS handshake between two memory-BIO connections; the error, if any."""
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(50):
        progress = False
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                return e
            try:
                data = one.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                other.bio_write(data)
                progress = True
        if not progress:
            try:
                client.do_handshake()
                server.do_handshake()
                return None
            except SSL.WantReadError:
                return RuntimeError("handshake stalled")
            except SSL.Error as e:
                return e
    return RuntimeError("handshake did not finish")


def server_connection(tls: ServerTLS) -> SSL.Connection:
    return SSL.Connection(tls.options.getContext(), None)


def client_connection(creator: VerifyingClientCreator) -> SSL.Connection:
    return creator.clientConnectionForTLS(_App())


def _load_as_nobody(cert: Path, key: Path) -> str:
    """
    What C{load_server_tls(cert, key)} does in a child process that dropped
    root for nobody: "loaded", or the exception it raised.
    """
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        unavailable("there is no user nobody to drop root for")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns into the test runner
        outcome = "loaded"
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            load_server_tls(str(cert), str(key))
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"
        try:
            os.write(write, outcome.encode("utf-8"))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode("utf-8")
    os.waitpid(pid, 0)
    return outcome


class TempDir:
    def setUp(self):
        super().setUp()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)


class ClientDescriptionTests(SynchronousTestCase):
    def test_tls_url(self):
        """tls://HOST:PORT is tls:HOST:PORT; IPv6 in brackets, escaped; a trailing / too."""
        for typed, expected in [
            ("tls://relay.example.org:9443", "tls:relay.example.org:9443"),
            ("TLS://relay.example.org:9443/", "tls:relay.example.org:9443"),
            ("tls://127.0.0.1:9443", "tls:127.0.0.1:9443"),
            ("tls://[::1]:9443", r"tls:\:\:1:9443"),
            ("tcp://localhost:9000", "tcp:localhost:9000"),
        ]:
            self.assertEqual(client_description(typed), expected, typed)

    def test_incomplete_url_left_for_the_parser(self):
        """tls://host (no port) is not guessed at: the endpoint parser refuses it."""
        self.assertEqual(client_description("tls://relay.example.org"),
                         "tls://relay.example.org")
        error = self.assertRaises(ValueError, client_endpoint, MemoryReactor(),
                                  "tls://relay.example.org")
        self.assertIn("tls://HOST:PORT", str(error))


class ServerTLSTests(TempDir, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.pki = PKI(self.dir / "pki")
        self.key, self.cert, self.certificate = self.pki.issue()

    def test_loads(self):
        tls = load_server_tls(str(self.cert), str(self.key))
        self.assertIsInstance(tls, ServerTLS)
        self.assertEqual(tls.subject, "CN=localhost")
        self.assertEqual(tls.names, ["localhost"])
        self.assertEqual(tls.not_after, self.certificate.not_valid_after_utc)
        self.assertEqual(tls.chain, [])
        self.assertIn("CN=localhost (localhost), valid until", tls.describe())

    def test_chain_after_the_certificate(self):
        """A certificate file with intermediates after the certificate: they are the chain."""
        combined = self.dir / "fullchain.pem"
        combined.write_bytes(self.cert.read_bytes() + self.pki.ca_file.read_bytes())
        tls = load_server_tls(str(combined), str(self.key))
        self.assertEqual(tls.certificate, self.certificate)
        self.assertEqual(tls.chain, [self.pki.certificate])

    def test_certificate_and_key_in_one_file(self):
        both = self.dir / "both.pem"
        both.write_bytes(self.key.read_bytes() + self.cert.read_bytes())
        self.assertEqual(load_server_tls(str(both), str(both)).certificate, self.certificate)

    def assertRefused(self, cert, key, *words):
        error = self.assertRaises(TLSSetupError, load_server_tls, str(cert), str(key))
        self.assertNotIn("\n", str(error))
        for word in words:
            self.assertIn(word, str(error))
        return str(error)

    def test_missing_files(self):
        self.assertRefused(self.dir / "none.pem", self.key,
                           f"--tls-cert {self.dir / 'none.pem'}: No such file or directory")
        self.assertRefused(self.cert, self.dir / "none.pem",
                           f"--tls-key {self.dir / 'none.pem'}: No such file or directory")
        self.assertRefused(self.cert, self.dir, f"--tls-key {self.dir}: Is a directory")

    def test_unreadable_key(self):
        """
        A key file the relay's user cannot read is refused, saying so.  Root
        reads any file: as root, the files are loaded in a child process that
        has become nobody, once with the key unreadable and once, as the
        control, readable.
        """
        if os.geteuid() != 0:
            self.key.chmod(0)
            self.assertRefused(self.cert, self.key, "--tls-key", "Permission denied")
            return
        shared = Path(tempfile.mkdtemp(prefix="mailrelay-nobody-"))  # nobody may enter it
        self.addCleanup(shutil.rmtree, shared)
        shared.chmod(0o755)
        cert, key = shared / "cert.pem", shared / "key.pem"
        cert.write_bytes(self.cert.read_bytes())
        key.write_bytes(self.key.read_bytes())
        cert.chmod(0o644)
        key.chmod(0o644)
        self.assertEqual(_load_as_nobody(cert, key), "loaded")
        key.chmod(0)
        self.assertEqual(_load_as_nobody(cert, key),
                         f"TLSSetupError: --tls-key {key}: Permission denied")

    def test_not_pem(self):
        junk = self.dir / "junk"
        junk.write_text("hello")
        self.assertRefused(junk, self.key, f"--tls-cert {junk} holds no PEM certificate")
        self.assertRefused(self.cert, junk, f"--tls-key {junk} holds no PEM private key")
        self.assertRefused(self.key, self.key, "holds no PEM certificate")
        self.assertRefused(self.cert, self.cert, "holds no PEM private key")

    def test_damaged(self):
        damaged = self.dir / "damaged.pem"
        damaged.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertRefused(damaged, self.key, "damaged PEM certificate")

    def test_key_of_another_certificate(self):
        other_key, _, _ = self.pki.issue(prefix="other")
        message = self.assertRefused(self.cert, other_key)
        self.assertEqual(message, f"--tls-key {other_key} is not the key of the certificate "
                                  f"in --tls-cert {self.cert}")

    def test_encrypted_key(self):
        encrypted = self.dir / "encrypted.pem"
        key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        encrypted.write_bytes(_key_pem(key, b"secret"))
        self.assertRefused(self.cert, encrypted, "is encrypted")

    def test_tls_versions(self):
        """
        TLS 1.3 is chosen when the client offers it; 1.2 and 1.1 are
        refused by the relay (a permissive server accepts the same clients,
        so the refusal is the relay's).
        """
        tls = load_server_tls(str(self.cert), str(self.key))

        def client(maximum=None):
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
            context.set_min_proto_version(0)
            if maximum is not None:
                context.set_max_proto_version(maximum)
            return SSL.Connection(context, None)

        best = client()
        self.assertIsNone(handshake(server_connection(tls), best))
        self.assertEqual(best.get_protocol_version_name(), "TLSv1.3")
        self.assertIsInstance(handshake(server_connection(tls), client(SSL.TLS1_2_VERSION)),
                              SSL.Error)
        permissive12 = CertificateOptions(privateKey=tls.options.privateKey,
                                          certificate=tls.options.certificate)
        tls12 = client(SSL.TLS1_2_VERSION)
        self.assertIsNone(handshake(SSL.Connection(permissive12.getContext(), None), tls12))
        self.assertEqual(tls12.get_protocol_version_name(), "TLSv1.2")

        # Even at security level 0, which would let OpenSSL speak TLS 1.1, the
        # relay's minimum version refuses it.
        lowered = load_server_tls(str(self.cert), str(self.key))
        lowered.options.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        refused = handshake(server_connection(lowered), client(SSL.TLS1_1_VERSION))
        self.assertIsInstance(refused, SSL.Error)
        permissive = CertificateOptions(
            privateKey=tls.options.privateKey, certificate=tls.options.certificate,
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_0)
        context = permissive.getContext()
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        old = client(SSL.TLS1_1_VERSION)
        if handshake(SSL.Connection(context, None), old) is not None:
            unavailable("this OpenSSL cannot speak TLS 1.1 at all")
        self.assertEqual(old.get_protocol_version_name(), "TLSv1.1")


class SSLStringTests(SynchronousTestCase):
    def test_files(self):
        self.assertEqual(ssl_server_files("ssl:9443"),
                         {"key": "server.pem", "cert": "server.pem", "chain": None, "dh": None})
        self.assertEqual(
            ssl_server_files("ssl:9443:privateKey=/k.pem:certKey=/c.pem:interface=127.0.0.1:"
                             "extraCertChain=/chain.pem"),
            {"key": "/k.pem", "cert": "/c.pem", "chain": "/chain.pem", "dh": None})

    def test_refused(self):
        error = self.assertRaises(ValueError, ssl_server_files,
                                  "ssl:9443:privateKey=k.pem:sslmethod=TLSv1_METHOD")
        self.assertIn("sslmethod= is not supported", str(error))
        error = self.assertRaises(ValueError, ssl_server_files, "ssl:9443:colour=blue")
        self.assertIn("unknown argument colour=", str(error))


class ServerEndpointTests(TempDir, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        pki = PKI(self.dir)
        key, cert, _ = pki.issue()
        self.tls = load_server_tls(str(cert), str(key))

    def listen(self, description, tls=None):
        reactor = MemoryReactor()
        server_endpoint(reactor, description, tls).listen(Factory.forProtocol(Protocol))
        return reactor

    def test_plain(self):
        reactor = self.listen("tcp:9000:interface=127.0.0.1")
        self.assertEqual(reactor.sslServers, [])
        self.assertEqual(reactor.tcpServers[0][0], 9000)

    def test_tls_on_a_tcp_port(self):
        """The TCP port, interface and backlog stay; the relay's TLS options serve it."""
        for description, expected in [
            ("tcp:9443", (9443, 50, "")),
            ("tcp:9443:interface=127.0.0.1:backlog=7", (9443, 7, "127.0.0.1")),
            ("tcp:port=9443:interface=10.0.0.1", (9443, 50, "10.0.0.1")),
            ("tcp6:9443", (9443, 50, "::")),
            (r"tcp6:9443:interface=\:\:1", (9443, 50, "::1")),
            ("ssl:9443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1",
             (9443, 50, "127.0.0.1")),
        ]:
            reactor = self.listen(description, self.tls)
            self.assertEqual(reactor.tcpServers, [])
            [(port, factory, context, backlog, interface)] = reactor.sslServers
            self.assertEqual((port, backlog, interface), expected, description)
            self.assertIs(context, self.tls.options)

    def test_tls_port_mistakes(self):
        for description in ("tcp:9443:colour=blue", "tcp:interface=127.0.0.1",
                            "tcp:9443:9444", "tcp:port"):
            self.assertRaises(ValueError, server_endpoint, MemoryReactor(), description,
                              self.tls)


class ClientEndpointTests(TempDir, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.pki = PKI(self.dir / "pki")

    def test_plain_is_twisted(self):
        reactor = MemoryReactor()
        endpoint = client_endpoint(reactor, "tcp:localhost:9000",
                                   default_ca=str(self.pki.ca_file))
        self.assertNotIsInstance(endpoint, TLSClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][:2], ("localhost", 9000))

    def test_ca_needs_tls(self):
        error = self.assertRaises(TLSSetupError, client_endpoint, MemoryReactor(),
                                  "tcp:localhost:9000", ca=str(self.pki.ca_file))
        self.assertIn("is for a TLS server", str(error))

    def test_tls(self):
        endpoint = client_endpoint(MemoryReactor(), "tls:relay.example:9443",
                                   ca=str(self.pki.ca_file))
        self.assertIsInstance(endpoint, TLSClientEndpoint)
        self.assertIsInstance(endpoint.wrapped, twisted_endpoints.HostnameEndpoint)
        self.assertEqual(endpoint.creator.hostname, "relay.example")
        self.assertEqual(endpoint.creator.trust, f"a CA in {self.pki.ca_file}")
        self.assertIsNone(endpoint.problem)

    def test_tls_named_fields(self):
        endpoint = client_endpoint(MemoryReactor(),
                                   r"tls:host=\:\:1:port=9443:timeout=5:bindAddress=\:\:1")
        self.assertEqual(endpoint.creator.hostname, "::1")
        self.assertTrue(endpoint.creator.is_ip)

    def test_which_cas(self):
        """--ca, else trustRoots=, else the home's ca.pem when it exists, else the system's."""
        other = PKI(self.dir / "other", "Other CA")
        home_ca = str(other.ca_file)
        missing = str(self.dir / "no-such-ca.pem")
        for description, ca, default_ca, trust in [
            ("tls:h:1", str(self.pki.ca_file), home_ca, f"a CA in {self.pki.ca_file}"),
            (f"tls:h:1:trustRoots={self.pki.directory}", None, home_ca,
             f"a CA in {self.pki.directory}"),
            (f"tls:h:1:trustRoots={self.pki.ca_file}", None, None,
             f"a CA in {self.pki.ca_file}"),
            ("tls:h:1", None, home_ca, f"a CA in {home_ca}"),
            ("tls:h:1", None, missing, "a CA this system trusts"),
            ("tls:h:1", None, None, "a CA this system trusts"),
        ]:
            endpoint = client_endpoint(MemoryReactor(), description, ca=ca,
                                       default_ca=default_ca)
            self.assertEqual(endpoint.creator.trust, trust, (description, ca, default_ca))

    def test_mistakes(self):
        junk = self.dir / "junk.pem"
        junk.write_text("not a certificate")
        for description, ca, reason in [
            ("tls:h:1", str(self.dir / "none.pem"), "No such file or directory"),
            ("tls:h:1", str(junk), "holds no PEM certificate"),
            (f"tls:h:1:trustRoots={self.pki.directory}", str(self.pki.ca_file),
             "give one of them"),
            (f"tls:h:1:trustRoots={self.dir / 'empty'}", None, "No such file"),
        ]:
            error = self.assertRaises(TLSSetupError, client_endpoint, MemoryReactor(),
                                      description, ca=ca)
            self.assertIn(reason, str(error))
            self.assertNotIn("\n", str(error))
        for description in ("tls:h", "tls::9443", "tls:h:1:colour=blue", "tls:h:x"):
            self.assertRaises(ValueError, client_endpoint, MemoryReactor(), description,
                              ca=str(self.pki.ca_file))

    def test_client_speaks_tls_1_3_only(self):
        """The client's own minimum is TLS 1.3: it refuses a server stuck at 1.2 or 1.1."""
        key, cert, _ = self.pki.issue()
        tls = load_server_tls(str(cert), str(key))
        endpoint = client_endpoint(MemoryReactor(), "tls:localhost:1",
                                   ca=str(self.pki.ca_file))
        # Even at security level 0, the client's minimum version refuses them.
        endpoint.creator.options.getContext().set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        for highest in (TLSVersion.TLSv1_2, TLSVersion.TLSv1_1):
            old = CertificateOptions(privateKey=tls.options.privateKey,
                                     certificate=tls.options.certificate,
                                     insecurelyLowerMinimumTo=TLSVersion.TLSv1_0,
                                     lowerMaximumSecurityTo=highest)
            context = old.getContext()
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
            self.assertIsInstance(handshake(SSL.Connection(context, None),
                                            client_connection(endpoint.creator)), SSL.Error,
                                  highest.name)
        fine = client_connection(endpoint.creator)
        self.assertIsNone(handshake(server_connection(tls), fine))
        self.assertEqual(fine.get_protocol_version_name(), "TLSv1.3")


@implementer(IHandshakeListener)
class _Peer(Protocol):
    """
    One end of a loopback TLS connection: the TLS version it agreed on (None
    without a handshake), what it received, and why it ended (C{lost}
    fires then).  A client end closes once something arrives; a server end
    greets with C{greeting}.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.version: str | None = None
        self.received = b""
        self.reason = None
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def handshakeCompleted(self) -> None:
        self.version = self.transport.getHandle().get_protocol_version_name()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.greeting:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Peers(Factory):
    """Builds L{_Peer}s and keeps them, so a test waits for every end to close."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.peers: list[_Peer] = []

    def buildProtocol(self, addr) -> _Peer:
        peer = _Peer(self.greeting)
        self.peers.append(peer)
        return peer


@implementer(IOpenSSLClientConnectionCreator)
class _PlainTLSClient:
    """
    A TLS client with OpenSSL's defaults, up to C{maximum} (a pyOpenSSL
    version constant) when given; it checks no certificate: only the
    versions matter here.
    """

    def __init__(self, maximum: int | None = None) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        if maximum is not None:
            self.context.set_max_proto_version(maximum)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class LoopbackTLSVersionTests(TempDir, TestCase):
    """
    Real TLS handshakes over real loopback TCP: the relay and the client
    both speak TLS 1.3 and nothing older, so the TLS exporter that binds
    an authentication (L{mailrelay.channel}) is unique to its connection.
    A TLS 1.2 connection without the extended master secret can share its
    master secret, and so its exporter, with another connection (the
    triple handshake).
    """

    def setUp(self):
        super().setUp()
        self.pki = PKI(self.dir / "pki")
        key, cert, _ = self.pki.issue(dns=(), ips=("127.0.0.1",))
        self.tls = load_server_tls(str(cert), str(key))

    @inlineCallbacks
    def listen_relay(self):
        """A relay (in memory) served with the relay's own TLS options; its port number."""
        factory = RelayFactory(MemoryStore(), Clock(), name="relay")
        factory.storeReady()
        self.relay_ends: list[Deferred] = []
        build = factory.buildProtocol

        def buildProtocol(addr):
            session, ended = build(addr), Deferred()
            lost = session.connectionLost

            def connectionLost(reason):
                lost(reason)
                ended.callback(None)

            session.connectionLost = connectionLost
            self.relay_ends.append(ended)
            return session

        factory.buildProtocol = buildProtocol
        port = yield server_endpoint(reactor, "tcp:0:interface=127.0.0.1",
                                     self.tls).listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def listen(self, options):
        """A server greeting each client in TLS with C{options}: its port number."""
        self.server = _Peers(b"hello")
        port = yield twisted_endpoints.SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1").listen(self.server)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def exchange(self, endpoint):
        """Connect through C{endpoint}; the client's end, once the connection has ended."""
        peer = _Peer()
        factory = Factory()
        factory.buildProtocol = lambda addr: peer
        yield endpoint.connect(factory)
        yield peer.lost
        return peer

    def tls_client(self, port, maximum=None):
        return twisted_endpoints.wrapClientTLS(
            _PlainTLSClient(maximum),
            twisted_endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))

    @inlineCallbacks
    def test_relay_refuses_tls_1_2(self):
        """
        A client that offers TLS 1.2 at most gets no handshake and no HELLO;
        the same client offering 1.3 gets both.
        """
        port = yield self.listen_relay()
        modern = yield self.exchange(self.tls_client(port))
        self.assertEqual(modern.version, "TLSv1.3")
        [hello] = wire.FrameBuffer().feed(modern.received)
        self.assertIsInstance(hello, wire.Hello)
        self.assertEqual(hello.binding, wire.BINDING_TLS_EXPORTER)
        old = yield self.exchange(self.tls_client(port, SSL.TLS1_2_VERSION))
        self.assertIsNone(old.version)
        self.assertEqual(old.received, b"")
        self.assertTrue(old.reason.check(SSL.Error), old.reason)
        yield gatherResults(self.relay_ends)

    @inlineCallbacks
    def test_client_refuses_a_tls_1_2_server(self):
        """
        The client's endpoint refuses a server with a certificate it trusts
        that speaks TLS 1.2 at most; the same server allowed 1.3 is fine.
        """
        for highest, version in ((TLSVersion.TLSv1_2, None), (None, "TLSv1.3")):
            extra = {} if highest is None else {"lowerMaximumSecurityTo": highest}
            port = yield self.listen(CertificateOptions(
                privateKey=self.tls.options.privateKey,
                certificate=self.tls.options.certificate, **extra))
            endpoint = client_endpoint(reactor, f"tls:127.0.0.1:{port}",
                                       ca=str(self.pki.ca_file))
            peer = yield self.exchange(endpoint)
            self.assertEqual(peer.version, version, highest and highest.name)
            self.assertIsNone(endpoint.problem)  # the certificate was fine
            if version is None:
                self.assertEqual(peer.received, b"")
                self.assertTrue(peer.reason.check(SSL.Error), peer.reason)
                self.assertIn("(the relay must speak TLS 1.3; this client speaks nothing "
                              "older)", tls_refusal(endpoint, describe_disconnect(peer.reason)))
            else:
                self.assertEqual(peer.received, b"hello")
            yield gatherResults([p.lost for p in self.server.peers])


class VerificationTests(TempDir, SynchronousTestCase):
    """The client's check of the relay's certificate, and what it says when it refuses."""

    def setUp(self):
        super().setUp()
        self.pki = PKI(self.dir / "pki")

    def connect(self, host: str, ca, **issue):
        key, cert, certificate = self.pki.issue(**issue)
        tls = load_server_tls(str(cert), str(key))
        endpoint = client_endpoint(MemoryReactor(), f"tls:{host}:9443", ca=str(ca))
        error = handshake(server_connection(tls), client_connection(endpoint.creator))
        return error, endpoint

    def test_trusted(self):
        for host, issue in [("localhost", {}), ("127.0.0.1", {"ips": ("127.0.0.1",)}),
                            ("relay.example.org", {"dns": ("*.example.org",)})]:
            error, endpoint = self.connect(host, self.pki.ca_file, **issue)
            self.assertIsNone(error, host)
            self.assertIsNone(endpoint.problem)

    def test_unknown_ca(self):
        other = PKI(self.dir / "other", "Other CA")
        error, endpoint = self.connect("localhost", other.ca_file)
        self.assertIsInstance(error, SSL.Error)
        self.assertEqual(endpoint.problem,
                         f"the relay's TLS certificate (CN=localhost), issued by CN=Test CA, "
                         f"is not signed by a CA in {other.ca_file} (unknown CA)")

    def test_self_signed(self):
        """A self-signed certificate that the client was not given is an unknown CA too."""
        error, endpoint = self.connect("localhost", PKI(self.dir / "x", "X").ca_file)
        self.assertIn("(unknown CA)", endpoint.problem)

    def test_host_name_mismatch(self):
        for host, issue, names in [
            ("relay.example.org", {}, "localhost"),
            ("127.0.0.1", {}, "localhost"),
            ("localhost", {"dns": (), "ips": ("127.0.0.1",)}, "127.0.0.1"),
            ("localhost", {"dns": (), "ips": ()}, "no host name at all"),
        ]:
            error, endpoint = self.connect(host, self.pki.ca_file, **issue)
            self.assertIsInstance(error, SSL.Error)
            self.assertEqual(endpoint.problem,
                             f"the relay's TLS certificate is for {names}, not {host} "
                             f"(host name mismatch)")

    def test_expired(self):
        error, endpoint = self.connect(
            "localhost", self.pki.ca_file,
            not_before=datetime.datetime(2024, 12, 1, tzinfo=datetime.timezone.utc),
            not_after=datetime.datetime(
                2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))
        self.assertIsInstance(error, SSL.Error)
        self.assertEqual(endpoint.problem,
                         "the relay's TLS certificate (CN=localhost) expired on "
                         "2025-01-02 03:04:05 UTC (expired)")

    def test_not_yet_valid(self):
        error, endpoint = self.connect("localhost", self.pki.ca_file,
                                       not_before=NOW + DAY, not_after=NOW + 2 * DAY)
        self.assertIn("is not valid before", endpoint.problem)

    def test_problem_reset_per_connection(self):
        other = PKI(self.dir / "other", "Other CA")
        _, endpoint = self.connect("localhost", other.ca_file)
        self.assertIsNotNone(endpoint.problem)
        client_connection(endpoint.creator)
        self.assertIsNone(endpoint.problem)


class RefusalTests(SynchronousTestCase):
    def test_tls_refusal(self):
        pki_dir = Path(self.mktemp())
        pki = PKI(pki_dir)
        endpoint = client_endpoint(MemoryReactor(), "tls:h:1", ca=str(pki.ca_file))
        self.assertIsNone(tls_refusal(endpoint, "the relay closed the connection"))
        self.assertEqual(
            tls_refusal(endpoint, "TLS failed: wrong version number (check the relay's "
                                  "certificate against the host name and trustRoots)"),
            "the TLS handshake failed: wrong version number (does the relay serve TLS on "
            "that port?)")
        for detail in ("tlsv1 alert protocol version", "unsupported protocol"):
            self.assertEqual(
                tls_refusal(endpoint, f"TLS failed: {detail} (check the relay's certificate "
                                      f"against the host name and trustRoots)"),
                f"the TLS handshake failed: {detail} (the relay must speak TLS 1.3; this "
                f"client speaks nothing older)")
        endpoint.creator.problem = "the relay's TLS certificate is for x, not h"
        self.assertEqual(tls_refusal(endpoint, "TLS failed: whatever"),
                         "the relay's TLS certificate is for x, not h")
        plain = client_endpoint(MemoryReactor(), "tcp:h:1")
        self.assertIsNone(tls_refusal(plain, "TLS failed: whatever"))

    def test_ca_file(self):
        pki = PKI(Path(self.mktemp()))
        bundle = pki.directory / "bundle.pem"
        other = PKI(pki.directory / "o", "Other")
        bundle.write_bytes(pki.ca_file.read_bytes() + b"\n" + other.ca_file.read_bytes())
        self.assertEqual(load_ca_certificates(str(bundle)),
                         [pki.certificate, other.certificate])
