"""
A model-based test of L{mailrelay.relay.mailbox.Mailboxes} over each store.

The example-based tests pin down single behaviours; the promises the relay
makes to its users are about sequences ("never loses an accepted message",
"delivers in order", "never redelivers an acknowledged one"), whose bugs
show only after some particular interleaving of sends, retries, sessions
coming and going, acknowledgements and restarts.  Hypothesis generates such
interleavings against a deliberately simple model (per mailbox: the
accepted, unacknowledged ids in acceptance order, and the acknowledged
ones) and shrinks any failure to a short program of rules.

Everything runs synchronously, so after every rule the mailboxes must have
settled: a session must have been pushed exactly the messages the model
says, in acceptance order, filling its window.  The SQLite store runs its
real SQL on a real file; only the thread pool and the reactor its
C{adbapi.ConnectionPool} uses are replaced by stand-ins that run work at
once in the calling thread, as Twisted's own tests of C{adbapi} do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.relay.mailbox import Mailboxes, Outbox
from mailrelay.relay.store import STORE_FILE, DuplicateId, StoredMessage
from mailrelay.relay.store.memory import MemoryStore
from mailrelay.relay.store.sqlite import SQLiteStore

NOW = 1_700_000_000
RECIPIENTS = ("bob", "carol")
SENDER = "alice"
OTHER_SENDER = "mallory"
ID_SPACE = 64
"""Message ids are 0 .. ID_SPACE-1; ID_SPACE itself is never used (an unknown id)."""
MAX_WINDOW = 4
"""Small windows, so that runs keep messages waiting behind a full window."""

SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None)
"""
About 4 s for the memory store and 8 s for SQLite on a 2-core machine (the
SQLite run is dominated by its durable, synchronous=FULL, commits).  Fewer
examples stop catching some deliberately planted bugs (a delete that ignores
the mailbox, a window one too wide) on every run.
"""


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def number(message_id: bytes) -> int:
    return int.from_bytes(message_id, "big")


def envelope(n: int, variant: int = 0) -> bytes:
    """
    A stand-in envelope for id C{n} (neither the mailboxes nor the store
    parse it).  It does not depend on the recipient: the same id and bytes
    in two mailboxes are two messages, and must stay apart.
    """
    return b"envelope %d, variant %d" % (n, variant)


def fired(d: Deferred):
    """
    The result of C{d}, which must have fired already: a Deferred left
    waiting would mean the run is no longer deterministic.
    """
    results: list = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred) -> Failure:
    """The failure C{d} has already fired with."""
    results: list = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired")
    if not isinstance(results[0], Failure):
        raise AssertionError(f"{d!r} fired with {results[0]!r}, not a failure")
    return results[0]


class ImmediateThreadPool:
    """
    Stands in for the pool's C{ThreadPool}: runs each piece of work at once,
    in the calling thread.  With one connection per pool (C{cp_max=1}) the
    store already runs its work one piece at a time, so only the threads go.
    """

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except Exception:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ImmediateReactor:
    """
    What C{adbapi.ConnectionPool} asks of its reactor.  Nothing starts the
    pool for it (L{SQLiteStore.start} does) and nothing shuts it down (the
    store's C{stop} does); results come back to the caller at once.
    """

    def callWhenRunning(self, f, *args, **kwargs):
        return None

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        return (phase, event, f)

    def removeSystemEventTrigger(self, handle) -> None:
        pass

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


def synchronous_sqlite_store(path: str) -> SQLiteStore:
    """A real L{SQLiteStore} on C{path} whose Deferreds all fire before they are returned."""
    store = SQLiteStore(path, reactor=ImmediateReactor())
    store._pool.threadpool = ImmediateThreadPool()
    return store


class Session:
    """
    One connected session of a recipient, as the relay's session would be:
    an L{Outbox} whose C{push} records what it was sent.
    """

    def __init__(self, recipient: str) -> None:
        self.recipient = recipient
        self.outbox = Outbox(recipient, self.push)
        self.received: list[StoredMessage] = []
        self.expected: list[int] = []
        """The ids the model says this session must have been pushed, in order."""
        self.acked: set[int] = set()
        self.ended_with: int | None = None
        """How many messages it had received when it ended; None while live."""

    def push(self, message: StoredMessage) -> None:
        self.received.append(message)

    def in_flight(self) -> list[int]:
        return [n for n in self.expected if n not in self.acked]


class MailboxMachine(RuleBasedStateMachine):
    """
    The relay's mailboxes, driven rule by rule and compared with the model.
    Subclasses say which store, and whether restarting reopens it; C{case}
    is the test running the machine, whose assertions it makes (they hold
    under C{python -O} too, unlike C{assert}).
    """

    case: SynchronousTestCase

    def open_store(self):
        raise NotImplementedError

    def reopen_store(self) -> None:
        """What a restart does to the store (nothing for a store in memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = self.open_store()
        fired(self.store.start())
        self.mailboxes: Mailboxes | None = None
        # The model.
        self.pending: dict[str, list[int]] = {r: [] for r in RECIPIENTS}
        """Accepted, unacknowledged ids of each mailbox, in acceptance order."""
        self.accepted: dict[str, dict[int, tuple[str, bytes]]] = {r: {} for r in RECIPIENTS}
        """Every id ever accepted into each mailbox, with its sender and envelope."""
        self.acked: dict[str, set[int]] = {r: set() for r in RECIPIENTS}
        self.sessions: dict[str, Session] = {}
        self.ended: list[Session] = []
        self.accepted_since_start = 0
        self.sessions_since_start: list[Session] = []

    def teardown(self) -> None:
        fired(self.store.stop())

    def start_mailboxes(self, window: int) -> None:
        self.window = window
        self.mailboxes = Mailboxes(self.store, self.clock, window=window)
        self.accepted_since_start = 0
        self.sessions_since_start = []

    def end(self, session: Session) -> None:
        session.ended_with = len(session.received)
        self.ended.append(session)

    def settle(self, session: Session) -> None:
        """
        Extend what C{session} must have received: the mailbox's messages it
        has not yet been pushed, oldest first, as long as its window has room.
        """
        pushed = set(session.expected)
        waiting = [n for n in self.pending[session.recipient] if n not in pushed]
        room = self.window - len(session.in_flight())
        session.expected.extend(waiting[: max(room, 0)])

    # Rules

    @initialize(window=st.integers(1, MAX_WINDOW))
    def start(self, window):
        self.start_mailboxes(window)

    @rule(data=st.data(), recipient=st.sampled_from(RECIPIENTS))
    def accept_new(self, data, recipient):
        """A message with an id new to its mailbox is stored: True."""
        free = [n for n in range(ID_SPACE) if n not in self.accepted[recipient]]
        if not free:
            return
        # Half the time one of the lowest free ids, so that both mailboxes
        # often hold the same id; else any, so that ids are out of order.
        n = data.draw(st.sampled_from(free[:3]) | st.sampled_from(free), label="id")
        result = fired(self.mailboxes.accept(recipient, SENDER, mid(n), envelope(n)))
        self.case.assertIs(result, True, f"accepting new id {n} for {recipient}")
        self.accepted[recipient][n] = (SENDER, envelope(n))
        self.pending[recipient].append(n)
        self.accepted_since_start += 1

    @precondition(lambda self: any(self.accepted.values()))
    @rule(data=st.data())
    def accept_retry(self, data):
        """
        The very same message again (a sender whose answer was lost),
        pending or already acknowledged: nothing new is stored, False.
        """
        recipient = data.draw(
            st.sampled_from([r for r in RECIPIENTS if self.accepted[r]]), label="recipient")
        n = data.draw(st.sampled_from(sorted(self.accepted[recipient])), label="id")
        sender, sealed = self.accepted[recipient][n]
        result = fired(self.mailboxes.accept(recipient, sender, mid(n), sealed))
        self.case.assertIs(result, False, f"a retry of id {n} for {recipient}")

    @precondition(lambda self: any(self.accepted.values()))
    @rule(data=st.data(), change=st.sampled_from(["envelope", "sender"]))
    def accept_conflict(self, data, change):
        """An id already used in the mailbox, with other bytes or from someone else: refused."""
        recipient = data.draw(
            st.sampled_from([r for r in RECIPIENTS if self.accepted[r]]), label="recipient")
        n = data.draw(st.sampled_from(sorted(self.accepted[recipient])), label="id")
        sender, sealed = self.accepted[recipient][n]
        if change == "envelope":
            d = self.mailboxes.accept(recipient, sender, mid(n), envelope(n, variant=1))
        else:
            d = self.mailboxes.accept(recipient, OTHER_SENDER, mid(n), sealed)
        failure_of(d).trap(DuplicateId)

    @rule(recipient=st.sampled_from(RECIPIENTS))
    def connect(self, recipient):
        """
        A session of the recipient authenticates.  It displaces the one
        already connected, which the relay then closes (and detaches, which
        must not disturb the new one).
        """
        session = Session(recipient)
        old = self.sessions.get(recipient)
        previous = self.mailboxes.attach(session.outbox)
        self.case.assertIs(previous, old.outbox if old else None,
                           "attach gave back another session than the one connected")
        self.sessions[recipient] = session
        self.sessions_since_start.append(session)
        if old is not None:
            self.end(old)
            self.mailboxes.detach(old.outbox)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def disconnect(self, data):
        recipient = data.draw(st.sampled_from(sorted(self.sessions)), label="recipient")
        session = self.sessions.pop(recipient)
        self.end(session)
        self.mailboxes.detach(session.outbox)

    @precondition(lambda self: any(s.in_flight() for s in self.sessions.values()))
    @rule(data=st.data())
    def ack(self, data):
        """The session acknowledges a message it was delivered: deleted, True."""
        recipient = data.draw(st.sampled_from(
            [r for r, s in sorted(self.sessions.items()) if s.in_flight()]), label="recipient")
        session = self.sessions[recipient]
        n = data.draw(st.sampled_from(session.in_flight()), label="id")
        result = fired(self.mailboxes.acknowledge(session.outbox, mid(n)))
        self.case.assertIs(result, True, f"acknowledging delivered id {n}")
        session.acked.add(n)
        self.pending[recipient].remove(n)
        self.acked[recipient].add(n)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def ack_not_in_flight(self, data):
        """
        The session acknowledges an id it holds no delivery of: never used,
        another mailbox's, already acknowledged, or waiting behind the
        window.  Nothing is deleted, and it fires False.
        """
        recipient = data.draw(st.sampled_from(sorted(self.sessions)), label="recipient")
        session = self.sessions[recipient]
        in_flight = set(session.in_flight())
        known = {n for r in RECIPIENTS for n in self.accepted[r]} | {ID_SPACE}
        n = data.draw(st.sampled_from(sorted(known - in_flight)), label="id")
        result = fired(self.mailboxes.acknowledge(session.outbox, mid(n)))
        self.case.assertIs(result, False, f"acknowledging id {n}, not in flight")

    @rule(window=st.integers(1, MAX_WINDOW))
    def restart(self, window):
        """
        The relay stops and starts again: every session is gone, the
        mailboxes' state with them; only the store remains (reopened on
        the same file, for SQLite).
        """
        for session in self.sessions.values():
            self.end(session)
        self.sessions.clear()
        self.mailboxes = None
        self.reopen_store()
        self.start_mailboxes(window)

    @rule(seconds=st.integers(0, 3600))
    def tick(self, seconds):
        """Time passes: anything the mailboxes scheduled runs."""
        self.clock.advance(seconds)

    # What must hold after every rule

    @invariant()
    def sessions_get_what_the_model_says(self):
        if self.mailboxes is None:
            return
        for recipient, session in sorted(self.sessions.items()):
            self.settle(session)
            got = [number(m.message_id) for m in session.received]
            self.case.assertEqual(
                got, session.expected,
                f"{recipient}'s session was pushed {got}, expected {session.expected} "
                f"(mailbox {self.pending[recipient]}, acknowledged {sorted(self.acked[recipient])}, "
                f"window {self.window})"
            )
            for m in session.received:
                n = number(m.message_id)
                self.case.assertEqual(m.recipient, recipient, m)
                self.case.assertEqual((m.sender, m.envelope), self.accepted[recipient][n], m)
            self.case.assertLessEqual(len(session.in_flight()), self.window)
            self.case.assertEqual(sorted(map(number, session.outbox.in_flight)),
                                  sorted(session.in_flight()))
        for session in self.ended:
            self.case.assertEqual(
                len(session.received), session.ended_with,
                f"a session of {session.recipient} that had ended was pushed "
                f"{[number(m.message_id) for m in session.received[session.ended_with:]]}"
            )

    @invariant()
    def store_matches_the_model(self):
        for recipient in RECIPIENTS:
            count = fired(self.store.count(recipient))
            self.case.assertEqual(
                count, len(self.pending[recipient]),
                f"store counts {count} for {recipient}, model {self.pending[recipient]}")
            stored = fired(self.store.pending(recipient, 0, ID_SPACE + 1))
            self.case.assertEqual(
                [number(m.message_id) for m in stored], self.pending[recipient],
                f"store holds {[number(m.message_id) for m in stored]} for {recipient}, "
                f"model {self.pending[recipient]}"
            )
            seqs = [m.seq for m in stored]
            self.case.assertEqual(seqs, sorted(set(seqs)), "seqs out of order or repeated")

    @invariant()
    def totals_add_up(self):
        if self.mailboxes is None:
            return
        self.case.assertEqual(self.mailboxes.accepted_total, self.accepted_since_start)
        pushed = sum(len(s.received) for s in self.sessions_since_start)
        self.case.assertEqual(self.mailboxes.delivered_total, pushed, "delivered total")


class MemoryStoreMachine(MailboxMachine):
    def open_store(self):
        return MemoryStore()


class SQLiteStoreMachine(MailboxMachine):
    base_directory: str | None = None

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="mailbox-model-", dir=self.base_directory)
        self.path = os.path.join(self.directory, STORE_FILE)
        super().__init__()

    def open_store(self):
        return synchronous_sqlite_store(self.path)

    def reopen_store(self) -> None:
        fired(self.store.stop())
        self.store = self.open_store()
        fired(self.store.start())

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class MailboxModelTests(SynchronousTestCase):
    def check(self, machine) -> None:
        """
        Run C{machine}; on failure, report the steps that lead to it.
        Hypothesis attaches those steps to the exception as notes, which
        trial does not print: the failure message carries them instead.
        """
        checked = type(machine.__name__, (machine,), {"case": self})
        try:
            run_state_machine_as_test(checked, settings=SETTINGS)
        except Exception as e:
            raise self.failureException("".join(traceback.format_exception(e))) from None

    def test_memory_store(self):
        self.check(MemoryStoreMachine)

    def test_sqlite_store(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)

        class Machine(SQLiteStoreMachine):
            base_directory = base

        self.check(Machine)

    def test_synchronous_sqlite_store(self):
        """
        The stand-ins make the real store answer at once, commits included,
        and a reopened store sees what was committed.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, STORE_FILE)
        store = synchronous_sqlite_store(path)
        fired(store.start())
        self.assertIs(fired(store.enqueue("bob", SENDER, mid(1), envelope(1), NOW)), True)
        self.assertIs(fired(store.enqueue("bob", SENDER, mid(1), envelope(1), NOW)), False)
        fired(store.stop())
        again = synchronous_sqlite_store(path)
        fired(again.start())
        self.addCleanup(lambda: fired(again.stop()))
        self.assertEqual(fired(again.count("bob")), 1)
