"""
What this client trusts of its contacts' keys: C{HOME/contacts.sqlite}.

Trust only grows from what this client itself trusted.  The relay's
directory answers LOOKUP with a key and the latest rotations of that key
(L{wire.Key}), but the relay may lie, so nothing it says is taken on its
word:

  - The first key seen for a contact is trusted (trust on first use), or the
    key whose fingerprint the user gave (L{Contacts.trust}).
  - A new key is followed automatically only along rotations that start at
    the key trusted now, each step signed by both its old and its new key
    (L{Contacts.accept_key}).  A verified contact (L{Contacts.verify}) stops
    being verified when that happens, loudly.
  - A message signed by a key other than the contact's current one is
    accepted only when that key is one this client trusted before and
    retired by following a rotation (not one the user replaced by hand), or
    one the trusted key vouches for through a chain verified backwards from
    it (each step signed by both keys); only if the message is dated no later
    than that key's rotation, and only within a bounded time (the relay's
    message lifetime, at most L{RETIRED_KEY_WINDOW}) after this client
    learned of the rotation (L{Contacts.signing_key}).
  - The longest chain of rotations accepted per contact is kept: an answer
    that is not an extension of it (an older key, a shorter or forked chain)
    is refused (L{RolledBack}).

The whole history of keys trusted per contact is kept, never a single key:
C{keys} has one row per key (one of them current), C{chain} the rotations
accepted, C{verified} which key the user verified.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from mailrelay import keys, wire
from mailrelay.client.localdb import open_home_db

RETIRED_KEY_WINDOW = 30 * 86400
"""
The longest a contact's retired key may still sign messages this client
accepts, counted from when this client learned of the rotation: the
relay's default message lifetime.  A relay that keeps messages for less
says so in WELCOME, and the shorter time applies.
"""

CONTACTS_FILE = "contacts.sqlite"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    contact      TEXT NOT NULL,
    key          BLOB NOT NULL,
    fingerprint  BLOB NOT NULL,
    how          TEXT NOT NULL,
    trusted_at   INTEGER NOT NULL,
    retired_at   INTEGER,
    rotated_at   INTEGER,
    certificate  BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (contact, key)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_current_key ON keys (contact) WHERE retired_at IS NULL;
CREATE TABLE IF NOT EXISTS chain (
    contact          TEXT NOT NULL,
    position         INTEGER NOT NULL,
    old_key          BLOB NOT NULL,
    new_key          BLOB NOT NULL,
    rotated_at       INTEGER NOT NULL,
    old_signature    BLOB NOT NULL,
    new_signature    BLOB NOT NULL,
    old_certificate  BLOB NOT NULL,
    learned_at       INTEGER NOT NULL,
    PRIMARY KEY (contact, position)
);
CREATE TABLE IF NOT EXISTS verified (
    contact      TEXT PRIMARY KEY,
    key          BLOB NOT NULL,
    verified_at  INTEGER NOT NULL
);
"""

FIRST_USE = "first use"
FINGERPRINT = "fingerprint"
ROTATION = "rotation"
IMPORTED = "imported"


class ContactsError(Exception):
    """The contacts file cannot be opened or written; the message says what to do."""


class UntrustedKey(keys.IdentityError):
    """A key, or a chain of rotations, that nothing this client trusts vouches for."""


class RolledBack(UntrustedKey):
    """The relay's answer is older than what this client already accepted, or a fork of it."""


class UntrustedSigner(UntrustedKey):
    """A message is signed by a key of the contact that may not sign it (now)."""


@dataclass(frozen=True)
class Outcome:
    """What L{Contacts.accept_key} made of the relay's answer."""

    key: rsa.RSAPublicKey
    pinned: bool = False
    """The contact was new: its key is trusted from now on (first use)."""
    rotated: int = 0
    """Rotations followed to reach the new key (0: the key did not change)."""
    was_verified: bool = False
    """The contact was verified before this rotation, and no longer is."""

    def notice(self, name: str) -> str:
        """What a person is told when C{name}'s key was followed along its rotations."""
        text = (f"{name} rotated their key (signed over from the key you trusted); now "
                f"using {keys.key_fingerprint(self.key)}")
        if self.was_verified:
            text += (f". WARNING: you had verified {name}, and {name} is NOT VERIFIED any "
                     f"more: compare the new safety number (`mailrelay fingerprint {name}`), "
                     f"then `mailrelay verify {name}`")
        return text


