"""
The client's durable record of what it received: every message handed to
the user, every notice from the relay, and per sender the highest sequence
number seen.

A delivered message is recorded here (committed to disk) before it is
shown, and acknowledged to the relay only after it is shown.  So a message
the relay delivers again (the ack was lost, or the client died between
showing and acknowledging) is found here, acknowledged again and never
shown twice; and a message is never acknowledged before it is on disk.

Showing is marked too, just before it happens (a write that survives the
process, without waiting for the disk).  A client that died after the
record but before the mark never showed the message: L{Inbox.unshown}
gives it back, and the next session shows it first.  Only a death in the
instant between the mark and the showing itself leaves a message unshown
(it is still listed by C{mailrelay inbox}); none is ever shown twice.

Each sender numbers its messages to us (the signed sequence number of the
envelope).  L{Inbox.record} compares each number with the highest seen
from that sender and says what is missing (a gap: the relay withheld or
lost messages, or they are still on their way) or late (arrived after a
later one).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mailrelay import wire
from mailrelay.client.localdb import open_home_db
from mailrelay.envelope import Opened, parse_header

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    sender       TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    seq          INTEGER NOT NULL,
    sent_at      INTEGER,
    received_at  INTEGER NOT NULL,
    body         BLOB,
    header       BLOB,
    shown_at     INTEGER,
    PRIMARY KEY (sender, message_id)
);
CREATE TABLE IF NOT EXISTS notices (
    notice_id    BLOB PRIMARY KEY,
    kind         INTEGER NOT NULL,
    sender       TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    accepted_at  INTEGER NOT NULL,
    text         TEXT NOT NULL,
    received_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    sender       TEXT PRIMARY KEY,
    last_seq     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_numbers (
    sender       TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (sender, message_id)
);
CREATE TABLE IF NOT EXISTS attempts (
    message_id   BLOB NOT NULL,
    digest       BLOB NOT NULL,
    count        INTEGER NOT NULL,
    last_error   TEXT NOT NULL,
    PRIMARY KEY (message_id, digest)
);
CREATE TABLE IF NOT EXISTS quarantine (
    message_id      BLOB NOT NULL,
    digest          BLOB NOT NULL,
    sender          TEXT,
    envelope        BLOB NOT NULL,
    reason          TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    quarantined_at  INTEGER NOT NULL,
    PRIMARY KEY (message_id, digest)
);
"""


class InboxError(Exception):
    """The inbox file cannot be opened or read; the message says what to do."""


@dataclass(frozen=True)
class Gap:
    """What a message's sequence number says about the messages around it."""

    sender: str
    first: int
    last: int
    late: bool = False

    def describe(self) -> str:
        numbers = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        if self.late:
            return (f"message {numbers} from {self.sender} arrived out of order, "
                    f"after a later one")
        count = self.last - self.first + 1
        return (f"{'message' if count == 1 else 'messages'} {numbers} from {self.sender} "
                f"{'has' if count == 1 else 'have'} not arrived (missing or still on the way)")


@dataclass(frozen=True)
class QuarantinedEntry:
    """
    A delivery the client could not keep after several attempts, kept as it
    came (the envelope, unopened or unverified) with the reason: listed by
    C{mailrelay inbox}, never shown as a message.
    """

    message_id: bytes
    sender: str | None
    """The sender the envelope names, if it can be read: not verified."""
    envelope: bytes
    reason: str
    attempts: int
    quarantined_at: int


@dataclass(frozen=True)
class Received:
    """One entry of the inbox, as L{Inbox.messages} lists it."""

    sender: str
    message_id: bytes
    seq: int
    sent_at: int | None
    received_at: int
    body: bytes | None


