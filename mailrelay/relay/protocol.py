"""
The relay's side of the protocol: one L{RelaySession} per connection, built
by L{RelayFactory}.

A session goes through three states.  C{handshake}: the relay has sent
L{wire.Hello} with a fresh challenge and accepts only L{wire.Auth}, until
the auth deadline.  C{ready}: the client may look keys up, send, receive and
acknowledge.  C{closed}: after a fatal error or the end of the connection;
nothing more is read.

Frames are handled in the order they arrive.  A L{wire.Send} is checked,
then handed to the store, and the next frame is handled while the store
commits it: a client may have up to L{MAX_PENDING_ANSWERS} requests in
flight, which lets many sends share one disk flush.  The store commits in
the order it was asked, and answers (L{wire.Accepted}, L{wire.Key},
L{wire.Pong}, request errors) are written strictly in request order, each
only once it is final: "accepted" still means committed.

A client that sends faster than that is read no further (the transport is
paused) until the frames already read are handled.

Hostile peers are bounded too: each frame must arrive whole within
C{frame_timeout} of its first byte (however slowly its bytes trickle, which
keeps the idle timer going); connections beyond C{max_sessions} in all, or
C{max_per_peer} from one address, get one L{wire.ErrorCode.BUSY} frame
instead of a session; and each identity's sends share one token bucket
(L{SendRate}), beyond which they are refused with
L{wire.ErrorCode.RATE_LIMITED}.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from mailrelay import ca, envelope, keys, wire
from mailrelay.channel import channel_binding, no_delay
from mailrelay.relay.directory import Directory, KeyConflict
from mailrelay.relay.mailbox import DEFAULT_TTL, DEFAULT_WINDOW, Mailboxes, Outbox
from mailrelay.relay.store import (
    DuplicateId,
    MailboxFull,
    MailboxStore,
    SenderQuotaFull,
    StoredMessage,
)
from mailrelay.relay.store.base import KIND_MESSAGE

E = wire.ErrorCode

MAX_PENDING_ANSWERS = 32
"""Requests of one session whose answers may be outstanding at once."""

READ_AHEAD = 64 * 1024
"""Bytes read beyond one whole frame before the relay stops reading."""

CLOSE_GRACE = 30.0
"""Seconds a closing connection has to flush before it is cut."""

DEFAULT_MAX_PER_PEER = 64
"""Connections one address may hold open at once."""

DEFAULT_MAX_SESSIONS = 10_000
"""Connections the relay holds open at once, from everyone."""

DEFAULT_FRAME_TIMEOUT = 60.0
"""Seconds a frame has to arrive whole, from its first byte."""

DEFAULT_RATE = 200.0
"""Sends a second one identity may keep up, over all its sessions."""

DEFAULT_BURST = 1000
"""Sends one identity may make at once before L{DEFAULT_RATE} applies."""

BUSY_GRACE = 5.0
"""Seconds a refused connection has to take its BUSY frame before it is cut."""

MAX_RATE_BUCKETS = 65_536
"""Senders whose token buckets are remembered at once (about 10 MiB)."""

REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about the same kind of refused connection."""


