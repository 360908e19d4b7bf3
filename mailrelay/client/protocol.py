"""
The client's side of the relay protocol.

L{ClientProtocol} authenticates as its identity, then offers L{send}, and
hands each delivered message, verified and decrypted, to C{on_message}
before acknowledging it.  Deliveries are processed one at a time in the
order the relay pushed them.  Each message is first committed to the inbox
(which also finds redeliveries of messages already shown, and gaps in a
sender's numbering), then shown, then acknowledged.  A message whose handler
fails is taken out of the inbox again and not acknowledged: the connection
is closed so the relay delivers it again.  The relay's notices (a message
that expired unread) take the same path through C{on_notice}.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailrelay import envelope, keys, wire
from mailrelay.client.contacts import RETIRED_KEY_WINDOW, MemoryContacts
from mailrelay.client.inbox import Gap, MemoryInbox
from mailrelay.channel import channel_binding, no_delay

E = wire.ErrorCode
PING_INTERVAL = 60.0


class RelayError(Exception):
    """The relay ended the session or refused a request."""

    def __init__(self, code: wire.ErrorCode, text: str) -> None:
        super().__init__(f"{text} ({code.name})")
        self.code = code
        self.text = text


class SendRefused(RelayError):
    """The relay refused one message; nothing was stored."""


class UnknownSender(RelayError):
    """The relay's directory has no key for the identity asked about."""


class UncertifiedKey(keys.IdentityError):
    """A contact's key has no valid certificate from the CA this client trusts."""


class UntrustedRelay(Exception):
    """This client refused the relay: it could be relaying someone else's challenge."""


class Disconnected(Exception):
    """The connection to the relay ended; the message says why."""


class LocalFailure(Exception):
    """This client failed (a full disk, say) and ended the session; the message says why."""


def describe_disconnect(reason) -> str:
    """A one-line reason for a lost connection, TLS failures spelled out."""
    try:
        from OpenSSL.SSL import Error as TLSError
    except ImportError:  # pragma: no cover - pyOpenSSL is a dependency
        TLSError = None
    if TLSError is not None and reason.check(TLSError):
        details = []
        for item in reason.value.args[0] if reason.value.args else []:
            if isinstance(item, tuple) and item:
                details.append(str(item[-1]))
        text = ", ".join(details) or str(reason.value)
        return (f"TLS failed: {text} (check the relay's certificate against the "
                f"host name and trustRoots)")
    if reason.check(ConnectionDone):
        return "the relay closed the connection"
    return reason.getErrorMessage()


class NotNow(Exception):
    """
    Raised by a message handler to leave a message with the relay for a
    later session (say, the user asked for no more): not a failure to keep
    it, so it does not count towards quarantine.
    """


class SecondMessage(Exception):
    """
    A delivery that opens, under an id the inbox already holds another
    message of the same sender for: set aside at once (quarantined), never
    dropped as a repeat.
    """


MAX_DELIVERY_ATTEMPTS = 3
"""
Sessions in a row that may fail to keep the same delivered envelope before
it is quarantined (kept in the inbox as it came, reported, acknowledged),
so that no single delivery can hold up the messages behind it for ever.
"""


class Rejected(Exception):
    """A delivered envelope that could not be opened; it was acknowledged and dropped."""

    def __init__(self, message_id: bytes, sender: str | None, reason: str) -> None:
        super().__init__(reason)
        self.message_id = message_id
        self.sender = sender
        self.reason = reason


class Quarantined:
    """A delivery this client could not keep, set aside in the inbox and acknowledged."""

    def __init__(self, message_id: bytes, sender: str | None, reason: str,
                 attempts: int) -> None:
        self.message_id = message_id
        self.sender = sender
        self.reason = reason
        self.attempts = attempts

    def describe(self) -> str:
        who = (f"(its envelope names {self.sender} as sender, unverified)" if self.sender
               else "(its sender cannot be read)")
        return (f"could not keep message {self.message_id.hex()} {who} in {self.attempts} "
                f"attempts ({self.reason}); it is kept aside in the inbox, unread "
                f"(`mailrelay inbox` lists it), and acknowledged so the messages behind it "
                f"can come")