class MemoryInbox:
    """The same bookkeeping in memory, for sessions that keep no files."""

    def __init__(self) -> None:
        # (sender, id) -> (seq, header bytes, signed by a retired key)
        self._ids: dict[tuple[str, bytes], tuple[int, bytes, bool]] = {}
        self._notices: set[bytes] = set()
        self._attempts: dict[tuple[bytes, bytes], int] = {}
        self._quarantine: list[QuarantinedEntry] = []

    def seen(self, sender: str, message_id: bytes) -> bool:
        return (sender, message_id) in self._ids

    def seen_header(self, sender: str, message_id: bytes) -> bytes | None:
        entry = self._ids.get((sender, message_id))
        return None if entry is None else entry[1]

    def numbered(self, sender: str) -> bool:
        return any(seq for (s, _), (seq, _, _) in self._ids.items() if s == sender)

    def failed_attempt(self, message_id: bytes, envelope: bytes, reason: str) -> int:
        key = (message_id, _digest(envelope))
        self._attempts[key] = self._attempts.get(key, 0) + 1
        return self._attempts[key]

    def quarantine(self, message_id: bytes, sender: str | None, envelope: bytes, reason: str,
                   attempts: int) -> None:
        self._attempts.pop((message_id, _digest(envelope)), None)
        self._quarantine.append(QuarantinedEntry(message_id, sender, envelope, reason, attempts,
                                                 int(time.time())))

    def kept(self, message_id: bytes) -> None:
        for key in [k for k in self._attempts if k[0] == message_id]:
            del self._attempts[key]

    def quarantined(self) -> list[QuarantinedEntry]:
        return list(self._quarantine)

    def record(self, opened: Opened, retired: bool = False) -> list[Gap]:
        sender, seq = opened.sender, opened.header.seq
        mine = [(n, old) for (s, _), (n, _, old) in self._ids.items() if s == sender]
        last = _last(seq, retired, max((n for n, old in mine if not old), default=0),
                     [n for n, old in mine if old])
        self._ids[sender, opened.message_id] = (seq, opened.header.encode(), retired)
        return _gaps(sender, seq, last)

    def forget(self, opened: Opened) -> None:
        self._ids.pop((opened.sender, opened.message_id), None)

    def mark_shown(self, opened: Opened, shown: bool = True) -> None:
        pass

    def unshown(self) -> list[Opened]:
        return []

    def notice_seen(self, notice: wire.Notice) -> bool:
        return notice.notice_id in self._notices

    def record_notice(self, notice: wire.Notice) -> None:
        self._notices.add(notice.notice_id)

    def forget_notice(self, notice: wire.Notice) -> None:
        self._notices.discard(notice.notice_id)


def _digest(envelope: bytes) -> bytes:
    return hashlib.sha256(envelope).digest()


def _last(seq: int, retired: bool, current: int, retired_numbers) -> int:
    """
    The sender's highest number to compare C{seq} with.  Numbers that
    messages signed by a retired key of the sender carried count only below
    C{seq} for a message signed by the current key: such a key may be in a
    thief's hands, and one absurd number from it must not make every later
    genuine message "late" (and hide what the relay withholds).
    """
    if retired:
        return max([current, *retired_numbers])
    return max([current, *(n for n in retired_numbers if n < seq)])


def _gaps(sender: str, seq: int, last: int) -> list[Gap]:
    if seq == 0:
        return []  # sent outside any sequence
    if seq > last + 1:
        return [Gap(sender, last + 1, seq - 1)]
    if seq <= last:
        return [Gap(sender, seq, seq, late=True)]
    return []


