"""
The relay's key directory: the public key of each identity, registered the
first time the identity authenticates and never silently replaced.

Registered keys are kept in memory as they are seen: a binding never
changes once made, so the store is asked at most once per identity.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from mailrelay import keys
from mailrelay.relay.store import MailboxStore


class KeyConflict(Exception):
    """The identity is registered with another key."""


class Directory:
    def __init__(self, store: MailboxStore, clock) -> None:
        self._store = store
        self._clock = clock
        self._known: dict[str, bytes] = {}
        self._certificates: dict[str, bytes] = {}
        self._rotations: dict[str, list] = {}
        self._fingerprints: dict[bytes, bytes] = {}

    def known_key(self, identity: str) -> bytes | None:
        """C{identity}'s key if it is in memory; None if L{lookup} has to ask the store."""
        return self._known.get(identity)

    def known_fingerprint(self, identity: str) -> bytes | None:
        """
        The fingerprint of C{identity}'s key when the key is in memory
        (every send to it after the first), without a Deferred; None when
        L{lookup} has to ask the store.
        """
        key = self._known.get(identity)
        if key is None:
            return None
        fingerprint = self._fingerprints.get(key)
        if fingerprint is None:
            fingerprint = self._fingerprints[key] = keys.fingerprint(key)
        return fingerprint

    def lookup(self, identity: str) -> Deferred[bytes | None]:
        known = self._known.get(identity)
        if known is not None:
            return succeed(known)

        def remember(key: bytes | None) -> bytes | None:
            # A read that finishes after a rotation must not bring back the old key.
            return key if key is None else self._known.setdefault(identity, key)

        return self._store.get_key(identity).addCallback(remember)

    def certificate(self, identity: str) -> Deferred[bytes]:
        """The identity's certificate (DER), or empty bytes when it has none."""
        known = self._certificates.get(identity)
        if known is not None:
            return succeed(known)

        def remember(certificate: bytes) -> bytes:
            return self._certificates.setdefault(identity, certificate)

        return self._store.get_certificate(identity).addCallback(remember)

    @inlineCallbacks
    def claim(self, identity: str, public_key: bytes, certificate: bytes = b""):
        """
        Bind C{public_key} to C{identity} if the identity is new.  Fires with
        True when this call registered it, False when it was already
        registered with the same key; fails with L{KeyConflict} otherwise.
        A C{certificate} (already checked by the caller) is kept for the
        identity, replacing an older one (a renewal).
        """
        registered = yield self._claim(identity, public_key)
        if certificate:
            current = yield self.certificate(identity)
            if current != certificate:
                yield self._store.set_certificate(identity, certificate)
                self._certificates[identity] = certificate
        return registered

    @inlineCallbacks
    def rotate(self, identity: str, rotation, certificate: bytes):
        """
        Replace the identity's key by C{rotation.new_key} (a L{wire.Rotation}
        the caller checked), with C{certificate} for the new key; fires True
        if done, False if the old key was no longer the registered one.
        """
        done = yield self._store.rotate_key(identity, rotation, certificate)
        if done:
            self._known[identity] = rotation.new_key
            self._certificates[identity] = certificate
            # Read after the rotation's commit; an older read finishing later
            # only fills an empty entry (setdefault above), never this one.
            self._rotations[identity] = yield self._store.get_rotations(identity)
        return done

    def rotations(self, identity: str) -> Deferred[list]:
        """The identity's rotations, oldest first; read from the store once, like keys."""
        known = self._rotations.get(identity)
        if known is not None:
            return succeed(known)

        def remember(rotations: list) -> list:
            return self._rotations.setdefault(identity, rotations)

        return self._store.get_rotations(identity).addCallback(remember)

    @inlineCallbacks
    def _claim(self, identity: str, public_key: bytes):
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
