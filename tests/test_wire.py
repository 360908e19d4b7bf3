"""
Tests for L{mailrelay.wire}: the frame codec and L{wire.FrameBuffer}.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import wire
from mailrelay.encoding import IDENTITY_PATTERN, Writer
from mailrelay.wire import (
    Accepted,
    Ack,
    Auth,
    Deliver,
    Error,
    ErrorCode,
    FrameBuffer,
    Hello,
    Key,
    Lookup,
    Notice,
    Ping,
    Rotate,
    Rotation,
    Pong,
    ProtocolError,
    Send,
    Welcome,
)

ALL_FRAME_CLASSES = (
    Hello, Auth, Welcome, Lookup, Key, Rotate, Send, Accepted, Deliver, Notice, Ack, Ping, Pong, Error
)
KNOWN_TYPES = {cls.TYPE for cls in ALL_FRAME_CLASSES}

SETTINGS = settings(max_examples=50, deadline=None)

# Strategies -----------------------------------------------------------------

identities = st.from_regex(IDENTITY_PATTERN, fullmatch=True)
u16 = st.integers(min_value=0, max_value=0xFFFF)
u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
message_ids = st.binary(min_size=wire.MESSAGE_ID_SIZE, max_size=wire.MESSAGE_ID_SIZE)
ping_payloads = st.binary(min_size=wire.PING_SIZE, max_size=wire.PING_SIZE)
envelopes = st.binary(max_size=2048)
# At most 256 characters is at most 1024 UTF-8 bytes: never truncated by encode.
error_texts = st.text(max_size=wire.MAX_ERROR_TEXT // 4)

hellos = st.builds(
    Hello,
    version=u16,
    relay=identities,
    challenge=st.binary(min_size=wire.CHALLENGE_SIZE, max_size=wire.CHALLENGE_SIZE),
)
auths = st.builds(
    Auth,
    version=u16,
    identity=identities,
    public_key=st.binary(max_size=wire.MAX_KEY_SIZE),
    signature=st.binary(max_size=wire.MAX_SIGNATURE_SIZE),
    receive=st.booleans(),
    certificate=st.binary(max_size=wire.MAX_CERTIFICATE_SIZE),
)
welcomes = st.builds(Welcome, registered=st.booleans(), queued=u32, max_envelope=u32, ttl=u32)
lookups = st.builds(Lookup, identity=identities)
rotation_records = st.builds(
    Rotation, old_key=st.binary(max_size=600), new_key=st.binary(max_size=600),
    timestamp=st.integers(min_value=0, max_value=2**64 - 1),
    old_signature=st.binary(max_size=512), new_signature=st.binary(max_size=512),
    old_certificate=st.binary(max_size=1200),
)
key_frames = st.builds(Key, identity=identities, public_key=st.binary(max_size=wire.MAX_KEY_SIZE),
                       certificate=st.binary(max_size=wire.MAX_CERTIFICATE_SIZE),
                       rotations=st.lists(rotation_records, max_size=wire.MAX_ROTATIONS)
                       .map(tuple))
rotates = st.builds(
    Rotate, new_key=st.binary(max_size=wire.MAX_KEY_SIZE),
    timestamp=st.integers(min_value=0, max_value=2**64 - 1),
    old_signature=st.binary(max_size=wire.MAX_SIGNATURE_SIZE),
    new_signature=st.binary(max_size=wire.MAX_SIGNATURE_SIZE),
    certificate=st.binary(max_size=wire.MAX_CERTIFICATE_SIZE),
)
sends = st.builds(Send, envelope=envelopes)
accepteds = st.builds(Accepted, message_id=message_ids)
delivers = st.builds(Deliver, message_id=message_ids, envelope=envelopes)
notices = st.builds(
    Notice,
    notice_id=message_ids,
    kind=st.sampled_from(wire.NOTICE_KINDS),
    sender=identities,
    message_id=message_ids,
    accepted_at=st.integers(min_value=0, max_value=2**64 - 1),
    text=error_texts,
)
acks = st.builds(Ack, message_id=message_ids)
pings = st.builds(Ping, opaque=ping_payloads)
pongs = st.builds(Pong, opaque=ping_payloads)
errors = st.builds(
    Error,
    code=st.sampled_from(list(ErrorCode)),
    ref=st.binary(max_size=wire.MAX_ERROR_REF),
    text=error_texts,
)

frames = st.one_of(
    hellos, auths, welcomes, lookups, key_frames, rotates, sends,
    accepteds, delivers, notices, acks, pings, pongs, errors,
)


def sample_frames() -> list:
    """One frame of every class, each with non-empty variable fields."""
    return [
        Hello(wire.PROTOCOL_VERSION, "relay.example", bytes(range(32))),
        Auth(1, "alice@example", b"K" * 40, b"S" * 30),
        Welcome(True, 3, wire.MAX_ENVELOPE),
        Welcome(False, 0, 1000),
        Lookup("bob"),
        Key("bob", b"public-key-der"),
        Key("bob", b"public-key-der", b"certificate-der"),
        Key("bob", b"new-key", b"", (Rotation(b"old-key", b"new-key", 1_700_000_000, b"sig",
                                              b"new-sig", b"cert"),)),
        Rotate(b"new-key", 1_700_000_000, b"old-sig", b"new-sig"),
        Auth(2, "alice", b"K" * 40, b"S" * 30, True, b"C" * 1200),
        Send(b"an envelope"),
        Accepted(b"A" * 16),
        Deliver(b"D" * 16, b"a delivered envelope"),
        Notice(b"N" * 16, wire.NOTICE_EXPIRED, "alice", b"M" * 16, 1_700_000_000,
               "expired unread after 30 days on the relay"),
        Ack(b"K" * 16),
        Ping(b"12345678"),
        Pong(b"87654321"),
        Error(ErrorCode.UNKNOWN_IDENTITY, b"carol", "no such identity: caf\u00e9"),
    ]


def body_of(frame) -> bytes:
    """The encoded frame without its length prefix."""
    return wire.encode(frame)[wire.LENGTH_PREFIX.size:]


def framed(body: bytes) -> bytes:
    return wire.LENGTH_PREFIX.pack(len(body)) + body


# Round trips ----------------------------------------------------------------


class RoundTripTests(SynchronousTestCase):
    """encode, then FrameBuffer.feed (and decode) give back an equal frame."""

    def assertRoundTrip(self, frame) -> None:
        data = wire.encode(frame)
        (length,) = wire.LENGTH_PREFIX.unpack_from(data)
        self.assertEqual(length, len(data) - wire.LENGTH_PREFIX.size)
        self.assertEqual(data[wire.LENGTH_PREFIX.size], frame.TYPE)

        decoded = wire.decode(data[wire.LENGTH_PREFIX.size:])
        self.assertEqual(decoded, frame)
        self.assertIs(type(decoded), type(frame))

        buffer = FrameBuffer()
        result = buffer.feed(data)
        self.assertEqual(result, [frame])
        self.assertIs(type(result[0]), type(frame))
        self.assertEqual(buffer.buffered, 0)

    @SETTINGS
    @given(hellos)
    def test_hello(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(auths)
    def test_auth(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(welcomes)
    def test_welcome(self, frame):
        self.assertRoundTrip(frame)
        self.assertIs(wire.decode(body_of(frame)).registered, frame.registered)

    @SETTINGS
    @given(lookups)
    def test_lookup(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(key_frames)
    def test_key(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(sends)
    def test_send(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(accepteds)
    def test_accepted(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(delivers)
    def test_deliver(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(rotates)
    def test_rotate(self, frame):
        self.assertRoundTrip(frame)

    def test_too_many_rotations(self):
        many = tuple(Rotation(b"o", b"n", 0, b"s", b"t") for _ in range(wire.MAX_ROTATIONS + 1))
        self.assertRaises(ValueError, wire.encode, Key("bob", b"k", b"", many))
        body = bytearray(body_of(Key("bob", b"k", b"", many[:1])))
        body[1 + 4 + 2 + 1 + 2] = wire.MAX_ROTATIONS + 1  # the rotation count
        self.assertRaises(ProtocolError, wire.decode, bytes(body))

    @SETTINGS
    @given(notices)
    def test_notice(self, frame):
        self.assertRoundTrip(frame)

    def test_notice_layout_and_unknown_kind(self):
        frame = Notice(b"N" * 16, wire.NOTICE_EXPIRED, "bob", b"M" * 16, 258, "gone")
        self.assertEqual(
            body_of(frame),
            b"\x24" + b"N" * 16 + b"\x01" + b"\x03bob" + b"M" * 16
            + (258).to_bytes(8, "big") + b"\x00\x04gone",
        )
        bad = bytearray(body_of(frame))
        bad[17] = 9
        error = self.assertRaises(ProtocolError, wire.decode, bytes(bad))
        self.assertIn("notice kind 9", str(error))
        self.assertRaises(ValueError, wire.encode, Notice(b"N" * 16, 9, "bob", b"M" * 16, 0, ""))

    @SETTINGS
    @given(acks)
    def test_ack(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(pings)
    def test_ping(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(pongs)
    def test_pong(self, frame):
        self.assertRoundTrip(frame)

    @SETTINGS
    @given(errors)
    def test_error(self, frame):
        self.assertRoundTrip(frame)
        decoded = wire.decode(body_of(frame))
        self.assertIsInstance(decoded.code, ErrorCode)
        self.assertEqual(decoded.fatal, frame.code.value < 100)

    def test_every_class_has_a_strategy_and_distinct_type(self):
        """
        The round-trip tests above cover every frame class of L{wire.Frame},
        and no two classes share a type byte.
        """
        self.assertEqual(set(wire.Frame.__args__), set(ALL_FRAME_CLASSES))
        self.assertEqual(len(KNOWN_TYPES), len(ALL_FRAME_CLASSES))
        covered = {type(f) for f in sample_frames()}
        self.assertEqual(covered, set(ALL_FRAME_CLASSES))

    def test_samples(self):
        for frame in sample_frames():
            self.assertRoundTrip(frame)

    def test_maximum_sizes(self):
        """Every bounded field round-trips at exactly its limit."""
        for frame in [
            Auth(0xFFFF, "a" * 64, b"k" * wire.MAX_KEY_SIZE, b"s" * wire.MAX_SIGNATURE_SIZE),
            Key("z" * 64, b"k" * wire.MAX_KEY_SIZE, b"c" * wire.MAX_CERTIFICATE_SIZE),
            Send(b"e" * wire.MAX_ENVELOPE),
            Deliver(b"\xff" * 16, b"e" * wire.MAX_ENVELOPE),
            Welcome(True, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
            Error(ErrorCode.STORE_FAILED, b"r" * wire.MAX_ERROR_REF, "t" * wire.MAX_ERROR_TEXT),
            Error(ErrorCode.MALFORMED_FRAME, b"", "\u20ac" * (wire.MAX_ERROR_TEXT // 3)),
        ]:
            self.assertRoundTrip(frame)

    def test_minimum_sizes(self):
        for frame in [
            Auth(0, "a", b"", b""),
            Key("0", b""),
            Send(b""),
            Deliver(b"\x00" * 16, b""),
            Welcome(False, 0, 0),
            Error(ErrorCode.MALFORMED_FRAME, b"", ""),
        ]:
            self.assertRoundTrip(frame)

    def test_encoding_layout(self):
        """The bytes on the wire are those of docs/protocol.md, big-endian."""
        self.assertEqual(
            wire.encode(Welcome(True, 0x01020304, 0x00040000, 0x00278D00)),
            b"\x00\x00\x00\x0e" + b"\x03" + b"\x01" + b"\x01\x02\x03\x04"
            + b"\x00\x04\x00\x00" + b"\x00\x27\x8d\x00",
        )
        self.assertEqual(
            wire.encode(Lookup("bob")), b"\x00\x00\x00\x05" + b"\x10" + b"\x03bob"
        )
        self.assertEqual(
            wire.encode(Send(b"xy")),
            b"\x00\x00\x00\x07" + b"\x20" + b"\x00\x00\x00\x02xy",
        )
        self.assertEqual(
            wire.encode(Error(ErrorCode.BAD_ENVELOPE, b"r", "t")),
            b"\x00\x00\x00\x09" + b"\x7f" + struct.pack(">H", ErrorCode.BAD_ENVELOPE)
            + b"\x00\x01r" + b"\x00\x01t",
        )

    def test_error_truncated_on_encode(self):
        """
        An over-long error reference or text is cut to its limit on encode,
        never in the middle of a UTF-8 character, so it still decodes.
        """
        frame = Error(ErrorCode.STORE_FAILED, b"r" * 100, "x" + "\u20ac" * 1000)
        decoded = wire.decode(body_of(frame))
        self.assertEqual(decoded.ref, b"r" * wire.MAX_ERROR_REF)
        encoded_text = decoded.text.encode("utf-8")
        self.assertLessEqual(len(encoded_text), wire.MAX_ERROR_TEXT)
        # 1 + 3*341 = 1024: exactly at the limit.
        self.assertEqual(decoded.text, "x" + "\u20ac" * 341)
        frame = Error(ErrorCode.STORE_FAILED, b"", "\u20ac" * 1000)
        decoded = wire.decode(body_of(frame))
        # 3 * 341 = 1023; a 342nd euro sign would need bytes 1024..1026.
        self.assertEqual(decoded.text, "\u20ac" * 341)

    @SETTINGS
    @given(frames)
    def test_decode_is_canonical(self, frame):
        """Re-encoding a decoded frame gives back the very same bytes."""
        data = wire.encode(frame)
        self.assertEqual(wire.encode(wire.decode(data[4:])), data)


# Streams --------------------------------------------------------------------


class StreamTests(SynchronousTestCase):
    """FrameBuffer reassembles frames however the stream is cut."""

    def test_concatenated(self):
        sample = sample_frames()
        stream = b"".join(wire.encode(f) for f in sample)
        buffer = FrameBuffer()
        self.assertEqual(buffer.feed(stream), sample)
        self.assertEqual(buffer.buffered, 0)

    @SETTINGS
    @given(st.lists(frames, min_size=1, max_size=8))
    def test_concatenated_generated(self, generated):
        stream = b"".join(wire.encode(f) for f in generated)
        buffer = FrameBuffer()
        self.assertEqual(buffer.feed(stream), generated)
        self.assertEqual(buffer.buffered, 0)

    def test_split_at_every_position(self):
        sample = sample_frames()
        stream = b"".join(wire.encode(f) for f in sample)
        for cut in range(len(stream) + 1):
            buffer = FrameBuffer()
            first = buffer.feed(stream[:cut])
            self.assertEqual(buffer.buffered + sum(len(wire.encode(f)) for f in first), cut)
            second = buffer.feed(stream[cut:])
            self.assertEqual(first + second, sample, f"split at {cut}")
            self.assertEqual(buffer.buffered, 0)

    def test_trickled_frame_costs_linear_work(self):
        """
        A frame at the limit trickled one byte at a time is copied once,
        when it is complete: no read of a partial frame copies or moves the
        bytes already buffered, so the work grows with the frame, not with
        its square.  (Counted, not timed.)
        """
        copied = []

        class Counting(bytearray):
            def __getitem__(self, index):
                part = super().__getitem__(index)
                if isinstance(index, slice):
                    copied.append(len(part))
                return part

            def __delitem__(self, index):
                # Deleting a prefix moves what follows it.
                copied.append(len(self) - len(range(*index.indices(len(self)))))
                super().__delitem__(index)

        frame = Send(b"e" * wire.MAX_ENVELOPE)
        data = wire.encode(frame)
        self.assertEqual(len(data), wire.LENGTH_PREFIX.size + 1 + 4 + wire.MAX_ENVELOPE)
        buffer = FrameBuffer()
        buffer._buffer = Counting()
        # A consumed frame in front of it, as on a live connection.
        buffer.add(wire.encode(Ping(b"12345678")))
        self.assertEqual(buffer.next(), Ping(b"12345678"))
        out = []
        for i in range(len(data)):
            buffer.add(data[i:i + 1])
            found = buffer.next()
            if found is not None:
                out.append(found)
        self.assertEqual(out, [frame])
        # One copy of the frame's body, and moves of a few bytes (a copy per
        # byte received would be about len(data) ** 2 / 2: 34 billion).
        self.assertLessEqual(sum(copied), len(data) + 64, copied[:10])

    def test_one_byte_at_a_time(self):
        """
        Fed a byte at a time, each frame comes out exactly when its last
        byte arrives, and not before.
        """
        sample = sample_frames()
        encoded = [wire.encode(f) for f in sample]
        stream = b"".join(encoded)
        ends = {}
        position = 0
        for frame, data in zip(sample, encoded):
            position += len(data)
            ends[position] = frame
        buffer = FrameBuffer()
        out = []
        for i in range(len(stream)):
            got = buffer.feed(stream[i : i + 1])
            if i + 1 in ends:
                self.assertEqual(got, [ends[i + 1]], f"at byte {i}")
            else:
                self.assertEqual(got, [], f"at byte {i}")
            out.extend(got)
        self.assertEqual(out, sample)
        self.assertEqual(buffer.buffered, 0)

    def test_empty_feed(self):
        buffer = FrameBuffer()
        self.assertEqual(buffer.feed(b""), [])
        self.assertEqual(buffer.buffered, 0)

    def test_partial_frame_kept(self):
        data = wire.encode(Ping(b"abcdefgh"))
        buffer = FrameBuffer()
        self.assertEqual(buffer.feed(data + data[:5]), [Ping(b"abcdefgh")])
        self.assertEqual(buffer.buffered, 5)
        self.assertEqual(buffer.feed(data[5:]), [Ping(b"abcdefgh")])
        self.assertEqual(buffer.buffered, 0)

    @SETTINGS
    @given(st.lists(frames, min_size=1, max_size=6), st.data())
    def test_random_chunks(self, generated, data):
        stream = b"".join(wire.encode(f) for f in generated)
        cuts = sorted(
            data.draw(
                st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20)
            )
        )
        buffer = FrameBuffer()
        out = []
        previous = 0
        for cut in cuts + [len(stream)]:
            out.extend(buffer.feed(stream[previous:cut]))
            previous = cut
        self.assertEqual(out, generated)
        self.assertEqual(buffer.buffered, 0)

    def test_max_envelope_frames_through_buffer(self):
        """The largest Send and Deliver frames fit in the buffer's max_frame."""
        frames_ = [Send(b"s" * 10000), Deliver(b"m" * 16, b"d" * 10000)]
        buffer = FrameBuffer(max_envelope=10000)
        self.assertEqual(buffer.max_frame, 10000 + wire.FRAME_OVERHEAD)
        self.assertEqual(buffer.feed(b"".join(wire.encode(f) for f in frames_)), frames_)

    def test_small_envelope_limit_still_fits_handshake_frames(self):
        """
        However small the envelope limit, every non-envelope frame fits: an
        Auth with a large key and signature is not mistaken for an oversized frame.
        """
        buffer = FrameBuffer(max_envelope=1000)
        self.assertEqual(buffer.max_frame, wire.MIN_FRAME_ROOM + wire.FRAME_OVERHEAD)
        auth = Auth(1, "a" * 64, b"k" * wire.MAX_KEY_SIZE, b"s" * wire.MAX_SIGNATURE_SIZE)
        self.assertEqual(buffer.feed(wire.encode(auth)), [auth])
        self.assertRaises(ProtocolError, buffer.feed, wire.encode(Send(b"x" * 1001)))


