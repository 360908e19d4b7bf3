"""
The client's trust in its contacts' keys, attacked by a malicious relay.

The relay here is the adversary (docs/security.md): it answers LOOKUP with
whatever key and rotations it likes and delivers whatever envelopes it
likes.  Each test plays one of its moves, frame by frame, against a real
L{ClientProtocol} and a real contacts store, and checks what the client
shows, acknowledges and trusts afterwards.  The honest cases are here too,
so that a check that refused everything would fail them.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import ca, envelope, keys, wire
from mailrelay.client import contacts as contacts_module
from mailrelay.client.contacts import (
    RETIRED_KEY_WINDOW,
    Contacts,
    MemoryContacts,
    RolledBack,
    UntrustedKey,
)
from mailrelay.client.inbox import MemoryInbox
from mailrelay.client.protocol import ClientProtocol
from mailrelay.encoding import Writer
from tests.test_client import ALICE, BOB, ident, mid, read_frames, ready_client

E = wire.ErrorCode
ALICE_2 = ident("alice", key="alice-2")
ALICE_3 = ident("alice", key="alice-3")
FORGER = ident("alice", key="forger")
"""A key the relay made up and calls alice's."""

T0 = 1_790_000_000
"""Now, in these tests (late 2026)."""
DAY = 86400


def step(old: keys.Identity, new: keys.Identity, timestamp: int = T0 - DAY,
         old_signer: keys.Identity | None = None, new_signer: keys.Identity | None = None,
         old_certificate: bytes = b"") -> wire.Rotation:
    """A rotation of alice from C{old} to C{new}, signed by the given signers (default: both keys)."""
    statement = wire.rotation_statement(old.name, old.public_der, new.public_der, timestamp)
    return wire.Rotation(old.public_der, new.public_der, timestamp,
                         (old_signer or old).sign(statement), (new_signer or new).sign(statement),
                         old_certificate)


def sealed_by(signer: keys.Identity, text: bytes = b"hello bob", message_id: bytes = mid(1),
              timestamp: int = T0 - 2 * DAY, seq: int = 1) -> bytes:
    """An envelope for bob, signed by C{signer} (under alice's name)."""
    return envelope.seal(signer, "bob", BOB.public_key, text, message_id=message_id,
                         timestamp=timestamp, seq=seq)


class HostileRelay:
    """
    bob's client against a relay that says what the test wants: a real
    L{ClientProtocol} over a string transport, fed frames by hand.
    """

    def __init__(self, test: SynchronousTestCase, contacts=None, now: int = T0, ttl: int = 0,
                 inbox=None, **settings) -> None:
        self.clock = Clock()
        self.clock.advance(now)
        self.contacts = contacts if contacts is not None else MemoryContacts()
        self.received: list[envelope.Opened] = []
        self.rejected: list = []
        self.rotated: list = []
        self.inbox = inbox if inbox is not None else MemoryInbox()
        self.client, self.transport = ready_client(
            BOB, clock=self.clock, contacts=self.contacts, inbox=self.inbox,
            on_message=self.received.append, on_rejected=self.rejected.append,
            on_key_rotated=lambda name, outcome: self.rotated.append((name, outcome)),
            **settings)
        self.client.retired_key_window = min(ttl, RETIRED_KEY_WINDOW) if ttl \
            else RETIRED_KEY_WINDOW
        self.answer: wire.Key | None = None
        self.lookups = 0

    def key(self, key: keys.Identity, rotations=(), certificate: bytes = b"") -> None:
        """The relay's answer to LOOKUP(alice), this session, and to every one asked later."""
        self.answer = wire.Key("alice", key.public_der, certificate, tuple(rotations))
        self.client.dataReceived(wire.encode(self.answer))

    def deliver(self, data: bytes, message_id: bytes = mid(1)) -> list:
        """
        Deliver C{data}; return the frames the client wrote back, less the
        LOOKUPs of alice, which get the answer L{key} gave.
        """
        self.client.dataReceived(wire.encode(wire.Deliver(message_id, data)))
        frames = []
        for frame in read_frames(self.transport):
            if frame == wire.Lookup("alice") and self.answer is not None:
                self.lookups += 1
                self.client.dataReceived(wire.encode(self.answer))
                frames += read_frames(self.transport)
            else:
                frames.append(frame)
        return frames

    def texts(self) -> list[bytes]:
        return [m.plaintext for m in self.received]


def trusted(contacts, name: str = "alice") -> bytes:
    return keys.public_der(contacts.pinned(name))


class ForgeryThroughRotationTests(SynchronousTestCase):
    """
    The attack: bob trusts alice's real key; the relay delivers a message
    signed by a key it made up and serves a rotation from that key to
    alice's, signed by the made-up key.
    """

    def setUp(self):
        self.contacts = MemoryContacts()
        self.contacts.pin("alice", ALICE.public_der)

    def forged_chain(self):
        # The made-up key signs both sides: it cannot make alice's key sign.
        return [step(FORGER, ALICE, old_signer=FORGER, new_signer=FORGER)]

    def test_invented_chain_does_not_authenticate_a_forgery(self):
        relay = HostileRelay(self, self.contacts)
        relay.key(ALICE, self.forged_chain())
        frames = relay.deliver(sealed_by(FORGER, b"send money"))
        self.assertEqual(relay.received, [])
        [rejected] = relay.rejected
        self.assertEqual(rejected.sender, "alice")
        self.assertIn("'alice'", rejected.reason)
        self.assertIn("vouched", rejected.reason)
        self.assertEqual(frames, [wire.Ack(mid(1))])
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        self.assertFalse(relay.inbox.seen("alice", mid(1)))

    def test_a_chain_from_the_forged_key_to_the_real_one_signed_by_the_forger_only(self):
        """The rotation as the relay served it: only the old (made-up) key's signature valid."""
        relay = HostileRelay(self, self.contacts)
        statement = wire.rotation_statement("alice", FORGER.public_der, ALICE.public_der,
                                            T0 - DAY)
        relay.key(ALICE, [wire.Rotation(FORGER.public_der, ALICE.public_der, T0 - DAY,
                                        FORGER.sign(statement), b"")])
        relay.deliver(sealed_by(FORGER, b"send money"))
        self.assertEqual(relay.received, [])
        self.assertEqual(len(relay.rejected), 1)

    def test_forgery_refused_in_ca_mode(self):
        """With the CA's root, alice's real certificate, and the invented chain: refused."""
        authority = ca.create_authority("test CA", bits=2048)
        certificate = ca.certificate_der(ca.issue_identity(authority, ca.make_request(ALICE)))
        relay = HostileRelay(self, self.contacts, identity_roots=[authority.certificate])
        relay.key(ALICE, self.forged_chain(), certificate)
        relay.deliver(sealed_by(FORGER, b"send money"))
        self.assertEqual(relay.received, [])
        self.assertEqual(len(relay.rejected), 1)

    def test_forgery_under_a_genuine_id_does_not_hide_the_genuine_message(self):
        """
        Substitution: the forgery comes first under the id of alice's real
        message, then the real one; bob sees the real one only.
        """
        relay = HostileRelay(self, self.contacts)
        relay.key(ALICE, self.forged_chain())
        relay.deliver(sealed_by(FORGER, b"forged", message_id=mid(7)), mid(7))
        frames = relay.deliver(sealed_by(ALICE, b"genuine", message_id=mid(7)), mid(7))
        self.assertEqual(relay.texts(), [b"genuine"])
        self.assertEqual(frames, [wire.Ack(mid(7))])


