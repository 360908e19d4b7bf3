"""
Mailboxes and their delivery loop.

Each recipient has one mailbox in the store and, while connected, one
L{Outbox}: the session's side of delivery.  A L{DeferredSemaphore} per
recipient serialises that recipient's delivery loop, so two things that
wake it at once (a new message and an ack, say) never push the same message
twice or out of order.  The loop pushes queued messages oldest first, keeps
at most C{window} of them unacknowledged, and deletes a message from the
store only when the recipient acknowledges its id.  Messages still
unacknowledged when a session ends stay in the store and go again on the
next session.

A connected recipient that has caught up (the last read of its mailbox
found nothing more) gets what is committed for it afterwards straight from
the commit, in its outbox's C{tail}, without the store being read again.
Nothing falls between the read and the tail: a read sees every commit whose
Deferred fired before it was asked, and the commits that fire while it is
outstanding go to the tail too (those the read also saw are skipped by
C{seq}).  The tail is bounded; past that, or when the relay itself adds to
a mailbox (a notice of expiry), the loop goes back to reading the store.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.relay.store import MailboxStore, StoredMessage

DEFAULT_WINDOW = 64
RETRY_AFTER_STORE_ERROR = 5.0
DEFAULT_TTL = 30 * 86400
"""Seconds a message waits for its recipient before it expires."""
EXPIRE_BATCH = 500
"""Messages expired per transaction: a long backlog never holds the store for long."""
TAIL_LIMIT = 256
"""Messages committed for a connected recipient kept in memory for it, at most."""
TAIL_BYTES = 1024 * 1024
"""Envelope bytes kept in one recipient's tail, at most (beyond: read the store)."""


