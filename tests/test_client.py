"""
Tests for the client side: L{mailrelay.client.protocol} (driven both against
a real L{RelaySession} over an in-memory connection and frame by frame over
a L{StringTransport}), L{connect} on a memory reactor, the chat console, the
Maildir filer and the inbox.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import os
import sqlite3
import stat
import time

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.client.contacts import MemoryContacts
from mailrelay import envelope, keys, wire
from mailrelay.client.console import ChatConsole
from mailrelay.client.maildir import Maildir, as_email
from mailrelay.client.protocol import (
    ClientFactory,
    ClientProtocol,
    Disconnected,
    Rejected,
    RelayError,
    SendRefused,
    connect,
)
from mailrelay.client.inbox import Gap, Inbox, InboxError, MemoryInbox
from mailrelay.relay.protocol import RelayFactory
from mailrelay.relay.store import Quota
from mailrelay.relay.store.memory import MemoryStore

E = wire.ErrorCode
RELAY = "relay"
CHALLENGE = bytes(range(32))

# RSA key generation is slow: every key is made once per process.
_keys: dict[str, object] = {}


def ident(name: str, key: str | None = None) -> keys.Identity:
    """Identity C{name} with the cached 2048-bit key C{key} (default: its own)."""
    tag = key or name
    if tag not in _keys:
        _keys[tag] = keys.Identity.generate("x", bits=2048).private_key
    return keys.Identity(name, _keys[tag])


ALICE = ident("alice")
BOB = ident("bob")
CAROL = ident("carol")
MALLORY_BOB = ident("bob", key="mallory")
"""Another key under bob's name: an impostor, or bob after losing his key."""


def fp(identity: keys.Identity) -> str:
    return keys.format_fingerprint(identity.fingerprint)


def mid(n: int) -> bytes:
    return n.to_bytes(wire.MESSAGE_ID_SIZE, "big")


def read_frames(transport: StringTransport) -> list:
    """Every frame written to C{transport} since the last call."""
    data = transport.value()
    transport.clear()
    return wire.FrameBuffer().feed(data)


class MemoryRelay:
    """A real relay (L{RelayFactory} on a L{MemoryStore}) reached in memory."""

    def __init__(self, clock: Clock | None = None, quota: Quota = Quota(), **settings):
        self.clock = clock if clock is not None else Clock()
        self.store = MemoryStore(quota)
        self.factory = RelayFactory(self.store, self.clock, name=RELAY, **settings)
        self.factory.storeReady()
        self.pumps: list[iosim.IOPump] = []

    def serve(self, client_protocol) -> iosim.IOPump:
        """Connect any client-side protocol to a fresh relay session."""
        server = self.factory.buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server),
            client_protocol, iosim.makeFakeClient(client_protocol),
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.flush()
        return pump

    def client(self, identity: keys.Identity, **settings) -> ClientProtocol:
        settings.setdefault("contacts", MemoryContacts())
        settings.setdefault("clock", self.clock)
        client = ClientProtocol(identity, **settings)
        self.serve(client)
        return client

    def flush(self) -> None:
        while any([pump.flush() for pump in self.pumps]):
            pass

    def count(self, name: str) -> int:
        return self._result(self.store.count(name))

    def register(self, identity: keys.Identity) -> None:
        self.store._keys[identity.name] = identity.public_der

    @staticmethod
    def _result(d: Deferred):
        out = []
        d.addBoth(out.append)
        if not out:
            raise AssertionError("store Deferred did not fire")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]


def ready_client(identity: keys.Identity = BOB, clock=None, **settings):
    """
    A client over a L{StringTransportWithDisconnection}, taken through Hello
    and Welcome by hand; the transport is cleared.
    """
    transport = StringTransportWithDisconnection()
    client = ClientProtocol(identity, clock=clock, **settings)
    transport.protocol = client
    client.makeConnection(transport)
    client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
    client.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE)))
    transport.clear()
    return client, transport


def sealed(sender=ALICE, recipient=BOB, text=b"hi bob", message_id=None, seq=0) -> bytes:
    return envelope.seal(sender, recipient.name, recipient.public_key, text,
                         message_id=message_id, seq=seq)


def key_frame(identity: keys.Identity) -> bytes:
    return wire.encode(wire.Key(identity.name, identity.public_der))


