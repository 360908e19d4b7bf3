"""
Key rotation: an identity replaces its key with one signed over by the old
key; contacts that pinned the old key follow the signed chain, and anything
else is still refused until trusted.
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python import monkey
from twisted.trial.unittest import TestCase

from mailrelay.client.contacts import MemoryContacts
from mailrelay import ca, keys, wire
from mailrelay.client.protocol import RelayError
from tests.test_cli import OnlineTestCase
from tests.test_client import ALICE, BOB, MALLORY_BOB, MemoryRelay, ident
from twisted.trial.unittest import SynchronousTestCase

E = wire.ErrorCode
BOB_NEXT = ident("bob", key="next")
ROTATED_AT = int(time.time()) + 3600
"""Rotations in these tests happen after the messages sealed before them (sealed now)."""


class RelayRotationTests(SynchronousTestCase):
    def setUp(self):
        self.relay = MemoryRelay()
        self.relay.register(ALICE)
        self.bob = self.relay.client(BOB)
        self.relay.flush()

    def rotate(self, client, new, **kw):
        d = client.rotate(new, ROTATED_AT, **kw)
        self.relay.flush()
        return d

    def test_rotation_replaces_the_key_and_keeps_the_chain(self):
        answer = self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        self.assertEqual(answer.public_key, BOB_NEXT.public_der)
        self.assertEqual(self.relay.store._keys["bob"], BOB_NEXT.public_der)
        [rotation] = answer.rotations
        self.assertEqual((rotation.old_key, rotation.new_key),
                         (BOB.public_der, BOB_NEXT.public_der))
        # The old key no longer authenticates; the new one does.
        old = self.relay.client(BOB)
        old.ready.addErrback(lambda f: f.trap(RelayError))
        self.relay.flush()
        self.assertEqual(old.close_reason.code, E.KEY_CONFLICT)
        new = self.relay.client(BOB_NEXT)
        self.relay.flush()
        self.assertIsNone(new.close_reason)

    def forged(self, old_signer, new_signer, timestamp=ROTATED_AT, new=BOB_NEXT):
        """ROTATE as a hostile client makes it: the signatures of the signers given."""
        statement = wire.rotation_statement("bob", BOB.public_der, new.public_der, timestamp)
        d = self.bob._rotating = Deferred()
        self.bob._write(wire.Rotate(new.public_der, timestamp, old_signer.sign(statement),
                                    new_signer.sign(statement)))
        self.relay.flush()
        return d

    def assertRefused(self, d, why):
        failure = self.failureResultOf(d, RelayError)
        self.assertEqual(failure.value.code, E.ROTATION_REFUSED)
        self.assertIn(why, failure.value.text)
        self.assertEqual(self.relay.store._keys["bob"], BOB.public_der)
        self.assertEqual(self.relay._result(self.relay.store.get_rotations("bob")), [])
        self.assertIsNone(self.bob.close_reason)  # the session goes on

    def test_rotation_needs_the_current_keys_signature(self):
        self.assertRefused(self.forged(MALLORY_BOB, BOB_NEXT), "the current key did not sign it")

    def test_rotation_needs_the_new_keys_signature(self):
        """A client rotating to a key it does not hold (someone else's public key)."""
        self.assertRefused(self.forged(BOB, MALLORY_BOB), "the new key did not sign it")

    def test_rotation_to_the_current_key_refused(self):
        self.assertRefused(self.forged(BOB, BOB, new=BOB), "the new key is the current one")

    def test_rotation_time_out_of_range_refused(self):
        self.assertRefused(self.forged(BOB, BOB_NEXT, timestamp=2**63), "out of range")

    def test_rotation_time_just_in_range_taken(self):
        self.successResultOf(self.forged(BOB, BOB_NEXT, timestamp=2**63 - 1))

    def test_key_answer_carries_both_signatures(self):
        """What a contact needs to check the step from either end."""
        self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        alice = self.relay.client(ALICE)
        d = alice.lookup("bob")
        self.relay.flush()
        self.successResultOf(d)
        [step] = alice.rotations_of("bob")
        statement = wire.rotation_statement("bob", BOB.public_der, BOB_NEXT.public_der,
                                            ROTATED_AT)
        self.assertEqual(step.timestamp, ROTATED_AT)
        self.assertTrue(keys.verify(BOB.public_key, step.old_signature, statement))
        self.assertTrue(keys.verify(BOB_NEXT.public_key, step.new_signature, statement))
        self.assertEqual(step.old_certificate, b"")

    def test_contacts_follow_a_signed_rotation(self):
        contacts = MemoryContacts()
        contacts.pin("bob", BOB.public_der)
        notices = []
        alice = self.relay.client(ALICE, contacts=contacts,
                                  on_key_rotated=lambda n, outcome: notices.append(n))
        self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        d = alice.send("bob", b"to the new key")
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(keys.public_der(contacts.pinned("bob")), BOB_NEXT.public_der)
        self.assertEqual(notices, ["bob"])

    def test_unsigned_change_still_refused(self):
        """A key change with no rotation chain from the pinned key: KeyConflict, as before."""
        contacts = MemoryContacts()
        contacts.pin("bob", MALLORY_BOB.public_der)  # what alice pinned is not bob's chain
        alice = self.relay.client(ALICE, contacts=contacts)
        self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        d = alice.send("bob", b"x")
        self.relay.flush()
        self.failureResultOf(d, keys.KeyConflict)

    def test_old_envelopes_still_open_after_rotation(self):
        """Messages sealed for the old key, waiting in the mailbox, open with the kept key."""
        from mailrelay import envelope

        sealed = envelope.seal(ALICE, "bob", BOB.public_key, b"sealed before",
                               message_id=b"m" * 16)
        self.relay._result(self.relay.store.enqueue("bob", "alice", b"m" * 16, sealed, 0))
        self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        received = []
        after = keys.Identity("bob", BOB_NEXT.private_key, (BOB,))
        self.relay.client(after, on_message=received.append)
        self.relay.flush()
        self.assertEqual([m.plaintext for m in received], [b"sealed before"])


class RotationKeepsMailTests(SynchronousTestCase):
    """What a review of rotation found: nothing sent or sealed before it is lost."""

    def setUp(self):
        self.relay = MemoryRelay()
        # The clients learn of the rotation after it (their clock is the relay's).
        self.relay.clock.advance(ROTATED_AT + 60)
        self.relay.register(ALICE)
        self.bob = self.relay.client(BOB)
        self.relay.flush()

    def test_mail_signed_before_the_rotation_still_opens(self):
        """
        bob sends with his old key, then rotates; alice (who pinned the old
        key) follows the rotation and still opens the earlier message.
        """
        d = self.bob.send("alice", b"sent before rotating")
        self.relay.flush()
        self.successResultOf(d)
        d = self.bob.rotate(BOB_NEXT, ROTATED_AT)
        self.relay.flush()
        self.successResultOf(d)
        contacts = MemoryContacts()
        contacts.pin("bob", BOB.public_der)
        received, rejected = [], []
        self.relay.client(ALICE, contacts=contacts, on_message=received.append,
                          on_rejected=rejected.append)
        self.relay.flush()
        self.assertEqual(rejected, [])
        self.assertEqual([m.plaintext for m in received], [b"sent before rotating"])

    def test_other_sessions_of_the_old_key_end(self):
        receiving = self.relay.client(BOB, on_message=list().append)
        self.relay.flush()
        d = self.bob.rotate(BOB_NEXT, ROTATED_AT)
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(receiving.close_reason.code, E.SUPERSEDED)
        self.assertIn("rotated its key", receiving.close_reason.text)


class HomeSwapTests(SynchronousTestCase):
    def test_each_step_leaves_a_working_home(self):
        """The old key is copied before the staged one replaces it; the names never collide."""
        home = keys.Home(self.mktemp())
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: BOB)))
        patcher.runWithPatches(home.create, "bob")
        home.stage_rotation(BOB_NEXT, None)
        self.assertEqual(home.load().public_der, BOB.public_der)  # staged, not yet used
        kept = home.finish_rotation(BOB, BOB_NEXT)
        loaded = home.load()
        self.assertEqual(loaded.public_der, BOB_NEXT.public_der)
        self.assertEqual([p.public_der for p in loaded.previous], [BOB.public_der])
        self.assertEqual(kept.name, f"private_key-{BOB.fingerprint.hex()[:16]}.pem")
        # A second rotation keeps both old keys.
        third = ident("bob", key="third")
        home.stage_rotation(third, None)
        home.finish_rotation(BOB_NEXT, third)
        self.assertEqual(sorted(p.public_der for p in home.load().previous),
                         sorted([BOB.public_der, BOB_NEXT.public_der]))


