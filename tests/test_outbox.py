"""
Tests for L{mailrelay.client.outbox}: the durable outbox, against a real
relay reached in memory.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.trial.unittest import SynchronousTestCase

from mailrelay import envelope, keys, wire
from mailrelay.client.outbox import Outbox, OutboxError, queue_message
from mailrelay.relay.store import Quota
from tests.test_client import ALICE, BOB, CAROL, MemoryRelay

E = wire.ErrorCode


class OutboxTests(SynchronousTestCase):
    def setUp(self):
        self.relay = MemoryRelay(quota=Quota(messages=0, bytes=0))
        for who in (ALICE, BOB, CAROL):
            self.relay.register(who)
        self.contacts = keys.MemoryContacts()
        for who in (BOB, CAROL):
            self.contacts.pin(who.name, who.public_der)
        self.path = os.path.abspath(self.mktemp())
        self.outbox = Outbox(self.path)
        self.addCleanup(self.outbox.close)

    def queue(self, recipient: str, text: bytes):
        return self.successResultOf(queue_message(self.outbox, ALICE, recipient, text,
                                                  contacts=self.contacts))

    def flush(self, client):
        d = self.outbox.flush(client)
        self.relay.flush()
        return self.successResultOf(d)

    def stored(self, recipient: keys.Identity) -> list[tuple[bytes, int]]:
        box = self.relay.store._mailboxes.get(recipient.name, {})
        out = []
        for m, _ in sorted(box.values(), key=lambda e: e[0].seq):
            opened = envelope.open_envelope(m.envelope, recipient, ALICE.public_key)
            out.append((opened.plaintext, opened.header.seq))
        return out

    def test_numbers_per_recipient_and_survives_reopening(self):
        self.queue("bob", b"b1")
        self.queue("carol", b"c1")
        self.queue("bob", b"b2")
        self.outbox.close()
        self.outbox = Outbox(self.path)
        self.assertEqual([(q.recipient, q.seq) for q in self.outbox.pending()],
                         [("bob", 1), ("carol", 1), ("bob", 2)])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_flush_in_order_and_logged(self):
        for n in range(40):  # more than one flush window
            self.queue("bob", b"m%d" % n)
        client = self.relay.client(ALICE)
        self.relay.flush()
        result = self.flush(client)
        self.assertEqual(len(result.accepted), 40)
        self.assertEqual(self.stored(BOB), [(b"m%d" % n, n + 1) for n in range(40)])
        self.assertEqual(self.outbox.pending(), [])
        self.assertEqual([seq for _, _, seq, _ in self.outbox.sent_log()], list(range(1, 41)))
        # Flushing again sends nothing.
        self.assertEqual(self.flush(client).accepted, [])

    def test_resent_envelope_is_stored_once(self):
        """
        A message the relay committed whose answer was lost is still queued;
        the next flush sends the same bytes, and the relay stores it once.
        """
        entry = self.queue("bob", b"once")
        client = self.relay.client(ALICE)
        self.relay.flush()
        # Sent and committed, but the outbox never heard the answer.
        d = client.submit(entry.message_id, entry.envelope)
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(len(self.outbox.pending()), 1)
        result = self.flush(client)
        self.assertEqual([e.message_id for e in result.accepted], [entry.message_id])
        self.assertEqual(self.stored(BOB), [(b"once", 1)])

    def test_transient_refusal_holds_back_the_recipient(self):
        """
        A full mailbox keeps the message queued, and the later messages to
        that recipient with it (not accepted out of order); other
        recipients' messages go.
        """
        self.relay.store.quota = Quota(messages=1, bytes=0)
        self.queue("bob", b"b1")
        self.queue("bob", b"b2")
        for n in range(32):  # past the first flush window
            self.queue("carol", b"c%d" % n)
        self.queue("bob", b"b3")
        client = self.relay.client(ALICE)
        self.relay.flush()
        result = self.flush(client)
        self.assertEqual([(e.recipient, e.seq) for e in result.accepted],
                         [("bob", 1), ("carol", 1)])
        bob_held = [(e.seq, why) for e, why in result.held if e.recipient == "bob"]
        self.assertEqual([seq for seq, _ in bob_held], [2, 3])
        self.assertIn(E.MAILBOX_FULL.name, bob_held[0][1])
        self.assertIn("earlier message to the same recipient is held back", bob_held[1][1])
        self.assertEqual(len(self.outbox.pending()), 33)
        self.assertEqual(self.stored(BOB), [(b"b1", 1)])
        # Once bob's mailbox has room, the next flush sends his in order.
        self.relay.store.quota = Quota(messages=0, bytes=0)
        self.flush(client)
        self.assertEqual(self.stored(BOB), [(b"b1", 1), (b"b2", 2), (b"b3", 3)])

    def test_refusal_never_lets_a_later_message_overtake(self):
        """
        A byte quota that refuses a large message but would take a small
        one: the small one after it is not even sent, so it cannot be
        accepted first (one message per recipient in flight).
        """
        self.relay.store.quota = Quota(messages=0, bytes=3000)
        self.queue("bob", b"L" * 3000)
        self.queue("bob", b"small")
        client = self.relay.client(ALICE)
        self.relay.flush()
        result = self.flush(client)
        self.assertEqual(result.accepted, [])
        self.assertEqual([e.seq for e, _ in result.held], [1, 2])
        self.assertIn("mailbox of 'bob' is full", result.held[0][1])
        self.assertIn("an earlier message to the same recipient", result.held[1][1])
        self.assertEqual(self.stored(BOB), [])
        self.relay.store.quota = Quota(messages=0, bytes=0)
        self.flush(client)
        self.assertEqual([seq for _, seq in self.stored(BOB)], [1, 2])

    def test_rate_limit_keeps_order(self):
        """Sends refused RATE_LIMITED hold the rest back; the next flush goes on in order."""
        relay = MemoryRelay(quota=Quota(0, 0), rate=1, burst=2)
        for who in (ALICE, BOB):
            relay.register(who)
        self.relay = relay
        for n in range(5):
            self.queue("bob", b"m%d" % n)
        client = relay.client(ALICE)
        relay.flush()
        result = self.flush(client)
        self.assertEqual([e.seq for e in result.accepted], [1, 2])
        self.assertIn(E.RATE_LIMITED.name, result.held[0][1])
        for _ in range(2):  # a burst of 2 each time
            relay.clock.advance(10)
            self.flush(client)
        self.assertEqual([seq for _, seq in self.stored(BOB)], [1, 2, 3, 4, 5])

    def test_permanent_refusal_moves_to_failed(self):
        self.relay.store._keys["bob"] = CAROL.public_der
        self.queue("bob", b"for the old key")
        self.queue("carol", b"fine")
        client = self.relay.client(ALICE)
        self.relay.flush()
        result = self.flush(client)
        [(refused, why)] = result.refused
        self.assertIn(E.RECIPIENT_KEY_MISMATCH.name, why)
        self.assertEqual(self.outbox.pending(), [])
        [failed] = self.outbox.failed()
        self.assertEqual((failed.message_id, failed.recipient, failed.seq),
                         (refused.message_id, "bob", 1))
        self.assertEqual(self.stored(CAROL), [(b"fine", 1)])
        self.assertEqual(self.outbox.clear_failed(), 1)

    def test_connection_lost_keeps_everything_queued(self):
        """
        The relay commits the first message but the connection dies before
        its answer: all stay queued (the others were not even sent: one
        message per recipient is in flight), and the next session's flush
        has each stored once, in order.
        """
        from mailrelay.relay.protocol import RelaySession

        for n in range(3):
            self.queue("bob", b"m%d" % n)
        client = self.relay.client(ALICE)
        self.relay.flush()
        original = RelaySession._accepted

        def unanswered(session, new, header):
            session.transport.loseConnection()
            return None

        self.patch(RelaySession, "_accepted", unanswered)
        result = self.flush(client)
        self.assertEqual(result.accepted, [])
        self.assertEqual(len(result.held), 3)
        self.assertEqual([q.attempts for q in self.outbox.pending()], [1, 0, 0])
        self.assertEqual([seq for _, seq in self.stored(BOB)], [1])
        self.patch(RelaySession, "_accepted", original)
        again = self.relay.client(ALICE)
        self.relay.flush()
        self.assertEqual(len(self.flush(again).accepted), 3)
        self.assertEqual([seq for _, seq in self.stored(BOB)], [1, 2, 3])
        self.assertEqual(self.outbox.pending(), [])

    def test_concurrent_flushes_do_not_double_send(self):
        self.queue("bob", b"one")
        client = self.relay.client(ALICE)
        self.relay.flush()
        first = self.outbox.flush(client)
        self.queue("bob", b"two")
        second = self.outbox.flush(client)
        self.relay.flush()
        self.assertEqual(len(self.successResultOf(first).accepted), 1)
        self.assertEqual(len(self.successResultOf(second).accepted), 1)
        self.assertEqual([t for t, _ in self.stored(BOB)], [b"one", b"two"])

    def test_sealing_offline_needs_a_pinned_key(self):
        error = self.failureResultOf(
            queue_message(self.outbox, ALICE, "dave", b"x", contacts=self.contacts),
            keys.IdentityError)
        self.assertIn("no key of 'dave' is pinned yet", str(error.value))
        self.assertEqual(self.outbox.pending(), [])
        # And nothing numbered: dave's first message will be number 1.
        self.assertEqual(self.outbox._db.execute("SELECT count(*) FROM sequences").fetchone(),
                         (0,))

    def test_seal_failure_uses_no_number(self):
        """A message too large to seal is not queued and consumes no sequence number."""
        big = b"x" * (wire.MAX_ENVELOPE + 1)
        self.failureResultOf(queue_message(self.outbox, ALICE, "bob", big,
                                           contacts=self.contacts), envelope.EnvelopeTooLarge)
        self.assertEqual(self.queue("bob", b"small").seq, 1)

    def test_not_a_database(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("not a database\n" * 100)
        error = self.assertRaises(OutboxError, Outbox, path)
        self.assertIn("move it aside", str(error))
        db = sqlite3.connect(self.path)
        db.close()