class ClientProtocol(Protocol):
    log = Logger()

    def __init__(
        self,
        identity: keys.Identity,
        contacts=None,
        on_message: Callable[[envelope.Opened], object] | None = None,
        on_rejected: Callable[[Rejected], object] | None = None,
        inbox=None,
        clock=None,
        ping_interval: float = PING_INTERVAL,
        receive: bool | None = None,
        relay_check: Callable[[str], None] | None = None,
        on_notice: Callable[[wire.Notice], object] | None = None,
        on_gap: Callable[[Gap], object] | None = None,
        durable_handler: bool = False,
        certificate: bytes = b"",
        identity_roots=None,
        on_key_rotated=None,
        on_quarantined=None,
    ) -> None:
        self.identity = identity
        # Called with (name, Outcome) when a contact's key was followed along
        # its signed rotations; and with a Quarantined when a delivery that
        # could not be kept was set aside.
        self.on_key_rotated = on_key_rotated
        self.on_quarantined = on_quarantined
        # Our own certificate (DER), for a relay in CA mode; and the CA roots
        # every contact's key must be certified by (None: trust on first use).
        self.certificate = certificate
        self.identity_roots = identity_roots
        # A handler that files messages durably and idempotently (a Maildir)
        # is marked done after it returns, so a crash while filing files the
        # message again; one that shows it to a person is marked before, so
        # a crash cannot show it twice.
        self.durable_handler = durable_handler
        # Only a session that hands messages to someone asks for them: one
        # that only sends must not take (and acknowledge) the mailbox.
        self.receive = on_message is not None if receive is None else receive
        if self.receive and on_message is None:
            raise ValueError("a receiving client needs an on_message handler")
        self.contacts = contacts if contacts is not None else MemoryContacts()
        self.on_message = on_message
        self.on_rejected = on_rejected
        self.on_notice = on_notice
        self.on_gap = on_gap
        self.inbox = inbox if inbox is not None else MemoryInbox()
        self.clock = clock
        self.ping_interval = ping_interval
        self.max_envelope = wire.MAX_ENVELOPE
        # How long a contact's retired key may still sign what we accept:
        # the relay's message lifetime, never more than our own bound.
        self.retired_key_window = RETIRED_KEY_WINDOW
        self.registered = False
        self.queued = 0
        self.relay_name: str | None = None
        # Called with the relay's id from HELLO; raises to refuse the relay.
        self.relay_check = relay_check
        self.ready: Deferred[ClientProtocol] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.close_reason: Exception | None = None
        # Handshake-sized frames until WELCOME; then deliveries as large as
        # any relay can store (see LARGEST_ENVELOPE).
        self._frames = wire.FrameBuffer(wire.MIN_FRAME_ROOM)
        self._sends: dict[bytes, Deferred[bytes]] = {}
        self._lookups: dict[str, list[Deferred[bytes]]] = {}
        self._directory: dict[str, bytes] = {}
        self._certificates: dict[str, bytes] = {}
        self._rotations: dict[str, tuple] = {}
        self._trusted: dict[str, object] = {}
        self._rotating: Deferred | None = None
        self._deliveries: deque[wire.Deliver | wire.Notice | envelope.Opened] = deque()
        self._delivering = False
        self._receiving = True
        self._ping: LoopingCall | None = None
        self._heard = 0.0
        self._state = "connecting"

    # Connection

    def connectionMade(self) -> None:
        self._state = "handshake"
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._state == "closed":
            return
        if self.clock is not None:
            self._heard = self.clock.seconds()
        self._frames.add(data)
        # One frame at a time: WELCOME raises the frame limit for the frames
        # after it, which may have arrived in the same read.
        while self._state != "closed":
            try:
                frame = self._frames.next()
            except wire.ProtocolError as e:
                self._abort(RelayError(E.MALFORMED_FRAME, f"relay sent a malformed frame: {e}"))
                return
            if frame is None:
                return
            self._handle(frame)

    def _write(self, frame: wire.Frame) -> None:
        self.transport.write(wire.encode(frame))

    def _keepAlive(self) -> None:
        """
        Ping; and give up on a relay that sent nothing, not even the PONG to
        the last ping, for two intervals: a half-open connection must not
        leave sends waiting for ever.
        """
        if self.clock.seconds() - self._heard > 2 * self.ping_interval:
            self.close_reason = Disconnected(
                f"the relay stopped answering (nothing for "
                f"{self.clock.seconds() - self._heard:.0f} seconds)")
            self._state = "closed"
            self.transport.abortConnection()
            return
        self._write(wire.Ping(new_nonce()))

    def _abort(self, error: RelayError) -> None:
        """Tell the relay why, and close."""
        if self._state == "closed":
            return
        self.close_reason = error
        self._write(wire.Error(error.code, b"", error.text))
        self._state = "closed"
        self.transport.loseConnection()

    def _refuseRelay(self, reason: Exception) -> None:
        """Give the relay no answer to its challenge, tell it why, and close."""
        if self._state == "closed":
            return
        self.close_reason = reason
        self._write(wire.Error(E.AUTH_FAILED, b"", f"client refuses the relay: {reason}"))
        self._state = "closed"
        self.transport.loseConnection()

    def close(self) -> Deferred[None]:
        """Close the connection; fires once it is closed."""
        if self._state != "closed":
            self._state = "closed"
            self.transport.loseConnection()
        return self._whenClosed()

    def _whenClosed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.closed.called:
            d.callback(None)
        else:
            self.closed.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def connectionLost(self, reason) -> None:
        self._state = "closed"
        if self._ping is not None and self._ping.running:
            self._ping.stop()
        error = self.close_reason or Disconnected(describe_disconnect(reason))
        if not self.ready.called:
            self.ready.errback(error)
        for d in self._sends.values():
            d.errback(error)
        self._sends.clear()
        for waiting in self._lookups.values():
            for d in waiting:
                d.errback(error)
        self._lookups.clear()
        if self._rotating is not None:
            rotating, self._rotating = self._rotating, None
            rotating.errback(error)
        self.closed.callback(None)

    # Frames

    def _handle(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Hello):
            self._hello(frame)
        elif isinstance(frame, wire.Welcome) and self._state == "authenticating":
            self._welcome(frame)
        elif self._state != "ready" and not isinstance(frame, wire.Error):
            self._abort(RelayError(E.UNEXPECTED_FRAME, f"{type(frame).__name__} before welcome"))
        elif isinstance(frame, (wire.Deliver, wire.Notice)):
            if not self.receive:
                # Not asked for: leave it unacknowledged for the receiving session.
                self.log.warn("relay delivered {id} to a sending-only session; ignored",
                              id=_frame_id(frame).hex())
                return
            self._deliveries.append(frame)
            self._nextDelivery()
        elif isinstance(frame, wire.Accepted):
            d = self._sends.pop(frame.message_id, None)
            if d is not None:
                d.callback(frame.message_id)
        elif isinstance(frame, wire.Key) and self._rotating is not None \
                and frame.identity == self.identity.name:
            rotating, self._rotating = self._rotating, None
            rotating.callback(frame)
        elif isinstance(frame, wire.Key):
            self._directory[frame.identity] = frame.public_key
            self._certificates[frame.identity] = frame.certificate
            self._rotations[frame.identity] = frame.rotations
            for d in self._lookups.pop(frame.identity, []):
                d.callback(frame.public_key)
        elif isinstance(frame, wire.Error):
            self._error(frame)
        elif isinstance(frame, wire.Ping):
            self._write(wire.Pong(frame.opaque))
        elif isinstance(frame, wire.Pong):
            pass
        else:
            self._abort(RelayError(E.UNEXPECTED_FRAME, f"{type(frame).__name__} from a relay"))

    def _hello(self, frame: wire.Hello) -> None:
        if self._state != "handshake":
            self._abort(RelayError(E.UNEXPECTED_FRAME, "a second Hello"))
            return
        if frame.version != wire.PROTOCOL_VERSION:
            self._abort(RelayError(
                E.UNSUPPORTED_VERSION,
                f"relay speaks protocol version {frame.version}, "
                f"this client {wire.PROTOCOL_VERSION}",
            ))
            return
        binding = b""
        if frame.binding == wire.BINDING_TLS_EXPORTER:
            if not ISSLTransport.providedBy(self.transport):
                self._refuseRelay(UntrustedRelay(
                    "it asks for a TLS channel binding, but this connection is not TLS: "
                    "something between us may be passing on another connection's challenge"
                ))
                return
            # Only TLS 1.3's exporter is unique to a connection: that of TLS 1.2
            # without the extended master secret can be another connection's too.
            version = self.transport.getHandle().get_protocol_version_name()
            if version != "TLSv1.3":
                self._refuseRelay(UntrustedRelay(
                    f"it asks for a TLS channel binding, but this connection speaks "
                    f"{version!r}, not TLS 1.3: only a TLS 1.3 binding is this "
                    f"connection's alone"
                ))
                return
            binding = channel_binding(self.transport)
        # Pinned only once nothing else is wrong with this relay.
        if self.relay_check is not None:
            try:
                self.relay_check(frame.relay)
            except keys.IdentityError as e:
                self._refuseRelay(e)
                return
            except OSError as e:
                self._refuseRelay(UntrustedRelay(f"cannot check its id: {e}"))
                return
        self.relay_name = frame.relay
        transcript = wire.auth_transcript(
            frame.challenge, frame.relay, self.identity.name, self.receive, binding
        )
        self._state = "authenticating"
        self._write(wire.Auth(
            wire.PROTOCOL_VERSION, self.identity.name, self.identity.public_der,
            self.identity.sign(transcript), self.receive, self.certificate,
        ))

    def _welcome(self, frame: wire.Welcome) -> None:
        self._state = "ready"
        self._frames.set_limit(wire.LARGEST_ENVELOPE)
        self.registered = frame.registered
        self.queued = frame.queued
        self.max_envelope = frame.max_envelope
        if frame.ttl:
            self.retired_key_window = min(frame.ttl, RETIRED_KEY_WINDOW)
        if self.receive:
            # Recorded in an earlier session that died before showing them:
            # shown first, and not acknowledged again (they were, or will be
            # found in the inbox when the relay delivers them again).
            self._deliveries.extend(self.inbox.unshown())
        if self.clock is not None and self.ping_interval:
            self._heard = self.clock.seconds()
            self._ping = LoopingCall(self._keepAlive)
            self._ping.clock = self.clock
            self._ping.start(self.ping_interval, now=False)
        self.ready.callback(self)
        self._nextDelivery()

    def _error(self, frame: wire.Error) -> None:
        if frame.fatal:
            self.close_reason = RelayError(frame.code, frame.text)
            self._state = "closed"
            self.transport.loseConnection()
            return
        if frame.code == E.ROTATION_REFUSED and self._rotating is not None:
            rotating, self._rotating = self._rotating, None
            rotating.errback(RelayError(frame.code, frame.text))
            return
        if len(frame.ref) == wire.MESSAGE_ID_SIZE and frame.ref in self._sends:
            self._sends.pop(frame.ref).errback(SendRefused(frame.code, frame.text))
            return
        if not frame.ref and self._sends:
            # The relay could not read the envelope, so not its id either; it
            # answers requests in order, so this is about the oldest send.
            oldest = next(iter(self._sends))
            self._sends.pop(oldest).errback(SendRefused(frame.code, frame.text))
            return
        if frame.code == E.UNKNOWN_IDENTITY:
            name = frame.ref.decode("ascii", "replace")
            waiting = self._lookups.pop(name, [])
            for d in waiting:
                d.errback(RelayError(frame.code, frame.text))
            if waiting:
                return
        self.log.warn("relay reported {code}: {text}", code=frame.code.name, text=frame.text)

    # Directory and pinning

    def lookup(self, name: str) -> Deferred[bytes]:
        """The relay directory's DER key for C{name}, asked once per session."""
        if name in self._directory:
            return defer.succeed(self._directory[name])
        if self._state != "ready":
            # Asked of a closed session it would never be answered.
            return defer.fail(Disconnected("not connected to the relay"))
        d: Deferred[bytes] = Deferred()
        waiting = self._lookups.setdefault(name, [])
        waiting.append(d)
        if len(waiting) == 1:
            self._write(wire.Lookup(name))
        return d

    def _forgetKey(self, name: str) -> None:
        """Forget the relay's answer for C{name} this session: the next use asks again."""
        for answers in (self._directory, self._certificates, self._rotations, self._trusted):
            answers.pop(name, None)

    def certificate_of(self, name: str) -> bytes:
        """The certificate the relay gave with C{name}'s key this session (or empty)."""
        return self._certificates.get(name, b"")

    def rotations_of(self, name: str) -> tuple:
        """The rotations the relay gave with C{name}'s key this session (unchecked)."""
        return self._rotations.get(name, ())

    def _now(self) -> int:
        return int(self.clock.seconds() if self.clock is not None else time.time())

    @inlineCallbacks
    def contact_key(self, name: str):
        """
        The key to use for C{name}: the directory's answer, as far as what
        this client trusts allows (L{Contacts.accept_key}): the key trusted
        now, a first key (trusted on first use), or one that rotations
        signed from the trusted key lead to (with a notice).  Fails with
        L{keys.KeyConflict} (both fingerprints), L{contacts.RolledBack} for
        an answer older than one accepted before, L{UncertifiedKey} when the
        CA does not vouch for the key, L{UnknownSender} for an identity the
        relay does not know.  Asked of the relay once per session.
        """
        known = self._trusted.get(name)
        if known is not None and self.contacts.current_der(name) == known[0]:
            # Still what the contacts store trusts: another process (`mailrelay
            # trust`, a session that followed a rotation) may have changed it.
            return known[1]
        try:
            der = yield self.lookup(name)
        except RelayError as e:
            if e.code == E.UNKNOWN_IDENTITY:
                raise UnknownSender(e.code, e.text) from None
            raise
        certificate = self.certificate_of(name)
        if self.identity_roots:
            # The relay's word is not enough: the CA must have certified it.
            from mailrelay import ca

            try:
                ca.verify_identity(certificate, self.identity_roots, name, der)
            except ca.CAError as e:
                raise UncertifiedKey(
                    f"the relay's key for {name!r} has no valid certificate from your CA "
                    f"({e}); not using it") from None
        outcome = self.contacts.accept_key(name, der, self.rotations_of(name), certificate,
                                           now=self._now())
        if outcome.rotated:
            # Told once: by the callback if there is one (the CLI's terminal,
            # the twistd client's log), else in the log.
            if self.on_key_rotated is not None:
                self.on_key_rotated(name, outcome)
            else:
                self.log.warn("{name} rotated its key to {fingerprint} (signed over from the "
                              "key trusted before); now using the new one", name=name,
                              fingerprint=keys.format_fingerprint(keys.fingerprint(der)))
                if outcome.was_verified:
                    self.log.warn("{name} was verified, and no longer is: compare the new "
                                  "safety number (mailrelay fingerprint {name}), then "
                                  "mailrelay verify {name}", name=name)
        self._trusted[name] = (keys.public_der(outcome.key), outcome.key)
        return outcome.key

    def rotate(self, new: keys.Identity, timestamp: int, certificate: bytes = b"") -> Deferred:
        """
        Ask the relay to replace this identity's key by C{new}'s, with the
        rotation signed by both; fires with the relay's L{wire.Key} answer.
        """
        if self._state != "ready":
            return defer.fail(Disconnected("not connected to the relay"))
        if self._rotating is not None:
            return defer.fail(ValueError("a rotation is already under way"))
        statement = wire.rotation_statement(self.identity.name, self.identity.public_der,
                                            new.public_der, timestamp)
        self._rotating = Deferred()
        self._write(wire.Rotate(new.public_der, timestamp, self.identity.sign(statement),
                                new.sign(statement), certificate))
        return self._rotating

    # Sending

    @inlineCallbacks
    def send(self, recipient: str, data: bytes, message_id: bytes | None = None):
        """
        Seal C{data} for C{recipient} and send it.  Fires with the message id
        once the relay has committed it; fails with L{SendRefused} (or the
        reason the connection ended) otherwise.
        """
        message_id, sealed = yield self.seal(recipient, data, message_id)
        result = yield self.submit(message_id, sealed)
        return result

    @inlineCallbacks
    def seal(self, recipient: str, data: bytes, message_id: bytes | None = None):
        """
        Seal C{data} for C{recipient} (with its pinned key, checked against
        the directory); fires with C{(message_id, envelope)}.  Keep the
        envelope to L{submit} it again after a lost answer: the relay
        recognises the very same bytes and stores nothing twice.
        """
        if self._state != "ready":
            raise RelayError(E.UNEXPECTED_FRAME, "not connected to the relay")
        recipient = keys.check_identity(recipient)
        key = yield self.contact_key(recipient)
        message_id = message_id or envelope.new_message_id()
        sealed = envelope.seal(
            self.identity, recipient, key, data, message_id, max_envelope=self.max_envelope
        )
        return message_id, sealed

    def submit(self, message_id: bytes, sealed: bytes) -> Deferred[bytes]:
        """Send a sealed envelope; fires with its id once the relay committed it."""
        if self._state != "ready":
            return defer.fail(Disconnected("not connected to the relay"))
        if message_id in self._sends:
            return defer.fail(ValueError("that message is already being sent"))
        d: Deferred[bytes] = Deferred()
        self._sends[message_id] = d
        self._write(wire.Send(sealed))
        return d

    # Receiving

    def pause_receiving(self) -> None:
        """
        Hand no more messages to C{on_message}: those delivered from now on
        stay unacknowledged, and the relay delivers them again next session.
        """
        self._receiving = False

    def _nextDelivery(self) -> None:
        if self._delivering or not self._deliveries or self._state == "closed":
            return
        if not self._receiving:
            return
        self._delivering = True
        frame = self._deliveries.popleft()
        d = self._receive(frame)
        d.addCallbacks(self._received, self._handlerFailed, callbackArgs=(frame,),
                       errbackArgs=(frame,))

    def _received(self, ignored, frame: wire.Deliver | wire.Notice | envelope.Opened) -> None:
        if isinstance(frame, wire.Deliver):
            # Kept (or rejected for good): earlier failures no longer count.
            self.inbox.kept(frame.message_id)
        if self._state == "ready" and not isinstance(frame, envelope.Opened):
            self._write(wire.Ack(_frame_id(frame)))
        self._delivering = False
        self._nextDelivery()

    def _handlerFailed(self, failure, frame) -> None:
        if self._quarantined(failure, frame):
            return
        if failure.check(NotNow):
            self.log.info("leaving message {id} with the relay for a later session",
                          id=_frame_id(frame).hex())
        else:
            self.log.failure("handling a delivered message failed; closing so it comes again",
                             failure)
        self._delivering = False
        self._deliveries.clear()
        if self._state != "closed":
            self.close_reason = LocalFailure(
                f"could not keep a received message: {failure.getErrorMessage()}; "
                f"it stays with the relay")
            self._state = "closed"
            self.transport.loseConnection()

    def _quarantined(self, failure, frame) -> bool:
        """
        Count a failure to keep the delivered C{frame}.  Once the same
        envelope failed L{MAX_DELIVERY_ATTEMPTS} times, set it aside in the
        inbox as it came (with the reason), report it, acknowledge it and go
        on with the next delivery; True then.  Failures that are not the
        delivery's (the session ending, a handler leaving it for later)
        do not count.
        """
        if not isinstance(frame, wire.Deliver) or self._state != "ready":
            return False
        if failure.check(NotNow, Disconnected, RelayError, defer.CancelledError):
            return False
        at_once = failure.check(SecondMessage) is not None
        reason = failure.getErrorMessage() or failure.type.__name__
        try:
            header = envelope.read_header(frame.envelope, wire.LARGEST_ENVELOPE)
            sender = header.sender
        except envelope.EnvelopeError:
            sender = None
        try:
            attempts = self.inbox.failed_attempt(frame.message_id, frame.envelope, reason)
            if attempts < MAX_DELIVERY_ATTEMPTS and not at_once:
                return False
            self.inbox.quarantine(frame.message_id, sender, frame.envelope, reason, attempts)
        except Exception:
            self.log.failure("could not count a failed delivery of {id}",
                             id=frame.message_id.hex())
            return False
        quarantined = Quarantined(frame.message_id, sender, reason, attempts)
        if self.on_quarantined is not None:
            try:
                self.on_quarantined(quarantined)
            except Exception:
                self.log.failure("reporting a quarantined message failed")
        else:
            self.log.warn("{what}", what=quarantined.describe())
        self._write(wire.Ack(frame.message_id))
        self._delivering = False
        self._nextDelivery()
        return True

    def _receive(self, frame: wire.Deliver | wire.Notice | envelope.Opened) -> Deferred[None]:
        if isinstance(frame, wire.Notice):
            return self._receiveNotice(frame)
        if isinstance(frame, envelope.Opened):
            return self._show(frame)
        return self._receiveMessage(frame)

    @inlineCallbacks
    def _receiveMessage(self, frame: wire.Deliver):
        sender = None
        try:
            env = envelope.parse(frame.envelope, wire.LARGEST_ENVELOPE)
            sender = env.header.sender
            if env.header.message_id != frame.message_id:
                raise envelope.EnvelopeError("relay delivered it under another message id")
            seen = self.inbox.seen_header(sender, frame.message_id)
            if seen is not None and (not seen or seen == env.header.encode()):
                # Shown before (its ack was lost, or we died before sending
                # it): acknowledge again, show nothing.  Only an envelope the
                # sender's key opened was ever recorded, so a forger cannot
                # make us drop a real message by reusing its id: ids are
                # recorded per sender, the sender is checked below, and an
                # envelope with another header under a recorded id is no
                # repeat (see SecondMessage below).
                return
            key = yield self.contact_key(sender)
            h = env.header
            if (h.sender_fingerprint != keys.fingerprint(keys.public_der(key))
                    and not any(k.fingerprint == h.sender_fingerprint
                                for k in self.contacts.history(sender))):
                # A key this client never trusted: the sender may have rotated
                # since this session asked the relay.  Ask again; the answer
                # goes through every check the first one did.
                self._forgetKey(sender)
                key = yield self.contact_key(sender)
            retired = h.sender_fingerprint != keys.fingerprint(keys.public_der(key))
            if retired:
                # Signed by another key of the sender: only one this client
                # trusted before, or one the trusted key vouches for, and only
                # what it signed before it was replaced, not long after.
                key = self.contacts.signing_key(
                    sender, h.sender_fingerprint, h.timestamp, now=self._now(),
                    window=self.retired_key_window, roots=self.identity_roots)
            # Sealed for this key, or for one this identity had before a rotation.
            recipient = self.identity.for_fingerprint(h.recipient_fingerprint) or self.identity
            opened = envelope.open_envelope(env, recipient, key)
            if (h.version < 2 or not h.seq) and self.inbox.numbered(sender):
                # Once a sender numbers its messages, an unnumbered one skips
                # the gap check: an old one replayed, or a downgrade.
                raise envelope.EnvelopeError(
                    f"{sender!r} numbers its messages, but this one is unnumbered (envelope "
                    f"version {h.version}, sequence {h.seq}): a replayed or downgraded "
                    f"message; not shown")
            if seen is not None:
                # Two different messages, both signed by keys of the sender,
                # under one id: one may be forged with a stolen retired key
                # and was delivered first to hide the other.  Neither is
                # dropped quietly: this one is set aside, reported, kept.
                raise SecondMessage(
                    f"{sender!r} signed another message under this id, already shown; "
                    f"one of the two may be forged with a stolen retired key")
        except (envelope.EnvelopeError, keys.IdentityError, UnknownSender) as e:
            # Only what is wrong with the envelope itself, or with its claimed
            # sender, drops it: coming again would not make it any better.
            # Anything else (an unreadable local file, the session ending
            # during the key lookup) leaves it unacknowledged, to come again.
            # Nothing is recorded of it: the id stays free for the genuine
            # message, should the relay have reused it.
            rejected = Rejected(frame.message_id, sender, str(e))
            self.log.warn("rejected message {id} from {sender}: {reason}",
                          id=frame.message_id.hex(), sender=sender, reason=str(e))
            if self.on_rejected is not None:
                yield maybeDeferred(self.on_rejected, rejected)
            return
        # On disk before it is shown: a crash after showing cannot show it twice.
        gaps = self.inbox.record(opened, retired=retired)
        try:
            for gap in gaps:
                self.log.warn("{gap}", gap=gap.describe())
                if self.on_gap is not None:
                    yield maybeDeferred(self.on_gap, gap)
        except BaseException:
            self.inbox.forget(opened)
            raise
        yield self._show(opened, fresh=True)

    @inlineCallbacks
    def _show(self, opened: envelope.Opened, fresh: bool = False):
        """
        Hand a recorded message to C{on_message}, marked as shown just
        before.  If that fails, a fresh delivery is taken out of the inbox
        (the relay delivers it again), a replayed one marked unshown again.
        """
        if not self.durable_handler:
            self.inbox.mark_shown(opened)
        try:
            if self.on_message is not None:
                yield maybeDeferred(self.on_message, opened)
        except BaseException:
            if fresh:
                self.inbox.forget(opened)
            else:
                self.inbox.mark_shown(opened, False)
            raise
        if self.durable_handler:
            self.inbox.mark_shown(opened)

    @inlineCallbacks
    def _receiveNotice(self, notice: wire.Notice):
        if self.inbox.notice_seen(notice):
            return
        self.inbox.record_notice(notice)
        if self.inbox.seen(notice.sender, notice.message_id):
            # It expired while delivered and not yet acknowledged: we have it.
            return
        try:
            if self.on_notice is not None:
                yield maybeDeferred(self.on_notice, notice)
            else:
                self.log.warn("message {id} from {sender}: {text}",
                              id=notice.message_id.hex(), sender=notice.sender,
                              text=notice.text)
        except BaseException:
            self.inbox.forget_notice(notice)
            raise


