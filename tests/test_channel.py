"""
What a session needs of its connection.  Authentication bound to it: the
TLS channel binding, and the relay id a client pins per server, which
together stop a relay (or anyone a client was induced to connect to) from
passing another relay's challenge to the client and logging in there with
the answer.  And no delay for small frames.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailrelay import keys, wire
from mailrelay.channel import no_delay
from mailrelay.client.protocol import ClientProtocol, RelayError, UntrustedRelay
from mailrelay.relay.protocol import RelayFactory
from mailrelay.relay.store.memory import MemoryStore

E = wire.ErrorCode
ALICE = keys.Identity.generate("alice", bits=2048)
CHALLENGE = bytes(range(32))


class FakeTLSConnection:
    def __init__(self, secret: bytes, version: str = "TLSv1.3") -> None:
        self.secret = secret
        self.version = version

    def export_keying_material(self, label, olen, context=None):
        if label != wire.TLS_EXPORTER_LABEL:
            raise AssertionError(f"exporter asked for label {label!r}")
        return (self.secret * olen)[:olen]

    def get_protocol_version_name(self) -> str:
        return self.version


@implementer(ISSLTransport)
class FakeTLSTransport(StringTransportWithDisconnection):
    """A transport that says it is TLS, with a given exporter secret and TLS version."""

    def __init__(self, secret: bytes = b"\x42", version: str = "TLSv1.3") -> None:
        super().__init__()
        self.connection = FakeTLSConnection(secret, version)

    def getHandle(self):
        return self.connection

    def getPeerCertificate(self):
        return None


def frames(transport) -> list:
    out = wire.FrameBuffer().feed(transport.value())
    transport.clear()
    return out


class RelayBindingTests(SynchronousTestCase):
    def connect(self, transport):
        factory = RelayFactory(MemoryStore(), Clock(), name="relay")
        factory.storeReady()
        proto = factory.buildProtocol(None)
        transport.protocol = proto
        proto.makeConnection(transport)
        [hello] = frames(transport)
        return proto, hello

    def auth(self, proto, hello, binding: bytes) -> None:
        transcript = wire.auth_transcript(hello.challenge, hello.relay, "alice", True, binding)
        proto.dataReceived(wire.encode(wire.Auth(
            wire.PROTOCOL_VERSION, "alice", ALICE.public_der, ALICE.sign(transcript))))

    def test_tls_relay_asks_for_binding(self):
        _, hello = self.connect(FakeTLSTransport())
        self.assertEqual(hello.binding, wire.BINDING_TLS_EXPORTER)

    def test_plain_relay_asks_for_none(self):
        _, hello = self.connect(StringTransportWithDisconnection())
        self.assertEqual(hello.binding, wire.BINDING_NONE)

    def test_answer_bound_to_this_connection(self):
        transport = FakeTLSTransport(b"\x42")
        proto, hello = self.connect(transport)
        self.auth(proto, hello, b"\x42" * 32)
        [welcome] = frames(transport)
        self.assertIsInstance(welcome, wire.Welcome)

    def test_answer_made_on_another_connection_refused(self):
        """
        An answer signed over another TLS connection's binding (the victim's
        connection to whoever forwarded the challenge) does not log in.
        """
        transport = FakeTLSTransport(b"\x42")
        proto, hello = self.connect(transport)
        self.auth(proto, hello, b"\x17" * 32)
        [error] = frames(transport)
        self.assertEqual(error.code, E.AUTH_FAILED)
        self.assertFalse(transport.connected)

    def test_answer_without_binding_refused(self):
        transport = FakeTLSTransport(b"\x42")
        proto, hello = self.connect(transport)
        self.auth(proto, hello, b"")
        [error] = frames(transport)
        self.assertEqual(error.code, E.AUTH_FAILED)


class ClientBindingTests(SynchronousTestCase):
    def connect(self, transport, **settings):
        client = ClientProtocol(ALICE, **settings)
        transport.protocol = client
        client.makeConnection(transport)
        return client

    def test_signs_over_the_binding(self):
        transport = FakeTLSTransport(b"\x42")
        self.connect(transport)
        transport.protocol.dataReceived(wire.encode(wire.Hello(
            wire.PROTOCOL_VERSION, "relay", CHALLENGE, wire.BINDING_TLS_EXPORTER)))
        [auth] = frames(transport)
        transcript = wire.auth_transcript(CHALLENGE, "relay", "alice", False, b"\x42" * 32)
        self.assertTrue(keys.verify(ALICE.public_key, auth.signature, transcript))

    def test_binding_asked_on_plain_connection_refused(self):
        """
        A HELLO asking for a TLS binding over a connection that is not TLS
        was made for someone else's connection: no answer is given.
        """
        transport = StringTransportWithDisconnection()
        client = self.connect(transport)
        client.dataReceived(wire.encode(wire.Hello(
            wire.PROTOCOL_VERSION, "relay", CHALLENGE, wire.BINDING_TLS_EXPORTER)))
        [error] = frames(transport)
        self.assertEqual(error.code, E.AUTH_FAILED)
        self.assertFalse(transport.connected)
        self.assertIsInstance(self.failureResultOf(client.ready).value, UntrustedRelay)

    def test_binding_asked_on_tls_older_than_1_3_refused(self):
        """
        The exporter of a TLS 1.2 connection is not unique to it (without the
        extended master secret, a server can give two connections one master
        secret): a binding from anything but TLS 1.3 binds nothing, and no
        answer is given.
        """
        for version in ("TLSv1.2", "TLSv1.1", "TLSv1.3x", ""):
            transport = FakeTLSTransport(b"\x42", version)
            client = self.connect(transport)
            client.dataReceived(wire.encode(wire.Hello(
                wire.PROTOCOL_VERSION, "relay", CHALLENGE, wire.BINDING_TLS_EXPORTER)))
            [error] = frames(transport)
            self.assertIsInstance(error, wire.Error, version)  # not an Auth
            self.assertEqual(error.code, E.AUTH_FAILED)
            self.assertIn("TLS 1.3", error.text)
            self.assertFalse(transport.connected)
            refusal = self.failureResultOf(client.ready, UntrustedRelay).value
            self.assertIn(repr(version), str(refusal))

    def test_relay_with_another_id_refused(self):
        home = keys.Home(self.mktemp())
        home.pin_relay("tcp:relay.example:9000", "relay-real")
        transport = StringTransportWithDisconnection()
        client = self.connect(
            transport, relay_check=lambda rid: home.pin_relay("tcp:relay.example:9000", rid))
        client.dataReceived(wire.encode(wire.Hello(
            wire.PROTOCOL_VERSION, "relay-impostor", CHALLENGE)))
        [error] = frames(transport)
        self.assertEqual(error.code, E.AUTH_FAILED)
        self.assertIn("relay-impostor", error.text)
        self.assertIn("relay-real", str(self.failureResultOf(client.ready).value))


class ClientHandshakeLimitTests(SynchronousTestCase):
    def test_large_frame_before_welcome_refused(self):
        """Until WELCOME a client takes only handshake-sized frames from its peer."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.LENGTH_PREFIX.pack(wire.MIN_FRAME_ROOM + wire.FRAME_OVERHEAD + 1))
        [error] = frames(transport)
        self.assertEqual(error.code, E.MALFORMED_FRAME)
        self.assertEqual(self.failureResultOf(client.ready, RelayError).value.code,
                         E.MALFORMED_FRAME)

    def test_relay_not_pinned_when_refused_for_another_reason(self):
        """A relay refused for its binding request is not pinned on the way."""
        home = keys.Home(self.mktemp())
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(
            ALICE, relay_check=lambda rid: home.pin_relay("tcp:relay.example:9000", rid))
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(
            wire.PROTOCOL_VERSION, "relay-x", CHALLENGE, wire.BINDING_TLS_EXPORTER)))
        self.assertFalse(home.path.joinpath("relays").exists())
        self.failureResultOf(client.ready, UntrustedRelay)


class RecordingTransport(StringTransportWithDisconnection):
    """A transport that remembers what was asked of TCP_NODELAY."""

    no_delay = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class NoDelayTests(TestCase):
    """
    Frames are small (ACCEPTED, ACK): neither end holds them back for the
    peer's delayed acknowledgement (Nagle's algorithm), which would add tens
    of milliseconds to a message's way through the relay.
    """

    @inlineCallbacks
    def test_relay_sessions_on_real_tcp(self):
        factory = RelayFactory(MemoryStore(), reactor, name="relay")
        factory.storeReady()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        peer = yield endpoint.connect(Factory.forProtocol(Protocol))
        self.addCleanup(peer.transport.loseConnection)
        while not factory.sessions:
            yield deferLater(reactor, 0.01, lambda: None)
        (session,) = factory.sessions
        handle = session.transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        session.transport.loseConnection()

    def test_client(self):
        transport = RecordingTransport()
        ClientProtocol(ALICE).makeConnection(transport)
        self.assertIs(transport.no_delay, True)

    def test_transport_without_tcp(self):
        """A transport with no such setting (a pipe, a test) is left alone."""
        no_delay(StringTransportWithDisconnection())
