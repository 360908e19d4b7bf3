"""
The default store: one SQLite file, WAL journal, durable commits.

All work runs on the pool's single connection.  Writes are committed in
the order they were asked for: the order of C{enqueue} calls is the order
of C{seq}.  A read sees every write whose Deferred has fired (callers that
need to read their own write wait for it, as the relay does).

Writes (C{enqueue}, C{delete}, C{register_key}...) are committed in groups:
while one transaction is being committed, the writes asked for meanwhile
queue up, and the next transaction carries them all (up to L{MAX_GROUP}).
Every write checks before it changes anything, so one refused write (a full
mailbox, a reused id) needs no rollback and the others go on.  The writes
of every message, enqueues and deletes, are done a batch at a time: their
outcomes are decided in Python, in order, against two lookups for the whole
batch, and the rows go in and out with a few multi-row statements, so the
cost per message is a few rows of SQL rather than several statements (see
L{_write_batch}).  C{synchronous=FULL} makes each commit reach the disk
before any of its writes' Deferreds fire, which is what lets the relay
answer a sender "accepted"; grouping shares one disk flush among many
senders.

The schema is versioned with C{PRAGMA user_version}; L{MIGRATIONS} holds the
steps from each version to the next, applied in one transaction at start.
A database newer than this code knows is refused rather than touched.

A relay must never start empty where it had messages: each database holds
a random store id, and a marker file beside it (C{mailrelay.sqlite.id})
holds the same.  A marker without its database (deleted, lost with a disk,
or a backup restored without it), a database whose id is not the marker's
(another relay's file), or a database that fails SQLite's integrity check
(truncated, corrupt) is refused at start with the reason and what to do.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
from pathlib import Path
from typing import NamedTuple

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from mailrelay import wire
from mailrelay.files import write_durably
from mailrelay.relay.store.base import (
    KIND_MESSAGE,
    DuplicateId,
    Engine,
    Quota,
    StoredMessage,
    StoreError,
    digest,
    new_notice_id,
    notice_body,
)

MIGRATIONS: dict[int, str] = {
    # 0 -> 1: the first schema.
    1: """
    CREATE TABLE directory (
        identity      TEXT PRIMARY KEY,
        public_key    BLOB NOT NULL,
        registered_at INTEGER NOT NULL
    );
    CREATE TABLE messages (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient     TEXT NOT NULL,
        sender        TEXT NOT NULL,
        message_id    BLOB NOT NULL,
        digest        BLOB NOT NULL,
        envelope      BLOB NOT NULL,
        size          INTEGER NOT NULL,
        accepted_at   INTEGER NOT NULL,
        UNIQUE (recipient, message_id)
    );
    CREATE INDEX messages_by_mailbox ON messages (recipient, seq);
    CREATE TABLE mailboxes (
        recipient     TEXT PRIMARY KEY,
        messages      INTEGER NOT NULL,
        bytes         INTEGER NOT NULL
    );
    CREATE TABLE acked (
        recipient     TEXT NOT NULL,
        message_id    BLOB NOT NULL,
        sender        TEXT NOT NULL,
        digest        BLOB NOT NULL,
        acked_at      INTEGER NOT NULL,
        PRIMARY KEY (recipient, message_id)
    );
    CREATE INDEX acked_by_time ON acked (acked_at);
    """,
    # 1 -> 2: the relay's own notices share the mailbox with messages, and
    # the store keeps its id.  No index on age: messages are accepted in seq
    # order, so the oldest are found from the start of the table (an index
    # would cost every insert and delete a write, for a sweep a minute).
    2: """
    ALTER TABLE messages ADD COLUMN kind INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE directory ADD COLUMN certificate BLOB;
    CREATE TABLE meta (
        key           TEXT PRIMARY KEY,
        value         TEXT NOT NULL
    );
    """,
    # 2 -> 3: key rotations, each signed by the key before it.
    3: """
    CREATE TABLE rotations (
        position      INTEGER PRIMARY KEY AUTOINCREMENT,
        identity      TEXT NOT NULL,
        old_key       BLOB NOT NULL,
        new_key       BLOB NOT NULL,
        rotated_at    INTEGER NOT NULL,
        signature     BLOB NOT NULL
    );
    CREATE INDEX rotations_by_identity ON rotations (identity, position);
    """,
    # 3 -> 4: a rotation keeps the new key's signature too (it vouches for
    # the old key: clients trust an old key only on the word of one they
    # trust) and the certificate the old key had.  Rotations kept before
    # have neither; clients refuse to follow such a step.
    4: """
    ALTER TABLE rotations ADD COLUMN new_signature BLOB NOT NULL DEFAULT x'';
    ALTER TABLE rotations ADD COLUMN old_certificate BLOB NOT NULL DEFAULT x'';
    """,
    # 4 -> 5: what each sender holds in each mailbox, for the per-sender
    # cap, kept like the mailboxes' usage (a row changed with every write,
    # none at zero) and counted once here from the messages already held
    # (the relay's notices count for no sender).
    5: """
    CREATE TABLE senders (
        recipient     TEXT NOT NULL,
        sender        TEXT NOT NULL,
        messages      INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        PRIMARY KEY (recipient, sender)
    ) WITHOUT ROWID;
    INSERT INTO senders (recipient, sender, messages, bytes)
        SELECT recipient, sender, count(*), sum(size) FROM messages WHERE kind = 0
        GROUP BY recipient, sender;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)