class HandshakeTests(SynchronousTestCase):
    def test_authenticates_against_relay(self):
        """
        Against a real relay session the client authenticates: C{ready}
        fires with the client itself, which is registered on its first
        connection and knows the relay's name.
        """
        relay = MemoryRelay()
        client = relay.client(ALICE)
        self.assertIs(self.successResultOf(client.ready), client)
        self.assertTrue(client.registered)
        self.assertEqual(client.relay_name, RELAY)
        self.assertEqual(client.queued, 0)
        self.assertEqual(client.max_envelope, wire.MAX_ENVELOPE)
        self.assertEqual(relay.store._keys["alice"], ALICE.public_der)

    def test_second_connection_not_registered(self):
        """The next session of the same identity and key is not a registration."""
        relay = MemoryRelay()
        first = relay.client(ALICE)
        closing = first.close()
        relay.flush()
        self.successResultOf(closing)
        second = relay.client(ALICE)
        self.assertIs(self.successResultOf(second.ready), second)
        self.assertFalse(second.registered)

    def test_welcome_reports_queue_and_limit(self):
        """queued and max_envelope come from the relay's Welcome."""
        relay = MemoryRelay(max_envelope=100_000)
        relay.register(BOB)
        for n in (1, 2):
            relay._result(relay.store.enqueue("bob", "alice", mid(n), b"x", 0))
        client = relay.client(BOB)
        self.successResultOf(client.ready)
        self.assertEqual(client.queued, 2)
        self.assertEqual(client.max_envelope, 100_000)

    def test_auth_frame(self):
        """The Auth frame carries the identity, its key and a valid transcript signature."""
        transport = StringTransport()
        client = ClientProtocol(ALICE)
        client.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        [auth] = read_frames(transport)
        self.assertIsInstance(auth, wire.Auth)
        self.assertEqual((auth.version, auth.identity, auth.public_key),
                         (wire.PROTOCOL_VERSION, "alice", ALICE.public_der))
        # A client without a handler does not receive; the flag is signed.
        self.assertIs(auth.receive, False)
        transcript = wire.auth_transcript(CHALLENGE, RELAY, "alice", receive=False)
        self.assertTrue(keys.verify(ALICE.public_key, auth.signature, transcript))
        self.assertNoResult(client.ready)

    def test_key_conflict_at_relay(self):
        """
        The relay refusing the key (another key is registered for the
        identity) fails C{ready} with a L{RelayError} carrying KEY_CONFLICT.
        """
        relay = MemoryRelay()
        relay.register(MALLORY_BOB)
        client = relay.client(BOB)
        failure = self.failureResultOf(client.ready, RelayError)
        self.assertEqual(failure.value.code, E.KEY_CONFLICT)
        self.assertIn("bob", failure.value.text)
        self.successResultOf(client.closed)

    def test_fatal_error_before_welcome(self):
        """A fatal Error before Welcome fails ready with a RelayError of that code."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        transport.clear()
        client.dataReceived(wire.encode(wire.Error(E.AUTH_FAILED, b"", "bad signature")))
        failure = self.failureResultOf(client.ready, RelayError)
        self.assertEqual(failure.value.code, E.AUTH_FAILED)
        self.assertEqual(failure.value.text, "bad signature")
        self.assertFalse(transport.connected)
        self.assertIs(client.close_reason, failure.value)
        self.successResultOf(client.closed)
        # The relay's error is not echoed back.
        self.assertEqual(transport.value(), b"")

    def test_unsupported_version(self):
        """
        A Hello of another protocol version: the client answers
        UNSUPPORTED_VERSION, does not authenticate and closes.
        """
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION + 1, RELAY, CHALLENGE)))
        [frame] = read_frames(transport)
        self.assertIsInstance(frame, wire.Error)
        self.assertEqual(frame.code, E.UNSUPPORTED_VERSION)
        self.assertIn(str(wire.PROTOCOL_VERSION + 1), frame.text)
        self.assertFalse(transport.connected)
        failure = self.failureResultOf(client.ready, RelayError)
        self.assertEqual(failure.value.code, E.UNSUPPORTED_VERSION)

    def test_frame_before_hello(self):
        """Anything but Hello or Error before the handshake: UNEXPECTED_FRAME and close."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Deliver(mid(1), b"x")))
        [frame] = read_frames(transport)
        self.assertEqual(frame.code, E.UNEXPECTED_FRAME)
        self.assertFalse(transport.connected)
        self.assertEqual(self.failureResultOf(client.ready, RelayError).value.code,
                         E.UNEXPECTED_FRAME)

    def test_second_hello(self):
        """A second Hello after authentication is a protocol error."""
        client, transport = ready_client()
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        [frame] = read_frames(transport)
        self.assertEqual(frame.code, E.UNEXPECTED_FRAME)
        self.assertFalse(transport.connected)

    def test_malformed_frame(self):
        """Bytes that are no frame: MALFORMED_FRAME sent back and the connection closed."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(b"\x00\x00\x00\x01\xee")
        [frame] = read_frames(transport)
        self.assertEqual(frame.code, E.MALFORMED_FRAME)
        self.assertFalse(transport.connected)
        self.assertEqual(self.failureResultOf(client.ready, RelayError).value.code,
                         E.MALFORMED_FRAME)

    def test_connection_lost_before_welcome(self):
        """A connection that ends during the handshake fails ready with Disconnected."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE)
        transport.protocol = client
        client.makeConnection(transport)
        client.connectionLost(Failure(error.ConnectionDone()))
        failure = self.failureResultOf(client.ready, Disconnected)
        self.assertIn("closed the connection", str(failure.value))
        self.successResultOf(client.closed)

    def test_frames_split_anywhere(self):
        """Hello and Welcome trickled one byte at a time still authenticate."""
        transport = StringTransport()
        client = ClientProtocol(ALICE)
        client.makeConnection(transport)
        data = (wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        for i in range(len(data)):
            client.dataReceived(data[i:i + 1])
        self.assertIsInstance(read_frames(transport)[0], wire.Auth)
        data = wire.encode(wire.Welcome(True, 3, 1000))
        for i in range(len(data)):
            client.dataReceived(data[i:i + 1])
        self.successResultOf(client.ready)
        self.assertEqual((client.registered, client.queued, client.max_envelope),
                         (True, 3, 1000))


class SendReceiveTests(SynchronousTestCase):
    def setUp(self):
        self.relay = MemoryRelay()
        self.alice_contacts = MemoryContacts()
        self.alice = self.relay.client(ALICE, contacts=self.alice_contacts)
        self.received: list[envelope.Opened] = []
        self.bob = self.relay.client(BOB, on_message=self.received.append)
        self.successResultOf(self.alice.ready)
        self.successResultOf(self.bob.ready)

    def test_send_and_deliver(self):
        """
        send fires with the message id once the relay accepted it; the
        connected recipient is handed the verified plaintext and acks it, so
        the relay's mailbox is empty again.
        """
        d = self.alice.send("bob", "héllo bob".encode())
        self.relay.flush()
        message_id = self.successResultOf(d)
        self.assertEqual(len(message_id), wire.MESSAGE_ID_SIZE)
        [opened] = self.received
        self.assertEqual(opened.plaintext, "héllo bob".encode())
        self.assertEqual(opened.sender, "alice")
        self.assertEqual(opened.header.recipient, "bob")
        self.assertEqual(opened.message_id, message_id)
        self.assertEqual(self.relay.count("bob"), 0)
        self.assertEqual(self.relay.factory.mailboxes.delivered_total, 1)

    def test_send_with_chosen_message_id(self):
        """A message id given to send is the one used end to end."""
        d = self.alice.send("bob", b"x", message_id=mid(7))
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), mid(7))
        self.assertEqual([o.message_id for o in self.received], [mid(7)])

    def test_messages_arrive_in_order(self):
        """Several sends arrive in the order they were made."""
        ds = [self.alice.send("bob", f"m{n}".encode()) for n in range(5)]
        self.relay.flush()
        ids = [self.successResultOf(d) for d in ds]
        self.assertEqual([o.plaintext for o in self.received],
                         [f"m{n}".encode() for n in range(5)])
        self.assertEqual([o.message_id for o in self.received], ids)

    def test_queued_while_offline(self):
        """Messages sent while the recipient is offline arrive when it connects."""
        closing = self.bob.close()
        self.relay.flush()
        self.successResultOf(closing)
        ds = [self.alice.send("bob", b"one"), self.alice.send("bob", b"two")]
        self.relay.flush()
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(self.relay.count("bob"), 2)
        later: list[envelope.Opened] = []
        bob = self.relay.client(BOB, on_message=later.append)
        self.assertEqual(self.successResultOf(bob.ready).queued, 2)
        self.assertEqual([o.plaintext for o in later], [b"one", b"two"])
        self.assertEqual(self.relay.count("bob"), 0)

    def test_contact_pinned_on_first_use(self):
        """After a send the recipient's key is pinned in the sender's contacts."""
        self.assertIsNone(self.alice_contacts.pinned("bob"))
        d = self.alice.send("bob", b"x")
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(keys.public_der(self.alice_contacts.pinned("bob")), BOB.public_der)

    def test_directory_key_changed(self):
        """
        When a directory later answers with another key for a pinned
        contact (here: a relay whose directory binds bob to another key),
        send fails with KeyConflict showing both fingerprints and nothing
        is sent.
        """
        d = self.alice.send("bob", b"first")
        self.relay.flush()
        self.successResultOf(d)
        other = MemoryRelay()
        other.register(MALLORY_BOB)
        alice = other.client(ALICE, contacts=self.alice_contacts)
        self.successResultOf(alice.ready)
        d = alice.send("bob", b"second")
        other.flush()
        failure = self.failureResultOf(d, keys.KeyConflict)
        self.assertIn(fp(BOB), str(failure.value))
        self.assertIn(fp(MALLORY_BOB), str(failure.value))
        self.assertEqual(failure.value.identity, "bob")
        self.assertEqual(keys.public_der(self.alice_contacts.pinned("bob")), BOB.public_der)
        self.assertEqual([o.plaintext for o in self.received], [b"first"])
        self.assertEqual(other.factory.mailboxes.accepted_total, 0)
        self.assertEqual(other.count("bob"), 0)

    def test_unknown_recipient(self):
        """A recipient the relay does not know fails the send with UNKNOWN_IDENTITY."""
        d = self.alice.send("nobody", b"x")
        self.relay.flush()
        failure = self.failureResultOf(d, RelayError)
        self.assertEqual(failure.value.code, E.UNKNOWN_IDENTITY)
        self.assertIn("nobody", failure.value.text)
        # The session goes on.
        d = self.alice.send("bob", b"after")
        self.relay.flush()
        self.successResultOf(d)

    def test_invalid_recipient(self):
        """An invalid identity fails at once, before anything is written."""
        d = self.alice.send("not valid!", b"x")
        self.failureResultOf(d, keys.IdentityError)

    def test_send_refused(self):
        """
        A non-fatal Error naming a pending send's message id fails that send
        with SendRefused carrying the code; the session goes on.
        """
        relay = MemoryRelay(quota=Quota(messages=1, bytes=0))
        alice = relay.client(ALICE)
        relay.register(BOB)
        first = alice.send("bob", b"1")
        second = alice.send("bob", b"2")
        relay.flush()
        self.successResultOf(first)
        failure = self.failureResultOf(second, SendRefused)
        self.assertEqual(failure.value.code, E.MAILBOX_FULL)
        self.assertIsInstance(failure.value, RelayError)
        self.assertEqual(relay.count("bob"), 1)
        self.assertEqual(alice._state, "ready")

    def test_message_too_large(self):
        """A message over the relay's advertised limit fails before it is sent."""
        relay = MemoryRelay(max_envelope=4096)
        alice = relay.client(ALICE)
        relay.register(BOB)
        d = alice.send("bob", b"x" * 5000)
        relay.flush()
        self.failureResultOf(d, envelope.EnvelopeTooLarge)
        self.assertEqual(relay.factory.mailboxes.accepted_total, 0)

    def test_send_before_ready(self):
        """send on a client that is not authenticated fails with RelayError."""
        client = ClientProtocol(ALICE)
        client.makeConnection(StringTransport())
        self.failureResultOf(client.send("bob", b"x"), RelayError)

    def test_close(self):
        """close() ends the session: closed fires and the relay forgets the session."""
        d = self.alice.close()
        self.assertNoResult(d)
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(len(self.relay.factory.sessions), 1)
        self.successResultOf(self.alice.close())

    def test_large_envelope_on_relay_with_higher_limit(self):
        """
        A relay may accept envelopes above the protocol default
        (--max-envelope); the recipient must still receive them.
        """
        relay = MemoryRelay(max_envelope=512 * 1024)
        relay.register(BOB)
        alice = relay.client(ALICE)
        d = alice.send("bob", b"x" * 300_000)
        relay.flush()
        self.successResultOf(d)
        got: list[envelope.Opened] = []
        bob = relay.client(BOB, on_message=got.append)
        self.successResultOf(bob.ready)
        self.assertEqual([len(o.plaintext) for o in got], [300_000])


    def test_large_deliver_after_welcome(self):
        """
        A Deliver above the protocol default, arriving after a Welcome that
        allows it, is accepted.
        """
        got: list[envelope.Opened] = []
        rejected: list[Rejected] = []
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(BOB, on_message=got.append, on_rejected=rejected.append)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        client.dataReceived(wire.encode(wire.Welcome(False, 1, 512 * 1024)))
        client.dataReceived(key_frame(ALICE))
        data = envelope.seal(ALICE, "bob", BOB.public_key, b"y" * 300_000,
                             message_id=mid(1), max_envelope=512 * 1024)
        self.assertGreater(len(data), wire.MAX_ENVELOPE)
        client.dataReceived(wire.encode(wire.Deliver(mid(1), data)))
        self.assertEqual([r.reason for r in rejected], [])
        self.assertEqual([len(o.plaintext) for o in got], [300_000])
        self.assertTrue(transport.connected)


    def test_large_deliver_in_same_read_as_welcome(self):
        """Welcome and a large Deliver in one read (as a relay sends them) still work."""
        got: list[envelope.Opened] = []
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(BOB, on_message=got.append)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        data = envelope.seal(ALICE, "bob", BOB.public_key, b"y" * 300_000,
                             message_id=mid(1), max_envelope=512 * 1024)
        client.dataReceived(wire.encode(wire.Welcome(False, 1, 512 * 1024))
                            + key_frame(ALICE)
                            + wire.encode(wire.Deliver(mid(1), data)))
        self.successResultOf(client.ready)
        self.assertEqual([len(o.plaintext) for o in got], [300_000])


    def test_deliver_over_advertised_limit(self):
        """
        A message stored while the relay allowed larger envelopes still comes
        out after the limit was lowered: deliveries are not held to the
        relay's current sending limit.
        """
        received = []
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(BOB, on_message=received.append)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        client.dataReceived(wire.encode(wire.Welcome(False, 1, 16 * 1024)))
        client.contacts.pin("alice", ALICE.public_der)
        client._directory["alice"] = ALICE.public_der
        sealed = envelope.seal(ALICE, "bob", BOB.public_key, b"z" * 20_000, message_id=mid(1))
        transport.clear()
        client.dataReceived(wire.encode(wire.Deliver(mid(1), sealed)))
        self.assertEqual([m.plaintext for m in received], [b"z" * 20_000])
        self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])

    def test_deliver_over_largest_envelope(self):
        """Nothing larger than any relay may store is accepted."""
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(BOB, on_message=list.append)
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        client.dataReceived(wire.encode(wire.Welcome(False, 0, 16 * 1024)))
        transport.clear()
        client.dataReceived(wire.LENGTH_PREFIX.pack(wire.max_frame_for(wire.LARGEST_ENVELOPE) + 1))
        [frame] = read_frames(transport)
        self.assertEqual(frame.code, E.MALFORMED_FRAME)
        self.assertFalse(transport.connected)