def _frame_id(frame: wire.Deliver | wire.Notice) -> bytes:
    """The id a delivery is acknowledged under."""
    return frame.notice_id if isinstance(frame, wire.Notice) else frame.message_id


class ClientFactory(Factory):
    """Builds L{ClientProtocol}s with the same settings (one per connection)."""

    noisy = False

    def __init__(self, **settings) -> None:
        self.settings = settings

    def buildProtocol(self, addr) -> ClientProtocol:
        p = ClientProtocol(**self.settings)
        p.factory = self
        return p


@inlineCallbacks
def connect(
    reactor,
    endpoint,
    identity: keys.Identity,
    contacts=None,
    on_message=None,
    on_rejected=None,
    inbox=None,
    timeout: float | None = 30.0,
    relay_check=None,
    on_notice=None,
    on_gap=None,
    certificate: bytes = b"",
    identity_roots=None,
    on_key_rotated=None,
    on_quarantined=None,
):
    """
    Connect to the relay at C{endpoint} as C{identity}.  Fires with the
    authenticated L{ClientProtocol}: C{send(recipient, data)} and C{close()}.
    Fails with L{defer.TimeoutError} when connecting and authenticating take
    longer than C{timeout} seconds in all.
    """
    factory = ClientFactory(
        identity=identity, contacts=contacts, on_message=on_message,
        on_rejected=on_rejected, inbox=inbox, clock=reactor, relay_check=relay_check,
        on_notice=on_notice, on_gap=on_gap, certificate=certificate,
        identity_roots=identity_roots, on_key_rotated=on_key_rotated,
        on_quarantined=on_quarantined,
    )
    started = reactor.seconds()
    connecting = endpoint.connect(factory)
    if timeout is not None:
        connecting.addTimeout(timeout, reactor)
    try:
        protocol = yield connecting
    except (defer.CancelledError, ConnectingCancelledError):
        # Endpoints report a connection attempt cancelled by the timeout in
        # their own way; it is a timeout all the same.
        raise defer.TimeoutError(f"no connection within {timeout} seconds") from None
    ready = protocol.ready
    if timeout is not None:
        remaining = max(timeout - (reactor.seconds() - started), 0)
        ready.addTimeout(remaining, reactor,
                         onTimeoutCancel=lambda r, t: _timedOut(protocol, timeout))
    client = yield ready
    return client


def _timedOut(protocol: ClientProtocol, timeout: float):
    protocol.transport.abortConnection()
    raise defer.TimeoutError(f"the relay did not welcome us within {timeout} seconds")


def new_nonce() -> bytes:
    return os.urandom(wire.PING_SIZE)