MAX_GROUP = 1024
"""The most writes one transaction carries."""


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


def _migrate(txn) -> int:
    # sqlite3 opens no transaction for DDL by itself: without this, each
    # statement would commit alone and a failed step leave half a schema.
    txn.execute("BEGIN IMMEDIATE")
    (version,) = txn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {version}, newer than this mailrelay "
            f"knows ({SCHEMA_VERSION}); upgrade mailrelay or use another --data directory"
        )
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[step].split(";"):
            if statement.strip():
                txn.execute(statement)
        txn.execute(f"PRAGMA user_version={step}")
    return version


class _Group:
    """
    One group commit's view of mailbox usage, per mailbox and per (mailbox,
    sender): what is committed (cached by the store: mailboxes read from
    the C{mailboxes} table on first use, the whole C{senders} table read at
    start) plus what this group changed so far.  The group writes each touched row once, at its end,
    rather than once per message.
    """

    def __init__(self, txn, committed: dict[str, tuple[int, int]], seq: list[int],
                 senders: dict[tuple[str, str], tuple[int, int]]) -> None:
        self.txn = txn
        self._committed = committed
        self._seq = seq
        self._senders = senders
        self.changed: dict[str, tuple[int, int]] = {}
        self.changed_senders: dict[tuple[str, str], tuple[int, int]] = {}

    def next_seq(self) -> int:
        """
        The C{seq} of the next message stored.  The store numbers messages
        itself (so a batch can be inserted in one statement), from the
        highest number the table ever gave; numbers given to a group that
        did not commit are not used again, which leaves a gap, never a
        repeat.
        """
        self._seq[0] += 1
        return self._seq[0]

    def usage(self, recipient: str) -> tuple[int, int]:
        """(messages, bytes) in C{recipient}'s mailbox, this group's writes included."""
        current = self.changed.get(recipient)
        if current is None:
            current = self._committed.get(recipient)
        if current is None:
            row = self.txn.execute(
                "SELECT messages, bytes FROM mailboxes WHERE recipient = ?", (recipient,)
            ).fetchone()
            current = self._committed[recipient] = (row[0], row[1]) if row else (0, 0)
        return current

    def change(self, recipient: str, messages: int, size: int) -> None:
        count, used = self.usage(recipient)
        self.changed[recipient] = (count + messages, used + size)

    def sender_usage(self, key: tuple[str, str]) -> tuple[int, int]:
        """(messages, bytes) the sender holds in the mailbox, C{key} = (recipient, sender)."""
        current = self.changed_senders.get(key)
        if current is None:
            # The store holds every row of the table (read at start), so a
            # pair it lacks holds nothing: no query on the way.
            current = self._senders.get(key, (0, 0))
        return current

    def change_sender(self, key: tuple[str, str], messages: int, size: int) -> None:
        held, held_bytes = self.sender_usage(key)
        self.changed_senders[key] = (held + messages, held_bytes + size)

    def flush(self) -> None:
        """Write the usage rows this group changed: one statement per L{BATCH_ROWS} rows."""
        for chunk in _chunks(list(self.changed.items())):
            self.txn.execute(
                f"INSERT INTO mailboxes (recipient, messages, bytes) VALUES"
                f" {_values(len(chunk), 3)} ON CONFLICT (recipient) DO UPDATE SET"
                " messages = excluded.messages, bytes = excluded.bytes",
                [value for recipient, (count, used) in chunk for value in (recipient, count, used)],
            )
        held = [(key, usage) for key, usage in self.changed_senders.items() if usage[0]]
        for chunk in _chunks(held):
            self.txn.execute(
                f"INSERT INTO senders (recipient, sender, messages, bytes) VALUES"
                f" {_values(len(chunk), 4)} ON CONFLICT (recipient, sender) DO UPDATE SET"
                " messages = excluded.messages, bytes = excluded.bytes",
                [value for (recipient, sender), (count, used) in chunk
                 for value in (recipient, sender, count, used)],
            )
        # A sender with nothing left in a mailbox keeps no row.
        gone = [key for key, usage in self.changed_senders.items() if not usage[0]]
        for chunk in _chunks(gone):
            self.txn.execute(
                f"DELETE FROM senders WHERE (recipient, sender) IN"
                f" (VALUES {_values(len(chunk), 2)})",
                [value for key in chunk for value in key],
            )


