"""
Tests for message expiry: L{Mailboxes.expire} replaces messages older than
the TTL by notices, and a connected recipient gets each notice at once.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import wire
from mailrelay.relay.mailbox import Mailboxes, Outbox, describe_duration
from mailrelay.relay.store.memory import MemoryStore

DAY = 86400


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class ExpireTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.mailboxes = Mailboxes(self.store, self.clock, window=8)
        self.pushed: list = []

    def accept(self, n: int, recipient: str = "bob", sender: str = "alice") -> None:
        self.successResultOf(self.mailboxes.accept(recipient, sender, mid(n), b"env %d" % n))

    def connect(self, recipient: str = "bob") -> Outbox:
        outbox = Outbox(recipient, lambda m: self.pushed.append(m.frame()))
        self.mailboxes.attach(outbox)
        return outbox

    def test_offline_recipient_finds_notice(self):
        self.accept(1)
        self.clock.advance(10 * DAY)
        self.accept(2)
        self.clock.advance(21 * DAY)
        count = self.successResultOf(self.mailboxes.expire(30 * DAY))
        self.assertEqual(count, 1)
        self.connect()
        self.assertEqual(len(self.pushed), 2)
        young, notice = self.pushed
        self.assertEqual(young, wire.Deliver(mid(2), b"env 2"))
        self.assertIsInstance(notice, wire.Notice)
        self.assertEqual(
            (notice.kind, notice.sender, notice.message_id, notice.accepted_at, notice.text),
            (wire.NOTICE_EXPIRED, "alice", mid(1), 1_700_000_000,
             "expired unread after 30 days on the relay"),
        )

    def test_connected_recipient_gets_notice_at_once(self):
        """A recipient whose window is full still gets the notice once it acks."""
        outbox = self.connect()
        self.pushed.clear()
        self.accept(1)
        self.assertEqual(self.pushed, [wire.Deliver(mid(1), b"env 1")])
        self.mailboxes.detach(outbox)
        self.pushed.clear()
        self.clock.advance(31 * DAY)
        self.successResultOf(self.mailboxes.expire(30 * DAY))
        outbox = self.connect()
        [notice] = self.pushed
        self.assertEqual(notice.message_id, mid(1))
        self.assertTrue(self.successResultOf(
            self.mailboxes.acknowledge(outbox, notice.notice_id)))
        self.assertEqual(self.successResultOf(self.store.count("bob")), 0)

    def test_notice_pushed_to_live_session(self):
        outbox = self.connect()
        self.accept(1, recipient="carol")
        self.clock.advance(2 * DAY)
        self.successResultOf(self.mailboxes.expire(DAY))
        self.assertEqual(self.pushed, [])  # carol is offline; bob has nothing
        self.accept(2)
        self.clock.advance(2 * DAY)
        self.pushed.clear()
        self.successResultOf(self.mailboxes.expire(DAY))
        # Bob's message was delivered but not acknowledged: it expires too,
        # and the notice follows; his client drops it if it showed the message.
        [notice] = self.pushed
        self.assertEqual((notice.sender, notice.message_id), ("alice", mid(2)))
        self.successResultOf(self.mailboxes.acknowledge(outbox, mid(2)))
        [waiting] = self.successResultOf(self.store.pending("bob", 0, 10))
        self.assertEqual(waiting.message_id, notice.notice_id)

    def test_nothing_young_expires(self):
        self.accept(1)
        self.clock.advance(DAY)
        self.assertEqual(self.successResultOf(self.mailboxes.expire(30 * DAY)), 0)
        self.connect()
        self.assertEqual(self.pushed, [wire.Deliver(mid(1), b"env 1")])

    def test_large_backlog_in_batches(self):
        for n in range(1200):
            self.accept(n, recipient=f"r{n % 7}")
        self.clock.advance(31 * DAY)
        self.assertEqual(self.successResultOf(self.mailboxes.expire(30 * DAY)), 1200)
        self.assertEqual(self.successResultOf(self.mailboxes.expire(30 * DAY)), 0)

    def test_describe_duration(self):
        self.assertEqual(describe_duration(30 * DAY), "30 days")
        self.assertEqual(describe_duration(DAY), "1 day")
        self.assertEqual(describe_duration(7200), "2 hours")
        self.assertEqual(describe_duration(90), "90 seconds")
        self.assertEqual(describe_duration(120), "2 minutes")


# Found by mutation testing (make mutation-test): checks no test above guarded.

class ExpiryEdgeTests(SynchronousTestCase):
    """Exactly at the TTL a message stays; a second later it expires."""

    setUp = ExpireTests.setUp
    accept = ExpireTests.accept

    def test_at_exactly_the_ttl(self):
        self.accept(1)
        self.clock.advance(30 * DAY)
        self.assertEqual(self.successResultOf(self.mailboxes.expire(30 * DAY)), 0)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.mailboxes.expire(30 * DAY)), 1)

    def test_a_sweep_is_a_deferred(self):
        """The relay's hourly sweep chains on what expire returns (tap.expireOldMessages)."""
        from twisted.internet.defer import Deferred

        self.assertIsInstance(self.mailboxes.expire(30 * DAY), Deferred)