class RotateCommandTests(OnlineTestCase):
    def setUp(self):
        super().setUp()
        self.bob_home = self.home_with(BOB)
        self.alice_home = self.home_with(ALICE)
        self.relay.register(BOB)
        self.relay.register(ALICE)
        keys.Home(self.alice_home).pin("bob", BOB.public_der)

    def rotate_bob(self):
        """`mailrelay rotate` in bob's home, to BOB_NEXT; it succeeds."""
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: BOB_NEXT)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        d = self.run_online("rotate", "--home", self.bob_home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)

    def test_rotate_then_contacts_follow(self):
        self.rotate_bob()
        self.assertIn(keys.format_fingerprint(BOB_NEXT.fingerprint), self.stdout.getvalue())
        home = keys.Home(self.bob_home)
        loaded = home.load()
        self.assertEqual(loaded.public_der, BOB_NEXT.public_der)
        self.assertEqual([p.public_der for p in loaded.previous], [BOB.public_der])
        self.assertFalse(home.next_key_file.exists())
        self.assertEqual(len(os.listdir(home.previous_dir)), 1)
        # alice, who pinned the old key, sends to the new one.
        d = self.run_online("send", "--home", self.alice_home, "--to", "bob", "hi")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(keys.public_der(keys.Home(self.alice_home).pinned("bob")),
                         BOB_NEXT.public_der)

    def test_verified_contact_rotating_is_announced_loudly(self):
        """alice verified bob; bob rotates; alice's next send says bob is no longer verified."""
        keys.Home(self.alice_home).contacts.verify("bob")
        self.rotate_bob()
        d = self.run_online("send", "--home", self.alice_home, "--to", "bob", "hi")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        err = self.stderr.getvalue()
        self.assertIn("mailrelay: bob rotated their key (signed over from the key you trusted); "
                      f"now using {keys.format_fingerprint(BOB_NEXT.fingerprint)}", err)
        self.assertIn("bob is NOT VERIFIED any more", err)
        self.assertFalse(keys.Home(self.alice_home).contacts.is_verified("bob"))

    def test_interrupted_rotation_is_finished(self):
        """The relay took the new key but the files were not swapped: rotate finishes it."""
        home = keys.Home(self.bob_home)
        home.stage_rotation(BOB_NEXT, None)
        client = self.relay.client(BOB)
        self.relay.flush()
        d = client.rotate(BOB_NEXT, ROTATED_AT)
        self.relay.flush()
        self.successResultOf(d)  # ... and the process died here
        d = self.run_online("send", "--home", self.bob_home, "--to", "alice", "x")
        self.accept()
        err = self.exits(d, one_line=False)
        self.assertIn("A key rotation was interrupted: run `mailrelay rotate`", err)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        d = self.run_online("rotate", "--home", self.bob_home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("Finished the key rotation", self.stdout.getvalue())
        self.assertEqual(home.load().public_der, BOB_NEXT.public_der)


class CAModeRotationTests(SynchronousTestCase):
    """A relay in CA mode takes a new key only with the CA's certificate for it."""

    def setUp(self):
        from tests.test_ca import authority, certificate_for

        self.certificate_for = lambda who, root=None: ca.certificate_der(
            certificate_for(who, root))
        self.authority = authority
        self.relay = MemoryRelay(ca_roots=[authority().certificate])
        self.bob = self.relay.client(BOB, certificate=self.certificate_for(BOB))
        self.relay.flush()

    def rotate(self, certificate):
        d = self.bob.rotate(BOB_NEXT, ROTATED_AT, certificate)
        self.relay.flush()
        return d

    def refused(self, certificate, why):
        failure = self.failureResultOf(self.rotate(certificate), RelayError)
        self.assertEqual(failure.value.code, E.ROTATION_REFUSED)
        self.assertIn(why, failure.value.text)
        self.assertEqual(self.relay.store._keys["bob"], BOB.public_der)

    def test_certified_new_key_taken_and_old_certificate_kept(self):
        answer = self.successResultOf(self.rotate(self.certificate_for(BOB_NEXT)))
        ca.verify_identity(answer.certificate, [self.authority().certificate], "bob",
                           BOB_NEXT.public_der)
        [step] = answer.rotations
        ca.verify_identity(step.old_certificate, [self.authority().certificate], "bob",
                           BOB.public_der)

    def test_no_certificate(self):
        self.refused(b"", "no certificate was given")

    def test_certificate_for_the_old_key(self):
        self.refused(self.certificate_for(BOB), "another key")

    def test_certificate_for_another_id(self):
        self.refused(self.certificate_for(ident("mallory", key="next")), "not for 'bob'")

    def test_certificate_from_another_ca(self):
        self.refused(self.certificate_for(BOB_NEXT, self.authority("Other Root")),
                     "not by a trusted root")


class StoredRotationTests(TestCase):
    """Both engines keep a rotation whole; SQLite across restarts and from older schemas."""

    def rotation(self):
        statement = wire.rotation_statement("bob", BOB.public_der, BOB_NEXT.public_der,
                                            ROTATED_AT)
        return wire.Rotation(BOB.public_der, BOB_NEXT.public_der, ROTATED_AT,
                             BOB.sign(statement), BOB_NEXT.sign(statement), b"old cert")

    @inlineCallbacks
    def check(self, store, reopen):
        yield store.start()
        yield store.register_key("bob", BOB.public_der, 0)
        rotation = self.rotation()
        self.assertTrue((yield store.rotate_key("bob", rotation, b"new cert")))
        # Only from the key registered: a second rotation from the old key changes nothing.
        self.assertFalse((yield store.rotate_key("bob", rotation, b"other")))
        store = yield reopen(store)
        self.assertEqual((yield store.get_rotations("bob")), [rotation])
        self.assertEqual((yield store.get_key("bob")), BOB_NEXT.public_der)
        self.assertEqual((yield store.get_certificate("bob")), b"new cert")
        yield store.stop()

    def test_memory(self):
        from mailrelay.relay.store.memory import MemoryStore

        return self.check(MemoryStore(), lambda store: store)

    def test_sqlite(self):
        from mailrelay.relay.store.sqlite import SQLiteStore

        path = self.mktemp()
        os.makedirs(path)
        path = os.path.join(path, "relay.sqlite")

        @inlineCallbacks
        def reopen(store):
            yield store.stop()
            again = SQLiteStore(path)
            yield again.start()
            return again

        return self.check(SQLiteStore(path), reopen)

    @inlineCallbacks
    def test_rotation_kept_by_schema_3_is_served_without_the_new_signature(self):
        """Kept before both signatures were: served as it is, which contacts will not follow."""
        import sqlite3

        from mailrelay.relay.store.sqlite import MIGRATIONS, SQLiteStore

        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "relay.sqlite")
        db = sqlite3.connect(path)
        for version in (1, 2, 3):
            db.executescript(MIGRATIONS[version])
        db.execute("PRAGMA user_version=3")
        db.execute("INSERT INTO rotations (identity, old_key, new_key, rotated_at, signature)"
                   " VALUES ('bob', ?, ?, 5, ?)", (BOB.public_der, BOB_NEXT.public_der, b"sig"))
        db.commit()
        db.close()
        store = SQLiteStore(path)
        yield store.start()
        self.assertEqual((yield store.get_rotations("bob")),
                         [wire.Rotation(BOB.public_der, BOB_NEXT.public_der, 5, b"sig", b"", b"")])
        yield store.stop()


