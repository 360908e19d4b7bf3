"""
Passphrase-encrypted PKCS#8 at an iteration count of our choosing.

The format is the one C{openssl pkey -passin} and C{openssl pkcs8} open:
an EncryptedPrivateKeyInfo (RFC 5958) whose algorithm is PBES2 (RFC 8018)
with PBKDF2-HMAC-SHA256 and AES-256-CBC::

    EncryptedPrivateKeyInfo ::= SEQUENCE {
        encryptionAlgorithm SEQUENCE { OID pbes2, PBES2-params },
        encryptedData       OCTET STRING }       -- AES-256-CBC(PrivateKeyInfo)
    PBES2-params ::= SEQUENCE {
        keyDerivationFunc SEQUENCE { OID pbkdf2, PBKDF2-params },
        encryptionScheme  SEQUENCE { OID aes256-CBC, OCTET STRING iv } }
    PBKDF2-params ::= SEQUENCE {
        salt           OCTET STRING,
        iterationCount INTEGER,
        keyLength      INTEGER OPTIONAL,
        prf            SEQUENCE { OID hmacWithSHA256, NULL } DEFAULT hmacWithSHA1 }

C{cryptography} writes exactly this with C{BestAvailableEncryption}, but
only at its fixed 2,048 iterations, and its encryption builder takes an
iteration count for PKCS#12 and OpenSSH keys, not for PKCS#8.  So the few
DER elements around the ciphertext are put together here, the same bytes
C{cryptography} writes apart from the count; every primitive (the plain
PKCS#8 inside, PBKDF2, AES-CBC, the padding) is C{cryptography}'s, and
C{cryptography} and openssl read the result.

L{pbkdf2_iterations} takes this one structure apart, strictly (DER only:
minimal lengths and integers, nothing left over at any level), to learn
the iteration count of a file written here, by C{cryptography} or by
C{openssl pkcs8 -v2}.  It reads nothing else: for anything else it
answers None, and never raises.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

SALT_BYTES = 16
"""The PBKDF2 salt: 128 random bits, as C{cryptography} writes it."""

_SEQUENCE, _INTEGER, _OCTET_STRING, _NULL, _OID = 0x30, 0x02, 0x04, 0x05, 0x06

_BEGIN = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_END = b"-----END ENCRYPTED PRIVATE KEY-----"


def _oid(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER (X.690 8.19)."""
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return bytes(out)


PBES2 = _oid("1.2.840.113549.1.5.13")
PBKDF2 = _oid("1.2.840.113549.1.5.12")
HMAC_WITH_SHA256 = _oid("1.2.840.113549.2.9")
AES_256_CBC = _oid("2.16.840.1.101.3.4.1.42")


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element: C{tag}, the minimal definite length, C{content}."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _integer(n: int) -> bytes:
    """A non-negative INTEGER, in the fewest octets (a leading 0 only before a high bit)."""
    return _tlv(_INTEGER, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def encrypted_private_key_info(salt: bytes, iterations: int, iv: bytes,
                               ciphertext: bytes) -> bytes:
    """The DER EncryptedPrivateKeyInfo for these parameters and C{ciphertext}."""
    pbkdf2_params = _tlv(_SEQUENCE, _tlv(_OCTET_STRING, salt) + _integer(iterations)
                         + _tlv(_SEQUENCE, _tlv(_OID, HMAC_WITH_SHA256) + _tlv(_NULL, b"")))
    pbes2_params = _tlv(_SEQUENCE, _tlv(_SEQUENCE, _tlv(_OID, PBKDF2) + pbkdf2_params)
                        + _tlv(_SEQUENCE, _tlv(_OID, AES_256_CBC) + _tlv(_OCTET_STRING, iv)))
    algorithm = _tlv(_SEQUENCE, _tlv(_OID, PBES2) + pbes2_params)
    return _tlv(_SEQUENCE, algorithm + _tlv(_OCTET_STRING, ciphertext))


def derive_key(passphrase: bytes, salt: bytes, iterations: int) -> bytes:
    """The AES-256 key: PBKDF2-HMAC-SHA256 of C{passphrase}, the one slow step."""
    return PBKDF2HMAC(hashes.SHA256(), 32, salt, iterations).derive(passphrase)


def encrypt_pem(private_key_info: bytes, passphrase: bytes, iterations: int) -> bytes:
    """
    C{private_key_info} (DER PKCS#8, unencrypted) encrypted with
    C{passphrase}: PEM "ENCRYPTED PRIVATE KEY", with a fresh salt and IV.
    """
    if not passphrase:
        raise ValueError("an empty passphrase protects nothing")
    if iterations < 1:
        raise ValueError("PBKDF2 needs at least one iteration")
    salt, iv = os.urandom(SALT_BYTES), os.urandom(16)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(private_key_info) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derive_key(passphrase, salt, iterations)),
                       modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return to_pem(encrypted_private_key_info(salt, iterations, iv, ciphertext))