class OlderKeyTests(SynchronousTestCase):
    """Messages signed by a key other than the contact's current one."""

    def test_key_vouched_for_backwards_by_the_trusted_key_opens(self):
        """bob first meets alice after her rotation; her earlier message still opens."""
        relay = HostileRelay(self)
        relay.key(ALICE_2, [step(ALICE, ALICE_2)])
        relay.deliver(sealed_by(ALICE, b"sent before rotating"))
        self.assertEqual(relay.texts(), [b"sent before rotating"])
        self.assertEqual(relay.rejected, [])
        self.assertEqual(trusted(relay.contacts), ALICE_2.public_der)

    def test_step_without_the_new_keys_signature_does_not_vouch(self):
        relay = HostileRelay(self)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, new_signer=FORGER)])
        relay.deliver(sealed_by(ALICE))
        self.assertEqual(relay.received, [])
        self.assertEqual(len(relay.rejected), 1)

    def test_step_without_the_old_keys_signature_does_not_vouch(self):
        relay = HostileRelay(self)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, old_signer=FORGER)])
        relay.deliver(sealed_by(ALICE))
        self.assertEqual(relay.received, [])
        self.assertEqual(len(relay.rejected), 1)

    def test_the_key_with_the_envelopes_fingerprint_is_used(self):
        """Two older keys in the chain: each message opens with its own."""
        relay = HostileRelay(self)
        relay.key(ALICE_3, [step(ALICE, ALICE_2, T0 - 3 * DAY), step(ALICE_2, ALICE_3, T0 - DAY)])
        relay.deliver(sealed_by(ALICE_2, b"by the second", mid(1), T0 - 2 * DAY), mid(1))
        relay.deliver(sealed_by(ALICE, b"by the first", mid(2), T0 - 4 * DAY, seq=2), mid(2))
        self.assertEqual(relay.rejected, [])
        self.assertEqual(relay.texts(), [b"by the second", b"by the first"])

    def test_a_broken_step_cuts_what_is_vouched_for(self):
        """Only the steps back to the first badly signed one count."""
        relay = HostileRelay(self)
        relay.key(ALICE_3, [step(ALICE, ALICE_2, T0 - 3 * DAY, new_signer=FORGER),
                            step(ALICE_2, ALICE_3, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, b"first", mid(1), T0 - 4 * DAY), mid(1))
        relay.deliver(sealed_by(ALICE_2, b"second", mid(2), T0 - 2 * DAY), mid(2))
        self.assertEqual(relay.texts(), [b"second"])
        self.assertEqual([r.message_id for r in relay.rejected], [mid(1)])

    def test_message_dated_after_the_rotation_is_refused(self):
        """A retired key signs nothing dated after it was replaced."""
        relay = HostileRelay(self)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, timestamp=T0 - DAY + 1))
        self.assertEqual(relay.received, [])
        [rejected] = relay.rejected
        self.assertIn("dated after", rejected.reason)

    def test_message_dated_at_the_rotation_opens(self):
        relay = HostileRelay(self)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, timestamp=T0 - DAY))
        self.assertEqual(relay.texts(), [b"hello bob"])

    def test_retired_key_signs_nothing_long_after_the_rotation(self):
        contacts = MemoryContacts()
        first = HostileRelay(self, contacts, now=T0)
        first.key(ALICE_2, [step(ALICE, ALICE_2, T0)])
        first.deliver(sealed_by(ALICE_2, message_id=mid(1)), mid(1))  # learned at T0
        self.assertEqual(len(first.received), 1)
        # Just within the window: still opens.
        within = HostileRelay(self, contacts, now=T0 + RETIRED_KEY_WINDOW)
        within.key(ALICE_2, [step(ALICE, ALICE_2, T0)])
        within.deliver(sealed_by(ALICE, message_id=mid(2), seq=2), mid(2))
        self.assertEqual(len(within.received), 1)
        # A second later: refused, though the chain still vouches for the key.
        late = HostileRelay(self, contacts, now=T0 + RETIRED_KEY_WINDOW + 1)
        late.key(ALICE_2, [step(ALICE, ALICE_2, T0)])
        late.deliver(sealed_by(ALICE, message_id=mid(3), seq=3), mid(3))
        self.assertEqual(late.received, [])
        [rejected] = late.rejected
        self.assertIn("no longer signs", rejected.reason)

    def test_the_relays_shorter_ttl_shortens_the_window(self):
        contacts = MemoryContacts()
        HostileRelay(self, contacts, now=T0).key(ALICE_2, [step(ALICE, ALICE_2)])
        contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)], now=T0)
        relay = HostileRelay(self, contacts, now=T0 + 2 * DAY, ttl=DAY)
        relay.key(ALICE_2, [step(ALICE, ALICE_2)])
        relay.deliver(sealed_by(ALICE))
        self.assertEqual(relay.received, [])
        self.assertEqual(len(relay.rejected), 1)

    def test_welcome_sets_the_window_from_the_relays_ttl(self):
        """A relay keeping messages a day: a day; one keeping them longer: the client's bound."""
        for ttl, window in [(0, RETIRED_KEY_WINDOW), (DAY, DAY),
                            (10 * RETIRED_KEY_WINDOW, RETIRED_KEY_WINDOW)]:
            client = ClientProtocol(BOB)
            client.makeConnection(StringTransport())
            client.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "relay",
                                                       bytes(32))))
            client.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE, ttl)))
            self.assertEqual(client.retired_key_window, window)

    def test_key_trusted_before_opens_what_it_signed_before_it_was_replaced(self):
        """bob pinned alice's first key, then followed her rotation: the old key is history."""
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, b"old", mid(1), T0 - 2 * DAY), mid(1))
        relay.deliver(sealed_by(ALICE, b"too new", mid(2), T0, seq=2), mid(2))
        self.assertEqual(relay.texts(), [b"old"])
        self.assertEqual([r.message_id for r in relay.rejected], [mid(2)])

    def test_key_replaced_by_hand_signs_nothing_more(self):
        """
        bob trusted a key for alice that the relay slipped in at first contact,
        then corrected it with `trust`: the relay cannot use that key now.
        """
        contacts = MemoryContacts()
        contacts.accept_key("alice", FORGER.public_der, now=T0 - 10 * DAY)
        contacts.trust("alice", ALICE.public_der, ALICE.fingerprint, now=T0 - DAY)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE)
        relay.deliver(sealed_by(FORGER, b"forged", mid(1), T0 - 2 * DAY), mid(1))
        self.assertEqual(relay.received, [])
        [rejected] = relay.rejected
        self.assertIn("replaced by hand", rejected.reason)

    def test_key_replaced_by_hand_but_vouched_for_by_a_rotation(self):
        """The hand-trusted key's own rotation vouches for the old one: that counts."""
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE.public_der, now=T0 - 10 * DAY)
        contacts.trust("alice", ALICE_2.public_der, ALICE_2.fingerprint,
                       [step(ALICE, ALICE_2, T0 - DAY)], now=T0 - DAY)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, b"before", mid(1), T0 - 2 * DAY), mid(1))
        self.assertEqual(relay.texts(), [b"before"])

    def test_older_key_needs_a_certificate_in_ca_mode(self):
        authority = ca.create_authority("test CA", bits=2048)

        def certify(identity):
            return ca.certificate_der(ca.issue_identity(authority, ca.make_request(identity)))

        roots = [authority.certificate]
        # With the old key's certificate in the chain: opens.
        relay = HostileRelay(self, identity_roots=roots)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, old_certificate=certify(ALICE))],
                  certify(ALICE_2))
        relay.deliver(sealed_by(ALICE))
        self.assertEqual(relay.texts(), [b"hello bob"])
        # Without it: refused, though both signatures are right.
        bare = HostileRelay(self, identity_roots=roots)
        bare.key(ALICE_2, [step(ALICE, ALICE_2)], certify(ALICE_2))
        bare.deliver(sealed_by(ALICE))
        self.assertEqual(bare.received, [])
        [rejected] = bare.rejected
        self.assertIn("certificate", rejected.reason)


