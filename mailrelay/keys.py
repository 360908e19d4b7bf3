"""
Identities, fingerprints, PEM files and the client's pinned contact keys.

A home directory (C{~/.mailrelay} by default) holds one identity::

    identity            the identity's id, one line
    private_key.pem     PKCS#8 PEM, mode 0600
    public_key.pem      SubjectPublicKeyInfo PEM
    contacts.sqlite     the contacts' keys this client trusts, and their history
                        (L{mailrelay.client.contacts})

Both PEM files are the formats C{openssl pkey} reads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.logger import Logger

from mailrelay import pkcs8
from mailrelay.encoding import valid_identity
from mailrelay.files import sync_directory, write_durably

CERTIFICATE_FILE = "certificate.pem"
"""In a home: the CA's certificate for this identity's key, presented to the relay."""
IDENTITY_ROOTS_FILE = "identity-ca.pem"
"""In a home: the CA roots every contact's key must be certified by."""

KEY_BITS = 3072
MIN_KEY_BITS = 2048
MAX_KEY_BITS = 4096
PUBLIC_EXPONENT = 65537


class IdentityError(Exception):
    """Base of the errors about keys and homes; the message says what to do."""


class BadKey(IdentityError):
    """A key that is malformed, too small or not RSA."""


class NoIdentity(IdentityError):
    """The home directory holds no identity yet."""


class IdentityExists(IdentityError):
    """C{init} would overwrite an identity."""


class PassphraseNeeded(IdentityError):
    """The private key is protected by a passphrase, and none was given."""


class BadPassphrase(IdentityError):
    """The passphrase given does not open the private key."""


class RelayMismatch(IdentityError):
    """The relay at an address calls itself by another id than the one pinned."""

    def __init__(self, server: str, pinned: str, offered: str, path: Path) -> None:
        self.server = server
        self.pinned = pinned
        self.offered = offered
        super().__init__(
            f"the relay at {server} calls itself {offered!r}, but this home knows it as "
            f"{pinned!r}. It may be passing on another relay's challenge to take your "
            f"messages. If the relay was reinstalled and you trust it, remove {path}."
        )


class KeyConflict(IdentityError):
    """A key for a known identity differs from the pinned one."""

    def __init__(self, identity: str, pinned: str, offered: str) -> None:
        self.identity = identity
        self.pinned = pinned
        self.offered = offered
        super().__init__(
            f"the key offered for {identity!r} differs from the one pinned:\n"
            f"  pinned:  {pinned}\n"
            f"  offered: {offered}\n"
            f"Someone may be impersonating {identity!r}. Check the fingerprint "
            f"with them through another channel before trusting the new key "
            f"(`mailrelay trust {identity} --fingerprint '{offered}'`)."
        )


def check_identity(identity: str) -> str:
    """
    The identity as mailrelay spells it (lowercase: C{Alice} is C{alice}),
    or L{IdentityError} when it cannot be one.
    """
    identity = identity.lower()
    if not valid_identity(identity):
        raise IdentityError(
            f"{identity!r} is not a valid identity: use 1 to 64 letters, digits "
            f"or ._@+- starting with a letter or digit"
        )
    return identity


def fingerprint(public_key_der: bytes) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(public_key_der).digest()


def format_fingerprint(digest: bytes) -> str:
    """A fingerprint in groups of four hex digits, for people to compare."""
    text = digest.hex().upper()
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def parse_fingerprint(text: str) -> bytes:
    """A fingerprint as people type it (hex, any case, spaces or colons) as bytes."""
    cleaned = "".join(c for c in text if c not in " :-\t")
    try:
        digest = bytes.fromhex(cleaned)
    except ValueError:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise IdentityError(
            f"{text!r} is not a fingerprint: 64 hex digits, as `mailrelay fingerprint` shows"
        )
    return digest


SAFETY_NUMBER_CONTEXT = b"mailrelay safety number v1"


def safety_number(a: str, a_key: rsa.RSAPublicKey, b: str, b_key: rsa.RSAPublicKey) -> str:
    """
    One number for the pair (C{a}, C{b}) and their keys, the same whichever
    side computes it: 60 digits in 12 groups of 5, for two people to read
    to each other.  It changes when either key changes.
    """
    sides = sorted(
        [(a.encode("ascii"), fingerprint(public_der(a_key))),
         (b.encode("ascii"), fingerprint(public_der(b_key)))]
    )
    h = hashlib.sha512(SAFETY_NUMBER_CONTEXT)
    for name, digest in sides:
        h.update(len(name).to_bytes(1, "big") + name + digest)
    raw = h.digest()
    groups = [int.from_bytes(raw[i : i + 5], "big") % 100_000 for i in range(0, 60, 5)]
    return " ".join(f"{g:05d}" for g in groups)


