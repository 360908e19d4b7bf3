"""
The storage interface every engine implements.

Every method returns a L{Deferred}.  The promises the relay builds on:

  - L{MailboxStore.enqueue} fires only after the message is durably
    committed (for engines that are durable at all).
  - Messages of one mailbox come back from L{MailboxStore.pending} in the
    order they were enqueued (by C{seq}, which only grows).
  - A message leaves its mailbox only through L{MailboxStore.delete}.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from mailrelay import wire


class StoreError(Exception):
    """The store could not do what was asked; nothing was changed."""


def _limits(messages: int, size: int) -> str:
    """C{1000} messages and C{67108864} bytes as the sender is told them (0: none)."""
    return " and ".join(
        [f"{messages} messages"] * bool(messages) + [f"{size} bytes"] * bool(size))


class QuotaRefusal(StoreError):
    """
    A message refused by a L{Quota}.  Its text is for the sender and gives
    no figure of what the mailbox holds (that would tell one sender how
    much the others send the recipient); C{detail} has the figures, for
    the relay's log alone.
    """

    def __init__(self, text: str, detail: str = "") -> None:
        super().__init__(text)
        self.detail = detail


class MailboxFull(QuotaRefusal):
    """The recipient's mailbox is at its quota of messages or bytes."""


class SenderQuotaFull(QuotaRefusal):
    """
    The sender already holds in the recipient's mailbox as many messages,
    or bytes, as one sender may: the mailbox may still have room for others.
    """


class DuplicateId(StoreError):
    """The message id is already used in that mailbox for another envelope."""


@dataclass(frozen=True)
class Quota:
    """
    What may wait in one mailbox; 0 means no limit.  C{messages} and
    C{bytes} bound the whole mailbox: the envelopes waiting and the relay's
    own notices (their stored bodies).  C{sender_messages} and
    C{sender_bytes} bound what one sender holds in it (its envelopes; the
    notices count for no sender), so that one sender cannot fill a mailbox
    for everyone else.

    Both engines keep the usage these read incrementally, per mailbox and
    per (mailbox, sender), changed with every write of a message; they
    apply the rules here (L{refusal}), after recognising a retry and a
    reused id.
    """

    messages: int = 10_000
    bytes: int = 256 * 1024 * 1024
    sender_messages: int = 1_000
    sender_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        # The four bounds, "no limit" as more than any count or size: the
        # common case, every limit far, is then one test per send.
        unbounded = 2**63
        object.__setattr__(self, "_bounds", (
            self.sender_messages or unbounded, self.sender_bytes or unbounded,
            self.messages or unbounded, self.bytes or unbounded))

    def refusal(self, mailbox: Sequence[int], sender: Sequence[int],
                size: int) -> QuotaRefusal | None:
        """
        Why a new envelope of C{size} bytes may not join a mailbox holding
        C{mailbox} (messages, bytes), C{sender} of it its sender's; None if
        it may.  The sender's own cap is checked first: a sender at its cap
        hears so whatever the mailbox holds, and waits for its own messages
        to be delivered rather than for the mailbox to drain.
        """
        held, held_bytes = sender
        count, used = mailbox
        sender_messages, sender_bytes, messages, total = self._bounds
        if held >= sender_messages or held_bytes + size > sender_bytes:
            return SenderQuotaFull(
                f"one sender may have at most {_limits(self.sender_messages, self.sender_bytes)}"
                f" waiting in a mailbox",
                f"the sender has {held} messages, {held_bytes} bytes waiting; {size} bytes more"
                f" refused (--quota-per-sender, --quota-per-sender-bytes)")
        if count >= messages or used + size > total:
            return MailboxFull(
                "mailbox is full",
                f"{count} messages, {used} bytes waiting; {size} bytes more refused"
                f" (--quota-messages, --quota-bytes)")
        return None


KIND_MESSAGE = 0
"""A stored row holding a sender's envelope."""


@dataclass(frozen=True)
class StoredMessage:
    """
    One entry of a mailbox.  Most hold a sender's envelope (C{kind}
    L{KIND_MESSAGE}).  The relay's own notices (C{kind} one of
    L{wire.NOTICE_KINDS}) hold, under a fresh id of their own, what the
    recipient is told about a message it will never get: C{sender} is that
    message's sender and C{envelope} its L{notice_body}.
    """

    seq: int
    recipient: str
    sender: str
    message_id: bytes
    envelope: bytes
    accepted_at: int
    kind: int = KIND_MESSAGE

    def frame(self) -> wire.Deliver | wire.Notice:
        """What the recipient's session is sent for this entry."""
        if self.kind == KIND_MESSAGE:
            return wire.Deliver(self.message_id, self.envelope)
        about, accepted_at, text = parse_notice_body(self.envelope)
        return wire.Notice(self.message_id, self.kind, self.sender, about, accepted_at, text)


_NOTICE_HEAD = struct.Struct(">16sQ")