class FollowingRotationsTests(SynchronousTestCase):
    """A new key is followed only along steps signed by both keys, from the trusted one."""

    def setUp(self):
        self.contacts = MemoryContacts()
        self.contacts.pin("alice", ALICE.public_der)

    def offer(self, key, rotations, certificate=b""):
        return self.contacts.accept_key("alice", key.public_der, rotations, certificate, now=T0)

    def test_signed_rotation_is_followed(self):
        outcome = self.offer(ALICE_2, [step(ALICE, ALICE_2)])
        self.assertEqual(outcome.rotated, 1)
        self.assertEqual(trusted(self.contacts), ALICE_2.public_der)
        [old, new] = self.contacts.history("alice")
        self.assertEqual((old.der, old.retired_at, old.rotated_at), (ALICE.public_der, T0, T0 - DAY))
        self.assertEqual((new.der, new.retired_at), (ALICE_2.public_der, None))

    def test_two_steps_are_followed(self):
        outcome = self.offer(ALICE_3, [step(ALICE, ALICE_2), step(ALICE_2, ALICE_3)])
        self.assertEqual(outcome.rotated, 2)
        self.assertEqual(trusted(self.contacts), ALICE_3.public_der)

    def refused(self, key, rotations, kind=keys.KeyConflict):
        self.assertRaises(kind, self.offer, key, rotations)
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        self.assertEqual(self.contacts.chain("alice"), ())

    def test_step_without_the_old_keys_signature(self):
        """The relay cannot hand alice's name over to a key of its own."""
        self.refused(FORGER, [step(ALICE, FORGER, old_signer=FORGER)])

    def test_step_without_the_new_keys_signature(self):
        self.refused(ALICE_2, [step(ALICE, ALICE_2, new_signer=FORGER)])

    def test_a_later_step_badly_signed(self):
        self.refused(ALICE_3, [step(ALICE, ALICE_2), step(ALICE_2, ALICE_3, old_signer=FORGER)])

    def test_no_step_from_the_trusted_key(self):
        self.refused(ALICE_2, [])
        self.refused(ALICE_3, [step(ALICE_2, ALICE_3)])  # truncated: the first step left out

    def test_reordered_chain(self):
        self.refused(ALICE_3, [step(ALICE_2, ALICE_3), step(ALICE, ALICE_2)], UntrustedKey)

    def test_chain_that_does_not_lead_to_the_key(self):
        self.refused(ALICE_3, [step(ALICE, ALICE_2)], UntrustedKey)

    def test_step_with_an_unusable_key(self):
        junk = wire.Rotation(ALICE.public_der, b"not a key", T0, b"x", b"y")
        self.assertRaises(keys.IdentityError, self.offer, ALICE_2, [junk])
        self.assertEqual(trusted(self.contacts), ALICE.public_der)

    def test_over_the_client(self):
        """The same through a session: refused, and the message with it."""
        relay = HostileRelay(self, self.contacts)
        relay.key(FORGER, [step(ALICE, FORGER, old_signer=FORGER)])
        relay.deliver(envelope.seal(FORGER, "bob", BOB.public_key, b"x", message_id=mid(1),
                                    seq=1))
        self.assertEqual(relay.received, [])
        [rejected] = relay.rejected
        self.assertIn(keys.format_fingerprint(ALICE.fingerprint), rejected.reason)
        self.assertEqual(relay.rotated, [])


class AcceptedChainTestCase(SynchronousTestCase):
    """alice pinned, then her rotation to ALICE_2 (at C{FIRST_AT}) accepted at T0."""

    FIRST_AT = T0 - 2 * DAY

    def setUp(self):
        self.contacts = MemoryContacts()
        self.contacts.pin("alice", ALICE.public_der)
        self.first = step(ALICE, ALICE_2, self.FIRST_AT)
        self.contacts.accept_key("alice", ALICE_2.public_der, [self.first], now=T0)

    def offer(self, key, rotations):
        """The relay's answer for alice, a day later."""
        return self.contacts.accept_key("alice", key.public_der, rotations, now=T0 + DAY)


class RollbackAndForkTests(AcceptedChainTestCase):
    """The longest chain accepted per contact: nothing older, nothing beside it."""

    def test_older_key_is_refused(self):
        with self.assertRaises(RolledBack) as caught:
            self.offer(ALICE, [])
        self.assertIn("rolling", str(caught.exception))
        self.assertEqual(trusted(self.contacts), ALICE_2.public_der)

    def test_shorter_chain_for_the_same_key_is_refused(self):
        self.assertRaises(RolledBack, self.offer, ALICE_2, [])

    def test_same_chain_is_fine(self):
        self.assertEqual(self.offer(ALICE_2, [self.first]).rotated, 0)

    def test_extension_is_followed(self):
        outcome = self.offer(ALICE_3, [self.first, step(ALICE_2, ALICE_3, T0)])
        self.assertEqual(outcome.rotated, 1)
        self.assertEqual(len(self.contacts.chain("alice")), 2)

    def test_fork_signed_by_a_stolen_old_key_is_refused(self):
        """Whoever stole alice's first key signs it over to a key of theirs."""
        with self.assertRaises(RolledBack) as caught:
            self.offer(ALICE_3, [step(ALICE, ALICE_3, T0 - DAY)])
        self.assertIn("fork", str(caught.exception))
        self.assertEqual(trusted(self.contacts), ALICE_2.public_der)

    def test_history_rewritten_before_the_last_step_is_refused(self):
        other = step(ALICE, ALICE_2, T0 - 3 * DAY)  # another signed step into the same key
        self.assertRaises(RolledBack, self.offer, ALICE_3, [other, step(ALICE_2, ALICE_3, T0)])

    def test_replayed_old_answer_over_a_session(self):
        relay = HostileRelay(self, self.contacts, now=T0 + DAY)
        relay.key(ALICE, [])
        relay.deliver(sealed_by(ALICE, timestamp=T0))
        self.assertEqual(relay.received, [])
        [rejected] = relay.rejected
        self.assertIn("rolling", rejected.reason)

    def test_full_chain_that_moved_on_is_an_extension(self):
        """More rotations since than one KEY carries: the chain starts at the trusted key."""
        people = [ALICE_2] + [ident("alice", key=f"alice-{i}") for i in range(10, 18)]
        chain = [step(a, b, T0 + i) for i, (a, b) in enumerate(zip(people, people[1:]))]
        self.assertEqual(len(chain), wire.MAX_ROTATIONS)
        self.assertEqual(self.offer(people[-1], chain).rotated, wire.MAX_ROTATIONS)


class VerifiedTests(SynchronousTestCase):
    def test_rotation_clears_verified_loudly(self):
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        contacts.verify("alice")
        self.assertTrue(contacts.is_verified("alice"))
        relay = HostileRelay(self, contacts)
        relay.key(ALICE_2, [step(ALICE, ALICE_2)])
        relay.deliver(sealed_by(ALICE_2))
        [(name, outcome)] = relay.rotated
        self.assertEqual(name, "alice")
        self.assertTrue(outcome.was_verified)
        self.assertIn("NOT VERIFIED", outcome.notice("alice"))
        self.assertFalse(contacts.is_verified("alice"))

    def test_rotation_of_an_unverified_contact_says_so_quietly(self):
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        outcome = contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)])
        self.assertFalse(outcome.was_verified)
        self.assertNotIn("NOT VERIFIED", outcome.notice("alice"))

    def test_trust_by_fingerprint_verifies(self):
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        self.assertFalse(contacts.is_verified("alice"))
        contacts.trust("alice", ALICE_2.public_der, ALICE_2.fingerprint)
        self.assertTrue(contacts.is_verified("alice"))

    def test_nothing_to_verify(self):
        self.assertRaises(keys.IdentityError, MemoryContacts().verify, "alice")


class DowngradeTests(SynchronousTestCase):
    """Once alice numbers her messages, an unnumbered one from her is refused."""

    def setUp(self):
        self.relay = HostileRelay(self)
        self.relay.key(ALICE)

    def test_unnumbered_accepted_before_any_numbered(self):
        self.relay.deliver(sealed_by(ALICE, b"old client", seq=0))
        self.assertEqual(self.relay.texts(), [b"old client"])

    def test_unnumbered_after_numbered_refused(self):
        self.relay.deliver(sealed_by(ALICE, b"one", mid(1), seq=1), mid(1))
        self.relay.deliver(sealed_by(ALICE, b"zero", mid(2), seq=0), mid(2))
        self.assertEqual(self.relay.texts(), [b"one"])
        [rejected] = self.relay.rejected
        self.assertIn("unnumbered", rejected.reason)
        self.assertFalse(self.relay.inbox.seen("alice", mid(2)))

    def test_version_1_after_numbered_refused(self):
        self.relay.deliver(sealed_by(ALICE, b"one", mid(1), seq=1), mid(1))
        self.relay.deliver(version_1(ALICE, b"v1", mid(2)), mid(2))
        self.assertEqual(self.relay.texts(), [b"one"])
        self.assertEqual(len(self.relay.rejected), 1)

    def test_version_1_accepted_from_an_unnumbered_contact(self):
        self.relay.deliver(version_1(ALICE, b"v1", mid(2)), mid(2))
        self.assertEqual(self.relay.texts(), [b"v1"])


def version_1(sender: keys.Identity, text: bytes, message_id: bytes) -> bytes:
    """A version 1 envelope (no sequence number), as docs/protocol.md lays it out."""
    header = (Writer().u8(1).u8(1).identity(sender.name).raw(sender.fingerprint)
              .identity("bob").raw(BOB.fingerprint).raw(message_id).u64(T0 - DAY).getvalue())
    content_key, nonce = os.urandom(32), os.urandom(12)
    wrapped = BOB.public_key.encrypt(content_key, envelope.OAEP)
    ciphertext = AESGCM(content_key).encrypt(nonce, text, header)
    signed = Writer().raw(header).blob16(wrapped).raw(nonce).blob32(ciphertext).getvalue()
    return Writer().raw(signed).blob16(sender.sign(signed)).getvalue()


