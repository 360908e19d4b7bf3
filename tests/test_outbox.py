"""
Tests for L{mailrelay.client.outbox}: the durable outbox, against a real
relay reached in memory.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sqlite3
import stat

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.client.contacts import MemoryContacts
from mailrelay import envelope, keys, wire
from mailrelay.client.outbox import Outbox, OutboxError, queue_message
from mailrelay.relay.store import Quota
from mailrelay.client.protocol import Disconnected, RelayError, SendRefused
from tests.test_client import ALICE, BOB, CAROL, MemoryRelay

E = wire.ErrorCode


class OutboxTestCase(SynchronousTestCase):
    """An outbox of ALICE's in a file, with BOB's and CAROL's keys pinned."""

    def setUp(self):
        self.contacts = MemoryContacts()
        for who in (BOB, CAROL):
            self.contacts.pin(who.name, who.public_der)
        self.path = os.path.abspath(self.mktemp())
        self.outbox = Outbox(self.path)
        self.addCleanup(self.outbox.close)

    def queue(self, recipient: str, text: bytes):
        return self.successResultOf(queue_message(self.outbox, ALICE, recipient, text,
                                                  contacts=self.contacts))


class OutboxTests(OutboxTestCase):
    def setUp(self):
        super().setUp()
        self.relay = MemoryRelay(quota=Quota(messages=0, bytes=0))
        for who in (ALICE, BOB, CAROL):
            self.relay.register(who)

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


# Found by mutation testing (make mutation-test): checks no test above guarded.

class ScriptedClient:
    """
    A connected client whose relay answers each submit as the test says:
    C{answers} maps a message's text to an exception (or None: accepted);
    a Deferred answer is left for the test to fire.
    """

    def __init__(self, answers=None, wait=False):
        self.answers = answers or {}
        self.wait = wait
        self.submitted: list[bytes] = []
        self.waiting: list[Deferred] = []

    def submit(self, message_id: bytes, sealed: bytes) -> Deferred:
        text = envelope.open_envelope(sealed, BOB if b"bob" in sealed else CAROL,
                                      ALICE.public_key).plaintext
        self.submitted.append(text)
        if self.wait:
            d = Deferred()
            self.waiting.append(d)
            return d
        answer = self.answers.get(text)
        return fail(answer) if answer is not None else succeed(message_id)


