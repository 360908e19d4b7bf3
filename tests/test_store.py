"""
Tests for L{mailrelay.relay.store}: the same behaviour from both engines,
L{MemoryStore} and L{SQLiteStore}, plus what only the SQLite file promises.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.defer import DeferredList, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from mailrelay import wire
from mailrelay.relay.store import (
    DuplicateId,
    MailboxFull,
    Quota,
    SenderQuotaFull,
    StoredMessage,
    StoreError,
)
from mailrelay.relay.store.base import KIND_MESSAGE, parse_notice_body
from mailrelay.relay.store import sqlite as sqlite_store
from mailrelay.relay.store.memory import MemoryStore
from mailrelay.relay.store.sqlite import SQLiteStore

NOW = 1_700_000_000
KEY_1 = b"\x30\x82" + b"key one" * 10
KEY_2 = b"\x30\x82" + b"key two" * 10


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def env(n: int, size: int = 40) -> bytes:
    """A distinct stand-in envelope of C{size} bytes (the store never parses it)."""
    return (b"envelope-%d-" % n).ljust(size, b".")[:size]


def sender_usage_of(path: str) -> tuple[list, list]:
    """
    The per-sender usage the SQLite file at C{path} keeps, and the same
    counted from its messages (notices excluded), both sorted.
    """
    connection = sqlite3.connect(path)
    try:
        kept = connection.execute(
            "SELECT recipient, sender, messages, bytes FROM senders ORDER BY 1, 2").fetchall()
        counted = connection.execute(
            "SELECT recipient, sender, count(*), sum(size) FROM messages WHERE kind = 0"
            " GROUP BY recipient, sender ORDER BY 1, 2").fetchall()
    finally:
        connection.close()
    return kept, counted


def schema_of(path: str) -> tuple[int, list]:
    """The user_version and the tables of the SQLite file at C{path}."""
    connection = sqlite3.connect(path)
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        tables = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        ).fetchall()
    finally:
        connection.close()
    return version, tables


class StoreTestsMixin:
    """
    The behaviour every L{mailrelay.relay.store.MailboxStore} engine shares.
    C{makeStore(quota)} fires with a started store, stopped at cleanup.
    """

    def makeStore(self, quota: Quota = Quota()):
        raise NotImplementedError

    # Directory

    @inlineCallbacks
    def test_get_key_unknown(self):
        store = yield self.makeStore()
        self.assertIsNone((yield store.get_key("nobody")))

    @inlineCallbacks
    def test_register_key_first_wins(self):
        store = yield self.makeStore()
        self.assertEqual((yield store.register_key("alice", KEY_1, NOW)), KEY_1)
        self.assertEqual((yield store.register_key("alice", KEY_2, NOW + 1)), KEY_1)
        self.assertEqual((yield store.get_key("alice")), KEY_1)
        # Idempotent for the key on record.
        self.assertEqual((yield store.register_key("alice", KEY_1, NOW + 2)), KEY_1)

    @inlineCallbacks
    def test_keys_per_identity(self):
        store = yield self.makeStore()
        yield store.register_key("alice", KEY_1, NOW)
        self.assertEqual((yield store.register_key("bob", KEY_2, NOW)), KEY_2)
        self.assertEqual((yield store.get_key("alice")), KEY_1)
        self.assertEqual((yield store.get_key("bob")), KEY_2)
        self.assertIsInstance((yield store.get_key("bob")), bytes)

    # Enqueue

    @inlineCallbacks
    def test_enqueue_then_retry(self):
        store = yield self.makeStore()
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), True)
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW + 5)), False)
        self.assertEqual((yield store.count("bob")), 1)
        (message,) = yield store.pending("bob", 0, 10)
        self.assertEqual(message.accepted_at, NOW)  # the retry changed nothing

    @inlineCallbacks
    def test_duplicate_id_other_envelope(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(1), env(2), NOW), DuplicateId)
        self.assertEqual((yield store.count("bob")), 1)
        (message,) = yield store.pending("bob", 0, 10)
        self.assertEqual(message.envelope, env(1))

    @inlineCallbacks
    def test_duplicate_id_other_sender(self):
        """The same bytes claimed by another sender are not a retry."""
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield self.assertFailure(store.enqueue("bob", "carol", mid(1), env(1), NOW), DuplicateId)
        (message,) = yield store.pending("bob", 0, 10)
        self.assertEqual(message.sender, "alice")

    @inlineCallbacks
    def test_same_id_other_mailbox(self):
        store = yield self.makeStore()
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), True)
        self.assertIs((yield store.enqueue("carol", "alice", mid(1), env(2), NOW)), True)
        self.assertEqual((yield store.count("bob")), 1)
        self.assertEqual((yield store.count("carol")), 1)

    # Pending

    @inlineCallbacks
    def test_pending_fields(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(7), env(7), NOW)
        (message,) = yield store.pending("bob", 0, 10)
        self.assertIsInstance(message, StoredMessage)
        self.assertEqual(
            (message.recipient, message.sender, message.message_id, message.envelope,
             message.accepted_at),
            ("bob", "alice", mid(7), env(7), NOW),
        )
        self.assertIsInstance(message.message_id, bytes)
        self.assertIsInstance(message.envelope, bytes)
        self.assertGreater(message.seq, 0)

    @inlineCallbacks
    def test_pending_empty(self):
        store = yield self.makeStore()
        self.assertEqual((yield store.pending("bob", 0, 10)), [])

    @inlineCallbacks
    def test_pending_order(self):
        store = yield self.makeStore()
        # Ids deliberately out of sorting order, and another mailbox interleaved.
        order = [5, 1, 4, 2, 3]
        for n in order:
            yield store.enqueue("bob", "alice", mid(n), env(n), NOW)
            yield store.enqueue("carol", "alice", mid(100 + n), env(100 + n), NOW)
        messages = yield store.pending("bob", 0, 100)
        self.assertEqual([m.message_id for m in messages], [mid(n) for n in order])
        self.assertEqual([m.recipient for m in messages], ["bob"] * 5)
        seqs = [m.seq for m in messages]
        self.assertEqual(seqs, sorted(set(seqs)))

    @inlineCallbacks
    def test_pending_after_seq_and_limit(self):
        store = yield self.makeStore()
        for n in range(5):
            yield store.enqueue("bob", "alice", mid(n), env(n), NOW)
        everything = yield store.pending("bob", 0, 100)
        seqs = [m.seq for m in everything]
        first_two = yield store.pending("bob", 0, 2)
        self.assertEqual([m.seq for m in first_two], seqs[:2])
        after = yield store.pending("bob", seqs[1], 100)
        self.assertEqual([m.seq for m in after], seqs[2:])
        window = yield store.pending("bob", seqs[1], 2)
        self.assertEqual([m.seq for m in window], seqs[2:4])
        self.assertEqual((yield store.pending("bob", seqs[-1], 100)), [])

    @inlineCallbacks
    def test_seq_grows_after_delete(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        (first,) = yield store.pending("bob", 0, 10)
        yield store.delete("bob", mid(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        (second,) = yield store.pending("bob", 0, 10)
        self.assertGreater(second.seq, first.seq)

    # Delete

    @inlineCallbacks
    def test_delete(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        self.assertIs((yield store.delete("bob", mid(1), NOW)), True)
        self.assertIs((yield store.delete("bob", mid(1), NOW)), False)
        self.assertEqual((yield store.count("bob")), 1)
        self.assertEqual([m.message_id for m in (yield store.pending("bob", 0, 10))], [mid(2)])

    @inlineCallbacks
    def test_delete_unknown(self):
        store = yield self.makeStore()
        self.assertIs((yield store.delete("bob", mid(1), NOW)), False)

    @inlineCallbacks
    def test_delete_other_mailbox(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        self.assertIs((yield store.delete("carol", mid(1), NOW)), False)
        self.assertEqual((yield store.count("bob")), 1)

    @inlineCallbacks
    def test_retry_after_delete(self):
        """A retry of an acknowledged message is recognised and not stored again."""
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.delete("bob", mid(1), NOW)
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), False)
        self.assertEqual((yield store.count("bob")), 0)
        self.assertEqual((yield store.pending("bob", 0, 10)), [])

    @inlineCallbacks
    def test_forget_acknowledged(self):
        """
        Ids acknowledged before the cut-off are forgotten (a retry of those is
        a new message again); later ones are still recognised.
        """
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        yield store.delete("bob", mid(1), NOW)
        yield store.delete("bob", mid(2), NOW + 100)
        self.assertEqual((yield store.forget_acknowledged(NOW + 50)), 1)
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), True)
        self.assertIs((yield store.enqueue("bob", "alice", mid(2), env(2), NOW)), False)
        self.assertEqual((yield store.forget_acknowledged(NOW + 50)), 0)

    @inlineCallbacks
    def test_other_envelope_after_delete(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.delete("bob", mid(1), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(1), env(2), NOW), DuplicateId)
        self.assertEqual((yield store.count("bob")), 0)

    # Quota and count

    @inlineCallbacks
    def test_quota_messages(self):
        store = yield self.makeStore(Quota(messages=2, bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3), NOW), MailboxFull)
        self.assertEqual((yield store.count("bob")), 2)
        # A retry of a stored message is still recognised when full.
        self.assertIs((yield store.enqueue("bob", "alice", mid(2), env(2), NOW)), False)
        # The quota is per mailbox.
        self.assertIs((yield store.enqueue("carol", "alice", mid(3), env(3), NOW)), True)
        # Room again once a message is deleted.
        yield store.delete("bob", mid(1), NOW)
        self.assertIs((yield store.enqueue("bob", "alice", mid(3), env(3), NOW)), True)
        self.assertEqual([m.message_id for m in (yield store.pending("bob", 0, 10))],
                         [mid(2), mid(3)])

    @inlineCallbacks
    def test_quota_bytes(self):
        store = yield self.makeStore(Quota(messages=0, bytes=100))
        yield store.enqueue("bob", "alice", mid(1), env(1, 60), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2, 40), NOW)  # exactly 100
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3, 1), NOW),
                                 MailboxFull)
        self.assertEqual((yield store.count("bob")), 2)
        yield store.delete("bob", mid(1), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3, 61), NOW),
                                 MailboxFull)
        self.assertIs((yield store.enqueue("bob", "alice", mid(3), env(3, 60), NOW)), True)

    @inlineCallbacks
    def test_mailbox_full_is_store_error(self):
        store = yield self.makeStore(Quota(messages=1, bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        error = yield self.assertFailure(
            store.enqueue("bob", "alice", mid(2), env(2), NOW), MailboxFull
        )
        self.assertIsInstance(error, StoreError)

    # The cap on what one sender holds in one mailbox

    @inlineCallbacks
    def test_sender_quota_messages(self):
        """
        One sender may hold only so many messages in a mailbox: the others'
        messages, and the sender's to other mailboxes, are not held back,
        and a delivered message makes room.
        """
        store = yield self.makeStore(Quota(0, 0, sender_messages=2, sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        error = yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3), NOW),
                                         SenderQuotaFull)
        self.assertIsInstance(error, StoreError)
        self.assertNotIsInstance(error, MailboxFull)
        self.assertEqual((yield store.count("bob")), 2)
        self.assertIs((yield store.enqueue("bob", "carol", mid(3), env(3), NOW)), True)
        self.assertIs((yield store.enqueue("dave", "alice", mid(3), env(3), NOW)), True)
        yield store.delete("bob", mid(1), NOW)
        self.assertIs((yield store.enqueue("bob", "alice", mid(4), env(4), NOW)), True)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(5), env(5), NOW),
                                 SenderQuotaFull)
        self.assertEqual([(m.sender, m.message_id) for m in (yield store.pending("bob", 0, 10))],
                         [("alice", mid(2)), ("carol", mid(3)), ("alice", mid(4))])

    @inlineCallbacks
    def test_sender_quota_bytes(self):
        store = yield self.makeStore(Quota(0, 0, sender_messages=0, sender_bytes=100))
        yield store.enqueue("bob", "alice", mid(1), env(1, 60), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2, 40), NOW)  # exactly 100
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3, 1), NOW),
                                 SenderQuotaFull)
        self.assertIs((yield store.enqueue("bob", "carol", mid(3), env(3, 100), NOW)), True)
        yield store.delete("bob", mid(1), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(4), env(4, 61), NOW),
                                 SenderQuotaFull)
        self.assertIs((yield store.enqueue("bob", "alice", mid(4), env(4, 60), NOW)), True)

    @inlineCallbacks
    def test_sender_quota_after_retry_and_duplicate_id(self):
        """
        A retry of a message stored or acknowledged is accepted even by a
        sender at its cap, and a reused id is DuplicateId: both are decided
        before the cap.
        """
        store = yield self.makeStore(Quota(0, 0, sender_messages=1, sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.delete("bob", mid(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)  # at the cap again
        self.assertIs((yield store.enqueue("bob", "alice", mid(2), env(2), NOW)), False)
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), False)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(2), env(9), NOW), DuplicateId)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(1), env(9), NOW), DuplicateId)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3), NOW),
                                 SenderQuotaFull)
        self.assertEqual((yield store.count("bob")), 1)

    @inlineCallbacks
    def test_sender_quota_before_mailbox_quota(self):
        """A sender at its own cap hears so even when the mailbox is full too."""
        store = yield self.makeStore(Quota(messages=2, bytes=0, sender_messages=2,
                                           sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3), NOW),
                                 SenderQuotaFull)
        yield self.assertFailure(store.enqueue("bob", "carol", mid(3), env(3), NOW),
                                 MailboxFull)

    @inlineCallbacks
    def test_sender_quota_counts_no_notice(self):
        """
        A notice of expiry names the sender of the message it replaces, but
        is the relay's: it counts for the mailbox, for no sender, and
        acknowledging it frees nothing of the sender's.
        """
        store = yield self.makeStore(Quota(messages=2, bytes=0, sender_messages=1,
                                           sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW - 100)
        yield store.expire(NOW - 50, NOW, "expired", 10)
        (notice,) = yield store.pending("bob", 0, 10)
        self.assertEqual((notice.kind, notice.sender), (wire.NOTICE_EXPIRED, "alice"))
        self.assertIs((yield store.enqueue("bob", "alice", mid(2), env(2), NOW)), True)
        # The notice fills the mailbox's second place.
        yield self.assertFailure(store.enqueue("bob", "carol", mid(3), env(3), NOW),
                                 MailboxFull)
        self.assertIs((yield store.delete("bob", notice.message_id, NOW)), True)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(3), env(3), NOW),
                                 SenderQuotaFull)
        self.assertIs((yield store.enqueue("bob", "carol", mid(3), env(3), NOW)), True)

    @inlineCallbacks
    def test_sender_quota_freed_by_expiry(self):
        store = yield self.makeStore(Quota(0, 0, sender_messages=1, sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW - 100)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(2), env(2), NOW),
                                 SenderQuotaFull)
        yield store.expire(NOW - 50, NOW, "expired", 10)
        self.assertIs((yield store.enqueue("bob", "alice", mid(2), env(2), NOW)), True)

    @inlineCallbacks
    def test_sender_quota_writes_without_waiting(self):
        """Enqueues and deletes asked for at once count in order, for SQLite within one group."""
        store = yield self.makeStore(Quota(0, 0, sender_messages=2, sender_bytes=0))
        results = yield DeferredList([
            store.enqueue("bob", "alice", mid(1), env(1), NOW),
            store.enqueue("bob", "alice", mid(2), env(2), NOW),
            store.enqueue("bob", "alice", mid(3), env(3), NOW),  # over the cap
            store.enqueue("bob", "alice", mid(2), env(2), NOW),  # a retry: accepted
            store.delete("bob", mid(1), NOW),
            store.enqueue("bob", "alice", mid(3), env(3), NOW),  # room again
            store.enqueue("bob", "alice", mid(4), env(4), NOW),  # over the cap
            store.enqueue("bob", "carol", mid(4), env(4), NOW),
        ], consumeErrors=True)
        outcomes = [value if ok else value.type for ok, value in results]
        self.assertEqual(outcomes, [True, True, SenderQuotaFull, False, True, True,
                                    SenderQuotaFull, True])
        # What the group left is what the next one starts from.
        yield self.assertFailure(store.enqueue("bob", "alice", mid(5), env(5), NOW),
                                 SenderQuotaFull)
        yield store.delete("bob", mid(2), NOW)
        self.assertIs((yield store.enqueue("bob", "alice", mid(5), env(5), NOW)), True)

    @inlineCallbacks
    def test_writes_without_waiting(self):
        """
        Writes asked for at once, without waiting for each other, each get
        their own outcome, in the order asked: a refused one changes nothing
        for the others.
        """
        store = yield self.makeStore(Quota(messages=3, bytes=0))
        yield store.enqueue("bob", "alice", mid(0), env(0), NOW)
        results = yield DeferredList([
            store.enqueue("bob", "alice", mid(1), env(1), NOW),  # new
            store.enqueue("bob", "alice", mid(1), env(9), NOW),  # id reused
            store.enqueue("bob", "alice", mid(1), env(1), NOW),  # retry
            store.enqueue("bob", "alice", mid(2), env(2), NOW),  # new: mailbox now full
            store.enqueue("bob", "alice", mid(3), env(3), NOW),  # full
            store.delete("bob", mid(0), NOW),
            store.enqueue("bob", "alice", mid(3), env(3), NOW),  # room again
            store.register_key("alice", KEY_1, NOW),
            store.register_key("alice", KEY_2, NOW),
            store.delete("bob", mid(0), NOW),  # already gone
        ], consumeErrors=True)
        outcomes = [value if ok else value.type for ok, value in results]
        self.assertEqual(outcomes, [
            True, DuplicateId, False, True, MailboxFull, True, True, KEY_1, KEY_1, False,
        ])
        messages = yield store.pending("bob", 0, 10)
        self.assertEqual([(m.message_id, m.envelope) for m in messages],
                         [(mid(n), env(n)) for n in (1, 2, 3)])
        self.assertEqual((yield store.count("bob")), 3)
        self.assertEqual((yield store.get_key("alice")), KEY_1)

    @inlineCallbacks
    def test_enqueue_and_delete_together(self):
        """
        A message stored and deleted by writes asked for at once (one group
        commit, for SQLite) ends as if they were done one after another.
        """
        store = yield self.makeStore()
        results = yield DeferredList([
            store.enqueue("bob", "alice", mid(1), env(1), NOW),
            store.delete("bob", mid(1), NOW),
            store.delete("bob", mid(1), NOW),  # already gone
            store.enqueue("bob", "alice", mid(1), env(1), NOW),  # a retry: recognised
            store.enqueue("bob", "alice", mid(1), env(2), NOW),  # another envelope
            store.enqueue("bob", "alice", mid(2), env(2), NOW),
        ], consumeErrors=True)
        outcomes = [value if ok else value.type for ok, value in results]
        self.assertEqual(outcomes, [True, True, False, False, DuplicateId, True])
        self.assertEqual([m.message_id for m in (yield store.pending("bob", 0, 10))], [mid(2)])
        self.assertEqual((yield store.count("bob")), 1)

    @inlineCallbacks
    def test_many_writes_at_once(self):
        """
        Hundreds of writes asked for at once (more than one statement's worth
        for SQLite, L{sqlite_store.BATCH_ROWS}) keep their order and outcomes.
        """
        store = yield self.makeStore()
        for n in range(150):
            yield store.enqueue(f"r{n % 3}", "alice", mid(n), env(n), NOW)
        writes = [store.delete(f"r{n % 3}", mid(n), NOW) for n in range(150)]
        writes += [store.enqueue(f"r{n % 3}", "alice", mid(n), env(n), NOW)
                   for n in range(100, 400)]
        results = yield gatherResults(writes)
        self.assertEqual(results, [True] * 150 + [False] * 50 + [True] * 250)
        for r in range(3):
            messages = yield store.pending(f"r{r}", 0, 1000)
            self.assertEqual([m.message_id for m in messages],
                             [mid(n) for n in range(150, 400) if n % 3 == r])
            seqs = [m.seq for m in messages]
            self.assertEqual(seqs, sorted(set(seqs)))
            self.assertEqual((yield store.count(f"r{r}")), len(messages))

    @inlineCallbacks
    def test_count(self):
        store = yield self.makeStore()
        self.assertEqual((yield store.count("bob")), 0)
        for n in range(3):
            yield store.enqueue("bob", "alice", mid(n), env(n), NOW)
        yield store.enqueue("carol", "alice", mid(9), env(9), NOW)
        self.assertEqual((yield store.count("bob")), 3)
        self.assertEqual((yield store.count("carol")), 1)
        yield store.delete("bob", mid(0), NOW)
        self.assertEqual((yield store.count("bob")), 2)


    # Expiry

    @inlineCallbacks
    def test_expire_leaves_a_notice(self):
        """
        A message older than the cut-off is replaced, in its mailbox, by a
        notice naming its sender and id; younger ones stay, in order.
        """
        store = yield self.makeStore()
        # Accepted in this order, as the relay's clock went.
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW - 100)
        yield store.enqueue("dave", "alice", mid(3), env(3), NOW - 100)
        yield store.enqueue("bob", "carol", mid(2), env(2), NOW - 10)
        expired = yield store.expire(NOW - 50, NOW, "expired unread after 50 seconds", 100)
        self.assertEqual(sorted((m.recipient, m.sender, m.message_id, m.accepted_at)
                                for m in expired),
                         [("bob", "alice", mid(1), NOW - 100), ("dave", "alice", mid(3), NOW - 100)])
        pending = yield store.pending("bob", 0, 10)
        self.assertEqual([(m.kind, m.sender) for m in pending],
                         [(KIND_MESSAGE, "carol"), (wire.NOTICE_EXPIRED, "alice")])
        notice = pending[1]
        self.assertNotIn(notice.message_id, (mid(1), mid(2), mid(3)))
        self.assertEqual(parse_notice_body(notice.envelope),
                         (mid(1), NOW - 100, "expired unread after 50 seconds"))
        self.assertEqual(notice.frame(), wire.Notice(
            notice.message_id, wire.NOTICE_EXPIRED, "alice", mid(1), NOW - 100,
            "expired unread after 50 seconds"))
        self.assertEqual(pending[0].frame(), wire.Deliver(mid(2), env(2)))
        # The notice is delivered and acknowledged like a message.
        self.assertEqual((yield store.count("bob")), 2)
        self.assertTrue((yield store.delete("bob", notice.message_id, NOW)))
        self.assertEqual((yield store.count("bob")), 1)
        # Notices never expire themselves; a second sweep finds nothing.
        self.assertEqual((yield store.expire(NOW + 10**6, NOW, "x", 100))[0].message_id, mid(2))
        self.assertEqual((yield store.expire(NOW + 10**6, NOW, "x", 100)), [])

    @inlineCallbacks
    def test_expired_retry_recognised(self):
        """A sender retrying an expired message gets "accepted", and nothing is stored."""
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW - 100)
        yield store.expire(NOW, NOW, "expired", 100)
        self.assertIs((yield store.enqueue("bob", "alice", mid(1), env(1), NOW)), False)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(1), env(2), NOW), DuplicateId)
        self.assertEqual([m.kind for m in (yield store.pending("bob", 0, 10))],
                         [wire.NOTICE_EXPIRED])

    @inlineCallbacks
    def test_expire_limit_oldest_first(self):
        store = yield self.makeStore()
        for n in range(5):
            yield store.enqueue("bob", "alice", mid(n), env(n), NOW - 100 + n)
        first = yield store.expire(NOW, NOW, "expired", 2)
        self.assertEqual([m.message_id for m in first], [mid(0), mid(1)])
        rest = yield store.expire(NOW, NOW, "expired", 10)
        self.assertEqual([m.message_id for m in rest], [mid(2), mid(3), mid(4)])


class MemoryStoreTests(StoreTestsMixin, TestCase):
    @inlineCallbacks
    def makeStore(self, quota: Quota = Quota()):
        store = MemoryStore(quota)
        yield store.start()
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def test_sender_usage_forgotten_at_zero(self):
        """A sender with nothing left in a mailbox takes no memory for it."""
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW - 100)
        yield store.enqueue("bob", "carol", mid(2), env(2), NOW)
        self.assertEqual(store._senders, {"bob": {"alice": [1, 40], "carol": [1, 40]}})
        yield store.expire(NOW - 50, NOW, "expired", 10)
        yield store.delete("bob", mid(2), NOW)
        self.assertEqual(store._senders, {})


class QuotaTests(TestCase):
    """The rules both engines apply (L{Quota.refusal}), alone."""

    def test_defaults(self):
        self.assertEqual(Quota(), Quota(messages=10_000, bytes=256 * 1024 * 1024,
                                        sender_messages=1_000, sender_bytes=64 * 1024 * 1024))

    def test_zero_is_no_limit(self):
        big = (10**9, 10**15)
        self.assertIsNone(Quota(0, 0, 0, 0).refusal(big, big, 10**9))
        self.assertIsInstance(Quota(0, 0, 0, 1).refusal(big, (0, 0), 2), SenderQuotaFull)
        self.assertIsInstance(Quota(0, 0, 1, 0).refusal(big, (1, 0), 2), SenderQuotaFull)
        self.assertIsInstance(Quota(0, 1, 0, 0).refusal((0, 0), big, 2), MailboxFull)
        self.assertIsInstance(Quota(1, 0, 0, 0).refusal((1, 0), big, 2), MailboxFull)

    def test_limits_inclusive(self):
        quota = Quota(messages=10, bytes=1000, sender_messages=5, sender_bytes=500)
        self.assertIsNone(quota.refusal((9, 900), (4, 400), 100))
        self.assertIsInstance(quota.refusal((9, 900), (4, 400), 101), SenderQuotaFull)
        self.assertIsInstance(quota.refusal((9, 900), (5, 400), 1), SenderQuotaFull)
        self.assertIsInstance(quota.refusal((9, 901), (4, 400), 100), MailboxFull)
        self.assertIsInstance(quota.refusal((10, 0), (0, 0), 1), MailboxFull)

    def test_refusals_say_no_usage(self):
        """
        What a refusal says goes to the sender: no figure of the mailbox's
        usage (it would tell one sender what the others send).  The figures
        are kept apart, for the relay's log.
        """
        used = (9_876, 123_456_789)
        full = Quota(messages=9_876).refusal(used, (0, 0), 1)
        self.assertNotRegex(str(full), r"\d")
        self.assertIn("9876", full.detail)
        self.assertIn("123456789", full.detail)
        full = Quota(bytes=123_456_800).refusal(used, (0, 0), 12_345)
        self.assertNotRegex(str(full), r"\d")
        self.assertIn("123456789", full.detail)
        capped = Quota(sender_messages=7).refusal(used, (7, 4_321), 1)
        self.assertNotIn("4321", str(capped))
        self.assertIn("4321", capped.detail)


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.path = os.path.join(base, "mailrelay.sqlite")

    @inlineCallbacks
    def makeStore(self, quota: Quota = Quota(), path: str | None = None):
        store = SQLiteStore(path or self.path, quota)
        yield store.start()
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def test_survives_restart(self):
        store = SQLiteStore(self.path)
        yield store.start()
        yield store.register_key("alice", KEY_1, NOW)
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW + 1)
        yield store.delete("bob", mid(1), NOW + 2)
        before = yield store.pending("bob", 0, 10)
        yield store.stop()

        again = yield self.makeStore()
        self.assertEqual((yield again.get_key("alice")), KEY_1)
        self.assertEqual((yield again.count("bob")), 1)
        self.assertEqual((yield again.pending("bob", 0, 10)), before)
        # What was acknowledged before the restart is still recognised.
        self.assertIs((yield again.enqueue("bob", "alice", mid(1), env(1), NOW)), False)
        yield self.assertFailure(again.enqueue("bob", "alice", mid(1), env(9), NOW), DuplicateId)
        # And seq keeps growing.
        yield again.enqueue("bob", "alice", mid(3), env(3), NOW)
        messages = yield again.pending("bob", 0, 10)
        self.assertEqual([m.message_id for m in messages], [mid(2), mid(3)])
        self.assertGreater(messages[1].seq, messages[0].seq)

    @inlineCallbacks
    def test_seq_not_reused_after_restart(self):
        """
        The store numbers messages itself: after a restart it goes on past
        the highest number ever given, even one whose message is gone.
        """
        store = SQLiteStore(self.path)
        yield store.start()
        first = yield store.enqueue_message("bob", "alice", mid(1), env(1), NOW)
        last = yield store.enqueue_message("bob", "alice", mid(2), env(2), NOW)
        yield store.delete("bob", mid(2), NOW)
        yield store.stop()
        again = yield self.makeStore()
        latest = yield again.enqueue_message("bob", "alice", mid(3), env(3), NOW)
        self.assertGreater(last.seq, first.seq)
        self.assertGreater(latest.seq, last.seq)
        # A session whose cursor is at the deleted message still gets the new one.
        self.assertEqual([m.message_id for m in (yield again.pending("bob", last.seq, 10))],
                         [mid(3)])

    @inlineCallbacks
    def test_sender_usage_survives_restart(self):
        store = SQLiteStore(self.path, Quota(0, 0, sender_messages=2, sender_bytes=0))
        yield store.start()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW)
        yield store.stop()
        again = yield self.makeStore(Quota(0, 0, sender_messages=2, sender_bytes=0))
        yield self.assertFailure(again.enqueue("bob", "alice", mid(3), env(3), NOW),
                                 SenderQuotaFull)
        yield again.delete("bob", mid(1), NOW)
        self.assertIs((yield again.enqueue("bob", "alice", mid(3), env(3), NOW)), True)

    @inlineCallbacks
    def test_upgrade_from_schema_4_counts_senders(self):
        """
        Upgrading a database of schema 4 counts, from the messages it holds,
        what each sender holds in each mailbox (the relay's notices for
        nobody): the cap applies to them at once, and the counts then follow
        every write.
        """
        db = sqlite3.connect(self.path)
        for step in range(1, 5):
            db.executescript(sqlite_store.MIGRATIONS[step])
        rows = [("bob", "alice", 1, 10, 0), ("bob", "alice", 2, 20, 0), ("bob", "carol", 3, 30, 0),
                ("dave", "alice", 4, 40, 0), ("bob", "alice", 5, 50, wire.NOTICE_EXPIRED)]
        for recipient, sender, n, size, kind in rows:
            db.execute("INSERT INTO messages (recipient, sender, message_id, digest, envelope,"
                       " size, accepted_at, kind) VALUES (?, ?, ?, x'00', ?, ?, ?, ?)",
                       (recipient, sender, mid(n), env(n, size), size, NOW, kind))
        db.execute("INSERT INTO mailboxes VALUES ('bob', 4, 110), ('dave', 1, 40)")
        db.execute("INSERT INTO meta VALUES ('store_id', 'upgrade-test')")
        db.execute("PRAGMA user_version=4")
        db.commit()
        db.close()
        sqlite_store.preflight(self.path)
        store = yield self.makeStore(Quota(0, 0, sender_messages=3, sender_bytes=0))
        kept, counted = sender_usage_of(self.path)
        self.assertEqual(kept, [("bob", "alice", 2, 30), ("bob", "carol", 1, 30),
                                ("dave", "alice", 1, 40)])
        self.assertEqual(kept, counted)
        # Alice's third in bob's mailbox is her last (the notice is not hers)...
        self.assertIs((yield store.enqueue("bob", "alice", mid(6), env(6), NOW)), True)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(7), env(7), NOW),
                                 SenderQuotaFull)
        # ...until one of those from before the upgrade is delivered.
        yield store.delete("bob", mid(1), NOW)
        yield store.delete("bob", mid(5), NOW)  # the notice: frees nothing of alice's
        self.assertIs((yield store.enqueue("bob", "alice", mid(7), env(7), NOW)), True)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(8), env(8), NOW),
                                 SenderQuotaFull)
        yield store.stop()
        kept, counted = sender_usage_of(self.path)
        self.assertEqual(kept, counted)
        self.assertIn(("bob", "alice", 3, 100), kept)

    @inlineCallbacks
    def test_one_relay_per_store(self):
        """A second store on the same file is refused while the first is open."""
        first = yield self.makeStore()
        second = SQLiteStore(self.path)
        error = yield self.assertFailure(second.start(), StoreError)
        self.assertIn("in use by another mailrelay process", str(error))
        yield second.stop()
        yield first.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield first.stop()
        third = yield self.makeStore()  # free again once the first is closed
        self.assertEqual((yield third.count("bob")), 1)

    @inlineCallbacks
    def test_file_format(self):
        store = SQLiteStore(self.path)
        yield store.start()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.stop()
        connection = sqlite3.connect(self.path)
        try:
            (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            (count,) = connection.execute("SELECT COUNT(*) FROM messages").fetchone()
        finally:
            connection.close()
        self.assertEqual(mode.lower(), "wal")
        self.assertEqual(version, sqlite_store.SCHEMA_VERSION)
        self.assertEqual(count, 1)

    @inlineCallbacks
    def test_durable_commits(self):
        """Each connection commits with synchronous=FULL (2): accepted means on disk."""
        store = yield self.makeStore()
        self.assertEqual((yield store._pool.runQuery("PRAGMA synchronous")), [(2,)])

    @inlineCallbacks
    def test_newer_schema_refused(self):
        connection = sqlite3.connect(self.path)
        connection.execute(f"PRAGMA user_version={sqlite_store.SCHEMA_VERSION + 1}")
        connection.commit()
        connection.close()
        store = SQLiteStore(self.path)
        yield self.assertFailure(store.start(), StoreError)
        # Refused, not touched.
        version, tables = schema_of(self.path)
        self.assertEqual(version, sqlite_store.SCHEMA_VERSION + 1)
        self.assertEqual(tables, [])

    @inlineCallbacks
    def test_not_a_database(self):
        with open(self.path, "wb") as f:
            f.write(b"this is not an SQLite database" * 100)
        store = SQLiteStore(self.path)
        yield self.assertFailure(store.start(), StoreError)

    @inlineCallbacks
    def test_start_twice_on_same_file(self):
        """Starting a store on an up-to-date file changes nothing."""
        first = SQLiteStore(self.path)
        yield first.start()
        yield first.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield first.stop()
        again = yield self.makeStore()
        self.assertEqual((yield again.count("bob")), 1)

    @inlineCallbacks
    def test_stop_after_refused_start(self):
        """
        RelayService.stopService always calls store.stop(), also after
        start() failed: stop must then still fire, not raise.
        """
        connection = sqlite3.connect(self.path)
        connection.execute(f"PRAGMA user_version={sqlite_store.SCHEMA_VERSION + 1}")
        connection.commit()
        connection.close()
        store = SQLiteStore(self.path)
        yield self.assertFailure(store.start(), StoreError)
        yield store.stop()


    @inlineCallbacks
    def test_failed_migration_is_rolled_back(self):
        """
        The migrations are applied "in one transaction at start": a step that
        fails leaves the file as it was, so a fixed mailrelay can start on it.
        """
        migrations = dict(sqlite_store.MIGRATIONS)
        next_version = sqlite_store.SCHEMA_VERSION + 1
        migrations[next_version] = "CREATE TABLE extra (x INTEGER); CREATE TABLE broken ("
        self.patch(sqlite_store, "MIGRATIONS", migrations)
        self.patch(sqlite_store, "SCHEMA_VERSION", next_version)
        yield self.assertFailure(SQLiteStore(self.path).start(), StoreError)

        version, tables = schema_of(self.path)
        self.assertEqual((version, tables), (0, []), "a failed migration left a partial schema")

        migrations[next_version] = "CREATE TABLE extra (x INTEGER)"
        store = yield self.makeStore()
        self.assertEqual((yield store.count("bob")), 0)



class SQLiteFailureTests(TestCase):
    """What the SQLite store does when its file or its disk fails it."""

    def setUp(self):
        base = self.mktemp()
        os.makedirs(base)
        self.path = os.path.join(base, "mailrelay.sqlite")

    @inlineCallbacks
    def test_disk_full_fails_the_write_and_keeps_what_was_stored(self):
        """
        A full disk (SQLITE_FULL, here from a page limit) fails the enqueue
        with a StoreError, never an accept; what was stored stays, and
        writes succeed again once there is room.
        """
        store = SQLiteStore(self.path, Quota(0, 0))
        yield store.start()
        self.addCleanup(store.stop)
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        (pages,) = (yield store._pool.runQuery("PRAGMA page_count"))[0]
        yield store._pool.runQuery(f"PRAGMA max_page_count = {pages + 1}")
        error = yield self.assertFailure(
            store.enqueue("bob", "alice", mid(2), b"x" * 200_000, NOW), StoreError)
        self.assertIn("full", str(error))
        self.assertEqual([m.message_id for m in (yield store.pending("bob", 0, 10))], [mid(1)])
        yield store._pool.runQuery("PRAGMA max_page_count = 1073741823")
        self.assertTrue((yield store.enqueue("bob", "alice", mid(2), b"x" * 200_000, NOW)))

    @inlineCallbacks
    def test_upgrade_from_schema_1_keeps_messages(self):
        """A version 1 database is upgraded in place; its messages are messages."""
        db = sqlite3.connect(self.path)
        db.executescript(sqlite_store.MIGRATIONS[1])
        db.execute("INSERT INTO messages (recipient, sender, message_id, digest, envelope, size,"
                   " accepted_at) VALUES ('bob', 'alice', ?, x'00', ?, 40, ?)",
                   (mid(1), env(1), NOW))
        db.execute("INSERT INTO mailboxes VALUES ('bob', 1, 40)")
        db.execute("PRAGMA user_version=1")
        db.commit()
        db.close()
        sqlite_store.preflight(self.path)
        store = SQLiteStore(self.path)
        yield store.start()
        self.addCleanup(store.stop)
        [message] = yield store.pending("bob", 0, 10)
        self.assertEqual((message.message_id, message.kind), (mid(1), KIND_MESSAGE))
        self.assertEqual(schema_of(self.path)[0], sqlite_store.SCHEMA_VERSION)
        self.assertTrue(os.path.exists(sqlite_store.marker_path(self.path)))


class SQLiteStopTests(TestCase):
    """Stopping waits for writes already asked for: nobody is left waiting."""

    @inlineCallbacks
    def test_stop_commits_queued_writes(self):
        path = os.path.join(self.mktemp() + "-dir", "stop.sqlite")
        os.makedirs(os.path.dirname(path))
        store = SQLiteStore(path, Quota(0, 0))
        yield store.start()
        writes = [store.enqueue("b", "a", bytes([i]) * 16, b"envelope %d" % i, 1)
                  for i in range(3)]
        yield store.stop()
        self.assertEqual([w.called for w in writes], [True, True, True])
        results = yield gatherResults(writes)
        self.assertEqual(results, [True, True, True])
        again = SQLiteStore(path, Quota(0, 0))
        yield again.start()
        self.addCleanup(again.stop)
        count = yield again.count("b")
        self.assertEqual(count, 3)


class SQLiteUsageTests(TestCase):
    """The per-mailbox usage the quota reads stays equal to what is stored."""

    @inlineCallbacks
    def test_usage_follows_enqueues_and_deletes(self):
        path = os.path.join(self.mktemp() + "-dir", "usage.sqlite")
        os.makedirs(os.path.dirname(path))
        store = SQLiteStore(path, Quota(messages=0, bytes=100))
        yield store.start()
        self.addCleanup(store.stop)
        for n in range(4):
            yield store.enqueue("b", "a", bytes([n]) * 16, b"x" * 25, 1)
        # 100 bytes used: one more byte is over the quota...
        yield self.assertFailure(store.enqueue("b", "a", b"\x09" * 16, b"y", 1), MailboxFull)
        # ...until a delivered message frees its 25 bytes.
        yield store.delete("b", b"\x00" * 16, 2)
        self.assertTrue((yield store.enqueue("b", "a", b"\x09" * 16, b"y" * 25, 1)))
        self.assertEqual((yield store.count("b")), 4)
        yield store.stop()
        db = sqlite3.connect(path)
        try:
            actual = db.execute(
                "SELECT COUNT(*), SUM(size) FROM messages WHERE recipient = 'b'").fetchone()
            kept = db.execute(
                "SELECT messages, bytes FROM mailboxes WHERE recipient = 'b'").fetchone()
        finally:
            db.close()
        self.assertEqual(actual, (4, 100))
        self.assertEqual(kept, actual)

    @inlineCallbacks
    def test_sender_usage_follows_every_write(self):
        """
        The per-sender counts kept stay equal to what is stored, through
        enqueues, deletes and expiry, in one group or many; a sender with
        nothing left in a mailbox keeps no row.
        """
        path = os.path.join(self.mktemp() + "-dir", "senders.sqlite")
        os.makedirs(os.path.dirname(path))
        store = SQLiteStore(path, Quota(0, 0, 0, 0))
        yield store.start()
        self.addCleanup(store.stop)
        writes = []
        for n in range(200):
            writes.append(store.enqueue(f"r{n % 3}", f"s{n % 7}", mid(n), env(n, 20 + n),
                                        NOW - 1000 + n))
            if n % 5 == 4:
                writes.append(store.delete(f"r{(n - 4) % 3}", mid(n - 4), NOW))
        yield gatherResults(writes)
        yield store.expire(NOW - 900, NOW, "expired", 50)
        for n in range(150, 200):
            yield store.delete(f"r{n % 3}", mid(n), NOW)
        yield store.stop()
        kept, counted = sender_usage_of(path)
        self.assertEqual(kept, counted)
        self.assertEqual(len(kept), 21)  # every (recipient, sender) still holds something
        again = SQLiteStore(path, Quota(0, 0, 0, 0))
        yield again.start()
        self.addCleanup(again.stop)
        for n in range(200):
            yield again.delete(f"r{n % 3}", mid(n), NOW)
        yield again.stop()
        kept, counted = sender_usage_of(path)
        self.assertEqual((kept, counted), ([], []))


class PreflightTests(TestCase):
    """The synchronous check twistd runs before starting on a --data directory."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "mailrelay.sqlite")

    def test_missing_file_is_fine(self):
        sqlite_store.preflight(self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_not_a_database(self):
        with open(self.path, "w") as f:
            f.write("hello")
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn("not a database", str(e))

    def test_newer_schema(self):
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version={sqlite_store.SCHEMA_VERSION + 1}")
        db.close()
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn("newer than this mailrelay knows", str(e))

    @inlineCallbacks
    def test_current_schema(self):
        store = SQLiteStore(self.path)
        yield store.start()
        yield store.stop()
        sqlite_store.preflight(self.path)

    @inlineCallbacks
    def filled(self, count: int = 200) -> None:
        """A stopped store at C{self.path} holding C{count} messages."""
        store = SQLiteStore(self.path, Quota(0, 0))
        yield store.start()
        for n in range(count):
            yield store.enqueue("bob", "alice", mid(n), env(n, 2000), NOW)
        yield store.stop()

    @inlineCallbacks
    def test_path_with_uri_characters(self):
        """A data directory named with '?' or '#' is checked where it is, not elsewhere."""
        odd = os.path.join(self.dir, "q?x#y")
        os.makedirs(odd)
        path = os.path.join(odd, "mailrelay.sqlite")
        store = SQLiteStore(path)
        yield store.start()
        yield store.stop()
        sqlite_store.preflight(path)
        with open(path, "r+b") as f:
            f.truncate(10)
        self.assertRaises(StoreError, sqlite_store.preflight, path)
        self.assertEqual(sorted(os.listdir(self.dir)), ["q?x#y"])

    @inlineCallbacks
    def test_missing_database_with_marker_refused(self):
        """A directory that held a store and lost it is not started empty."""
        yield self.filled(1)
        os.remove(self.path)
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn(f"the message store {self.path} is missing", str(e))
        self.assertIn("Restore the file from a backup", str(e))
        self.assertFalse(os.path.exists(self.path))
        # Removing the marker is the way to start empty on purpose.
        os.remove(sqlite_store.marker_path(self.path))
        sqlite_store.preflight(self.path)

    @inlineCallbacks
    def test_truncated_database_refused(self):
        yield self.filled()
        size = os.path.getsize(self.path)
        with open(self.path, "r+b") as f:
            f.truncate(size // 2)
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn(self.path, str(e))
        self.assertIn("backup", str(e))

    @inlineCallbacks
    def test_emptied_database_refused(self):
        """A file truncated to nothing reads as an empty database: the marker catches it."""
        yield self.filled(1)
        open(self.path, "wb").close()
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn("has no store id", str(e))

    @inlineCallbacks
    def test_corrupt_page_refused(self):
        """Bytes overwritten inside the file: SQLite's integrity check fails it."""
        yield self.filled()
        with open(self.path, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\xa5" * 4096 * 4)
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn(self.path, str(e))

    @inlineCallbacks
    def test_other_store_refused(self):
        """Another relay's database put in place of ours is refused."""
        yield self.filled(1)
        other = os.path.join(self.dir, "other.sqlite")
        store = SQLiteStore(other)
        yield store.start()
        yield store.stop()
        os.replace(other, self.path)
        e = self.assertRaises(StoreError, sqlite_store.preflight, self.path)
        self.assertIn("was replaced or emptied", str(e))
        store = SQLiteStore(self.path)
        yield self.assertFailure(store.start(), StoreError)


# Found by mutation testing (make mutation-test): checks no test above guarded.

class StoreEdgesMixin:
    """Expiry and forgetting at their exact times; both engines."""

    @inlineCallbacks
    def test_expiry_at_exactly_its_time(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        self.assertEqual((yield store.expire(NOW, NOW + 1, "expired", 10)), [])
        [gone] = yield store.expire(NOW + 1, NOW + 1, "expired", 10)
        self.assertEqual(gone.message_id, mid(1))

    @inlineCallbacks
    def test_expiry_stops_at_the_first_young_message(self):
        """The clock stepped back between two sends: the older waits a sweep (late, never early)."""
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "alice", mid(2), env(2), NOW - 40 * 86400)
        self.assertEqual((yield store.expire(NOW - 30 * 86400, NOW, "expired", 10)), [])
        self.assertEqual((yield store.count("bob")), 2)

    @inlineCallbacks
    def test_ids_forgotten_strictly_before(self):
        store = yield self.makeStore()
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.delete("bob", mid(1), NOW)
        self.assertEqual((yield store.forget_acknowledged(NOW)), 0)
        # Still known: a late retry of the same message is not stored again.
        self.assertFalse((yield store.enqueue("bob", "alice", mid(1), env(1), NOW + 1)))
        self.assertEqual((yield store.forget_acknowledged(NOW + 1)), 1)


    @inlineCallbacks
    def test_expired_message_frees_its_bytes(self):
        """The notice takes the message's place: the mailbox holds the notice's bytes only."""
        store = yield self.makeStore(Quota(messages=0, bytes=1000, sender_messages=0,
                                           sender_bytes=0))
        yield store.enqueue("bob", "alice", mid(1), b"x" * 700, NOW)
        yield self.assertFailure(store.enqueue("bob", "alice", mid(2), b"y" * 500, NOW),
                                 MailboxFull)
        [gone] = yield store.expire(NOW + 1, NOW + 1, "expired", 10)
        self.assertTrue((yield store.enqueue("bob", "alice", mid(2), b"y" * 500, NOW + 1)))


class MemoryStoreEdgeTests(StoreEdgesMixin, TestCase):
    makeStore = MemoryStoreTests.makeStore


class SQLiteStoreEdgeTests(StoreEdgesMixin, TestCase):
    setUp = SQLiteStoreTests.setUp
    makeStore = SQLiteStoreTests.makeStore

    @inlineCallbacks
    def test_quotas_count_what_was_stored_before_a_restart(self):
        quota = Quota(messages=3, bytes=0, sender_messages=0, sender_bytes=0)
        store = yield self.makeStore(quota)
        yield store.enqueue("bob", "alice", mid(1), env(1), NOW)
        yield store.enqueue("bob", "carol", mid(2), env(2), NOW)
        yield store.stop()
        again = yield self.makeStore(quota)
        self.assertTrue((yield again.enqueue("bob", "dave", mid(3), env(3), NOW)))
        yield self.assertFailure(again.enqueue("bob", "erin", mid(4), env(4), NOW), MailboxFull)

    @inlineCallbacks
    def test_byte_quotas_count_what_was_stored_before_a_restart(self):
        for quota, refusal in ((Quota(messages=0, bytes=100, sender_messages=0,
                                      sender_bytes=0), MailboxFull),
                               (Quota(messages=0, bytes=0, sender_messages=0,
                                      sender_bytes=100), SenderQuotaFull)):
            base = self.mktemp()
            os.makedirs(base)
            path = os.path.join(base, "restart.sqlite")
            store = yield self.makeStore(quota, path)
            yield store.enqueue("bob", "alice", mid(1), b"x" * 60, NOW)
            yield store.stop()
            again = yield self.makeStore(quota, path)
            yield self.assertFailure(again.enqueue("bob", "alice", mid(2), b"y" * 60, NOW),
                                     refusal)
            self.assertTrue((yield again.enqueue("bob", "alice", mid(3), b"z" * 40, NOW)))


class SQLiteGroupOrderTests(TestCase):
    setUp = SQLiteStoreTests.setUp
    makeStore = SQLiteStoreTests.makeStore

    @inlineCallbacks
    def test_writes_sharing_a_commit_keep_their_order(self):
        """A sweep asked for after a send, in the same commit, sees that send."""
        store = yield self.makeStore()
        first = store.enqueue("bob", "alice", mid(1), env(1), NOW)
        second = store.enqueue("bob", "alice", mid(2), env(2), NOW)  # with the sweep, once
        swept = store.expire(NOW + 1, NOW + 1, "expired", 10)        # the first commit is done
        yield first
        yield second
        expired = yield swept
        self.assertEqual(sorted(m.message_id for m in expired), [mid(1), mid(2)])