class ContactsStoreTests(SynchronousTestCase):
    """The history survives: a file store, reopened."""

    def test_history_and_chain_survive_reopening(self):
        path = self.mktemp()
        contacts = Contacts(path)
        contacts.pin("alice", ALICE.public_der)
        contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)], now=T0)
        contacts.verify("alice")
        contacts.close()
        again = Contacts(path)
        self.assertEqual(trusted(again), ALICE_2.public_der)
        [kept] = again.chain("alice")
        self.assertEqual((kept.old_key, kept.new_key), (ALICE.public_der, ALICE_2.public_der))
        self.assertEqual([k.der for k in again.history("alice")],
                         [ALICE.public_der, ALICE_2.public_der])
        self.assertTrue(again.is_verified("alice"))
        # What the old key signed before the rotation still opens, from the file.
        self.assertEqual(keys.public_der(again.signing_key(
            "alice", ALICE.fingerprint, T0 - 2 * DAY, now=T0)), ALICE.public_der)

    def test_keys_pinned_by_earlier_versions_are_taken_over(self):
        home = keys.Home(self.mktemp())
        home.contacts_dir.mkdir(parents=True)
        (home.contacts_dir / "alice.pem").write_bytes(keys.public_pem(ALICE_2.public_key))
        (home.contacts_dir / "alice.pem.replaced").write_bytes(keys.public_pem(ALICE.public_key))
        self.assertEqual(trusted(home.contacts), ALICE_2.public_der)
        [old, new] = home.contacts.history("alice")
        self.assertEqual(old.der, ALICE.public_der)
        self.assertIsNotNone(old.retired_at)
        self.assertFalse(home.contacts_dir.exists())
        self.assertTrue((home.path / "contacts.imported" / "alice.pem").exists())

    def test_unreadable_file(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a database" * 100)
        with self.assertRaises(contacts_module.ContactsError) as caught:
            Contacts(path)
        self.assertIn("move it aside", str(caught.exception))


# Found by mutation testing (make mutation-test): each check below could be
# removed or shifted without any test above noticing.

ALICE_0 = ident("alice", key="alice-0")
ALICE_4 = ident("alice", key="alice-4")
SPLICE_1 = ident("alice", key="splice-1")
SPLICE_2 = ident("alice", key="splice-2")
"""Two keys the relay holds and calls alice's: it can sign a rotation between them."""


def said(contacts, name: str = "alice") -> list[tuple[bytes, bytes]]:
    """The accepted chain as (old key, new key) pairs, oldest first."""
    return [(s.old_key, s.new_key) for s in contacts.chain(name)]


def pair(a: keys.Identity, b: keys.Identity) -> tuple[bytes, bytes]:
    return a.public_der, b.public_der


class HostileChainTests(SynchronousTestCase):
    """The relay serves chains it spliced, broke or dated out of range."""

    def setUp(self):
        self.contacts = MemoryContacts()
        self.contacts.pin("alice", ALICE.public_der)

    def offer(self, key, rotations, now=T0):
        return self.contacts.accept_key("alice", key.public_der, rotations, now=now)

    def unchanged(self):
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        self.assertEqual(self.contacts.chain("alice"), ())
        self.assertEqual([k.der for k in self.contacts.history("alice")], [ALICE.public_der])

    def test_spliced_chain_is_refused(self):
        """
        A genuine step of alice's, then a rotation between two keys of the
        relay's own, each signed by both its keys: the steps do not join.
        """
        spliced = [step(ALICE, ALICE_2, T0 - 2 * DAY), step(SPLICE_1, SPLICE_2, T0 - DAY)]
        with self.assertRaises(UntrustedKey) as caught:
            self.offer(SPLICE_2, spliced)
        self.assertIn("do not form a chain", str(caught.exception))
        self.unchanged()

    def test_chain_through_an_unusable_key_is_refused(self):
        """A step into a key that is not one, and out of it: signed by nothing."""
        junk = b"not a key"
        into = wire.rotation_statement("alice", ALICE.public_der, junk, T0 - 2 * DAY)
        out = wire.rotation_statement("alice", junk, ALICE_3.public_der, T0 - DAY)
        chain = [wire.Rotation(ALICE.public_der, junk, T0 - 2 * DAY, ALICE.sign(into), b"x"),
                 wire.Rotation(junk, ALICE_3.public_der, T0 - DAY, b"x", ALICE_3.sign(out))]
        self.assertRaises(keys.KeyConflict, self.offer, ALICE_3, chain)
        self.unchanged()

    def test_rotation_timestamps_out_of_range_sign_nothing(self):
        """Out of the u64 range the statement cannot even be encoded: not signed, no error."""
        for timestamp in (-1, 2**64):
            self.assertFalse(contacts_module.signed_by_both(
                "alice", wire.Rotation(ALICE.public_der, ALICE_2.public_der, timestamp, b"", b"")))

    def test_rotation_dated_at_zero_is_followed(self):
        self.assertTrue(contacts_module.signed_by_both("alice", step(ALICE, ALICE_2, 0)))
        self.assertEqual(self.offer(ALICE_2, [step(ALICE, ALICE_2, 0)]).rotated, 1)

    def test_latest_storable_rotation_time_is_followed(self):
        self.assertEqual(self.offer(ALICE_2, [step(ALICE, ALICE_2, 2**63 - 1)]).rotated, 1)
        [old, new] = self.contacts.history("alice")
        self.assertEqual(old.rotated_at, 2**63 - 1)

    def test_rotation_dated_beyond_what_can_be_stored_is_refused(self):
        """
        Dated 2^63 or later (the relay refuses such a ROTATE): refused like any
        step that does not hold, not a failure of the contacts store.
        """
        late = step(ALICE, ALICE_2, 2**63)
        self.assertFalse(contacts_module.signed_by_both("alice", late))
        self.assertRaises(keys.KeyConflict, self.offer, ALICE_2, [late])
        self.unchanged()
        # On first contact the key is trusted, and the step is not kept.
        fresh = MemoryContacts()
        self.assertTrue(fresh.accept_key("alice", ALICE_2.public_der, [late], now=T0).pinned)
        self.assertEqual(fresh.chain("alice"), ())


class RetiredKeyWindowTests(SynchronousTestCase):
    """How long, and from when, a retired key still signs (docs/security.md)."""

    def setUp(self):
        self.contacts = MemoryContacts()
        self.contacts.accept_key("alice", ALICE.public_der, now=T0 - 50 * DAY)

    def follow(self, rotated_at, learned_at):
        self.contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2, rotated_at)],
                                 now=learned_at)

    def signs(self, timestamp, now, **kwargs):
        return keys.public_der(self.contacts.signing_key("alice", ALICE.fingerprint, timestamp,
                                                         now=now, **kwargs))

    def test_thirty_days_from_the_rotation(self):
        self.follow(T0 - DAY, T0)
        self.assertEqual(self.signs(T0 - 2 * DAY, T0 - DAY + 30 * 86400), ALICE.public_der)
        self.assertRaises(contacts_module.UntrustedSigner,
                          self.signs, T0 - 2 * DAY, T0 - DAY + 30 * 86400 + 1)

    def test_a_rotation_shown_late_does_not_restart_the_window(self):
        """
        A relay that shows bob a rotation 40 days after it (with a thief of the
        old key) cannot make the old key sign again: nothing genuine it signed
        can still be waiting.
        """
        self.follow(T0 - 40 * DAY, T0)
        self.assertRaises(contacts_module.UntrustedSigner, self.signs, T0 - 41 * DAY, T0 + DAY)

    def test_a_rotation_dated_ahead_counts_from_learning_of_it(self):
        """A rotation dated in the future: nothing dated after bob learned of it, 30 days on."""
        self.follow(2**63 - 1, T0)
        self.assertEqual(self.signs(T0 - DAY, T0 + DAY), ALICE.public_der)
        self.assertRaises(contacts_module.UntrustedSigner, self.signs, T0 + 1, T0 + DAY)
        self.assertRaises(contacts_module.UntrustedSigner,
                          self.signs, T0 - DAY, T0 + 30 * 86400 + 1)

    def test_now_defaults_to_the_clock(self):
        learned = int(time.time())
        self.follow(learned - DAY, learned)
        key = self.contacts.signing_key("alice", ALICE.fingerprint, learned - 2 * DAY)
        self.assertEqual(keys.public_der(key), ALICE.public_der)

    def test_current_key_signs_whenever(self):
        self.follow(T0 - DAY, T0)
        key = self.contacts.signing_key("alice", ALICE_2.fingerprint, T0 + 100 * DAY,
                                        now=T0 + 100 * DAY)
        self.assertEqual(keys.public_der(key), ALICE_2.public_der)

    def test_certificate_of_a_key_trusted_before_still_counts_in_ca_mode(self):
        """
        CA mode: bob met alice with her certificate; she rotated without
        putting it in the step.  What her first key signed before still
        opens: bob kept the certificate with the key.
        """
        authority = ca.create_authority("test CA", bits=2048)

        def certify(identity):
            return ca.certificate_der(ca.issue_identity(authority, ca.make_request(identity)))

        roots = [authority.certificate]
        contacts = MemoryContacts()
        first = HostileRelay(self, contacts, identity_roots=roots)
        first.key(ALICE, [], certify(ALICE))
        first.deliver(sealed_by(ALICE, b"hello", mid(1), seq=1), mid(1))
        self.assertEqual(first.texts(), [b"hello"])
        later = HostileRelay(self, contacts, identity_roots=roots)
        later.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)], certify(ALICE_2))
        later.deliver(sealed_by(ALICE, b"before", mid(2), T0 - 2 * DAY, seq=2), mid(2))
        self.assertEqual(later.texts(), [b"before"])
        self.assertEqual(later.rejected, [])