def key_fingerprint(key: rsa.RSAPublicKey) -> str:
    """The formatted fingerprint of C{key} (of its canonical DER)."""
    return format_fingerprint(fingerprint(public_der(key)))


def is_protected_pem(pem: bytes) -> bool:
    """Whether a PEM private key is encrypted (PKCS#8 with a passphrase)."""
    return b"ENCRYPTED PRIVATE KEY" in pem


PASSPHRASE_PBKDF2_ITERATIONS = 1_000_000
"""
The PBKDF2-HMAC-SHA256 iterations that protect a private key with a
passphrase: each guess at the passphrase costs this many, about 115 ms of
one core on the machine it was measured on (8.8 million iterations a
second, cryptography 50 on OpenSSL 3.0), against 0.23 ms (some 4,300
guesses a second) at the 2,048 of cryptography's best available
encryption.  A memory-hard KDF is not used: openssl opens scrypt in PKCS#8
only up to 32 MB, so this format would give scrypt little memory to be
hard with.  A key protected with fewer iterations gets this many the next
time it is opened (L{Home.load}).
"""

_log = Logger()


def private_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None,
                iterations: int | None = None) -> bytes:
    """
    PKCS#8 PEM, encrypted with C{passphrase} when one is given: PBES2 with
    PBKDF2-HMAC-SHA256 at C{iterations} (by default
    L{PASSPHRASE_PBKDF2_ITERATIONS}) and AES-256-CBC, which
    C{openssl pkey -passin} opens.
    """
    if not passphrase:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    if iterations is None:
        iterations = PASSPHRASE_PBKDF2_ITERATIONS
    plain = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return pkcs8.encrypt_pem(plain, passphrase, iterations)


def _reprotect(path: Path, pem: bytes, key: rsa.RSAPrivateKey,
               passphrase: bytes | None) -> None:
    """
    Protect again the key just opened with C{passphrase} from C{pem} (read
    from C{path}), under the same passphrase with
    L{PASSPHRASE_PBKDF2_ITERATIONS}, if fewer PBKDF2 iterations protect it.
    Left as it is: a key without a passphrase, a file whose parameters
    cannot be read (another scheme, such as scrypt), and one that changed
    since it was read (a rotation finishing in another process).  This
    never fails the unlock: the key is open either way.
    """
    before = pkcs8.pbkdf2_iterations(pem)
    if before is None or before >= PASSPHRASE_PBKDF2_ITERATIONS or not passphrase:
        return  # (an empty passphrase would write the key in the clear)
    try:
        stronger = private_pem(key, passphrase)
        if path.read_bytes() != pem:
            return
        write_durably(path, stronger, 0o600)
    except OSError as e:
        _log.warn("Kept {path} with {before} PBKDF2 iterations: cannot rewrite it ({error})",
                  path=str(path), before=before, error=e)
        return
    _log.info("Protected {path} with {iterations} PBKDF2 iterations instead of {before}",
              path=str(path), iterations=PASSPHRASE_PBKDF2_ITERATIONS, before=before)


def _unlock(path: Path, passphrase: bytes | None) -> rsa.RSAPrivateKey:
    """
    L{load_private_pem} of the file at C{path}, protected again with more
    iterations if it needs it (L{_reprotect}).
    """
    pem = path.read_bytes()
    key = load_private_pem(pem, passphrase, path)
    _reprotect(path, pem, key, passphrase)
    return key


