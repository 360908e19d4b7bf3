"""
Tests for L{mailrelay.envelope}: sealing, parsing and opening envelopes.
"""

from __future__ import annotations

import os
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import envelope, keys, wire
from mailrelay.encoding import Writer
from mailrelay.envelope import EnvelopeError, EnvelopeTooLarge

# RSA key generation is slow: every key is generated at most once per
# process and shared by all the tests of this module.
_identities: dict[tuple[str, str, int], keys.Identity] = {}


def identity(name: str, bits: int = 2048, tag: str = "") -> keys.Identity:
    """
    The cached identity C{name} with a key of C{bits}; a different C{tag}
    gives another key for the same name.
    """
    cache_key = (name, tag, bits)
    if cache_key not in _identities:
        _identities[cache_key] = keys.Identity.generate(name, bits=bits)
    return _identities[cache_key]


def alice() -> keys.Identity:
    """The sender, with a default-size (3072-bit) key."""
    return identity("alice", keys.KEY_BITS)


def bob() -> keys.Identity:
    """The recipient, with a default-size (3072-bit) key."""
    return identity("bob", keys.KEY_BITS)


def seal(plaintext: bytes = b"hello bob", **kwargs) -> bytes:
    return envelope.seal(alice(), "bob", bob().public_key, plaintext, **kwargs)


def open_(data, recipient=None, sender_key=None) -> envelope.Opened:
    return envelope.open_envelope(
        data,
        bob() if recipient is None else recipient,
        alice().public_key if sender_key is None else sender_key,
    )


def resign(parsed: envelope.Envelope, signer: keys.Identity, signed: bytes | None = None) -> bytes:
    """Replace an envelope's signature by C{signer}'s over C{signed}."""
    if signed is None:
        signed = parsed.signed
    return Writer().raw(signed).blob16(signer.sign(signed)).getvalue()