class ChainHistoryTests(SynchronousTestCase):
    """What is kept of the chains followed, and which answers extend them."""

    def setUp(self):
        self.contacts = MemoryContacts()

    def offer(self, key, rotations=(), now=T0):
        return self.contacts.accept_key("alice", key.public_der, rotations, now=now)

    def test_outcomes(self):
        first = self.offer(ALICE)
        self.assertEqual((first.pinned, first.rotated, first.was_verified), (True, 0, False))
        again = self.offer(ALICE)
        self.assertEqual((again.pinned, again.rotated, again.was_verified), (False, 0, False))
        followed = self.offer(ALICE_2, [step(ALICE, ALICE_2)])
        self.assertEqual((followed.pinned, followed.rotated), (False, 1))

    def test_outcome_and_history_cannot_be_altered(self):
        """The client trusts outcome.key after handing the outcome to a callback."""
        outcome = self.offer(ALICE)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, outcome, "key",
                          FORGER.public_key)
        [known] = self.contacts.history("alice")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, known, "der", b"")

    def test_every_key_on_the_way_is_kept_retired_at_its_rotation(self):
        self.offer(ALICE)
        chain = [step(ALICE, ALICE_2, T0 - 3 * DAY), step(ALICE_2, ALICE_3, T0 - 2 * DAY),
                 step(ALICE_3, ALICE_4, T0 - DAY)]
        self.assertEqual(self.offer(ALICE_4, chain).rotated, 3)
        history = self.contacts.history("alice")
        self.assertEqual([(k.der, k.rotated_at) for k in history],
                         [(ALICE.public_der, T0 - 3 * DAY), (ALICE_2.public_der, T0 - 2 * DAY),
                          (ALICE_3.public_der, T0 - DAY), (ALICE_4.public_der, None)])
        self.assertEqual([k.how for k in history[1:]], [contacts_module.ROTATION] * 3)
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2), pair(ALICE_2, ALICE_3),
                                               pair(ALICE_3, ALICE_4)])

    def test_first_contact_keeps_the_chain_in_order(self):
        chain = [step(ALICE, ALICE_2, T0 - 2 * DAY), step(ALICE_2, ALICE_3, T0 - DAY)]
        self.offer(ALICE_3, chain)
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2), pair(ALICE_2, ALICE_3)])
        self.offer(ALICE_4, chain + [step(ALICE_3, ALICE_4, T0)])
        self.assertEqual(said(self.contacts)[-1], pair(ALICE_3, ALICE_4))

    def test_rotating_back_to_an_earlier_key_makes_it_current(self):
        self.offer(ALICE)
        there = step(ALICE, ALICE_2, T0 - 2 * DAY)
        self.offer(ALICE_2, [there])
        self.offer(ALICE, [there, step(ALICE_2, ALICE, T0 - DAY)])
        self.assertEqual(trusted(self.contacts), ALICE.public_der)

    def test_key_first_met_without_its_history_gets_it_later(self):
        """Pinned on first use with no rotations; a later answer carries the step into it."""
        self.offer(ALICE_2)
        self.offer(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        key = self.contacts.signing_key("alice", ALICE.fingerprint, T0 - 2 * DAY, now=T0)
        self.assertEqual(keys.public_der(key), ALICE.public_der)

    def test_following_keeps_what_the_new_key_vouches_for(self):
        """Trusted on first use without history: the step before it comes with the rotation."""
        self.offer(ALICE)
        self.offer(ALICE_2, [step(ALICE_0, ALICE, T0 - 3 * DAY), step(ALICE, ALICE_2, T0 - DAY)])
        key = self.contacts.signing_key("alice", ALICE_0.fingerprint, T0 - 4 * DAY, now=T0)
        self.assertEqual(keys.public_der(key), ALICE_0.public_der)

    def test_older_history_served_later_adds_nothing(self):
        """Once a chain is accepted, the relay cannot graft earlier keys onto it."""
        self.offer(ALICE)
        first = step(ALICE, ALICE_2, T0 - 2 * DAY)
        self.offer(ALICE_2, [first])
        older = step(ALICE_0, ALICE, T0 - 5 * DAY)
        self.assertEqual(self.offer(ALICE_2, [older, first]).rotated, 0)
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2)])
        self.offer(ALICE_3, [older, first, step(ALICE_2, ALICE_3, T0 - DAY)])
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2), pair(ALICE_2, ALICE_3)])
        self.assertRaises(contacts_module.UntrustedSigner, self.contacts.signing_key,
                          "alice", ALICE_0.fingerprint, T0 - 6 * DAY, now=T0)

    def test_the_same_two_steps_again(self):
        self.offer(ALICE)
        chain = [step(ALICE, ALICE_2, T0 - 2 * DAY), step(ALICE_2, ALICE_3, T0 - DAY)]
        self.offer(ALICE_3, chain)
        self.assertEqual(self.offer(ALICE_3, chain).rotated, 0)

    def test_answer_leaving_out_steps_accepted_before_extends(self):
        """The relay sends only the latest rotations: the overlap is what must match."""
        self.offer(ALICE)
        second = step(ALICE_2, ALICE_3, T0 - DAY)
        self.offer(ALICE_3, [step(ALICE, ALICE_2, T0 - 2 * DAY), second])
        self.assertEqual(self.offer(ALICE_4, [second, step(ALICE_3, ALICE_4, T0)]).rotated, 1)

    def test_history_rewritten_two_steps_back_is_refused(self):
        self.offer(ALICE)
        second = step(ALICE_2, ALICE_3, T0 - DAY)
        self.offer(ALICE_3, [step(ALICE, ALICE_2, T0 - 2 * DAY), second])
        rewritten = step(ALICE, ALICE_2, T0 - 3 * DAY)  # also signed by both, another date
        self.assertRaises(RolledBack, self.offer, ALICE_4,
                          [rewritten, second, step(ALICE_3, ALICE_4, T0)])
        self.assertEqual(trusted(self.contacts), ALICE_3.public_der)

    def test_key_replaced_by_hand_offered_again_is_a_rollback(self):
        self.offer(ALICE)
        self.contacts.trust("alice", ALICE_2.public_der, ALICE_2.fingerprint, now=T0)
        with self.assertRaises(RolledBack) as caught:
            self.offer(ALICE, now=T0 + DAY)
        self.assertIn("replaced on", str(caught.exception))