def load_private_pem(pem: bytes, passphrase: bytes | None, where: Path) -> rsa.RSAPrivateKey:
    """
    The RSA private key in C{pem} (from C{where}), opened with C{passphrase}
    if it is protected: L{PassphraseNeeded} without one, L{BadPassphrase}
    if it does not open it, L{BadKey} for anything else.
    """
    protected = is_protected_pem(pem)
    if protected and passphrase is None:
        raise PassphraseNeeded(
            f"{where} is protected by a passphrase: give it with --passphrase-file FILE "
            f"(or $MAILRELAY_PASSPHRASE_FILE), or at the prompt"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if protected else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        if protected:
            raise BadPassphrase(f"the passphrase does not open {where}") from None
        raise BadKey(f"cannot read {where}: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadKey(f"{where} is not an RSA private key")
    return key


def read_passphrase_file(path: str) -> bytes:
    """A passphrase kept in a file: its first line.  Raises C{OSError}."""
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\r\n")


def load_public_der(der: bytes) -> rsa.RSAPublicKey:
    """Parse a DER SubjectPublicKeyInfo; refuse anything but RSA >= 2048 bits."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadKey(f"not a usable DER public key: {e}") from None
    return _check_rsa(key)


def load_public_pem(pem: bytes, where) -> rsa.RSAPublicKey:
    """Parse a PEM SubjectPublicKeyInfo read from C{where}; refuse anything but usable RSA."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadKey(f"cannot read the key in {where}: {e}") from None
    return _check_rsa(key)


def canonical_der(der: bytes) -> bytes:
    """
    The one DER encoding of the RSA key in C{der}.  Keys are compared and
    fingerprinted in this form, so the same key sent in another valid
    encoding is still the same key.
    """
    return public_der(load_public_der(der))


def _check_rsa(key: object) -> rsa.RSAPublicKey:
    """
    Only RSA keys of 2048 to 4096 bits with e = 65537.  The upper bounds keep
    a signature check cheap: a relay verifies one for every connection,
    before it knows who is connecting.
    """
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("only RSA keys are supported")
    if key.key_size < MIN_KEY_BITS:
        raise BadKey(f"RSA key of {key.key_size} bits is under the minimum of {MIN_KEY_BITS}")
    if key.key_size > MAX_KEY_BITS:
        raise BadKey(f"RSA key of {key.key_size} bits is over the maximum of {MAX_KEY_BITS}")
    numbers = key.public_numbers()
    if numbers.e != PUBLIC_EXPONENT:
        raise BadKey(f"RSA public exponent must be {PUBLIC_EXPONENT}")
    if numbers.n % 2 == 0:
        # Parses, but no private key exists for it: sealing to it fails.
        raise BadKey("RSA modulus is even: not a usable key")
    return key


def public_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def verify(public_key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    """Check an RSA-PSS-SHA256 signature."""
    try:
        public_key.verify(signature, data, PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An id and its RSA private key."""

    name: str
    private_key: rsa.RSAPrivateKey
    previous: tuple = ()
    """Identities of this id's keys before rotations, to open what was sealed for them."""

    def for_fingerprint(self, digest: bytes) -> Identity | None:
        """This identity, or the earlier one, whose key has fingerprint C{digest}."""
        for candidate in (self, *self.previous):
            if candidate.fingerprint == digest:
                return candidate
        return None

    @classmethod
    def generate(cls, name: str, bits: int = KEY_BITS) -> Identity:
        name = check_identity(name)
        if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
            raise BadKey(f"refusing to generate a {bits}-bit key; "
                         f"use {MIN_KEY_BITS} to {MAX_KEY_BITS} bits")
        key = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits)
        return cls(name, key)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    @property
    def public_der(self) -> bytes:
        return public_der(self.public_key)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.public_der)

    def sign(self, data: bytes) -> bytes:
        """RSA-PSS-SHA256 with a digest-length salt."""
        return self.private_key.sign(data, PSS, hashes.SHA256())


class Home:
    """The files of one person's client: their identity and pinned contacts."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._contacts = None

    @property
    def _id_file(self) -> Path:
        return self.path / "identity"

    @property
    def private_key_file(self) -> Path:
        return self.path / "private_key.pem"

    @property
    def public_key_file(self) -> Path:
        return self.path / "public_key.pem"

    @property
    def contacts_dir(self) -> Path:
        return self.path / "contacts"

    def has_identity(self) -> bool:
        return self._id_file.exists()

    def create(self, name: str, bits: int = KEY_BITS, passphrase: bytes | None = None) -> Identity:
        """
        Generate and store a new identity; refuse to overwrite one.  With a
        C{passphrase}, the private key is encrypted PKCS#8 (PBES2, as
        C{openssl pkey -passin} reads it).
        """
        name = check_identity(name)
        if passphrase is not None and not passphrase:
            raise IdentityError("an empty passphrase protects nothing; give none, or a real one")
        if self.has_identity():
            raise IdentityExists(
                f"{self.path} already holds the identity {self._id_file.read_text().strip()!r}; "
                f"use another --home to create a second identity"
            )
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = Identity.generate(name, bits)
        write_durably(self.private_key_file, private_pem(identity.private_key, passphrase), 0o600)
        write_durably(self.public_key_file, public_pem(identity.public_key), 0o644)
        # Written last: an identity exists only once both keys do.
        write_durably(self._id_file, name.encode("ascii") + b"\n", 0o644)
        return identity

    def load_name(self) -> str:
        """The identity's id, without opening its private key."""
        if not self.has_identity():
            raise NoIdentity(
                f"no identity in {self.path}; create one with `mailrelay init ID`"
            )
        return check_identity(self._id_file.read_text().strip())

    @property
    def previous_dir(self) -> Path:
        return self.path / "previous"

    @property
    def next_key_file(self) -> Path:
        return self.path / "private_key.next.pem"

    def stage_rotation(self, new: Identity, passphrase: bytes | None) -> None:
        """Keep the next key on disk before the relay is told: a crash loses nothing."""
        write_durably(self.next_key_file, private_pem(new.private_key, passphrase), 0o600)

    def _load_next(self, passphrase: bytes | None) -> rsa.RSAPrivateKey:
        return _unlock(self.next_key_file, passphrase)

    def finish_rotation(self, old: Identity, new: Identity) -> Path:
        """
        Make the staged key this identity's key; a copy of the old one goes
        to C{previous/} first (still needed to open what was sealed for it).
        Each step leaves a home that works: the old key stays in place until
        the copy is on disk, and the staged key is renamed over it last.
        """
        self.previous_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tag = old.fingerprint.hex()[:16]
        kept = self.previous_dir / f"private_key-{tag}.pem"
        if not kept.exists():
            write_durably(kept, self.private_key_file.read_bytes(), 0o600)
        stale = self.path / CERTIFICATE_FILE  # it certified the old key
        if stale.exists():
            os.replace(stale, self.previous_dir / f"certificate-{tag}.pem")
        write_durably(self.public_key_file, public_pem(new.public_key), 0o644)
        os.replace(self.next_key_file, self.private_key_file)
        sync_directory(self.path)
        return kept

    def _previous(self, name: str, passphrase: bytes | None) -> tuple:
        found = []
        if self.previous_dir.is_dir():
            for path in sorted(self.previous_dir.glob("private_key-*.pem")):
                try:
                    key = _unlock(path, passphrase)
                except IdentityError:
                    continue  # an old key this passphrase does not open: not needed now
                found.append(Identity(name, key))
        return tuple(found)

    def certificate(self) -> bytes:
        """This identity's certificate (DER) to present to the relay, or empty bytes."""
        from mailrelay import ca

        path = self.path / CERTIFICATE_FILE
        try:
            return ca.certificate_der(path.read_bytes())
        except FileNotFoundError:
            return b""
        except (OSError, ca.CAError) as e:
            raise IdentityError(f"cannot read {path}: {e}") from None

    def identity_roots(self):
        """The CA roots contacts must be certified by, or None (trust on first use)."""
        from mailrelay import ca

        path = self.path / IDENTITY_ROOTS_FILE
        try:
            return ca.load_roots(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ca.CAError) as e:
            raise IdentityError(f"cannot read {path}: {e}") from None

    def protected(self) -> bool:
        """Whether the private key is encrypted with a passphrase."""
        try:
            return is_protected_pem(self.private_key_file.read_bytes()[:100])
        except OSError:
            return False

    def load(self, passphrase: bytes | None = None) -> Identity:
        """
        The identity, its private key opened with C{passphrase} if it is
        protected (L{PassphraseNeeded} without one, L{BadPassphrase} if it
        does not open it).
        """
        if not self.has_identity():
            raise NoIdentity(
                f"no identity in {self.path}; create one with `mailrelay init ID`"
            )
        name = check_identity(self._id_file.read_text().strip())
        try:
            pem = self.private_key_file.read_bytes()
        except FileNotFoundError:
            raise NoIdentity(f"{self.private_key_file} is missing") from None
        key = load_private_pem(pem, passphrase, self.private_key_file)
        _check_rsa(key.public_key())
        protected = is_protected_pem(pem)
        _reprotect(self.private_key_file, pem, key, passphrase)
        return Identity(name, key, self._previous(name, passphrase if protected else None))

    def _relay_file(self, server: str) -> Path:
        digest = hashlib.sha256(server.encode("utf-8")).hexdigest()[:32]
        return self.path / "relays" / digest

    def pin_relay(self, server: str, relay: str) -> None:
        """
        Remember the id the relay at C{server} gave on first contact, and
        refuse (L{RelayMismatch}) a later different one: another relay
        forwarding this one's challenge shows the other relay's id.
        """
        path = self._relay_file(server)
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_durably(path, f"{server}\n{relay}\n".encode("utf-8"), 0o644)
            return
        pinned = lines[1] if len(lines) > 1 else ""
        if pinned != relay:
            raise RelayMismatch(server, pinned, relay, path)

    @property
    def contacts(self):
        """
        The contacts' keys this home trusts (L{mailrelay.client.contacts.Contacts},
        in C{contacts.sqlite}), opened on first use; keys pinned by earlier
        versions in C{contacts/} are taken over then.
        """
        if self._contacts is None:
            from mailrelay.client.contacts import CONTACTS_FILE, Contacts

            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._contacts = Contacts(self.path / CONTACTS_FILE, legacy_dir=self.contacts_dir)
        return self._contacts

    def pinned(self, name: str) -> rsa.RSAPublicKey | None:
        """The key trusted now for C{name}, or None when there is none."""
        if not self.path.exists():
            return None
        return self.contacts.pinned(name)

    def pin(self, name: str, der: bytes) -> rsa.RSAPublicKey:
        """Trust C{der} for C{name} on first use (L{Contacts.pin})."""
        return self.contacts.pin(name, der)