@dataclass(frozen=True)
class KnownKey:
    """One key of a contact, as L{Contacts.history} lists it."""

    der: bytes
    fingerprint: bytes
    how: str
    trusted_at: int
    retired_at: int | None
    rotated_at: int | None


def _fp(der: bytes) -> str:
    return keys.format_fingerprint(keys.fingerprint(der))


def _day(when: int) -> str:
    try:
        return time.strftime("%Y-%m-%d", time.gmtime(when))
    except (OverflowError, ValueError, OSError):
        return str(when)


def signed_by_both(name: str, step: wire.Rotation) -> bool:
    """
    Whether C{step} is a rotation of C{name}'s key signed by its old key
    (which hands over) and by its new key (which vouches for the old one),
    and dated before 2^63: what the contacts file can store, and what the
    relay accepts in a ROTATE.
    """
    try:
        old = keys.load_public_der(step.old_key)
        new = keys.load_public_der(step.new_key)
    except keys.BadKey:
        return False
    if not 0 <= step.timestamp < 2**63:
        return False
    statement = wire.rotation_statement(name, step.old_key, step.new_key, step.timestamp)
    return (keys.verify(old, step.old_signature, statement)
            and keys.verify(new, step.new_signature, statement))


def vouched_backwards(name: str, chain, key_der: bytes) -> tuple:
    """
    The end of C{chain} (a contiguous chain that leads to C{key_der}) that
    C{key_der} vouches for: walking back from it, each step signed by both
    its keys, up to the first step that is not.
    """
    start, current = len(chain), key_der
    while start and chain[start - 1].new_key == current and signed_by_both(name, chain[start - 1]):
        start -= 1
        current = chain[start].old_key
    return tuple(chain[start:])


