#!/usr/bin/env python3
"""
Fuzz target for the frame decoder (L{mailrelay.wire}).

Every byte the relay and the client read from the network goes through
C{wire.FrameBuffer} and C{wire.decode} before anything else looks at it, so
these two must hold whatever a peer sends:

  - the only exception they raise is C{wire.ProtocolError} (anything else
    would escape the sessions' error handling and drop the connection
    without the MALFORMED_FRAME answer, or worse);
  - decoding is exact: every decoded frame encodes back to the very bytes
    it came from, so no two encodings mean the same frame and nothing in a
    frame is silently ignored (which is also what makes signed transcripts
    and the retry-by-digest of envelopes trustworthy);
  - reassembly does not depend on how the stream is cut into reads: a
    C{FrameBuffer} fed in arbitrary chunks, with its limit changed between
    frames, yields exactly the frames (and the error) of a one-shot parse of
    the whole stream under the same limits.

Input layout: the whole input is also tried as one frame body.  For the
stream checks, the low 4 bits of the first byte give C{n}, the next C{n}
bytes are control bytes and the rest is the stream.  Bit 4 of the first
byte lowers C{wire.COMPACT_AFTER} to L{SMALL_COMPACT_AFTER} for this input:
the buffer then cuts off consumed bytes after a few frames instead of after
64 KiB, far more than any input here, and what it yields must not depend
on when it does.  Control byte C{i} (cycling) gives, in its low 5 bits, the
size of read C{i} (0: all the rest at once); for frame C{i}, bit 5 asks for
a C{set_limit} before it and bits 6-7 choose the limit from L{LIMITS}.

Run through C{make fuzz}; see fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris
from oracle import expect

with atheris.instrument_imports(include=["mailrelay"]):
    from mailrelay import wire

LIMITS = (0, 40, wire.MAX_ENVELOPE, wire.LARGEST_ENVELOPE)
"""Envelope limits a stream switches between: tiny ones make the limit checks reachable."""

SMALL_COMPACT_AFTER = 32
"""A compaction threshold a few frames long, which inputs of a few KiB pass many times."""
COMPACT_AFTER = wire.COMPACT_AFTER
"""The real threshold, put back after every input."""


def check_body(body: bytes, max_envelope: int) -> wire.Frame | None:
    """
    Decode C{body} directly; a frame must re-encode to exactly C{body}.
    Returns the frame, or None when the body is refused.
    """
    try:
        frame = wire.decode(body, max_envelope)
    except wire.ProtocolError:
        return None
    encoded = wire.encode(frame)
    expect(encoded[:4] == wire.LENGTH_PREFIX.pack(len(body)), (frame, encoded[:4]))
    expect(encoded[4:] == body, (frame, body, encoded))
    return frame


def limit_for(control: bytes, index: int) -> int | None:
    """The limit to set before frame C{index}, or None to keep the current one."""
    if not control:
        return None
    c = control[index % len(control)]
    return LIMITS[c >> 6] if c & 0x20 else None


def reference(stream: bytes, control: bytes):
    """
    The frames of C{stream} parsed in one go, as the protocol defines them:
    (frames, error raised or None, bytes left over as an incomplete frame).
    """
    frames: list[tuple[wire.Frame, bytes]] = []
    limit = wire.MAX_ENVELOPE
    pos = 0
    while True:
        new = limit_for(control, len(frames))
        if new is not None:
            limit = new
        if len(stream) - pos < 4:
            return frames, None, len(stream) - pos
        (length,) = wire.LENGTH_PREFIX.unpack_from(stream, pos)
        if length == 0 or length > wire.max_frame_for(limit):
            return frames, "length", None
        if len(stream) - pos - 4 < length:
            return frames, None, len(stream) - pos
        body = stream[pos + 4 : pos + 4 + length]
        try:
            frame = wire.decode(body, limit)
        except wire.ProtocolError:
            return frames, "body", None
        frames.append((frame, stream[pos : pos + 4 + length]))
        pos += 4 + length


def chunks(stream: bytes, control: bytes):
    """Cut C{stream} into the reads the control bytes ask for."""
    pos = i = 0
    while pos < len(stream):
        size = control[i % len(control)] & 0x1F if control else 0
        size = size or len(stream) - pos
        yield stream[pos : pos + size]
        pos += size
        i += 1


def check_stream(stream: bytes, control: bytes) -> None:
    want, want_error, want_left = reference(stream, control)

    # Read by read, frame by frame, changing the limit between frames.
    buffer = wire.FrameBuffer()
    got: list[wire.Frame] = []
    error = False
    try:
        for chunk in chunks(stream, control):
            buffer.add(chunk)
            while True:
                new = limit_for(control, len(got))
                if new is not None:
                    buffer.set_limit(new)
                frame = buffer.next()
                if frame is None:
                    break
                got.append(frame)
    except wire.ProtocolError:
        error = True
    expect(got == [frame for frame, _ in want], (got, want))
    expect(error == (want_error is not None), (error, want_error))
    if not error:
        expect(buffer.buffered == want_left, (buffer.buffered, want_left))
    for frame, raw in want:
        expect(wire.encode(frame) == raw, (frame, raw))

    # The same stream through feed(), all at once, with the default limit.
    if not control or all(c & 0x20 == 0 for c in control):
        buffer = wire.FrameBuffer()
        try:
            fed = buffer.feed(stream)
        except wire.ProtocolError:
            expect(want_error is not None, "feed() refused a stream the parse accepted")
        else:
            expect(want_error is None, "feed() accepted a stream the parse refused", want_error)
            expect(fed == [frame for frame, _ in want], (fed, want))


def TestOneInput(data: bytes) -> None:
    frame = check_body(data, wire.MAX_ENVELOPE)
    if frame is not None:
        # A frame within a smaller limit is the same frame under any larger one.
        expect(check_body(data, wire.LARGEST_ENVELOPE) == frame,
               "another frame under a larger limit", frame)
    if data:
        n = data[0] & 0x0F
        wire.COMPACT_AFTER = SMALL_COMPACT_AFTER if data[0] & 0x10 else COMPACT_AFTER
        try:
            check_stream(data[1 + n :], data[1 : 1 + n])
        finally:
            wire.COMPACT_AFTER = COMPACT_AFTER


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