class TrustByFingerprintTests(SynchronousTestCase):
    """`mailrelay trust`: a key the person checked through another channel."""

    def setUp(self):
        self.contacts = MemoryContacts()

    def test_wrong_fingerprint_changes_nothing(self):
        self.contacts.pin("alice", ALICE.public_der)
        with self.assertRaises(keys.IdentityError) as caught:
            self.contacts.trust("alice", FORGER.public_der, ALICE.fingerprint)
        self.assertIn("nothing was changed", str(caught.exception))
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        self.assertFalse(self.contacts.is_verified("alice"))

    def test_a_contact_not_met_yet(self):
        self.assertIsNone(self.contacts.trust("alice", ALICE.public_der, ALICE.fingerprint,
                                              now=T0))
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        self.assertTrue(self.contacts.is_verified("alice"))
        [known] = self.contacts.history("alice")
        self.assertEqual((known.how, known.trusted_at), (contacts_module.FINGERPRINT, T0))

    def test_replacing_gives_the_key_replaced(self):
        self.contacts.pin("alice", FORGER.public_der)
        replaced = self.contacts.trust("alice", ALICE.public_der, ALICE.fingerprint)
        self.assertEqual(keys.public_der(replaced), FORGER.public_der)

    def test_rotations_leading_to_the_key_are_kept(self):
        chain = [step(ALICE, ALICE_2, T0 - 2 * DAY), step(ALICE_2, ALICE_3, T0 - DAY)]
        self.contacts.trust("alice", ALICE_3.public_der, ALICE_3.fingerprint, chain, now=T0)
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2), pair(ALICE_2, ALICE_3)])
        key = self.contacts.signing_key("alice", ALICE.fingerprint, T0 - 3 * DAY, now=T0)
        self.assertEqual(keys.public_der(key), ALICE.public_der)

    def test_rotations_leading_elsewhere_are_not(self):
        self.contacts.trust("alice", ALICE_3.public_der, ALICE_3.fingerprint,
                            [step(ALICE, ALICE_2)], now=T0)
        self.assertEqual(self.contacts.chain("alice"), ())

    def test_trusting_the_key_trusted_now_keeps_its_history(self):
        """Verifying by fingerprint does not forget the chain the key vouched for."""
        self.contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)], now=T0)
        self.assertIsNotNone(self.contacts.trust("alice", ALICE_2.public_der, ALICE_2.fingerprint,
                                                 now=T0))
        self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2)])
        key = self.contacts.signing_key("alice", ALICE.fingerprint, T0 - 2 * DAY, now=T0)
        self.assertEqual(keys.public_der(key), ALICE.public_der)

    def test_replacing_by_hand_drops_the_chain_of_the_key_replaced(self):
        """The chain ended at the key the person rejected: none of it vouches any more."""
        self.contacts.accept_key("alice", FORGER.public_der, [step(ALICE_0, FORGER)], now=T0)
        self.contacts.trust("alice", ALICE.public_der, ALICE.fingerprint, now=T0)
        self.assertEqual(self.contacts.chain("alice"), ())
        self.assertEqual(self.contacts.accept_key("alice", ALICE.public_der, now=T0).rotated, 0)
        self.assertRaises(contacts_module.UntrustedSigner, self.contacts.signing_key,
                          "alice", ALICE_0.fingerprint, T0 - 2 * DAY, now=T0)

    def test_trusting_back_a_retired_key(self):
        self.contacts.accept_key("alice", ALICE.public_der, now=T0 - 2 * DAY)
        self.contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)],
                                 now=T0 - DAY)
        self.contacts.trust("alice", ALICE.public_der, ALICE.fingerprint, now=T0)
        self.assertEqual(trusted(self.contacts), ALICE.public_der)
        [first, second] = self.contacts.history("alice")
        self.assertEqual((first.der, first.how, first.trusted_at, first.retired_at),
                         (ALICE.public_der, contacts_module.FINGERPRINT, T0, None))
        self.assertEqual(second.retired_at, T0)


class FailureLeavesTrustAsItWasTests(SynchronousTestCase):
    """Each change of trust is one transaction: a failure halfway changes nothing."""

    def broken(self, *args):
        raise sqlite3.OperationalError("disk I/O error")

    def test_following_a_rotation(self):
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        self.patch(contacts, "_unverify", self.broken)
        self.assertRaises(sqlite3.OperationalError, contacts.accept_key, "alice",
                          ALICE_2.public_der, [step(ALICE, ALICE_2)], now=T0)
        self.assertEqual(trusted(contacts), ALICE.public_der)
        self.assertEqual(contacts.chain("alice"), ())

    def test_trusting_by_fingerprint(self):
        contacts = MemoryContacts()
        contacts.pin("alice", FORGER.public_der)
        self.patch(contacts, "_set_verified", self.broken)
        self.assertRaises(sqlite3.OperationalError, contacts.trust, "alice", ALICE.public_der,
                          ALICE.fingerprint)
        self.assertEqual(trusted(contacts), FORGER.public_der)

    def test_taking_over_the_keys_of_earlier_versions(self):
        home = keys.Home(self.mktemp())
        home.contacts_dir.mkdir(parents=True)
        (home.contacts_dir / "alice.pem").write_bytes(keys.public_pem(ALICE.public_key))
        (home.contacts_dir / "carol.pem").write_bytes(keys.public_pem(ALICE_2.public_key))
        added = []
        original = Contacts._add_key

        def add_key(contacts, name, *args):
            if added:
                self.broken()
            added.append(name)
            original(contacts, name, *args)

        self.patch(Contacts, "_add_key", add_key)
        self.assertRaises(sqlite3.OperationalError, lambda: home.contacts)
        self.patch(Contacts, "_add_key", original)
        self.assertIsNone(Contacts(home.path / contacts_module.CONTACTS_FILE).pinned("alice"))
        self.assertTrue((home.contacts_dir / "alice.pem").exists())


class ContactsFileTests(SynchronousTestCase):
    """HOME/contacts.sqlite: private, versioned, durable; and the folder it replaced."""

    def test_file_is_private_and_written_ahead(self):
        path = self.mktemp()
        contacts = Contacts(path)
        contacts.pin("alice", ALICE.public_der)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(contacts._db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        contacts.close()
        self.assertFalse(os.path.exists(path + "-wal"))  # all of it in the one file

    def test_file_says_its_schema(self):
        path = self.mktemp()
        Contacts(path).close()
        db = sqlite3.connect(path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 1)
        db.close()
        Contacts(path).close()

    def test_file_of_a_newer_version_is_refused(self):
        path = self.mktemp()
        Contacts(path).close()
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version=2")
        db.close()
        with self.assertRaises(contacts_module.ContactsError) as caught:
            Contacts(path)
        self.assertIn("newer mailrelay", str(caught.exception))

    def test_far_dates_are_shown_as_numbers(self):
        self.assertEqual(contacts_module._day(2**64), str(2**64))  # OverflowError
        self.assertEqual(contacts_module._day(10**17), str(10**17))  # OSError
        self.assertEqual(contacts_module._day(T0), "2026-09-21")

    def legacy(self, **pems):
        home = keys.Home(self.mktemp())
        home.contacts_dir.mkdir(parents=True)
        for name, content in pems.items():
            (home.contacts_dir / name.replace("_", ".")).write_bytes(content)
        return home

    def test_earlier_key_without_a_replaced_one(self):
        home = self.legacy(alice_pem=keys.public_pem(ALICE.public_key))
        [known] = home.contacts.history("alice")
        self.assertEqual((known.der, known.how), (ALICE.public_der, contacts_module.IMPORTED))

    def test_unreadable_earlier_key_is_refused(self):
        for content in (b"junk", None):
            home = self.legacy(alice_pem=b"" if content is None else content)
            if content is None:  # a folder where the file should be: cannot be read
                (home.contacts_dir / "alice.pem").unlink()
                (home.contacts_dir / "alice.pem").mkdir()
            with self.assertRaises(contacts_module.ContactsError) as caught:
                home.contacts
            self.assertIn("fix or remove", str(caught.exception))

    def test_earlier_keys_do_not_override_the_contacts_file(self):
        home = keys.Home(self.mktemp())
        home.contacts.pin("alice", ALICE_2.public_der)
        home.contacts.close()
        home.contacts_dir.mkdir()
        (home.contacts_dir / "alice.pem").write_bytes(keys.public_pem(ALICE.public_key))
        (home.contacts_dir / "alice.pem.replaced").write_bytes(keys.public_pem(ALICE_0.public_key))
        (home.contacts_dir / "carol.pem").write_bytes(keys.public_pem(ALICE_3.public_key))
        again = keys.Home(home.path)
        self.assertEqual(trusted(again.contacts), ALICE_2.public_der)
        self.assertEqual([k.der for k in again.contacts.history("alice")], [ALICE_2.public_der])
        self.assertEqual(trusted(again.contacts, "carol"), ALICE_3.public_der)


# What a second review found, played as the relay (and, where it says so, a
# thief of alice's retired key working with it).

FORGER_2 = ident("alice", key="forger-2")
"""Another key the relay made up."""
ALICE_X = ident("alice", key="alice-x")
YEAR = 365 * DAY


class HandCorrectionTests(SynchronousTestCase):
    """
    The relay slipped in FORGER at first contact and "rotated" it to FORGER_2
    (both its own); bob then corrects alice's key by hand (`trust`).
    """

    def corrected(self, rotated_at):
        contacts = MemoryContacts()
        contacts.accept_key("alice", FORGER.public_der, now=T0 - 10 * DAY)
        contacts.accept_key("alice", FORGER_2.public_der, [step(FORGER, FORGER_2, rotated_at)],
                            now=T0 - 5 * DAY)
        contacts.trust("alice", ALICE.public_der, ALICE.fingerprint, now=T0 - DAY)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE)
        return relay

    def test_keys_before_the_correction_sign_nothing(self):
        relay = self.corrected(T0 - 5 * DAY)
        relay.deliver(sealed_by(FORGER, b"forged", mid(1), T0 - 6 * DAY))
        self.assertEqual(relay.texts(), [])
        self.assertIn("replaced by hand", relay.rejected[0].reason)

    def test_a_rotation_dated_far_ahead_does_not_date_forgeries_today(self):
        relay = self.corrected(2**63 - 1)
        relay.deliver(sealed_by(FORGER, b"forged, dated today", mid(1), T0))
        self.assertEqual(relay.texts(), [])