class DeliveryTests(SynchronousTestCase):
    """Deliveries fed frame by frame to an authenticated client."""

    def setUp(self):
        self.received: list[envelope.Opened] = []
        self.rejected: list[Rejected] = []
        self.contacts = MemoryContacts()
        self.client, self.transport = ready_client(
            BOB, contacts=self.contacts, on_message=self.received.append,
            on_rejected=self.rejected.append,
        )
        # The directory's answer for alice, cached for the session.
        self.client.dataReceived(key_frame(ALICE))

    def deliver(self, message_id: bytes, data: bytes) -> None:
        self.client.dataReceived(wire.encode(wire.Deliver(message_id, data)))

    def test_delivered_and_acked(self):
        self.deliver(mid(1), sealed(message_id=mid(1)))
        [opened] = self.received
        self.assertEqual((opened.sender, opened.plaintext, opened.message_id),
                         ("alice", b"hi bob", mid(1)))
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])
        self.assertEqual(keys.public_der(self.contacts.pinned("alice")), ALICE.public_der)

    def test_sender_key_looked_up(self):
        """An unknown sender's key is asked of the relay before the message is opened."""
        self.deliver(mid(1), sealed(sender=CAROL, message_id=mid(1)))
        self.assertEqual(read_frames(self.transport), [wire.Lookup("carol")])
        self.assertEqual(self.received, [])
        self.client.dataReceived(key_frame(CAROL))
        self.assertEqual([o.sender for o in self.received], ["carol"])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])

    def test_tampered(self):
        """
        An envelope whose signature does not verify is handed to
        on_rejected, never to on_message, and acknowledged.
        """
        data = bytearray(sealed(message_id=mid(2)))
        data[-5] ^= 0x01  # inside the signature
        self.deliver(mid(2), bytes(data))
        self.assertEqual(self.received, [])
        [rejected] = self.rejected
        self.assertIsInstance(rejected, Rejected)
        self.assertEqual((rejected.message_id, rejected.sender), (mid(2), "alice"))
        self.assertIn("signature", rejected.reason)
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(2))])
        self.assertTrue(self.transport.connected)

    def test_unparseable(self):
        """Garbage is rejected with no sender, and acked."""
        self.deliver(mid(3), b"\x01\x01garbage")
        [rejected] = self.rejected
        self.assertIsNone(rejected.sender)
        self.assertEqual(rejected.message_id, mid(3))
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(3))])

    def test_delivered_under_another_id(self):
        """The relay's message id must be the envelope's."""
        self.deliver(mid(4), sealed(message_id=mid(5)))
        [rejected] = self.rejected
        self.assertEqual(rejected.message_id, mid(4))
        self.assertIn("another message id", rejected.reason)
        self.assertEqual(self.received, [])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(4))])

    def test_sealed_for_someone_else(self):
        """An envelope for carol delivered to bob is rejected."""
        self.deliver(mid(6), sealed(recipient=CAROL, message_id=mid(6)))
        [rejected] = self.rejected
        self.assertIn("carol", rejected.reason)
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(6))])

    def test_sender_key_conflicts_with_pinned(self):
        """
        A sender whose directory key differs from the pinned one is
        rejected with both fingerprints in the reason.
        """
        self.contacts.pin("carol", MALLORY_BOB.public_der)
        self.deliver(mid(7), sealed(sender=CAROL, message_id=mid(7)))
        read_frames(self.transport)
        self.client.dataReceived(key_frame(CAROL))
        [rejected] = self.rejected
        self.assertIn(fp(CAROL), rejected.reason)
        self.assertIn(fp(MALLORY_BOB), rejected.reason)
        self.assertEqual(self.received, [])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(7))])

    def test_unknown_sender(self):
        """A sender the relay does not know: rejected, acked."""
        self.deliver(mid(8), sealed(sender=CAROL, message_id=mid(8)))
        read_frames(self.transport)
        self.client.dataReceived(wire.encode(
            wire.Error(E.UNKNOWN_IDENTITY, b"carol", "no identity 'carol'")))
        [rejected] = self.rejected
        self.assertEqual(rejected.sender, "carol")
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(8))])

    def test_rejected_without_handler(self):
        """Without on_rejected a bad envelope is still acknowledged."""
        self.client.on_rejected = None
        self.deliver(mid(9), b"junk")
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(9))])

    def test_duplicate(self):
        """The same delivery twice: handed over once, acknowledged both times."""
        frame = wire.encode(wire.Deliver(mid(1), sealed(message_id=mid(1))))
        self.client.dataReceived(frame)
        self.client.dataReceived(frame)
        self.assertEqual(len(self.received), 1)
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1)), wire.Ack(mid(1))])

    def test_inbox_consulted(self):
        """A message already in the inbox (a previous session) is only acked."""
        inbox = MemoryInbox()
        inbox.record(opened_message(b"earlier", message_id=mid(1)))
        self.client.inbox = inbox
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.assertEqual(self.received, [])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])

    def test_recorded_before_shown(self):
        """
        The message is in the inbox by the time on_message sees it, and
        acknowledged only after on_message is done: a crash while showing
        leaves a record (no second showing), never an ack without one.
        """
        inbox = MemoryInbox()
        self.client.inbox = inbox
        showing = Deferred()
        states = []

        def show(opened):
            states.append(inbox.seen(opened.sender, opened.message_id))
            return showing

        self.client.on_message = show
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.assertEqual(states, [True])
        self.assertEqual(read_frames(self.transport), [])
        showing.callback(None)
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])

    def test_gaps_reported(self):
        """
        The sender's numbering: a jump reports the missing numbers, a
        number below the highest seen reports a late message; all are shown.
        """
        gaps = []
        self.client.on_gap = gaps.append
        for n, seq in ((1, 1), (2, 2), (3, 5), (4, 3)):
            self.deliver(mid(n), sealed(message_id=mid(n), seq=seq))
        self.assertEqual([o.header.seq for o in self.received], [1, 2, 5, 3])
        self.assertEqual(gaps, [Gap("alice", 3, 4), Gap("alice", 3, 3, late=True)])
        self.assertEqual(gaps[0].describe(),
                         "messages 3-4 from alice have not arrived (missing or still on the way)")
        self.assertIn("out of order", gaps[1].describe())
        self.assertEqual(len(read_frames(self.transport)), 4)

    def test_notice_shown_once_and_acked(self):
        """A relay notice goes to on_notice once, and is acked under its own id."""
        notices = []
        self.client.on_notice = notices.append
        notice = wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(3), 1_700_000_000,
                             "expired unread after 30 days on the relay")
        self.client.dataReceived(wire.encode(notice))
        self.client.dataReceived(wire.encode(notice))
        self.assertEqual(notices, [notice])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(9)), wire.Ack(mid(9))])

    def test_notice_of_a_message_already_received_is_not_shown(self):
        """A message that expired while delivered and unacknowledged: its notice is only acked."""
        notices = []
        self.client.on_notice = notices.append
        self.deliver(mid(3), sealed(message_id=mid(3)))
        notice = wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(3), 0, "expired")
        self.client.dataReceived(wire.encode(notice))
        self.assertEqual(notices, [])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(3)), wire.Ack(mid(9))])

    def test_notice_handler_raises(self):
        """A notice whose handler fails is not acked, and comes again."""
        def boom(notice):
            raise OSError("terminal gone")

        self.client.on_notice = boom
        notice = wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(3), 0, "expired")
        self.client.dataReceived(wire.encode(notice))
        self.assertEqual(read_frames(self.transport), [])
        self.assertFalse(self.transport.connected)
        self.assertFalse(self.client.inbox.notice_seen(notice))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_same_id_other_sender_not_duplicate(self):
        """Seen ids are per sender: carol's message with alice's id is new."""
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.client.dataReceived(key_frame(CAROL))
        self.deliver(mid(1), sealed(sender=CAROL, message_id=mid(1)))
        self.assertEqual([o.sender for o in self.received], ["alice", "carol"])

    def test_handler_raises(self):
        """
        on_message raising: the message is not acknowledged and the
        connection is closed, so the relay delivers it again.
        """
        def boom(opened):
            raise OSError("disk full")

        self.client.on_message = boom
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.assertEqual(read_frames(self.transport), [])
        self.assertFalse(self.transport.connected)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        # Taken out of the inbox again: the redelivery will be handed over.
        self.assertFalse(self.client.inbox.seen("alice", mid(1)))

    def test_handler_raises_drops_queued(self):
        """Deliveries queued behind a failing one are not handled either."""
        waiting = Deferred()
        calls = []

        def handler(opened):
            calls.append(opened.message_id)
            return waiting

        self.client.on_message = handler
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.deliver(mid(2), sealed(message_id=mid(2)))
        self.assertEqual(calls, [mid(1)])
        waiting.errback(OSError("disk full"))
        self.assertEqual(calls, [mid(1)])
        self.assertEqual(read_frames(self.transport), [])
        self.assertFalse(self.transport.connected)
        self.flushLoggedErrors(OSError)

    def test_asynchronous_handler(self):
        """
        A handler returning a Deferred: the ack waits for it and the next
        delivery waits its turn.
        """
        pending: list[Deferred] = []
        calls = []

        def handler(opened):
            calls.append(opened.message_id)
            d = Deferred()
            pending.append(d)
            return d

        self.client.on_message = handler
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.deliver(mid(2), sealed(message_id=mid(2)))
        self.assertEqual(calls, [mid(1)])
        self.assertEqual(read_frames(self.transport), [])
        pending[0].callback(None)
        self.assertEqual(calls, [mid(1), mid(2)])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])
        pending[1].callback(None)
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(2))])

    def test_pause_receiving(self):
        """After pause_receiving deliveries are neither handed over nor acked."""
        self.deliver(mid(1), sealed(message_id=mid(1)))
        self.client.pause_receiving()
        self.deliver(mid(2), sealed(message_id=mid(2)))
        self.deliver(mid(3), sealed(message_id=mid(3)))
        self.assertEqual([o.message_id for o in self.received], [mid(1)])
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])
        self.assertTrue(self.transport.connected)

    def test_error_refusing_pending_send(self):
        """A non-fatal Error whose ref is a pending send's id fails that send only."""
        self.client.dataReceived(key_frame(CAROL))
        d1 = self.client.send("carol", b"one", message_id=mid(1))
        d2 = self.client.send("carol", b"two", message_id=mid(2))
        frames = read_frames(self.transport)
        self.assertEqual([type(f) for f in frames], [wire.Send, wire.Send])
        self.client.dataReceived(wire.encode(wire.Error(E.STORE_FAILED, mid(2), "retry")))
        failure = self.failureResultOf(d2, SendRefused)
        self.assertEqual((failure.value.code, failure.value.text), (E.STORE_FAILED, "retry"))
        self.assertNoResult(d1)
        self.client.dataReceived(wire.encode(wire.Accepted(mid(1))))
        self.assertEqual(self.successResultOf(d1), mid(1))
        self.assertTrue(self.transport.connected)

    def test_error_without_ref_refuses_oldest_send(self):
        """
        An Error with no ref (the relay could not even read the envelope)
        fails the oldest pending send; later ones stay pending.
        """
        self.client.dataReceived(key_frame(CAROL))
        d1 = self.client.send("carol", b"one", message_id=mid(1))
        d2 = self.client.send("carol", b"two", message_id=mid(2))
        self.client.dataReceived(wire.encode(wire.Error(E.BAD_ENVELOPE, b"", "malformed")))
        self.assertEqual(self.failureResultOf(d1, SendRefused).value.code, E.BAD_ENVELOPE)
        self.assertNoResult(d2)

    def test_pending_send_fails_on_disconnect(self):
        """A send not yet accepted when the connection ends fails with Disconnected."""
        self.client.dataReceived(key_frame(CAROL))
        d = self.client.send("carol", b"x")
        self.client.connectionLost(Failure(error.ConnectionLost()))
        self.failureResultOf(d, Disconnected)

    def test_fatal_error_after_welcome(self):
        """A fatal Error while ready closes and fails pending sends with its RelayError."""
        self.client.dataReceived(key_frame(CAROL))
        d = self.client.send("carol", b"x")
        self.client.dataReceived(wire.encode(wire.Error(E.SUPERSEDED, b"", "replaced")))
        failure = self.failureResultOf(d, RelayError)
        self.assertEqual(failure.value.code, E.SUPERSEDED)
        self.assertFalse(self.transport.connected)

    def test_ping_answered(self):
        """A Ping from the relay is answered with a Pong of the same payload."""
        self.client.dataReceived(wire.encode(wire.Ping(b"12345678")))
        self.assertEqual(read_frames(self.transport), [wire.Pong(b"12345678")])

    def test_unexpected_frame_from_relay(self):
        """A client-only frame from the relay ends the session."""
        self.client.dataReceived(wire.encode(wire.Ack(mid(1))))
        [frame] = read_frames(self.transport)
        self.assertEqual(frame.code, E.UNEXPECTED_FRAME)
        self.assertFalse(self.transport.connected)


