"""
Tests for L{mailrelay.pkcs8}: encrypted PKCS#8 written at a chosen PBKDF2
iteration count, and the strict reader of that count.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import pkcs8
from tests.test_keys import identity, openssl

PASSPHRASE = b"correct horse"


def pem_der(pem: bytes) -> bytes:
    return base64.b64decode(b"".join(pem.splitlines()[1:-1]))


def plain_der(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


_written: dict[str, bytes] = {}


def cryptography_pem() -> bytes:
    """alice's key as cryptography's BestAvailableEncryption writes it (2,048 iterations)."""
    if "best" not in _written:
        _written["best"] = identity("alice").private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE))
    return _written["best"]


def fields(der: bytes) -> tuple[bytes, int, bytes, bytes]:
    """(salt, iterations, iv, ciphertext) of the structure both writers produce."""
    r = pkcs8._Reader(der)
    info = pkcs8._Reader(r.take(0x30))
    alg = pkcs8._algorithm(info, pkcs8.PBES2)
    ciphertext = info.take(0x04)
    params = pkcs8._Reader(alg.take(0x30))
    kdf = pkcs8._algorithm(params, pkcs8.PBKDF2)
    scheme = pkcs8._algorithm(params, pkcs8.AES_256_CBC)
    iv = scheme.take(0x04)
    kp = pkcs8._Reader(kdf.take(0x30))
    salt = kp.take(0x04)
    iterations = int.from_bytes(kp.take(0x02), "big")
    return salt, iterations, iv, ciphertext


def pbkdf2_der(params: bytes, scheme: bytes | None = None, tail: bytes = b"",
               data: bytes = b"\x04\x01\x00") -> bytes:
    """An EncryptedPrivateKeyInfo around PBKDF2-params C{params} (their content octets)."""
    t = pkcs8._tlv
    if scheme is None:
        scheme = t(0x30, t(0x06, pkcs8.AES_256_CBC) + t(0x04, b"\x00" * 16))
    kdf = t(0x30, t(0x06, pkcs8.PBKDF2) + t(0x30, params))
    alg = t(0x30, t(0x06, pkcs8.PBES2) + t(0x30, kdf + scheme))
    return t(0x30, alg + data) + tail


def iterations_of(der: bytes) -> int | None:
    return pkcs8.pbkdf2_iterations(pkcs8.to_pem(der))


SALT = b"\x04\x08" + b"s" * 8
SHA256 = pkcs8._tlv(0x30, pkcs8._tlv(0x06, pkcs8.HMAC_WITH_SHA256) + b"\x05\x00")


class WriterTests(SynchronousTestCase):
    def test_same_bytes_as_cryptography(self):
        """
        Given cryptography's salt, IV and ciphertext, the encoder writes
        cryptography's file byte for byte (PEM included), and the key
        derived here decrypts that ciphertext to the key: the parameters
        mean to us what they mean to cryptography.
        """
        best = cryptography_pem()
        salt, iterations, iv, ciphertext = fields(pem_der(best))
        self.assertEqual(iterations, 2048)
        self.assertEqual(len(salt), pkcs8.SALT_BYTES)
        self.assertEqual(
            pkcs8.to_pem(pkcs8.encrypted_private_key_info(salt, iterations, iv, ciphertext)),
            best)
        key = pkcs8.derive_key(PASSPHRASE, salt, iterations)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        self.assertEqual(unpadder.update(padded) + unpadder.finalize(),
                         plain_der(identity("alice").private_key))

    def test_cryptography_opens_it(self):
        key = identity("alice").private_key
        pem = pkcs8.encrypt_pem(plain_der(key), PASSPHRASE, 3000)
        self.assertTrue(pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"))
        self.assertEqual(pkcs8.pbkdf2_iterations(pem), 3000)
        opened = serialization.load_pem_private_key(pem, PASSPHRASE)
        self.assertEqual(opened.private_numbers(), key.private_numbers())
        self.assertRaises(ValueError, serialization.load_pem_private_key, pem, b"wrong")
        # A fresh salt and IV each time.
        again = pkcs8.encrypt_pem(plain_der(key), PASSPHRASE, 3000)
        self.assertNotEqual(fields(pem_der(again))[0], fields(pem_der(pem))[0])
        self.assertNotEqual(fields(pem_der(again))[2], fields(pem_der(pem))[2])

    def test_refuses_what_protects_nothing(self):
        der = plain_der(identity("alice").private_key)
        self.assertRaises(ValueError, pkcs8.encrypt_pem, der, b"", 3000)
        self.assertRaises(ValueError, pkcs8.encrypt_pem, der, PASSPHRASE, 0)
        self.assertRaises(ValueError, pkcs8.encrypt_pem, der, PASSPHRASE, -1)

    def test_integers_in_their_shortest_form(self):
        for n, content in ((1, b"\x01"), (127, b"\x7f"), (128, b"\x00\x80"),
                           (2048, b"\x08\x00"), (1_000_000, b"\x0f\x42\x40"),
                           (32768, b"\x00\x80\x00")):
            self.assertEqual(pkcs8._integer(n), bytes([2, len(content)]) + content)

    def test_long_lengths(self):
        self.assertEqual(pkcs8._tlv(4, b"x" * 127)[:2], b"\x04\x7f")
        self.assertEqual(pkcs8._tlv(4, b"x" * 128)[:3], b"\x04\x81\x80")
        self.assertEqual(pkcs8._tlv(4, b"x" * 256)[:4], b"\x04\x82\x01\x00")

    def test_object_identifiers(self):
        self.assertEqual(pkcs8.PBES2, bytes.fromhex("2a864886f70d01050d"))
        self.assertEqual(pkcs8.PBKDF2, bytes.fromhex("2a864886f70d01050c"))
        self.assertEqual(pkcs8.HMAC_WITH_SHA256, bytes.fromhex("2a864886f70d0209"))
        self.assertEqual(pkcs8.AES_256_CBC, bytes.fromhex("60864801650304012a"))


class ReaderTests(SynchronousTestCase):
    def test_reads_cryptography(self):
        self.assertEqual(pkcs8.pbkdf2_iterations(cryptography_pem()), 2048)

    def test_reads_openssl(self):
        """openssl's own files: an 8-byte salt, and without the prf (HMAC-SHA1)."""
        plain = self.mktemp()
        with open(plain, "wb") as f:
            f.write(identity("alice").private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        secret = self.mktemp()
        with open(secret, "wb") as f:
            f.write(PASSPHRASE + b"\n")
        for prf, n in (("hmacWithSHA256", 70001), ("hmacWithSHA1", 4097)):
            result = openssl("pkcs8", "-topk8", "-in", plain, "-v2", "aes-256-cbc",
                             "-v2prf", prf, "-iter", str(n), "-passout", f"file:{secret}")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(pkcs8.pbkdf2_iterations(result.stdout), n)
        result = openssl("pkcs8", "-topk8", "-in", plain, "-scrypt", "-scrypt_N", "1024",
                         "-passout", f"file:{secret}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        self.assertIsNone(pkcs8.pbkdf2_iterations(result.stdout))

    def test_optional_fields(self):
        self.assertEqual(iterations_of(pbkdf2_der(SALT + b"\x02\x02\x08\x00")), 2048)
        self.assertEqual(iterations_of(pbkdf2_der(SALT + b"\x02\x02\x08\x00" + SHA256)), 2048)
        self.assertEqual(iterations_of(pbkdf2_der(SALT + b"\x02\x02\x08\x00\x02\x01\x20")),
                         2048)
        self.assertEqual(
            iterations_of(pbkdf2_der(SALT + b"\x02\x02\x08\x00\x02\x01\x20" + SHA256)), 2048)
        # The prf's parameters may be absent.
        bare = pkcs8._tlv(0x30, pkcs8._tlv(0x06, pkcs8.HMAC_WITH_SHA256))
        self.assertEqual(iterations_of(pbkdf2_der(SALT + b"\x02\x02\x08\x00" + bare)), 2048)

    def test_not_this_structure(self):
        good = SALT + b"\x02\x02\x08\x00" + SHA256
        self.assertEqual(iterations_of(pbkdf2_der(good)), 2048)  # the control
        t = pkcs8._tlv
        bad = {
            "zero iterations": pbkdf2_der(SALT + b"\x02\x01\x00" + SHA256),
            "negative iterations": pbkdf2_der(SALT + b"\x02\x01\xff" + SHA256),
            "integer with a needless 0": pbkdf2_der(SALT + b"\x02\x03\x00\x08\x00" + SHA256),
            "empty integer": pbkdf2_der(SALT + b"\x02\x00" + SHA256),
            "integer over 64 bits": pbkdf2_der(SALT + b"\x02\x09\x01" + b"\x00" * 8 + SHA256),
            "no iteration count": pbkdf2_der(SALT + SHA256),
            "salt from another source": pbkdf2_der(t(0x30, t(0x06, pkcs8.PBKDF2))
                                                   + b"\x02\x01\x01"),
            "negative key length": pbkdf2_der(SALT + b"\x02\x02\x08\x00\x02\x01\x80" + SHA256),
            "a field too many": pbkdf2_der(good + b"\x05\x00"),
            "prf with two parameters": pbkdf2_der(
                SALT + b"\x02\x02\x08\x00"
                + t(0x30, t(0x06, pkcs8.HMAC_WITH_SHA256) + b"\x05\x00\x05\x00")),
            "scheme without parameters": pbkdf2_der(good, t(0x30, t(0x06, pkcs8.AES_256_CBC))),
            "scheme with a context tag": pbkdf2_der(
                good, t(0x30, t(0x06, pkcs8.AES_256_CBC) + b"\xa0\x00")),
            "scheme with two parameters": pbkdf2_der(
                good, t(0x30, t(0x06, pkcs8.AES_256_CBC) + b"\x04\x00\x05\x00")),
            "scheme parameter with a high tag number": pbkdf2_der(
                good, t(0x30, t(0x06, pkcs8.AES_256_CBC) + b"\x1f\x01\x00")),
            "scheme with an empty OID": pbkdf2_der(good, t(0x30, t(0x06, b"") + b"\x05\x00")),
            "a third PBES2 parameter": pbkdf2_der(
                good, t(0x30, t(0x06, pkcs8.AES_256_CBC) + t(0x04, b"\x00" * 16)) + b"\x05\x00"),
            "nothing encrypted": pbkdf2_der(good, data=b"\x04\x00"),
            "a field after the encrypted data": pbkdf2_der(good, data=b"\x04\x01\x00\x05\x00"),
            "no encrypted data": pbkdf2_der(good, data=b""),
            "bytes after it": pbkdf2_der(good, tail=b"\x00"),
            "another KDF": pbkdf2_der(good).replace(pkcs8.PBKDF2, pkcs8.PBKDF2[:-1] + b"\x0b"),
            "PBES1": pbkdf2_der(good).replace(pkcs8.PBES2, pkcs8.PBES2[:-1] + b"\x03"),
        }
        # Something after the PBKDF2 parameters; after the PBES2 parameters.
        scheme = t(0x30, t(0x06, pkcs8.AES_256_CBC) + t(0x04, b"\x00" * 16))
        for name, kdf_tail, pbes2_tail in (
                ("the control", b"", b""),
                ("something after the PBKDF2 parameters", b"\x05\x00", b""),
                ("something after the PBES2 parameters", b"", b"\x05\x00")):
            kdf = t(0x30, t(0x06, pkcs8.PBKDF2) + t(0x30, good) + kdf_tail)
            pbes2 = t(0x30, t(0x06, pkcs8.PBES2) + t(0x30, kdf + scheme) + pbes2_tail)
            bad[name] = t(0x30, pbes2 + b"\x04\x01\x00")
        self.assertEqual(iterations_of(bad.pop("the control")), 2048)
        for name, der in bad.items():
            self.assertIsNone(iterations_of(der), name)

    def test_lengths_in_their_shortest_form_only(self):
        def with_salt(header: bytes, size: int) -> int | None:
            return iterations_of(pbkdf2_der(header + b"s" * size + b"\x02\x02\x08\x00"))

        # The controls: the shortest forms, short and long.
        self.assertEqual(with_salt(b"\x04\x10", 16), 2048)
        self.assertEqual(with_salt(b"\x04\x81\x80", 128), 2048)
        self.assertEqual(with_salt(b"\x04\x82\x01\x00", 256), 2048)
        # A short length in the long form; a leading zero octet; BER's
        # indefinite length; five length octets.
        self.assertIsNone(with_salt(b"\x04\x81\x10", 16))
        self.assertIsNone(with_salt(b"\x04\x82\x00\x80", 128))
        self.assertIsNone(iterations_of(pbkdf2_der(
            b"\x04\x80" + b"s" * 16 + b"\x00\x00\x02\x02\x08\x00")))
        self.assertIsNone(with_salt(b"\x04\x85\x00\x00\x00\x01\x00", 256))
        # A length running past what holds it.
        self.assertIsNone(with_salt(b"\x04\x11", 16))

    def test_every_truncation(self):
        der = pem_der(cryptography_pem())
        for n in range(len(der)):
            self.assertIsNone(iterations_of(der[:n]), n)

    def test_pem(self):
        pem = cryptography_pem()
        self.assertEqual(pkcs8.pbkdf2_iterations(b"comment\n" + pem + b"trailer\n"), 2048)
        self.assertEqual(pkcs8.pbkdf2_iterations(pem.replace(b"\n", b"\r\n")), 2048)
        unencrypted = identity("alice").private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        # A character outside base64 is refused, not skipped.
        self.assertIsNone(pkcs8.pbkdf2_iterations(pem.replace(b"\n", b"!\n", 2)))
        for pem_like in (b"", unencrypted, pem.replace(b"M", b"!", 1),
                         pem.split(b"-----END")[0], pem.replace(b"BEGIN ENCRYPTED", b"BEGIN")):
            self.assertIsNone(pkcs8.pbkdf2_iterations(pem_like))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data):
        """Whatever the bytes, an answer (None or a count), never an exception."""
        self.assertIn(type(iterations_of(data)), (int, type(None)))

    @settings(max_examples=300, deadline=None)
    @given(st.integers(min_value=0, max_value=104), st.integers(min_value=0, max_value=255))
    def test_any_one_byte_changed(self, at, value):
        """Any byte of the header (all but the ciphertext) changed: no exception."""
        der = bytearray(pem_der(cryptography_pem()))
        der[at] = value
        answer = iterations_of(bytes(der))
        self.assertIn(type(answer), (int, type(None)))