def notice_body(message_id: bytes, accepted_at: int, text: str) -> bytes:
    """How a notice about C{message_id} is kept in the store."""
    return _NOTICE_HEAD.pack(message_id, accepted_at) + text.encode("utf-8")


def parse_notice_body(body: bytes) -> tuple[bytes, int, str]:
    message_id, accepted_at = _NOTICE_HEAD.unpack_from(body)
    return message_id, accepted_at, body[_NOTICE_HEAD.size:].decode("utf-8", "replace")


def new_notice_id() -> bytes:
    """Notices get ids of their own, as random as message ids."""
    return os.urandom(wire.MESSAGE_ID_SIZE)


def digest(envelope: bytes) -> bytes:
    """What makes a retry of the same message recognisable."""
    return hashlib.sha256(envelope).digest()


class Engine:
    """
    What every engine shares: L{MailboxStore.enqueue} is
    L{MailboxStore.enqueue_message} answering True or False.
    """

    def enqueue(
        self, recipient: str, sender: str, message_id: bytes, envelope: bytes, now: int
    ) -> Deferred[bool]:
        return self.enqueue_message(recipient, sender, message_id, envelope, now).addCallback(
            _is_new
        )


def _is_new(message: StoredMessage | None) -> bool:
    return message is not None


class MailboxStore(Protocol):
    def start(self) -> Deferred[None]:
        """Open the store (create or upgrade its schema)."""

    def stop(self) -> Deferred[None]:
        """Close the store; nothing is lost that was committed."""

    def get_key(self, identity: str) -> Deferred[bytes | None]:
        """The directory's DER public key for C{identity}, or None."""

    def register_key(self, identity: str, public_key: bytes, now: int) -> Deferred[bytes]:
        """
        Register C{public_key} for C{identity} unless a key is already
        registered; fire with the key on record afterwards (the caller
        compares it with its own to detect a conflict).
        """

    def rotate_key(self, identity: str, rotation: wire.Rotation,
                   certificate: bytes) -> Deferred[bool]:
        """
        Replace C{identity}'s key C{rotation.old_key} by C{rotation.new_key}
        (and its certificate by C{certificate}), keeping the signed rotation
        whole (both signatures, the old key's certificate); fires False,
        changing nothing, when the old key is not the key registered.
        """

    def get_rotations(self, identity: str) -> Deferred[list[wire.Rotation]]:
        """The identity's rotations, oldest first, as L{rotate_key} kept them."""

    def get_certificate(self, identity: str) -> Deferred[bytes]:
        """The certificate (DER) kept for C{identity}, or empty bytes."""

    def set_certificate(self, identity: str, certificate: bytes) -> Deferred[None]:
        """Keep C{certificate} (DER) for C{identity}, in place of any before."""

    def enqueue(
        self, recipient: str, sender: str, message_id: bytes, envelope: bytes, now: int
    ) -> Deferred[bool]:
        """
        Commit a message to C{recipient}'s mailbox.  Fires True once stored,
        False when the very same envelope was already accepted (a retry:
        nothing new is stored), or fails.  Decided in this order: a retry
        of a message stored, acknowledged or expired fires False whatever
        the quota; an id already used for another envelope or sender fails
        with L{DuplicateId}; then the sender's cap (L{SenderQuotaFull}) and
        the mailbox's quota (L{MailboxFull}), as L{Quota.refusal} says.
        """

    def enqueue_message(
        self, recipient: str, sender: str, message_id: bytes, envelope: bytes, now: int
    ) -> Deferred[StoredMessage | None]:
        """
        L{enqueue}, firing with the message as stored (its C{seq} included)
        rather than True, and None rather than False: the relay hands a
        message just committed for a connected recipient straight to its
        session, without reading it back.
        """

    def pending(self, recipient: str, after_seq: int, limit: int) -> Deferred[list[StoredMessage]]:
        """Up to C{limit} messages of the mailbox with C{seq > after_seq}, oldest first."""

    def delete(self, recipient: str, message_id: bytes, now: int) -> Deferred[bool]:
        """Remove a delivered message; fires False when it was not there."""

    def count(self, recipient: str) -> Deferred[int]:
        """How many messages wait in the mailbox."""

    def expire(self, before: int, now: int, text: str, limit: int) -> Deferred[list[StoredMessage]]:
        """
        Remove up to C{limit} messages accepted before C{before} (Unix
        seconds), oldest first (in acceptance order, up to the first message
        that is young enough), and leave in each one's mailbox, in the same
        transaction, a notice (kind L{wire.NOTICE_EXPIRED}) that tells the
        recipient which message of which sender it will never get, and
        C{text} why.  An expired message counts as settled: a retry of it is
        recognised, not stored again.  The notice takes the message's place
        in the mailbox's usage (L{Quota.messages}, L{Quota.bytes}), and in
        no sender's.  Fires with the messages removed.
        """

    def forget_acknowledged(self, before: int) -> Deferred[int]:
        """
        Forget the ids of messages acknowledged before C{before} (Unix
        seconds): a retry of those is no longer recognised.  Fires with how
        many were forgotten.
        """