# Malformed input ------------------------------------------------------------


class MalformedTests(SynchronousTestCase):
    """Every malformed input raises ProtocolError, and nothing else."""

    def assertProtocolError(self, body: bytes, **kwargs) -> ProtocolError:
        return self.assertRaises(ProtocolError, wire.decode, body, **kwargs)

    def assertStreamError(self, stream: bytes, buffer: FrameBuffer | None = None) -> ProtocolError:
        return self.assertRaises(ProtocolError, (buffer or FrameBuffer()).feed, stream)

    def test_unknown_type(self):
        unknown = [t for t in range(256) if t not in KNOWN_TYPES]
        self.assertEqual(len(unknown), 256 - len(ALL_FRAME_CLASSES))
        for t in unknown:
            self.assertProtocolError(bytes([t]))
            self.assertProtocolError(bytes([t]) + b"\x00" * 40)
            self.assertStreamError(framed(bytes([t]) + b"\x00" * 8))

    def test_empty_body(self):
        self.assertProtocolError(b"")

    def test_truncated(self):
        """Every proper prefix of every valid body is refused."""
        for frame in sample_frames():
            body = body_of(frame)
            for end in range(len(body)):
                self.assertProtocolError(body[:end])
                # And framed with a matching length prefix, through the buffer.
                if end:
                    self.assertStreamError(framed(body[:end]))

    @SETTINGS
    @given(frames, st.data())
    def test_truncated_generated(self, frame, data):
        body = body_of(frame)
        end = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        self.assertProtocolError(body[:end])

    def test_trailing_bytes(self):
        for frame in sample_frames():
            body = body_of(frame)
            for extra in (b"\x00", b"\xff", b"trailing"):
                self.assertProtocolError(body + extra)
                self.assertStreamError(framed(body + extra))

    def test_zero_length_prefix(self):
        self.assertStreamError(b"\x00\x00\x00\x00")
        # Even after a good frame, and before any following bytes.
        self.assertStreamError(wire.encode(Ping(b"12345678")) + b"\x00\x00\x00\x00")
        buffer = FrameBuffer()
        self.assertEqual(buffer.feed(b"\x00\x00\x00"), [])
        self.assertStreamError(b"\x00", buffer)

    def test_length_over_max_frame(self):
        """
        A length above max_frame is refused as soon as the 4-byte prefix
        arrives, before any of the body.
        """
        for max_envelope in (wire.MAX_ENVELOPE, 100):
            buffer = FrameBuffer(max_envelope)
            limit = wire.max_frame_for(max_envelope)
            self.assertEqual(buffer.max_frame, limit)
            for length in (limit + 1, limit + 1000, 0xFFFFFFFF):
                self.assertStreamError(wire.LENGTH_PREFIX.pack(length), FrameBuffer(max_envelope))
            # Byte by byte: nothing until the fourth byte, which raises.
            prefix = wire.LENGTH_PREFIX.pack(limit + 1)
            buffer = FrameBuffer(max_envelope)
            for i in range(3):
                self.assertEqual(buffer.feed(prefix[i : i + 1]), [])
            self.assertStreamError(prefix[3:], buffer)
            # Exactly at the limit the buffer waits for the body.
            buffer = FrameBuffer(max_envelope)
            self.assertEqual(buffer.feed(wire.LENGTH_PREFIX.pack(limit)), [])
            self.assertEqual(buffer.buffered, 4)

    def test_envelope_over_max_envelope(self):
        for max_envelope in (100, 1000):
            ok_send = body_of(Send(b"e" * max_envelope))
            ok_deliver = body_of(Deliver(b"i" * 16, b"e" * max_envelope))
            self.assertEqual(wire.decode(ok_send, max_envelope), Send(b"e" * max_envelope))
            self.assertEqual(
                wire.decode(ok_deliver, max_envelope), Deliver(b"i" * 16, b"e" * max_envelope)
            )
            too_big_send = body_of(Send(b"e" * (max_envelope + 1)))
            too_big_deliver = body_of(Deliver(b"i" * 16, b"e" * (max_envelope + 1)))
            self.assertProtocolError(too_big_send, max_envelope=max_envelope)
            self.assertProtocolError(too_big_deliver, max_envelope=max_envelope)
            # Through a buffer with the same limit: the frame fits in
            # max_frame, the envelope inside it does not.
            self.assertStreamError(framed(too_big_send), FrameBuffer(max_envelope))
            self.assertStreamError(framed(too_big_deliver), FrameBuffer(max_envelope))
        # A blob length over the default limit, with no blob following.
        self.assertProtocolError(
            Writer().u8(Send.TYPE).u32(wire.MAX_ENVELOPE + 1).getvalue()
        )
        self.assertProtocolError(
            Writer().u8(Send.TYPE).u32(0xFFFFFFFF).raw(b"x" * 10).getvalue()
        )

    def test_bounded_blobs(self):
        too_long_key = b"k" * (wire.MAX_KEY_SIZE + 1)
        too_long_sig = b"s" * (wire.MAX_SIGNATURE_SIZE + 1)
        self.assertProtocolError(
            Writer().u8(Auth.TYPE).u16(1).identity("a").blob16(too_long_key).blob16(b"")
            .getvalue()
        )
        self.assertProtocolError(
            Writer().u8(Auth.TYPE).u16(1).identity("a").blob16(b"").blob16(too_long_sig)
            .getvalue()
        )
        self.assertProtocolError(
            Writer().u8(Key.TYPE).identity("a").blob16(too_long_key).getvalue())
        self.assertProtocolError(
            Writer().u8(Error.TYPE).u16(1).blob16(b"r" * (wire.MAX_ERROR_REF + 1))
            .blob16(b"").getvalue()
        )
        self.assertProtocolError(
            Writer().u8(Error.TYPE).u16(1).blob16(b"")
            .blob16(b"t" * (wire.MAX_ERROR_TEXT + 1)).getvalue()
        )

    def test_welcome_flag(self):
        for flag in (2, 3, 0x80, 0xFF):
            self.assertProtocolError(
                Writer().u8(Welcome.TYPE).u8(flag).u32(0).u32(0).u32(0).getvalue()
            )
        for flag in (0, 1):
            self.assertEqual(
                wire.decode(Writer().u8(Welcome.TYPE).u8(flag).u32(7).u32(9).u32(5).getvalue()),
                Welcome(bool(flag), 7, 9, 5),
            )

    def test_unknown_error_code(self):
        known = {int(c) for c in ErrorCode}
        candidates = {0, 99, 0xFFFF, max(known) + 1, max(c for c in known if c < 100) + 1}
        unknown = sorted(candidates - known)
        self.assertGreaterEqual(len(unknown), 4)
        for code in unknown:
            self.assertProtocolError(
                Writer().u8(Error.TYPE).u16(code).blob16(b"").blob16(b"oops").getvalue()
            )

    def test_invalid_identity(self):
        bad_identities = [
            b"a/b", b"caf\xc3\xa9", b"\xff", b"", b"-abc", b".hidden", b"a b",
            b"a\n", b"a\x00", b"a" * 65, b"..",
        ]
        for raw in bad_identities:
            bodies = [
                Writer().u8(Hello.TYPE).u16(1).u8(len(raw)).raw(raw).raw(b"c" * 32),
                Writer().u8(Auth.TYPE).u16(1).u8(len(raw)).raw(raw).blob16(b"k").blob16(b"s"),
                Writer().u8(Lookup.TYPE).u8(len(raw)).raw(raw),
                Writer().u8(Key.TYPE).u8(len(raw)).raw(raw).blob16(b"k"),
            ]
            for body in bodies:
                self.assertProtocolError(body.getvalue())
        # The same layout with a valid identity decodes: the test can fail.
        self.assertEqual(
            wire.decode(Writer().u8(Lookup.TYPE).u8(3).raw(b"a.b").getvalue()),
            Lookup("a.b"),
        )

    def test_identity_length_beyond_body(self):
        self.assertProtocolError(Writer().u8(Lookup.TYPE).u8(10).raw(b"abc").getvalue())

    def test_invalid_utf8_error_text(self):
        for raw in (b"\xff", b"\xc3", b"abc\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"):
            self.assertProtocolError(
                Writer().u8(Error.TYPE).u16(int(ErrorCode.BAD_ENVELOPE))
                .blob16(b"").blob16(raw).getvalue()
            )

    def test_error_stops_the_stream_at_the_bad_frame(self):
        """A bad frame raises even when good frames precede it in one feed."""
        stream = wire.encode(Ping(b"12345678")) + framed(b"\x00")
        self.assertStreamError(stream)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, body):
        self.assertDecodesOrProtocolError(body)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(KNOWN_TYPES)), st.binary(max_size=120))
    def test_arbitrary_bodies_of_known_types(self, kind, rest):
        self.assertDecodesOrProtocolError(bytes([kind]) + rest)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_stream(self, stream):
        buffer = FrameBuffer(max_envelope=200)
        try:
            result = buffer.feed(stream)
        except ProtocolError:
            return
        self.assertIsInstance(result, list)
        for frame in result:
            self.assertIsInstance(frame, ALL_FRAME_CLASSES)

    def assertDecodesOrProtocolError(self, body: bytes) -> None:
        try:
            frame = wire.decode(body)
        except ProtocolError:
            return
        # Anything accepted is a real frame and re-encodes to the same bytes.
        self.assertIsInstance(frame, ALL_FRAME_CLASSES)
        self.assertEqual(body_of(frame), body)


