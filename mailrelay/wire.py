"""
Frames of the relay protocol and their codec: pure functions over bytes.

On the wire each frame is a 4-byte big-endian length, then that many bytes:
one type byte and the frame's body.  L{docs/protocol.md} describes every
frame, the session state in which it is allowed and every error code; this
module is its executable form.  Decoding is strict: an unknown type, a
truncated or over-long field, trailing bytes or an out-of-range value raise
L{ProtocolError}, never anything else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Union

from mailrelay.encoding import Reader, Writer

PROTOCOL_VERSION = 3

MAX_ENVELOPE = 256 * 1024
"""The default largest envelope, in bytes, a relay accepts."""

LARGEST_ENVELOPE = 64 * 1024 * 1024
"""
The largest envelope any relay may be configured to accept.  Clients accept
deliveries up to this size whatever the relay's current limit: a message
stored under a higher limit must still come out after the limit is lowered.
"""

FRAME_OVERHEAD = 64
"""Room in a frame for the type, a message id and length prefixes."""

CHALLENGE_SIZE = 32
MESSAGE_ID_SIZE = 16
PING_SIZE = 8
MAX_KEY_SIZE = 4096
"""The largest DER public key accepted: ample for RSA-8192."""
MAX_SIGNATURE_SIZE = 2048
MAX_CERTIFICATE_SIZE = 4096
"""The largest DER certificate carried in AUTH or KEY."""
MAX_ERROR_TEXT = 1024
MAX_ERROR_REF = 64

LENGTH_PREFIX = struct.Struct(">I")


AUTH_CONTEXT = b"mailrelay auth v1"


MIN_FRAME_ROOM = 8192
"""Room every connection allows whatever the envelope limit: enough for any non-envelope frame."""


def max_frame_for(max_envelope: int) -> int:
    return max(max_envelope, MIN_FRAME_ROOM) + FRAME_OVERHEAD


BINDING_NONE = 0
BINDING_TLS_EXPORTER = 1
TLS_EXPORTER_LABEL = b"EXPORTER-mailrelay-auth-v1"
CHANNEL_BINDING_SIZE = 32


def auth_transcript(
    challenge: bytes,
    relay: str,
    identity: str,
    receive: bool = True,
    channel_binding: bytes = b"",
) -> bytes:
    """
    What a client signs to authenticate: a context label, the relay's
    challenge, the relay's id, the client's own id, whether the session
    receives, and the channel binding (the TLS exporter value of this very
    connection when the relay terminates TLS itself, else empty), each
    length-prefixed so no two transcripts share an encoding.

    The channel binding is what stops a relay (or anyone the client was
    induced to connect to) from passing the challenge of another relay to
    the client and the signed answer back: the answer is good only on the
    TLS connection it was made on.
    """
    return (
        Writer()
        .blob16(AUTH_CONTEXT)
        .blob16(challenge)
        .identity(relay)
        .identity(identity)
        .u8(1 if receive else 0)
        .blob16(channel_binding)
        .getvalue()
    )


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid frame."""


class ErrorCode(enum.IntEnum):
    """
    The codes of an L{Error} frame.  Codes below 100 are fatal: the relay
    closes the connection after sending them.  Codes of 100 and above answer
    one request and the session goes on.
    """

    MALFORMED_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNEXPECTED_FRAME = 3
    AUTH_FAILED = 4
    AUTH_TIMEOUT = 5
    KEY_CONFLICT = 6
    IDLE_TIMEOUT = 7
    SUPERSEDED = 8
    SHUTTING_DOWN = 9
    INTERNAL_ERROR = 10
    BUSY = 11
    FRAME_TIMEOUT = 12

    UNKNOWN_IDENTITY = 100
    BAD_ENVELOPE = 101
    SENDER_MISMATCH = 102
    RECIPIENT_KEY_MISMATCH = 103
    MAILBOX_FULL = 104
    DUPLICATE_ID = 105
    UNKNOWN_MESSAGE = 106
    STORE_FAILED = 107
    RATE_LIMITED = 108
    ROTATION_REFUSED = 109
    SENDER_QUOTA = 110

    @property
    def fatal(self) -> bool:
        return self.value < 100


