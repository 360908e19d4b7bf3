#!/usr/bin/env python3
"""
Fuzz target for the envelope opener (L{mailrelay.envelope}).

The relay parses the header of every envelope a client submits, and a
client opens every envelope the relay delivers: both read bytes written by
someone else.  What must hold whatever the bytes:

  - C{envelope.parse} and C{envelope.open_envelope} raise nothing but
    C{envelope.EnvelopeError} (or a subclass): any other exception would
    escape the relay's and the client's handling of a bad envelope;
  - parsing is exact: a parsed envelope re-assembles to the very bytes it
    came from, and the size limit is checked on the whole envelope;
  - an envelope opens only if it carries a valid signature of the trusted
    sender key (checked here independently), and only if its signed part
    is the one that sender sealed: the fuzzer may change any byte and even
    re-sign the result with the sender's real key, and it must still not
    open (the wrapped key and the AES-GCM tag, over the header, bind the
    rest).

Each input is used twice.  First as an envelope as it stands (to explore the
parser; it opens only if the fuzzer rebuilds the recipient's fingerprint).
Then as a recipe, through C{atheris.FuzzedDataProvider}: pick one of a few
envelopes sealed at start-up (a good one, and one failing each check of
C{open_envelope} in turn, down to a forgery that only the signature
check refuses), change bytes at positions the input chooses, optionally
replace the wrapped key by one the input chooses, optionally re-sign with
the sender's key or with an untrusted one, and open the result.  The recipe
reaches the signature, unwrap and decrypt paths that random bytes never
would.

The two test identities are generated at start-up (2048-bit keys, the
smallest accepted, for speed), so an input that only crashes with particular
keys may not reproduce; see fuzz/README.md.

Run through C{make fuzz}; see fuzz/README.md.
"""

from __future__ import annotations

import os
import sys

import atheris
from oracle import expect
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

with atheris.instrument_imports(include=["mailrelay"]):
    from mailrelay import envelope, keys
    from mailrelay.encoding import Writer

ALICE = keys.Identity.generate("alice", bits=2048)
BOB = keys.Identity.generate("bob", bits=2048)
PLAINTEXT = b"Hey! How are you?\n" * 2


def _seal(sender: keys.Identity, recipient: str, key, plaintext: bytes = PLAINTEXT) -> bytes:
    return envelope.seal(sender, recipient, key, plaintext, timestamp=1_700_000_000)


def _forge(like: bytes) -> bytes:
    """
    What anyone who knows alice's public key can build: alice's header
    (name and fingerprint) taken from C{like}, content sealed for bob,
    signed by another key.  Only the signature check stands in its way.
    """
    header_bytes = envelope.parse(like).header_bytes
    content_key, nonce = os.urandom(envelope.AES_KEY_SIZE), os.urandom(envelope.NONCE_SIZE)
    ciphertext = AESGCM(content_key).encrypt(nonce, PLAINTEXT, header_bytes)
    wrapped = BOB.public_key.encrypt(content_key, envelope.OAEP)
    signed = Writer().raw(header_bytes).blob16(wrapped).raw(nonce).blob32(ciphertext).getvalue()
    return Writer().raw(signed).blob16(BOB.sign(signed)).getvalue()


_GOOD = _seal(ALICE, "bob", BOB.public_key)

BASES: tuple[tuple[bytes, bytes | None], ...] = (
    # Each envelope, with the plaintext it opens to once its signed part
    # carries alice's signature (None: it must never open, whoever signs).
    (_GOOD, PLAINTEXT),
    (_seal(ALICE, "bob", BOB.public_key, b""), b""),
    # Addressed to another identity.
    (_seal(ALICE, "carol", BOB.public_key), None),
    # Addressed to bob, sealed for another key (alice's).
    (_seal(ALICE, "bob", ALICE.public_key), None),
    # Signed by bob's key, naming bob's key, while claiming to come from alice.
    (_seal(keys.Identity("alice", BOB.private_key), "bob", BOB.public_key), None),
    # Naming alice's key, signed by bob's: a forgery, sound but for its signature.
    (_forge(_GOOD), PLAINTEXT),
)
BASE_PARSED = tuple(envelope.parse(e) for e, _ in BASES)
SOUND = {parsed.signed for parsed, (_, text) in zip(BASE_PARSED, BASES) if text is not None}
"""The signed parts that may open, once signed by alice: nothing else ever may."""


def open_(data) -> envelope.Opened | None:
    """
    Open as bob, trusting alice's key; None when refused.  Whatever opens
    must carry alice's signature over its signed part, checked here
    independently of the code under test.
    """
    try:
        opened = envelope.open_envelope(data, BOB, ALICE.public_key)
    except envelope.EnvelopeError:
        return None
    parsed = data if isinstance(data, envelope.Envelope) else envelope.parse(data)
    expect(keys.verify(ALICE.public_key, parsed.signature, parsed.signed),
           "an envelope without a valid signature of the trusted key opened", parsed)
    return opened


