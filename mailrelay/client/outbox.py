"""
The client's durable outbox: sealed envelopes waiting for the relay's
"accepted".

A message is sealed and committed here before it is sent, and leaves only
when the relay has accepted it (it then moves to the C{sent} log) or has
refused it for good (it moves to C{failed}, with the reason).  A client that
dies, a relay that is down, an answer that is lost: the envelope stays, and
the next L{flush} sends the very same bytes again, which the relay
recognises and stores once.

The outbox also numbers each sender's messages per recipient (1, 2, 3...)
when they are sealed, inside the same transaction that queues them: the
number is in the signed envelope header, so the recipient can tell when one
is missing.  Messages to one recipient are flushed one at a time, in the order they
were queued (the next only once the relay accepted the one before), and a
refusal that may pass (a full mailbox, a rate limit) holds back the later
ones, so none is ever accepted out of order.  Up to L{FLUSH_WINDOW}
recipients' messages are in flight at once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks

from mailrelay import wire
from mailrelay.client.localdb import open_home_db

E = wire.ErrorCode

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   BLOB NOT NULL UNIQUE,
    recipient    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    envelope     BLOB NOT NULL,
    queued_at    INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE TABLE IF NOT EXISTS sequences (
    recipient    TEXT PRIMARY KEY,
    last_seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    message_id   BLOB PRIMARY KEY,
    recipient    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    queued_at    INTEGER NOT NULL,
    accepted_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failed (
    message_id   BLOB PRIMARY KEY,
    recipient    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    queued_at    INTEGER NOT NULL,
    failed_at    INTEGER NOT NULL,
    reason       TEXT NOT NULL
);
"""

TRANSIENT = {
    # Refusals that may pass: the message stays queued.
    E.MAILBOX_FULL,
    E.STORE_FAILED,
    E.RATE_LIMITED,
    E.SENDER_QUOTA,
}

FLUSH_WINDOW = 32
"""Recipients whose next message is in flight at once: the relay handles as many."""


class OutboxError(Exception):
    """The outbox file cannot be opened or written; the message says what to do."""


@dataclass(frozen=True)
class Queued:
    message_id: bytes
    recipient: str
    seq: int
    envelope: bytes
    queued_at: int
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class FailedMessage:
    message_id: bytes
    recipient: str
    seq: int
    queued_at: int
    failed_at: int
    reason: str


@dataclass
class FlushResult:
    accepted: list[Queued]
    refused: list[tuple[Queued, str]]
    """Refused for good: moved to C{failed}."""
    held: list[tuple[Queued, str]]
    """Still queued, with the reason they were not accepted this time."""
    deferred_by_relay: set[bytes] = field(default_factory=set)
    """Ids of held messages the relay itself refused for now (full mailbox, rate limit)."""