@dataclass(frozen=True)
class Hello:
    """
    Relay to client, first frame of a session: who the relay is, the
    challenge, and the channel binding the answer must include
    (L{BINDING_NONE} or L{BINDING_TLS_EXPORTER}).
    """

    TYPE: ClassVar[int] = 0x01
    version: int
    relay: str
    challenge: bytes
    binding: int = BINDING_NONE


@dataclass(frozen=True)
class Auth:
    """
    Client to relay: the identity, its public key and proof of holding its
    private key.  C{receive} asks for the mailbox to be delivered to this
    session; a session that only sends or looks keys up leaves it unset, so
    it neither takes messages nor displaces the identity's receiving session.
    """

    TYPE: ClassVar[int] = 0x02
    version: int
    identity: str
    public_key: bytes
    signature: bytes
    receive: bool = True
    certificate: bytes = b""
    """DER X.509 certificate binding the identity to the key (empty: none)."""


@dataclass(frozen=True)
class Welcome:
    """
    Relay to client: authentication succeeded.  C{registered} tells whether
    the key was registered by this session (first use of the identity),
    C{queued} how many messages wait in the mailbox, C{max_envelope} the
    largest envelope this relay accepts, C{ttl} how long it keeps a message
    (clients bound how long a contact's retired key may still sign by it).
    """

    TYPE: ClassVar[int] = 0x03
    registered: bool
    queued: int
    max_envelope: int
    ttl: int = 0
    """Seconds a message waits in a mailbox before it expires (0: never)."""


@dataclass(frozen=True)
class Lookup:
    """Client to relay: ask the directory for an identity's public key."""

    TYPE: ClassVar[int] = 0x10
    identity: str


@dataclass(frozen=True)
class Rotation:
    """
    One key rotation of an identity, as the relay keeps it: the statement
    (L{rotation_statement}) that C{new_key} (DER) follows C{old_key} from
    C{timestamp} on, signed by the old key (C{old_signature}: the old key
    hands over) and by the new one (C{new_signature}: the new key vouches
    for the old one as its predecessor).  C{old_certificate} is the
    certificate the relay held for the old key when it took the rotation
    (empty if none): clients that check keys against a CA need it to trust
    a message signed by the old key.

    The relay checks both signatures before it keeps a rotation, but
    clients trust none of this on the relay's word: they check each step
    they use, from a key they already trust.
    """

    old_key: bytes
    new_key: bytes
    timestamp: int
    old_signature: bytes
    new_signature: bytes
    old_certificate: bytes = b""


ROTATION_CONTEXT = b"mailrelay key rotation v1"
MAX_ROTATIONS = 8
"""The most rotations one KEY frame carries: the latest ones."""


def rotation_statement(identity: str, old_key: bytes, new_key: bytes, timestamp: int) -> bytes:
    """What the old key (and, as proof of possession, the new one) signs."""
    return (
        Writer().blob16(ROTATION_CONTEXT).identity(identity).blob16(old_key).blob16(new_key)
        .u64(timestamp).getvalue()
    )


@dataclass(frozen=True)
class Rotate:
    """
    Client to relay: replace this session's key by C{new_key}.  The current
    key signs the rotation statement (C{old_signature}), the new key too
    (C{new_signature}); in CA mode C{certificate} certifies the new key.
    Answered by L{Key} with the new key, or ERROR C{ROTATION_REFUSED}.
    """

    TYPE: ClassVar[int] = 0x12
    new_key: bytes
    timestamp: int
    old_signature: bytes
    new_signature: bytes
    certificate: bytes = b""


@dataclass(frozen=True)
class Key:
    """Relay to client: the directory's public key for an identity."""

    TYPE: ClassVar[int] = 0x11
    identity: str
    public_key: bytes
    certificate: bytes = b""
    """The identity's certificate as the relay holds it (empty: none)."""
    rotations: tuple = ()
    """The latest L{Rotation}s that led to this key, oldest first."""


@dataclass(frozen=True)
class Send:
    """Client to relay: a sealed envelope for the recipient it names."""

    TYPE: ClassVar[int] = 0x20
    envelope: bytes


