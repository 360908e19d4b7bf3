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


class SeenFileError(Exception):
    """The seen file cannot be opened or read; the message says what to do."""


class SeenFile:
    """
    A small SQLite file in the client's home.  Entries are kept for good
    (each is a few dozen bytes): a relay may deliver an old message again
    at any time, however long ago it was first shown.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS seen (sender TEXT NOT NULL,"
                " message_id BLOB NOT NULL, seen_at INTEGER NOT NULL,"
                " PRIMARY KEY (sender, message_id))"
            )
            db.execute("SELECT sender, message_id, seen_at FROM seen LIMIT 1").fetchall()
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise SeenFileError(
                f"cannot read {self.path}: {e}; move it aside to start afresh "
                f"(messages already shown may then be shown again)"
            ) from None
        self._db = db

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