class _Enqueue(NamedTuple):
    recipient: str
    sender: str
    message_id: bytes
    digest: bytes
    envelope: bytes
    now: int


class _Delete(NamedTuple):
    recipient: str
    message_id: bytes
    now: int


BATCH_ROWS = 64
"""Rows per multi-row statement, at most: 8 parameters each stays under SQLite's oldest limit of 999."""


def _chunks(items: list):
    """
    C{items} in runs of L{BATCH_ROWS}, 32, 16... 1 (64 + 32 + 4 for 100):
    the multi-row statements come in a few lengths only, so SQLite's
    statement cache keeps each prepared rather than compiling a new one for
    every batch.
    """
    start, size = 0, BATCH_ROWS
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        yield items[start:start + size]
        start += size


def _values(rows: int, columns: int) -> str:
    one = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([one] * rows)


def _find(txn, query: str, keys: list[tuple[str, bytes]]) -> dict:
    """
    The rows C{query} finds for C{keys} (recipient, message id), by key:
    C{query} selects recipient, message id and more from a table C{t}
    joined to the keys as C{k}.
    """
    found = {}
    for chunk in _chunks(keys):
        rows = txn.execute(
            query.format(keys=f"(VALUES {_values(len(chunk), 2)}) k"),
            [value for key in chunk for value in key],
        ).fetchall()
        for row in rows:
            found[row[0], row[1]] = row[2:]  # BLOBs come back as bytes
    return found


_FIND_ACKED = ("SELECT t.recipient, t.message_id, t.sender, t.digest FROM acked t JOIN {keys}"
               " ON t.recipient = k.column1 AND t.message_id = k.column2")
_FIND_STORED = ("SELECT t.recipient, t.message_id, t.seq, t.sender, t.digest, t.size, t.kind"
                " FROM messages t JOIN {keys} ON t.recipient = k.column1"
                " AND t.message_id = k.column2")