@dataclass(frozen=True)
class Accepted:
    """Relay to client: the envelope with this message id is committed to the store."""

    TYPE: ClassVar[int] = 0x21
    message_id: bytes


@dataclass(frozen=True)
class Deliver:
    """Relay to client: a message from the client's mailbox."""

    TYPE: ClassVar[int] = 0x22
    message_id: bytes
    envelope: bytes


NOTICE_EXPIRED = 1
"""L{Notice} kind: a message waited longer than the relay keeps messages."""

NOTICE_KINDS = (NOTICE_EXPIRED,)


@dataclass(frozen=True)
class Notice:
    """
    Relay to client: something happened to a message of the client's
    mailbox that the client will now never receive (it expired unread, say).
    Written by the relay, not by the sender: it carries no signature, and
    names the message only by its sender and id.  Delivered and
    acknowledged like a message, under its own C{notice_id}.
    """

    TYPE: ClassVar[int] = 0x24
    notice_id: bytes
    kind: int
    sender: str
    message_id: bytes
    accepted_at: int
    text: str


@dataclass(frozen=True)
class Ack:
    """Client to relay: the delivered message is safely received; delete it."""

    TYPE: ClassVar[int] = 0x23
    message_id: bytes


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[int] = 0x30
    opaque: bytes


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[int] = 0x31
    opaque: bytes


@dataclass(frozen=True)
class Error:
    """
    Either side: a request failed.  C{ref} names what failed: a message id
    for L{Send} and L{Ack}, the identity (UTF-8) for L{Lookup}, else empty.
    """

    TYPE: ClassVar[int] = 0x7F
    code: ErrorCode
    ref: bytes
    text: str

    @property
    def fatal(self) -> bool:
        return self.code.fatal


Frame = Union[
    Hello, Auth, Welcome, Lookup, Key, Rotate, Send, Accepted, Deliver, Notice, Ack, Ping, Pong, Error
]


_FRAME_TYPES = (
    Hello, Auth, Welcome, Lookup, Key, Rotate, Send, Accepted, Deliver, Notice, Ack, Ping, Pong, Error
)


def _flag(reader: Reader, what: str) -> bool:
    value = reader.u8(what)
    if value > 1:
        raise ProtocolError(f"{what} must be 0 or 1, not {value}")
    return bool(value)


def _fixed(reader: Reader, size: int, what: str) -> bytes:
    return reader.raw(size, what)


def _check_fixed(value: bytes, size: int, what: str) -> None:
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, not {len(value)}")


def _check_max(value: bytes, maximum: int, what: str) -> None:
    if len(value) > maximum:
        raise ValueError(f"{what} is {len(value)} bytes, more than {maximum}")


_DELIVER_HEAD = struct.Struct(">IB16sI")
_ID_FRAME_LENGTH = 1 + MESSAGE_ID_SIZE
_ACCEPTED_PREFIX = LENGTH_PREFIX.pack(_ID_FRAME_LENGTH) + bytes([Accepted.TYPE])
_ACK_PREFIX = LENGTH_PREFIX.pack(_ID_FRAME_LENGTH) + bytes([Ack.TYPE])


def encode_deliver(message_id: bytes, envelope: bytes) -> bytes:
    """L{encode} of C{Deliver(message_id, envelope)}, without building the frame."""
    _check_fixed(message_id, MESSAGE_ID_SIZE, "message id")
    if len(envelope) > 0xFFFFFFFF - _DELIVER_HEAD.size:
        raise ValueError(f"{len(envelope)} does not fit an unsigned 32-bit field")
    head = _DELIVER_HEAD.pack(_DELIVER_HEAD.size - 4 + len(envelope), Deliver.TYPE,
                              message_id, len(envelope))
    return head + envelope


