"""
Tests for L{mailrelay.relay.protocol}: the relay's side of a session, driven
over in-memory transports with a fake clock.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import envelope, keys, wire
from mailrelay.encoding import Writer
from mailrelay.relay.mailbox import DEFAULT_WINDOW, RETRY_AFTER_STORE_ERROR, TAIL_LIMIT
from mailrelay.relay.protocol import (
    BUSY_GRACE,
    MAX_PENDING_ANSWERS,
    BusyRefusal,
    FrameClock,
    RelayFactory,
    RelaySession,
    SendRate,
)
from mailrelay.relay.store import Quota
from mailrelay.relay.store.memory import MemoryStore

E = wire.ErrorCode
RELAY = "relay.example"

# RSA key generation is slow: each key is made once per process and shared.
_keys: dict[tuple[str, int], rsa.RSAPrivateKey] = {}


def private_key(tag: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    if (tag, bits) not in _keys:
        # Straight from cryptography: keys.Identity.generate refuses < 2048 bits.
        _keys[tag, bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _keys[tag, bits]


def ident(name: str, key_tag: str | None = None, bits: int = 2048) -> keys.Identity:
    """Identity C{name}; its key is the one cached under C{key_tag} (default: C{name})."""
    return keys.Identity(name, private_key(key_tag or name, bits))


def der(identity: keys.Identity) -> bytes:
    return identity.public_der


def mid(n: int) -> bytes:
    """A recognisable 16-byte message id."""
    return n.to_bytes(wire.MESSAGE_ID_SIZE, "big")


def seal(sender: keys.Identity, recipient: keys.Identity, text: bytes = b"text",
         message_id: bytes | None = None) -> bytes:
    return envelope.seal(sender, recipient.name, recipient.public_key, text,
                         message_id=message_id)


def forge(sender: keys.Identity, recipient: keys.Identity, message_id: bytes,
          timestamp: int, seq: int) -> bytes:
    """
    A validly signed and encrypted envelope with any u64 timestamp and
    sequence number, which L{envelope.seal} refuses to make: what a hostile
    sender can build by hand.
    """
    header = envelope.Header(
        envelope.VERSION, envelope.SUITE_RSA, sender.name, sender.fingerprint,
        recipient.name, recipient.fingerprint, message_id, timestamp, seq,
    ).encode()
    content_key = os.urandom(32)
    nonce = os.urandom(envelope.NONCE_SIZE)
    ciphertext = AESGCM(content_key).encrypt(nonce, b"jam", header)
    wrapped = recipient.public_key.encrypt(content_key, envelope.OAEP)
    signed = Writer().raw(header).blob16(wrapped).raw(nonce).blob32(ciphertext).getvalue()
    return Writer().raw(signed).blob16(sender.sign(signed)).getvalue()


class Client:
    """One connection to the relay under test, seen from the client side."""

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.proto
        self.reader = wire.FrameBuffer(factory.max_envelope)
        self.proto.makeConnection(self.transport)
        first = self.frames()
        if not (len(first) == 1 and isinstance(first[0], wire.Hello)):
            raise AssertionError(first)
        self.hello: wire.Hello = first[0]

    def frames(self) -> list:
        """Every frame the relay wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return self.reader.feed(data)

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def send(self, frame) -> None:
        self.feed(wire.encode(frame))

    def auth(self, identity: keys.Identity, *, challenge: bytes | None = None,
             relay: str | None = None, version: int = wire.PROTOCOL_VERSION,
             public_key: bytes | None = None, signer: keys.Identity | None = None) -> None:
        """Send an Auth frame, by default a valid one for C{identity}."""
        transcript = wire.auth_transcript(
            self.hello.challenge if challenge is None else challenge,
            self.hello.relay if relay is None else relay,
            identity.name,
        )
        signature = (signer or identity).sign(transcript)
        self.send(wire.Auth(version, identity.name,
                            identity.public_der if public_key is None else public_key,
                            signature))

    @property
    def connected(self) -> bool:
        return self.transport.connected

    def disconnect(self) -> None:
        self.transport.loseConnection()


class RelayTestMixin:
    window = 64

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = self.makeStore()
        self.factory = RelayFactory(self.store, self.clock, name=RELAY, window=self.window)
        self.factory.storeReady()

    def makeStore(self):
        return MemoryStore()

    def connect(self, identity: keys.Identity | None = None) -> Client:
        """A new connection; with C{identity}, authenticated and its Welcome checked."""
        client = Client(self.factory)
        if identity is not None:
            client.auth(identity)
            frames = client.frames()
            self.assertIsInstance(frames[0], wire.Welcome, repr(frames))
            client.welcome = frames[0]
            client.after_welcome = frames[1:]
        return client

    def register(self, *identities: keys.Identity) -> None:
        """Register each identity's key by authenticating once, then disconnect."""
        for identity in identities:
            self.connect(identity).disconnect()

    def count(self, recipient: str) -> int:
        return self.successResultOf(self.factory.store.count(recipient))

    def assertFatal(self, client: Client, code: wire.ErrorCode, frames=None) -> wire.Error:
        """The relay sent an Error with the fatal C{code} last, and hung up."""
        if frames is None:
            frames = client.frames()
        self.assertTrue(frames, "the relay sent nothing")
        error = frames[-1]
        self.assertIsInstance(error, wire.Error, repr(frames))
        self.assertEqual(error.code, code, error)
        self.assertTrue(error.fatal)
        self.assertEqual(error.ref, b"")
        self.assertFalse(client.connected, "the relay did not close the connection")
        self.assertEqual(client.proto.state, "closed")
        self.assertNotIn(client.proto, self.factory.sessions)
        return error

    def assertRefused(self, client: Client, code: wire.ErrorCode, ref: bytes, frames=None):
        """The relay answered with exactly one non-fatal Error and kept the session."""
        if frames is None:
            frames = client.frames()
        self.assertEqual(len(frames), 1, frames)
        error = frames[0]
        self.assertIsInstance(error, wire.Error, repr(frames))
        self.assertEqual(error.code, code, error)
        self.assertFalse(error.fatal)
        self.assertEqual(error.ref, ref)
        self.assertTrue(client.connected)
        self.assertEqual(client.proto.state, "ready")
        return error

    def assertStillServes(self, client: Client) -> None:
        """The session still answers: a Ping gets its Pong."""
        client.send(wire.Ping(b"stillok!"))
        self.assertEqual(client.frames(), [wire.Pong(b"stillok!")])
        self.assertTrue(client.connected)

    def delivered(self, frames) -> list[wire.Deliver]:
        for f in frames:
            self.assertIsInstance(f, wire.Deliver, repr(frames))
        return list(frames)


A = ident("a")
B = ident("b")
C = ident("c")
B_OTHER_KEY = ident("b", key_tag="X")
A_OTHER_KEY = ident("a", key_tag="X")
A_WEAK_KEY = ident("a", key_tag="weak", bits=1024)


class HelloTests(RelayTestMixin, SynchronousTestCase):
    def test_hello(self):
        client = Client(self.factory)
        hello = client.hello
        self.assertEqual(hello.version, wire.PROTOCOL_VERSION)
        self.assertEqual(hello.relay, RELAY)
        self.assertEqual(len(hello.challenge), wire.CHALLENGE_SIZE)
        self.assertEqual(client.proto.state, "handshake")
        self.assertTrue(client.connected)

    def test_fresh_challenges(self):
        challenges = {Client(self.factory).hello.challenge for _ in range(5)}
        self.assertEqual(len(challenges), 5)

    def test_registers_as_push_producer(self):
        client = Client(self.factory)
        self.assertIs(client.transport.producer, client.proto)
        self.assertTrue(client.transport.streaming)