def _write_batch(group: _Group, items: list, outcomes: list, quota: Quota) -> None:
    """
    Do the L{_Enqueue} and L{_Delete} records of C{items} (index, record)
    with the outcome each would have had alone, in order (as
    L{SQLiteStore.enqueue_message} and L{SQLiteStore.delete} define them):
    two lookups for the whole batch, the decisions in Python, then one
    statement per L{BATCH_ROWS} rows for each of the deletes, the ids kept
    in C{acked} and the inserts.
    """
    txn = group.txn
    keys = list(dict.fromkeys((op.recipient, op.message_id) for _, op in items))
    enqueued = [(op.recipient, op.message_id) for _, op in items if type(op) is _Enqueue]
    acked = _find(txn, _FIND_ACKED, list(dict.fromkeys(enqueued)))
    stored = _find(txn, _FIND_STORED, keys)
    inserts: dict[tuple[str, bytes], tuple] = {}
    doomed: list[int] = []
    settled: list[tuple] = []
    for index, op in items:
        key = (op.recipient, op.message_id)
        if type(op) is _Delete:
            entry = stored.pop(key, None)
            if entry is None:
                outcomes[index] = (True, False)
                continue
            seq, sender, message_digest, size, kind = entry
            acked[key] = (sender, message_digest)
            group.change(op.recipient, -1, -size)
            if kind == KIND_MESSAGE:
                holder = (op.recipient, sender)
                group.change_sender(holder, -1, -size)
            if inserts.pop(key, None) is None:
                doomed.append(seq)
            settled.append((op.recipient, op.message_id, sender, message_digest, op.now))
            outcomes[index] = (True, True)
            continue
        previous = acked.get(key)
        if previous is None and key in stored:
            previous = stored[key][1:3]
        if previous is not None:
            if previous == (op.sender, op.digest):
                outcomes[index] = (True, None)  # a retry: nothing new
            else:
                outcomes[index] = (False, DuplicateId(op.message_id.hex()))
            continue
        size = len(op.envelope)
        holder = (op.recipient, op.sender)
        count, used = mailbox = group.usage(op.recipient)
        held, held_bytes = sender = group.sender_usage(holder)
        refusal = quota.refusal(mailbox, sender, size)
        if refusal is not None:
            outcomes[index] = (False, refusal)
            continue
        seq = group.next_seq()
        inserts[key] = (seq, op.recipient, op.sender, op.message_id, op.digest, op.envelope,
                        size, op.now)
        stored[key] = (seq, op.sender, op.digest, size, KIND_MESSAGE)
        # As group.change and group.change_sender would, without looking again.
        group.changed[op.recipient] = (count + 1, used + size)
        group.changed_senders[holder] = (held + 1, held_bytes + size)
        outcomes[index] = (True, StoredMessage(seq, op.recipient, op.sender, op.message_id,
                                               op.envelope, op.now))
    for chunk in _chunks(doomed):
        txn.execute(f"DELETE FROM messages WHERE seq IN ({', '.join('?' * len(chunk))})", chunk)
    for chunk in _chunks(settled):
        txn.execute(
            "INSERT OR REPLACE INTO acked (recipient, message_id, sender, digest, acked_at)"
            f" VALUES {_values(len(chunk), 5)}",
            [value for row in chunk for value in row],
        )
    for chunk in _chunks(list(inserts.values())):
        txn.execute(
            "INSERT INTO messages (seq, recipient, sender, message_id, digest, envelope, size,"
            f" accepted_at) VALUES {_values(len(chunk), 8)}",
            [value for row in chunk for value in row],
        )


def _run_group(txn, writes: list, usage: dict[str, tuple[int, int]], seq: list[int],
               quota: Quota, senders: dict[tuple[str, str], tuple[int, int]]):
    """
    Run C{writes} in one transaction: L{_Enqueue} and L{_Delete} records,
    done in batches (L{_write_batch}), and functions of the L{_Group} (the
    rarer writes), each done alone, in turn.  A write refused with
    L{StoreError} changes nothing (every write checks first, then writes),
    so it needs no rollback and the others go on; its error is returned in
    its place.  Any other error aborts the whole transaction.

    Returns the outcomes and the usage, per mailbox and per sender, the
    group changed, which the store caches once the transaction has
    committed.
    """
    txn.execute("BEGIN IMMEDIATE")
    group = _Group(txn, usage, seq, senders)
    outcomes: list = [None] * len(writes)
    batch: list = []

    def run_batches() -> None:
        if batch:
            _write_batch(group, batch, outcomes, quota)
            batch.clear()

    for index, write in enumerate(writes):
        if type(write) is _Enqueue or type(write) is _Delete:
            batch.append((index, write))
        else:
            run_batches()
            try:
                outcomes[index] = (True, write(group))
            except StoreError as e:
                outcomes[index] = (False, e)
    run_batches()
    group.flush()
    return outcomes, group.changed, group.changed_senders


MARKER_SUFFIX = ".id"


def marker_path(path: str) -> str:
    """The file beside the database that remembers which database belongs here."""
    return path + MARKER_SUFFIX


