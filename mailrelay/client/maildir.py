"""
Filing received messages into a Maildir: one RFC 5322 file per message.

Each file is written under C{tmp/}, flushed to disk, then renamed into
C{new/} (and the directory flushed), so a crash leaves either no file or a
whole one; the client acknowledges the message to the relay only after that.
A message's file name is made from its sender and id, so filing the same
message again (after a crash between filing and recording it) finds the
file, in C{new/} or already read in C{cur/}, and adds none.
"""

from __future__ import annotations

import email.policy
import hashlib
import email.utils
import itertools
import os
import socket
import time
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

from mailrelay.envelope import Opened
from mailrelay.files import write_durably

DOMAIN = "mailrelay.invalid"
_counter = itertools.count()


def as_email(opened: Opened, domain: str = DOMAIN) -> bytes:
    """The message as RFC 5322 bytes, with From, To, Date and Message-ID."""
    h = opened.header
    msg = EmailMessage(policy=email.policy.default)
    # An id may hold "@": Address quotes the local part when it must.
    msg["From"] = Address(username=h.sender, domain=domain)
    msg["To"] = Address(username=h.recipient, domain=domain)
    try:
        date = email.utils.formatdate(h.timestamp, usegmt=True)
    except (OverflowError, ValueError, OSError):
        # The sender chose a time no date can show (year 10000, 2**63...):
        # date the message by its receipt and keep the sender's number.
        date = None
    if date is None:
        msg["Date"] = email.utils.formatdate(usegmt=True)
        msg["X-Mailrelay-Sent-At"] = str(h.timestamp)
    else:
        msg["Date"] = date
    sender_tag = h.sender.replace("@", "%")
    msg["Message-ID"] = f"<{h.message_id.hex()}.{sender_tag}@{domain}>"
    msg["X-Mailrelay-Sender-Fingerprint"] = h.sender_fingerprint.hex()
    try:
        msg.set_content(opened.plaintext.decode("utf-8"))
    except UnicodeDecodeError:
        msg.set_content(opened.plaintext, maintype="application", subtype="octet-stream")
    return msg.as_bytes()


class Maildir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def _key(opened: Opened) -> str:
        """The part of the file name that is the message's: the same every time."""
        # Ids are unique per sender only: the sender is in the key too (as a
        # digest, as identities may hold dots), so no one can make another's
        # message look filed by reusing its id.
        sender = hashlib.sha256(opened.sender.encode("utf-8")).hexdigest()[:16]
        return f"M{opened.message_id.hex()}S{sender}"

    def _find(self, key: str) -> Path | None:
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                # In cur/ a mail reader appends ":2,FLAGS" to the name.
                if entry.name.split(":", 1)[0].split(".")[1:2] == [key]:
                    return Path(entry.path)
        return None

    def add(self, opened: Opened) -> Path:
        """Write C{opened} durably into C{new/} unless it is there already; return its path."""
        key = self._key(opened)
        found = self._find(key)
        if found is not None:
            return found
        now = time.time()
        host = socket.gethostname().replace("/", "_").replace(":", "_").replace(".", "_")
        name = f"{int(now)}.{key}.{host}"
        tmp = self.path / "tmp" / f"{name}.P{os.getpid()}Q{next(_counter)}"
        final = self.path / "new" / name
        write_durably(final, as_email(opened), 0o600, tmp=tmp)
        return final