class AuthTests(RelayTestMixin, SynchronousTestCase):
    def test_welcome_registers_first_time(self):
        client = Client(self.factory)
        client.auth(A)
        self.assertEqual(client.frames(),
                         [wire.Welcome(True, 0, self.factory.max_envelope, self.factory.ttl)])
        self.assertEqual(client.proto.state, "ready")
        self.assertEqual(client.proto.identity, "a")
        self.assertEqual(self.successResultOf(self.factory.directory.lookup("a")), der(A))

    def test_welcome_known_key(self):
        self.connect(A).disconnect()
        client = Client(self.factory)
        client.auth(A)
        self.assertEqual(client.frames(),
                         [wire.Welcome(False, 0, self.factory.max_envelope, self.factory.ttl)])

    def test_welcome_max_envelope(self):
        factory = RelayFactory(MemoryStore(), self.clock, name=RELAY, max_envelope=12345)
        factory.storeReady()
        client = Client(factory)
        client.auth(A)
        (welcome,) = client.frames()
        self.assertEqual(welcome.max_envelope, 12345)

    def test_welcome_counts_queued(self):
        self.register(B)
        sender = self.connect(A)
        for n in range(3):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        self.assertEqual(len(sender.frames()), 3)
        receiver = self.connect(B)
        self.assertFalse(receiver.welcome.registered)
        self.assertEqual(receiver.welcome.queued, 3)

    def test_auth_deadline_cancelled(self):
        client = self.connect(A)
        # Only the idle timer is left once authenticated.
        (idle,) = self.clock.getDelayedCalls()
        self.assertEqual(idle.getTime(), self.factory.idle_timeout)
        self.clock.advance(self.factory.auth_timeout * 2)
        self.assertTrue(client.connected)
        self.assertEqual(client.frames(), [])

    def test_bad_signature_other_challenge(self):
        client = Client(self.factory)
        client.auth(A, challenge=os.urandom(wire.CHALLENGE_SIZE))
        self.assertFatal(client, E.AUTH_FAILED)
        self.assertIsNone(self.successResultOf(self.factory.directory.lookup("a")))

    def test_replayed_auth(self):
        """An Auth recorded on one connection does not authenticate another."""
        first = Client(self.factory)
        second = Client(self.factory)
        second.auth(A, challenge=first.hello.challenge)
        self.assertFatal(second, E.AUTH_FAILED)

    def test_bad_signature_other_relay(self):
        client = Client(self.factory)
        client.auth(A, relay="another-relay")
        self.assertFatal(client, E.AUTH_FAILED)

    def test_signature_by_other_key(self):
        client = Client(self.factory)
        client.auth(A, signer=A_OTHER_KEY)
        self.assertFatal(client, E.AUTH_FAILED)
        self.assertIsNone(self.successResultOf(self.factory.directory.lookup("a")))

    def test_key_too_small(self):
        client = Client(self.factory)
        client.auth(A_WEAK_KEY)  # correctly signed, but 1024 bits
        self.assertFatal(client, E.AUTH_FAILED)
        self.assertIsNone(self.successResultOf(self.factory.directory.lookup("a")))

    def test_key_not_der(self):
        client = Client(self.factory)
        client.auth(A, public_key=b"not a key")
        self.assertFatal(client, E.AUTH_FAILED)

    def test_wrong_version(self):
        client = Client(self.factory)
        client.auth(A, version=wire.PROTOCOL_VERSION + 1)
        self.assertFatal(client, E.UNSUPPORTED_VERSION)
        self.assertIsNone(self.successResultOf(self.factory.directory.lookup("a")))

    def test_key_conflict(self):
        self.register(A)
        client = Client(self.factory)
        client.auth(A_OTHER_KEY)  # a valid proof, for another key than the registered one
        self.assertFatal(client, E.KEY_CONFLICT)
        self.assertEqual(self.successResultOf(self.factory.directory.lookup("a")), der(A))
        self.assertIsNone(client.proto.identity)

    def test_key_conflict_does_not_supersede(self):
        """An impostor refused for its key does not take over the real session."""
        real = self.connect(A)
        impostor = Client(self.factory)
        impostor.auth(A_OTHER_KEY)
        self.assertFatal(impostor, E.KEY_CONFLICT)
        self.assertEqual(real.frames(), [])
        self.assertStillServes(real)

    def test_auth_timeout(self):
        client = Client(self.factory)
        self.clock.advance(self.factory.auth_timeout - 0.1)
        self.assertTrue(client.connected)
        self.assertEqual(client.frames(), [])
        self.clock.advance(0.1)
        self.assertFatal(client, E.AUTH_TIMEOUT)

    def test_auth_timeout_not_reset_by_frames(self):
        """Frames do not extend the handshake: the deadline counts from the Hello."""
        client = Client(self.factory)
        self.clock.advance(self.factory.auth_timeout - 1)
        client.feed(wire.encode(wire.Ping(b"12345678"))[:3])  # a partial frame
        self.clock.advance(1)
        self.assertFatal(client, E.AUTH_TIMEOUT)

    def _before_auth(self, frame) -> Client:
        client = Client(self.factory)
        client.send(frame)
        self.assertFatal(client, E.UNEXPECTED_FRAME)
        return client

    def test_send_before_auth(self):
        self.register(A, B)
        self._before_auth(wire.Send(seal(A, B)))
        self.assertEqual(self.count("b"), 0)

    def test_lookup_before_auth(self):
        self.register(A)
        self._before_auth(wire.Lookup("a"))

    def test_ping_before_auth(self):
        self._before_auth(wire.Ping(b"12345678"))

    def test_ack_before_auth(self):
        self._before_auth(wire.Ack(mid(1)))

    def test_pong_before_auth(self):
        self._before_auth(wire.Pong(b"12345678"))

    def test_error_before_auth(self):
        self._before_auth(wire.Error(E.UNKNOWN_MESSAGE, b"", "hello?"))

    def test_frames_after_failed_auth_discarded(self):
        client = Client(self.factory)
        transcript = wire.auth_transcript(os.urandom(wire.CHALLENGE_SIZE), RELAY, "a")
        client.feed(
            wire.encode(wire.Auth(wire.PROTOCOL_VERSION, "a", der(A), A.sign(transcript)))
            + wire.encode(wire.Ping(b"12345678"))
            + wire.encode(wire.Lookup("a"))
        )
        frames = client.frames()
        self.assertEqual(len(frames), 1, frames)
        self.assertFatal(client, E.AUTH_FAILED, frames)

    def test_auth_after_auth(self):
        client = self.connect(A)
        client.auth(A)
        self.assertFatal(client, E.UNEXPECTED_FRAME)

    def test_relay_frame_from_client(self):
        client = self.connect(A)
        client.send(wire.Welcome(True, 0, 0))
        self.assertFatal(client, E.UNEXPECTED_FRAME)

    def test_frames_after_auth_in_same_packet(self):
        """Frames following Auth in one read are handled after it, in order."""
        self.register(B)
        client = Client(self.factory)
        transcript = wire.auth_transcript(client.hello.challenge, RELAY, "a")
        data = (
            wire.encode(wire.Auth(wire.PROTOCOL_VERSION, "a", der(A), A.sign(transcript)))
            + wire.encode(wire.Lookup("b"))
            + wire.encode(wire.Ping(b"abcdefgh"))
        )
        client.feed(data)
        self.assertEqual(client.frames(), [
            wire.Welcome(True, 0, self.factory.max_envelope, self.factory.ttl),
            wire.Key("b", der(B)),
            wire.Pong(b"abcdefgh"),
        ])


class MalformedTests(RelayTestMixin, SynchronousTestCase):
    UNKNOWN_TYPE = wire.LENGTH_PREFIX.pack(1) + b"\x99"
    TRAILING = wire.LENGTH_PREFIX.pack(1 + wire.PING_SIZE + 1) + b"\x30" + b"12345678" + b"!"
    EMPTY = wire.LENGTH_PREFIX.pack(0)

    def oversized(self) -> bytes:
        # Only the prefix: the relay must refuse before waiting for the body.
        return wire.LENGTH_PREFIX.pack(wire.max_frame_for(self.factory.max_envelope) + 1)

    def check(self, data: bytes, authenticated: bool) -> None:
        client = self.connect(A) if authenticated else Client(self.factory)
        client.feed(data)
        self.assertFatal(client, E.MALFORMED_FRAME)
        # Whatever comes next is ignored.
        client.send(wire.Ping(b"12345678"))
        self.assertEqual(client.frames(), [])

    def test_unknown_type_handshake(self):
        self.check(self.UNKNOWN_TYPE, False)

    def test_unknown_type_ready(self):
        self.check(self.UNKNOWN_TYPE, True)

    def test_oversized_handshake(self):
        self.check(self.oversized(), False)

    def test_oversized_ready(self):
        self.check(self.oversized(), True)

    def test_trailing_handshake(self):
        self.check(self.TRAILING, False)

    def test_trailing_ready(self):
        self.check(self.TRAILING, True)

    def test_empty_frame_ready(self):
        self.check(self.EMPTY, True)

    def test_oversized_send_ready(self):
        """A Send whose envelope is over the relay's limit is refused as malformed."""
        small = RelayFactory(MemoryStore(), self.clock, name=RELAY, max_envelope=2000)
        small.storeReady()
        self.factory = small
        client = self.connect(A)
        body = Writer().u8(wire.Send.TYPE).blob32(b"x" * 2001).getvalue()
        client.feed(wire.LENGTH_PREFIX.pack(len(body)) + body)
        self.assertFatal(client, E.MALFORMED_FRAME)

    def test_malformed_after_partial_frame_across_reads(self):
        client = self.connect(A)
        data = self.UNKNOWN_TYPE
        client.feed(data[:2])
        self.assertTrue(client.connected)
        client.feed(data[2:])
        self.assertFatal(client, E.MALFORMED_FRAME)


class IdleTimeoutTests(RelayTestMixin, SynchronousTestCase):
    def test_idle_timeout(self):
        client = self.connect(A)
        self.clock.advance(self.factory.idle_timeout - 1)
        self.assertTrue(client.connected)
        self.clock.advance(1)
        self.assertFatal(client, E.IDLE_TIMEOUT)

    def test_frame_resets_idle_timeout(self):
        client = self.connect(A)
        self.clock.advance(self.factory.idle_timeout - 1)
        client.send(wire.Ping(b"keepaliv"))
        self.assertEqual(client.frames(), [wire.Pong(b"keepaliv")])
        self.clock.advance(self.factory.idle_timeout - 1)
        self.assertTrue(client.connected)
        self.assertEqual(client.frames(), [])
        self.clock.advance(1)
        self.assertFatal(client, E.IDLE_TIMEOUT)

    def test_no_timers_left_after_disconnect(self):
        client = self.connect(A)
        client.disconnect()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timers_left_after_handshake_disconnect(self):
        client = Client(self.factory)
        client.disconnect()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LookupPingTests(RelayTestMixin, SynchronousTestCase):
    def test_lookup_known(self):
        self.register(B)
        client = self.connect(A)
        client.send(wire.Lookup("b"))
        self.assertEqual(client.frames(), [wire.Key("b", der(B))])
        client.send(wire.Lookup("a"))
        self.assertEqual(client.frames(), [wire.Key("a", der(A))])

    def test_lookup_unknown(self):
        client = self.connect(A)
        client.send(wire.Lookup("nobody"))
        self.assertRefused(client, E.UNKNOWN_IDENTITY, b"nobody")
        self.assertStillServes(client)

    def test_ping(self):
        client = self.connect(A)
        client.send(wire.Ping(b"\x00\x01\x02\x03\xfc\xfd\xfe\xff"))
        self.assertEqual(client.frames(), [wire.Pong(b"\x00\x01\x02\x03\xfc\xfd\xfe\xff")])

    def test_pong_ignored(self):
        client = self.connect(A)
        client.send(wire.Pong(b"12345678"))
        self.assertEqual(client.frames(), [])
        self.assertStillServes(client)

    def test_client_nonfatal_error_ignored(self):
        client = self.connect(A)
        client.send(wire.Error(E.UNKNOWN_MESSAGE, b"", "whatever"))
        self.assertEqual(client.frames(), [])
        self.assertStillServes(client)

    def test_client_fatal_error_closes(self):
        client = self.connect(A)
        client.send(wire.Error(E.INTERNAL_ERROR, b"", "client gives up"))
        self.assertEqual(client.frames(), [])
        self.assertFalse(client.connected)