def _read_marker(path: str) -> str | None:
    try:
        with open(marker_path(path), encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {marker_path(path)}: {e}") from None


def preflight(path: str) -> None:
    """
    Check, synchronously and before the relay starts, that C{path} can be
    this store: its directory is writable; if the marker says a database
    was here, it still is; the file, if any, is a SQLite database that
    passes SQLite's quick integrity check, whose schema this code knows and
    whose store id is the marker's.  Raises L{StoreError} saying what is
    wrong and what to do.  Changes nothing but what SQLite itself recovers
    (a write-ahead log left by a crash).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to {directory}")
    marker = _read_marker(path)
    if not os.path.exists(path):
        if marker is not None:
            raise StoreError(
                f"the message store {path} is missing, but {marker_path(path)} shows that "
                f"this directory held one (store id {marker}). Restore the file from a "
                f"backup; to start with an empty store on purpose, remove "
                f"{marker_path(path)}"
            )
        return
    try:
        connection = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            problems = [row[0] for row in connection.execute("PRAGMA quick_check(5)")]
            store_id = None
            if 2 <= version <= SCHEMA_VERSION:
                row = connection.execute(
                    "SELECT value FROM meta WHERE key = 'store_id'").fetchone()
                store_id = row[0] if row is not None else None
        finally:
            connection.close()
    except sqlite3.Error as e:
        raise StoreError(
            f"cannot open {path}: {e}. The file is damaged or not a mailrelay store; "
            f"restore it from a backup (the relay does not start on it)"
        ) from None
    if problems != ["ok"]:
        raise StoreError(
            f"{path} fails SQLite's integrity check ({'; '.join(problems)}). Restore it "
            f"from a backup; `sqlite3 {path} .recover` may save what is left"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this mailrelay knows "
            f"({SCHEMA_VERSION}); upgrade mailrelay or use another --data directory"
        )
    if marker is not None and store_id != marker:
        what = "has no store id" if store_id is None else f"is store {store_id}"
        raise StoreError(
            f"{path} {what}, but {marker_path(path)} says this directory held store "
            f"{marker}: the file was replaced or emptied. Put the right file back; to use "
            f"this one on purpose, remove {marker_path(path)}"
        )


def _claim_store_id(txn) -> str:
    """The database's store id, made up on first start."""
    row = txn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    if row is not None:
        return row[0]
    store_id = secrets.token_hex(16)
    txn.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (store_id,))
    return store_id


