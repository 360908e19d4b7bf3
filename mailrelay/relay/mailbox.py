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
"""

from __future__ import annotations

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


def describe_duration(seconds: float) -> str:
    """C{2592000} as "30 days", C{90} as "90 seconds": for notices and logs."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


class Outbox:
    """
    The delivery state of one connected session of a recipient.

    C{push} writes one message to the session.  C{in_flight} maps each
    pushed but unacknowledged message id to its C{seq}; C{cursor} is the
    highest C{seq} pushed in this session.
    """

    def __init__(self, recipient: str, push: Callable[[StoredMessage], None]) -> None:
        self.recipient = recipient
        self.push = push
        self.in_flight: dict[bytes, int] = {}
        self.cursor = 0
        self.paused = False
        self.delivered = 0
        self.acknowledged = 0


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

    @inlineCallbacks
    def accept(self, recipient: str, sender: str, message_id: bytes, envelope: bytes):
        """
        Commit a message to C{recipient}'s mailbox and wake its delivery
        loop.  Fires (True for new, False for a retry of a stored message)
        only after the commit; store failures propagate to the caller.
        """
        new = yield self.store.enqueue(
            recipient, sender, message_id, envelope, int(self.clock.seconds())
        )
        if new:
            self.accepted_total += 1
        self.wake(recipient)
        return new

    def wake(self, recipient: str) -> None:
        """
        Run the recipient's delivery loop once more, if it is connected.
        Wakes that arrive while a run is already queued fold into it.
        """
        if recipient not in self._outboxes or recipient in self._wanted:
            return
        self._wanted.add(recipient)
        self._lock(recipient).run(self._deliver, recipient).addErrback(
            self._failed, recipient
        )

    @inlineCallbacks
    def _deliver(self, recipient: str):
        self._wanted.discard(recipient)
        outbox = self._outboxes.get(recipient)
        if outbox is None or outbox.paused:
            return
        room = self.window - len(outbox.in_flight)
        if room <= 0:
            return
        messages = yield self.store.pending(recipient, outbox.cursor, room)
        for message in messages:
            # The session may have ended or paused while the store answered,
            # or pause from inside push (a full transport buffer): push only
            # while it can take more.  The cursor moves only past what was
            # pushed, so nothing is skipped.
            if self._outboxes.get(recipient) is not outbox or outbox.paused:
                return
            outbox.in_flight[message.message_id] = message.seq
            outbox.cursor = message.seq
            outbox.delivered += 1
            self.delivered_total += 1
            outbox.push(message)

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
        acknowledged.
        """
        if outbox.in_flight.pop(message_id, None) is None:
            return succeed(False)
        outbox.acknowledged += 1
        d = self.store.delete(outbox.recipient, message_id, int(self.clock.seconds()))

        def deleted(result):
            # Whether or not the delete committed, the window has room again.
            self.wake(outbox.recipient)
            return True if not isinstance(result, Failure) else result

        return d.addBoth(deleted)

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
                self.wake(recipient)
            total += len(expired)
            if len(expired) < EXPIRE_BATCH:
                return total

    def pause(self, outbox: Outbox) -> None:
        outbox.paused = True

    def resume(self, outbox: Outbox) -> None:
        outbox.paused = False
        self.wake(outbox.recipient)