def signed_part(header: envelope.Header, wrapped: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    return (
        Writer().raw(header.encode()).blob16(wrapped).raw(nonce).blob32(ciphertext).getvalue()
    )


def regions(data: bytes) -> dict[str, range]:
    """The byte ranges of every part of a well-formed envelope."""
    parsed = envelope.parse(data)
    out = {}
    pos = 0

    def take(name, size):
        nonlocal pos
        out[name] = range(pos, pos + size)
        pos += size

    take("header", len(parsed.header_bytes))
    take("wrapped key length", 2)
    take("wrapped key", len(parsed.wrapped_key))
    take("nonce", len(parsed.nonce))
    take("ciphertext length", 4)
    take("ciphertext", len(parsed.ciphertext))
    take("signature length", 2)
    take("signature", len(parsed.signature))
    if pos != len(data):
        raise AssertionError((pos, len(data)))
    return out


class SpyKey:
    """A private key that counts its decryptions."""

    def __init__(self, key) -> None:
        self._key = key
        self.decryptions = 0

    def public_key(self):
        return self._key.public_key()

    def decrypt(self, *args, **kwargs):
        self.decryptions += 1
        return self._key.decrypt(*args, **kwargs)


def spied(who: keys.Identity) -> tuple[keys.Identity, SpyKey]:
    spy = SpyKey(who.private_key)
    return keys.Identity(who.name, spy), spy


class RoundTripTests(SynchronousTestCase):
    def assertRoundTrip(self, plaintext: bytes) -> bytes:
        sealed = seal(plaintext)
        self.assertIsInstance(sealed, bytes)
        self.assertLessEqual(len(sealed), wire.MAX_ENVELOPE)
        self.assertEqual(len(sealed), len(plaintext) + envelope.overhead("alice", "bob"))
        opened = open_(sealed)
        self.assertIsInstance(opened, envelope.Opened)
        self.assertEqual(opened.plaintext, plaintext)
        self.assertEqual(opened.sender, "alice")
        return sealed

    def test_empty(self):
        self.assertRoundTrip(b"")

    def test_one_byte(self):
        self.assertRoundTrip(b"\x00")

    def test_seventeen_bytes(self):
        self.assertRoundTrip(bytes(range(17)))

    def test_100_kib(self):
        self.assertRoundTrip(os.urandom(100 * 1024))

    def test_maximum(self):
        """
        The largest plaintext makes an envelope of exactly MAX_ENVELOPE bytes
        with the default key size; one more byte is refused.
        """
        self.assertEqual(alice().public_key.key_size, keys.KEY_BITS)
        self.assertEqual(keys.KEY_BITS, 3072)
        maximum = wire.MAX_ENVELOPE - envelope.overhead("alice", "bob")
        sealed = self.assertRoundTrip(b"m" * maximum)
        self.assertEqual(len(sealed), wire.MAX_ENVELOPE)
        error = self.assertRaises(EnvelopeTooLarge, seal, b"m" * (maximum + 1))
        self.assertIsInstance(error, EnvelopeError)

    def test_maximum_with_smaller_limit(self):
        limit = 4000
        maximum = limit - envelope.overhead("alice", "bob")
        sealed = seal(b"s" * maximum, max_envelope=limit)
        self.assertEqual(len(sealed), limit)
        self.assertEqual(open_(envelope.parse(sealed, limit)).plaintext, b"s" * maximum)
        self.assertRaises(EnvelopeTooLarge, seal, b"s" * (maximum + 1), max_envelope=limit)
        # A limit below the overhead refuses even an empty message.
        self.assertRaises(EnvelopeTooLarge, seal, b"", max_envelope=500)

    def test_maximum_2048_bit_keys(self):
        sender, recipient = identity("carol"), identity("dave")
        maximum = wire.MAX_ENVELOPE - envelope.overhead("carol", "dave", 2048 // 8)
        sealed = envelope.seal(sender, "dave", recipient.public_key, b"x" * maximum)
        self.assertEqual(len(sealed), wire.MAX_ENVELOPE)
        opened = envelope.open_envelope(sealed, recipient, sender.public_key)
        self.assertEqual(opened.plaintext, b"x" * maximum)
        self.assertRaises(
            EnvelopeTooLarge,
            envelope.seal, sender, "dave", recipient.public_key, b"x" * (maximum + 1),
        )

    def test_mixed_key_sizes(self):
        """A 3072-bit sender and a 2048-bit recipient, and the other way round."""
        small = identity("carol")
        sealed = envelope.seal(alice(), "carol", small.public_key, b"to carol")
        self.assertEqual(len(envelope.parse(sealed).wrapped_key), 256)
        self.assertEqual(len(envelope.parse(sealed).signature), 384)
        self.assertEqual(
            envelope.open_envelope(sealed, small, alice().public_key).plaintext, b"to carol"
        )
        sealed = envelope.seal(small, "bob", bob().public_key, b"from carol")
        self.assertEqual(
            envelope.open_envelope(sealed, bob(), small.public_key).plaintext, b"from carol"
        )

    def test_open_accepts_parsed_and_buffers(self):
        sealed = seal(b"any form")
        for form in (sealed, bytearray(sealed), memoryview(sealed), envelope.parse(sealed)):
            self.assertEqual(open_(form).plaintext, b"any form")

    def test_fresh_randomness(self):
        """Sealing twice gives different envelopes; the plaintext never shows."""
        plaintext = b"a secret that must not appear in clear" * 4
        first, second = seal(plaintext), seal(plaintext)
        self.assertNotEqual(first, second)
        a, b = envelope.parse(first), envelope.parse(second)
        self.assertNotEqual(a.wrapped_key, b.wrapped_key)
        self.assertNotEqual(a.nonce, b.nonce)
        self.assertNotEqual(a.header.message_id, b.header.message_id)
        self.assertNotIn(b"a secret", first)
        self.assertEqual(len(a.ciphertext), len(plaintext) + 16)

    def test_overhead(self):
        self.assertEqual(
            envelope.overhead("a", "b", 384),
            2 + 2 + 1 + 1 + 32 + 32 + 16 + 8 + 8 + 2 + 384 + 12 + 4 + 16 + 2 + 384,
        )
        self.assertEqual(
            envelope.overhead("alice", "bob"), envelope.overhead("alice", "bob", 384)
        )
        self.assertEqual(
            envelope.overhead("alice", "bob") - envelope.overhead("alice", "bob", 256), 256
        )


class HeaderTests(SynchronousTestCase):
    def test_fields(self):
        message_id = bytes(range(16))
        sealed = seal(b"headers", message_id=message_id, timestamp=1_700_000_000)
        parsed = envelope.parse(sealed)
        expected = envelope.Header(
            version=envelope.VERSION,
            suite=envelope.SUITE_RSA,
            sender="alice",
            sender_fingerprint=alice().fingerprint,
            recipient="bob",
            recipient_fingerprint=bob().fingerprint,
            message_id=message_id,
            timestamp=1_700_000_000,
        )
        self.assertEqual(parsed.header, expected)
        self.assertEqual(parsed.header_bytes, expected.encode())
        self.assertTrue(sealed.startswith(expected.encode()))
        self.assertEqual(parsed.signed + Writer().blob16(parsed.signature).getvalue(), sealed)
        opened = open_(sealed)
        self.assertEqual(opened.header, expected)
        self.assertEqual(opened.message_id, message_id)
        self.assertEqual(opened.sender, "alice")

    def test_fingerprints_are_of_the_keys(self):
        parsed = envelope.parse(seal())
        self.assertEqual(
            parsed.header.sender_fingerprint,
            keys.fingerprint(keys.public_der(alice().public_key)),
        )
        self.assertEqual(
            parsed.header.recipient_fingerprint,
            keys.fingerprint(keys.public_der(bob().public_key)),
        )
        self.assertEqual(len(parsed.header.sender_fingerprint), envelope.FINGERPRINT_SIZE)

    def test_extreme_timestamps(self):
        for timestamp in (0, 2**63 - 1):
            parsed = envelope.parse(seal(timestamp=timestamp))
            self.assertEqual(parsed.header.timestamp, timestamp)
            self.assertEqual(envelope.read_header(seal(timestamp=timestamp)).timestamp,
                             timestamp)

    def test_largest_sequence_number(self):
        sealed = seal(seq=2**63 - 1)
        self.assertEqual(envelope.parse(sealed).header.seq, 2**63 - 1)
        self.assertEqual(envelope.read_header(sealed).seq, 2**63 - 1)
        self.assertEqual(open_(sealed).header.seq, 2**63 - 1)

    def test_seal_refuses_out_of_range(self):
        """
        Timestamps and sequence numbers are kept as SQLite INTEGERs (signed
        64 bits) by relay and client: seal makes no envelope beyond that.
        """
        for bad in (2**63, 2**64 - 1):
            error = self.assertRaises(ValueError, seal, timestamp=bad)
            self.assertIn("timestamp", str(error))
            error = self.assertRaises(ValueError, seal, seq=bad)
            self.assertIn("sequence number", str(error))
        self.assertRaises(ValueError, seal, timestamp=-1)

    def test_default_timestamp_and_message_id(self):
        before = int(time.time())
        sealed = seal()
        after = int(time.time())
        header = envelope.parse(sealed).header
        self.assertTrue(before <= header.timestamp <= after, header.timestamp)
        self.assertEqual(len(header.message_id), wire.MESSAGE_ID_SIZE)
        self.assertNotEqual(header.message_id, envelope.parse(seal()).header.message_id)

    def test_bad_message_id(self):
        for size in (0, 15, 17):
            self.assertRaises(ValueError, seal, message_id=b"i" * size)

    def test_sequence_number_is_signed(self):
        sealed = seal(seq=7)
        self.assertEqual(envelope.parse(sealed).header.seq, 7)
        self.assertEqual(open_(sealed).header.seq, 7)
        self.assertEqual(envelope.parse(seal()).header.seq, 0)
        # The sequence number is the last 8 bytes of the header: a relay
        # that renumbers a message breaks the signature.
        end = len(envelope.parse(sealed).header_bytes)
        altered = bytearray(sealed)
        altered[end - 1] = 3
        self.assertEqual(envelope.parse(bytes(altered)).header.seq, 3)
        error = self.assertRaises(EnvelopeError, open_, bytes(altered))
        self.assertIn("signature", str(error))
        for bad in (-1, 2**63, 2**64):
            self.assertRaises(ValueError, seal, seq=bad)

    def test_version_1_envelopes_still_open(self):
        """Envelopes sealed before sequence numbers open as sequence 0."""
        header = envelope.Header(
            version=1, suite=envelope.SUITE_RSA, sender="alice",
            sender_fingerprint=alice().fingerprint, recipient="bob",
            recipient_fingerprint=bob().fingerprint, message_id=b"m" * 16,
            timestamp=1_700_000_000,
        )
        content_key = b"k" * 32
        nonce = b"n" * 12
        ciphertext = AESGCM(content_key).encrypt(nonce, b"from the past", header.encode())
        wrapped = bob().public_key.encrypt(content_key, envelope.OAEP)
        signed = signed_part(header, wrapped, nonce, ciphertext)
        old = Writer().raw(signed).blob16(alice().sign(signed)).getvalue()
        opened = open_(old)
        self.assertEqual(opened.plaintext, b"from the past")
        self.assertEqual((opened.header.version, opened.header.seq), (1, 0))
        self.assertRaises(ValueError, envelope.Header(**{**header.__dict__, "seq": 1}).encode)

    def test_new_message_id(self):
        ids = {envelope.new_message_id() for _ in range(20)}
        self.assertEqual(len(ids), 20)
        self.assertTrue(all(len(i) == wire.MESSAGE_ID_SIZE for i in ids))


class RejectionTests(SynchronousTestCase):
    """Every bad envelope raises EnvelopeError and returns nothing."""

    def assertRejected(
        self, data, recipient=None, sender_key=None, message="", unwrapped=False
    ):
        """
        Opening C{data} raises EnvelopeError.  Unless C{unwrapped}, it does
        so before any use of the recipient's private key: an envelope not
        for this key, or not authentic, is never decrypted.
        """
        recipient, spy = spied(bob() if recipient is None else recipient)
        try:
            result = open_(data, recipient, sender_key)
        except EnvelopeError as e:
            if not unwrapped:
                self.assertEqual(spy.decryptions, 0, f"{message}: private key used")
            return e
        self.fail(f"{message}: envelope opened: {result!r}")

    def test_spy_control(self):
        """The spy does count the decryption of a good envelope."""
        recipient, spy = spied(bob())
        self.assertEqual(open_(seal(b"spy"), recipient).plaintext, b"spy")
        self.assertEqual(spy.decryptions, 1)

    def test_control(self):
        """The unaltered envelope of the rejection tests does open."""
        sealed = seal(bytes(range(17)))
        self.assertEqual(open_(sealed).plaintext, bytes(range(17)))

    def test_single_bit_flips(self):
        """
        Flipping any one bit is detected.  Every byte is flipped once (the
        bit rotating with the position), and every bit of the header and of
        the length prefixes is flipped.
        """
        sealed = seal(bytes(range(17)), message_id=b"\x5a" * 16, timestamp=1234)
        parts = regions(sealed)
        self.assertEqual(len(parts["wrapped key"]), 384)
        self.assertEqual(len(parts["signature"]), 384)
        self.assertEqual(len(parts["nonce"]), envelope.NONCE_SIZE)
        self.assertEqual(len(parts["ciphertext"]), 17 + 16)

        flips = {(i, i % 8) for i in range(len(sealed))}
        for name in ("header", "wrapped key length", "ciphertext length", "signature length"):
            flips.update((i, bit) for i in parts[name] for bit in range(8))
        for name, positions in parts.items():
            self.assertTrue(
                any(i in positions for i, _ in flips), f"no flip in the {name}"
            )

        for i, bit in sorted(flips):
            altered = bytearray(sealed)
            altered[i] ^= 1 << bit
            self.assertRejected(bytes(altered), message=f"flip of bit {bit} of byte {i}")

    def test_wrong_recipient(self):
        sealed = seal()
        error = self.assertRejected(sealed, recipient=identity("carol"))
        self.assertIn("carol", str(error))

    def test_same_name_other_key(self):
        """An identity named bob but with another key cannot open bob's envelope."""
        impostor = identity("bob", tag="other")
        self.assertNotEqual(impostor.fingerprint, bob().fingerprint)
        self.assertRejected(seal(), recipient=impostor)

    def test_sealed_to_another_key_of_the_name(self):
        """An envelope sealed to the name bob but another key is refused by bob."""
        other = identity("bob", tag="other")
        sealed = envelope.seal(alice(), "bob", other.public_key, b"for the other bob")
        self.assertRejected(sealed)
        # Control: the key it was sealed for opens it.
        self.assertEqual(open_(sealed, recipient=other).plaintext, b"for the other bob")

    def test_changed_sender_key(self):
        """Trusting another key than the one that signed refuses the envelope."""
        sealed = seal()
        self.assertRejected(sealed, sender_key=identity("mallory").public_key)
        self.assertRejected(sealed, sender_key=identity("alice", tag="other").public_key)

    def test_signature_by_another_key(self):
        """
        A header that claims alice and her fingerprint but is signed by
        mallory is refused.
        """
        parsed = envelope.parse(seal(b"forged?"))
        forged = resign(parsed, identity("mallory"))
        self.assertEqual(envelope.parse(forged).header, parsed.header)
        error = self.assertRejected(forged)
        self.assertIn("signature", str(error))
        self.assertRejected(forged, sender_key=identity("mallory").public_key)
        # Control: the same construction with alice's key opens.
        self.assertEqual(open_(resign(parsed, alice())).plaintext, b"forged?")

    def test_impersonation_with_own_key(self):
        """Mallory sealing as 'alice' with her own key is refused by bob."""
        fake = keys.Identity("alice", identity("mallory").private_key)
        sealed = envelope.seal(fake, "bob", bob().public_key, b"I am alice")
        self.assertRejected(sealed)

    def test_header_bound_to_ciphertext(self):
        """
        Mallory re-signs alice's ciphertext under a header naming herself:
        the signature checks out, but the header is the AEAD associated data,
        so the ciphertext no longer authenticates.
        """
        mallory = identity("mallory")
        parsed = envelope.parse(seal(b"alice wrote this"))
        h = parsed.header
        header = envelope.Header(
            h.version, h.suite, "mallory", mallory.fingerprint,
            h.recipient, h.recipient_fingerprint, h.message_id, h.timestamp,
        )
        signed = signed_part(header, parsed.wrapped_key, parsed.nonce, parsed.ciphertext)
        stolen = resign(parsed, mallory, signed)
        error = self.assertRejected(stolen, sender_key=mallory.public_key, unwrapped=True)
        self.assertIn("authenticate", str(error))

    def test_wrapped_key_garbage(self):
        """A validly signed envelope whose key does not unwrap is refused."""
        mallory = identity("mallory")
        parsed = envelope.parse(envelope.seal(mallory, "bob", bob().public_key, b"x"))
        signed = signed_part(parsed.header, b"\x01" * 384, parsed.nonce, parsed.ciphertext)
        error = self.assertRejected(
            resign(parsed, mallory, signed), sender_key=mallory.public_key, unwrapped=True
        )
        self.assertIn("unwrap", str(error))

    def test_wrapped_key_wrong_size(self):
        """A validly signed envelope wrapping a 16-byte key is refused."""
        mallory = identity("mallory")
        parsed = envelope.parse(envelope.seal(mallory, "bob", bob().public_key, b"x"))
        wrapped = bob().public_key.encrypt(b"k" * 16, envelope.OAEP)
        signed = signed_part(parsed.header, wrapped, parsed.nonce, parsed.ciphertext)
        error = self.assertRejected(
            resign(parsed, mallory, signed), sender_key=mallory.public_key, unwrapped=True
        )
        self.assertIn("size", str(error))

    def test_truncated(self):
        sealed = seal(b"truncate me")
        for end in range(len(sealed)):
            self.assertRaises(EnvelopeError, envelope.parse, sealed[:end])
        for end in (0, 1, 100, len(sealed) // 2, len(sealed) - 1):
            self.assertRejected(sealed[:end])

    def test_trailing_bytes(self):
        sealed = seal(b"trail")
        for extra in (b"\x00", b"\xff", b"trailing bytes"):
            self.assertRaises(EnvelopeError, envelope.parse, sealed + extra)
            self.assertRejected(sealed + extra)

    def test_over_max_envelope(self):
        sealed = seal(b"big")
        error = self.assertRaises(EnvelopeTooLarge, envelope.parse, sealed, len(sealed) - 1)
        self.assertIsInstance(error, EnvelopeError)
        self.assertEqual(envelope.parse(sealed, len(sealed)).header.sender, "alice")
        self.assertRaises(EnvelopeError, envelope.parse, b"\x01" * (wire.MAX_ENVELOPE + 1))

    def test_version_and_suite(self):
        sealed = bytearray(seal())
        for index, value in ((0, 0), (0, 3), (0, 255), (1, 0), (1, 2), (1, 255)):
            altered = bytearray(sealed)
            altered[index] = value
            self.assertRaises(EnvelopeError, envelope.parse, bytes(altered))

    def test_oversized_fields(self):
        parsed = envelope.parse(seal())
        too_big_wrapped = (
            Writer().raw(parsed.header_bytes).blob16(b"w" * (envelope.MAX_WRAPPED_KEY + 1))
            .raw(parsed.nonce).blob32(parsed.ciphertext).blob16(parsed.signature).getvalue()
        )
        self.assertRaises(EnvelopeError, envelope.parse, too_big_wrapped)
        too_big_signature = (
            Writer().raw(parsed.signed).blob16(b"s" * (envelope.MAX_SIGNATURE + 1)).getvalue()
        )
        self.assertRaises(EnvelopeError, envelope.parse, too_big_signature)

    def test_invalid_identities_in_header(self):
        parsed = envelope.parse(seal())
        h = parsed.header
        for raw in (b"", b"a/b", b"caf\xc3\xa9", b"-x", b"a" * 65):
            header = (
                Writer().u8(1).u8(1).u8(len(raw)).raw(raw).raw(h.sender_fingerprint)
                .identity(h.recipient).raw(h.recipient_fingerprint).raw(h.message_id)
                .u64(h.timestamp).getvalue()
            )
            data = parsed.signed.replace(parsed.header_bytes, header, 1)
            data = Writer().raw(data).blob16(parsed.signature).getvalue()
            self.assertRaises(EnvelopeError, envelope.parse, data)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_parse_arbitrary_bytes(self, data):
        self.assertParsesOrEnvelopeError(data)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_parse_arbitrary_bytes_after_version(self, data):
        self.assertParsesOrEnvelopeError(b"\x01\x01" + data)

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_parse_mutated(self, data):
        """Overwriting a run of a real envelope parses or raises EnvelopeError."""
        sealed = _small_envelope()
        start = data.draw(st.integers(0, len(sealed) - 1))
        replacement = data.draw(st.binary(min_size=0, max_size=8))
        stop = data.draw(st.integers(start, min(len(sealed), start + 8)))
        self.assertParsesOrEnvelopeError(sealed[:start] + replacement + sealed[stop:])

    def assertParsesOrEnvelopeError(self, data: bytes) -> None:
        """
        C{data} parses, or raises EnvelopeError; and L{envelope.read_header},
        the relay's reading, agrees: the same header, or the same error.
        """
        try:
            parsed = envelope.parse(data)
        except EnvelopeError as e:
            with self.assertRaises(EnvelopeError) as caught:
                envelope.read_header(data)
            self.assertEqual(str(caught.exception), str(e))
            return
        self.assertEqual(envelope.read_header(data), parsed.header)
        self.assertIsInstance(parsed, envelope.Envelope)
        self.assertEqual(parsed.signed + Writer().blob16(parsed.signature).getvalue(), data)
        self.assertTrue(data.startswith(parsed.header_bytes))
        self.assertEqual(parsed.header.encode(), parsed.header_bytes)


    def test_out_of_range_timestamp_or_sequence(self):
        """
        A validly signed envelope whose timestamp or sequence number is
        2**63 or more is malformed: the relay refuses it (rather than
        storing what no client could keep), and a client does not open it.
        Both readers, the relay's fast one too, say why in the same words.
        """
        for version, timestamp, seq, field in (
            (2, 2**63, 1, "timestamp"),
            (2, 2**64 - 1, 1, "timestamp"),
            (2, 1_700_000_000, 2**63, "sequence number"),
            (2, 1_700_000_000, 2**64 - 1, "sequence number"),
            (2, 2**64 - 1, 2**64 - 1, "timestamp"),
            (1, 2**63, 0, "timestamp"),
        ):
            data = forged(timestamp=timestamp, seq=seq, version=version)
            error = self.assertRaises(EnvelopeError, envelope.parse, data)
            value = timestamp if field == "timestamp" else seq
            self.assertIn(f"{field} {value} is out of range", str(error))
            self.assertNotIsInstance(error, EnvelopeTooLarge)
            self.assertIsNone(envelope._route(data, wire.MAX_ENVELOPE))
            self.assertParsesOrEnvelopeError(data)
            self.assertRaises(EnvelopeError, envelope.parse_header,
                              _forged_header(timestamp, seq, version))
            self.assertRejected(data, message=f"{field} {timestamp} {seq}")
        # One below: the largest values, from the same forger, are fine.
        data = forged(timestamp=2**63 - 1, seq=2**63 - 1)
        self.assertIsNotNone(envelope._route(data, wire.MAX_ENVELOPE))
        self.assertEqual(envelope.read_header(data).timestamp, 2**63 - 1)
        self.assertEqual(open_(data).header.seq, 2**63 - 1)

    def test_read_header_limit(self):
        """The relay's reading refuses an envelope over its limit, as parse does."""
        sealed = _small_envelope()
        self.assertEqual(envelope.read_header(sealed, len(sealed)).recipient, "dave")
        with self.assertRaises(envelope.EnvelopeTooLarge):
            envelope.read_header(sealed, len(sealed) - 1)


def _forged_header(timestamp: int, seq: int, version: int = 2) -> bytes:
    return envelope.Header(
        version=version, suite=envelope.SUITE_RSA, sender="alice",
        sender_fingerprint=alice().fingerprint, recipient="bob",
        recipient_fingerprint=bob().fingerprint, message_id=b"m" * 16,
        timestamp=timestamp, seq=seq,
    ).encode()


def forged(timestamp: int, seq: int, version: int = 2) -> bytes:
    """
    An envelope from alice to bob, validly signed and encrypted, with any
    u64 timestamp and sequence number: what a sender that skips L{seal}'s
    checks can make.
    """
    header = _forged_header(timestamp, seq, version)
    content_key = b"k" * 32
    nonce = b"n" * 12
    ciphertext = AESGCM(content_key).encrypt(nonce, b"out of range", header)
    wrapped = bob().public_key.encrypt(content_key, envelope.OAEP)
    signed = (Writer().raw(header).blob16(wrapped).raw(nonce).blob32(ciphertext)
              .getvalue())
    return Writer().raw(signed).blob16(alice().sign(signed)).getvalue()


_small: list[bytes] = []


def _small_envelope() -> bytes:
    if not _small:
        _small.append(envelope.seal(identity("carol"), "dave", identity("dave").public_key, b"hi"))
    return _small[0]


class PrimitiveTests(SynchronousTestCase):
    """The envelope uses RSA-OAEP(SHA-256), AES-256-GCM and RSA-PSS."""

    def test_oaep_sha256(self):
        sealed = seal(b"oaep check")
        parsed = envelope.parse(sealed)
        oaep = padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        content_key = bob().private_key.decrypt(parsed.wrapped_key, oaep)
        self.assertEqual(len(content_key), 32)
        plaintext = AESGCM(content_key).decrypt(
            parsed.nonce, parsed.ciphertext, parsed.header_bytes
        )
        self.assertEqual(plaintext, b"oaep check")

    def test_not_other_paddings(self):
        parsed = envelope.parse(seal())
        content_key = bob().private_key.decrypt(parsed.wrapped_key, envelope.OAEP)
        # OpenSSL 3 answers a bad PKCS#1 v1.5 padding with random bytes
        # (implicit rejection) rather than an error: either way, not the key.
        try:
            pkcs1 = bob().private_key.decrypt(parsed.wrapped_key, padding.PKCS1v15())
        except ValueError:
            pass
        else:
            self.assertNotEqual(pkcs1, content_key)
        sha1 = padding.OAEP(
            mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
        )
        self.assertRaises(ValueError, bob().private_key.decrypt, parsed.wrapped_key, sha1)

    def test_pss_signature(self):
        parsed = envelope.parse(seal())
        # Raises InvalidSignature if it is not a PSS-SHA256 signature of `signed`.
        alice().public_key.verify(
            parsed.signature,
            parsed.signed,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
            hashes.SHA256(),
        )
        self.assertTrue(keys.verify(alice().public_key, parsed.signature, parsed.signed))


# Found by mutation testing (make mutation-test): checks no test above guarded.

class FieldLimitTests(SynchronousTestCase):
    """The wrapped key and the signature: up to 1,024 bytes each (an 8,192-bit RSA key's)."""

    def shaped(self, wrapped: int, signature: int) -> bytes:
        header = _forged_header(1_700_000_000, 1)
        return (Writer().raw(header).blob16(b"w" * wrapped).raw(b"n" * envelope.NONCE_SIZE)
                .blob32(b"c" * 32).blob16(b"s" * signature).getvalue())

    def test_largest_fields_are_read(self):
        data = self.shaped(1024, 1024)
        parsed = envelope.parse(data)
        self.assertEqual((len(parsed.wrapped_key), len(parsed.signature)), (1024, 1024))
        self.assertEqual(envelope.read_header(data).sender, "alice")

    def test_larger_fields_are_malformed(self):
        for data in (self.shaped(1025, 256), self.shaped(256, 1025)):
            self.assertRaises(EnvelopeError, envelope.parse, data)
            self.assertRaises(EnvelopeError, envelope.read_header, data)

    def test_what_was_read_cannot_be_altered(self):
        import dataclasses

        data = seal()
        parsed = envelope.parse(data)
        opened = open_(data)
        for record, field in ((parsed.header, "sender"), (parsed, "signature"),
                              (opened, "plaintext")):
            self.assertRaises(dataclasses.FrozenInstanceError, setattr, record, field, b"x")


class SealLimitTests(SynchronousTestCase):
    """What seal refuses, before anything is encrypted, and after."""

    def test_sequence_and_time_ranges(self):
        for bad in ({"seq": -1}, {"seq": 2**63}, {"timestamp": -1}, {"timestamp": 2**63}):
            self.assertRaises(ValueError, seal, **bad)
        opened = open_(seal(seq=0, timestamp=0))
        self.assertEqual((opened.header.seq, opened.header.timestamp), (0, 0))

    def test_largest_message_fits_exactly(self):
        size = max(alice().public_key.key_size, bob().public_key.key_size) // 8
        limit = 4096 - envelope.overhead("alice", "bob", size)
        data = envelope.seal(alice(), "bob", bob().public_key, b"x" * limit, max_envelope=4096)
        self.assertEqual(len(data), 4096)
        with self.assertRaises(EnvelopeTooLarge) as caught:
            envelope.seal(alice(), "bob", bob().public_key, b"x" * (limit + 1), max_envelope=4096)
        self.assertIn(f"message of {limit + 1} bytes is over the limit of {limit} bytes",
                      str(caught.exception))

    def test_key_of_an_odd_size_is_caught_after_sealing(self):
        """
        A 2,049-bit key (openssl makes such keys) wraps into 257 bytes where
        the estimate counts 256: the sealed envelope itself is checked too.
        """
        odd = rsa.RSAPublicNumbers(keys.PUBLIC_EXPONENT, 2**2048 + 1).public_key()
        self.assertEqual(odd.key_size, 2049)
        sender = identity("carol")  # 2,048 bits: the odd key is the larger
        limit = 4096 - envelope.overhead("carol", "bob", 256)
        with self.assertRaises(EnvelopeTooLarge) as caught:
            envelope.seal(sender, "bob", odd, b"x" * limit, max_envelope=4096)
        self.assertIn("envelope of 4097 bytes is over 4096", str(caught.exception))


class StrictReadingTests(SynchronousTestCase):
    """The relay's reader refuses, as malformed and nothing else, whatever is not an envelope."""

    def test_header_alone_means_nothing_after_it(self):
        header = envelope.parse(seal()).header_bytes
        self.assertEqual(envelope.parse_header(header).sender, "alice")
        self.assertRaises(EnvelopeError, envelope.parse_header, header + b"x")

    def test_every_truncation_is_malformed(self):
        data = seal(b"")
        for n in range(len(data)):
            self.assertRaises(EnvelopeError, envelope.read_header, data[:n])

    def test_fast_reading_agrees_with_the_strict_one(self):
        """
        The relay reads a well-formed envelope in a few slices (_route); for
        anything else it must answer nothing, and leave it to the strict reader.
        """
        data = seal(b"hi", seq=3)
        strict = envelope.parse(data).header
        self.assertEqual(envelope._route(data, wire.MAX_ENVELOPE), strict)
        parsed = envelope.parse(data)
        fields_end = len(parsed.header_bytes) + 2 + len(parsed.wrapped_key) + 12 + 4
        for position in list(range(fields_end + 2)) + [len(data) - 1]:
            for value in {0, 1, 2, 0x41, 0x7F, 0xFF, (data[position] + 1) % 256,
                          (data[position] - 1) % 256}:
                changed = data[:position] + bytes([value]) + data[position + 1:]
                fast = envelope._route(changed, wire.MAX_ENVELOPE)
                if fast is None:
                    continue
                try:
                    expected = envelope.parse(changed).header
                except EnvelopeError:
                    self.fail(f"byte {position} = {value}: read fast, but malformed")
                self.assertEqual(fast, expected, (position, value))
        self.assertIsNone(envelope._route(data + b"x", wire.MAX_ENVELOPE))

    def test_names_remembered_are_bounded(self):
        """The relay remembers the ids it read, at most 65,536, then starts afresh."""
        self.addCleanup(envelope._names.clear)
        envelope._names.clear()
        for n in range(65_536):
            self.assertEqual(envelope._name(b"n%d" % n), "n%d" % n)
        self.assertEqual(len(envelope._names), 65_536)
        envelope._name(b"one-more")
        self.assertEqual(len(envelope._names), 1)
        self.assertIsNone(envelope._name(b"Upper"))
        self.assertIsNone(envelope._name(b"\xff"))


class FastPathEdgeTests(SynchronousTestCase):
    def test_fast_path_takes_envelopes_at_every_edge(self):
        """Empty and largest fields, a ciphertext as large as allowed: still read fast."""
        header = _forged_header(1_700_000_000, 1)
        for wrapped in (0, 1024):
            for ciphertext in (0, 32):
                for signature in (0, 1024):
                    data = (Writer().raw(header).blob16(b"w" * wrapped)
                            .raw(b"n" * envelope.NONCE_SIZE).blob32(b"c" * ciphertext)
                            .blob16(b"s" * signature).getvalue())
                    self.assertEqual(envelope._route(data, max(ciphertext, 1)),
                                     envelope.parse(data).header,
                                     (wrapped, ciphertext, signature))


class UnusableKeyTests(SynchronousTestCase):
    def test_sealing_to_a_key_no_one_holds(self):
        """An even modulus parses but encrypts to nothing: refused as an envelope error."""
        even = rsa.RSAPublicNumbers(keys.PUBLIC_EXPONENT, 2**2047 + 2).public_key()
        with self.assertRaises(EnvelopeError) as caught:
            envelope.seal(alice(), "bob", even, b"hi")
        self.assertIn("cannot seal for 'bob'", str(caught.exception))