class Fatal(Exception):
    """End the session with this error frame."""

    def __init__(self, code: wire.ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Refused(Exception):
    """Answer one request with this error frame; the session goes on."""

    def __init__(self, code: wire.ErrorCode, ref: bytes, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.ref = ref
        self.text = text


class FrameClock:
    """
    Follows the frame boundaries of the bytes a peer sends, as they arrive,
    to tell whether a frame has begun and not yet ended.

    The frame deadline needs this independently of decoding: frames are
    decoded only when their turn comes, and complete frames waiting for it
    (pipelined, or held while the transport's buffer is full) are the
    relay's delay, not the peer's.  Only the length prefixes are read, and
    no byte is kept beyond the four of a prefix.
    """

    def __init__(self) -> None:
        self._prefix = b""
        self._left = 0

    @property
    def partial(self) -> bool:
        """Whether some bytes of a frame arrived and the rest has not."""
        return bool(self._prefix) or self._left > 0

    def feed(self, data: bytes) -> bool:
        """Follow C{data}; whether a frame ended in it."""
        ended = False
        i, size = 0, len(data)
        while i < size:
            if self._left:
                taken = min(self._left, size - i)
                self._left -= taken
                i += taken
                ended = ended or not self._left
                continue
            taken = min(wire.LENGTH_PREFIX.size - len(self._prefix), size - i)
            self._prefix += data[i : i + taken]
            i += taken
            if len(self._prefix) == wire.LENGTH_PREFIX.size:
                (self._left,) = wire.LENGTH_PREFIX.unpack(self._prefix)
                self._prefix = b""
                # An empty frame ends with its prefix (and is refused as
                # malformed when decoded).
                ended = ended or not self._left
        return ended


class SendRate:
    """
    Token buckets limiting how fast each identity sends, one bucket per
    identity, shared by all its sessions (opening more connections does not
    buy more): C{burst} sends at once, then C{rate} a second.  A C{rate} of
    0 means no limit.

    A bucket untouched long enough to be full again is no different from no
    bucket, so it is forgotten; and at most C{limit} are kept (the longest
    untouched go first: at worst such a sender gets a full bucket early).
    Memory stays bounded however many identities send.
    """

    def __init__(self, clock, rate: float, burst: int, limit: int = MAX_RATE_BUCKETS) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.limit = limit
        # identity -> (tokens, when counted), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str) -> float:
        """
        Count one send of C{identity}: 0 if it may go, else the seconds to
        wait before the next one may (nothing is taken then).
        """
        if not self.rate:
            return 0.0
        now = self.clock.seconds()
        self._forget(now)
        tokens, then = self._buckets.pop(identity, (self.burst, now))
        tokens = min(float(self.burst), tokens + max(now - then, 0.0) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[identity] = (tokens, now)
        return wait

    def _forget(self, now: float) -> None:
        full_after = self.burst / self.rate
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets))
            if now - buckets[oldest][1] < full_after and len(buckets) < self.limit:
                break
            del buckets[oldest]


class BusyRefusal(Protocol):
    """
    What a connection the relay cannot take gets instead of a session: one
    L{wire.ErrorCode.BUSY} frame saying which limit it hit (a client can
    tell its user, and try later), then the end of the connection.  It keeps
    no session state, reads nothing, and is cut after L{BUSY_GRACE} seconds
    if the frame cannot be flushed (a peer that does not read, or a TLS peer
    that never finishes its handshake).
    """

    def __init__(self, clock, text: str) -> None:
        self.clock = clock
        self.text = text
        self._cut = None

    def connectionMade(self) -> None:
        self.transport.write(wire.encode(wire.Error(E.BUSY, b"", self.text)))
        self._cut = self.clock.callLater(BUSY_GRACE, self.transport.abortConnection)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        self._cut = None


@implementer(IPushProducer)
class RelaySession(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.state = "handshake"
        self.identity: str | None = None
        self.public_key: bytes | None = None
        self._fingerprint = b""
        self.outbox: Outbox | None = None
        self.accepted = 0
        # Until authenticated, only handshake-sized frames: an unknown peer
        # cannot make the relay buffer an envelope's worth of bytes.
        self._frames = wire.FrameBuffer(wire.MIN_FRAME_ROOM)
        self._frameClock = FrameClock()
        self._frameTimer = None
        self._rateLogged = False
        self._quotaLogged = False
        # A list, not a deque: it holds at most MAX_PENDING_ANSWERS, and an
        # empty deque costs every idle session most of a kilobyte.
        self._answers: list[list] = []
        self._waitingForRoom: list[Deferred] = []
        self._readingPaused = False
        self._outputPaused = False
        self._binding = wire.BINDING_NONE
        self._busy = False
        self._draining = False
        self._deadline = None
        self._closer = None
        self._challenge = b""
        self.peer = "?"
        self.host: str | None = None

    # Twisted's TimeoutMixin schedules through this attribute.
    @property
    def callLater(self):
        return self.factory.clock.callLater

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.log.info("connection from {peer}", peer=self.peer)
        self.factory.sessions.add(self)
        no_delay(self.transport)
        self._challenge = os.urandom(wire.CHALLENGE_SIZE)
        if ISSLTransport.providedBy(self.transport):
            # This relay terminates TLS: answers must be bound to this very
            # connection, so no one can relay our challenge to a victim.
            self._binding = wire.BINDING_TLS_EXPORTER
        self._write(wire.Hello(wire.PROTOCOL_VERSION, self.factory.name, self._challenge,
                               self._binding))
        self._deadline = self.factory.clock.callLater(
            self.factory.auth_timeout, self._authDeadline
        )
        self.setTimeout(self.factory.idle_timeout)
        self.transport.registerProducer(self, True)

    def _write(self, frame: wire.Frame) -> None:
        self.transport.write(wire.encode(frame))

    def dataReceived(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self.resetTimeout()
        self._watchFrames(data)
        self._frames.add(data)
        if self._frames.buffered > self._backlogLimit():
            self._pauseReading()
        self._drain()

    def _backlogLimit(self) -> int:
        """Bytes read ahead of the frame being handled before reading stops."""
        return self._frames.max_frame + READ_AHEAD

    def _pauseReading(self) -> None:
        if not self._readingPaused and self.state != "closed":
            self._readingPaused = True
            self.transport.pauseProducing()
            # The peer cannot finish a frame the relay does not read.
            self._stopFrameDeadline()

    def _resumeReading(self) -> None:
        if self._readingPaused and self.state != "closed":
            self._readingPaused = False
            self.transport.resumeProducing()
            self._startFrameDeadline()

    def _watchFrames(self, data: bytes) -> None:
        """
        Run the frame deadline while a frame is part-way through arriving:
        from the first byte of a frame until its last, whatever trickles in
        between.  Only a frame ending stops it; the next frame gets its own.
        """
        if self._frameClock.feed(data) or not self._frameClock.partial:
            self._stopFrameDeadline()
        self._startFrameDeadline()

    def _startFrameDeadline(self) -> None:
        if (self._frameTimer is None and self._frameClock.partial
                and not self._readingPaused and self.state != "closed"):
            self._frameTimer = self.factory.clock.callLater(
                self.factory.frame_timeout, self._frameDeadline
            )

    def _stopFrameDeadline(self) -> None:
        if self._frameTimer is not None and self._frameTimer.active():
            self._frameTimer.cancel()
        self._frameTimer = None

    def _frameDeadline(self) -> None:
        self._frameTimer = None
        self.fatal(
            E.FRAME_TIMEOUT,
            f"a frame took more than {self.factory.frame_timeout:g} seconds to arrive",
        )

    def _drain(self) -> None:
        """
        Handle buffered frames one after another, decoding each only when its
        turn comes: authentication raises the frame limit, and the frames
        behind AUTH must be judged by the new one.
        """
        if self._draining:
            return  # the loop below is already running further up the stack
        self._draining = True
        incomplete = False
        try:
            while not self._busy and not self._outputPaused and self.state != "closed":
                try:
                    frame = self._frames.next()
                except wire.ProtocolError as e:
                    self.fatal(E.MALFORMED_FRAME, str(e))
                    return
                if frame is None:
                    incomplete = True
                    break
                # Most frames are handled at once; only a handler that waits
                # (for the store, say) holds the frames behind it.
                try:
                    result = self._handle(frame)
                except Exception:
                    self._failed(Failure(), frame)
                    continue
                if isinstance(result, Deferred):
                    self._busy = True
                    result.addErrback(self._failed, frame)
                    result.addBoth(self._handled)
        finally:
            self._draining = False
        # What is buffered is at most one partial frame once every complete
        # one is handled: read on, or that frame never completes.
        if incomplete or self._frames.buffered <= self._backlogLimit() // 2:
            self._resumeReading()

    def _handled(self, ignored) -> None:
        self._busy = False
        self._drain()

    def _failed(self, failure, frame: wire.Frame) -> None:
        if failure.check(Fatal):
            self.fatal(failure.value.code, failure.value.text)
        elif failure.check(Refused):
            self._answer(self._refusal(failure.value))
        else:
            self.log.failure(
                "unexpected error handling {frame} from {identity}",
                failure, frame=type(frame).__name__, identity=self.identity,
            )
            self.fatal(E.INTERNAL_ERROR, "internal relay error")

    @staticmethod
    def _refusal(refused: Refused) -> wire.Error:
        return wire.Error(refused.code, refused.ref, refused.text)

    # Answers, in request order

    def _answer(self, outcome) -> None:
        """
        Queue the answer to the request being handled: a frame, None (no
        answer), or a Deferred of either that may fail with L{Refused}.  It
        is written once it and every answer queued before it are final.
        """
        if not isinstance(outcome, Deferred):
            if self._answers:
                self._answers.append([True, outcome])
            elif outcome is not None and self.state != "closed":
                self._write(outcome)
            return
        slot = self._slot()
        outcome.addCallbacks(self._settle, self._settleFailed,
                             callbackArgs=(slot,), errbackArgs=(slot,))

    def _slot(self) -> list:
        """A place for an answer not final yet, after every answer queued before it."""
        slot = [False, None]
        self._answers.append(slot)
        return slot

    def _settle(self, frame, slot: list) -> None:
        slot[0], slot[1] = True, frame
        self._flushAnswers()

    def _settleFailed(self, failure, slot: list) -> None:
        if failure.check(Refused):
            self._settle(self._refusal(failure.value), slot)
            return
        self.log.failure("unexpected error answering {identity}", failure,
                         identity=self.identity)
        self._settle(None, slot)
        self.fatal(E.INTERNAL_ERROR, "internal relay error")

    def _flushAnswers(self) -> None:
        while self._answers and self._answers[0][0]:
            frame = self._answers.pop(0)[1]
            if frame is not None and self.state != "closed":
                self._write(frame)
        if len(self._answers) < MAX_PENDING_ANSWERS:
            waiting, self._waitingForRoom = self._waitingForRoom, []
            for d in waiting:
                d.callback(None)

    def _roomForAnswers(self) -> Deferred[None] | None:
        """Wait, before reading on, while too many answers are outstanding."""
        if len(self._answers) < MAX_PENDING_ANSWERS:
            return None
        d: Deferred[None] = Deferred()
        self._waitingForRoom.append(d)
        return d

    def fatal(self, code: wire.ErrorCode, text: str) -> None:
        """Send an error frame and close the connection."""
        if self.state == "closed":
            return
        self.log.info(
            "closing {peer} ({identity}): {code}: {text}",
            peer=self.peer, identity=self.identity or "unauthenticated",
            code=code.name, text=text,
        )
        self.state = "closed"
        self._write(wire.Error(code, b"", text))
        self._close()

    def _close(self) -> None:
        """
        Close once what is written is flushed, and for good after
        L{CLOSE_GRACE} seconds: a peer that does not read, or a TLS peer
        that never completes the shutdown, cannot hold the connection.
        """
        self._stopFrameDeadline()
        if self._closer is None:
            self._closer = self.factory.clock.callLater(CLOSE_GRACE, self._abort)
        # While a producer is registered, neither TCP nor TLS transports
        # finish a loseConnection; there is nothing more to produce.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._closer = None
        self.transport.abortConnection()

    # Frame handlers

    def _handle(self, frame: wire.Frame):
        if self.state == "handshake":
            if isinstance(frame, wire.Auth):
                return self._auth(frame)
            if isinstance(frame, wire.Error) and frame.fatal:
                # A client refusing us (say, it pinned another relay id here).
                self.log.warn("{peer} gave up before authenticating: {code}: {text}",
                              peer=self.peer, code=frame.code.name, text=frame.text)
                self.state = "closed"
                self._close()
                return None
            raise Fatal(E.UNEXPECTED_FRAME, f"{type(frame).__name__} before authentication")
        if isinstance(frame, wire.Send):
            return self._send(frame)
        if isinstance(frame, wire.Ack):
            return self._ack(frame)
        if isinstance(frame, wire.Lookup):
            return self._lookup(frame)
        if isinstance(frame, wire.Rotate):
            self._answer(self._rotate(frame))
            return self._roomForAnswers()
        if isinstance(frame, wire.Ping):
            self._answer(wire.Pong(frame.opaque))
            return self._roomForAnswers()
        if isinstance(frame, wire.Pong):
            return None
        if isinstance(frame, wire.Error):
            self.log.info("{identity} reported {code}: {text}",
                          identity=self.identity, code=frame.code.name, text=frame.text)
            if frame.fatal:
                self.state = "closed"
                self._close()
            return None
        raise Fatal(E.UNEXPECTED_FRAME, f"{type(frame).__name__} is not sent by clients")

    @inlineCallbacks
    def _auth(self, frame: wire.Auth):
        if frame.version != wire.PROTOCOL_VERSION:
            raise Fatal(
                E.UNSUPPORTED_VERSION,
                f"protocol version {frame.version} is not supported; "
                f"this relay speaks {wire.PROTOCOL_VERSION}",
            )
        try:
            key = keys.load_public_der(frame.public_key)
        except keys.BadKey as e:
            self.log.info("authentication failed for {identity} from {peer}: {reason}",
                          identity=frame.identity, peer=self.peer, reason=str(e))
            raise Fatal(E.AUTH_FAILED, str(e))
        transcript = wire.auth_transcript(
            self._challenge, self.factory.name, frame.identity, frame.receive,
            channel_binding(self.transport) if self._binding else b"",
        )
        if not keys.verify(key, frame.signature, transcript):
            self.log.info("authentication failed for {identity} from {peer}: bad signature",
                          identity=frame.identity, peer=self.peer)
            raise Fatal(E.AUTH_FAILED, "signature does not prove possession of the key")
        # The same key has more than one valid DER encoding; keep the one.
        public_key = keys.public_der(key)
        certificate = b""
        if self.factory.ca_roots:
            # CA mode: only an identity the CA certified for this very key.
            try:
                ca.verify_identity(frame.certificate, self.factory.ca_roots, frame.identity,
                                   public_key)
                certificate = ca.certificate_der(frame.certificate)
            except ca.CAError as e:
                self.log.info("authentication refused for {identity} from {peer}: "
                              "certificate: {reason}",
                              identity=frame.identity, peer=self.peer, reason=str(e))
                raise Fatal(E.AUTH_FAILED,
                            f"this relay admits only identities certified by its CA: {e}")
        elif frame.certificate:
            # Kept unchecked for the clients that check contacts against
            # their CA; they, not this relay, decide what it is worth.
            try:
                certificate = ca.certificate_der(frame.certificate)
            except ca.CAError:
                certificate = b""
        yield self.factory.ready()
        if self.state == "closed":
            return  # timed out or gone while the store opened: register nothing
        try:
            registered = yield self.factory.directory.claim(frame.identity, public_key,
                                                            certificate)
        except KeyConflict:
            self.log.warn(
                "authentication refused for {identity} from {peer}: "
                "a different key is registered for this identity",
                identity=frame.identity, peer=self.peer,
            )
            raise Fatal(
                E.KEY_CONFLICT,
                f"{frame.identity!r} is registered with another key on this relay",
            )
        if self.state == "closed":
            return
        self._cancelDeadline()
        self.identity = frame.identity
        # The directory's copy, when it is this very key (a rotation may have
        # committed meanwhile): sessions of one identity share the bytes.
        known = self.factory.directory.known_key(frame.identity)
        self.public_key = known if known == public_key else public_key
        self._fingerprint = keys.fingerprint(public_key)
        self.state = "ready"
        self._frames.set_limit(self.factory.max_envelope)
        queued = yield self.factory.store.count(frame.identity)
        if self.state == "closed":
            return
        self.log.info(
            "{identity} authenticated from {peer} ({how}); messages waiting: {queued}",
            identity=frame.identity, peer=self.peer, queued=queued,
            how="new identity registered" if registered else "known key",
        )
        self._write(wire.Welcome(registered, queued, self.factory.max_envelope,
                                 self.factory.ttl))
        if not frame.receive:
            return  # a sending session: the mailbox stays with whoever receives
        self.outbox = Outbox(frame.identity, self._push)
        previous = self.factory.mailboxes.attach(self.outbox)
        if previous is not None:
            for session in list(self.factory.sessions):
                if session.outbox is previous:
                    session.fatal(E.SUPERSEDED, "another session of this identity connected")

    def _send(self, frame: wire.Send):
        try:
            header = self._checkSender(frame.envelope)
        except Refused as refused:
            self._answer(self._refusal(refused))
            return self._roomForAnswers()
        fingerprint = self.factory.directory.known_fingerprint(header.recipient)
        if fingerprint is not None:
            self._store(header, fingerprint, frame.envelope)
            return self._roomForAnswers()
        # The recipient's key has to come from the store: the frames behind
        # this one wait, so the store is asked to commit in arrival order.

        def found(key: bytes | None):
            self._store(header, key and keys.fingerprint(key), frame.envelope)
            return self._roomForAnswers()

        return self.factory.directory.lookup(header.recipient).addCallback(found)

    def _checkSender(self, data: bytes) -> envelope.Header:
        """
        The envelope's header, once it is known to come from this session's
        identity and key and the sender is within its rate; L{Refused}
        otherwise.
        """
        try:
            h = envelope.read_header(data, self.factory.max_envelope)
        except envelope.EnvelopeError as e:
            raise Refused(E.BAD_ENVELOPE, b"", f"envelope is malformed: {e}")
        ref = h.message_id
        # Every send that can be read counts, whatever becomes of it: each
        # costs the relay a directory lookup or a commit.
        wait = self.factory.send_rate.take(self.identity)
        if wait:
            if not self._rateLogged:
                self._rateLogged = True
                self.log.info(
                    "{identity} sends faster than {rate:g} a second (--rate); refusing "
                    "the sends beyond", identity=self.identity, rate=self.factory.send_rate.rate,
                )
            raise Refused(
                E.RATE_LIMITED, ref,
                f"sending too fast: at most {self.factory.send_rate.rate:g} messages/s; "
                f"retry in {math.ceil(wait * 10) / 10:.1f} s",
            )
        if h.sender != self.identity:
            raise Refused(
                E.SENDER_MISMATCH, ref,
                f"envelope names sender {h.sender!r} but this session is {self.identity!r}",
            )
        if h.sender_fingerprint != self._fingerprint:
            raise Refused(E.SENDER_MISMATCH, ref, "envelope names another key of the sender")
        return h

    def _store(self, header: envelope.Header, recipient_fingerprint: bytes | None,
               data: bytes) -> None:
        """
        Hand the envelope to its recipient's mailbox, if it is sealed for the
        key the directory holds for the recipient, and queue the answer to
        the send: ACCEPTED once committed, or the refusal.
        """
        ref = header.message_id
        if recipient_fingerprint is None:
            self._answer(wire.Error(E.UNKNOWN_IDENTITY, ref,
                                    f"no identity {header.recipient!r} on this relay"))
            return
        if recipient_fingerprint != header.recipient_fingerprint:
            self._answer(wire.Error(
                E.RECIPIENT_KEY_MISMATCH, ref,
                f"envelope is sealed for a key of {header.recipient!r} that is not the one "
                f"registered",
            ))
            return
        d = self.factory.mailboxes.accept(header.recipient, header.sender, ref, data)
        # One callback pair settles the answer: this runs once per message.
        slot = self._slot()
        d.addCallbacks(self._settleAccepted, self._notAccepted,
                       callbackArgs=(header, slot), errbackArgs=(header, slot))

    def _settleAccepted(self, new: bool, header, slot: list) -> None:
        self._settle(self._accepted(new, header), slot)

    def _accepted(self, new: bool, header) -> wire.Frame | None:
        """The answer to a send once committed (new, or a retry of a stored one)."""
        if new:
            self.accepted += 1
        return wire.Accepted(header.message_id)

    def _notAccepted(self, failure, header, slot: list) -> None:
        """
        The answer to a send the store refused.  A quota's refusal tells
        the sender which limit, never how much the mailbox holds (that would
        show one sender what the others send the recipient); the figures go
        to the log, once a session.
        """
        ref = header.message_id
        if failure.check(SenderQuotaFull):
            self._logQuota(header, failure.value)
            refusal = wire.Error(
                E.SENDER_QUOTA, ref,
                f"your messages to {header.recipient!r} are at the relay's cap "
                f"({failure.value}); retry once some are delivered")
        elif failure.check(MailboxFull):
            self._logQuota(header, failure.value)
            refusal = wire.Error(E.MAILBOX_FULL, ref,
                                 f"mailbox of {header.recipient!r} is full; retry later")
        elif failure.check(DuplicateId):
            refusal = wire.Error(E.DUPLICATE_ID, ref,
                                 "message id already used for another message")
        else:
            self.log.failure("store failed to accept a message for {recipient}", failure,
                             recipient=header.recipient)
            refusal = wire.Error(E.STORE_FAILED, ref,
                                 "the relay could not store the message; retry")
        self._settle(refusal, slot)

    def _logQuota(self, header, refusal) -> None:
        if not self._quotaLogged:
            self._quotaLogged = True
            self.log.info(
                "refusing messages from {sender!r} to {recipient!r}: {detail}; not logged "
                "again for this session", sender=header.sender,
                recipient=header.recipient, detail=refusal.detail,
            )

    def _ack(self, frame: wire.Ack):
        if self.outbox is None or frame.message_id not in self.outbox.in_flight:
            self._answer(wire.Error(
                E.UNKNOWN_MESSAGE, frame.message_id,
                "no delivered, unacknowledged message has this id",
            ))
            return self._roomForAnswers()
        # The delete commits in the background (sharing commits with other
        # writes); should it fail, the message stays stored and comes again
        # next session.
        d = self.factory.mailboxes.acknowledge(self.outbox, frame.message_id)
        d.addErrback(self._deleteFailed, frame.message_id)
        return None

    def _deleteFailed(self, failure, message_id: bytes) -> None:
        self.log.failure("deleting acknowledged message {id} of {identity} failed", failure,
                         id=message_id.hex(), identity=self.identity)

    def _lookup(self, frame: wire.Lookup):
        directory = self.factory.directory

        @inlineCallbacks
        def answer():
            key = yield directory.lookup(frame.identity)
            if key is None:
                raise Refused(
                    E.UNKNOWN_IDENTITY, frame.identity.encode("ascii"),
                    f"no identity {frame.identity!r} on this relay",
                )
            certificate = yield directory.certificate(frame.identity)
            rotations = yield directory.rotations(frame.identity)
            return wire.Key(frame.identity, key, certificate, _chain(rotations))

        self._answer(answer())
        return self._roomForAnswers()

    @inlineCallbacks
    def _rotate(self, frame: wire.Rotate):
        """
        Replace this session's key, if its current key signed the rotation
        and the new key did too (and, in CA mode, the CA certified the new
        key).  Contacts that pinned the old key follow the signed chain.
        """
        def refuse(why: str):
            self.log.info("key rotation of {identity} refused: {why}",
                          identity=self.identity, why=why)
            return Refused(E.ROTATION_REFUSED, b"", f"key rotation refused: {why}")

        if frame.timestamp > envelope.MAX_TIME_SEQ:
            # Kept as a signed 64-bit number, as every time is.
            raise refuse(f"its time {frame.timestamp} is out of range (under 2^63 seconds)")
        try:
            new = keys.load_public_der(frame.new_key)
        except keys.BadKey as e:
            raise refuse(str(e))
        new_der = keys.public_der(new)
        if new_der == self.public_key:
            raise refuse("the new key is the current one")
        statement = wire.rotation_statement(self.identity, self.public_key, new_der,
                                            frame.timestamp)
        old = keys.load_public_der(self.public_key)
        if not keys.verify(old, frame.old_signature, statement):
            raise refuse("the current key did not sign it")
        if not keys.verify(new, frame.new_signature, statement):
            raise refuse("the new key did not sign it")
        certificate = b""
        if self.factory.ca_roots:
            try:
                ca.verify_identity(frame.certificate, self.factory.ca_roots, self.identity,
                                   new_der)
                certificate = ca.certificate_der(frame.certificate)
            except ca.CAError as e:
                raise refuse(f"this relay needs a certificate from its CA for the new key: {e}")
        old_certificate = yield self.factory.directory.certificate(self.identity)
        # Both signatures are kept and served: a contact trusts the old key
        # on the new key's word, and the new key on the old key's.
        rotation = wire.Rotation(self.public_key, new_der, frame.timestamp, frame.old_signature,
                                 frame.new_signature, old_certificate)
        done = yield self.factory.directory.rotate(self.identity, rotation, certificate)
        if not done:
            raise refuse("this session's key is no longer the registered one")
        self.log.info("{identity} rotated its key to {fingerprint}", identity=self.identity,
                      fingerprint=keys.key_fingerprint(new))
        old_der = self.public_key
        for session in list(self.factory.sessions):
            # The old key is retired: none of its sessions goes on (it may be
            # the reason for the rotation), and none keeps the mailbox.
            if session is not self and session.identity == self.identity \
                    and session.public_key == old_der:
                session.fatal(E.SUPERSEDED, "this identity rotated its key; reconnect with "
                                            "the new one")
        self.public_key = new_der
        self._fingerprint = keys.fingerprint(new_der)
        rotations = yield self.factory.directory.rotations(self.identity)
        return wire.Key(self.identity, new_der, certificate, _chain(rotations))

    def _push(self, message: StoredMessage) -> None:
        if message.kind == KIND_MESSAGE:
            self.transport.write(wire.encode_deliver(message.message_id, message.envelope))
        else:
            self._write(message.frame())

    # Timers

    def _authDeadline(self) -> None:
        self._deadline = None
        if self.state == "handshake":
            self.fatal(E.AUTH_TIMEOUT, "no valid authentication in time")

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def timeoutConnection(self) -> None:
        self.fatal(E.IDLE_TIMEOUT,
                   f"nothing received for {self.factory.idle_timeout:g} seconds")

    # IPushProducer: the transport tells us when its buffer is full.

    def pauseProducing(self) -> None:
        # Stop adding to the write buffer: no more deliveries, and no more
        # requests handled (their answers would pile up unread too).  Bytes
        # still arrive until the read-ahead limit stops reading; reading is
        # not stopped here, since a TLS layer pauses us during its handshake
        # and needs to read to finish it.
        self._outputPaused = True
        if self.outbox is not None:
            self.factory.mailboxes.pause(self.outbox)

    def resumeProducing(self) -> None:
        self._outputPaused = False
        if self.outbox is not None and self.state == "ready":
            self.factory.mailboxes.resume(self.outbox)
        self._drain()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.state = "closed"
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        self._closer = None
        self._cancelDeadline()
        self._stopFrameDeadline()
        self.setTimeout(None)
        self.factory.sessions.discard(self)
        self.factory.sessionEnded(self)
        if self.outbox is not None:
            self.factory.mailboxes.detach(self.outbox)
            self.log.info(
                "session of {identity} ended: accepted {accepted}, delivered {delivered}, "
                "acknowledged {acked}",
                identity=self.identity, accepted=self.accepted,
                delivered=self.outbox.delivered, acked=self.outbox.acknowledged,
            )
        else:
            self.log.info("connection from {peer} closed", peer=self.peer)


def _chain(rotations) -> tuple:
    """The latest rotations, as a KEY frame carries them."""
    return tuple(rotations[-wire.MAX_ROTATIONS:])


class RelayFactory(Factory):
    """
    Shared state of the relay's sessions: configuration, the store, the
    directory, the mailboxes, the connection counts and the senders' token
    buckets.  C{clock} is the reactor (or a L{task.Clock} in tests).
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        store: MailboxStore,
        clock,
        name: str = "mailrelay",
        max_envelope: int = wire.MAX_ENVELOPE,
        window: int = DEFAULT_WINDOW,
        auth_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_per_peer: int = DEFAULT_MAX_PER_PEER,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        ca_roots=None,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.store = store
        self.clock = clock
        # Told to clients in WELCOME (whole seconds, at most a u32): how long
        # a contact's retired key may still sign what they receive.
        self.ttl = min(int(ttl), 0xFFFFFFFF)
        # CA mode: identities register only with a certificate from one of
        # these roots (x509 certificates); None admits any key on first use.
        self.ca_roots = ca_roots
        self.name = name
        self.max_envelope = max_envelope
        self.auth_timeout = auth_timeout
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_per_peer = max_per_peer
        self.max_sessions = max_sessions
        self.directory = Directory(store, clock)
        self.mailboxes = Mailboxes(store, clock, window)
        self.send_rate = SendRate(clock, rate, burst)
        self.sessions: set[RelaySession] = set()
        self.connections = 0
        self.per_peer: dict[str, int] = {}
        self._refusal_logged: dict[str, float] = {}
        self._full_logged: float | None = None
        self._ready = False
        self._waiting: list[Deferred] = []

    def buildProtocol(self, addr) -> RelaySession | BusyRefusal:
        """
        A session for a new connection; or, when its address already has
        C{max_per_peer} connections open (one host cannot take every
        connection) or the relay C{max_sessions} in all, a L{BusyRefusal}
        that tells the peer so and closes.  Sessions already open go on.
        """
        host = getattr(addr, "host", None)
        if host is not None and self.max_per_peer:
            open_now = self.per_peer.get(host, 0)
            if open_now >= self.max_per_peer:
                # At most one line a minute per host: the entry goes once the
                # host's last connection ends, so there is one per such host.
                now = self.clock.seconds()
                last = self._refusal_logged.get(host, -REFUSAL_LOG_INTERVAL)
                if now - last >= REFUSAL_LOG_INTERVAL:
                    self._refusal_logged[host] = now
                    self.log.warn(
                        "refusing connections from {host}: {count} already open "
                        "(--max-per-peer)", host=host, count=open_now,
                    )
                return BusyRefusal(
                    self.clock, f"too many connections from your address ({self.max_per_peer})"
                )
        if self.max_sessions and self.connections >= self.max_sessions:
            # At most one line a minute in all: a crowd of addresses could
            # otherwise write a line each, and need an entry each.
            now = self.clock.seconds()
            if self._full_logged is None or now - self._full_logged >= REFUSAL_LOG_INTERVAL:
                self._full_logged = now
                self.log.warn(
                    "refusing connections (from {host} and any other): {count} open, "
                    "the limit (--max-sessions)", host=host or "?", count=self.connections,
                )
            return BusyRefusal(
                self.clock,
                f"this relay is at its limit of {self.max_sessions} connections; "
                f"try again later",
            )
        if host is not None and self.max_per_peer:
            self.per_peer[host] = self.per_peer.get(host, 0) + 1
        self.connections += 1
        session = RelaySession(self)
        session.host = host
        return session

    def sessionEnded(self, session: RelaySession) -> None:
        self.connections -= 1
        host = getattr(session, "host", None)
        if host is not None and host in self.per_peer:
            self.per_peer[host] -= 1
            if self.per_peer[host] <= 0:
                del self.per_peer[host]
                self._refusal_logged.pop(host, None)

    def storeReady(self) -> None:
        """The store is open: sessions waiting for it go on."""
        self._ready = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def ready(self) -> Deferred[None]:
        if self._ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d
