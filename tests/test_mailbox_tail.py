"""
The live tail of L{mailrelay.relay.mailbox}: what it holds is bounded, and
nothing from it goes to a session that has ended.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import wire
from mailrelay.relay.mailbox import TAIL_BYTES, Mailboxes, Outbox
from mailrelay.relay.store.base import Quota
from mailrelay.relay.store.memory import MemoryStore


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class SlowReads:
    """A L{MemoryStore} whose reads answer when the test says, with what was there when asked."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.reads: list[tuple[Deferred, list]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pending(self, recipient, after, limit):
        snapshot: list = []
        self.inner.pending(recipient, after, limit).addCallback(snapshot.extend)
        d: Deferred = Deferred()
        self.reads.append((d, snapshot))
        return d

    def answer(self) -> None:
        d, snapshot = self.reads.pop(0)
        d.callback(snapshot)


class EndedSessionTests(SynchronousTestCase):
    """A read that answers after its session ended pushes nothing to that session."""

    def test_superseded(self):
        store = SlowReads()
        boxes = Mailboxes(store, Clock(), window=4)
        old_pushed: list = []
        new_pushed: list = []
        old = Outbox("bob", old_pushed.append)
        boxes.attach(old)  # a read goes out: the mailbox is empty
        boxes.accept("bob", "alice", mid(1), b"envelope")  # committed while it is out
        new = Outbox("bob", new_pushed.append)
        self.assertIs(boxes.attach(new), old)
        boxes.detach(old)
        store.answer()  # the old session's read: nothing
        self.assertEqual(old_pushed, [])
        store.answer()  # the new session's read: the message
        self.assertEqual([m.message_id for m in new_pushed], [mid(1)])

    def test_detached(self):
        store = SlowReads()
        boxes = Mailboxes(store, Clock(), window=4)
        pushed: list = []
        outbox = Outbox("bob", pushed.append)
        boxes.attach(outbox)
        boxes.accept("bob", "alice", mid(1), b"envelope")
        boxes.detach(outbox)  # the connection is lost
        store.answer()
        self.assertEqual(pushed, [])
        self.assertEqual(boxes.delivered_total, 0)


class TailBoundTests(SynchronousTestCase):
    def test_bytes_bounded(self):
        """
        A recipient that stops reading keeps at most TAIL_BYTES of envelopes
        in memory for it; the rest waits in the store, and all of it comes,
        in order, once it reads again.
        """
        boxes = Mailboxes(MemoryStore(Quota(0, 0)), Clock(), window=4)
        pushed: list = []
        outbox = Outbox("bob", pushed.append)
        boxes.attach(outbox)
        boxes.pause(outbox)  # its transport's buffer is full
        big = b"x" * wire.MAX_ENVELOPE
        count = 2 * TAIL_BYTES // len(big) + 2
        for n in range(count):
            boxes.accept("bob", "alice", mid(n), big)
            self.assertLessEqual(sum(len(m.envelope) for m in outbox.tail), TAIL_BYTES)
        self.assertEqual(pushed, [])
        boxes.resume(outbox)
        while len(pushed) < count:
            before = len(pushed)
            for message in list(pushed[-4:]):
                if message.message_id in outbox.in_flight:
                    boxes.acknowledge(outbox, message.message_id)
            self.assertGreater(len(pushed), before - 1)
            if len(pushed) == before:
                break
        self.assertEqual([m.message_id for m in pushed], [mid(n) for n in range(count)])


class PushFailureTests(SynchronousTestCase):
    def test_failing_push_is_the_loops_not_the_senders(self):
        """
        A push that raises (a transport gone wrong) is logged and retried by
        the delivery loop; the sender, whose message did commit, still hears
        that it was accepted.
        """
        clock = Clock()
        boxes = Mailboxes(MemoryStore(), clock, window=4)
        pushed: list = []
        failing = [True]

        def push(message):
            if failing[0]:
                raise OSError("transport went away")
            pushed.append(message)

        boxes.attach(Outbox("bob", push))  # an empty mailbox: live
        d = boxes.accept("bob", "alice", mid(1), b"envelope")
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