class PingTests(SynchronousTestCase):
    def test_ping_every_interval(self):
        """Once welcomed the client pings every ping_interval seconds of its clock."""
        clock = Clock()
        transport = StringTransportWithDisconnection()
        client = ClientProtocol(ALICE, clock=clock, ping_interval=60.0)
        transport.protocol = client
        client.makeConnection(transport)
        clock.advance(120)
        self.assertEqual(transport.value(), b"")  # no ping before the handshake
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
        client.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE)))
        transport.clear()
        clock.advance(59.9)
        self.assertEqual(read_frames(transport), [])
        clock.advance(0.1)
        [ping] = read_frames(transport)
        self.assertIsInstance(ping, wire.Ping)
        self.assertEqual(len(ping.opaque), wire.PING_SIZE)
        clock.advance(60)
        [second] = read_frames(transport)
        self.assertIsInstance(second, wire.Ping)
        self.assertNotEqual(second.opaque, ping.opaque)
        client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_silent_relay_is_given_up(self):
        """
        A relay that sends nothing back, not even PONG, for two ping
        intervals: the client aborts the connection, so sends waiting on it
        fail instead of waiting for ever.
        """
        clock = Clock()
        client, transport = ready_client(ALICE, clock=clock)
        client.ping_interval = 60.0
        client._ping.stop()
        client._heard = clock.seconds()
        client._ping.start(60.0, now=False)
        sent = client.submit(mid(1), b"an envelope")
        clock.advance(60)
        client.dataReceived(wire.encode(wire.Pong(b"12345678")))  # alive: heard at 60
        clock.advance(120)
        self.assertTrue(transport.connected)
        clock.advance(60)  # nothing heard since 60, now 240
        self.assertFalse(transport.connected)
        failure = self.failureResultOf(sent, Disconnected)
        self.assertIn("the relay stopped answering", str(failure.value))

    def test_no_clock_no_ping(self):
        """Without a clock nothing is scheduled."""
        client, transport = ready_client(ALICE)
        self.assertIsNone(client._ping)

    def test_ping_keeps_relay_session_alive(self):
        """
        Against a real relay with a 100 s idle timeout, 60 s pings keep an
        idle session open.
        """
        relay = MemoryRelay(idle_timeout=100.0)
        client = relay.client(ALICE)
        for _ in range(5):
            relay.clock.advance(60)
            relay.flush()
        self.assertNoResult(client.closed)
        self.assertEqual(len(relay.factory.sessions), 1)


class ConnectTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 9000)

    def build(self):
        """The protocol connect() asked the reactor to connect."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 9000))
        return factory.buildProtocol(None)

    def test_connect(self):
        """connect() fires with the authenticated client, settings passed on."""
        relay = MemoryRelay(clock=self.reactor)
        received = []
        d = connect(self.reactor, self.endpoint, ALICE, on_message=received.append, timeout=5)
        self.assertNoResult(d)
        relay.serve(self.build())
        client = self.successResultOf(d)
        self.assertIsInstance(client, ClientProtocol)
        self.assertIs(client.identity, ALICE)
        self.assertIs(client.clock, self.reactor)
        self.assertTrue(client.registered)
        self.assertEqual(client.on_message, received.append)
        # The auth timeout is cancelled once welcomed.
        self.reactor.advance(10)
        relay.flush()
        self.assertNoResult(client.closed)

    def test_no_hello_times_out(self):
        """
        A relay that accepts the connection but never says Hello: connect()
        fails with TimeoutError after C{timeout} seconds in all and aborts
        the connection.
        """
        d = connect(self.reactor, self.endpoint, ALICE, timeout=5)
        protocol = self.build()
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertTrue(transport.disconnecting)

    def test_one_deadline_for_connecting_and_welcome(self):
        """
        The timeout covers connecting and authenticating together: a TCP
        connection that took 3 of 5 seconds leaves 2 for the welcome.
        """
        d = connect(self.reactor, self.endpoint, ALICE, timeout=5)
        self.reactor.advance(3)
        protocol = self.build()
        protocol.makeConnection(StringTransport())
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, defer.TimeoutError)

    def test_tcp_connect_times_out(self):
        """
        A TCP connection that never completes is given up after C{timeout}
        seconds (the connector is stopped) and connect() fails with
        TimeoutError, the error mailrelay.cli._connect turns into "did not
        answer within N seconds".
        """
        d = connect(self.reactor, self.endpoint, ALICE, timeout=5)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.failureResultOf(d, defer.TimeoutError)


    def test_tcp_connect_gives_up_after_timeout(self):
        """Whatever the error, connect() gives up on the TCP stage after C{timeout}."""
        d = connect(self.reactor, self.endpoint, ALICE, timeout=5)
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.assertFalse(self.reactor.connectors[-1].stoppedConnecting)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.failureResultOf(d)

    def test_refused(self):
        """A refused connection fails connect() with ConnectionRefusedError."""
        d = connect(self.reactor, self.endpoint, ALICE, timeout=5)
        iosim.ConnectionCompleter(self.reactor).failOnce()
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_relay_refuses_key(self):
        """A relay refusing the identity's key fails connect() with KEY_CONFLICT."""
        relay = MemoryRelay(clock=self.reactor)
        relay.register(MALLORY_BOB)
        d = connect(self.reactor, self.endpoint, BOB, timeout=5)
        relay.serve(self.build())
        self.assertEqual(self.failureResultOf(d, RelayError).value.code, E.KEY_CONFLICT)

    def test_factory_settings(self):
        """ClientFactory builds a fresh protocol with its settings per connection."""
        contacts = MemoryContacts()
        clock = Clock()
        factory = ClientFactory(identity=ALICE, contacts=contacts, clock=clock,
                                ping_interval=5.0)
        p1 = factory.buildProtocol(None)
        p2 = factory.buildProtocol(None)
        self.assertIsNot(p1, p2)
        self.assertIs(p1.factory, factory)
        self.assertEqual((p1.identity, p1.contacts, p1.clock, p1.ping_interval),
                         (ALICE, contacts, clock, 5.0))
        self.assertIsNot(p1.ready, p2.ready)


class FakeClient:
    """
    What the chat needs of a session: contacts' keys, and submit() of the
    envelopes it sealed.  Records each submitted message as (recipient,
    plaintext, Deferred) for the test to answer, and its envelope header.
    """

    identity = ALICE
    max_envelope = wire.MAX_ENVELOPE
    people = {"bob": BOB, "carol": CAROL}

    def __init__(self):
        self.sent: list[tuple[str, bytes, Deferred]] = []
        self.headers: list[envelope.Header] = []

    def contact_key(self, name):
        return defer.succeed(self.people[name].public_key)

    def submit(self, message_id, data):
        header = envelope.read_header(data)
        opened = envelope.open_envelope(data, self.people[header.recipient], ALICE.public_key)
        d = Deferred()
        self.sent.append((header.recipient, opened.plaintext, d))
        self.headers.append(header)
        return d