class Contacts:
    """
    The contacts' keys of one client, in a SQLite file (C{":memory:"} for a
    client that keeps no files).  Every change is one transaction,
    committed with C{synchronous=FULL} before the caller goes on.

    C{legacy_dir} is the C{contacts/} folder of earlier versions (one
    C{ID.pem} per contact, the key it replaced in C{ID.pem.replaced}): its
    keys are taken over once, the folder renamed C{contacts.imported}.
    """

    def __init__(self, path: str | os.PathLike[str] = ":memory:",
                 legacy_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path)
        try:
            if self.path == ":memory:":
                db = sqlite3.connect(self.path, isolation_level=None)
                db.executescript(SCHEMA)
            else:
                db = open_home_db(self.path, SCHEMA, "SELECT contact, key FROM keys LIMIT 1")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                db.close()
                raise ContactsError(
                    f"{self.path} was written by a newer mailrelay (schema {version}); "
                    f"upgrade mailrelay to use this home")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as e:
            raise ContactsError(
                f"cannot read {self.path}: {e}; it holds the contacts' keys you trust, so "
                f"restore it from a backup, or move it aside to trust contacts afresh "
                f"(each key is then trusted on first use again)") from None
        self._db = db
        if legacy_dir is not None and Path(legacy_dir).is_dir():
            self._import(Path(legacy_dir))

    def close(self) -> None:
        self._db.close()

    # Reading

    def _current(self, name: str) -> bytes | None:
        row = self._db.execute(
            "SELECT key FROM keys WHERE contact = ? AND retired_at IS NULL", (name,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def current_der(self, name: str) -> bytes | None:
        """The DER of the key trusted now for C{name}, or None (one indexed read)."""
        return self._current(keys.check_identity(name))

    def pinned(self, name: str) -> rsa.RSAPublicKey | None:
        """The key trusted now for C{name}, or None when there is none yet."""
        current = self._current(keys.check_identity(name))
        return None if current is None else keys.load_public_der(current)

    def history(self, name: str) -> list[KnownKey]:
        """Every key this client trusted for C{name}, the oldest first."""
        rows = self._db.execute(
            "SELECT key, fingerprint, how, trusted_at, retired_at, rotated_at FROM keys"
            " WHERE contact = ? ORDER BY rowid",
            (keys.check_identity(name),),
        ).fetchall()
        return [KnownKey(bytes(k), bytes(f), h, t, r, ro) for k, f, h, t, r, ro in rows]

    def chain(self, name: str) -> tuple:
        """The rotations accepted for C{name}, oldest first."""
        rows = self._db.execute(
            "SELECT old_key, new_key, rotated_at, old_signature, new_signature, old_certificate"
            " FROM chain WHERE contact = ? ORDER BY position", (keys.check_identity(name),)
        ).fetchall()
        return tuple(wire.Rotation(bytes(o), bytes(n), t, bytes(so), bytes(sn), bytes(c))
                     for o, n, t, so, sn, c in rows)

    def is_verified(self, name: str) -> bool:
        """Whether the user verified the key trusted now for C{name}."""
        name = keys.check_identity(name)
        current = self._current(name)
        row = self._db.execute("SELECT key FROM verified WHERE contact = ?", (name,)).fetchone()
        return current is not None and row is not None and bytes(row[0]) == current

    # The relay's answer

    def accept_key(self, name: str, der: bytes, rotations=(), certificate: bytes = b"",
                   now: int | None = None) -> Outcome:
        """
        Take the relay's answer for C{name} (its key C{der} and the latest
        C{rotations} of it) as far as what this client trusts allows; fire
        the L{Outcome}.  In a home that checks keys against a CA, the caller
        has checked C{certificate} for C{der} first.

        Raises L{keys.KeyConflict} (showing both fingerprints) for a key no
        signed chain leads to from the trusted one, and L{RolledBack} for an
        answer older than what was accepted before: a retired key offered
        again, or a chain that is not an extension of the accepted one.
        Nothing is changed then.
        """
        name = keys.check_identity(name)
        der = keys.canonical_der(der)
        now = int(time.time()) if now is None else int(now)
        chain = tuple(rotations)
        for earlier, later in zip(chain, chain[1:]):
            if earlier.new_key != later.old_key:
                raise UntrustedKey(f"the relay's rotations of {name!r}'s key do not form a "
                                   f"chain; not using them")
        if chain and chain[-1].new_key != der:
            raise UntrustedKey(f"the relay's rotations of {name!r}'s key do not lead to the "
                               f"key it gives; not using it")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = self._current(name)
            if current is None:
                self._add_key(name, der, FIRST_USE, now, certificate)
                self._extend_chain(name, vouched_backwards(name, chain, der), now)
                return Outcome(keys.load_public_der(der), pinned=True)
            trusted = current
            accepted = self.chain(name)
            if accepted:
                new = _beyond(accepted, chain, trusted)
                if new is None:
                    if len(chain) == wire.MAX_ROTATIONS and not _touches(chain, trusted):
                        # More rotations since than one answer carries: compare.
                        raise keys.KeyConflict(name, _fp(trusted), _fp(der))
                    raise self._not_extension(name, der)
            elif der == trusted:
                self._extend_chain(name, vouched_backwards(name, chain, der), now)
                return Outcome(keys.load_public_der(der))
            else:
                new = _from(name, chain, trusted)
            if not new:
                if der != trusted:
                    self._refuse_change(name, trusted, der)
                return Outcome(keys.load_public_der(der))
            if new[0].old_key != trusted or not all(signed_by_both(name, s) for s in new):
                self._refuse_change(name, trusted, der)
            # Followed: every key on the way is retired at its rotation (a
            # key the chain comes back to is current again).
            self._retire(name, trusted, now, new[0].timestamp)
            for step in new[1:]:
                self._add_key(name, step.old_key, ROTATION, now, step.old_certificate)
                self._retire(name, step.old_key, now, step.timestamp)
            self._add_key(name, der, ROTATION, now, certificate)
            self._extend_chain(name, new if accepted else vouched_backwards(name, chain, der),
                               now)
            was_verified = der != trusted and self._unverify(name, trusted)
            return Outcome(keys.load_public_der(der), rotated=len(new) if der != trusted else 0,
                           was_verified=was_verified)

    def _refuse_change(self, name: str, trusted: bytes, offered: bytes):
        retired = self._db.execute(
            "SELECT retired_at FROM keys WHERE contact = ? AND key = ? AND retired_at IS NOT NULL",
            (name, offered),
        ).fetchone()
        if retired is not None:
            raise RolledBack(
                f"the relay offers a key of {name!r} ({_fp(offered)}) that was replaced on "
                f"{_day(retired[0])} by the one trusted now ({_fp(trusted)}): the relay is "
                f"rolling {name!r}'s key back; not using it")
        raise keys.KeyConflict(name, _fp(trusted), _fp(offered))

    def _not_extension(self, name: str, der: bytes) -> RolledBack:
        return RolledBack(
            f"the relay's key rotations for {name!r} are not an extension of those this "
            f"client accepted before (a shorter or forked chain): the relay is rolling back "
            f"or forking {name!r}'s key; not using its answer")

    # Changing what is trusted

    def pin(self, name: str, der: bytes) -> rsa.RSAPublicKey:
        """
        Trust C{der} for C{name} if no key is trusted yet, or if it is the
        key trusted now; any other key raises L{keys.KeyConflict} (or
        L{RolledBack}) and changes nothing.
        """
        return self.accept_key(name, der).key

    def trust(self, name: str, der: bytes, expected: bytes, rotations=(),
              certificate: bytes = b"", now: int | None = None) -> rsa.RSAPublicKey | None:
        """
        Trust C{der} for C{name} in place of the key trusted now, but only
        if its fingerprint is C{expected} (what the person said it is,
        checked through another channel); the contact is then verified.  The
        key it replaces stays in the history.  Fires with the key it
        replaced, or None.
        """
        name = keys.check_identity(name)
        der = keys.canonical_der(der)
        actual = keys.fingerprint(der)
        if actual != expected:
            raise keys.IdentityError(
                f"the key offered for {name!r} has the fingerprint "
                f"{keys.format_fingerprint(actual)}, not {keys.format_fingerprint(expected)}: "
                f"nothing was changed. Check the fingerprint with {name!r} again.")
        now = int(time.time()) if now is None else int(now)
        chain = tuple(rotations)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            # Read inside the transaction: a session in another process may
            # have followed a rotation since.
            current = self._current(name)
            if current != der:
                if current is not None:
                    self._retire(name, current, now, None)
                    self._db.execute("DELETE FROM chain WHERE contact = ?", (name,))
                    # Replaced by hand: no earlier key signs on its own any more,
                    # only if the new key's own rotations vouch for it (a key the
                    # relay slipped in, and "rotated" between keys of its own,
                    # must not outlive the user's correction).
                    self._db.execute(
                        "UPDATE keys SET rotated_at = NULL WHERE contact = ? AND key != ?",
                        (name, der))
                self._db.execute(
                    "UPDATE keys SET retired_at = NULL, rotated_at = NULL, how = ?,"
                    " trusted_at = ?, certificate = ? WHERE contact = ? AND key = ?",
                    (FINGERPRINT, now, certificate, name, der))
                self._add_key(name, der, FINGERPRINT, now, certificate)
                self._extend_chain(name, vouched_backwards(name, chain, der), now)
            self._set_verified(name, der, now)
        return None if current is None else keys.load_public_der(current)

    def verify(self, name: str, now: int | None = None,
               der: bytes | None = None) -> rsa.RSAPublicKey:
        """
        Mark the key trusted now for C{name} as verified (safety numbers
        compared); with C{der}, only if that is still the key trusted now
        (the one whose number the person compared), else L{UntrustedKey}.
        """
        name = keys.check_identity(name)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = self._current(name)
            if current is None:
                raise keys.IdentityError(f"no key of {name!r} is trusted yet: nothing to verify")
            if der is not None and keys.canonical_der(der) != current:
                raise UntrustedKey(
                    f"the key of {name!r} changed while you compared the safety number (now "
                    f"{_fp(current)}): {name} is not verified; compare the new number")
            self._set_verified(name, current, int(time.time()) if now is None else int(now))
        return keys.load_public_der(current)

    def _set_verified(self, name: str, der: bytes, now: int) -> None:
        self._db.execute(
            "INSERT INTO verified (contact, key, verified_at) VALUES (?, ?, ?)"
            " ON CONFLICT (contact) DO UPDATE SET key = excluded.key,"
            " verified_at = excluded.verified_at", (name, der, now))

    def _unverify(self, name: str, der: bytes) -> bool:
        return self._db.execute(
            "DELETE FROM verified WHERE contact = ? AND key = ?", (name, der)).rowcount > 0

    def _add_key(self, name: str, der: bytes, how: str, now: int, certificate: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO keys (contact, key, fingerprint, how, trusted_at,"
            " certificate) VALUES (?, ?, ?, ?, ?, ?)",
            (name, der, keys.fingerprint(der), how, now, certificate or b""))
        # A key trusted before, retired, and now current again (by a rotation
        # back to it): current from now on.
        self._db.execute(
            "UPDATE keys SET retired_at = NULL, rotated_at = NULL"
            " WHERE contact = ? AND key = ? AND retired_at IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM keys WHERE contact = ? AND retired_at IS NULL)",
            (name, der, name))

    def _retire(self, name: str, der: bytes, now: int, rotated_at: int | None) -> None:
        self._db.execute(
            "UPDATE keys SET retired_at = ?, rotated_at = ? WHERE contact = ? AND key = ?"
            " AND retired_at IS NULL", (now, rotated_at, name, der))

    def _extend_chain(self, name: str, steps, now: int) -> None:
        accepted = {_said(s) for s in self.chain(name)}
        new = [s for s in steps if _said(s) not in accepted]
        if not new:
            return
        (position,) = self._db.execute(
            "SELECT COALESCE(MAX(position), 0) FROM chain WHERE contact = ?", (name,)).fetchone()
        self._db.executemany(
            "INSERT INTO chain (contact, position, old_key, new_key, rotated_at, old_signature,"
            " new_signature, old_certificate, learned_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(name, position + i, s.old_key, s.new_key, s.timestamp, s.old_signature,
              s.new_signature, s.old_certificate, now) for i, s in enumerate(new, 1)])

    # Messages signed by an older key

    def signing_key(self, name: str, fingerprint: bytes, timestamp: int, now: int | None = None,
                    window: int = RETIRED_KEY_WINDOW, roots=None) -> rsa.RSAPublicKey:
        """
        The key of C{name} with C{fingerprint}, to check a message dated
        C{timestamp} that it signed, if this client may accept it; else
        L{UntrustedSigner} saying why.  C{roots}: the CA roots the key
        must be certified by (None: no CA).
        """
        name = keys.check_identity(name)
        now = int(time.time()) if now is None else int(now)
        row = self._db.execute(
            "SELECT key, retired_at, rotated_at, certificate FROM keys"
            " WHERE contact = ? AND fingerprint = ?", (name, fingerprint)).fetchone()
        # The steps away from that key, as accepted (vouched for by the key
        # after each, back from the trusted one), and when they were learned.
        steps = self._db.execute(
            "SELECT old_key, rotated_at, old_certificate, learned_at FROM chain"
            " WHERE contact = ? ORDER BY position DESC", (name,)).fetchall()
        steps = [(bytes(k), r, bytes(c), lt) for k, r, c, lt in steps
                 if keys.fingerprint(bytes(k)) == fingerprint]
        shown = keys.format_fingerprint(fingerprint)
        if row is not None and row[1] is None:
            return keys.load_public_der(bytes(row[0]))
        if row is not None and row[2] is not None:
            # Trusted here before, and retired by a rotation this client followed.
            der, learned, replaced = bytes(row[0]), row[1], row[2]
            certificates = [bytes(row[3])] + [c for _, _, c, _ in steps]
        elif steps:
            # Vouched for by the trusted key, through the chain accepted.
            der, replaced, _, learned = steps[0]
            certificates = [c for _, _, c, _ in steps]
        elif row is not None:
            # Replaced by hand (`trust`): the user said it was not, or no longer,
            # the contact's key; it may be one the relay slipped in at first use.
            raise UntrustedSigner(
                f"a message from {name!r} is signed by a key ({shown}) that was replaced by "
                f"hand on {_day(row[1])}, and no rotation by {name!r} vouches for it: not "
                f"shown")
        else:
            raise UntrustedSigner(
                f"a message from {name!r} is signed by a key ({shown}) that neither this client "
                f"nor {name!r}'s trusted key ever vouched for: it may be forged by the relay; "
                f"not shown")
        # Whichever came first, the signed rotation or this client learning of
        # it: nothing is dated after it, and the window counts from it (a
        # relay that shows an old rotation late cannot restart the window,
        # and a rotation dated in the future cannot stretch it).
        replaced = min(replaced, learned)
        if timestamp > replaced:
            raise UntrustedSigner(
                f"a message from {name!r} is signed by a retired key ({shown}) but dated after "
                f"that key was replaced ({_day(replaced)}); not shown")
        if now > replaced + window:
            raise UntrustedSigner(
                f"a message from {name!r} is signed by a retired key ({shown}), replaced more "
                f"than {window / 86400:g} days ago: a retired key no longer signs after that "
                f"(messages wait no longer on the relay); not shown")
        if roots:
            from mailrelay import ca

            for certificate in certificates:
                try:
                    ca.verify_identity(certificate, roots, name, der)
                    break
                except ca.CAError:
                    continue
            else:
                raise UntrustedSigner(
                    f"a message from {name!r} is signed by an older key ({shown}) that has no "
                    f"valid certificate from your CA; not shown")
        return keys.load_public_der(der)

    # Keys kept by earlier versions

    def _import(self, folder: Path) -> None:
        found = []
        for path in sorted(folder.glob("*.pem")):
            name = path.name[: -len(".pem")]
            replaced_path = path.with_name(path.name + ".replaced")
            try:
                name = keys.check_identity(name)
                current = keys.public_der(keys.load_public_pem(path.read_bytes(), path))
                replaced = (keys.public_der(keys.load_public_pem(replaced_path.read_bytes(),
                                                                  replaced_path))
                            if replaced_path.exists() else None)
            except (keys.IdentityError, OSError) as e:
                raise ContactsError(f"cannot take over the pinned keys in {folder}: {e}; "
                                    f"fix or remove that file") from None
            found.append((name, current, replaced, int(path.stat().st_mtime)))
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for name, current, replaced, when in found:
                if self._current(name) is not None:
                    continue
                if replaced is not None and replaced != current:
                    self._add_key(name, replaced, IMPORTED, when, b"")
                    self._retire(name, replaced, when, None)
                self._add_key(name, current, IMPORTED, when, b"")
        os.replace(folder, folder.with_name(folder.name + ".imported"))


def _from(name: str, chain, trusted: bytes) -> tuple:
    """
    The steps of C{chain} from the first one that leaves C{trusted} and
    after which every step is signed by both its keys (a chain that comes
    back to a key keeps the whole way); empty if there is none.
    """
    for i, step in enumerate(chain):
        if step.old_key == trusted and all(signed_by_both(name, s) for s in chain[i:]):
            return tuple(chain[i:])
    return ()


def _touches(chain, der: bytes) -> bool:
    return any(der in (s.old_key, s.new_key) for s in chain)


def _beyond(accepted, chain, trusted: bytes) -> tuple | None:
    """
    The steps of the relay's C{chain} past the chain C{accepted} before
    (which ends at C{trusted}); None when C{chain} is not an extension of
    it (see L{_extends}).
    """
    if not _extends(accepted, chain, trusted):
        return None
    said = [_said(s) for s in chain]
    last = _said(accepted[-1])
    if last in said:
        return tuple(chain[len(said) - said[::-1].index(last):])
    return tuple(chain)


def _said(step: wire.Rotation) -> tuple[bytes, bytes, int]:
    """
    What a step says (which key followed which, when): two answers with
    the same statement are the same step, whatever bytes their signatures
    are (each is checked before it is used).
    """
    return step.old_key, step.new_key, step.timestamp


def _extends(accepted, chain, trusted: bytes) -> bool:
    """
    Whether the relay's C{chain} (its latest steps) extends the chain
    C{accepted} before, which ends at the key C{trusted} now: the step
    that led to it is in C{chain}, with every step before it as accepted;
    or C{chain} is full and starts at C{trusted} (more rotations since than
    one answer carries).
    """
    accepted = [_said(s) for s in accepted]
    chain = [_said(s) for s in chain]
    last = accepted[-1]
    if last in chain:
        at = len(chain) - 1 - chain[::-1].index(last)
        overlap = min(len(accepted), at + 1)
        return chain[at + 1 - overlap: at + 1] == accepted[len(accepted) - overlap:]
    return len(chain) == wire.MAX_ROTATIONS and chain[0][0] == trusted


class MemoryContacts(Contacts):
    """The same rules, kept in memory: for sessions that keep no files."""

    def __init__(self) -> None:
        super().__init__(":memory:")