class Inbox:
    """
    A SQLite file in the client's home (C{inbox.sqlite}), written with
    C{synchronous=FULL}: a record is on disk before the message is shown.
    Entries are kept for good (a few dozen bytes each, plus the text): a
    relay may deliver an old message again at any time, and the user can
    read what arrived with C{mailrelay inbox}.
    """

    def __init__(self, path: str | os.PathLike[str], legacy_seen: str | None = None) -> None:
        self.path = os.fspath(path)
        try:
            db = open_home_db(self.path, SCHEMA,
                              "SELECT sender, message_id, seq FROM messages LIMIT 1")
        except (sqlite3.Error, OSError) as e:
            raise InboxError(
                f"cannot read {self.path}: {e}; move it aside to start afresh "
                f"(messages already shown may then be shown again)"
            ) from None
        self._db = db
        if legacy_seen is not None and os.path.exists(legacy_seen):
            try:
                _import_seen(db, legacy_seen)
            except (sqlite3.Error, OSError) as e:
                db.close()
                raise InboxError(
                    f"cannot read {legacy_seen}, the record of messages shown by an earlier "
                    f"mailrelay: {e}; move it aside to go on (those messages may then be "
                    f"shown again)"
                ) from None

    def seen(self, sender: str, message_id: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM messages WHERE sender = ? AND message_id = ?", (sender, message_id)
        ).fetchone()
        return row is not None

    def seen_header(self, sender: str, message_id: bytes) -> bytes | None:
        """
        The header of the message recorded from C{sender} under this id, or
        None if there is none (b"" for one recorded before headers were kept).
        """
        row = self._db.execute(
            "SELECT header FROM messages WHERE sender = ? AND message_id = ?",
            (sender, message_id)).fetchone()
        return None if row is None else bytes(row[0] or b"")

    def numbered(self, sender: str) -> bool:
        """Whether C{sender} has sent us a numbered message (sequence above 0)."""
        row = self._db.execute(
            "SELECT last_seq FROM streams WHERE sender = ?", (sender,)).fetchone()
        if row is not None and row[0] > 0:
            return True
        return self._db.execute("SELECT 1 FROM retired_numbers WHERE sender = ? AND seq > 0",
                                (sender,)).fetchone() is not None

    def failed_attempt(self, message_id: bytes, envelope: bytes, reason: str) -> int:
        """Count one more failure to keep this delivery; fire how many so far."""
        digest = _digest(envelope)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO attempts (message_id, digest, count, last_error) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (message_id, digest) DO UPDATE SET count = count + 1,"
                " last_error = excluded.last_error",
                (message_id, digest, reason))
            (count,) = self._db.execute(
                "SELECT count FROM attempts WHERE message_id = ? AND digest = ?",
                (message_id, digest)).fetchone()
        return count

    def quarantine(self, message_id: bytes, sender: str | None, envelope: bytes, reason: str,
                   attempts: int) -> None:
        """Keep a delivery that could not be kept otherwise, as it came, with the reason."""
        digest = _digest(envelope)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO quarantine (message_id, digest, sender, envelope, reason,"
                " attempts, quarantined_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (message_id, digest, sender, envelope, reason, attempts, int(time.time())))
            self._db.execute("DELETE FROM attempts WHERE message_id = ? AND digest = ?",
                             (message_id, digest))

    def kept(self, message_id: bytes) -> None:
        """A delivery was kept (or refused for good): forget its failed attempts, if any."""
        if self._db.execute("SELECT 1 FROM attempts WHERE message_id = ?",
                            (message_id,)).fetchone() is not None:
            with self._db:
                self._db.execute("DELETE FROM attempts WHERE message_id = ?", (message_id,))

    def quarantined(self) -> list[QuarantinedEntry]:
        rows = self._db.execute(
            "SELECT message_id, sender, envelope, reason, attempts, quarantined_at"
            " FROM quarantine ORDER BY rowid").fetchall()
        return [QuarantinedEntry(bytes(m), s, bytes(e), r, a, q) for m, s, e, r, a, q in rows]

    def record(self, opened: Opened, retired: bool = False) -> list[Gap]:
        """
        Commit C{opened} to the inbox; return what its sequence number says
        is missing or late.  Call it before showing the message.  A message
        signed by a C{retired} key of its sender never raises the sender's
        highest number (L{_last}).
        """
        h = opened.header
        sender = h.sender
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT last_seq FROM streams WHERE sender = ?", (sender,)
            ).fetchone()
            current = 0 if row is None else row[0]
            numbers = [n for (n,) in self._db.execute(
                "SELECT seq FROM retired_numbers WHERE sender = ?", (sender,))]
            last = _last(h.seq, retired, current, numbers)
            self._db.execute(
                "INSERT OR IGNORE INTO messages (sender, message_id, seq, sent_at, received_at,"
                " body, header) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sender, h.message_id, h.seq, h.timestamp,
                 int(time.time()), opened.plaintext, h.encode()),
            )
            if retired:
                self._db.execute(
                    "INSERT OR IGNORE INTO retired_numbers (sender, message_id, seq)"
                    " VALUES (?, ?, ?)", (sender, h.message_id, h.seq))
            elif h.seq > current:
                self._db.execute(
                    "INSERT INTO streams (sender, last_seq) VALUES (?, ?) ON CONFLICT (sender)"
                    " DO UPDATE SET last_seq = excluded.last_seq",
                    (sender, h.seq),
                )
        return _gaps(sender, h.seq, last)

    def forget(self, opened: Opened) -> None:
        """
        Undo L{record}: showing the message failed, and it is to come again
        (so the sender's highest number is what it was before).
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "DELETE FROM messages WHERE sender = ? AND message_id = ?",
                (opened.sender, opened.message_id),
            )
            self._db.execute(
                "DELETE FROM retired_numbers WHERE sender = ? AND message_id = ?",
                (opened.sender, opened.message_id),
            )
            self._db.execute(
                "UPDATE streams SET last_seq = (SELECT COALESCE(MAX(seq), 0) FROM messages m"
                " WHERE m.sender = ?1 AND NOT EXISTS (SELECT 1 FROM retired_numbers r"
                " WHERE r.sender = ?1 AND r.message_id = m.message_id)) WHERE sender = ?1",
                (opened.sender,),
            )

    def mark_shown(self, opened: Opened, shown: bool = True) -> None:
        """
        Mark C{opened} as shown, just before it is (or, with C{shown}
        false, as not shown after all).  Written without waiting for the
        disk: it must survive the process dying, which it does, and costs no
        flush; after a power cut the message is at worst shown again.
        """
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute(
                "UPDATE messages SET shown_at = ? WHERE sender = ? AND message_id = ?",
                (int(time.time()) if shown else None, opened.sender, opened.message_id),
            )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def unshown(self) -> list[Opened]:
        """Messages recorded but never shown: the client died in between."""
        rows = self._db.execute(
            "SELECT header, body FROM messages WHERE shown_at IS NULL AND header IS NOT NULL"
            " ORDER BY rowid"
        ).fetchall()
        return [Opened(parse_header(bytes(h)), bytes(b)) for h, b in rows]

    def notice_seen(self, notice: wire.Notice) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM notices WHERE notice_id = ?", (notice.notice_id,)
        ).fetchone()
        return row is not None

    def record_notice(self, notice: wire.Notice) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO notices (notice_id, kind, sender, message_id, accepted_at,"
                " text, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (notice.notice_id, notice.kind, notice.sender, notice.message_id,
                 min(notice.accepted_at, 2**63 - 1), notice.text, int(time.time())),
            )

    def forget_notice(self, notice: wire.Notice) -> None:
        with self._db:
            self._db.execute("DELETE FROM notices WHERE notice_id = ?", (notice.notice_id,))

    def messages(self, sender: str | None = None, last: int | None = None) -> list[Received]:
        """What arrived, oldest first (optionally from one sender, the last N only)."""
        query = "SELECT sender, message_id, seq, sent_at, received_at, body FROM messages"
        params: list = []
        if sender is not None:
            query += " WHERE sender = ?"
            params.append(sender)
        query += " ORDER BY rowid"
        rows = self._db.execute(query, params).fetchall()
        if last is not None:
            rows = rows[-last:] if last else []
        return [Received(s, bytes(m), q, at, rcv, None if b is None else bytes(b))
                for s, m, q, at, rcv, b in rows]

    def notices(self) -> list[wire.Notice]:
        rows = self._db.execute(
            "SELECT notice_id, kind, sender, message_id, accepted_at, text FROM notices"
            " ORDER BY rowid"
        ).fetchall()
        return [wire.Notice(bytes(n), k, s, bytes(m), a, t) for n, k, s, m, a, t in rows]

    def close(self) -> None:
        self._db.close()


def _import_seen(db: sqlite3.Connection, path: str) -> None:
    """
    Take over the ids a client kept before it had an inbox (C{seen.sqlite}),
    so none of those messages is shown again; their text was never kept.
    """
    old = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=ro", uri=True)
    try:
        rows = old.execute("SELECT sender, message_id, seen_at FROM seen").fetchall()
    finally:
        old.close()
    with db:
        db.executemany(
            "INSERT OR IGNORE INTO messages (sender, message_id, seq, sent_at, received_at,"
            " body, shown_at) VALUES (?, ?, 0, NULL, ?3, NULL, ?3)",
            rows,
        )
    os.replace(path, path + ".imported")


INBOX_FILE = "inbox.sqlite"
LEGACY_SEEN_FILE = "seen.sqlite"


def home_inbox(home) -> Inbox:
    """The inbox of a client's home (a L{keys.Home})."""
    home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Inbox(home.path / INBOX_FILE, legacy_seen=os.fspath(home.path / LEGACY_SEEN_FILE))
