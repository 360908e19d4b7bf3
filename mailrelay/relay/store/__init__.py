"""
Storage for the relay: the key directory and the mailboxes, behind one
interface (L{MailboxStore}) with two engines, L{memory} and L{sqlite}.
"""

from mailrelay.relay.store.base import (
    DuplicateId,
    MailboxFull,
    MailboxStore,
    Quota,
    SenderQuotaFull,
    StoredMessage,
    StoreError,
)


STORE_FILE = "mailrelay.sqlite"


def open_store(kind: str, data_dir: str | None, quota: Quota, reactor=None) -> MailboxStore:
    """Build the engine named C{kind} (C{"sqlite"} or C{"memory"})."""
    if kind == "memory":
        from mailrelay.relay.store.memory import MemoryStore

        return MemoryStore(quota)
    if kind == "sqlite":
        import os

        from mailrelay.relay.store.sqlite import SQLiteStore

        if data_dir is None:
            raise ValueError("the sqlite store needs a data directory")
        return SQLiteStore(os.path.join(data_dir, STORE_FILE), quota, reactor=reactor)
    raise ValueError(f"unknown store {kind!r}: use sqlite or memory")


__all__ = [
    "DuplicateId",
    "MailboxFull",
    "MailboxStore",
    "Quota",
    "SenderQuotaFull",
    "StoredMessage",
    "StoreError",
    "STORE_FILE",
    "open_store",
]