class ConsoleTests(SynchronousTestCase):
    def setUp(self):
        from mailrelay.client.outbox import Outbox

        self.outbox = Outbox(self.mktemp())
        self.addCleanup(self.outbox.close)
        self.console = ChatConsole("alice", self.outbox)
        self.client = FakeClient()
        self.console.client = self.client
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.console
        self.console.makeConnection(self.transport)

    def output(self) -> str:
        text = self.transport.value().decode("utf-8")
        self.transport.clear()
        return text

    def test_greeting(self):
        self.assertEqual(self.output(),
                         "Connected as alice. Type /quit to leave.\nEnter receiver: ")

    def test_send(self):
        """A receiver line, then a message line, sends the message and reports it."""
        self.output()
        self.console.dataReceived(b"bob\n")
        self.assertEqual(self.output(), "Message for bob: ")
        self.console.dataReceived("héllo there\r\n".encode())
        [(recipient, data, d)] = self.client.sent
        self.assertEqual((recipient, data), ("bob", "héllo there".encode()))
        self.assertEqual(self.output(), "Enter receiver: ")
        message_id = self.client.headers[0].message_id
        d.callback(message_id)
        self.assertEqual(self.output(),
                         f"\nMessage sent to bob ({message_id.hex()[:8]}).\nEnter receiver: ")

    def test_messages_are_numbered(self):
        """The chat numbers its messages through the outbox, as `mailrelay send` does."""
        self.console.dataReceived(b"bob\none\n")
        self.client.sent[0][2].callback(self.client.headers[0].message_id)
        self.console.dataReceived(b"bob\ntwo\n")
        self.client.sent[1][2].callback(self.client.headers[1].message_id)
        self.assertEqual([h.seq for h in self.client.headers], [1, 2])
        self.assertEqual(self.outbox.pending(), [])

    def test_send_failed(self):
        """A failed send is reported with its reason."""
        self.console.dataReceived(b"bob\nhi\n")
        self.output()
        self.client.sent[0][2].errback(SendRefused(E.MAILBOX_FULL, "mailbox full"))
        self.assertEqual(self.output(),
                         "\nNot sent to bob: mailbox full (MAILBOX_FULL); it stays in the "
                         "outbox and goes with the next session\nEnter receiver: ")
        self.assertEqual(len(self.outbox.pending()), 1)

    def test_invalid_receiver(self):
        """An invalid receiver prints why and asks again."""
        self.output()
        self.console.dataReceived(b"bad name!\n")
        text = self.output()
        self.assertIn("'bad name!' is not a valid identity", text)
        self.assertTrue(text.endswith("\nEnter receiver: "))
        self.assertEqual(self.client.sent, [])
        self.console.dataReceived(b"carol\nyo\n")
        self.assertEqual([(r, m) for r, m, _ in self.client.sent], [("carol", b"yo")])

    def test_empty_receiver(self):
        self.output()
        self.console.dataReceived(b"  \n")
        self.assertEqual(self.output(), "Enter receiver: ")

    def test_show(self):
        """show() prints a received message and the prompt again."""
        self.output()
        opened = envelope.open_envelope(sealed(recipient=BOB), BOB, ALICE.public_key)
        self.console.show(opened)
        self.assertEqual(self.output(),
                         "\nReceived message from alice: hi bob\nEnter receiver: ")
        self.console.dataReceived(b"bob\n")
        self.console.show(opened)
        self.assertTrue(self.output().endswith("Message for bob: "))

    def test_show_cannot_forge_a_line(self):
        """A message's own line breaks and escape codes cannot pose as another message."""
        self.output()
        env = envelope.seal(ALICE, "bob", BOB.public_key,
                            b"ok\nReceived message from carol: pay me\x1b[1A")
        self.console.show(envelope.open_envelope(env, BOB, ALICE.public_key))
        self.assertEqual(
            self.output(),
            "\nReceived message from alice: ok\n    Received message from carol: pay me"
            "\\x1b[1A\nEnter receiver: ",
        )

    def test_rejected(self):
        self.output()
        self.console.rejected(Rejected(mid(1), None, "garbled"))
        self.assertEqual(self.output(),
                         "\nDropped a message from an unknown sender: garbled\nEnter receiver: ")

    def test_quit(self):
        """/quit closes the console; done fires."""
        self.assertNoResult(self.console.done)
        self.console.dataReceived(b"/quit\n")
        self.assertFalse(self.transport.connected)
        self.successResultOf(self.console.done)
        self.assertEqual(self.client.sent, [])

    def test_quit_while_composing(self):
        self.console.dataReceived(b"bob\n /quit \n")
        self.assertFalse(self.transport.connected)
        self.assertEqual(self.client.sent, [])


def opened_message(text: bytes, sender=ALICE, recipient=BOB, message_id=mid(42), seq=0,
                   timestamp=1_700_000_000) -> envelope.Opened:
    if timestamp >= 2**63:
        # No envelope carries such a time any more (it is malformed): made
        # up here, to show the Maildir copes with any number it is handed.
        header = envelope.Header(envelope.VERSION, envelope.SUITE_RSA, sender.name,
                                 sender.fingerprint, recipient.name, recipient.fingerprint,
                                 message_id, timestamp, seq)
        return envelope.Opened(header, text)
    data = envelope.seal(sender, recipient.name, recipient.public_key, text,
                         message_id=message_id, timestamp=timestamp, seq=seq)
    return envelope.open_envelope(data, recipient, sender.public_key)


class MaildirTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.maildir = Maildir(self.path)

    def test_creates_layout(self):
        self.assertEqual(sorted(os.listdir(self.path)), ["cur", "new", "tmp"])

    def test_add(self):
        """
        One message: one file in new/, nothing left in tmp/, an RFC 5322
        message with From, To, Date, Message-ID and the text as body.
        """
        opened = opened_message("héllo bob\nsecond line".encode())
        path = self.maildir.add(opened)
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [path.name])
        self.assertEqual(os.listdir(os.path.join(self.path, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(self.path, "cur")), [])
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        self.assertEqual(msg["From"], "alice@mailrelay.invalid")
        self.assertEqual(msg["To"], "bob@mailrelay.invalid")
        self.assertEqual(email.utils.parsedate_to_datetime(msg["Date"]).timestamp(),
                         1_700_000_000)
        self.assertEqual(msg["Message-ID"], f"<{mid(42).hex()}.alice@mailrelay.invalid>")
        self.assertEqual(msg["X-Mailrelay-Sender-Fingerprint"].strip(), ALICE.fingerprint.hex())
        self.assertEqual(msg.get_content_type(), "text/plain")
        # The file is written with CRLF line ends (policy SMTP).
        self.assertEqual(msg.get_content().splitlines(), ["héllo bob", "second line"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_binary(self):
        """Plaintext that is not UTF-8 is kept byte for byte as application/octet-stream."""
        payload = b"\xff\xfe\x00binary\x80"
        path = self.maildir.add(opened_message(payload))
        msg = email.message_from_bytes(path.read_bytes())
        self.assertEqual(msg.get_content_type(), "application/octet-stream")
        self.assertEqual(msg.get_payload(decode=True), payload)
        self.assertEqual(msg["From"], "alice@mailrelay.invalid")

    def test_same_message_filed_once(self):
        """
        Filing the same message again (after a crash between filing it and
        recording it) finds its file, in new/ or, once read, in cur/.
        """
        a = self.maildir.add(opened_message(b"one"))
        self.assertEqual(self.maildir.add(opened_message(b"one")), a)
        self.assertEqual(len(os.listdir(os.path.join(self.path, "new"))), 1)
        read = os.path.join(self.path, "cur", a.name + ":2,S")
        os.rename(a, read)
        self.assertEqual(str(self.maildir.add(opened_message(b"one"))), read)
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [])

    def test_same_id_other_sender_is_another_file(self):
        """Ids are the sender's: carol reusing alice's id does not pass for filed."""
        a = self.maildir.add(opened_message(b"one"))
        b = self.maildir.add(opened_message(b"two", sender=CAROL))
        self.assertNotEqual(a, b)
        self.assertEqual(len(os.listdir(os.path.join(self.path, "new"))), 2)

    def test_identity_with_at_sign(self):
        """
        Identities may contain '@' (the identity alphabet allows it); the
        From address must still be one address naming that sender, and the
        Message-ID must stay in the mailrelay.invalid domain.
        """
        sender = ident("bob@example.org", key="alice")
        opened = opened_message(b"hi", sender=sender, recipient=BOB)
        msg = email.message_from_bytes(as_email(opened), policy=email.policy.default)
        [address] = msg["From"].addresses
        self.assertEqual(address.domain, "mailrelay.invalid")
        self.assertIn("bob@example.org", str(address))
        self.assertIn(mid(42).hex(), msg["Message-ID"])
        self.assertTrue(msg["Message-ID"].strip().endswith("@mailrelay.invalid>"))

    def test_absurd_timestamp(self):
        """
        A sender-chosen timestamp no date can show (2**63, year 10000, far
        before 1970) does not stop the message being filed: it is dated by
        its receipt and the sender's number kept in X-Mailrelay-Sent-At.
        """
        for n, timestamp in enumerate((2**63, 253_402_300_800, 2**64 - 1)):
            before = int(time.time())
            path = self.maildir.add(opened_message(b"from the far future", timestamp=timestamp,
                                                   message_id=mid(100 + n)))
            after = time.time()
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            self.assertEqual(msg["X-Mailrelay-Sent-At"], str(timestamp))
            date = email.utils.parsedate_to_datetime(msg["Date"]).timestamp()
            self.assertTrue(before <= date <= after, (before, date, after))
            self.assertEqual(msg.get_content().strip(), "from the far future")

    def test_ordinary_timestamp_has_no_sent_at(self):
        msg = email.message_from_bytes(as_email(opened_message(b"x")),
                                       policy=email.policy.default)
        self.assertIsNone(msg["X-Mailrelay-Sent-At"])



class InboxTests(SynchronousTestCase):
    def test_memory(self):
        inbox = MemoryInbox()
        self.assertFalse(inbox.seen("alice", mid(1)))
        inbox.record(opened_message(b"x", message_id=mid(1)))
        self.assertTrue(inbox.seen("alice", mid(1)))
        self.assertFalse(inbox.seen("carol", mid(1)))
        self.assertFalse(inbox.seen("alice", mid(2)))

    def test_file_persists(self):
        """Messages recorded in an inbox are there, with their text, after reopening it."""
        path = self.mktemp()
        inbox = Inbox(path)
        self.assertFalse(inbox.seen("alice", mid(1)))
        inbox.record(opened_message(b"first", message_id=mid(1), seq=1))
        inbox.record(opened_message(b"first", message_id=mid(1), seq=1))  # idempotent
        self.assertTrue(inbox.seen("alice", mid(1)))
        inbox.close()
        again = Inbox(path)
        self.addCleanup(again.close)
        self.assertTrue(again.seen("alice", mid(1)))
        self.assertFalse(again.seen("alice", mid(2)))
        self.assertFalse(again.seen("carol", mid(1)))
        [kept] = again.messages()
        self.assertEqual((kept.sender, kept.message_id, kept.seq, kept.body),
                         ("alice", mid(1), 1, b"first"))
        # The numbering goes on from where it was.
        self.assertEqual(again.record(opened_message(b"3", message_id=mid(3), seq=3)),
                         [Gap("alice", 2, 2)])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_forget(self):
        path = self.mktemp()
        inbox = Inbox(path)
        self.addCleanup(inbox.close)
        opened = opened_message(b"x", message_id=mid(1))
        inbox.record(opened)
        inbox.forget(opened)
        self.assertFalse(inbox.seen("alice", mid(1)))
        self.assertEqual(inbox.messages(), [])

    def test_notices_persist(self):
        path = self.mktemp()
        notice = wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(3), 5, "expired")
        inbox = Inbox(path)
        inbox.record_notice(notice)
        inbox.close()
        again = Inbox(path)
        self.addCleanup(again.close)
        self.assertTrue(again.notice_seen(notice))
        self.assertEqual(again.notices(), [notice])

    def test_imports_a_seen_file(self):
        """
        Ids kept by earlier clients in seen.sqlite are taken over, so none
        of those messages is shown again; the old file is set aside.
        """
        import sqlite3

        old = os.path.abspath(self.mktemp())
        db = sqlite3.connect(old)
        db.execute("CREATE TABLE seen (sender TEXT NOT NULL, message_id BLOB NOT NULL,"
                   " seen_at INTEGER NOT NULL, PRIMARY KEY (sender, message_id))")
        db.execute("INSERT INTO seen VALUES ('alice', ?, 1)", (mid(1),))
        db.commit()
        db.close()
        inbox = Inbox(self.mktemp(), legacy_seen=old)
        self.addCleanup(inbox.close)
        self.assertTrue(inbox.seen("alice", mid(1)))
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(old + ".imported"))

    def test_file_not_a_database(self):
        """An inbox file that is not SQLite: InboxError saying what to do."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("this is not a database\n" * 100)
        exc = self.assertRaises(InboxError, Inbox, path)
        self.assertEqual(
            str(exc),
            f"cannot read {path}: file is not a database; move it aside to start afresh "
            f"(messages already shown may then be shown again)",
        )
        with open(path) as f:
            self.assertTrue(f.read().startswith("this is not a database"))

    def test_file_unopenable(self):
        """An inbox path that cannot be opened (a directory): InboxError."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        exc = self.assertRaises(InboxError, Inbox, path)
        self.assertTrue(str(exc).startswith(f"cannot read {path}: "), str(exc))

    def test_unshown_after_a_crash_is_shown_first_next_session(self):
        """
        A client that died after recording a message but before showing it
        (no mark) shows it first in its next session, without acking it
        again; one that died after the mark does not show it again.
        """
        path = self.mktemp()
        inbox = Inbox(path)
        recorded = opened_message(b"recorded, never shown", message_id=mid(1), seq=1)
        shown = opened_message(b"shown", message_id=mid(2), seq=2)
        inbox.record(recorded)
        inbox.record(shown)
        inbox.mark_shown(shown)
        inbox.close()  # the process dies here

        inbox = Inbox(path)
        self.addCleanup(inbox.close)
        self.assertEqual([o.message_id for o in inbox.unshown()], [mid(1)])
        got = []
        client, transport = ready_client(BOB, on_message=got.append, inbox=inbox)
        self.assertEqual([(o.sender, o.message_id, o.plaintext, o.header.seq) for o in got],
                         [("alice", mid(1), b"recorded, never shown", 1)])
        self.assertEqual(read_frames(transport), [])
        self.assertEqual(inbox.unshown(), [])
        # The relay delivers both again (their acks were lost): acked, not shown.
        client.dataReceived(key_frame(ALICE))
        for n in (1, 2):
            client.dataReceived(wire.encode(wire.Deliver(mid(n), sealed(message_id=mid(n)))))
        self.assertEqual(len(got), 1)
        self.assertEqual(read_frames(transport), [wire.Ack(mid(1)), wire.Ack(mid(2))])

    def test_durable_handler_refiles_after_a_crash_while_filing(self):
        """
        For a handler that files durably (the Maildir of twistd mailclient),
        the message is marked done only after filing: a client killed while
        filing files it in its next session, once.
        """
        path = self.mktemp()
        maildir = Maildir(self.mktemp())
        inbox = Inbox(path)
        calls = []

        def dies_while_filing(opened):
            calls.append(opened.message_id)
            raise SystemExit("killed")  # stands in for the process dying mid-write

        client, transport = ready_client(BOB, on_message=dies_while_filing, inbox=inbox,
                                         durable_handler=True)
        client.dataReceived(key_frame(ALICE))
        inbox.record(opened_message(b"important", message_id=mid(1)))  # as _receive did
        inbox.close()

        inbox = Inbox(path)
        self.addCleanup(inbox.close)
        client, transport = ready_client(BOB, on_message=maildir.add, inbox=inbox,
                                         durable_handler=True)
        self.assertEqual(len(os.listdir(maildir.path / "new")), 1)
        self.assertEqual(inbox.unshown(), [])
        # The relay delivers it again (never acknowledged): acked, not filed twice.
        client.dataReceived(key_frame(ALICE))
        client.dataReceived(wire.encode(wire.Deliver(mid(1), sealed(message_id=mid(1)))))
        self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])
        self.assertEqual(len(os.listdir(maildir.path / "new")), 1)

    def test_forget_restores_the_senders_number(self):
        """A message taken back out (its handler failed) is not "late" when it comes again."""
        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        first = opened_message(b"1", message_id=mid(1), seq=1)
        inbox.record(first)
        inbox.forget(first)
        self.assertEqual(inbox.record(first), [])
        memory = MemoryInbox()
        memory.record(first)
        memory.forget(first)
        self.assertEqual(memory.record(first), [])

    def test_replay_handler_failure_keeps_it_unshown(self):
        path = self.mktemp()
        inbox = Inbox(path)
        self.addCleanup(inbox.close)
        inbox.record(opened_message(b"x", message_id=mid(1)))

        def boom(opened):
            raise OSError("disk full")

        client, transport = ready_client(BOB, on_message=boom, inbox=inbox)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(transport.connected)
        self.assertEqual([o.message_id for o in inbox.unshown()], [mid(1)])

    def test_client_with_inbox_file(self):
        """A message shown in one session is not handed over again in the next."""
        path = self.mktemp()
        frame = wire.encode(wire.Deliver(mid(1), sealed(message_id=mid(1))))
        counts = []
        for _ in range(2):
            inbox = Inbox(path)
            got = []
            client, transport = ready_client(BOB, on_message=got.append, inbox=inbox)
            client.dataReceived(key_frame(ALICE) + frame)
            self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])
            counts.append(len(got))
            inbox.close()
        self.assertEqual(counts, [1, 0])


class SendingOnlyClientTests(SynchronousTestCase):
    """A client without a message handler asks not to receive, and acks nothing."""

    def test_auth_asks_not_to_receive(self):
        client = ClientProtocol(ALICE, contacts=MemoryContacts())
        transport = StringTransportWithDisconnection()
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "relay", b"c" * 32)))
        [auth] = wire.FrameBuffer().feed(transport.value())
        self.assertIs(auth.receive, False)
        transport.clear()
        client.dataReceived(wire.encode(wire.Welcome(False, 1, wire.MAX_ENVELOPE)))
        sealed = envelope.seal(BOB, "alice", ALICE.public_key, b"x")
        client.dataReceived(wire.encode(wire.Deliver(envelope.parse(sealed).header.message_id,
                                                     sealed)))
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_receiving_client_asks_to_receive(self):
        client = ClientProtocol(ALICE, contacts=MemoryContacts(), on_message=list.append)
        transport = StringTransportWithDisconnection()
        transport.protocol = client
        client.makeConnection(transport)
        client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "relay", b"c" * 32)))
        [auth] = wire.FrameBuffer().feed(transport.value())
        self.assertIs(auth.receive, True)

    def test_receive_needs_a_handler(self):
        self.assertRaises(ValueError, ClientProtocol, ALICE, receive=True)