class Outbox:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            db = open_home_db(self.path, SCHEMA,
                              "SELECT position, message_id, envelope FROM outbox LIMIT 1")
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(
                f"cannot read {self.path}: {e}; move it aside to start afresh "
                f"(messages queued in it would not be sent, and your messages would be "
                f"numbered from 1 again, which contacts see as out of order)"
            ) from None
        self._db = db
        self._flushing: Deferred | None = None

    def queue(self, recipient: str, seal: Callable[[int], tuple[bytes, bytes]]) -> Queued:
        """
        Give the next message to C{recipient} its sequence number, seal it
        with C{seal(seq) -> (message_id, envelope)} and commit it to the
        outbox, all in one transaction: a number is used only by a message
        that is queued.
        """
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT last_seq FROM sequences WHERE recipient = ?", (recipient,)
            ).fetchone()
            seq = (0 if row is None else row[0]) + 1
            message_id, sealed = seal(seq)
            now = int(time.time())
            db.execute(
                "INSERT INTO outbox (message_id, recipient, seq, envelope, queued_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (message_id, recipient, seq, sealed, now),
            )
            db.execute(
                "INSERT INTO sequences (recipient, last_seq) VALUES (?, ?)"
                " ON CONFLICT (recipient) DO UPDATE SET last_seq = excluded.last_seq",
                (recipient, seq),
            )
        return Queued(message_id, recipient, seq, sealed, now, 0, None)

    def pending(self) -> list[Queued]:
        """Everything waiting, in the order it was queued."""
        rows = self._db.execute(
            "SELECT message_id, recipient, seq, envelope, queued_at, attempts, last_error"
            " FROM outbox ORDER BY position"
        ).fetchall()
        return [Queued(bytes(m), r, s, bytes(e), q, a, err) for m, r, s, e, q, a, err in rows]

    def failed(self) -> list[FailedMessage]:
        rows = self._db.execute(
            "SELECT message_id, recipient, seq, queued_at, failed_at, reason FROM failed"
            " ORDER BY failed_at, rowid"
        ).fetchall()
        return [FailedMessage(bytes(m), r, s, q, f, why) for m, r, s, q, f, why in rows]

    def sent(self, message_id: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM sent WHERE message_id = ?", (message_id,)).fetchone()
        return row is not None

    def sent_log(self) -> list[tuple[bytes, str, int, int]]:
        """(message id, recipient, seq, accepted at) of every accepted message."""
        rows = self._db.execute(
            "SELECT message_id, recipient, seq, accepted_at FROM sent ORDER BY rowid"
        ).fetchall()
        return [(bytes(m), r, s, a) for m, r, s, a in rows]

    def clear_failed(self) -> int:
        with self._db:
            return self._db.execute("DELETE FROM failed").rowcount

    def _accepted(self, entry: Queued) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM outbox WHERE message_id = ?", (entry.message_id,))
            self._db.execute(
                "INSERT OR IGNORE INTO sent (message_id, recipient, seq, queued_at, accepted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (entry.message_id, entry.recipient, entry.seq, entry.queued_at,
                 int(time.time())),
            )

    def _refused(self, entry: Queued, reason: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM outbox WHERE message_id = ?", (entry.message_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO failed (message_id, recipient, seq, queued_at, failed_at,"
                " reason) VALUES (?, ?, ?, ?, ?, ?)",
                (entry.message_id, entry.recipient, entry.seq, entry.queued_at,
                 int(time.time()), reason),
            )

    def _held(self, entry: Queued, reason: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE message_id = ?",
                (reason, entry.message_id),
            )

    def flush(self, client, accepted=None) -> Deferred[FlushResult]:
        """
        Send everything queued through C{client} (a connected
        L{ClientProtocol}), oldest first, up to L{FLUSH_WINDOW} at a time.
        Fires when each has an answer or the connection is gone.  A flush
        already running is joined, not doubled.  C{accepted}, if given, is
        called with each L{Queued} entry as soon as the relay has accepted
        it and the outbox has recorded that.
        """
        if self._flushing is not None:
            # Once the running flush ends, flush again: it may have started
            # before the newest messages were queued.
            d: Deferred[None] = Deferred()
            self._flushing.addBoth(lambda r: (d.callback(None), r)[1])
            return d.addCallback(lambda _: self.flush(client, accepted))
        self._flushing = self._flush(client, accepted)

        def done(result):
            self._flushing = None
            return result

        return self._flushing.addBoth(done)

    @inlineCallbacks
    def _flush(self, client, accepted):
        from twisted.internet.defer import DeferredSemaphore

        result = FlushResult([], [], [])
        streams: dict[str, list[Queued]] = {}
        for entry in self.pending():
            streams.setdefault(entry.recipient, []).append(entry)
        # One message in flight per recipient (the next goes only once the
        # relay accepted the one before, so a refusal can never let a later
        # one overtake it); up to FLUSH_WINDOW recipients at once.
        window = DeferredSemaphore(FLUSH_WINDOW)
        state = {"gone": None}
        yield DeferredList(
            [window.run(self._flushStream, client, stream, result, state, accepted)
             for stream in streams.values()],
            consumeErrors=True,
        )
        return result

    @inlineCallbacks
    def _flushStream(self, client, stream: list[Queued], result: FlushResult, state: dict,
                     accepted):
        from mailrelay.client.protocol import RelayError, SendRefused

        for position, entry in enumerate(stream):
            if state["gone"] is not None:
                reason = state["gone"]
            else:
                try:
                    yield client.submit(entry.message_id, entry.envelope)
                except Exception as error:
                    reason = str(error)
                    if isinstance(error, SendRefused) and error.code not in TRANSIENT:
                        self._refused(entry, reason)
                        result.refused.append((entry, reason))
                        continue
                    self._held(entry, reason)
                    if isinstance(error, SendRefused):
                        result.deferred_by_relay.add(entry.message_id)
                    elif not isinstance(error, RelayError) or error.code.fatal:
                        state["gone"] = reason
                else:
                    self._accepted(entry)
                    result.accepted.append(entry)
                    if accepted is not None:
                        accepted(entry)
                    continue
            result.held.append((entry, reason))
            for later in stream[position + 1:]:
                result.held.append((later, reason if state["gone"] is not None else
                                    "an earlier message to the same recipient is held back"))
            return

    def close(self) -> None:
        self._db.close()


OUTBOX_FILE = "outbox.sqlite"


def home_outbox(home) -> Outbox:
    """The outbox of a client's home (a L{keys.Home})."""
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Outbox(home.path / OUTBOX_FILE)


@inlineCallbacks
def queue_message(outbox: Outbox, identity, recipient: str, data: bytes,
                  client=None, contacts=None):
    """
    Seal C{data} for C{recipient} and queue it in C{outbox}; fires with the
    L{Queued} entry.  With a connected C{client}, the recipient's key is the
    directory's, checked against the one pinned (and pinned if new), and the
    relay's envelope limit applies; without, the key must already be pinned
    in C{contacts} (sealing offline), else L{keys.IdentityError}.
    """
    from mailrelay import envelope, keys

    recipient = keys.check_identity(recipient)
    if client is not None:
        key = yield client.contact_key(recipient)
        max_envelope = client.max_envelope
    else:
        roots = getattr(contacts, "identity_roots", None)
        if roots is not None and roots() is not None:
            # With a CA, a key is used only with its certificate checked, and
            # the certificate comes from the relay with the key.
            raise keys.IdentityError(
                f"this home checks contacts' keys against a CA, which needs the relay "
                f"to answer for {recipient!r}'s key and certificate; nothing was queued")
        key = contacts.pinned(recipient) if contacts is not None else None
        if key is None:
            raise keys.IdentityError(
                f"no key of {recipient!r} is pinned yet, so the message cannot be sealed "
                f"without the relay; nothing was queued"
            )
        max_envelope = wire.MAX_ENVELOPE

    def seal(seq: int) -> tuple[bytes, bytes]:
        message_id = envelope.new_message_id()
        return message_id, envelope.seal(identity, recipient, key, data, message_id,
                                         max_envelope=max_envelope, seq=seq)

    return outbox.queue(recipient, seal)