class SendTests(RelayTestMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.register(A, B)

    def test_send_accept_deliver_ack(self):
        receiver = self.connect(B)
        sender = self.connect(A)
        env = seal(A, B, b"hello B", message_id=mid(7))
        sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(7))])
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(7), env)])
        self.assertEqual(self.count("b"), 1)
        # The bytes delivered are the sender's, and open for B.
        opened = envelope.open_envelope(env, B, A.public_key)
        self.assertEqual(opened.plaintext, b"hello B")
        receiver.send(wire.Ack(mid(7)))
        self.assertEqual(receiver.frames(), [])
        self.assertEqual(self.count("b"), 0)

    def test_send_to_self(self):
        client = self.connect(A)
        env = seal(A, A, message_id=mid(1))
        client.send(wire.Send(env))
        # Both arrive; the Deliver may precede the Accepted.
        self.assertCountEqual(client.frames(), [wire.Accepted(mid(1)), wire.Deliver(mid(1), env)])

    def test_offline_recipient(self):
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1))])
        self.assertEqual(self.count("b"), 1)
        receiver = self.connect(B)
        self.assertEqual(receiver.welcome.queued, 1)
        self.assertEqual(receiver.after_welcome, [wire.Deliver(mid(1), env)])
        receiver.send(wire.Ack(mid(1)))
        self.assertEqual(self.count("b"), 0)

    def test_unacked_redelivered_next_session(self):
        receiver = self.connect(B)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(1), env)])
        receiver.disconnect()
        self.assertEqual(self.count("b"), 1)
        again = self.connect(B)
        self.assertEqual(again.welcome.queued, 1)
        self.assertEqual(again.after_welcome, [wire.Deliver(mid(1), env)])
        again.send(wire.Ack(mid(1)))
        self.assertEqual(again.frames(), [])
        self.assertEqual(self.count("b"), 0)
        again.disconnect()
        third = self.connect(B)
        self.assertEqual(third.welcome.queued, 0)
        self.assertEqual(third.after_welcome, [])

    def test_sender_mismatch(self):
        client = self.connect(A)
        env = seal(C, B, message_id=mid(3))  # sealed and signed by C
        client.send(wire.Send(env))
        self.assertRefused(client, E.SENDER_MISMATCH, mid(3))
        self.assertEqual(self.count("b"), 0)

    def test_sender_name_mismatch_same_key(self):
        """An envelope signed with A's own key but naming C as sender is refused."""
        client = self.connect(A)
        env = seal(ident("c", key_tag="a"), B, message_id=mid(3))
        client.send(wire.Send(env))
        self.assertRefused(client, E.SENDER_MISMATCH, mid(3))
        self.assertEqual(self.count("b"), 0)

    def test_sender_other_key(self):
        """An envelope naming A but sealed with another key of A is refused."""
        client = self.connect(A)
        env = seal(A_OTHER_KEY, B, message_id=mid(3))
        client.send(wire.Send(env))
        self.assertRefused(client, E.SENDER_MISMATCH, mid(3))
        self.assertEqual(self.count("b"), 0)

    def test_recipient_key_mismatch(self):
        client = self.connect(A)
        env = seal(A, B_OTHER_KEY, message_id=mid(4))
        client.send(wire.Send(env))
        self.assertRefused(client, E.RECIPIENT_KEY_MISMATCH, mid(4))
        self.assertEqual(self.count("b"), 0)

    def test_unknown_recipient(self):
        client = self.connect(A)
        env = seal(A, C, message_id=mid(5))  # C never registered
        client.send(wire.Send(env))
        self.assertRefused(client, E.UNKNOWN_IDENTITY, mid(5))
        self.assertEqual(self.count("c"), 0)

    def test_bad_envelope(self):
        client = self.connect(A)
        client.send(wire.Send(b"\x01\x01garbage"))
        self.assertRefused(client, E.BAD_ENVELOPE, b"")
        self.assertStillServes(client)

    def test_truncated_envelope(self):
        client = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        client.send(wire.Send(env[:-1]))
        self.assertRefused(client, E.BAD_ENVELOPE, b"")
        self.assertEqual(self.count("b"), 0)

    def test_out_of_range_timestamp_or_sequence(self):
        """
        A validly signed envelope whose timestamp or sequence number no
        client can keep (2**63 or more) is malformed: refused BAD_ENVELOPE,
        with an empty ref, nothing stored or delivered, and the session goes
        on.  (Stored, it would jam the recipient's mailbox: its client would
        fail on it every session and never acknowledge it.)
        """
        receiver = self.connect(B)
        sender = self.connect(A)
        for n, (timestamp, seq, field) in enumerate((
            (2**63, 1, "timestamp"),
            (2**64 - 1, 1, "timestamp"),
            (1_700_000_000, 2**63, "sequence number"),
            (1_700_000_000, 2**64 - 1, "sequence number"),
        )):
            sender.send(wire.Send(forge(A, B, mid(n), timestamp, seq)))
            error = self.assertRefused(sender, E.BAD_ENVELOPE, b"")
            self.assertIn(f"{field} ", error.text)
            self.assertIn("out of range", error.text)
            self.assertEqual(self.count("b"), 0)
            self.assertEqual(receiver.frames(), [])
            self.assertStillServes(sender)
        # The largest values pass, forged the same way, and open for B.
        largest = forge(A, B, mid(10), 2**63 - 1, 2**63 - 1)
        sender.send(wire.Send(largest))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(10))])
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(10), largest)])
        self.assertEqual(envelope.open_envelope(largest, B, A.public_key).plaintext, b"jam")

    def test_session_goes_on_after_refusal(self):
        receiver = self.connect(B)
        client = self.connect(A)
        client.send(wire.Send(seal(C, B, message_id=mid(1))))
        self.assertRefused(client, E.SENDER_MISMATCH, mid(1))
        env = seal(A, B, message_id=mid(2))
        client.send(wire.Send(env))
        self.assertEqual(client.frames(), [wire.Accepted(mid(2))])
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(2), env)])

    def test_idempotent_retry(self):
        receiver = self.connect(B)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(9))
        sender.send(wire.Send(env))
        sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(9)), wire.Accepted(mid(9))])
        self.assertEqual(self.count("b"), 1)
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(9), env)])

    def test_retry_after_ack(self):
        """A retry of an already delivered and acknowledged message is not stored again."""
        receiver = self.connect(B)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(9))
        sender.send(wire.Send(env))
        receiver.frames()
        receiver.send(wire.Ack(mid(9)))
        sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(9)), wire.Accepted(mid(9))])
        self.assertEqual(self.count("b"), 0)
        self.assertEqual(receiver.frames(), [])

    def test_duplicate_id(self):
        receiver = self.connect(B)
        sender = self.connect(A)
        env = seal(A, B, b"one", message_id=mid(9))
        other = seal(A, B, b"two", message_id=mid(9))
        self.assertNotEqual(env, other)
        sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(9))])
        sender.send(wire.Send(other))
        self.assertRefused(sender, E.DUPLICATE_ID, mid(9))
        self.assertEqual(self.count("b"), 1)
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(9), env)])

    def test_quota(self):
        store = MemoryStore(Quota(messages=2, bytes=0))
        self.factory = RelayFactory(store, self.clock, name=RELAY)
        self.factory.storeReady()
        self.register(A, B)
        sender = self.connect(A)
        for n in (1, 2):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1)), wire.Accepted(mid(2))])
        sender.send(wire.Send(seal(A, B, message_id=mid(3))))
        self.assertRefused(sender, E.MAILBOX_FULL, mid(3))
        self.assertEqual(self.count("b"), 2)
        ids = [m.message_id for m in self.successResultOf(store.pending("b", 0, 10))]
        self.assertEqual(ids, [mid(1), mid(2)])


class QuotaTests(RelayTestMixin, SynchronousTestCase):
    """
    The answers to sends beyond a mailbox's quota or a sender's cap: their
    own codes, in the documented order, and no figure of what the mailbox
    holds in what the sender is told.
    """

    quota = Quota(messages=0, bytes=0, sender_messages=2, sender_bytes=0)

    def makeStore(self):
        return MemoryStore(self.quota)

    def setUp(self):
        super().setUp()
        self.register(A, B, C)

    def use(self, quota: Quota) -> None:
        self.store.quota = quota

    def logged(self, client: Client) -> list:
        events: list = []
        client.proto.log = Logger(observer=events.append)
        return events

    def test_sender_quota(self):
        """
        A sender holding its cap in a mailbox is refused SENDER_QUOTA, for
        that mailbox only: others may still send to it, and the sender may
        again once one of its messages is delivered.
        """
        sender = self.connect(A)
        for n in (1, 2):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1)), wire.Accepted(mid(2))])
        sender.send(wire.Send(seal(A, B, message_id=mid(3))))
        error = self.assertRefused(sender, E.SENDER_QUOTA, mid(3))
        self.assertIn("'b'", error.text)
        self.assertIn("at most 2 messages", error.text)
        self.assertEqual(self.count("b"), 2)
        self.assertStillServes(sender)
        other = self.connect(C)
        other.send(wire.Send(seal(C, B, message_id=mid(4))))
        self.assertEqual(other.frames(), [wire.Accepted(mid(4))])
        sender.send(wire.Send(seal(A, C, message_id=mid(5))))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(5))])
        receiver = self.connect(B)
        self.assertEqual([f.message_id for f in receiver.after_welcome], [mid(1), mid(2), mid(4)])
        receiver.send(wire.Ack(mid(1)))
        sender.send(wire.Send(seal(A, B, message_id=mid(3))))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(3))])

    def test_retry_and_duplicate_before_sender_quota(self):
        """At its cap, a sender's retry is still ACCEPTED and a reused id DUPLICATE_ID."""
        self.use(Quota(messages=2, bytes=0, sender_messages=2, sender_bytes=0))
        sender = self.connect(A)
        first = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(first))
        sender.send(wire.Send(seal(A, B, message_id=mid(2))))
        sender.frames()
        sender.send(wire.Send(first))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1))])
        sender.send(wire.Send(seal(A, B, b"other", message_id=mid(1))))
        self.assertRefused(sender, E.DUPLICATE_ID, mid(1))
        # The mailbox is full too: the sender at its cap hears of its cap,
        # another sender of the full mailbox.
        sender.send(wire.Send(seal(A, B, message_id=mid(3))))
        self.assertRefused(sender, E.SENDER_QUOTA, mid(3))
        other = self.connect(C)
        other.send(wire.Send(seal(C, B, message_id=mid(4))))
        self.assertRefused(other, E.MAILBOX_FULL, mid(4))
        self.assertEqual(self.count("b"), 2)

    def test_mailbox_full_says_no_usage(self):
        """
        MAILBOX_FULL tells the sender that the mailbox is full, and nothing
        of how much it holds (what the others send the recipient): no
        figure, whichever limit was reached.
        """
        for base, quota in ((0, Quota(messages=3, bytes=0, sender_messages=0, sender_bytes=0)),
                            (10, Quota(messages=0, bytes=2500, sender_messages=0,
                                       sender_bytes=0))):
            self.use(quota)
            other = self.connect(C)
            for n in (1, 2, 3):
                other.send(wire.Send(seal(C, B, message_id=mid(base + n))))
            self.assertEqual(other.frames(), [wire.Accepted(mid(base + n)) for n in (1, 2, 3)])
            sender = self.connect(A)
            sender.send(wire.Send(seal(A, B, message_id=mid(base + 4))))
            error = self.assertRefused(sender, E.MAILBOX_FULL, mid(base + 4))
            self.assertEqual(error.text, "mailbox of 'b' is full; retry later")
            self.assertNotRegex(error.text, r"\d")
            receiver = self.connect(B)
            for frame in receiver.after_welcome:
                receiver.send(wire.Ack(frame.message_id))
            receiver.disconnect()
            self.assertEqual(self.count("b"), 0)

    def test_sender_quota_says_no_usage(self):
        """SENDER_QUOTA gives the cap, not what the sender holds."""
        self.use(Quota(messages=0, bytes=0, sender_messages=0, sender_bytes=1500))
        sender = self.connect(A)
        for n in (1, 2, 3):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        frames = sender.frames()
        self.assertIn(wire.Accepted(mid(1)), frames)
        error = frames[-1]
        self.assertEqual((error.code, error.ref), (E.SENDER_QUOTA, mid(3)))
        self.assertEqual(
            error.text, "your messages to 'b' are at the relay's cap (one sender may have at "
            "most 1500 bytes waiting in a mailbox); retry once some are delivered")
        held = sum(len(m.envelope) for m in self.successResultOf(self.store.pending("b", 0, 9)))
        self.assertNotIn(str(held), error.text)

    def test_refusals_logged_with_figures(self):
        """
        The relay's log keeps the figures the sender is not told, for the
        operator: one line per session, however many sends are refused.
        """
        self.use(Quota(messages=2, bytes=0, sender_messages=0, sender_bytes=0))
        other = self.connect(C)
        for n in (1, 2):
            other.send(wire.Send(seal(C, B, message_id=mid(n))))
        other.frames()
        sender = self.connect(A)
        events = self.logged(sender)
        for n in (3, 4, 5):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        self.assertEqual([f.code for f in sender.frames()], [E.MAILBOX_FULL] * 3)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("'a' to 'b'", lines[0])
        self.assertIn("2 messages", lines[0])
        self.assertIn("--quota-messages", lines[0])