class QuarantineTests(SynchronousTestCase):
    """
    No single delivery can hold up a mailbox: one this client fails to keep
    MAX_DELIVERY_ATTEMPTS times is set aside in the inbox, reported, and
    acknowledged, and the messages behind it come.
    """

    def setUp(self):
        self.relay = MemoryRelay()
        self.relay.register(ALICE)
        self.relay.register(BOB)
        self.inbox = Inbox(self.mktemp())
        self.addCleanup(self.inbox.close)
        for n, text in ((1, b"poison"), (2, b"behind it")):
            data = sealed(text=text, message_id=mid(n), seq=n)
            self.relay._result(self.relay.store.enqueue("bob", "alice", mid(n), data, 0))

    def session(self, handler):
        shown, quarantined = [], []

        def on_message(opened):
            handler(opened)
            shown.append(opened.plaintext)

        client = self.relay.client(BOB, inbox=self.inbox, on_message=on_message,
                                   on_quarantined=quarantined.append)
        self.relay.flush()
        return client, shown, quarantined

    def test_quarantined_after_the_attempts(self):
        from mailrelay.client.protocol import MAX_DELIVERY_ATTEMPTS, LocalFailure

        def refuse_poison(opened):
            if opened.plaintext == b"poison":
                raise ValueError("cannot file this one")

        for attempt in range(1, MAX_DELIVERY_ATTEMPTS):
            client, shown, quarantined = self.session(refuse_poison)
            self.assertIsInstance(client.close_reason, LocalFailure)
            self.assertEqual((shown, quarantined), ([], []))
            self.assertEqual(self.relay.count("bob"), 2)
        client, shown, quarantined = self.session(refuse_poison)
        self.assertEqual(shown, [b"behind it"])
        [q] = quarantined
        self.assertEqual((q.message_id, q.sender, q.attempts),
                         (mid(1), "alice", MAX_DELIVERY_ATTEMPTS))
        self.assertIn("cannot file this one", q.describe())
        self.assertIsNone(client.close_reason)
        self.assertEqual(self.relay.count("bob"), 0)
        [kept] = self.inbox.quarantined()
        self.assertEqual((kept.message_id, kept.reason), (mid(1), "cannot file this one"))
        # Kept as it came: it still opens (the handler, not the envelope, failed).
        self.assertEqual(envelope.open_envelope(kept.envelope, BOB, ALICE.public_key).plaintext,
                         b"poison")
        self.assertFalse(self.inbox.seen("alice", mid(1)))
        self.flushLoggedErrors(ValueError)

    def test_leaving_it_for_later_does_not_count(self):
        from mailrelay.client.protocol import MAX_DELIVERY_ATTEMPTS, NotNow

        def not_now(opened):
            raise NotNow("later")

        for _ in range(MAX_DELIVERY_ATTEMPTS + 2):
            client, shown, quarantined = self.session(not_now)
            self.assertEqual(quarantined, [])
            client.close()
            self.relay.flush()
        self.assertEqual(self.relay.count("bob"), 2)
        self.assertEqual(self.inbox.quarantined(), [])

    def test_a_kept_message_clears_its_count(self):
        """Two failures, then it is kept: a later failure starts counting afresh."""
        failing = [True]

        def flaky(opened):
            if failing[0] and opened.plaintext == b"poison":
                raise ValueError("flaky")

        for _ in range(2):
            self.session(flaky)
        failing[0] = False
        client, shown, _ = self.session(flaky)
        self.assertEqual(shown, [b"poison", b"behind it"])
        row = self.inbox._db.execute("SELECT count(*) FROM attempts").fetchone()
        self.assertEqual(row[0], 0)
        self.flushLoggedErrors(ValueError)


# Found by mutation testing (make mutation-test): checks no test above guarded.

def connected_client(identity: keys.Identity = BOB, **settings):
    """A client over a string transport that has seen the relay's Hello (not Welcome)."""
    transport = StringTransportWithDisconnection()
    client = ClientProtocol(identity, **settings)
    transport.protocol = client
    client.makeConnection(transport)
    client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, RELAY, CHALLENGE)))
    return client, transport


class HelloAndWelcomeTests(SynchronousTestCase):
    def test_relay_id_that_cannot_be_checked_is_refused(self):
        """The pinned id cannot be read or written: the relay is not answered."""
        from mailrelay.client.protocol import UntrustedRelay
        def unreadable(relay):
            raise OSError("disk full")

        client, transport = connected_client(relay_check=unreadable)
        self.failureResultOf(client.ready, UntrustedRelay)
        [refusal] = read_frames(transport)
        self.assertEqual((type(refusal), refusal.code), (wire.Error, E.AUTH_FAILED))
        self.assertIn("cannot check its id: disk full", refusal.text)
        self.assertFalse(transport.connected)

    def test_no_ping_before_the_first_interval(self):
        clock = Clock()
        client, transport = connected_client(clock=clock, ping_interval=60.0)
        client.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE)))
        self.assertEqual([type(f) for f in read_frames(transport)], [wire.Auth])
        clock.advance(60)
        self.assertEqual([type(f) for f in read_frames(transport)], [wire.Ping])

    def test_a_sending_session_leaves_unshown_messages_for_a_receiving_one(self):
        """`mailrelay send` must not mark as shown what it never shows."""
        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        inbox.record(opened_message(b"not shown yet", message_id=mid(1), seq=1))
        client, transport = connected_client(inbox=inbox)
        self.assertFalse(client.receive)
        client.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE)))
        self.assertEqual([o.message_id for o in inbox.unshown()], [mid(1)])


class ContactKeyTests(SynchronousTestCase):
    def setUp(self):
        self.rotated = []
        self.rejected = []
        self.client, self.transport = ready_client(
            BOB, on_message=lambda opened: None, on_rejected=self.rejected.append,
            on_key_rotated=lambda name, outcome: self.rotated.append(name))

    def test_first_contact_is_not_a_rotation(self):
        self.client.dataReceived(key_frame(ALICE))
        self.client.dataReceived(wire.encode(wire.Deliver(mid(1), sealed(message_id=mid(1)))))
        self.assertEqual(read_frames(self.transport), [wire.Ack(mid(1))])
        self.assertEqual(self.rotated, [])

    def test_session_ending_during_the_lookup_rejects_nothing(self):
        """
        The relay ends the session while the sender's key is asked of it: the
        message is not reported rejected (it is not acknowledged, so it comes
        again); only an unknown sender is.
        """
        self.client.dataReceived(wire.encode(wire.Deliver(mid(1), sealed(message_id=mid(1)))))
        self.assertEqual(read_frames(self.transport), [wire.Lookup("alice")])
        self.client.dataReceived(wire.encode(wire.Error(E.SHUTTING_DOWN, b"", "bye")))
        self.assertEqual(self.rejected, [])
        self.assertEqual(read_frames(self.transport), [])
        self.flushLoggedErrors(RelayError)

    def test_rotation_of_a_verified_contact_is_logged_as_such(self):
        """Every client surface warns: twistd mailclient's is its log."""
        from twisted.logger import capturedLogs

        from tests.test_trust import ALICE_2, step

        for verified in (False, True):
            contacts = MemoryContacts()
            contacts.pin("alice", ALICE.public_der)
            if verified:
                contacts.verify("alice")
            client, transport = ready_client(BOB, contacts=contacts, on_message=lambda o: None)
            with capturedLogs() as events:
                client.dataReceived(wire.encode(wire.Key("alice", ALICE_2.public_der, b"",
                                                         (step(ALICE, ALICE_2),))))
                client.dataReceived(wire.encode(wire.Deliver(
                    mid(1), sealed(sender=ALICE_2, message_id=mid(1)))))
            self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])
            formats = [e.get("log_format", "") for e in events]
            self.assertTrue(any("rotated its key" in f for f in formats))
            self.assertEqual(any("no longer is" in f for f in formats), verified)


class QuarantineEdgeTests(SynchronousTestCase):
    """What does, and does not, count towards setting a delivery aside."""

    def session(self, handler, inbox=None, **settings):
        client, transport = ready_client(BOB, on_message=handler,
                                         inbox=inbox if inbox is not None else MemoryInbox(),
                                         **settings)
        client.dataReceived(key_frame(ALICE))
        return client, transport

    def setUp(self):
        self.envelope = sealed(message_id=mid(1), seq=1)  # the same bytes each time

    def deliver(self, client):
        client.dataReceived(wire.encode(wire.Deliver(mid(1), self.envelope)))

    def test_leaving_it_for_later_closes_the_session(self):
        from mailrelay.client.protocol import NotNow

        def not_now(opened):
            raise NotNow("later")

        client, transport = self.session(not_now)
        self.deliver(client)
        self.assertEqual(read_frames(transport), [])
        self.assertFalse(transport.connected)

    def test_an_inbox_that_cannot_count_closes_the_session(self):
        """The failure cannot be counted: not set aside, not acked; it comes again."""
        from mailrelay.client.protocol import LocalFailure

        class Uncounting(MemoryInbox):
            def failed_attempt(self, *args):
                raise OSError("inbox unwritable")

        def refuse(opened):
            raise ValueError("cannot file it")

        client, transport = self.session(refuse, inbox=Uncounting())
        self.deliver(client)
        self.assertEqual(read_frames(transport), [])
        self.assertIsInstance(client.close_reason, LocalFailure)
        self.flushLoggedErrors(OSError, ValueError)

    def fail_until_quarantined(self, **settings):
        from mailrelay.client.protocol import MAX_DELIVERY_ATTEMPTS

        def refuse(opened):
            raise ValueError("cannot file it")

        inbox = MemoryInbox()
        for _ in range(MAX_DELIVERY_ATTEMPTS):
            client, transport = self.session(refuse, inbox=inbox, **settings)
            self.deliver(client)
        self.flushLoggedErrors(ValueError)
        return client, transport, inbox

    def test_quarantined_without_anyone_to_tell(self):
        client, transport, inbox = self.fail_until_quarantined()
        self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])
        self.assertEqual(len(inbox.quarantined()), 1)

    def test_quarantined_though_telling_fails(self):
        def broken(quarantined):
            raise OSError("terminal gone")

        client, transport, inbox = self.fail_until_quarantined(on_quarantined=broken)
        self.assertEqual(read_frames(transport), [wire.Ack(mid(1))])
        self.assertTrue(transport.connected)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class GapReportingTests(SynchronousTestCase):
    def test_failing_gap_report_takes_the_message_back(self):
        """The gap cannot be reported: the record is undone, nothing acked; it comes again."""
        def broken(gap):
            raise OSError("terminal gone")

        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        client, transport = ready_client(BOB, on_message=lambda o: None, on_gap=broken,
                                         inbox=inbox)
        client.dataReceived(key_frame(ALICE))
        client.dataReceived(wire.encode(wire.Deliver(mid(5), sealed(message_id=mid(5), seq=5))))
        self.assertEqual(read_frames(transport), [])
        self.assertFalse(inbox.seen("alice", mid(5)))
        self.assertFalse(inbox.numbered("alice"))
        self.flushLoggedErrors(OSError)


class FailingAt:
    """
    A connection that fails the statement starting with C{prefix}, as a
    full disk would, partway through a transaction.
    """

    def __init__(self, db: sqlite3.Connection, prefix: str) -> None:
        self.db, self.prefix = db, prefix

    def execute(self, sql, *args):
        if sql.lstrip().startswith(self.prefix):
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)