def to_pem(der: bytes) -> bytes:
    """DER as PEM "ENCRYPTED PRIVATE KEY", in lines of 64 as openssl writes them."""
    text = base64.b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"\n".join([_BEGIN, *lines, _END]) + b"\n"


class _Malformed(Exception):
    """Not exactly the structure L{pbkdf2_iterations} reads."""


class _Reader:
    """The DER elements inside one constructed element, read in order."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def more(self) -> bool:
        return self._at < len(self._data)

    def peek(self) -> int:
        if not self.more():
            raise _Malformed("nothing left")
        return self._data[self._at]

    def take(self, tag: int) -> bytes:
        """The content of the next element, which must have C{tag}."""
        if self.peek() != tag:
            raise _Malformed(f"tag {self.peek():#x} where {tag:#x} was expected")
        data, at = self._data, self._at + 1
        if at >= len(data):
            raise _Malformed("no length")
        first = data[at]
        at += 1
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            length = int.from_bytes(data[at : at + count], "big")
            # DER has the long form only for 128 and more, in the fewest
            # octets.  BER's indefinite length (0x80) reads as 0 here.
            if length < 0x80 or data[at] == 0:
                raise _Malformed("length not in its shortest form")
            at += count
        if length > len(data) - at:
            raise _Malformed("element longer than what holds it")
        self._at = at + length
        return data[at : at + length]

    def take_any(self) -> None:
        """Skip the next element, whatever its (low-numbered, universal) tag."""
        tag = self.peek()
        if tag & 0x1F == 0x1F or tag & 0xC0:
            raise _Malformed("not a universal tag")
        self.take(tag)

    def end(self) -> None:
        if self.more():
            raise _Malformed("bytes left over")


def _positive(content: bytes) -> int:
    """An INTEGER's content that must be minimal, positive, and fit in 64 bits."""
    if not content or len(content) > 8:
        raise _Malformed("bad integer size")
    if len(content) > 1 and content[0] == 0 and content[1] < 0x80:
        raise _Malformed("integer not in its shortest form")
    if content[0] >= 0x80:
        raise _Malformed("negative integer")
    value = int.from_bytes(content, "big")
    if value < 1:
        raise _Malformed("integer below 1")
    return value


def _algorithm(reader: _Reader, oid: bytes | None = None) -> _Reader:
    """An AlgorithmIdentifier: its OID (C{oid} if given), then what follows it."""
    algorithm = _Reader(reader.take(_SEQUENCE))
    found = algorithm.take(_OID)
    if not found or (oid is not None and found != oid):
        raise _Malformed("another algorithm")
    return algorithm


def _iterations(der: bytes) -> int:
    outer = _Reader(der)
    info = _Reader(outer.take(_SEQUENCE))
    outer.end()
    pbes2 = _algorithm(info, PBES2)
    if not info.take(_OCTET_STRING):
        raise _Malformed("nothing encrypted")
    info.end()
    params = _Reader(pbes2.take(_SEQUENCE))
    pbes2.end()
    kdf = _algorithm(params, PBKDF2)
    scheme = _algorithm(params)
    scheme.take_any()  # its parameters (the IV); cryptography checks them when it opens the key
    scheme.end()
    params.end()
    pbkdf2 = _Reader(kdf.take(_SEQUENCE))
    kdf.end()
    pbkdf2.take(_OCTET_STRING)  # the salt: "specified", the only choice in use
    iterations = _positive(pbkdf2.take(_INTEGER))
    if pbkdf2.more() and pbkdf2.peek() == _INTEGER:
        _positive(pbkdf2.take(_INTEGER))  # keyLength
    if pbkdf2.more():
        prf = _algorithm(pbkdf2)
        if prf.more():
            prf.take_any()
        prf.end()
    pbkdf2.end()
    return iterations


def _pem_der(pem: bytes) -> bytes:
    """The DER of the first "ENCRYPTED PRIVATE KEY" block in C{pem}."""
    start = pem.find(_BEGIN)
    end = pem.find(_END, start)
    if start < 0 or end < 0:
        raise _Malformed("no ENCRYPTED PRIVATE KEY block")
    body = b"".join(pem[start + len(_BEGIN) : end].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _Malformed("not base64") from None


def pbkdf2_iterations(pem: bytes) -> int | None:
    """
    The PBKDF2 iteration count protecting the encrypted PKCS#8 key in
    C{pem}, or None when C{pem} is not PBES2 with PBKDF2 as above
    (another scheme such as scrypt or PBES1, no encryption, anything
    malformed).  It checks the form, not the passphrase.
    """
    try:
        return _iterations(_pem_der(pem))
    except _Malformed:
        return None