class AckTests(RelayTestMixin, SynchronousTestCase):
    window = 1

    def setUp(self):
        super().setUp()
        self.register(A, B, C)
        self.sender = self.connect(A)
        self.envs = [seal(A, B, message_id=mid(n)) for n in (1, 2)]
        for env in self.envs:
            self.sender.send(wire.Send(env))
        self.sender.frames()
        self.receiver = self.connect(B)
        self.assertEqual(self.receiver.after_welcome, [wire.Deliver(mid(1), self.envs[0])])

    def test_ack_unknown(self):
        self.receiver.send(wire.Ack(mid(99)))
        self.assertRefused(self.receiver, E.UNKNOWN_MESSAGE, mid(99))
        self.assertEqual(self.count("b"), 2)

    def test_ack_twice(self):
        self.receiver.send(wire.Ack(mid(1)))
        self.assertEqual(self.receiver.frames(), [wire.Deliver(mid(2), self.envs[1])])
        self.assertEqual(self.count("b"), 1)
        self.receiver.send(wire.Ack(mid(1)))
        self.assertRefused(self.receiver, E.UNKNOWN_MESSAGE, mid(1))
        self.assertEqual(self.count("b"), 1)

    def test_ack_not_yet_delivered(self):
        """Only delivered messages can be acknowledged: mid(2) waits behind the window."""
        self.receiver.send(wire.Ack(mid(2)))
        self.assertRefused(self.receiver, E.UNKNOWN_MESSAGE, mid(2))
        self.assertEqual(self.count("b"), 2)

    def test_ack_other_mailbox(self):
        """C cannot delete B's message by acknowledging its id."""
        other = self.connect(C)
        other.send(wire.Ack(mid(1)))
        self.assertRefused(other, E.UNKNOWN_MESSAGE, mid(1))
        self.assertEqual(self.count("b"), 2)


class DeliveryOrderTests(RelayTestMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.register(A, B)

    def test_order_connected(self):
        receiver = self.connect(B)
        sender = self.connect(A)
        envs = [seal(A, B, b"%d" % n, message_id=mid(n)) for n in range(5)]
        for env in envs:
            sender.send(wire.Send(env))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(n)) for n in range(5)])
        self.assertEqual(receiver.frames(),
                         [wire.Deliver(mid(n), env) for n, env in enumerate(envs)])

    def test_order_offline(self):
        sender = self.connect(A)
        # Ids deliberately not in sorting order: the order is the order sent.
        order = [5, 1, 4, 2, 3]
        envs = {n: seal(A, B, message_id=mid(n)) for n in order}
        for n in order:
            sender.send(wire.Send(envs[n]))
        receiver = self.connect(B)
        self.assertEqual(receiver.after_welcome, [wire.Deliver(mid(n), envs[n]) for n in order])

    def test_window(self):
        self.factory = RelayFactory(MemoryStore(), self.clock, name=RELAY, window=2)
        self.factory.storeReady()
        self.register(A, B)
        receiver = self.connect(B)
        sender = self.connect(A)
        envs = [seal(A, B, message_id=mid(n)) for n in range(5)]
        for env in envs:
            sender.send(wire.Send(env))
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(n), envs[n]) for n in (0, 1)])
        receiver.send(wire.Ping(b"nothing!"))
        self.assertEqual(receiver.frames(), [wire.Pong(b"nothing!")])
        receiver.send(wire.Ack(mid(0)))
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(2), envs[2])])
        receiver.send(wire.Ack(mid(2)))  # out of order is fine
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(3), envs[3])])
        receiver.send(wire.Ack(mid(1)))
        receiver.send(wire.Ack(mid(3)))
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(4), envs[4])])
        receiver.send(wire.Ack(mid(4)))
        self.assertEqual(receiver.frames(), [])
        self.assertEqual(self.count("b"), 0)

    def test_window_offline(self):
        self.factory = RelayFactory(MemoryStore(), self.clock, name=RELAY, window=2)
        self.factory.storeReady()
        self.register(A, B)
        sender = self.connect(A)
        for n in range(5):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        receiver = self.connect(B)
        self.assertEqual(receiver.welcome.queued, 5)
        self.assertEqual([f.message_id for f in self.delivered(receiver.after_welcome)],
                         [mid(0), mid(1)])


class SlowPendingStore:
    """
    A L{MemoryStore} whose C{pending} for the recipients in C{slow} answers
    only when the test fires it, with what the store held when it was asked
    (as a database would).
    """

    def __init__(self, inner: MemoryStore, slow: set[str]) -> None:
        self.inner = inner
        self.slow = slow
        self.outstanding: dict[str, list[tuple[Deferred, list]]] = {}
        self.calls: dict[str, int] = {}
        self.max_outstanding = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    snapshot_when_fired = False
    """Answer with what the store holds when fired, not when asked (a read queued behind a commit)."""

    def pending(self, recipient, after_seq, limit):
        answer = self.inner.pending(recipient, after_seq, limit)
        if recipient not in self.slow:
            return answer
        result: list = []
        answer.addCallback(result.extend)
        self.calls[recipient] = self.calls.get(recipient, 0) + 1
        queue = self.outstanding.setdefault(recipient, [])
        d: Deferred = Deferred()
        queue.append((d, result, (after_seq, limit)))
        self.max_outstanding = max(self.max_outstanding, len(queue))
        return d

    def fire(self, recipient: str) -> None:
        d, result, (after_seq, limit) = self.outstanding[recipient].pop(0)
        if self.snapshot_when_fired:
            result = []
            self.inner.pending(recipient, after_seq, limit).addCallback(result.extend)
        d.callback(result)


class ConcurrentDeliveryTests(RelayTestMixin, SynchronousTestCase):
    def makeStore(self):
        # Slow for B only once set up: see slowB.
        return SlowPendingStore(MemoryStore(), set())

    def slowB(self) -> None:
        self.assertEqual(self.store.outstanding.get("b", []), [])
        self.store.slow.add("b")

    def test_serialised_per_recipient(self):
        self.register(A, B, C)
        self.slowB()
        a = self.connect(A)
        c = self.connect(C)
        receiver = self.connect(B)
        self.assertEqual(receiver.after_welcome, [])
        self.assertEqual(len(self.store.outstanding["b"]), 1)

        sent = {"a": [], "c": []}

        def send(client, identity, n):
            env = seal(identity, B, message_id=mid(n))
            client.send(wire.Send(env))
            self.assertEqual(client.frames(), [wire.Accepted(mid(n))])
            sent[identity.name].append((mid(n), env))

        # 1. The query made at connect time (an empty mailbox then) is
        # outstanding; five sends commit and wake the loop meanwhile.
        for client, identity, n in [(a, A, 1), (c, C, 2), (a, A, 3), (c, C, 4), (a, A, 5)]:
            send(client, identity, n)
        self.assertEqual(len(self.store.outstanding["b"]), 1)
        self.assertEqual(receiver.frames(), [])

        # 2. It answers nothing: the mailbox is caught up, and 1-5, committed
        # while it was outstanding, go out from the tail with no more queries.
        self.store.fire("b")
        delivered = self.delivered(receiver.frames())
        self.assertEqual([d.message_id for d in delivered], [mid(n) for n in range(1, 6)])
        self.assertEqual(self.store.outstanding["b"], [])

        # 3. What is committed from now on goes out as it commits.
        send(c, C, 6)
        receiver.send(wire.Ack(mid(1)))
        send(a, A, 7)
        delivered += self.delivered(receiver.frames())
        self.assertEqual(self.store.calls["b"], 1)
        self.assertEqual(self.store.max_outstanding, 1)
        ids = [d.message_id for d in delivered]
        self.assertEqual(ids, [mid(n) for n in range(1, 8)])
        by_id = {d.message_id: d.envelope for d in delivered}
        for name in ("a", "c"):
            for m, env in sent[name]:
                self.assertEqual(by_id[m], env)

    def test_query_that_saw_commits_made_while_asked(self):
        """
        A commit that lands while the query is outstanding, and that the
        query also saw, goes out once.
        """
        self.register(A, B)
        self.slowB()
        self.store.snapshot_when_fired = True
        sender = self.connect(A)
        receiver = self.connect(B)
        envs = [seal(A, B, message_id=mid(n)) for n in (1, 2)]
        for env in envs:
            sender.send(wire.Send(env))
        self.store.fire("b")  # sees 1 and 2, which are in the tail as well
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(1), envs[0]),
                                             wire.Deliver(mid(2), envs[1])])
        env3 = seal(A, B, message_id=mid(3))
        sender.send(wire.Send(env3))
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(3), env3)])
        self.assertEqual(self.store.calls["b"], 1)

    def test_tail_overflow_reads_the_store(self):
        """
        Past L{TAIL_LIMIT} messages held for a recipient that does not take
        them (its window is full), the relay forgets them and reads the
        store again when there is room: none is lost or repeated.
        """
        self.register(A, B)
        sender = self.connect(A)
        receiver = self.connect(B)
        total = DEFAULT_WINDOW + TAIL_LIMIT + 10
        for n in range(total):
            sender.send(wire.Send(seal(A, B, message_id=mid(n))))
        got = [d.message_id for d in self.delivered(receiver.frames())]
        self.assertEqual(got, [mid(n) for n in range(DEFAULT_WINDOW)])
        self.slowB()
        while len(got) < total:
            for message_id in got[-DEFAULT_WINDOW:]:
                receiver.send(wire.Ack(message_id))
            while self.store.outstanding.get("b"):
                self.store.fire("b")
            more = [d.message_id for d in self.delivered(receiver.frames())]
            self.assertTrue(more)
            got += more
        self.assertEqual(got, [mid(n) for n in range(total)])
        self.assertGreater(self.store.calls["b"], 0)

    def test_disconnect_during_query(self):
        """A query answered after its session ended pushes nothing to anyone."""
        self.register(A, B)
        self.slowB()
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        first = self.connect(B)
        self.assertEqual(len(self.store.outstanding["b"]), 1)
        first.disconnect()
        second = self.connect(B)
        self.assertEqual(len(self.store.outstanding["b"]), 1)
        self.store.fire("b")  # the first session's query
        self.assertEqual(first.frames(), [])
        self.assertEqual(second.frames(), [])
        self.assertEqual(len(self.store.outstanding["b"]), 1)
        self.store.fire("b")
        self.assertEqual(second.frames(), [wire.Deliver(mid(1), env)])
        self.assertEqual(self.store.max_outstanding, 1)


