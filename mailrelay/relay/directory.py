"""
The relay's key directory: the public key of each identity, registered the
first time the identity authenticates and never silently replaced.

Registered keys are kept in memory as they are seen: a binding never
changes once made, so the store is asked at most once per identity.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from mailrelay.relay.store import MailboxStore


class KeyConflict(Exception):
    """The identity is registered with another key."""


class Directory:
    def __init__(self, store: MailboxStore, clock) -> None:
        self._store = store
        self._clock = clock
        self._known: dict[str, bytes] = {}

    def lookup(self, identity: str) -> Deferred[bytes | None]:
        known = self._known.get(identity)
        if known is not None:
            return succeed(known)

        def remember(key: bytes | None) -> bytes | None:
            if key is not None:
                self._known[identity] = key
            return key

        return self._store.get_key(identity).addCallback(remember)

    @inlineCallbacks
    def claim(self, identity: str, public_key: bytes):
        """
        Bind C{public_key} to C{identity} if the identity is new.  Fires with
        True when this call registered it, False when it was already
        registered with the same key; fails with L{KeyConflict} otherwise.
        """
        existing = yield self.lookup(identity)
        if existing is None:
            existing = yield self._store.register_key(
                identity, public_key, int(self._clock.seconds())
            )
            self._known[identity] = existing
            if existing == public_key:
                return True
        if existing != public_key:
            raise KeyConflict(identity)
        return False