def check_header(data: bytes) -> None:
    """The input as a header alone (as a client's inbox keeps it): strict and exact."""
    try:
        header = envelope.parse_header(data)
    except envelope.EnvelopeError:
        return
    expect(header.encode() == data, (header, data))


def check_as_is(data: bytes) -> None:
    """The input as an envelope: parse it, check it is exact, try to open it."""
    check_header(data)
    try:
        parsed = envelope.parse(data)
    except envelope.EnvelopeError:
        return
    expect(parsed.header.encode() == parsed.header_bytes, parsed)
    expect(parsed.signed.startswith(parsed.header_bytes),
           "the signed part does not start with the header", parsed)
    rebuilt = Writer().raw(parsed.signed).blob16(parsed.signature).getvalue()
    expect(rebuilt == data, (rebuilt, data))
    signed_rebuilt = (
        Writer().raw(parsed.header_bytes).blob16(parsed.wrapped_key).raw(parsed.nonce)
        .blob32(parsed.ciphertext).getvalue()
    )
    expect(signed_rebuilt == parsed.signed, (signed_rebuilt, parsed.signed))
    # The limit is on the whole envelope, exactly.
    expect(envelope.parse(data, len(data)) == parsed,
           "parsed otherwise at its exact limit", data)
    if data:
        try:
            envelope.parse(data, len(data) - 1)
        except envelope.EnvelopeTooLarge:
            pass
        else:
            raise AssertionError("an envelope over the limit was parsed")
    opened = open_(parsed)
    expect(open_(data) == opened, "opens otherwise from bytes and parsed", data)
    if opened is not None:
        # The recipe's envelopes are new each run: an input that opens
        # had to rebuild one of them.
        expect(parsed.signed in SOUND, parsed)


def mutate(fdp: atheris.FuzzedDataProvider, buf: bytearray) -> None:
    """Change C{buf} in place as the input says: flips, overwrites, inserts, cuts."""
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        op = fdp.ConsumeIntInRange(0, 3)
        pos = fdp.ConsumeIntInRange(0, max(len(buf) - 1, 0))
        if op == 0 and buf:
            buf[pos] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 1:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
            buf[pos : pos + len(data)] = data
        elif op == 2:
            buf[pos:pos] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
        else:
            del buf[pos : pos + fdp.ConsumeIntInRange(1, 16)]


def rewrap(parsed: envelope.Envelope, content_key: bytes) -> bytes:
    """C{parsed} with its wrapped key replaced by C{content_key} wrapped for bob."""
    wrapped = BOB.public_key.encrypt(content_key, envelope.OAEP)
    return (
        Writer().raw(parsed.header_bytes).blob16(wrapped).raw(parsed.nonce)
        .blob32(parsed.ciphertext).blob16(parsed.signature).getvalue()
    )


def resign(parsed: envelope.Envelope, signer: keys.Identity) -> bytes:
    """
    C{parsed} signed afresh: by alice, it gets past the signature check
    whatever changed; by bob (whom the recipient does not trust for alice),
    the signature check is all that must stop it.
    """
    return Writer().raw(parsed.signed).blob16(signer.sign(parsed.signed)).getvalue()


def check_recipe(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    index = fdp.ConsumeIntInRange(0, len(BASES) - 1)
    (base, plaintext), base_parsed = BASES[index], BASE_PARSED[index]
    buf = bytearray(base)
    mutate(fdp, buf)
    candidate = bytes(buf)
    new_key = fdp.ConsumeBool()
    key = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)) if new_key else b""
    signer = (None, ALICE, BOB)[fdp.ConsumeIntInRange(0, 2)]
    if new_key or signer is not None:
        try:
            parsed = envelope.parse(candidate)
        except envelope.EnvelopeError:
            pass
        else:
            if new_key:
                candidate = rewrap(parsed, key)
                parsed = envelope.parse(candidate)
            if signer is not None:
                candidate = resign(parsed, signer)
    try:
        parsed = envelope.parse(candidate)
    except envelope.EnvelopeError:
        return
    opened = open_(parsed)
    if opened is None:
        return
    expect(plaintext is not None, ("an envelope that must never open opened", index, candidate))
    expect(parsed.signed == base_parsed.signed, ("an altered envelope opened", index, candidate))
    expect(opened.plaintext == plaintext, (opened.plaintext, plaintext))
    expect(opened.header == base_parsed.header, (opened.header, base_parsed.header))


def TestOneInput(data: bytes) -> None:
    check_as_is(data)
    check_recipe(data)


def main() -> None:
    # Every base behaves as intended before any input is tried: otherwise
    # the recipe would explore nothing.  As sealed, only the first two open;
    # signed by alice, the forgery opens too.
    opens = [open_(e) is not None for e, _ in BASES]
    expect(opens == [True, True, False, False, False, False], "the bases open as", opens)
    for (sealed, plaintext), parsed in zip(BASES, BASE_PARSED):
        opened = open_(resign(parsed, ALICE))
        expect((None if opened is None else opened.plaintext) == plaintext, (sealed, opened))
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