class RunningSessionTests(SynchronousTestCase):
    """A session sees what other processes changed in the same contacts file."""

    def test_a_correction_by_hand_applies_at_once(self):
        path = self.mktemp()
        relay = HostileRelay(self, Contacts(path))  # a running twistd mailclient
        relay.key(FORGER)
        relay.deliver(sealed_by(FORGER, b"before", mid(1), T0), mid(1))
        other = Contacts(path)  # `mailrelay trust alice --fingerprint ...`
        other.trust("alice", ALICE.public_der, ALICE.fingerprint, now=T0)
        other.close()
        relay.deliver(sealed_by(FORGER, b"after the correction", mid(2), T0, seq=2), mid(2))
        self.assertEqual(relay.texts(), [b"before"])

    def test_a_rotation_followed_elsewhere_applies_at_once(self):
        path = self.mktemp()
        relay = HostileRelay(self, Contacts(path))
        relay.key(ALICE)
        relay.deliver(sealed_by(ALICE, b"genuine", mid(1), T0 - 3 * DAY), mid(1))
        other = Contacts(path)  # `mailrelay send alice` follows ALICE -> ALICE_2
        other.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2, T0 - 2 * DAY)],
                         now=T0 - DAY)
        other.close()
        relay.deliver(sealed_by(ALICE, b"dated after the rotation", mid(2), T0, seq=2), mid(2))
        self.assertEqual(relay.texts(), [b"genuine"])


class RotationDuringASessionTests(SynchronousTestCase):
    def test_a_contact_rotating_while_the_session_runs_is_asked_about_again(self):
        """
        alice rotates while bob's session runs (a twistd mailclient, a chat):
        her first message signed by the new key makes the session ask the
        relay again, and it is shown once the answer's rotation checks out,
        not dropped as signed by an unknown key.  A message signed by her
        retired key, a key the client knows, asks nothing.
        """
        relay = HostileRelay(self)
        relay.key(ALICE)
        relay.deliver(sealed_by(ALICE, b"before", mid(1), T0 - 3 * DAY), mid(1))
        relay.answer = wire.Key("alice", ALICE_2.public_der, b"",
                                (step(ALICE, ALICE_2, T0 - DAY),))
        frames = relay.deliver(sealed_by(ALICE_2, b"after", mid(2), T0, seq=2), mid(2))
        self.assertEqual(frames, [wire.Ack(mid(2))])
        self.assertEqual(relay.lookups, 1)
        self.assertEqual(relay.rejected, [])
        self.assertEqual(trusted(relay.contacts), ALICE_2.public_der)
        frames = relay.deliver(sealed_by(ALICE, b"late", mid(3), T0 - 2 * DAY, seq=3), mid(3))
        self.assertEqual(frames, [wire.Ack(mid(3))])
        self.assertEqual(relay.lookups, 1)
        self.assertEqual(relay.texts(), [b"before", b"after", b"late"])

    def test_a_forgery_asked_about_again_is_still_refused(self):
        """The second answer is checked like the first: the same forged chain, refused."""
        relay = HostileRelay(self)
        relay.contacts.pin("alice", ALICE.public_der)
        relay.key(ALICE, [step(FORGER, ALICE, old_signer=FORGER, new_signer=FORGER)])
        frames = relay.deliver(sealed_by(FORGER, b"send money"))
        self.assertEqual(relay.lookups, 1)
        self.assertEqual((frames, relay.received), ([wire.Ack(mid(1))], []))
        [rejected] = relay.rejected
        self.assertIn("it may be forged by the relay", rejected.reason)


class StolenRetiredKeyTests(SynchronousTestCase):
    """alice rotated; a thief holds her retired key and works with the relay."""

    def setUp(self):
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE.public_der, now=T0 - 10 * DAY)
        self.relay = HostileRelay(self, contacts)
        self.relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])

    def test_a_forgery_under_a_genuine_id_does_not_make_the_genuine_one_vanish(self):
        """
        Within the old key's window the forgery opens; but the genuine
        message under the same id is set aside, reported and kept, not
        acknowledged as a repeat.
        """
        quarantined = []
        self.relay.client.on_quarantined = quarantined.append
        self.relay.deliver(sealed_by(ALICE, b"forged: meet at 9", mid(7), T0 - 2 * DAY), mid(7))
        frames = self.relay.deliver(sealed_by(ALICE_2, b"genuine: meet at 5", mid(7), T0), mid(7))
        self.assertEqual(frames, [wire.Ack(mid(7))])
        [q] = quarantined
        self.assertIn("another message under this id", q.reason)
        [kept] = self.relay.inbox.quarantined()
        self.assertEqual(envelope.open_envelope(kept.envelope, BOB, ALICE_2.public_key).plaintext,
                         b"genuine: meet at 5")

    def test_a_true_repeat_is_still_only_acknowledged(self):
        data = sealed_by(ALICE_2, b"once", mid(7), T0)
        self.relay.deliver(data, mid(7))
        self.assertEqual(self.relay.deliver(data, mid(7)), [wire.Ack(mid(7))])
        self.assertEqual(self.relay.texts(), [b"once"])
        self.assertEqual(self.relay.inbox.quarantined(), [])

    def test_one_absurd_number_does_not_turn_off_gap_detection(self):
        gaps = []
        self.relay.client.on_gap = gaps.append
        self.relay.deliver(sealed_by(ALICE, b"x", mid(1), T0 - 2 * DAY, seq=2**63 - 1), mid(1))
        self.relay.deliver(sealed_by(ALICE_2, b"one", mid(2), T0, seq=1), mid(2))
        self.relay.deliver(sealed_by(ALICE_2, b"three", mid(4), T0, seq=3), mid(4))
        self.assertIn((2, 2), [(g.first, g.last) for g in gaps if not g.late])
        self.assertNotIn((1, 1), [(g.first, g.last) for g in gaps if g.late])

    def test_numbering_goes_on_across_the_rotation(self):
        """Old-key messages 1 and 2, then new-key 3: no gap, nothing late."""
        gaps = []
        self.relay.client.on_gap = gaps.append
        for n, signer in ((1, ALICE), (2, ALICE), (3, ALICE_2)):
            self.relay.deliver(sealed_by(signer, b"m", mid(n), T0 - 2 * DAY, seq=n), mid(n))
        self.assertEqual(gaps, [])
        self.assertEqual(len(self.relay.received), 3)


