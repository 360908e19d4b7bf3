"""
The mailboxes over the real SQLite store whose thread and reactor are
stand-ins under the test's control, so that reads, group commits and
their callbacks interleave with sessions, acks, pauses, expiry and failures
in every order the real relay allows (one DB thread running jobs FIFO,
results delivered to the reactor FIFO).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import traceback

from hypothesis import settings, HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.relay import mailbox as mailbox_module
from mailrelay.relay.mailbox import Mailboxes, Outbox
from mailrelay.relay.store import STORE_FILE, DuplicateId, MailboxFull, StoreError
from mailrelay.relay.store.base import Quota
from mailrelay.relay.store import sqlite as sqlite_module
from mailrelay.relay.store.sqlite import SQLiteStore

NOW = 1_700_000_000
RECIPIENTS = ("bob", "carol")
SENDERS = ("alice", "dave")

SETTINGS = settings(max_examples=int(os.environ.get("EXAMPLES", "150")),
                    stateful_step_count=int(os.environ.get("STEPS", "80")),
                    deadline=None, suppress_health_check=list(HealthCheck))


class Controlled:
    """The DB thread (jobs, FIFO) and the reactor's callFromThread queue."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.calls: list = []
        self.fail_next = False

    # thread pool
    def start(self):
        pass

    def stop(self):
        pass

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.jobs.append((onResult, f, args, kwargs))

    # reactor
    def callWhenRunning(self, f, *a, **k):
        return None

    def addSystemEventTrigger(self, *a, **k):
        return None

    def removeSystemEventTrigger(self, h):
        pass

    def callFromThread(self, f, *args, **kwargs):
        self.calls.append((f, args, kwargs))

    def run_job(self) -> None:
        onResult, f, args, kwargs = self.jobs.pop(0)
        fail, self.fail_next = self.fail_next, False
        try:
            if fail and args and args[0] is sqlite_module._run_group:
                interaction = args[0]

                def failing(txn, *a, **k):
                    interaction(txn, *a, **k)
                    raise sqlite3.OperationalError("database or disk is full")

                result = f(failing, *args[1:], **kwargs)
            elif fail:
                raise sqlite3.OperationalError("disk I/O error")
            else:
                result = f(*args, **kwargs)
        except Exception:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def run_call(self) -> None:
        f, args, kwargs = self.calls.pop(0)
        f(*args, **kwargs)

    def drain(self) -> None:
        while self.jobs or self.calls:
            if self.calls:
                self.run_call()
            else:
                self.run_job()


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Session:
    def __init__(self, recipient: str, machine) -> None:
        self.recipient = recipient
        self.machine = machine
        self.outbox = Outbox(recipient, self.push)
        self.received: list = []
        self.ended = False
        self.paused = False
        self.acked: set[bytes] = set()
        self.owed: set[bytes] = set()  # acked, but the delete failed: stays stored
        self.pause_inside_push = False
        self.ack_inside_push = False

    def push(self, message) -> None:
        case = self.machine.case
        case.assertFalse(self.ended, f"pushed {message.message_id.hex()} to an ended session")
        case.assertFalse(self.paused, f"pushed {message.message_id.hex()} to a paused session")
        if self.received:
            case.assertGreater(
                message.seq, self.received[-1].seq,
                f"{self.recipient}: pushed seq {message.seq} after seq {self.received[-1].seq}"
                f" (received {[m.seq for m in self.received]})")
        self.received.append(message)
        if self.pause_inside_push:
            self.pause_inside_push = False
            self.paused = True
            self.machine.mailboxes.pause(self.outbox)
        if self.ack_inside_push and self.outbox.in_flight:
            self.ack_inside_push = False
            first = next(iter(self.outbox.in_flight))
            self.acked.add(first)
            d = self.machine.mailboxes.acknowledge(self.outbox, first)
            d.addErrback(lambda f: (f.trap(StoreError), self.owed.add(first)))