def describe_duration(seconds: float) -> str:
    """C{2592000} as "30 days", C{90} as "90 seconds": for notices and logs."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def _acknowledged(deleted: bool) -> bool:
    # Deleted now, or gone already (expired, say): acknowledged either way.
    return True


class Outbox:
    """
    The delivery state of one connected session of a recipient.

    C{push} writes one message to the session.  C{in_flight} maps each
    pushed but unacknowledged message id to its C{seq}; C{cursor} is the
    highest C{seq} pushed in this session.  While C{live}, every message
    of the mailbox after C{cursor} is in C{tail}, in seq order (some at or
    before C{cursor}, already pushed, may linger there and are skipped).
    """

    __slots__ = ("recipient", "push", "in_flight", "cursor", "paused", "delivered",
                 "acknowledged", "live", "tail", "reading", "tail_whole", "tail_bytes")

    def __init__(self, recipient: str, push: Callable[[StoredMessage], None]) -> None:
        self.recipient = recipient
        self.push = push
        self.in_flight: dict[bytes, int] = {}
        self.cursor = 0
        self.paused = False
        self.delivered = 0
        self.acknowledged = 0
        self.live = False
        self.tail: deque[StoredMessage] = deque()
        self.reading = False
        self.tail_whole = False
        self.tail_bytes = 0

    def keeps_tail(self) -> bool:
        """Whether messages committed now belong in the tail."""
        return self.live or self.reading

    def forget_tail(self) -> None:
        """Read the store again from C{cursor} on."""
        self.live = False
        self.tail_whole = False
        self.tail.clear()
        self.tail_bytes = 0


class Mailboxes:
    log = Logger()

    def __init__(self, store: MailboxStore, clock, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("the delivery window must be at least 1")
        self.store = store
        self.clock = clock
        self.window = window
        self._outboxes: dict[str, Outbox] = {}
        self._locks: dict[str, DeferredSemaphore] = {}
        self._wanted: set[str] = set()
        self.accepted_total = 0
        self.delivered_total = 0

    def _lock(self, recipient: str) -> DeferredSemaphore:
        lock = self._locks.get(recipient)
        if lock is None:
            lock = self._locks[recipient] = DeferredSemaphore(1)
        return lock

    def attach(self, outbox: Outbox) -> Outbox | None:
        """
        Make C{outbox} the recipient's delivering session and start its
        loop.  Returns the outbox it replaces, if any: the caller closes that
        session; its unacknowledged messages are pushed again here.
        """
        previous = self._outboxes.get(outbox.recipient)
        self._outboxes[outbox.recipient] = outbox
        self.wake(outbox.recipient)
        return previous

    def detach(self, outbox: Outbox) -> None:
        if self._outboxes.get(outbox.recipient) is outbox:
            del self._outboxes[outbox.recipient]
            lock = self._locks.get(outbox.recipient)
            if lock is not None and lock.tokens == lock.limit and not lock.waiting:
                del self._locks[outbox.recipient]

    def connected(self, recipient: str) -> bool:
        return recipient in self._outboxes

    def accept(self, recipient: str, sender: str, message_id: bytes,
               envelope: bytes) -> Deferred[bool]:
        """
        Commit a message to C{recipient}'s mailbox and wake its delivery
        loop.  Fires (True for new, False for a retry of a stored message)
        only after the commit; store failures propagate to the caller.
        """
        d = self.store.enqueue_message(
            recipient, sender, message_id, envelope, int(self.clock.seconds())
        )
        return d.addCallback(self._stored, recipient)

    def _stored(self, message: StoredMessage | None, recipient: str) -> bool:
        if message is not None:
            self.accepted_total += 1
            outbox = self._outboxes.get(recipient)
            if outbox is not None and outbox.keeps_tail():
                size = len(message.envelope)
                if (len(outbox.tail) < TAIL_LIMIT
                        and outbox.tail_bytes + size <= TAIL_BYTES):
                    outbox.tail.append(message)
                    outbox.tail_bytes += size
                else:
                    outbox.forget_tail()
        self.wake(recipient)
        return message is not None

    def wake(self, recipient: str, reread: bool = False) -> None:
        """
        Run the recipient's delivery loop once more, if it is connected.
        Wakes that arrive while a run is already queued fold into it.
        C{reread}: the mailbox changed other than by L{accept}; read it.
        """
        outbox = self._outboxes.get(recipient)
        if outbox is None:
            return
        if reread:
            outbox.forget_tail()
        if recipient in self._wanted:
            return
        lock = self._locks.get(recipient)
        if outbox.live and (lock is None or (lock.tokens and not lock.waiting)):
            # No run holds the lock, and this one would not wait on the
            # store: run it now rather than through the semaphore's Deferreds.
            # A push that fails is the delivery loop's failure, as in a run,
            # not the caller's (a sender whose message did commit, say).
            try:
                self._pushTail(outbox)
            except Exception:
                self._failed(Failure(), recipient)
            return
        self._wanted.add(recipient)
        self._lock(recipient).run(self._deliver, recipient).addErrback(
            self._failed, recipient
        )

    def _pushTail(self, outbox: Outbox) -> None:
        """Push what the tail holds, as the window and the transport allow."""
        tail, in_flight = outbox.tail, outbox.in_flight
        window = self.window
        while tail and not outbox.paused and len(in_flight) < window:
            message = tail.popleft()
            outbox.tail_bytes -= len(message.envelope)
            if message.seq > outbox.cursor:
                self._pushOne(outbox, message)

    def _pushOne(self, outbox: Outbox, message: StoredMessage) -> None:
        outbox.in_flight[message.message_id] = message.seq
        outbox.cursor = message.seq
        outbox.delivered += 1
        self.delivered_total += 1
        outbox.push(message)

    @inlineCallbacks
    def _deliver(self, recipient: str):
        self._wanted.discard(recipient)
        outbox = self._outboxes.get(recipient)
        if outbox is None or outbox.paused:
            return
        if outbox.live:
            self._pushTail(outbox)
            return
        room = self.window - len(outbox.in_flight)
        if room <= 0:
            return
        outbox.forget_tail()  # empty already: the outbox was not live
        outbox.tail_whole = True
        outbox.reading = True
        try:
            messages = yield self.store.pending(recipient, outbox.cursor, room)
            for message in messages:
                # The session may have ended or paused while the store answered,
                # or pause from inside push (a full transport buffer): push only
                # while it can take more.  The cursor moves only past what was
                # pushed, so nothing is skipped.  Commits that fire meanwhile
                # (a push may lead to one) still go to the tail.
                if self._outboxes.get(recipient) is not outbox or outbox.paused:
                    outbox.forget_tail()
                    return
                if message.seq > outbox.cursor:
                    self._pushOne(outbox, message)
        finally:
            outbox.reading = False
        if self._outboxes.get(recipient) is not outbox:
            outbox.forget_tail()
            return
        if len(messages) < room and outbox.tail_whole:
            # The mailbox held nothing more when read, and the tail holds
            # every commit since: from now on, what is committed for this
            # recipient comes to it from the commit (see accept).
            outbox.live = True
            self._pushTail(outbox)
        else:
            outbox.forget_tail()

    def _failed(self, failure, recipient: str) -> None:
        self.log.failure(
            "delivery to {recipient} failed; retrying in {delay} s",
            failure, recipient=recipient, delay=RETRY_AFTER_STORE_ERROR,
        )
        self.clock.callLater(RETRY_AFTER_STORE_ERROR, self.wake, recipient)

    def acknowledge(self, outbox: Outbox, message_id: bytes) -> Deferred[bool]:
        """
        Delete an acknowledged message.  Fires False, deleting nothing, when
        the id is not one this session was delivered and has not yet
        acknowledged.  The window has room again at once: the next message
        goes out while the delete commits (with other writes).
        """
        if outbox.in_flight.pop(message_id, None) is None:
            return succeed(False)
        outbox.acknowledged += 1
        d = self.store.delete(outbox.recipient, message_id, int(self.clock.seconds()))
        self.wake(outbox.recipient)
        return d.addCallback(_acknowledged)

    @inlineCallbacks
    def expire(self, ttl: float):
        """
        Replace every message older than C{ttl} seconds by a notice to its
        recipient, and wake the recipients that are connected so the notice
        goes out at once.  Fires with how many messages expired.
        """
        now = int(self.clock.seconds())
        before = now - int(ttl)
        text = f"expired unread after {describe_duration(ttl)} on the relay"
        total = 0
        while True:
            expired = yield self.store.expire(before, now, text, EXPIRE_BATCH)
            for message in expired:
                self.log.info(
                    "message {id} from {sender} to {recipient} expired unread; "
                    "the recipient gets a notice",
                    id=message.message_id.hex(), sender=message.sender,
                    recipient=message.recipient,
                )
            for recipient in {m.recipient for m in expired}:
                self.wake(recipient, reread=True)
            total += len(expired)
            if len(expired) < EXPIRE_BATCH:
                return total

    def pause(self, outbox: Outbox) -> None:
        outbox.paused = True

    def resume(self, outbox: Outbox) -> None:
        outbox.paused = False
        self.wake(outbox.recipient)