class SupersedeTests(RelayTestMixin, SynchronousTestCase):
    def test_second_session_supersedes(self):
        self.register(A, B)
        first = self.connect(B)
        sender = self.connect(A)
        env1 = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env1))
        self.assertEqual(first.frames(), [wire.Deliver(mid(1), env1)])

        second = self.connect(B)
        self.assertEqual(second.welcome.queued, 1)
        self.assertEqual(second.after_welcome, [wire.Deliver(mid(1), env1)])
        self.assertFatal(first, E.SUPERSEDED)
        self.assertEqual(self.factory.sessions, {sender.proto, second.proto})

        env2 = seal(A, B, message_id=mid(2))
        sender.send(wire.Send(env2))
        self.assertEqual(second.frames(), [wire.Deliver(mid(2), env2)])
        self.assertEqual(first.frames(), [])
        second.send(wire.Ack(mid(1)))
        second.send(wire.Ack(mid(2)))
        self.assertEqual(second.frames(), [])
        self.assertEqual(self.count("b"), 0)

    def test_superseded_session_ignored(self):
        """Frames still arriving on the superseded connection do nothing."""
        self.register(A, B)
        sender = self.connect(A)
        sender.send(wire.Send(seal(A, B, message_id=mid(1))))
        first = self.connect(B)
        second = self.connect(B)
        first.frames()
        first.send(wire.Ack(mid(1)))
        self.assertEqual(first.frames(), [])
        self.assertEqual(self.count("b"), 1)
        second.send(wire.Ack(mid(1)))
        self.assertEqual(self.count("b"), 0)

    def test_other_identities_not_superseded(self):
        self.register(A, B)
        a = self.connect(A)
        self.connect(B)
        self.assertEqual(a.frames(), [])
        self.assertTrue(a.connected)


class BackpressureTests(RelayTestMixin, SynchronousTestCase):
    def test_pause_resume(self):
        self.register(A, B)
        receiver = self.connect(B)
        sender = self.connect(A)
        envs = [seal(A, B, message_id=mid(n)) for n in range(3)]
        sender.send(wire.Send(envs[0]))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(0))])
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(0), envs[0])])

        receiver.proto.pauseProducing()
        sender.send(wire.Send(envs[1]))
        sender.send(wire.Send(envs[2]))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1)), wire.Accepted(mid(2))])
        self.assertEqual(receiver.frames(), [])
        # Requests wait while the write buffer is full: their answers would
        # pile up unread.
        receiver.send(wire.Ack(mid(0)))
        receiver.send(wire.Ping(b"stillok!"))
        self.assertEqual(receiver.frames(), [])
        self.assertEqual(self.count("b"), 3)

        receiver.proto.resumeProducing()
        self.assertEqual(receiver.frames(),
                         [wire.Deliver(mid(n), envs[n]) for n in (1, 2)]
                         + [wire.Pong(b"stillok!")])
        self.assertEqual(self.count("b"), 2)

    def test_pause_before_queued_delivery(self):
        self.register(A, B)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        receiver = self.connect(B)
        self.assertEqual(receiver.after_welcome, [wire.Deliver(mid(1), env)])
        receiver.proto.pauseProducing()
        receiver.disconnect()
        again = self.connect(B)
        # A new session starts unpaused.
        self.assertEqual(again.after_welcome, [wire.Deliver(mid(1), env)])


class PausingTransport(StringTransportWithDisconnection):
    """
    A transport whose buffer is "full" after every Deliver written: like a
    real transport, it calls its producer's C{pauseProducing} from inside
    C{write}.
    """

    def write(self, data):
        super().write(data)
        if self.producer is not None and data[wire.LENGTH_PREFIX.size] == wire.Deliver.TYPE:
            self.producer.pauseProducing()


class BackpressureMidDeliveryTests(RelayTestMixin, SynchronousTestCase):
    def makeStore(self):
        # Slow for B only once set up: see slowB.
        return SlowPendingStore(MemoryStore(), set())

    def slowB(self) -> None:
        self.assertEqual(self.store.outstanding.get("b", []), [])
        self.store.slow.add("b")

    def test_pause_while_query_outstanding(self):
        self.register(A, B)
        self.slowB()
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        receiver = self.connect(B)
        self.assertEqual(len(self.store.outstanding["b"]), 1)  # sees mid(1)
        receiver.proto.pauseProducing()
        self.store.fire("b")
        self.assertEqual(receiver.frames(), [], "Deliver written while the producer is paused")
        receiver.proto.resumeProducing()
        while self.store.outstanding["b"]:
            self.store.fire("b")
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(1), env)])


    def test_pause_from_inside_write(self):
        # The store stays synchronous here: the batch is pushed in one loop.
        self.register(A, B)
        sender = self.connect(A)
        envs = [seal(A, B, message_id=mid(n)) for n in range(3)]
        for env in envs:
            sender.send(wire.Send(env))
        client = Client.__new__(Client)
        client.factory = self.factory
        client.proto = self.factory.buildProtocol(None)
        client.transport = PausingTransport()
        client.transport.protocol = client.proto
        client.reader = wire.FrameBuffer(self.factory.max_envelope)
        client.proto.makeConnection(client.transport)
        (client.hello,) = client.frames()
        client.auth(B)
        frames = client.frames()
        self.assertEqual(frames[0],
                         wire.Welcome(False, 3, self.factory.max_envelope, self.factory.ttl))
        self.assertEqual(frames[1:], [wire.Deliver(mid(0), envs[0])],
                         "Deliver frames written after the transport paused the producer")
        for n in (1, 2):
            client.proto.resumeProducing()
            self.assertEqual(client.frames(), [wire.Deliver(mid(n), envs[n])])



class FailingStore:
    """A L{MemoryStore} whose named methods fail the next C{times} calls."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.failures: dict[str, int] = {}

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args):
            if self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                return fail(RuntimeError(f"{name} failed"))
            return method(*args)

        return call


class StoreFailureTests(RelayTestMixin, SynchronousTestCase):
    def makeStore(self):
        return FailingStore(MemoryStore())

    def test_enqueue_fails(self):
        self.register(A, B)
        client = self.connect(A)
        self.store.failures["enqueue_message"] = 1
        client.send(wire.Send(seal(A, B, message_id=mid(1))))
        self.assertRefused(client, E.STORE_FAILED, mid(1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.count("b"), 0)
        # The retry succeeds.
        client.send(wire.Send(seal(A, B, message_id=mid(1))))
        self.assertEqual(client.frames(), [wire.Accepted(mid(1))])

    def test_pending_fails_retried(self):
        self.register(A, B)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        self.store.failures["pending"] = 1
        receiver = self.connect(B)
        self.assertEqual(receiver.after_welcome, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(receiver.connected)
        self.clock.advance(RETRY_AFTER_STORE_ERROR - 0.1)
        self.assertEqual(receiver.frames(), [])
        self.clock.advance(0.1)
        self.assertEqual(receiver.frames(), [wire.Deliver(mid(1), env)])

    def test_internal_error(self):
        client = Client(self.factory)
        self.store.failures["get_key"] = 1  # A is new: the directory must ask the store
        client.auth(A)
        self.assertFatal(client, E.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SlowEnqueueStore:
    """A L{MemoryStore} whose C{enqueue_message} answers only when the test fires it."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.outstanding: list[tuple[Deferred, tuple]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def enqueue_message(self, *args):
        d: Deferred = Deferred()
        self.outstanding.append((d, args))
        return d

    def fire(self) -> None:
        d, args = self.outstanding.pop(0)
        self.inner.enqueue_message(*args).chainDeferred(d)


class PipelinedSendTests(RelayTestMixin, SynchronousTestCase):
    """
    Sends are handed to the store without waiting for the previous commit,
    so they can share a commit; answers still go out in request order, each
    only once final.
    """

    def makeStore(self):
        return SlowEnqueueStore(MemoryStore())

    def test_answers_in_request_order_after_commit(self):
        self.register(A, B)
        client = self.connect(A)
        envs = [seal(A, B, message_id=mid(n)) for n in (1, 2)]
        client.feed(wire.encode(wire.Send(envs[0])) + wire.encode(wire.Ping(b"12345678"))
                    + wire.encode(wire.Send(envs[1])))
        # Both sends reached the store, in order; nothing is answered before
        # its commit, and the Pong waits behind the first send's answer.
        self.assertEqual([args[2] for _, args in self.store.outstanding], [mid(1), mid(2)])
        self.assertEqual(client.frames(), [])
        self.store.fire()
        self.assertEqual(client.frames(), [wire.Accepted(mid(1)), wire.Pong(b"12345678")])
        self.store.fire()
        self.assertEqual(client.frames(), [wire.Accepted(mid(2))])
        ids = [m.message_id for m in self.successResultOf(self.store.pending("b", 0, 10))]
        self.assertEqual(ids, [mid(1), mid(2)])

    def test_refusal_keeps_its_place(self):
        """A send refused at once is answered after the earlier send, not before."""
        self.register(A, B)
        client = self.connect(A)
        client.feed(wire.encode(wire.Send(seal(A, B, message_id=mid(1))))
                    + wire.encode(wire.Send(b"not an envelope")))
        self.assertEqual(client.frames(), [])
        self.store.fire()
        frames = client.frames()
        self.assertEqual(frames[0], wire.Accepted(mid(1)))
        self.assertEqual((frames[1].code, frames[1].ref), (E.BAD_ENVELOPE, b""))

    def test_outstanding_requests_bounded(self):
        """
        At most MAX_PENDING_ANSWERS requests are in flight; the rest wait,
        unread, until answers go out.
        """
        self.register(A, B)
        client = self.connect(A)
        total = MAX_PENDING_ANSWERS + 5
        client.feed(b"".join(
            wire.encode(wire.Send(seal(A, B, message_id=mid(n)))) for n in range(total)
        ))
        self.assertEqual(len(self.store.outstanding), MAX_PENDING_ANSWERS)
        self.store.fire()
        self.assertEqual(len(self.store.outstanding), MAX_PENDING_ANSWERS)
        while self.store.outstanding:
            self.store.fire()
        self.assertEqual(client.frames(), [wire.Accepted(mid(n)) for n in range(total)])

    def test_reading_paused_while_flooded(self):
        """
        A client that sends far ahead is not read once a frame and the
        read-ahead are buffered, until the relay catches up.
        """
        from mailrelay.relay.protocol import READ_AHEAD

        self.register(A, B)
        client = self.connect(A)
        frame = wire.encode(wire.Send(seal(A, B, message_id=mid(0))))
        total = (self.factory.max_envelope + READ_AHEAD) // len(frame) + 40
        client.feed(b"".join(
            wire.encode(wire.Send(seal(A, B, message_id=mid(n))))
            for n in range(total)
        ))
        self.assertEqual(client.transport.producerState, "paused")
        while self.store.outstanding:
            self.store.fire()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(client.frames()), total)

    def test_nothing_handled_while_output_paused(self):
        """
        While the transport's write buffer is full, requests are not handled
        (their answers would pile up unread); they are once it drains.
        """
        self.register(A, B)
        client = self.connect(A)
        client.proto.pauseProducing()
        for n in range(3):
            client.send(wire.Ping(b"%08d" % n))
        self.assertEqual(client.frames(), [])
        client.proto.resumeProducing()
        self.assertEqual(client.frames(), [wire.Pong(b"%08d" % n) for n in range(3)])


class StoreNotReadyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.factory = RelayFactory(self.store, self.clock, name=RELAY)

    def test_auth_waits_for_store(self):
        client = Client(self.factory)
        client.auth(A)
        self.assertEqual(client.frames(), [])
        self.factory.storeReady()
        self.assertEqual(client.frames(),
                         [wire.Welcome(True, 0, self.factory.max_envelope, self.factory.ttl)])

    def test_timed_out_session_registers_nothing(self):
        client = Client(self.factory)
        client.auth(A)
        self.clock.advance(self.factory.auth_timeout)
        self.assertEqual(client.frames()[-1].code, E.AUTH_TIMEOUT)
        self.factory.storeReady()
        self.assertEqual(client.frames(), [])
        self.assertIsNone(self.successResultOf(self.store.get_key("a")),
                          "a session refused with AUTH_TIMEOUT registered its key")



class OddKeyTests(RelayTestMixin, SynchronousTestCase):
    def test_empty_signature(self):
        client = Client(self.factory)
        client.send(wire.Auth(wire.PROTOCOL_VERSION, "a", der(A), b""))
        self.assertFatal(client, E.AUTH_FAILED)

    def test_non_rsa_key(self):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        ec_der = key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        client = Client(self.factory)
        client.send(wire.Auth(wire.PROTOCOL_VERSION, "a", ec_der, b"x" * 64))
        self.assertFatal(client, E.AUTH_FAILED)


