"""The SQLite files a client keeps in its home (inbox, outbox)."""

from __future__ import annotations

import os
import sqlite3


def open_home_db(path: str, schema: str, probe: str) -> sqlite3.Connection:
    """
    Open (creating) the file at C{path}, mode 0600, in WAL mode with
    C{synchronous=FULL}, with C{schema} applied and C{probe} read once, so a
    file that is not this kind of database fails here.  Raises
    C{sqlite3.Error} or C{OSError}; nothing is left open then.
    """
    db = None
    try:
        db = sqlite3.connect(path, isolation_level=None)
        os.chmod(path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        db.execute(probe).fetchall()
    except BaseException:
        if db is not None:
            db.close()
        raise
    return db