def encode(frame: Frame) -> bytes:
    """
    Encode C{frame} with its length prefix, ready for the transport.
    Raises C{ValueError} for a frame that could never be decoded.
    """
    # The frames of every message first, in a few operations.
    kind = type(frame)
    if kind is Accepted or kind is Ack:
        _check_fixed(frame.message_id, MESSAGE_ID_SIZE, "message id")
        return (_ACCEPTED_PREFIX if kind is Accepted else _ACK_PREFIX) + frame.message_id
    if kind is Deliver:
        return encode_deliver(frame.message_id, frame.envelope)
    if not isinstance(frame, _FRAME_TYPES):
        raise TypeError(f"not a frame: {frame!r}")
    w = Writer().u8(frame.TYPE)
    if isinstance(frame, Hello):
        _check_fixed(frame.challenge, CHALLENGE_SIZE, "challenge")
        if frame.binding not in (BINDING_NONE, BINDING_TLS_EXPORTER):
            raise ValueError(f"unknown channel binding {frame.binding}")
        w.u16(frame.version).identity(frame.relay).raw(frame.challenge).u8(frame.binding)
    elif isinstance(frame, Auth):
        _check_max(frame.public_key, MAX_KEY_SIZE, "public key")
        _check_max(frame.signature, MAX_SIGNATURE_SIZE, "signature")
        w.u16(frame.version).identity(frame.identity)
        _check_max(frame.certificate, MAX_CERTIFICATE_SIZE, "certificate")
        w.blob16(frame.public_key).blob16(frame.signature).u8(1 if frame.receive else 0)
        w.blob16(frame.certificate)
    elif isinstance(frame, Welcome):
        w.u8(1 if frame.registered else 0).u32(frame.queued).u32(frame.max_envelope)
        w.u32(frame.ttl)
    elif isinstance(frame, Lookup):
        w.identity(frame.identity)
    elif isinstance(frame, Key):
        _check_max(frame.public_key, MAX_KEY_SIZE, "public key")
        _check_max(frame.certificate, MAX_CERTIFICATE_SIZE, "certificate")
        w.identity(frame.identity).blob16(frame.public_key).blob16(frame.certificate)
        if len(frame.rotations) > MAX_ROTATIONS:
            raise ValueError(f"more than {MAX_ROTATIONS} rotations")
        w.u8(len(frame.rotations))
        for r in frame.rotations:
            _check_max(r.old_key, MAX_KEY_SIZE, "rotated key")
            _check_max(r.new_key, MAX_KEY_SIZE, "rotated key")
            _check_max(r.old_signature, MAX_SIGNATURE_SIZE, "rotation signature")
            _check_max(r.new_signature, MAX_SIGNATURE_SIZE, "rotation signature")
            _check_max(r.old_certificate, MAX_CERTIFICATE_SIZE, "rotated key's certificate")
            w.blob16(r.old_key).blob16(r.new_key).u64(r.timestamp)
            w.blob16(r.old_signature).blob16(r.new_signature).blob16(r.old_certificate)
    elif isinstance(frame, Rotate):
        _check_max(frame.new_key, MAX_KEY_SIZE, "new key")
        _check_max(frame.old_signature, MAX_SIGNATURE_SIZE, "signature")
        _check_max(frame.new_signature, MAX_SIGNATURE_SIZE, "signature")
        _check_max(frame.certificate, MAX_CERTIFICATE_SIZE, "certificate")
        w.blob16(frame.new_key).u64(frame.timestamp).blob16(frame.old_signature)
        w.blob16(frame.new_signature).blob16(frame.certificate)
    elif isinstance(frame, Send):
        w.blob32(frame.envelope)
    elif isinstance(frame, (Accepted, Ack)):
        _check_fixed(frame.message_id, MESSAGE_ID_SIZE, "message id")
        w.raw(frame.message_id)
    elif isinstance(frame, Deliver):
        _check_fixed(frame.message_id, MESSAGE_ID_SIZE, "message id")
        w.raw(frame.message_id).blob32(frame.envelope)
    elif isinstance(frame, Notice):
        _check_fixed(frame.notice_id, MESSAGE_ID_SIZE, "notice id")
        _check_fixed(frame.message_id, MESSAGE_ID_SIZE, "message id")
        if frame.kind not in NOTICE_KINDS:
            raise ValueError(f"unknown notice kind {frame.kind}")
        text = frame.text.encode("utf-8")[:MAX_ERROR_TEXT].decode("utf-8", "ignore")
        w.raw(frame.notice_id).u8(frame.kind).identity(frame.sender).raw(frame.message_id)
        w.u64(frame.accepted_at).text(text)
    elif isinstance(frame, (Ping, Pong)):
        _check_fixed(frame.opaque, PING_SIZE, "ping payload")
        w.raw(frame.opaque)
    elif isinstance(frame, Error):
        text = frame.text.encode("utf-8")[:MAX_ERROR_TEXT].decode("utf-8", "ignore")
        w.u16(int(frame.code)).blob16(frame.ref[:MAX_ERROR_REF]).text(text)
    else:
        raise TypeError(f"not a frame: {frame!r}")
    body = w.getvalue()
    return LENGTH_PREFIX.pack(len(body)) + body