class AsyncMachine(RuleBasedStateMachine):
    case: SynchronousTestCase
    """The test running the machine, whose assertions it makes (they hold under python -O)."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="async-model-")
        self.path = os.path.join(self.directory, STORE_FILE)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.ctl = Controlled()
        self.quota = Quota(messages=6, bytes=0)
        self.store = self.open_store()
        self.next_id = 1
        self.sent: dict[tuple[str, bytes], tuple[str, bytes]] = {}
        self.outcomes: dict = {}
        self.sessions: dict[str, Session] = {}
        self.all_sessions: list[Session] = []
        self.seqs: dict[int, tuple[str, bytes]] = {}
        self.accepted: set[tuple[str, bytes]] = set()
        self.deleted: set[tuple[str, bytes]] = set()
        self.expired: set[tuple[str, bytes]] = set()

    def open_store(self):
        store = SQLiteStore(self.path, quota=self.quota, reactor=self.ctl)
        store._pool.threadpool = self.ctl
        d = store.start()
        self.ctl.drain()
        self.case.assertTrue(d.called, "the store did not start")
        return store

    def teardown(self):
        try:
            self.ctl.drain()
            self.store.stop()
            self.ctl.drain()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @initialize(window=st.integers(1, 3), tail=st.integers(1, 4))
    def start(self, window, tail):
        mailbox_module.TAIL_LIMIT = tail
        self.window = window
        self.mailboxes = Mailboxes(self.store, self.clock, window=window)

    # senders

    @rule(recipient=st.sampled_from(RECIPIENTS), sender=st.sampled_from(SENDERS))
    def accept_new(self, recipient, sender):
        n = self.next_id
        self.next_id += 1
        env = b"env %d" % n
        self._accept(recipient, sender, mid(n), env)

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), variant=st.booleans())
    def accept_again(self, data, variant):
        key = data.draw(st.sampled_from(sorted(self.sent)))
        sender, env = self.sent[key]
        if variant:
            env = env + b"!"
        self._accept(key[0], sender, key[1], env, record=not variant)

    def _accept(self, recipient, sender, message_id, env, record=True):
        if record:
            self.sent[recipient, message_id] = (sender, env)
        d = self.mailboxes.accept(recipient, sender, message_id, env)
        key = (recipient, message_id)

        def ok(new):
            if new:
                self.case.assertNotIn(key, self.accepted, "accepted twice as new")
                self.accepted.add(key)

        def bad(f):
            f.trap(DuplicateId, MailboxFull, StoreError)

        d.addCallbacks(ok, bad)

    # the recipient's sessions

    @rule(recipient=st.sampled_from(RECIPIENTS))
    def connect(self, recipient):
        session = Session(recipient, self)
        old = self.sessions.get(recipient)
        self.sessions[recipient] = session
        self.all_sessions.append(session)
        previous = self.mailboxes.attach(session.outbox)
        self.case.assertIs(previous, old.outbox if old else None,
                           "attach gave back another session than the one connected")
        if old is not None:
            old.ended = True
            self.mailboxes.detach(old.outbox)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def disconnect(self, data):
        recipient = data.draw(st.sampled_from(sorted(self.sessions)))
        session = self.sessions.pop(recipient)
        session.ended = True
        self.mailboxes.detach(session.outbox)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def pause_or_resume(self, data):
        recipient = data.draw(st.sampled_from(sorted(self.sessions)))
        session = self.sessions[recipient]
        if session.paused:
            session.paused = False
            self.mailboxes.resume(session.outbox)
        else:
            session.paused = True
            self.mailboxes.pause(session.outbox)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), what=st.sampled_from(["pause", "ack"]))
    def arm_inside_push(self, data, what):
        recipient = data.draw(st.sampled_from(sorted(self.sessions)))
        setattr(self.sessions[recipient], what + "_inside_push", True)

    @precondition(lambda self: any(s.outbox.in_flight for s in self.sessions.values()))
    @rule(data=st.data())
    def ack(self, data):
        recipient = data.draw(st.sampled_from(
            sorted(r for r, s in self.sessions.items() if s.outbox.in_flight)))
        session = self.sessions[recipient]
        message_id = data.draw(st.sampled_from(sorted(session.outbox.in_flight)))
        session.acked.add(message_id)
        d = self.mailboxes.acknowledge(session.outbox, message_id)

        def failed(f):
            f.trap(StoreError)
            session.owed.add(message_id)

        def done(r):
            self.deleted.add((recipient, message_id))

        d.addCallbacks(done, failed)

    # the relay's own work

    @rule(seconds=st.sampled_from([1, 5, 60]))
    def tick(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def expire(self):
        d = self.mailboxes.expire(30)
        d.addErrback(lambda f: f.trap(StoreError))

    @precondition(lambda self: self.ctl.jobs)
    @rule(fail=st.booleans())
    def run_job(self, fail):
        self.ctl.fail_next = fail and (len(self.ctl.jobs) % 3 == 0)
        self.ctl.run_job()

    @precondition(lambda self: self.ctl.calls)
    @rule()
    def run_call(self):
        self.ctl.run_call()

    @rule()
    def quiesce(self):
        self.settle()
        for recipient, session in sorted(self.sessions.items()):
            if session.paused:
                continue
            d = self.store.pending(recipient, 0, 1000)
            self.ctl.drain()
            stored = d.result
            owed = session.owed
            wanted = [m for m in stored if m.message_id not in owed]
            got = {m.message_id for m in session.received}
            flags = [m.message_id in got for m in wanted]
            # what it got of the mailbox is a prefix of it...
            self.case.assertEqual(
                flags, sorted(flags, reverse=True),
                f"{recipient}: a message skipped: mailbox seqs {[m.seq for m in wanted]}, "
                f"pushes {[m.seq for m in session.received]}, flags {flags}")
            # ...and it got all of it, or its window is full
            if not all(flags):
                self.case.assertGreaterEqual(
                    len(session.outbox.in_flight), self.window,
                    f"{recipient}: stalled: mailbox {[m.seq for m in wanted]}, pushed "
                    f"{[m.seq for m in session.received]}, in flight "
                    f"{len(session.outbox.in_flight)}, window {self.window}")

    def settle(self):
        for _ in range(10):
            self.ctl.drain()
            self.clock.advance(mailbox_module.RETRY_AFTER_STORE_ERROR)
            self.ctl.drain()

    @rule()
    def restart(self):
        self.settle()
        for s in self.sessions.values():
            s.ended = True
        self.sessions.clear()
        d = self.store.stop()
        self.ctl.drain()
        self.ctl = Controlled()
        self.store = self.open_store()
        self.mailboxes = Mailboxes(self.store, self.clock, window=self.window)

    @invariant()
    def seqs_never_reused(self):
        for s in self.all_sessions:
            for m in s.received:
                key = (m.recipient, m.message_id)
                prior = self.seqs.setdefault(m.seq, key)
                self.case.assertEqual(prior, key, f"seq {m.seq} given to two messages")

    @invariant()
    def windows_hold(self):
        for s in self.sessions.values():
            self.case.assertLessEqual(len(s.outbox.in_flight), self.window)


class AsyncModelTests(SynchronousTestCase):
    def setUp(self):
        self.patch(mailbox_module, "TAIL_LIMIT", mailbox_module.TAIL_LIMIT)

    def test_sqlite_interleavings(self):
        machine = type("AsyncMachine", (AsyncMachine,), {"case": self})
        try:
            run_state_machine_as_test(machine, settings=SETTINGS)
        except Exception as e:
            raise self.failureException("".join(traceback.format_exception(e))) from None
        finally:
            self.flushLoggedErrors(sqlite3.OperationalError, StoreError)


from twisted.internet.defer import Deferred
from mailrelay.relay.store.memory import MemoryStore


class DelayedMemoryStore:
    """
    A MemoryStore whose writes take effect at once but whose Deferreds fire
    later (FIFO, through ctl.calls), and whose reads answer later, from a
    separate queue (ctl.jobs), with what the store held when asked or when
    answered: the orders a slower store allows.
    """

    def __init__(self, inner, ctl, snapshot_at_answer):
        self.inner = inner
        self.ctl = ctl
        self.snapshot_at_answer = snapshot_at_answer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _later(self, d):
        out = Deferred()
        results = []
        d.addBoth(results.append)

        def fire():
            r = results[0]
            if isinstance(r, Failure):
                out.errback(r)
            else:
                out.callback(r)

        self.ctl.calls.append((fire, (), {}))
        return out

    def enqueue_message(self, *a):
        if self.ctl.fail_next:
            self.ctl.fail_next = False
            return self._later(Deferred().addCallback(lambda _: None) if False else _failed())
        return self._later(self.inner.enqueue_message(*a))

    def delete(self, *a):
        return self._later(self.inner.delete(*a))

    def expire(self, *a):
        return self._later(self.inner.expire(*a))

    def pending(self, recipient, after, limit):
        out = Deferred()
        asked = []
        self.inner.pending(recipient, after, limit).addCallback(asked.extend)

        def answer(fail=False):
            if fail:
                out.errback(StoreError("read failed"))
                return
            if self.snapshot_at_answer:
                now = []
                self.inner.pending(recipient, after, limit).addCallback(now.extend)
                out.callback(now)
            else:
                out.callback(asked)

        self.ctl.jobs.append((answer, None, (), {}))
        return out


def _failed():
    from twisted.internet.defer import fail
    return fail(StoreError("commit failed"))


class MemoryControlled(Controlled):
    def run_job(self):
        answer, _, _, _ = self.jobs.pop(0)
        fail, self.fail_next = self.fail_next, False
        answer(fail)


class DelayedMemoryMachine(AsyncMachine):
    snapshot_at_answer = False

    def __init__(self):
        super().__init__()
        self.ctl = MemoryControlled()
        self.store = self.open_store()

    def open_store(self):
        if not isinstance(getattr(self, "ctl", None), MemoryControlled):
            return None
        return DelayedMemoryStore(MemoryStore(quota=self.quota), self.ctl,
                                  self.snapshot_at_answer)

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule()
    def restart(self):
        pass


class DelayedMemoryMachineLate(DelayedMemoryMachine):
    snapshot_at_answer = True


class AsyncMemoryModelTests(SynchronousTestCase):
    def setUp(self):
        self.patch(mailbox_module, "TAIL_LIMIT", mailbox_module.TAIL_LIMIT)

    def check(self, machine):
        checked = type(machine.__name__, (machine,), {"case": self})
        try:
            run_state_machine_as_test(checked, settings=SETTINGS)
        except Exception as e:
            raise self.failureException("".join(traceback.format_exception(e))) from None
        finally:
            self.flushLoggedErrors(sqlite3.OperationalError, StoreError)

    def test_reads_snapshot_when_asked(self):
        self.check(DelayedMemoryMachine)

    def test_reads_snapshot_when_answered(self):
        self.check(DelayedMemoryMachineLate)