# Encoding invalid frames ----------------------------------------------------


class EncodeRejectsTests(SynchronousTestCase):
    """encode refuses frames that could never be decoded."""

    def test_challenge_size(self):
        for size in (0, 31, 33, 64):
            self.assertRaises(ValueError, wire.encode, Hello(1, "relay", b"c" * size))

    def test_message_id_size(self):
        for size in (0, 15, 17, 32):
            mid = b"m" * size
            self.assertRaises(ValueError, wire.encode, Accepted(mid))
            self.assertRaises(ValueError, wire.encode, Ack(mid))
            self.assertRaises(ValueError, wire.encode, Deliver(mid, b"e"))

    def test_ping_size(self):
        for size in (0, 7, 9, 16):
            self.assertRaises(ValueError, wire.encode, Ping(b"p" * size))
            self.assertRaises(ValueError, wire.encode, Pong(b"p" * size))

    def test_invalid_identity(self):
        for bad in ("", "a/b", "caf\u00e9", "-a", ".a", "a b", "a\n", "a" * 65, "\u0661"):
            self.assertRaises(ValueError, wire.encode, Hello(1, bad, b"c" * 32))
            self.assertRaises(ValueError, wire.encode, Auth(1, bad, b"k", b"s"))
            self.assertRaises(ValueError, wire.encode, Lookup(bad))
            self.assertRaises(ValueError, wire.encode, Key(bad, b"k"))

    def test_valid_edges_accepted(self):
        """The limits just inside the rejected values encode fine."""
        wire.encode(Hello(1, "a" * 64, b"c" * 32))
        wire.encode(Lookup("9"))
        wire.encode(Accepted(b"m" * 16))
        wire.encode(Ping(b"p" * 8))

    def test_undecodable_blobs(self):
        """
        A key or signature over the limits decode enforces makes a frame that
        could never be decoded, which encode promises to refuse.
        """
        key = b"k" * (wire.MAX_KEY_SIZE + 1)
        signature = b"s" * (wire.MAX_SIGNATURE_SIZE + 1)
        self.assertRaises(ValueError, wire.encode, Auth(1, "alice", key, b""))
        self.assertRaises(ValueError, wire.encode, Auth(1, "alice", b"", signature))
        self.assertRaises(ValueError, wire.encode, Key("alice", key))


    def test_out_of_range_integers(self):
        """Integers that do not fit their field are refused with ValueError."""
        self.assertRaises(ValueError, wire.encode, Welcome(True, 2**32, 0))
        self.assertRaises(ValueError, wire.encode, Welcome(True, 0, -1))
        self.assertRaises(ValueError, wire.encode, Welcome(True, 0, 0, 2**32))
        self.assertRaises(ValueError, wire.encode, Hello(0x10000, "relay", b"c" * 32))
        self.assertRaises(ValueError, wire.encode, Auth(-1, "alice", b"", b""))


    def test_not_a_frame(self):
        class Impostor:
            TYPE = Ping.TYPE
            opaque = b"12345678"

        self.assertRaises(TypeError, wire.encode, Impostor())

    def test_not_a_frame_without_type(self):
        self.assertRaises(TypeError, wire.encode, object())