def decode(body: bytes, max_envelope: int = MAX_ENVELOPE) -> Frame:
    """
    Decode one frame from C{body}: the bytes after the length prefix.
    """
    # The frames of every message first: a well-formed SEND or ACK in a
    # slice; anything else about them is left to the strict reader below.
    size = len(body)
    if size == _ID_FRAME_LENGTH and body[0] == Ack.TYPE:
        return Ack(body[1:])
    if size >= 5 and body[0] == Send.TYPE:
        length = int.from_bytes(body[1:5], "big")
        if length == size - 5 and length <= max_envelope:
            return Send(body[5:])
    r = Reader(body, ProtocolError)
    kind = r.u8("frame type")
    frame: Frame
    if kind == Hello.TYPE:
        frame = Hello(r.u16("version"), r.identity("relay id"),
                      _fixed(r, CHALLENGE_SIZE, "challenge"), r.u8("channel binding"))
        if frame.binding not in (BINDING_NONE, BINDING_TLS_EXPORTER):
            raise ProtocolError(f"unknown channel binding {frame.binding}")
    elif kind == Auth.TYPE:
        frame = Auth(r.u16("version"), r.identity("identity"),
                     r.blob16("public key", MAX_KEY_SIZE),
                     r.blob16("signature", MAX_SIGNATURE_SIZE),
                     _flag(r, "receive flag"),
                     r.blob16("certificate", MAX_CERTIFICATE_SIZE))
    elif kind == Welcome.TYPE:
        frame = Welcome(_flag(r, "registered flag"), r.u32("queued count"),
                        r.u32("max envelope"), r.u32("message ttl"))
    elif kind == Lookup.TYPE:
        frame = Lookup(r.identity("identity"))
    elif kind == Key.TYPE:
        identity = r.identity("identity")
        public_key = r.blob16("public key", MAX_KEY_SIZE)
        certificate = r.blob16("certificate", MAX_CERTIFICATE_SIZE)
        count = r.u8("rotation count")
        if count > MAX_ROTATIONS:
            raise ProtocolError(f"{count} rotations, more than {MAX_ROTATIONS}")
        rotations = tuple(
            Rotation(r.blob16("rotated key", MAX_KEY_SIZE), r.blob16("rotated key", MAX_KEY_SIZE),
                     r.u64("rotation time"), r.blob16("rotation signature", MAX_SIGNATURE_SIZE),
                     r.blob16("rotation signature", MAX_SIGNATURE_SIZE),
                     r.blob16("rotated key's certificate", MAX_CERTIFICATE_SIZE))
            for _ in range(count)
        )
        frame = Key(identity, public_key, certificate, rotations)
    elif kind == Rotate.TYPE:
        frame = Rotate(r.blob16("new key", MAX_KEY_SIZE), r.u64("rotation time"),
                       r.blob16("signature", MAX_SIGNATURE_SIZE),
                       r.blob16("signature", MAX_SIGNATURE_SIZE),
                       r.blob16("certificate", MAX_CERTIFICATE_SIZE))
    elif kind == Send.TYPE:
        frame = Send(r.blob32("envelope", max_envelope))
    elif kind == Accepted.TYPE:
        frame = Accepted(_fixed(r, MESSAGE_ID_SIZE, "message id"))
    elif kind == Deliver.TYPE:
        frame = Deliver(_fixed(r, MESSAGE_ID_SIZE, "message id"),
                        r.blob32("envelope", max_envelope))
    elif kind == Notice.TYPE:
        frame = Notice(_fixed(r, MESSAGE_ID_SIZE, "notice id"), r.u8("notice kind"),
                       r.identity("sender"), _fixed(r, MESSAGE_ID_SIZE, "message id"),
                       r.u64("accepted at"), r.text("notice text", MAX_ERROR_TEXT))
        if frame.kind not in NOTICE_KINDS:
            raise ProtocolError(f"unknown notice kind {frame.kind}")
    elif kind == Ack.TYPE:
        frame = Ack(_fixed(r, MESSAGE_ID_SIZE, "message id"))
    elif kind == Ping.TYPE:
        frame = Ping(_fixed(r, PING_SIZE, "ping payload"))
    elif kind == Pong.TYPE:
        frame = Pong(_fixed(r, PING_SIZE, "pong payload"))
    elif kind == Error.TYPE:
        raw_code = r.u16("error code")
        try:
            code = ErrorCode(raw_code)
        except ValueError:
            raise ProtocolError(f"unknown error code {raw_code}") from None
        frame = Error(code, r.blob16("error reference", MAX_ERROR_REF),
                      r.text("error text", MAX_ERROR_TEXT))
    else:
        raise ProtocolError(f"unknown frame type 0x{kind:02x}")
    r.end(type(frame).__name__)
    return frame


