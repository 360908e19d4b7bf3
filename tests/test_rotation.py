"""
Key rotation: an identity replaces its key with one signed over by the old
key; contacts that pinned the old key follow the signed chain, and anything
else is still refused until trusted.
"""

from __future__ import annotations

import os

from twisted.python import monkey

from mailrelay import keys, wire
from mailrelay.client.protocol import RelayError
from tests.test_cli import OnlineTestCase
from tests.test_client import ALICE, BOB, MALLORY_BOB, MemoryRelay, ident
from twisted.trial.unittest import SynchronousTestCase

E = wire.ErrorCode
BOB_NEXT = ident("bob", key="next")


class RelayRotationTests(SynchronousTestCase):
    def setUp(self):
        self.relay = MemoryRelay()
        self.relay.register(ALICE)
        self.bob = self.relay.client(BOB)
        self.relay.flush()

    def rotate(self, client, new, **kw):
        d = client.rotate(new, 1_700_000_000, **kw)
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

    def test_rotation_needs_both_signatures(self):
        from mailrelay.client import protocol as client_protocol

        # Signed by the new key only (the "old" signature made by an impostor).
        real = client_protocol.keys.Identity.sign
        self.patch(client_protocol.keys.Identity, "sign",
                   lambda self, data: real(MALLORY_BOB if self.public_der == BOB.public_der
                                           else self, data))
        failure = self.failureResultOf(self.rotate(self.bob, BOB_NEXT), RelayError)
        self.assertEqual(failure.value.code, E.ROTATION_REFUSED)
        self.assertIn("the current key did not sign it", failure.value.text)
        self.assertEqual(self.relay.store._keys["bob"], BOB.public_der)
        self.assertIsNone(self.bob.close_reason)  # the session goes on

    def test_contacts_follow_a_signed_rotation(self):
        contacts = keys.MemoryContacts()
        contacts.pin("bob", BOB.public_der)
        notices = []
        alice = self.relay.client(ALICE, contacts=contacts,
                                  on_key_rotated=lambda n, der: notices.append(n))
        self.successResultOf(self.rotate(self.bob, BOB_NEXT))
        d = alice.send("bob", b"to the new key")
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(keys.public_der(contacts.pinned("bob")), BOB_NEXT.public_der)
        self.assertEqual(notices, ["bob"])

    def test_unsigned_change_still_refused(self):
        """A key change with no rotation chain from the pinned key: KeyConflict, as before."""
        contacts = keys.MemoryContacts()
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
        d = self.bob.rotate(BOB_NEXT, 1_700_000_000)
        self.relay.flush()
        self.successResultOf(d)
        contacts = keys.MemoryContacts()
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
        d = self.bob.rotate(BOB_NEXT, 1_700_000_000)
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

    def test_rotate_then_contacts_follow(self):
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: BOB_NEXT)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        d = self.run_online("rotate", "--home", self.bob_home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
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

    def test_interrupted_rotation_is_finished(self):
        """The relay took the new key but the files were not swapped: rotate finishes it."""
        home = keys.Home(self.bob_home)
        home.stage_rotation(BOB_NEXT, None)
        client = self.relay.client(BOB)
        self.relay.flush()
        d = client.rotate(BOB_NEXT, 1_700_000_000)
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