class InboxBookkeepingTests(SynchronousTestCase):
    """What the inbox records, in a file and in memory alike."""

    def inboxes(self):
        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        return [inbox, MemoryInbox()]

    def test_records_cannot_be_altered(self):
        from mailrelay.client.inbox import QuarantinedEntry, Received

        for record in (Gap("alice", 1, 1), QuarantinedEntry(mid(1), "alice", b"", "why", 3, 0),
                       Received("alice", mid(1), 1, None, 0, b"")):
            self.assertRaises(dataclasses.FrozenInstanceError, setattr, record, "sender", "x")

    def test_gap_descriptions(self):
        self.assertEqual(Gap("alice", 5, 5).describe(),
                         "message 5 from alice has not arrived (missing or still on the way)")
        self.assertEqual(Gap("alice", 5, 6).describe(),
                         "messages 5-6 from alice have not arrived (missing or still on the way)")
        self.assertEqual(Gap("alice", 4, 4, late=True).describe(),
                         "message 4 from alice arrived out of order, after a later one")

    def record(self, inbox, seq, n=None, sender=ALICE):
        return inbox.record(opened_message(b"x", sender=sender, message_id=mid(n or seq),
                                           seq=seq))

    def test_sequence_numbers(self):
        for inbox in self.inboxes():
            self.assertEqual(self.record(inbox, 1), [])
            self.assertEqual(self.record(inbox, 0, n=100), [])  # sent outside any sequence
            self.assertEqual(self.record(inbox, 4), [Gap("alice", 2, 3)])
            self.assertEqual(self.record(inbox, 3), [Gap("alice", 3, 3, late=True)])
            # The late one did not lower alice's highest number: 5 follows 4.
            self.assertEqual(self.record(inbox, 5), [])
            self.assertEqual(self.record(inbox, 5, n=105), [Gap("alice", 5, 5, late=True)])
            self.assertEqual(self.record(inbox, 1, n=201, sender=CAROL), [], inbox)

    def test_numbered_once_a_number_came(self):
        for inbox in self.inboxes():
            self.record(inbox, 0, n=1)
            self.assertFalse(inbox.numbered("alice"))
            self.record(inbox, 1, n=2)
            self.assertTrue(inbox.numbered("alice"))

    def test_failed_attempts(self):
        for inbox in self.inboxes():
            self.assertEqual(inbox.failed_attempt(mid(1), b"e1", "why"), 1)
            self.assertEqual(inbox.failed_attempt(mid(1), b"e1", "why"), 2)
            self.assertEqual(inbox.failed_attempt(mid(1), b"other", "why"), 1)
            self.assertEqual(inbox.failed_attempt(mid(2), b"e2", "why"), 1)
            inbox.quarantine(mid(1), "alice", b"e1", "why", 2)
            [kept] = inbox.quarantined()
            self.assertEqual((kept.message_id, kept.envelope, kept.attempts), (mid(1), b"e1", 2))
            self.assertEqual(inbox.failed_attempt(mid(1), b"e1", "why"), 1)
            inbox.kept(mid(1))
            self.assertEqual(inbox.failed_attempt(mid(1), b"e1", "why"), 1)
            self.assertEqual(inbox.failed_attempt(mid(2), b"e2", "why"), 2)


class InboxFileTests(SynchronousTestCase):
    """HOME/inbox.sqlite: durable, one transaction per change, and what it lists."""

    def setUp(self):
        self.path = self.mktemp()
        self.inbox = Inbox(self.path)
        self.addCleanup(lambda: self.inbox.close())

    def pragma(self, name):
        return self.inbox._db.execute(f"PRAGMA {name}").fetchone()[0]

    def test_written_ahead_and_in_full_after_marking_shown(self):
        self.assertEqual((self.pragma("journal_mode"), self.pragma("synchronous")), ("wal", 2))
        opened = opened_message(b"x", message_id=mid(1), seq=1)
        self.inbox.record(opened)
        for shown in (True, False):
            self.inbox.mark_shown(opened, shown)
            self.assertEqual(self.pragma("synchronous"), 2)  # FULL again

    def test_closing_leaves_one_file(self):
        self.inbox.record(opened_message(b"x", message_id=mid(1), seq=1))
        self.inbox.close()
        self.assertFalse(os.path.exists(self.path + "-wal"))

    def test_another_database_is_refused(self):
        path = self.mktemp()
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE messages (something_else)")
        db.close()
        self.assertRaises(InboxError, Inbox, path)

    def failing(self, prefix):
        real = self.inbox._db
        self.inbox._db = FailingAt(real, prefix)
        return lambda: setattr(self.inbox, "_db", real)

    def test_each_change_is_one_transaction(self):
        opened = opened_message(b"x", message_id=mid(1), seq=1)
        restore = self.failing("INSERT INTO streams")
        self.assertRaises(sqlite3.OperationalError, self.inbox.record, opened)
        restore()
        self.assertFalse(self.inbox.seen("alice", mid(1)))
        self.inbox.record(opened)
        restore = self.failing("UPDATE streams")
        self.assertRaises(sqlite3.OperationalError, self.inbox.forget, opened)
        restore()
        self.assertTrue(self.inbox.seen("alice", mid(1)))
        restore = self.failing("DELETE FROM attempts")
        self.assertRaises(sqlite3.OperationalError, self.inbox.quarantine, mid(2), "alice",
                          b"e", "why", 3)
        restore()
        self.assertEqual(self.inbox.quarantined(), [])
        restore = self.failing("SELECT count")
        self.assertRaises(sqlite3.OperationalError, self.inbox.failed_attempt, mid(3), b"e",
                          "why")
        restore()
        self.assertEqual(self.inbox.failed_attempt(mid(3), b"e", "why"), 1)

    def test_far_dates_are_kept(self):
        self.inbox.record(opened_message(b"x", message_id=mid(1), timestamp=2**63 - 1))
        self.inbox.record(opened_message(b"y", message_id=mid(2), timestamp=1_700_000_000))
        self.assertEqual([m.sent_at for m in self.inbox.messages()], [2**63 - 1, 1_700_000_000])
        for n, accepted_at in enumerate((5, 2**63 - 1, 2**64 - 1)):
            self.inbox.record_notice(wire.Notice(mid(10 + n), wire.NOTICE_EXPIRED, "alice",
                                                 mid(n), accepted_at, "expired"))
        self.assertEqual([n.accepted_at for n in self.inbox.notices()],
                         [5, 2**63 - 1, 2**63 - 1])

    def test_forgotten_notice_comes_again(self):
        notice = wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(3), 0, "expired")
        self.inbox.record_notice(notice)
        self.inbox.forget_notice(notice)
        self.assertFalse(self.inbox.notice_seen(notice))

    def test_listing(self):
        for n, sender in enumerate((ALICE, CAROL, ALICE), 1):
            self.inbox.record(opened_message(b"m%d" % n, sender=sender, message_id=mid(n)))
        self.assertEqual([m.body for m in self.inbox.messages("alice")], [b"m1", b"m3"])
        self.assertEqual([m.body for m in self.inbox.messages(last=1)], [b"m3"])
        self.assertEqual(self.inbox.messages(last=0), [])
        self.assertEqual(len(self.inbox.messages()), 3)

    def seen_file(self, path, rows=(("alice", mid(7), 1_700_000_000),)):
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE seen (sender TEXT, message_id BLOB, seen_at INTEGER)")
        db.executemany("INSERT INTO seen VALUES (?, ?, ?)", rows)
        db.commit()
        db.close()

    def test_messages_taken_over_have_no_text(self):
        seen = self.mktemp()
        self.seen_file(seen)
        inbox = Inbox(self.mktemp(), legacy_seen=seen)
        self.addCleanup(inbox.close)
        [taken] = inbox.messages()
        self.assertEqual((taken.sender, taken.message_id, taken.body), ("alice", mid(7), None))

    def test_earlier_record_that_cannot_be_taken_over(self):
        junk = self.mktemp()
        with open(junk, "wb") as f:
            f.write(b"not a database" * 100)
        with self.assertRaises(InboxError) as caught:
            Inbox(self.mktemp(), legacy_seen=junk)
        self.assertIn("record of messages shown by an earlier", str(caught.exception))
        seen = self.mktemp()
        self.seen_file(seen)
        os.makedirs(os.path.join(seen + ".imported", "in the way"))  # cannot be renamed over
        self.assertRaises(InboxError, Inbox, self.mktemp(), legacy_seen=seen)

    def test_home_inbox(self):
        from mailrelay.client.inbox import home_inbox

        home = keys.Home(os.path.join(self.mktemp(), "nested", "home"))
        inbox = home_inbox(home)
        inbox.close()
        self.assertEqual(stat.S_IMODE(os.stat(home.path).st_mode), 0o700)
        self.seen_file(home.path / "seen.sqlite")
        inbox = home_inbox(home)  # the home exists now; its earlier record is taken over
        self.addCleanup(inbox.close)
        self.assertTrue(inbox.seen("alice", mid(7)))
        self.assertTrue((home.path / "inbox.sqlite").exists())


class MemoryInboxRecordTests(SynchronousTestCase):
    """The inbox of a client without files keeps the same record as the file one."""

    def test_header_numbers_and_senders(self):
        inbox = MemoryInbox()
        first = opened_message(b"x", message_id=mid(1), seq=1)
        self.assertEqual(inbox.record(first), [])
        self.assertEqual(inbox.seen_header("alice", mid(1)), first.header.encode())
        self.assertIsNone(inbox.seen_header("alice", mid(2)))
        self.assertFalse(inbox.numbered("carol"))  # alice's numbers are alice's
        self.assertEqual(inbox.record(opened_message(b"y", message_id=mid(3), seq=3)),
                         [Gap("alice", 2, 2)])
        self.assertEqual(inbox.record(opened_message(b"z", message_id=mid(4), seq=4)), [])

    def test_unflagged_records_count_as_the_current_keys(self):
        inbox = MemoryInbox()
        inbox.record(opened_message(b"x", message_id=mid(1), seq=1000))
        self.assertEqual(inbox.record(opened_message(b"y", message_id=mid(2), seq=5),
                                      retired=False),
                         [Gap("alice", 5, 5, late=True)])