COMPACT_AFTER = 64 * 1024
"""Consumed bytes a L{FrameBuffer} may keep before cutting them off."""


class FrameBuffer:
    """
    Reassembles frames from a byte stream.

    The length prefix is checked before any of the body is kept, so a peer
    announcing a huge frame is refused at once.  Bytes are appended to one
    C{bytearray}, read from an offset and compacted once consumed, so a
    frame trickled a byte at a time costs linear, not quadratic, time.

    L{next} decodes one frame at a time, so a reader can change the limit
    between two frames of the same read (a client learns the relay's limit
    from WELCOME, which may arrive together with the first DELIVER).
    """

    def __init__(self, max_envelope: int = MAX_ENVELOPE) -> None:
        self.set_limit(max_envelope)
        self._buffer = bytearray()
        self._offset = 0

    def set_limit(self, max_envelope: int) -> None:
        """Accept envelopes up to C{max_envelope} bytes from now on."""
        self.max_envelope = max_envelope
        self.max_frame = max_frame_for(max_envelope)

    def add(self, data: bytes) -> None:
        """Append received bytes; decode them with L{next}."""
        if self._offset and self._offset == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        self._buffer += data

    def next(self) -> Frame | None:
        """
        The next complete frame, or None until more bytes arrive.  Raises
        L{ProtocolError} for a malformed frame; the stream is unusable after.
        """
        buf, offset = self._buffer, self._offset
        if len(buf) - offset < LENGTH_PREFIX.size:
            return None
        (length,) = LENGTH_PREFIX.unpack_from(buf, offset)
        if length == 0:
            raise ProtocolError("empty frame: a frame needs at least a type byte")
        if length > self.max_frame:
            raise ProtocolError(
                f"frame of {length} bytes is over the limit of {self.max_frame}"
            )
        start = offset + LENGTH_PREFIX.size
        if len(buf) - start < length:
            if offset:
                # Keep only the partial frame, so the buffer never holds
                # more than one frame's worth of consumed bytes.
                del buf[:offset]
                self._offset = 0
            return None
        self._offset = start + length
        frame = decode(bytes(buf[start : start + length]), self.max_envelope)
        if self._offset == len(buf):
            # All consumed: let the storage go now, not at the next read (an
            # idle session would otherwise keep its last frame's bytes).
            buf.clear()
            self._offset = 0
        elif self._offset >= COMPACT_AFTER and self._offset * 2 >= len(buf):
            # A reader that keeps falling behind never empties the buffer:
            # drop what is consumed once it is most of it (amortised linear).
            del buf[: self._offset]
            self._offset = 0
        return frame

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add C{data}; return every frame now complete, in order.  Raises
        L{ProtocolError} at the first malformed frame.
        """
        self.add(data)
        frames: list[Frame] = []
        while (frame := self.next()) is not None:
            frames.append(frame)
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self._buffer) - self._offset