class Peer:
    """
    One connection as Twisted's port makes it: from an address, to whatever
    the factory builds for it (a session, or a BUSY refusal).
    """

    def __init__(self, factory: RelayFactory, host: str | None, transport=None) -> None:
        from twisted.internet.address import IPv4Address

        addr = None if host is None else IPv4Address("TCP", host, 40000)
        self.proto = factory.buildProtocol(addr)
        self.transport = transport or StringTransportWithDisconnection()
        self.transport.protocol = self.proto
        self.reader = wire.FrameBuffer()
        self.proto.makeConnection(self.transport)
        self.first = self.frames()

    def frames(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return self.reader.feed(data)

    @property
    def admitted(self) -> bool:
        """A session: it was greeted with Hello and is still open."""
        return (isinstance(self.proto, RelaySession) and self.transport.connected
                and [type(f) for f in self.first] == [wire.Hello])

    def close(self) -> None:
        self.transport.loseConnection()


class ConnectionLimitTests(SynchronousTestCase):
    """
    One address cannot hold more than max_per_peer connections, nor everyone
    together more than max_sessions: the ones beyond are told BUSY, and
    closed, without a session.
    """

    def setUp(self):
        self.clock = Clock()
        self.factory = RelayFactory(MemoryStore(), self.clock, name=RELAY, max_per_peer=2,
                                    max_sessions=4)
        self.factory.storeReady()
        self.events: list[dict] = []
        self.factory.log = Logger(observer=self.events.append)

    def assertBusy(self, peer: Peer, text: str) -> None:
        self.assertIsInstance(peer.proto, BusyRefusal)
        self.assertEqual(peer.first, [wire.Error(E.BUSY, b"", text)])
        self.assertTrue(peer.first[0].fatal)
        self.assertFalse(peer.transport.connected, "the refused connection was not closed")
        self.assertNotIn(peer.proto, self.factory.sessions)

    def refusals(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "refusing" in e["log_format"]]

    def test_limit_per_address(self):
        first, second = Peer(self.factory, "192.0.2.1"), Peer(self.factory, "192.0.2.1")
        self.assertTrue(first.admitted)
        self.assertTrue(second.admitted)
        self.assertBusy(Peer(self.factory, "192.0.2.1"),
                        "too many connections from your address (2)")
        # Another address is not affected, nor are the sessions already open.
        self.assertTrue(Peer(self.factory, "192.0.2.2").admitted)
        self.assertTrue(first.transport.connected)
        first.proto.dataReceived(wire.encode(wire.Ping(b"12345678")))
        self.assertEqual(first.frames()[-1].code, E.UNEXPECTED_FRAME)  # it was still served
        # A closed connection makes room again.
        self.assertTrue(Peer(self.factory, "192.0.2.1").admitted)
        self.assertBusy(Peer(self.factory, "192.0.2.1"),
                        "too many connections from your address (2)")

    def test_limit_in_all(self):
        peers = [Peer(self.factory, f"192.0.2.{n}") for n in range(3)] + [Peer(self.factory, None)]
        self.assertTrue(all(p.admitted for p in peers))
        self.assertEqual(self.factory.connections, 4)
        text = "this relay is at its limit of 4 connections; try again later"
        self.assertBusy(Peer(self.factory, "192.0.2.9"), text)
        self.assertBusy(Peer(self.factory, None), text)  # no address: counted all the same
        self.assertEqual(self.factory.connections, 4)
        self.assertEqual(self.factory.per_peer, {f"192.0.2.{n}": 1 for n in range(3)})
        peers[0].close()
        self.assertTrue(Peer(self.factory, "192.0.2.9").admitted)
        self.assertBusy(Peer(self.factory, "192.0.2.10"), text)

    def test_sessions_unaffected(self):
        """A session open when the relay fills up goes on as before."""
        register = Client(self.factory)
        register.auth(A)
        self.assertIsInstance(register.frames()[0], wire.Welcome)
        for n in range(3):
            Peer(self.factory, f"192.0.2.{n}")
        self.assertBusy(Peer(self.factory, "192.0.2.9"),
                        "this relay is at its limit of 4 connections; try again later")
        register.send(wire.Ping(b"stillok!"))
        self.assertEqual(register.frames(), [wire.Pong(b"stillok!")])

    def test_counts_return_to_zero(self):
        """
        However sessions end (closed by the peer, timed out, refused), their
        places are given back; refused connections never take one.
        """
        peers = [Peer(self.factory, "192.0.2.1") for _ in range(3)]
        peers += [Peer(self.factory, "192.0.2.2"), Peer(self.factory, None),
                  Peer(self.factory, "192.0.2.3")]
        self.assertEqual(self.factory.connections, 4)
        peers[0].close()
        peers[3].proto.dataReceived(b"\xff\xff\xff\xff")  # malformed: closed by the relay
        self.clock.advance(self.factory.auth_timeout)  # the others time out
        self.assertTrue(all(not p.transport.connected for p in peers))
        self.assertEqual(self.factory.connections, 0)
        self.assertEqual(self.factory.per_peer, {})
        self.assertEqual(self.factory.sessions, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_limits(self):
        self.factory.max_per_peer = 0
        self.factory.max_sessions = 0
        peers = [Peer(self.factory, "192.0.2.1") for _ in range(10)]
        self.assertTrue(all(p.admitted for p in peers))
        self.assertEqual(self.factory.per_peer, {})
        for peer in peers:
            peer.close()
        self.assertEqual(self.factory.connections, 0)

    def test_refused_peer_cut_after_grace(self):
        """A refused peer that does not take its BUSY frame is cut after BUSY_GRACE."""
        from twisted.internet.testing import StringTransport

        class Stuck(StringTransport):
            aborted = False

            def abortConnection(self):
                self.aborted = True

        for n in range(2):
            Peer(self.factory, "192.0.2.1")
        stuck = Peer(self.factory, "192.0.2.1", transport=Stuck())
        self.assertEqual(stuck.first[0].code, E.BUSY)
        self.assertTrue(stuck.transport.disconnecting)
        self.clock.advance(BUSY_GRACE - 0.1)
        self.assertFalse(stuck.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(stuck.transport.aborted)

    def test_refused_peer_closed_leaves_no_timer(self):
        for n in range(3):
            Peer(self.factory, "192.0.2.1")
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()],
                         [self.factory.auth_timeout] * 2 + [self.factory.idle_timeout] * 2)

    def test_refused_peer_bytes_ignored(self):
        for n in range(2):
            Peer(self.factory, "192.0.2.1")
        refused = Peer(self.factory, "192.0.2.1")
        refused.proto.dataReceived(wire.encode(wire.Ping(b"12345678")) + b"\xff" * 100)
        self.assertEqual(refused.frames(), [])

    def test_per_address_refusals_logged_once_a_minute(self):
        self.factory.auth_timeout = 1000  # keep the first ones open
        for n in range(2):
            Peer(self.factory, "192.0.2.1")
            Peer(self.factory, "192.0.2.2")
        for n in range(5):
            Peer(self.factory, "192.0.2.1")
            Peer(self.factory, "192.0.2.2")
        self.assertEqual(self.refusals(), [
            "refusing connections from 192.0.2.1: 2 already open (--max-per-peer)",
            "refusing connections from 192.0.2.2: 2 already open (--max-per-peer)",
        ])
        self.clock.advance(59)
        Peer(self.factory, "192.0.2.1")
        self.assertEqual(len(self.refusals()), 2)
        self.clock.advance(1)
        Peer(self.factory, "192.0.2.1")
        self.assertEqual(len(self.refusals()), 3)

    def test_refusals_at_the_limit_logged_once_a_minute(self):
        """Refused for the limit in all, a crowd of addresses still gets one line a minute."""
        self.factory.auth_timeout = 1000  # keep the four open
        for n in range(4):
            Peer(self.factory, f"192.0.2.{n}")
        for n in range(50):
            Peer(self.factory, f"198.51.100.{n}")
        self.assertEqual(self.refusals(), [
            "refusing connections (from 198.51.100.0 and any other): "
            "4 open, the limit (--max-sessions)",
        ])
        self.clock.advance(60)
        Peer(self.factory, "198.51.100.7")
        self.assertEqual(len(self.refusals()), 2)
        self.assertEqual(self.factory._refusal_logged, {})


class SendingOnlySessionTests(RelayTestMixin, SynchronousTestCase):
    """
    A session that authenticates with receive unset (a `mailrelay send`)
    neither takes the mailbox nor displaces the identity's receiving session.
    """

    def authSendingOnly(self, identity):
        client = Client(self.factory)
        transcript = wire.auth_transcript(client.hello.challenge, client.hello.relay,
                                          identity.name, receive=False)
        client.send(wire.Auth(wire.PROTOCOL_VERSION, identity.name, identity.public_der,
                              identity.sign(transcript), receive=False))
        [welcome] = client.frames()
        self.assertIsInstance(welcome, wire.Welcome)
        return client

    def test_no_deliveries(self):
        self.register(A, B)
        sender = self.connect(A)
        sender.send(wire.Send(seal(A, B, message_id=mid(1))))
        self.assertEqual(sender.frames(), [wire.Accepted(mid(1))])
        b_sending = self.authSendingOnly(B)
        self.assertEqual(b_sending.frames(), [])
        b_sending.send(wire.Ack(mid(1)))
        [error] = b_sending.frames()
        self.assertEqual(error.code, E.UNKNOWN_MESSAGE)
        self.assertEqual(self.successResultOf(self.store.count("b")), 1)

    def test_does_not_supersede(self):
        self.register(A, B)
        receiving = self.connect(B)
        self.authSendingOnly(B)
        self.assertTrue(receiving.connected)
        sender = self.connect(A)
        env = seal(A, B, message_id=mid(1))
        sender.send(wire.Send(env))
        self.assertEqual(receiving.frames(), [wire.Deliver(mid(1), env)])


class HandshakeLimitTests(RelayTestMixin, SynchronousTestCase):
    """Before authentication a peer cannot make the relay buffer an envelope's worth."""

    def test_large_frame_before_auth_refused_at_its_prefix(self):
        client = self.connect()
        client.feed(wire.LENGTH_PREFIX.pack(wire.MIN_FRAME_ROOM + wire.FRAME_OVERHEAD + 1))
        self.assertFatal(client, E.MALFORMED_FRAME)

    def test_envelope_sized_frames_after_auth(self):
        """AUTH raises the limit, also for a SEND that arrived in the same read."""
        self.register(A, B)
        client = Client(self.factory)
        big = seal(A, B, text=b"x" * (3 * wire.MIN_FRAME_ROOM), message_id=mid(1))
        transcript = wire.auth_transcript(client.hello.challenge, client.hello.relay, "a")
        client.feed(wire.encode(wire.Auth(wire.PROTOCOL_VERSION, "a", A.public_der,
                                          A.sign(transcript)))
                    + wire.encode(wire.Send(big)))
        frames = client.frames()
        self.assertIsInstance(frames[0], wire.Welcome)
        self.assertEqual(frames[1:], [wire.Accepted(mid(1))])


class ReadResumeTests(RelayTestMixin, SynchronousTestCase):
    """Reading stops when the relay falls behind, and always resumes."""

    def makeStore(self):
        return SlowEnqueueStore(MemoryStore())

    def test_resumes_for_a_partial_large_frame(self):
        """
        Behind on commits, the relay stops reading with a large frame half
        received; once it catches up it must read the rest of that frame,
        however large the part already buffered.
        """
        self.register(A, B)
        client = self.connect(A)
        smalls = b"".join(wire.encode(wire.Send(seal(A, B, message_id=mid(n))))
                          for n in range(MAX_PENDING_ANSWERS))
        medium = wire.encode(wire.Send(seal(A, B, b"m" * 150_000, message_id=mid(100))))
        large = wire.encode(wire.Send(seal(A, B, b"l" * 250_000, message_id=mid(101))))
        client.feed(smalls + medium + large[:200_000])
        self.assertEqual(client.transport.producerState, "paused")
        while self.store.outstanding:
            self.store.fire()
        self.assertEqual(client.transport.producerState, "producing")
        client.feed(large[200_000:])
        while self.store.outstanding:
            self.store.fire()
        accepted = [f.message_id for f in client.frames() if isinstance(f, wire.Accepted)]
        self.assertEqual(accepted[-2:], [mid(100), mid(101)])
        self.assertEqual(len(accepted), MAX_PENDING_ANSWERS + 2)


class ClosingTests(RelayTestMixin, SynchronousTestCase):
    """A fatal error closes the connection even when the peer does not help."""

    def test_fatal_unregisters_the_producer(self):
        """
        TCP and TLS transports do not finish a loseConnection while a
        producer is registered: a fatal error must unregister it.
        """
        from twisted.internet.testing import StringTransport

        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertIs(transport.producer, proto)
        proto.dataReceived(wire.encode(wire.Ping(b"12345678")))
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_cut_after_grace(self):
        """A peer that keeps a closing connection open is cut after CLOSE_GRACE."""
        from twisted.internet.testing import StringTransport

        from mailrelay.relay.protocol import CLOSE_GRACE

        class Recording(StringTransport):
            aborted = False

            def abortConnection(self):
                self.aborted = True

        proto = self.factory.buildProtocol(None)
        transport = Recording()
        proto.makeConnection(transport)
        self.clock.advance(self.factory.auth_timeout)
        self.assertTrue(transport.disconnecting)
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)

    def test_no_cut_once_closed(self):
        client = self.connect()
        client.send(wire.Ping(b"12345678"))
        self.assertFalse(client.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FrameClockTests(SynchronousTestCase):
    """L{FrameClock} follows frame boundaries however the bytes are split."""

    def test_whole_frames(self):
        clock = FrameClock()
        self.assertTrue(clock.feed(wire.encode(wire.Ping(b"12345678")) * 3))
        self.assertFalse(clock.partial)

    def test_split_anywhere(self):
        data = wire.encode(wire.Ping(b"12345678")) + wire.encode(wire.Lookup("someone"))
        ends = {len(wire.encode(wire.Ping(b"12345678"))), len(data)}
        for step in (1, 2, 3, 5, 7):
            clock = FrameClock()
            for start in range(0, len(data), step):
                chunk = data[start:start + step]
                ended = clock.feed(chunk)
                self.assertEqual(ended, any(start < end <= start + len(chunk) for end in ends),
                                 (step, start))
                self.assertEqual(clock.partial, start + len(chunk) not in ends, (step, start))

    def test_prefix_alone_is_partial(self):
        clock = FrameClock()
        self.assertFalse(clock.feed(b"\x00\x00"))
        self.assertTrue(clock.partial)
        self.assertFalse(clock.feed(b"\x00\x05"))
        self.assertTrue(clock.partial)
        self.assertTrue(clock.feed(b"12345"))
        self.assertFalse(clock.partial)

    def test_empty_frame_ends_at_its_prefix(self):
        clock = FrameClock()
        self.assertTrue(clock.feed(wire.LENGTH_PREFIX.pack(0)))
        self.assertFalse(clock.partial)

    def test_nothing(self):
        clock = FrameClock()
        self.assertFalse(clock.feed(b""))
        self.assertFalse(clock.partial)


class FrameTimeoutTests(RelayTestMixin, SynchronousTestCase):
    """
    Once a frame's first byte has arrived, the whole frame must arrive
    within frame_timeout: trickling bytes keeps the idle timer going, not
    this deadline.
    """

    def setUp(self):
        super().setUp()
        self.timeout = self.factory.frame_timeout
        self.assertEqual(self.timeout, 60)
        self.assertGreater(self.factory.idle_timeout, 2 * self.timeout)

    def trickle(self, client: Client, data: bytes, seconds: int) -> None:
        """Feed C{data} one byte a second, for C{seconds} bytes."""
        for byte in data[:seconds]:
            client.feed(bytes([byte]))
            self.clock.advance(1)

    def test_slowloris_cut(self):
        """A frame trickled one byte a second is cut at the deadline, not before."""
        self.register(B)
        client = self.connect(A)
        frame = wire.encode(wire.Send(seal(A, B, message_id=mid(1))))
        self.assertGreater(len(frame), self.timeout + 1)
        client.feed(frame[:1])
        self.clock.advance(1)
        self.trickle(client, frame[1:], int(self.timeout) - 2)
        client.feed(frame[int(self.timeout) - 1:int(self.timeout)])
        self.clock.advance(0.9)
        self.assertTrue(client.connected)
        self.assertEqual(client.frames(), [])
        self.clock.advance(0.1)
        error = self.assertFatal(client, E.FRAME_TIMEOUT)
        self.assertEqual(error.text, "a frame took more than 60 seconds to arrive")
        self.assertEqual(self.count("b"), 0)
        self.assertEqual(self.factory.connections, 0)

    def test_slowloris_before_authentication(self):
        """The deadline holds in the handshake too (here the auth deadline is longer)."""
        self.factory.auth_timeout = 3 * self.timeout
        client = Client(self.factory)
        self.trickle(client, b"\x00\x00\x10\x00" + b"\x02" * 100, int(self.timeout))
        self.assertFatal(client, E.FRAME_TIMEOUT)

    def test_each_frame_gets_its_own_deadline(self):
        """
        Frames that each arrive in time are fine, however long the session:
        only a frame ending stops the deadline, and the next starts its own.
        """
        client = self.connect(A)
        ping = wire.encode(wire.Ping(b"12345678"))
        for n in range(4):
            client.feed(ping[:1])
            self.clock.advance(self.timeout - 1)
            client.feed(ping[1:])
            self.assertEqual(client.frames(), [wire.Pong(b"12345678")])
        self.assertTrue(client.connected)

    def test_next_frame_in_same_read(self):
        """A frame that starts in the read that ends another is timed from that read."""
        client = self.connect(A)
        ping = wire.encode(wire.Ping(b"12345678"))
        client.feed(ping[:5])
        self.clock.advance(self.timeout - 1)
        client.feed(ping[5:] + ping[:3])
        self.clock.advance(self.timeout - 0.1)
        self.assertEqual(client.frames(), [wire.Pong(b"12345678")])
        self.assertTrue(client.connected)
        self.clock.advance(0.1)
        self.assertFatal(client, E.FRAME_TIMEOUT)

    def test_quiet_between_frames(self):
        """No deadline runs between frames: silence is the idle timer's business."""
        client = self.connect(A)
        client.send(wire.Ping(b"12345678"))
        self.clock.advance(2 * self.timeout)
        self.assertEqual(client.frames(), [wire.Pong(b"12345678")])
        self.assertTrue(client.connected)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()],
                         [self.factory.idle_timeout])

    def test_output_paused(self):
        """Complete frames held while the transport's buffer is full do not count."""
        client = self.connect(A)
        client.proto.pauseProducing()
        client.send(wire.Ping(b"12345678"))
        client.send(wire.Ping(b"87654321"))
        self.clock.advance(2 * self.timeout)
        self.assertTrue(client.connected)
        client.proto.resumeProducing()
        self.assertEqual(client.frames(), [wire.Pong(b"12345678"), wire.Pong(b"87654321")])

    def test_timer_gone_on_close(self):
        client = self.connect(A)
        client.feed(b"\x00\x00")
        client.disconnect()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FrameTimeoutPipelinedTests(RelayTestMixin, SynchronousTestCase):
    """Frames waiting for their turn are the relay's delay, not the peer's."""

    def makeStore(self):
        return SlowEnqueueStore(MemoryStore())

    def setUp(self):
        super().setUp()
        self.register(A, B)
        self.timeout = self.factory.frame_timeout

    def test_pipelined_frames_waiting(self):
        client = self.connect(A)
        total = MAX_PENDING_ANSWERS + 5
        client.feed(b"".join(wire.encode(wire.Send(seal(A, B, message_id=mid(n))))
                             for n in range(total)))
        self.clock.advance(2 * self.timeout)
        self.assertTrue(client.connected)
        while self.store.outstanding:
            self.store.fire()
        self.assertEqual(client.frames(), [wire.Accepted(mid(n)) for n in range(total)])

    def test_partial_frame_behind_waiting_ones(self):
        """The frame the peer is still sending counts, even with others waiting."""
        client = self.connect(A)
        waiting = b"".join(wire.encode(wire.Send(seal(A, B, message_id=mid(n))))
                           for n in range(MAX_PENDING_ANSWERS + 2))
        client.feed(waiting + wire.encode(wire.Ping(b"12345678"))[:6])
        self.clock.advance(self.timeout)
        self.assertFalse(client.connected)
        self.assertEqual(client.proto.state, "closed")

    def test_not_while_reading_paused(self):
        """
        While the relay has stopped reading, the peer cannot finish its
        frame: the deadline stops, and starts afresh once reading resumes.
        """
        from mailrelay.relay.protocol import READ_AHEAD

        client = self.connect(A)
        frame = wire.encode(wire.Send(seal(A, B, message_id=mid(0))))
        total = (self.factory.max_envelope + READ_AHEAD) // len(frame) + 40
        sends = b"".join(wire.encode(wire.Send(seal(A, B, message_id=mid(n))))
                         for n in range(total))
        ping = wire.encode(wire.Ping(b"12345678"))
        client.feed(sends + ping[:6])
        self.assertEqual(client.transport.producerState, "paused")
        self.clock.advance(2 * self.timeout)
        self.assertTrue(client.connected)
        while self.store.outstanding:
            self.store.fire()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(client.frames()), total)
        self.clock.advance(self.timeout - 0.1)
        self.assertTrue(client.connected)
        self.clock.advance(0.1)
        self.assertEqual(client.frames()[-1].code, E.FRAME_TIMEOUT)
        self.assertFalse(client.connected)


