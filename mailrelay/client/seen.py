"""
The ids of messages already handed to the application, so a message the
relay delivers again (its ack was lost) is shown once only.
"""

from __future__ import annotations

import os
import sqlite3
import time


class MemorySeen:
    def __init__(self) -> None:
        self._ids: set[tuple[str, bytes]] = set()

    def seen(self, sender: str, message_id: bytes) -> bool:
        return (sender, message_id) in self._ids

    def add(self, sender: str, message_id: bytes) -> None:
        self._ids.add((sender, message_id))


class SeenFile:
    """
    A small SQLite file in the client's home.  Entries older than
    C{keep_days} are pruned when it is opened: the relay drops messages
    after its TTL, so an older id cannot come back.
    """

    def __init__(self, path: str | os.PathLike[str], keep_days: int = 60) -> None:
        self._db = sqlite3.connect(os.fspath(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS seen (sender TEXT NOT NULL, message_id BLOB NOT NULL,"
            " seen_at INTEGER NOT NULL, PRIMARY KEY (sender, message_id))"
        )
        self._db.execute(
            "DELETE FROM seen WHERE seen_at < ?", (int(time.time()) - keep_days * 86400,)
        )

    def seen(self, sender: str, message_id: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM seen WHERE sender = ? AND message_id = ?", (sender, message_id)
        ).fetchone()
        return row is not None

    def add(self, sender: str, message_id: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO seen (sender, message_id, seen_at) VALUES (?, ?, ?)",
            (sender, message_id, int(time.time())),
        )

    def close(self) -> None:
        self._db.close()
