"""
Write the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Seeds give the fuzzer one valid example of every frame type and of an
envelope, so it starts from inputs that get past the first checks instead
of having to discover the formats byte by byte.  The committed files are
this script's output; run it again (C{.venv/bin/python fuzz/make_corpus.py})
after a format change.  Envelopes are sealed with throwaway keys, so every
run writes different envelope bytes: that is expected.
"""

from __future__ import annotations

import os
import shutil

from mailrelay import envelope, keys, wire

HERE = os.path.dirname(os.path.abspath(__file__))
MID = bytes(range(16))


def frames() -> dict[str, bytes]:
    """
    One seed per frame type, in the layout fuzz_frames.py reads: a first
    byte whose low 4 bits count the control bytes that follow, then the
    stream.
    """
    single = {
        "hello": wire.Hello(1, "relay-0123456789ab", b"c" * 32, wire.BINDING_TLS_EXPORTER),
        "auth": wire.Auth(1, "alice", b"\x30\x82" + b"k" * 30, b"s" * 32, True),
        "welcome": wire.Welcome(True, 3, wire.MAX_ENVELOPE),
        "lookup": wire.Lookup("bob"),
        "key": wire.Key("bob", b"\x30\x82" + b"k" * 30),
        "send": wire.Send(b"e" * 24),
        "accepted": wire.Accepted(MID),
        "deliver": wire.Deliver(MID, b"e" * 24),
        "ack": wire.Ack(MID),
        "ping": wire.Ping(b"p" * 8),
        "pong": wire.Pong(b"p" * 8),
        "error": wire.Error(wire.ErrorCode.DUPLICATE_ID, MID, "already used"),
    }
    if hasattr(wire, "Notice"):
        single["notice"] = wire.Notice(
            MID[::-1], wire.NOTICE_EXPIRED, "alice", MID, 1_700_000_000, "expired"
        )
    seeds = {name: b"\x00" + wire.encode(frame) for name, frame in single.items()}
    # The whole input is also decoded as one frame body: seed that too.
    seeds.update({f"body-{name}": wire.encode(frame)[4:] for name, frame in single.items()})
    stream = b"".join(
        wire.encode(single[name]) for name in ("welcome", "deliver", "deliver", "ping")
    )
    # Reads of 1, 5 and 3 bytes; a limit of 40 bytes before the second frame.
    seeds["stream-chunked"] = b"\x03" + bytes([0x01, 0x65, 0x03]) + stream
    # With the compaction threshold lowered, read all at once.
    seeds["stream-compacted"] = b"\x10" + stream
    seeds["stream-trailing-partial"] = b"\x00" + stream + wire.encode(single["ack"])[:7]
    seeds["empty-frame"] = b"\x00" + b"\x00\x00\x00\x00"
    seeds["over-limit"] = b"\x00" + b"\x00\x10\x00\x00\x20"
    return seeds


def envelopes() -> dict[str, bytes]:
    alice = keys.Identity.generate("alice", bits=2048)
    bob = keys.Identity.generate("bob", bits=2048)
    sealed = envelope.seal(alice, "bob", bob.public_key, b"Hey! How are you?")
    return {
        "sealed": sealed,
        "sealed-empty": envelope.seal(alice, "bob", bob.public_key, b""),
        "header-only": envelope.parse(sealed).header_bytes,
        "truncated": sealed[: len(sealed) // 2],
    }


def write(target: str, seeds: dict[str, bytes]) -> None:
    directory = os.path.join(HERE, "corpus", target)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    for name, data in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"{directory}: {len(seeds)} seeds")


def main() -> None:
    write("fuzz_frames", frames())
    write("fuzz_envelope", envelopes())


if __name__ == "__main__":
    main()