class RateLimitTests(RelayTestMixin, SynchronousTestCase):
    """Each identity's sends share one token bucket: burst at once, then rate a second."""

    rate, burst = 10, 3

    def setUp(self):
        super().setUp()
        self.factory = RelayFactory(self.store, self.clock, name=RELAY, rate=self.rate,
                                    burst=self.burst)
        self.factory.storeReady()
        self.register(A, B, C)
        self.receiver = self.connect(B)
        self.n = 0

    def send(self, client: Client, identity: keys.Identity = A) -> tuple[bytes, list]:
        self.n += 1
        client.send(wire.Send(seal(identity, B, message_id=mid(self.n))))
        return mid(self.n), client.frames()

    def sendingOnly(self, identity: keys.Identity) -> Client:
        """Another session of C{identity}, one that does not take the mailbox."""
        client = Client(self.factory)
        transcript = wire.auth_transcript(client.hello.challenge, client.hello.relay,
                                          identity.name, receive=False)
        client.send(wire.Auth(wire.PROTOCOL_VERSION, identity.name, identity.public_der,
                              identity.sign(transcript), receive=False))
        self.assertIsInstance(client.frames()[0], wire.Welcome)
        return client

    def assertLimited(self, client: Client, identity: keys.Identity = A,
                      text: str = "sending too fast: at most 10 messages/s; retry in 0.1 s"):
        message_id, frames = self.send(client, identity)
        error = self.assertRefused(client, E.RATE_LIMITED, message_id, frames)
        self.assertEqual(error.text, text)
        return message_id

    def test_burst_then_rate(self):
        client = self.connect(A)
        for _ in range(self.burst):
            message_id, frames = self.send(client)
            self.assertEqual(frames, [wire.Accepted(message_id)])
        refused = self.assertLimited(client)
        # Nothing is stored for it, and the session goes on.
        self.assertEqual(self.count("b"), self.burst)
        self.assertNotIn(refused, [f.message_id for f in self.receiver.frames()])
        self.assertStillServes(client)
        self.clock.advance(0.1)
        message_id, frames = self.send(client)
        self.assertEqual(frames, [wire.Accepted(message_id)])
        self.assertLimited(client)
        # A retry once the time said has passed goes through.
        self.clock.advance(0.1)
        client.send(wire.Send(seal(A, B, message_id=refused)))
        self.assertEqual(client.frames(), [wire.Accepted(refused)])

    def test_wait_said(self):
        client = self.connect(A)
        for _ in range(self.burst):
            self.send(client)
        self.clock.advance(0.05)
        self.assertLimited(client, text="sending too fast: at most 10 messages/s; retry in 0.1 s")
        self.factory.send_rate.rate = 3
        other = self.connect(C)
        for _ in range(self.burst):
            self.send(other, C)
        self.assertLimited(other, C, text="sending too fast: at most 3 messages/s; retry in 0.4 s")

    def test_shared_by_sessions_of_an_identity(self):
        first, second = self.connect(A), self.sendingOnly(A)
        self.send(first)
        self.send(second)
        self.send(first)
        self.assertLimited(second)
        self.assertLimited(first)
        # Other identities have their own bucket.
        other = self.connect(C)
        message_id, frames = self.send(other, C)
        self.assertEqual(frames, [wire.Accepted(message_id)])

    def test_unreadable_sends_not_counted(self):
        """A send refused as malformed costs no token: it has no id to answer with."""
        client = self.connect(A)
        for _ in range(10):
            client.send(wire.Send(b"not an envelope"))
            self.assertRefused(client, E.BAD_ENVELOPE, b"")
        message_id, frames = self.send(client)
        self.assertEqual(frames, [wire.Accepted(message_id)])

    def test_no_limit(self):
        self.factory.send_rate.rate = 0
        client = self.connect(A)
        for _ in range(20):
            message_id, frames = self.send(client)
            self.assertEqual(frames, [wire.Accepted(message_id)])
        self.assertEqual(len(self.factory.send_rate), 0)


class RateLimitOrderTests(RelayTestMixin, SynchronousTestCase):
    def makeStore(self):
        return SlowEnqueueStore(MemoryStore())

    def test_refusal_in_request_order(self):
        """A send refused for its rate is answered after the earlier send's commit."""
        self.factory = RelayFactory(self.store, self.clock, name=RELAY, rate=1, burst=1)
        self.factory.storeReady()
        self.register(A, B)
        client = self.connect(A)
        client.feed(wire.encode(wire.Send(seal(A, B, message_id=mid(1))))
                    + wire.encode(wire.Send(seal(A, B, message_id=mid(2)))))
        self.assertEqual(client.frames(), [])
        self.store.fire()
        self.assertEqual(len(self.store.outstanding), 0)
        accepted, refused = client.frames()
        self.assertEqual(accepted, wire.Accepted(mid(1)))
        self.assertEqual((refused.code, refused.ref), (E.RATE_LIMITED, mid(2)))


class SendRateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def test_bucket(self):
        rate = SendRate(self.clock, rate=2, burst=4)
        self.assertEqual([rate.take("a") for _ in range(5)], [0, 0, 0, 0, 0.5])
        self.clock.advance(0.25)
        self.assertEqual(rate.take("a"), 0.25)
        self.clock.advance(0.25)
        self.assertEqual(rate.take("a"), 0)
        self.assertEqual(rate.take("a"), 0.5)
        # Never more than the burst, however long the wait.
        self.clock.advance(3600)
        self.assertEqual([rate.take("a") for _ in range(5)], [0, 0, 0, 0, 0.5])

    def test_full_buckets_forgotten(self):
        rate = SendRate(self.clock, rate=2, burst=4)
        for n in range(100):
            rate.take(f"id{n}")
        self.assertEqual(len(rate), 100)
        self.clock.advance(1.9)  # 2 s refill a bucket that gave one token, but 1.9 do not
        rate.take("id0")
        self.assertEqual(len(rate), 100)
        self.clock.advance(0.1)
        rate.take("id0")
        self.assertEqual(len(rate), 1)

    def test_bounded(self):
        rate = SendRate(self.clock, rate=1, burst=2, limit=10)
        for n in range(1000):
            rate.take(f"id{n}")
        self.assertLessEqual(len(rate), 10)
        # The most recent ones are kept.
        self.assertEqual(rate.take("id999"), 0)
        self.assertEqual(rate.take("id999"), 1)


# Found by mutation testing (make mutation-test): checks no test above guarded.

class AuthenticationRaceTests(RelayTestMixin, SynchronousTestCase):
    """A session that ends while its authentication waits for the store gets nothing."""

    def test_gone_while_the_directory_registers(self):
        pending = Deferred()
        self.patch(self.factory.directory, "claim", lambda *args: pending)
        client = Client(self.factory)
        client.auth(A)
        client.disconnect()
        pending.callback(True)
        self.assertEqual(client.frames(), [])
        self.assertFalse(self.factory.mailboxes.connected("a"))
        self.assertIsNone(client.proto.identity)

    def test_gone_while_its_mailbox_is_counted(self):
        pending = Deferred()
        self.patch(self.store, "count", lambda name: pending)
        client = Client(self.factory)
        client.auth(A)
        client.disconnect()
        pending.callback(0)
        self.assertEqual(client.frames(), [])
        self.assertFalse(self.factory.mailboxes.connected("a"))

    def test_session_keeps_the_key_it_proved(self):
        """The directory answers with another key (a rotation committed meanwhile)."""
        self.patch(self.factory.directory, "known_key", lambda name: der(C))
        client = self.connect(A)
        self.assertEqual(client.proto.public_key, der(A))


class RelayLogTests(RelayTestMixin, SynchronousTestCase):
    """What the relay's operator reads: said once a session, not once a message."""

    def captured(self, action):
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            action()
        return [formatEvent(e) for e in events]

    def logged_sending(self, store, count: int, **options) -> list[str]:
        """The log lines of A sending C{count} messages to B through a relay on C{store}."""
        self.factory = RelayFactory(store, self.clock, name=RELAY, **options)
        self.factory.storeReady()
        self.register(A, B)
        client = self.connect(A)

        def send():
            for n in range(1, count + 1):
                client.send(wire.Send(seal(A, B, message_id=mid(n))))

        return self.captured(send)

    def test_rate_refusals_logged_once_a_session(self):
        lines = self.logged_sending(self.store, 4, rate=1, burst=1)
        self.assertEqual(len([line for line in lines if "sends faster than" in line]), 1)

    def refusal_logged(self, quota: Quota) -> str:
        """The one log line of a sender sending three messages past C{quota}."""
        lines = self.logged_sending(MemoryStore(quota), 3)
        [line] = [line for line in lines if "refusing messages from" in line]
        return line

    def test_full_mailbox_logged_with_its_figures(self):
        self.assertIn("1 messages", self.refusal_logged(Quota(messages=1, bytes=0)))

    def test_sender_at_its_cap_logged_with_its_figures(self):
        self.assertIn("the sender has 1 messages",
                      self.refusal_logged(Quota(sender_messages=1)))

    def test_failed_delete_is_logged_and_the_session_goes_on(self):
        self.register(A, B)
        sender = self.connect(A)
        receiver = self.connect(B)
        sender.send(wire.Send(seal(A, B, message_id=mid(1))))
        self.assertEqual(len(receiver.frames()), 1)
        self.patch(self.store, "delete",
                   lambda *args: fail(OSError("disk gone")))
        lines = self.captured(lambda: receiver.send(wire.Ack(mid(1))))
        self.assertTrue(any("deleting acknowledged message" in line for line in lines), lines)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertStillServes(receiver)


class AcknowledgeTests(SynchronousTestCase):
    """Mailboxes.acknowledge: only what this session was delivered and has not acknowledged."""

    def test_unknown_id_deletes_nothing(self):
        from mailrelay.relay.mailbox import Mailboxes, Outbox

        store = MemoryStore()
        mailboxes = Mailboxes(store, Clock())
        self.successResultOf(store.enqueue("b", "a", mid(1), b"envelope", 0))
        pushed = []
        outbox = Outbox("b", pushed.append)
        mailboxes.attach(outbox)
        mailboxes.wake("b")
        self.assertEqual([m.message_id for m in pushed], [mid(1)])
        self.assertFalse(self.successResultOf(mailboxes.acknowledge(outbox, mid(2))))
        self.assertEqual(outbox.acknowledged, 0)
        self.assertTrue(self.successResultOf(mailboxes.acknowledge(outbox, mid(1))))
        self.assertEqual(outbox.acknowledged, 1)
        self.assertFalse(self.successResultOf(mailboxes.acknowledge(outbox, mid(1))))
        self.assertEqual(self.successResultOf(store.count("b")), 0)
