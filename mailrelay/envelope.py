"""
Sealing and opening envelopes: pure functions over bytes.

Suite C{rsa} (1), the only one so far::

    header      version u8 = 2, suite u8 = 1,
                sender id, sender key fingerprint (32),
                recipient id, recipient key fingerprint (32),
                message id (16), timestamp u64 (Unix seconds),
                sequence u64 (version 2 only); timestamp and sequence
                at most 2**63 - 1 (L{MAX_TIME_SEQ}), else malformed
    wrapped key u16 length + RSA-OAEP(SHA-256, MGF1-SHA-256) of a fresh AES-256 key
    nonce       12 random bytes
    ciphertext  u32 length + AES-256-GCM(plaintext, associated data = header)
    signature   u16 length + RSA-PSS-SHA256 by the sender over every byte above

Identities are encoded as in L{mailrelay.encoding} (u8 length + ASCII).
The sequence number counts the sender's messages to this recipient (1, 2,
3...; 0 for a message sent outside any sequence): being signed, it lets the
recipient notice a message the relay withheld or reordered.  Version 1
envelopes, without it, are still opened (as sequence 0).
The relay reads the header (L{read_header}) to route an envelope; only the
recipient can open it (L{open_envelope}), and only after the signature checks
out against the sender key the recipient already trusts.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailrelay import keys
from mailrelay.encoding import Reader, Writer, valid_identity
from mailrelay.wire import MAX_ENVELOPE, MESSAGE_ID_SIZE

VERSION = 2
VERSIONS = (1, 2)
"""Envelope versions this code opens; it seals only L{VERSION}."""
SUITE_RSA = 1
FINGERPRINT_SIZE = 32
NONCE_SIZE = 12
AES_KEY_SIZE = 32
MAX_WRAPPED_KEY = 1024
MAX_SIGNATURE = 1024
MAX_TIME_SEQ = 2**63 - 1
"""
The largest timestamp and sequence number an envelope may carry, though
both are u64 on the wire: relay and client keep them as SQLite INTEGERs
(signed 64 bits), so an envelope beyond this is malformed (refused by the
relay, not opened by the client) rather than stored and never kept.
"""

OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


class EnvelopeError(Exception):
    """An envelope that is malformed, not for us, or not authentic."""


class EnvelopeTooLarge(EnvelopeError):
    pass


@dataclass(frozen=True)
class Header:
    version: int
    suite: int
    sender: str
    sender_fingerprint: bytes
    recipient: str
    recipient_fingerprint: bytes
    message_id: bytes
    timestamp: int
    seq: int = 0

    def encode(self) -> bytes:
        w = (
            Writer()
            .u8(self.version)
            .u8(self.suite)
            .identity(self.sender)
            .raw(self.sender_fingerprint)
            .identity(self.recipient)
            .raw(self.recipient_fingerprint)
            .raw(self.message_id)
            .u64(self.timestamp)
        )
        if self.version >= 2:
            w.u64(self.seq)
        elif self.seq:
            raise ValueError("a version 1 header has no sequence number")
        return w.getvalue()


@dataclass(frozen=True)
class Envelope:
    """A parsed, not yet verified, envelope."""

    header: Header
    header_bytes: bytes
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes
    signed: bytes
    signature: bytes


@dataclass(frozen=True)
class Opened:
    """A verified, decrypted message."""

    header: Header
    plaintext: bytes

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def message_id(self) -> bytes:
        return self.header.message_id


def new_message_id() -> bytes:
    """128 random bits."""
    return os.urandom(MESSAGE_ID_SIZE)


def overhead(sender: str, recipient: str, key_bytes: int = keys.KEY_BITS // 8) -> int:
    """Bytes an envelope adds to its plaintext, for C{key_bytes}-byte RSA keys."""
    header = 2 + 2 + len(sender) + len(recipient) + 2 * FINGERPRINT_SIZE + MESSAGE_ID_SIZE + 16
    return header + 2 + key_bytes + NONCE_SIZE + 4 + 16 + 2 + key_bytes


def seal(
    sender: keys.Identity,
    recipient: str,
    recipient_key: rsa.RSAPublicKey,
    plaintext: bytes,
    message_id: bytes | None = None,
    timestamp: int | None = None,
    max_envelope: int = MAX_ENVELOPE,
    seq: int = 0,
) -> bytes:
    """
    Encrypt C{plaintext} for C{recipient} and sign it as C{sender}, as
    message number C{seq} of the sender to that recipient (0: none).
    Raises L{EnvelopeTooLarge} when the result would exceed C{max_envelope}.
    """
    if message_id is None:
        message_id = new_message_id()
    if len(message_id) != MESSAGE_ID_SIZE:
        raise ValueError("a message id is 16 bytes")
    if not 0 <= seq <= MAX_TIME_SEQ:
        raise ValueError(f"a sequence number is 0 to {MAX_TIME_SEQ}, not {seq}")
    if timestamp is not None and not 0 <= timestamp <= MAX_TIME_SEQ:
        raise ValueError(f"a timestamp is 0 to {MAX_TIME_SEQ}, not {timestamp}")
    limit = max_envelope - overhead(
        sender.name, recipient, max(sender.public_key.key_size, recipient_key.key_size) // 8
    )
    if len(plaintext) > limit:
        raise EnvelopeTooLarge(
            f"message of {len(plaintext)} bytes is over the limit of {max(limit, 0)} bytes"
        )
    header = Header(
        version=VERSION,
        suite=SUITE_RSA,
        sender=sender.name,
        sender_fingerprint=sender.fingerprint,
        recipient=recipient,
        recipient_fingerprint=keys.fingerprint(keys.public_der(recipient_key)),
        message_id=message_id,
        timestamp=int(time.time()) if timestamp is None else timestamp,
        seq=seq,
    )
    header_bytes = header.encode()
    content_key = AESGCM.generate_key(bit_length=AES_KEY_SIZE * 8)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(content_key).encrypt(nonce, plaintext, header_bytes)
    try:
        wrapped = recipient_key.encrypt(content_key, OAEP)
    except ValueError as e:
        raise EnvelopeError(f"cannot seal for {recipient!r}'s key: {e}") from None
    signed = Writer().raw(header_bytes).blob16(wrapped).raw(nonce).blob32(ciphertext).getvalue()
    signature = sender.sign(signed)
    envelope = Writer().raw(signed).blob16(signature).getvalue()
    if len(envelope) > max_envelope:
        raise EnvelopeTooLarge(f"envelope of {len(envelope)} bytes is over {max_envelope}")
    return envelope


def _read_header(r: Reader) -> Header:
    version = r.u8("envelope version")
    if version not in VERSIONS:
        raise EnvelopeError(f"unsupported envelope version {version}")
    suite = r.u8("suite")
    if suite != SUITE_RSA:
        raise EnvelopeError(f"unsupported envelope suite {suite}")
    header = Header(
        version,
        suite,
        r.identity("sender"),
        r.raw(FINGERPRINT_SIZE, "sender fingerprint"),
        r.identity("recipient"),
        r.raw(FINGERPRINT_SIZE, "recipient fingerprint"),
        r.raw(MESSAGE_ID_SIZE, "message id"),
        r.u64("timestamp"),
        r.u64("sequence number") if version >= 2 else 0,
    )
    if header.timestamp > MAX_TIME_SEQ:
        raise EnvelopeError(
            f"timestamp {header.timestamp} is out of range (at most {MAX_TIME_SEQ})")
    if header.seq > MAX_TIME_SEQ:
        raise EnvelopeError(
            f"sequence number {header.seq} is out of range (at most {MAX_TIME_SEQ})")
    return header


def parse_header(data: bytes) -> Header:
    """A header on its own (as L{Header.encode} wrote it), strictly."""
    r = Reader(data, EnvelopeError)
    header = _read_header(r)
    r.end("header")
    return header


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TIME_SEQ = struct.Struct(">QQ")
_names: dict[bytes, str] = {}
"""Identity fields already found valid, decoded: the relay sees the same few often."""
_MAX_NAMES = 65_536


def _name(field: bytes) -> str | None:
    name = _names.get(field)
    if name is None:
        try:
            name = field.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not valid_identity(name):
            return None
        if len(_names) >= _MAX_NAMES:
            _names.clear()
        _names[field] = name
    return name


def _route(data: bytes, max_envelope: int) -> Header | None:
    """
    L{read_header} for the common case, a well-formed version 2 envelope,
    in a few slices; None for anything else, which the strict reader then
    judges (and words the error for).
    """
    size = len(data)
    if size < 3 or data[0] != 2 or data[1] != SUITE_RSA:
        return None
    sender_end = 3 + data[2]
    sender_fingerprint_end = sender_end + FINGERPRINT_SIZE
    if sender_fingerprint_end >= size:
        return None
    sender = _name(data[3:sender_end])
    recipient_start = sender_fingerprint_end + 1
    recipient_end = recipient_start + data[sender_fingerprint_end]
    recipient_fingerprint_end = recipient_end + FINGERPRINT_SIZE
    id_end = recipient_fingerprint_end + MESSAGE_ID_SIZE
    offset = id_end + _TIME_SEQ.size
    if sender is None or offset + 2 > size:
        return None
    recipient = _name(data[recipient_start:recipient_end])
    if recipient is None:
        return None
    timestamp, seq = _TIME_SEQ.unpack_from(data, id_end)
    if (timestamp | seq) > MAX_TIME_SEQ:
        return None
    (wrapped,) = _U16.unpack_from(data, offset)
    offset += 2 + wrapped + NONCE_SIZE
    if wrapped > MAX_WRAPPED_KEY or offset + 4 > size:
        return None
    (ciphertext,) = _U32.unpack_from(data, offset)
    offset += 4 + ciphertext
    if ciphertext > max_envelope or offset + 2 > size:
        return None
    (signature,) = _U16.unpack_from(data, offset)
    if signature > MAX_SIGNATURE or offset + 2 + signature != size:
        return None
    return Header(2, SUITE_RSA, sender, data[sender_end:sender_fingerprint_end], recipient,
                  data[recipient_end:recipient_fingerprint_end],
                  data[recipient_fingerprint_end:id_end], timestamp, seq)


def read_header(data: bytes, max_envelope: int = MAX_ENVELOPE) -> Header:
    """
    The header of a whole envelope, which must be as well formed as for
    L{parse} (the same errors), without copying its other parts: what the
    relay needs to route an envelope it cannot open.
    """
    if len(data) > max_envelope:
        raise EnvelopeTooLarge(f"envelope of {len(data)} bytes is over {max_envelope}")
    header = _route(data, max_envelope)
    if header is not None:
        return header
    r = Reader(data, EnvelopeError)
    header = _read_header(r)
    r.skip_blob16("wrapped key", MAX_WRAPPED_KEY)
    r.skip(NONCE_SIZE, "nonce")
    r.skip_blob32("ciphertext", max_envelope)
    r.skip_blob16("signature", MAX_SIGNATURE)
    r.end("envelope")
    return header


def parse(data: bytes, max_envelope: int = MAX_ENVELOPE) -> Envelope:
    """
    Split an envelope into its parts, strictly, without any cryptography.
    Anything malformed raises L{EnvelopeError}.
    """
    if len(data) > max_envelope:
        raise EnvelopeTooLarge(f"envelope of {len(data)} bytes is over {max_envelope}")
    r = Reader(data, EnvelopeError)
    header = _read_header(r)
    header_end = len(data) - r.remaining()
    wrapped = r.blob16("wrapped key", MAX_WRAPPED_KEY)
    nonce = r.raw(NONCE_SIZE, "nonce")
    ciphertext = r.blob32("ciphertext", max_envelope)
    signed_end = len(data) - r.remaining()
    signature = r.blob16("signature", MAX_SIGNATURE)
    r.end("envelope")
    return Envelope(
        header,
        bytes(data[:header_end]),
        wrapped,
        nonce,
        ciphertext,
        bytes(data[:signed_end]),
        signature,
    )


def open_envelope(
    envelope: Envelope | bytes,
    recipient: keys.Identity,
    sender_key: rsa.RSAPublicKey,
) -> Opened:
    """
    Verify and decrypt an envelope addressed to C{recipient}.

    C{sender_key} is the key the recipient trusts for the sender the header
    names (its pinned key).  The checks run in this order, and the first
    failure raises L{EnvelopeError}, returning nothing of the plaintext:
    addressed to this identity and key; sender key fingerprint matches the
    trusted key; signature valid; key unwraps; ciphertext authentic.
    """
    if isinstance(envelope, (bytes, bytearray, memoryview)):
        envelope = parse(bytes(envelope))
    h = envelope.header
    if h.recipient != recipient.name:
        raise EnvelopeError(
            f"envelope is addressed to {h.recipient!r}, not to {recipient.name!r}"
        )
    if h.recipient_fingerprint != recipient.fingerprint:
        raise EnvelopeError(
            f"envelope is sealed for another key of {h.recipient!r} "
            f"({keys.format_fingerprint(h.recipient_fingerprint)})"
        )
    trusted = keys.fingerprint(keys.public_der(sender_key))
    if h.sender_fingerprint != trusted:
        raise EnvelopeError(
            f"envelope claims a key for {h.sender!r} "
            f"({keys.format_fingerprint(h.sender_fingerprint)}) that is not the one "
            f"trusted ({keys.format_fingerprint(trusted)})"
        )
    if not keys.verify(sender_key, envelope.signature, envelope.signed):
        raise EnvelopeError(
            f"signature of {h.sender!r} does not verify: envelope altered or forged")
    content_key = unwrap_content_key(recipient.private_key, envelope.wrapped_key)
    if len(content_key) != AES_KEY_SIZE:
        raise EnvelopeError("content key has the wrong size")
    plaintext = open_content(content_key, envelope.nonce, envelope.ciphertext,
                             envelope.header_bytes)
    return Opened(h, plaintext)


def unwrap_content_key(private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """RSA-OAEP (SHA-256, MGF1-SHA-256, no label) unwrap; L{EnvelopeError} if it fails."""
    try:
        return private_key.decrypt(wrapped, OAEP)
    except ValueError:
        raise EnvelopeError("content key does not unwrap with our private key") from None


def open_content(content_key: bytes, nonce: bytes, ciphertext: bytes, header_bytes: bytes) -> bytes:
    """AES-256-GCM open with the header as associated data; L{EnvelopeError} if it fails."""
    try:
        return AESGCM(content_key).decrypt(nonce, ciphertext, header_bytes)
    except InvalidTag:
        raise EnvelopeError("ciphertext does not authenticate") from None