class RelayShowsHistoryLateTests(SynchronousTestCase):
    def test_history_withheld_at_first_contact_then_served(self):
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE_2.public_der, (), now=T0 - YEAR)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - 2 * YEAR)])
        relay.deliver(sealed_by(ALICE, b"from 2 years ago", mid(1), T0 - 2 * YEAR - DAY))
        self.assertEqual(relay.texts(), [])

    def test_withheld_history_riding_in_with_the_next_rotation(self):
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE_2.public_der, (), now=T0 - YEAR)
        relay = HostileRelay(self, contacts)
        relay.key(ALICE_3, [step(ALICE, ALICE_2, T0 - 2 * YEAR), step(ALICE_2, ALICE_3, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, b"from 2 years ago", mid(1), T0 - 2 * YEAR - DAY))
        self.assertEqual(relay.texts(), [])


class RotationLoopTests(SynchronousTestCase):
    """alice: A -> B, then B -> X -> B -> C (a rotation back to a key is allowed)."""

    def history(self):
        return [step(ALICE, ALICE_2, T0 - 5 * DAY), step(ALICE_2, ALICE_X, T0 - 4 * DAY),
                step(ALICE_X, ALICE_2, T0 - 3 * DAY), step(ALICE_2, ALICE_3, T0 - 2 * DAY)]

    def contacts(self):
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE.public_der, now=T0 - 10 * DAY)
        contacts.accept_key("alice", ALICE_2.public_der, self.history()[:1], now=T0 - 5 * DAY)
        return contacts

    def test_the_whole_loop_is_followed_and_kept(self):
        contacts = self.contacts()
        self.assertEqual(contacts.accept_key("alice", ALICE_3.public_der, self.history(),
                                             now=T0).rotated, 3)
        self.assertEqual(len(contacts.chain("alice")), 4)
        # The same honest answer next session is no rollback.
        self.assertEqual(contacts.accept_key("alice", ALICE_3.public_der, self.history(),
                                             now=T0 + 1).rotated, 0)

    def test_a_key_inside_the_loop_is_vouched_for(self):
        relay = HostileRelay(self, self.contacts())
        relay.key(ALICE_3, self.history())
        relay.deliver(sealed_by(ALICE_X, b"sent while X was current", mid(1), T0 - 4 * DAY + 1))
        self.assertEqual(relay.texts(), [b"sent while X was current"])

    def test_a_loop_back_to_the_trusted_key(self):
        """B -> X -> B: the key is the same again, the steps are kept, X is history."""
        contacts = self.contacts()
        loop = self.history()[:3]
        outcome = contacts.accept_key("alice", ALICE_2.public_der, loop, now=T0)
        self.assertEqual(outcome.rotated, 0)
        self.assertEqual(len(contacts.chain("alice")), 3)
        self.assertEqual(trusted(contacts), ALICE_2.public_der)


class ManyRotationsMissedTests(SynchronousTestCase):
    def test_more_rotations_than_one_answer_carries_is_a_key_conflict(self):
        """Not a rollback: the user is shown both fingerprints to compare."""
        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE.public_der, now=T0 - 100 * DAY)
        contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2, T0 - 90 * DAY)],
                            now=T0 - 90 * DAY)
        people = [ALICE_2] + [ident("alice", key=f"alice-{i}") for i in range(20, 29)]
        chain = [step(a, b, T0 - 50 * DAY + i) for i, (a, b) in enumerate(zip(people, people[1:]))]
        self.assertRaises(keys.KeyConflict, contacts.accept_key, "alice", people[-1].public_der,
                          chain[-wire.MAX_ROTATIONS:], now=T0)


class UnusableKeyTests(SynchronousTestCase):
    def test_an_even_modulus_is_refused_at_first_contact(self):
        """It parses, but nothing can be sealed to it: refused, not pinned."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        bogus = rsa.RSAPublicNumbers(65537, 2**2047 + 2).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        relay = HostileRelay(self)
        d = relay.client.send("alice", b"hi")
        relay.client.dataReceived(wire.encode(wire.Key("alice", bogus)))
        failure = self.failureResultOf(d, keys.BadKey)
        self.assertIn("even", str(failure.value))
        self.assertIsNone(relay.contacts.pinned("alice"))


class VerifyWhileTheKeyChangesTests(SynchronousTestCase):
    def test_the_key_compared_is_the_key_verified(self):
        contacts = MemoryContacts()
        contacts.pin("alice", ALICE.public_der)
        contacts.accept_key("alice", ALICE_2.public_der, [step(ALICE, ALICE_2)], now=T0)
        self.assertRaises(UntrustedKey, contacts.verify, "alice", der=ALICE.public_der)
        self.assertFalse(contacts.is_verified("alice"))
        contacts.verify("alice", der=ALICE_2.public_der)
        self.assertTrue(contacts.is_verified("alice"))


class ExtendingAnAcceptedChainTests(AcceptedChainTestCase):
    """Past an accepted chain, every new step is checked as the first ones were."""

    FIRST_AT = T0 - 3 * DAY

    def test_extension_signed_by_a_forger_is_refused(self):
        for forged in (step(ALICE_2, FORGER, T0, new_signer=FORGER, old_signer=FORGER),
                       step(ALICE_2, ALICE_3, T0, new_signer=FORGER),
                       step(ALICE_2, ALICE_3, T0, old_signer=FORGER)):
            offered = FORGER if forged.new_key == FORGER.public_der else ALICE_3
            self.assertRaises(keys.IdentityError, self.offer, offered, [self.first, forged])
            self.assertEqual(trusted(self.contacts), ALICE_2.public_der)
            self.assertEqual(said(self.contacts), [pair(ALICE, ALICE_2)])

    def test_every_key_on_an_extension_is_kept(self):
        extension = [step(ALICE_2, ALICE_3, T0 - 2 * DAY), step(ALICE_3, ALICE_4, T0 - DAY)]
        self.assertEqual(self.offer(ALICE_4, [self.first] + extension).rotated, 2)
        self.assertEqual([(k.der, k.rotated_at) for k in self.contacts.history("alice")],
                         [(ALICE.public_der, T0 - 3 * DAY), (ALICE_2.public_der, T0 - 2 * DAY),
                          (ALICE_3.public_der, T0 - DAY), (ALICE_4.public_der, None)])


class RetiredNumbersInTheInboxTests(SynchronousTestCase):
    """
    The inbox's bookkeeping of numbers signed by a retired key, on both
    inboxes: they never raise the sender's highest for the current key's
    messages, except below them.
    """

    def inboxes(self):
        from mailrelay.client.inbox import Inbox

        yield MemoryInbox()
        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        yield inbox

    def opened(self, seq, n=None):
        return envelope.Opened(envelope.Header(
            envelope.VERSION, envelope.SUITE_RSA, "alice", ALICE.fingerprint, "bob",
            BOB.fingerprint, mid(seq if n is None else n), T0, seq), b"m")

    def test_an_absurd_retired_number_leaves_the_current_numbering_alone(self):
        from mailrelay.client.inbox import Gap

        for inbox in self.inboxes():
            self.assertEqual(inbox.record(self.opened(2**63 - 1), retired=True),
                             [Gap("alice", 1, 2**63 - 2)])
            self.assertEqual(inbox.record(self.opened(1)), [])
            self.assertEqual(inbox.record(self.opened(3)), [Gap("alice", 2, 2)])
            self.assertTrue(inbox.numbered("alice"))

    def test_retired_numbers_count_among_themselves(self):
        from mailrelay.client.inbox import Gap

        for inbox in self.inboxes():
            inbox.record(self.opened(5), retired=True)
            self.assertEqual(inbox.record(self.opened(3), retired=True),
                             [Gap("alice", 3, 3, late=True)])

    def test_numbering_goes_on_across_the_rotation(self):
        for inbox in self.inboxes():
            self.assertEqual(inbox.record(self.opened(1), retired=True), [])
            self.assertEqual(inbox.record(self.opened(2), retired=True), [])
            self.assertEqual(inbox.record(self.opened(3)), [])
            self.assertEqual(inbox.record(self.opened(4)), [])

    def test_a_retired_number_equal_to_a_current_one_makes_it_no_later(self):
        """A thief's message took number 2: alice's own 2 is not "late" for it."""
        for inbox in self.inboxes():
            inbox.record(self.opened(1), retired=True)
            inbox.record(self.opened(2, n=20), retired=True)
            self.assertEqual(inbox.record(self.opened(2)), [])

    def test_a_retired_number_forgotten_counts_no_more(self):
        from mailrelay.client.inbox import Gap

        for inbox in self.inboxes():
            inbox.record(self.opened(5), retired=True)
            inbox.forget(self.opened(5))
            self.assertEqual(inbox.record(self.opened(6)), [Gap("alice", 1, 5)])

    def test_a_second_message_under_an_id_is_set_aside_with_a_file_inbox(self):
        from mailrelay.client.inbox import Inbox

        contacts = MemoryContacts()
        contacts.accept_key("alice", ALICE.public_der, now=T0 - 10 * DAY)
        inbox = Inbox(self.mktemp())
        self.addCleanup(inbox.close)
        relay = HostileRelay(self, contacts, inbox=inbox)
        relay.key(ALICE_2, [step(ALICE, ALICE_2, T0 - DAY)])
        relay.deliver(sealed_by(ALICE, b"forged", mid(7), T0 - 2 * DAY), mid(7))
        relay.deliver(sealed_by(ALICE_2, b"genuine", mid(7), T0), mid(7))
        self.assertEqual(relay.texts(), [b"forged"])
        [kept] = inbox.quarantined()
        self.assertEqual(kept.message_id, mid(7))