class ErrorCodeTests(SynchronousTestCase):
    def test_fatal(self):
        fatal = [c for c in ErrorCode if c.fatal]
        nonfatal = [c for c in ErrorCode if not c.fatal]
        self.assertTrue(fatal)
        self.assertTrue(nonfatal)
        for code in ErrorCode:
            self.assertEqual(code.fatal, code.value < 100, code)
            self.assertEqual(Error(code, b"", "").fatal, code.value < 100)

    def test_named_codes(self):
        for code in (
            ErrorCode.MALFORMED_FRAME, ErrorCode.AUTH_FAILED,
            ErrorCode.KEY_CONFLICT, ErrorCode.SHUTTING_DOWN,
        ):
            self.assertTrue(code.fatal)
        for code in (
            ErrorCode.UNKNOWN_IDENTITY, ErrorCode.BAD_ENVELOPE,
            ErrorCode.MAILBOX_FULL, ErrorCode.STORE_FAILED,
        ):
            self.assertFalse(code.fatal)


class AuthTranscriptTests(SynchronousTestCase):
    """auth_transcript binds the challenge, relay and identity unambiguously."""

    challenge = bytes(range(32))

    def test_layout(self):
        transcript = wire.auth_transcript(self.challenge, "relay", "alice")
        self.assertEqual(
            transcript,
            Writer().blob16(wire.AUTH_CONTEXT).blob16(self.challenge)
            .u8(5).raw(b"relay").u8(5).raw(b"alice").u8(1).blob16(b"").getvalue(),
        )
        self.assertEqual(transcript, wire.auth_transcript(self.challenge, "relay", "alice"))

    def test_every_input_matters(self):
        base = wire.auth_transcript(self.challenge, "relay", "alice")
        self.assertNotEqual(
            base, wire.auth_transcript(b"\x01" + self.challenge[1:], "relay", "alice"))
        self.assertNotEqual(base, wire.auth_transcript(self.challenge, "relay2", "alice"))
        self.assertNotEqual(base, wire.auth_transcript(self.challenge, "relay", "alice2"))
        self.assertNotEqual(
            base, wire.auth_transcript(self.challenge, "relay", "alice", receive=False))
        self.assertNotEqual(
            base, wire.auth_transcript(self.challenge, "relay", "alice",
                                       channel_binding=b"\x00" * 32))
        # Swapping the roles of relay and client changes the transcript.
        self.assertNotEqual(
            wire.auth_transcript(self.challenge, "a", "b"),
            wire.auth_transcript(self.challenge, "b", "a"),
        )

    @SETTINGS
    @given(identities, identities, identities, identities)
    def test_no_shared_encodings(self, relay1, id1, relay2, id2):
        t1 = wire.auth_transcript(self.challenge, relay1, id1)
        t2 = wire.auth_transcript(self.challenge, relay2, id2)
        self.assertEqual(t1 == t2, (relay1, id1) == (relay2, id2))

    def test_boundary_shift(self):
        self.assertNotEqual(
            wire.auth_transcript(self.challenge, "ab", "c"),
            wire.auth_transcript(self.challenge, "a", "bc"),
        )

    def test_invalid_identity(self):
        self.assertRaises(ValueError, wire.auth_transcript, self.challenge, "a/b", "alice")
        self.assertRaises(ValueError, wire.auth_transcript, self.challenge, "relay", "")


class BufferMemoryTests(SynchronousTestCase):
    def test_consumed_bytes_are_dropped_while_behind(self):
        """
        A reader that keeps a few frames unread after every read (it is
        behind) still holds only about what is unread, not all it received.
        """
        frame = wire.encode(Send(b"e" * 4000))
        chunk = frame * (64 * 1024 // len(frame))
        buffer = FrameBuffer()
        unread = 0
        for _ in range(100):
            buffer.add(chunk)
            unread += chunk.count(frame)
            while unread > 5:
                self.assertEqual(buffer.next(), Send(b"e" * 4000))
                unread -= 1
        self.assertEqual(buffer.buffered, 5 * len(frame))
        self.assertLess(len(buffer._buffer), 3 * len(chunk))