class SQLiteRotationTimeTests(TestCase):
    """
    A time SQLite cannot keep (2^63 or more) is refused before the store
    sees it, over a real TCP connection to a relay on a real SQLite file:
    ROTATION_REFUSED, and the session goes on.
    """

    @inlineCallbacks
    def test_out_of_range_time_refused(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint

        from mailrelay.client.protocol import connect
        from mailrelay.relay.protocol import RelayFactory
        from mailrelay.relay.store.sqlite import SQLiteStore

        folder = self.mktemp()
        os.makedirs(folder)
        store = SQLiteStore(os.path.join(folder, "relay.sqlite"))
        yield store.start()
        self.addCleanup(store.stop)
        factory = RelayFactory(store, reactor, name="relay")
        factory.storeReady()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield connect(reactor, endpoint, BOB, timeout=10)
        self.addCleanup(client.close)
        statement = wire.rotation_statement("bob", BOB.public_der, BOB_NEXT.public_der, 2**63)
        d = client._rotating = Deferred()
        client._write(wire.Rotate(BOB_NEXT.public_der, 2**63, BOB.sign(statement),
                                  BOB_NEXT.sign(statement)))
        failure = yield self.assertFailure(d, RelayError)
        self.assertEqual(failure.code, E.ROTATION_REFUSED)
        self.assertIn("out of range", failure.text)
        # The session goes on, and the key is unchanged.
        key = yield client.lookup("bob")
        self.assertEqual(key, BOB.public_der)
        self.assertIsNone(client.close_reason)


# Found by mutation testing (make mutation-test): checks no test above guarded.

class RelayRotationRefusalTests(SynchronousTestCase):
    """More ROTATEs the relay refuses, and goes on serving."""

    setUp = RelayRotationTests.setUp
    forged = RelayRotationTests.forged
    assertRefused = RelayRotationTests.assertRefused

    def test_rotation_to_something_that_is_not_a_key(self):
        """A client rotating to bytes that are no usable key: refused with the key's fault."""
        statement = wire.rotation_statement("bob", BOB.public_der, b"junk", ROTATED_AT)
        d = self.bob._rotating = Deferred()
        self.bob._write(wire.Rotate(b"junk", ROTATED_AT, BOB.sign(statement), b"junk"))
        self.relay.flush()
        self.assertRefused(d, "not a usable DER public key")

    def test_rotation_beaten_by_another_session(self):
        """
        Another session of bob rotated first (the registered key is no longer
        this session's): the directory refuses, and so does the relay.
        """
        from twisted.internet.defer import succeed

        self.patch(self.relay.factory.directory, "rotate",
                   lambda identity, rotation, certificate: succeed(False))
        self.assertRefused(self.forged(BOB, BOB_NEXT), "no longer the registered one")
