"""
The relay's key directory: the public key of each identity, registered the
first time the identity authenticates and never silently replaced.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, inlineCallbacks

from mailrelay.relay.store import MailboxStore


class KeyConflict(Exception):
    """The identity is registered with another key."""


class Directory:
    def __init__(self, store: MailboxStore, clock) -> None:
        self._store = store
        self._clock = clock

    def lookup(self, identity: str) -> Deferred[bytes | None]:
        return self._store.get_key(identity)

    @inlineCallbacks
    def claim(self, identity: str, public_key: bytes):
        """
        Bind C{public_key} to C{identity} if the identity is new.  Fires with
        True when this call registered it, False when it was already
        registered with the same key; fails with L{KeyConflict} otherwise.
        """
        existing = yield self._store.get_key(identity)
        if existing is None:
            existing = yield self._store.register_key(
                identity, public_key, int(self._clock.seconds())
            )
            if existing == public_key:
                return True
        if existing != public_key:
            raise KeyConflict(identity)
        return False
