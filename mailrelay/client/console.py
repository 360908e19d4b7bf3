"""
The interactive chat of C{mailrelay chat}, on standard input and output.

Like the seed's client it asks for the receiver, then the message, and
prints incoming messages as they arrive.  C{/quit} (or end of input) leaves.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.protocols.basic import LineReceiver

from mailrelay import keys
from mailrelay.client.display import for_terminal
from mailrelay.client.outbox import queue_message


class ChatConsole(LineReceiver):
    delimiter = b"\n"

    def __init__(self, name: str, outbox) -> None:
        self.name = name
        self.outbox = outbox
        self.client = None
        self.receiver: str | None = None
        self.done: Deferred[None] = Deferred()

    def _say(self, text: str) -> None:
        self.transport.write(text.encode("utf-8", "replace"))

    def _prompt(self) -> None:
        self._say("Enter receiver: " if self.receiver is None else f"Message for {self.receiver}: ")

    def connectionMade(self) -> None:
        self._say(f"Connected as {self.name}. Type /quit to leave.\n")
        self._prompt()

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.strip() == "/quit":
            self.transport.loseConnection()
            return
        if self.receiver is None:
            name = text.strip()
            if not name:
                self._prompt()
                return
            try:
                self.receiver = keys.check_identity(name)
            except keys.IdentityError as e:
                self._say(f"{e}\n")
            self._prompt()
            return
        receiver, self.receiver = self.receiver, None
        data = text.encode("utf-8")
        # Sealed, numbered and queued durably first, like `mailrelay send`: if
        # the relay does not take it now, the next session (or `mailrelay
        # flush`) sends it, and the recipient can tell if one goes missing.
        d = queue_message(self.outbox, self.client.identity, receiver, data,
                          client=self.client)
        d.addCallback(self._flush)
        d.addCallbacks(self._sent, self._notSent, callbackArgs=(receiver,),
                       errbackArgs=(receiver,))
        self._prompt()

    def _flush(self, entry):
        def done(result):
            if any(e.message_id == entry.message_id for e in result.accepted):
                return entry.message_id
            for e, why in result.refused:
                if e.message_id == entry.message_id:
                    raise _NotSent(why)
            why = next((w for e, w in result.held if e.message_id == entry.message_id),
                       "no answer")
            raise _NotSent(f"{why}; it stays in the outbox and goes with the next session")

        return maybeDeferred(self.outbox.flush, self.client).addCallback(done)

    def _sent(self, message_id: bytes, receiver: str) -> None:
        self._say(f"\nMessage sent to {receiver} ({message_id.hex()[:8]}).\n")
        self._prompt()

    def _notSent(self, failure, receiver: str) -> None:
        # Every reason is the user's to read (a refused message, an unknown
        # recipient, a changed key, the connection gone): say it, go on.
        self._say(f"\nNot sent to {receiver}: {for_terminal(failure.getErrorMessage())}\n")
        self._prompt()

    def notice(self, notice) -> None:
        """C{on_notice}: a message of ours that expired unread on the relay."""
        self._say(f"\nMessage {notice.message_id.hex()} from {notice.sender} "
                  f"{for_terminal(notice.text)}; it will not arrive.\n")
        self._prompt()

    def gap(self, gap) -> None:
        """C{on_gap}: a sender's numbering says a message is missing or late."""
        self._say(f"\nNote: {gap.describe()}.\n")
        self._prompt()

    def show(self, opened) -> None:
        """C{on_message}: print a verified, decrypted message."""
        text = for_terminal(opened.plaintext.decode("utf-8", "replace"))
        self._say(f"\nReceived message from {opened.sender}: {text}\n")
        self._prompt()

    def key_rotated(self, name: str, outcome) -> None:
        """C{on_key_rotated}: a contact's key was followed along its signed rotations."""
        self._say(f"\nNote: {outcome.notice(name)}.\n")
        self._prompt()

    def quarantined(self, quarantined) -> None:
        """C{on_quarantined}: a delivery that could not be kept was set aside."""
        self._say(f"\nNote: {for_terminal(quarantined.describe())}.\n")
        self._prompt()

    def rejected(self, rejected) -> None:
        who = rejected.sender or "an unknown sender"
        self._say(f"\nDropped a message from {who}: {rejected.reason}\n")
        self._prompt()

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(None)


class _NotSent(Exception):
    pass
