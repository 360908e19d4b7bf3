"""
A throwaway store in memory, for tests and experiments: everything is lost
when the relay stops.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred, fail, succeed

from mailrelay import wire
from mailrelay.relay.store.base import (
    KIND_MESSAGE,
    DuplicateId,
    Engine,
    Quota,
    StoredMessage,
    digest,
    new_notice_id,
    notice_body,
)


_NOTHING = (0, 0)
"""What a sender with no entry holds: no message, no byte."""


class MemoryStore(Engine):
    def __init__(self, quota: Quota = Quota()) -> None:
        self.quota = quota
        self._keys: dict[str, bytes] = {}
        self._certificates: dict[str, bytes] = {}
        self._rotations: dict[str, list[wire.Rotation]] = {}
        # Each mailbox in seq order (dicts keep insertion order, and seq only
        # grows), with its usage kept beside it so no call scans a mailbox.
        self._mailboxes: dict[str, dict[bytes, tuple[StoredMessage, bytes]]] = {}
        self._usage: dict[str, int] = {}
        # What each sender holds in each mailbox, by recipient then sender,
        # as [messages, bytes] changed in place: its envelopes only, not the
        # relay's notices; no entry at zero.
        self._senders: dict[str, dict[str, list[int]]] = {}
        self._acked: dict[tuple[str, bytes], tuple[str, bytes, int]] = {}
        self._seq = 0

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def get_key(self, identity: str) -> Deferred[bytes | None]:
        return succeed(self._keys.get(identity))

    def register_key(self, identity: str, public_key: bytes, now: int) -> Deferred[bytes]:
        return succeed(self._keys.setdefault(identity, public_key))

    def rotate_key(self, identity: str, rotation: wire.Rotation,
                   certificate: bytes) -> Deferred[bool]:
        if self._keys.get(identity) != rotation.old_key:
            return succeed(False)
        self._keys[identity] = rotation.new_key
        self._certificates[identity] = certificate
        self._rotations.setdefault(identity, []).append(rotation)
        return succeed(True)

    def get_rotations(self, identity):
        return succeed(list(self._rotations.get(identity, [])))

    def get_certificate(self, identity: str) -> Deferred[bytes]:
        return succeed(self._certificates.get(identity, b""))

    def set_certificate(self, identity: str, certificate: bytes) -> Deferred[None]:
        self._certificates[identity] = certificate
        return succeed(None)

    def enqueue_message(
        self, recipient: str, sender: str, message_id: bytes, envelope: bytes, now: int
    ) -> Deferred[StoredMessage | None]:
        box = self._mailboxes.setdefault(recipient, {})
        d = digest(envelope)
        previous = box.get(message_id)
        if previous is not None:
            same = previous[0].sender == sender and previous[1] == d
            return succeed(None) if same else fail(DuplicateId(message_id.hex()))
        if (recipient, message_id) in self._acked:
            if self._acked[recipient, message_id][:2] == (sender, d):
                return succeed(None)
            return fail(DuplicateId(message_id.hex()))
        used = self._usage.get(recipient, 0)
        size = len(envelope)
        senders = self._senders.get(recipient)
        held = senders.get(sender) if senders is not None else None
        refusal = self.quota.refusal((len(box), used), held or _NOTHING, size)
        if refusal is not None:
            return fail(refusal)
        self._seq += 1
        message = StoredMessage(self._seq, recipient, sender, message_id, envelope, now)
        box[message_id] = (message, d)
        self._usage[recipient] = used + size
        if held is not None:
            held[0] += 1
            held[1] += size
        elif senders is not None:
            senders[sender] = [1, size]
        else:
            self._senders[recipient] = {sender: [1, size]}
        return succeed(message)

    def _release(self, message: StoredMessage) -> None:
        """A sender's message left its mailbox: it holds that much less there."""
        senders = self._senders[message.recipient]
        held = senders[message.sender]
        if held[0] > 1:
            held[0] -= 1
            held[1] -= len(message.envelope)
        elif len(senders) > 1:
            del senders[message.sender]
        else:
            del self._senders[message.recipient]

    def pending(self, recipient: str, after_seq: int, limit: int) -> Deferred[list[StoredMessage]]:
        found = []
        if limit > 0:
            for message, _ in self._mailboxes.get(recipient, {}).values():
                if message.seq > after_seq:
                    found.append(message)
                    if len(found) == limit:
                        break
        return succeed(found)

    def delete(self, recipient: str, message_id: bytes, now: int) -> Deferred[bool]:
        box = self._mailboxes.get(recipient, {})
        entry = box.pop(message_id, None)
        if entry is None:
            return succeed(False)
        self._usage[recipient] -= len(entry[0].envelope)
        if entry[0].kind == KIND_MESSAGE:
            self._release(entry[0])
        if not box:
            del self._mailboxes[recipient]
            del self._usage[recipient]
        self._acked[recipient, message_id] = (entry[0].sender, entry[1], now)
        return succeed(True)

    def count(self, recipient: str) -> Deferred[int]:
        return succeed(len(self._mailboxes.get(recipient, {})))

    def expire(self, before: int, now: int, text: str, limit: int) -> Deferred[list[StoredMessage]]:
        # As the SQLite engine: oldest first by seq, up to the first young one.
        old = []
        for m in sorted((m for box in self._mailboxes.values() for m, _ in box.values()
                         if m.kind == KIND_MESSAGE), key=lambda m: m.seq):
            if m.accepted_at >= before or len(old) >= limit:
                break
            old.append(m)
        for m in old:
            box = self._mailboxes[m.recipient]
            _, d = box.pop(m.message_id)
            self._usage[m.recipient] -= len(m.envelope)
            self._release(m)
            self._acked[m.recipient, m.message_id] = (m.sender, d, now)
            body = notice_body(m.message_id, m.accepted_at, text)
            self._seq += 1
            notice = StoredMessage(self._seq, m.recipient, m.sender, new_notice_id(), body, now,
                                   wire.NOTICE_EXPIRED)
            box[notice.message_id] = (notice, digest(body))
            self._usage[m.recipient] += len(body)
        return succeed([replace(m, envelope=b"") for m in old])

    def forget_acknowledged(self, before: int) -> Deferred[int]:
        old = [key for key, (_, _, at) in self._acked.items() if at < before]
        for key in old:
            del self._acked[key]
        return succeed(len(old))