class FlushRulesTests(OutboxTestCase):
    def flush(self, client):
        return self.successResultOf(self.outbox.flush(client))

    def test_queued_entry(self):
        entry = self.queue("bob", b"one")
        self.assertEqual((entry.seq, entry.attempts, entry.last_error), (1, 0, None))
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, entry, "seq", 5)
        self.assertFalse(self.outbox.sent(entry.message_id))
        self.flush(ScriptedClient())
        self.assertTrue(self.outbox.sent(entry.message_id))

    def test_refused_for_good_lets_the_next_one_go(self):
        self.queue("bob", b"bad")
        self.queue("bob", b"good")
        client = ScriptedClient({b"bad": SendRefused(E.RECIPIENT_KEY_MISMATCH, "stale key")})
        result = self.flush(client)
        self.assertEqual([q.seq for q in result.accepted], [2])
        [failed] = self.outbox.failed()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, failed, "seq", 5)

    def test_each_acceptance_is_reported_as_it_happens(self):
        """
        C{accepted} hears of each message once the relay accepted it and the
        outbox recorded it as sent, before the flush ends; never of one held.
        """
        first, second = self.queue("bob", b"one"), self.queue("bob", b"two")
        client = ScriptedClient(wait=True)
        heard = []
        d = self.outbox.flush(
            client, lambda entry: heard.append((entry.message_id,
                                                self.outbox.sent(entry.message_id))))
        client.waiting.pop(0).callback(first.message_id)
        self.assertNoResult(d)
        self.assertEqual(heard, [(first.message_id, True)])
        client.waiting.pop(0).errback(Disconnected("gone"))
        result = self.successResultOf(d)
        self.assertEqual(heard, [(first.message_id, True)])
        self.assertEqual([q.message_id for q, _ in result.held], [second.message_id])

    def test_held_by_the_relay_or_by_the_connection(self):
        self.queue("bob", b"full")
        self.queue("carol", b"lost")
        client = ScriptedClient({b"full": SendRefused(E.MAILBOX_FULL, "full"),
                                 b"lost": Disconnected("gone")})
        result = self.flush(client)
        self.assertEqual(len(result.deferred_by_relay), 1)
        [bob] = [q for q in self.outbox.pending() if q.recipient == "bob"]
        self.assertEqual(result.deferred_by_relay, {bob.message_id})

    def test_refusals_that_may_pass_keep_the_message_queued(self):
        """Each refusal the relay may lift later holds the message; the others fail it."""
        for code in sorted(E, key=int):
            if code.fatal:
                continue
            with self.subTest(code=code.name):
                outbox = Outbox(self.mktemp())
                self.addCleanup(outbox.close)
                self.successResultOf(queue_message(outbox, ALICE, "bob", b"x",
                                                   contacts=self.contacts))
                result = self.successResultOf(outbox.flush(
                    ScriptedClient({b"x": SendRefused(code, "no")})))
                held = code in (E.MAILBOX_FULL, E.STORE_FAILED, E.RATE_LIMITED,
                                E.SENDER_QUOTA)
                self.assertEqual((len(outbox.pending()), len(outbox.failed())),
                                 (1, 0) if held else (0, 1))
                self.assertEqual(len(result.held), int(held))

    def test_nothing_more_is_sent_once_the_connection_is_gone(self):
        for text in (b"b1", b"b2"):
            self.queue("bob", text)
        self.queue("carol", b"c1")
        client = ScriptedClient({b"b1": Disconnected("connection lost")})
        result = self.flush(client)
        self.assertEqual(client.submitted, [b"b1"])
        self.assertEqual([reason for _, reason in result.held], ["connection lost"] * 3)

    def test_a_passing_relay_error_stops_only_its_stream(self):
        """A refusal that is not fatal and not about the message holds back its recipient only."""
        self.queue("bob", b"b1")
        self.queue("carol", b"c1")
        client = ScriptedClient({b"b1": RelayError(E.STORE_FAILED, "try later")})
        result = self.flush(client)
        self.assertEqual(client.submitted, [b"b1", b"c1"])
        self.assertEqual([q.recipient for q in result.accepted], ["carol"])

    def test_at_most_the_window_in_flight(self):
        """32 recipients' messages at once (FLUSH_WINDOW); the 33rd once one is answered."""
        for n in range(33):
            name = f"r{n}"
            self.contacts.pin(name, BOB.public_der)
            self.successResultOf(queue_message(self.outbox, ALICE, name, b"x",
                                               contacts=self.contacts))
        client = ScriptedClient(wait=True)
        client.submit = lambda message_id, sealed: (client.waiting.append(Deferred())
                                                    or client.waiting[-1])
        d = self.outbox.flush(client)
        self.assertEqual(len(client.waiting), 32)
        client.waiting[0].callback(None)
        self.assertEqual(len(client.waiting), 33)
        for waiting in client.waiting[1:]:
            waiting.callback(None)
        self.assertEqual(len(self.successResultOf(d).accepted), 33)

    def failing(self, prefix):
        from tests.test_client import FailingAt

        real = self.outbox._db
        self.outbox._db = FailingAt(real, prefix)
        return lambda: setattr(self.outbox, "_db", real)

    def test_each_change_is_one_transaction(self):
        restore = self.failing("INSERT INTO sequences")
        self.failureResultOf(queue_message(self.outbox, ALICE, "bob", b"x",
                                           contacts=self.contacts), sqlite3.OperationalError)
        restore()
        self.assertEqual(self.outbox.pending(), [])
        entry = self.queue("bob", b"x")
        self.assertEqual(entry.seq, 1)
        for prefix, move in (("INSERT OR IGNORE INTO sent", self.outbox._accepted),
                             ("INSERT OR REPLACE INTO failed",
                              lambda e: self.outbox._refused(e, "why"))):
            restore = self.failing(prefix)
            self.assertRaises(sqlite3.OperationalError, move, entry)
            restore()
            self.assertEqual([q.message_id for q in self.outbox.pending()], [entry.message_id])

    def test_a_failure_to_record_the_answer_ends_the_flush_cleanly(self):
        """The disk fails as the acceptance is recorded: the flush ends, the message stays."""
        self.queue("bob", b"x")
        restore = self.failing("INSERT OR IGNORE INTO sent")
        result = self.flush(ScriptedClient())
        restore()
        self.assertEqual(result.accepted, [])
        self.assertEqual(len(self.outbox.pending()), 1)
        gc.collect()  # an error left in a Deferred would be logged now

    def test_closing_leaves_one_file(self):
        self.queue("bob", b"x")
        self.outbox.close()
        self.assertFalse(os.path.exists(self.path + "-wal"))

    def test_home_outbox(self):
        from mailrelay.client.outbox import home_outbox

        home = keys.Home(os.path.join(self.mktemp(), "nested", "home"))
        outbox = home_outbox(home)
        outbox.close()
        self.assertEqual(stat.S_IMODE(os.stat(home.path).st_mode), 0o700)
        outbox = home_outbox(home)
        self.addCleanup(outbox.close)
        self.assertTrue((home.path / "outbox.sqlite").exists())


class OfflineSealingTests(SynchronousTestCase):
    """Sealing without the relay: only with a pinned key, and never in CA mode."""

    class Contacts:
        def __init__(self, roots):
            self.roots = roots

        def identity_roots(self):
            return self.roots

        def pinned(self, name):
            return BOB.public_key

    def setUp(self):
        self.outbox = Outbox(os.path.abspath(self.mktemp()))
        self.addCleanup(self.outbox.close)

    def test_a_home_without_a_ca_seals_with_the_pinned_key(self):
        queued = self.successResultOf(queue_message(self.outbox, ALICE, "bob", b"x",
                                                    contacts=self.Contacts(None)))
        self.assertEqual(queued.seq, 1)

    def test_a_home_with_a_ca_does_not(self):
        error = self.failureResultOf(queue_message(self.outbox, ALICE, "bob", b"x",
                                                   contacts=self.Contacts(["a root"])),
                                     keys.IdentityError)
        self.assertIn("against a CA", str(error.value))
        self.assertEqual(self.outbox.pending(), [])

    def test_no_contacts_no_key(self):
        self.failureResultOf(queue_message(self.outbox, ALICE, "bob", b"x"), keys.IdentityError)