class SQLiteStore(Engine):
    log = Logger()

    def __init__(self, path: str, quota: Quota = Quota(), reactor=None) -> None:
        self.path = path
        self.quota = quota
        self._queued: list[tuple[object, Deferred]] = []
        self._committing = False
        self._stopping: Deferred | None = None
        self._closed = False
        self.groups = 0
        # Committed usage (messages, bytes) of the mailboxes written since
        # start.  Only the pool's thread reads it, while a group runs; only
        # the reactor thread updates it, after a commit, between groups.
        self._usage: dict[str, tuple[int, int]] = {}
        # The same for what each sender holds in each mailbox, (recipient,
        # sender) -> (messages, bytes): the whole senders table, read at
        # start, so a pair missing holds nothing.  An entry at zero is
        # dropped (as its row is), so only the pairs with messages waiting
        # take memory.
        self._senders: dict[tuple[str, str], tuple[int, int]] = {}
        # The last seq given (see _Group.next_seq); only the pool's thread
        # uses it, at start and in groups.
        self._seq = [0]
        self._lockfd: int | None = None
        kwargs = {}
        if reactor is not None:
            kwargs["cp_reactor"] = reactor
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            cp_min=1,
            cp_max=1,
            cp_noisy=False,
            check_same_thread=False,
            cp_openfun=_configure,
            **kwargs,
        )

    def _lock(self) -> None:
        """
        Hold C{PATH.lock} exclusively while the store is open: one relay per
        store.  This store numbers messages and keeps mailbox usage in
        memory, so a second writer on the same file would collide with it.
        The kernel lets go of the lock when the process dies, however it dies.
        """
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"{self.path} is in use by another mailrelay process: one relay per "
                f"--data directory (stop the other one first)"
            ) from None
        self._lockfd = fd

    @inlineCallbacks
    def start(self):
        self._lock()
        self._pool.start()
        try:
            before = yield self._pool.runInteraction(_migrate)
            store_id = yield self._pool.runInteraction(_claim_store_id)
            yield self._pool.runInteraction(self._read_seq)
        except sqlite3.Error as e:
            self._close()
            raise StoreError(f"cannot open {self.path}: {e}") from None
        except StoreError:
            self._close()
            raise
        marker = _read_marker(self.path)
        if marker is None:
            write_durably(Path(marker_path(self.path)), store_id.encode("ascii") + b"\n", 0o600)
        elif marker != store_id:
            self._close()
            raise StoreError(f"{self.path} is store {store_id}, but {marker_path(self.path)} "
                             f"says this directory held store {marker}")
        if before == 0:
            self.log.warn("store {path} created, empty (schema version {new}, store id {id})",
                          path=self.path, new=SCHEMA_VERSION, id=store_id)
        elif before != SCHEMA_VERSION:
            self.log.info(
                "store {path} schema upgraded from version {old} to {new}",
                path=self.path, old=before, new=SCHEMA_VERSION,
            )

    def _read_seq(self, txn) -> None:
        """
        Go on numbering from the highest seq the table ever gave; read what
        each sender holds in each mailbox.
        """
        (highest,) = txn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
        row = txn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        self._seq[0] = max(highest, row[0] if row is not None else 0)
        self._senders.update(
            ((recipient, sender), (messages, size)) for recipient, sender, messages, size
            in txn.execute("SELECT recipient, sender, messages, bytes FROM senders"))

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.close()
            if self._lockfd is not None:
                os.close(self._lockfd)  # and with it the lock
                self._lockfd = None

    def stop(self) -> Deferred[None]:
        """
        Close the store once every write already asked for is committed (or
        has failed), so no caller is left waiting.  Safe to call twice, and
        after a failed L{start}.
        """
        if self._closed or (not self._committing and not self._queued):
            self._close()
            return succeed(None)
        if self._stopping is None:
            self._stopping = Deferred()
        d: Deferred[None] = Deferred()
        self._stopping.addBoth(lambda r: d.callback(None))
        return d

    def _write(self, write) -> Deferred:
        """
        Queue C{write} (an L{_Enqueue}, a L{_Delete}, or a function of the
        L{_Group}) for the next group commit; fires after that commit.
        """
        d: Deferred = Deferred()
        self._queued.append((write, d))
        self._commitQueued()
        return d

    def _commitQueued(self) -> None:
        if self._committing or not self._queued:
            return
        group, self._queued = self._queued[:MAX_GROUP], self._queued[MAX_GROUP:]
        self._committing = True
        self.groups += 1
        d = self._pool.runInteraction(_run_group, [write for write, _ in group], self._usage,
                                      self._seq, self.quota, self._senders)
        d.addBoth(self._committed, group)

    def _committed(self, outcome, group) -> None:
        self._committing = False
        if isinstance(outcome, tuple):
            outcomes, usage, senders = outcome
            self._usage.update(usage)
            for key, held in senders.items():
                if held[0]:
                    self._senders[key] = held
                else:
                    self._senders.pop(key, None)
            for (ok, value), (_, d) in zip(outcomes, group):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        else:
            # The transaction as a whole failed (disk full, I/O error): none
            # of the group was committed, and each caller hears so.  Usage
            # read during it may be cached already: it is what was committed
            # before, so it stays true.
            error = StoreError(f"commit failed: {outcome.getErrorMessage()}")
            for _, d in group:
                d.errback(error)
        self._commitQueued()
        if self._stopping is not None and not self._committing:
            self._close()
            stopping, self._stopping = self._stopping, None
            stopping.callback(None)

    def get_key(self, identity: str) -> Deferred[bytes | None]:
        def run(txn):
            row = txn.execute(
                "SELECT public_key FROM directory WHERE identity = ?", (identity,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._pool.runInteraction(run)

    def register_key(self, identity: str, public_key: bytes, now: int) -> Deferred[bytes]:
        def run(group):
            txn = group.txn
            txn.execute(
                "INSERT OR IGNORE INTO directory (identity, public_key, registered_at) "
                "VALUES (?, ?, ?)",
                (identity, public_key, now),
            )
            (key,) = txn.execute(
                "SELECT public_key FROM directory WHERE identity = ?", (identity,)
            ).fetchone()
            return bytes(key)

        return self._write(run)

    def rotate_key(self, identity: str, rotation: wire.Rotation,
                   certificate: bytes) -> Deferred[bool]:
        def run(group):
            txn = group.txn
            txn.execute(
                "UPDATE directory SET public_key = ?, certificate = ?"
                " WHERE identity = ? AND public_key = ?",
                (rotation.new_key, certificate, identity, rotation.old_key),
            )
            if txn.rowcount != 1:
                return False
            txn.execute(
                "INSERT INTO rotations (identity, old_key, new_key, rotated_at, signature,"
                " new_signature, old_certificate) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (identity, rotation.old_key, rotation.new_key, rotation.timestamp,
                 rotation.old_signature, rotation.new_signature, rotation.old_certificate),
            )
            return True

        return self._write(run)

    def get_rotations(self, identity: str) -> Deferred[list[wire.Rotation]]:
        def run(txn):
            rows = txn.execute(
                "SELECT old_key, new_key, rotated_at, signature, new_signature, old_certificate"
                " FROM rotations WHERE identity = ? ORDER BY position", (identity,)
            ).fetchall()
            return [wire.Rotation(bytes(o), bytes(n), t, bytes(s), bytes(ns), bytes(c))
                    for o, n, t, s, ns, c in rows]

        return self._pool.runInteraction(run)

    def get_certificate(self, identity: str) -> Deferred[bytes]:
        def run(txn):
            row = txn.execute(
                "SELECT certificate FROM directory WHERE identity = ?", (identity,)
            ).fetchone()
            return b"" if row is None or row[0] is None else bytes(row[0])

        return self._pool.runInteraction(run)

    def set_certificate(self, identity: str, certificate: bytes) -> Deferred[None]:
        def run(group):
            group.txn.execute("UPDATE directory SET certificate = ? WHERE identity = ?",
                        (certificate, identity))

        return self._write(run)

    def enqueue_message(
        self, recipient: str, sender: str, message_id: bytes, envelope: bytes, now: int
    ) -> Deferred[StoredMessage | None]:
        return self._write(_Enqueue(recipient, sender, message_id, digest(envelope), envelope,
                                    now))

    def pending(self, recipient: str, after_seq: int, limit: int) -> Deferred[list[StoredMessage]]:
        def run(txn):
            rows = txn.execute(
                "SELECT seq, recipient, sender, message_id, envelope, accepted_at, kind"
                " FROM messages WHERE recipient = ? AND seq > ? ORDER BY seq LIMIT ?",
                (recipient, after_seq, limit),
            ).fetchall()
            return [
                StoredMessage(seq, rcpt, sender, bytes(mid), bytes(env), at, kind)
                for seq, rcpt, sender, mid, env, at, kind in rows
            ]

        return self._pool.runInteraction(run)

    def delete(self, recipient: str, message_id: bytes, now: int) -> Deferred[bool]:
        return self._write(_Delete(recipient, message_id, now))

    def count(self, recipient: str) -> Deferred[int]:
        def run(txn):
            row = txn.execute(
                "SELECT messages FROM mailboxes WHERE recipient = ?", (recipient,)
            ).fetchone()
            return 0 if row is None else row[0]

        return self._pool.runInteraction(run)

    def expire(self, before: int, now: int, text: str, limit: int) -> Deferred[list[StoredMessage]]:
        def run(group):
            txn = group.txn
            # Oldest first by seq, which follows acceptance; the scan stops at
            # the first message young enough.  (Should the clock have stepped
            # back, a message accepted before the step waits for the next
            # sweep after the younger ones in front of it: late, never early.)
            cursor = txn.execute(
                "SELECT seq, recipient, sender, message_id, digest, size, accepted_at"
                " FROM messages WHERE kind = 0 ORDER BY seq"
            )
            rows = []
            for row in cursor:
                if row[6] >= before or len(rows) >= limit:
                    break
                rows.append(row)
            expired = []
            for seq, recipient, sender, message_id, d, size, accepted_at in rows:
                body = notice_body(bytes(message_id), accepted_at, text)
                txn.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                txn.execute(
                    "INSERT OR REPLACE INTO acked (recipient, message_id, sender, digest, acked_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (recipient, message_id, sender, d, now),
                )
                notice_id = new_notice_id()
                txn.execute(
                    "INSERT INTO messages (seq, recipient, sender, message_id, digest, envelope,"
                    " size, accepted_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (group.next_seq(), recipient, sender, notice_id, digest(body), body,
                     len(body), now, wire.NOTICE_EXPIRED),
                )
                # The notice takes the message's place in the mailbox's
                # usage; it counts for no sender.
                group.change(recipient, 0, len(body) - size)
                group.change_sender((recipient, sender), -1, -size)
                expired.append(StoredMessage(seq, recipient, sender, bytes(message_id), b"",
                                             accepted_at))
            return expired

        return self._write(run)

    def forget_acknowledged(self, before: int) -> Deferred[int]:
        def run(group):
            return group.txn.execute("DELETE FROM acked WHERE acked_at < ?", (before,)).rowcount

        return self._write(run)
