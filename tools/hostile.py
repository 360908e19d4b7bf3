#!/usr/bin/env python3
"""
Hostile peers against a real relay: `make hostile-test`.

Starts `twistd mailrelay` (SQLite store in a temporary directory) on an
ephemeral loopback port with short deadlines, and attacks it, all at once,
for a bounded window, while one well-behaved sender/recipient pair (the
reference client) exchanges messages throughout:

  slowloris  200 connections trickling a partial frame, one byte a second:
             half before authenticating (cut by --auth-timeout), half after
             (cut by --frame-timeout, which the trickle does not extend);
             each opens again once cut
  oversize   connections announcing a 4 GiB frame (0xFFFFFFFF), before and
             after authenticating: refused at once as malformed
  crowd      waves of three times --max-per-peer connections from one
             address: those beyond the limit must be answered BUSY
  flood      one identity, over two sessions, sending twenty times its
             --rate: the sends beyond the rate must be refused RATE_LIMITED
  stall      a recipient that authenticates to receive, then never reads its
             socket, while a sender fills its mailbox with 16 KiB messages:
             the relay must push no more than the window, and close it idle
  full       once the window ends, more connections than --max-sessions from
             many addresses: those beyond must be answered BUSY

Each attack comes from its own loopback addresses (127.x.y.z), so that
--max-per-peer applies to it as to a separate host, and the pair is never
refused because of the attackers' count.

It prints the relay's RSS (VmRSS) at baseline, peak and end; how each attack
ended (error codes, time until cut); and the pair's deliveries and latency.
Exit status 1 if the pair stalls (a message takes more than STALL seconds)
or loses a message, if any attack was not cut as it should be, if the relay
died, or if its peak RSS exceeds the baseline by more than RSS_BOUND.

RSS_BOUND is 64 MiB.  What the attacks may legitimately make the relay hold
is far less: about 230 connections at once (each session a few KiB of
objects; a trickled frame is at most a few bytes), two flooding sessions
read at most one frame plus 64 KiB ahead each (2 x 320 KiB), the stalled
recipient at most its window of 64 x 16 KiB deliveries (1 MiB, twice while
they are copied out of the store), and SQLite's page cache (2 MiB): under
16 MiB.  Four times that leaves room for the allocator and for Python not
returning memory, and still fails any leak per connection or per message
over the thousands of each a run makes.

Bounded: `--quick` (for CI) attacks for 10 s and runs in under 30 s; the
full run attacks for 50 s and runs in under 90 s.  Loopback only.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from mailrelay.client.contacts import MemoryContacts
from mailrelay import envelope, keys, wire  # noqa: E402
from mailrelay.client.protocol import connect  # noqa: E402
from mailrelay.relay.protocol import BUSY_GRACE  # noqa: E402
from tests.processes import BIN, LineReader, Relay, environment  # noqa: E402

E = wire.ErrorCode
MiB = 1024 * 1024

RSS_BOUND = 64 * MiB
STALL = 5.0
"""Seconds within which each of the pair's messages must be delivered."""

CUT_SLACK = 1.5
"""Seconds a cut may come after its deadline (timer granularity, scheduling)."""

KEY_BITS = 2048

FRAME_TIMEOUT = 5.0
AUTH_TIMEOUT = 3.0
MAX_PER_PEER = 16
MAX_SESSIONS = 300
RATE = 50
BURST = 100
WINDOW = 64
QUOTA_BYTES = 4 * MiB

LORISES = 200
LORIS_ADDRESSES = 20
PAIR_RATE = 20
"""Messages a second the well-behaved sender sends (well under RATE)."""

FLOOD_FACTOR = 20
"""How many times RATE the flooding identity tries to send."""

FILLER_SIZE = 16 * 1024

PAIR_SENDER, PAIR_RECIPIENT = "127.0.0.2", "127.0.0.3"
REGISTRAR = "127.0.0.10"
CROWD = "127.0.0.66"
FLOOD = "127.0.0.67"
STALLED = "127.0.0.68"
FILLER = "127.0.0.69"


@dataclass(frozen=True)
class Plan:
    window: float
    """Seconds the attacks run."""
    idle_timeout: float
    oversize_every: float
    filler_messages: int


QUICK = Plan(window=10.0, idle_timeout=7.0, oversize_every=0.2, filler_messages=300)
FULL = Plan(window=50.0, idle_timeout=12.0, oversize_every=0.1, filler_messages=400)


def now() -> float:
    return time.monotonic()


def rss(pid: int) -> int:
    """The resident set size of process C{pid}, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def mib(size: float) -> str:
    return f"{size / MiB:.1f} MiB"


def sleep(reactor, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def _die_with_parent() -> None:
    """In the relay's process: be sent SIGTERM if this script dies, however."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class HostileRelay(Relay):
    """L{Relay}, whose process also ends if this script is killed outright."""

    def start(self, port: int = 0) -> Relay:
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "mailrelay",
             "--port", self.listen.format(port=port), "--data", str(self.data), *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
            cwd=self.data.parent, preexec_fn=_die_with_parent,
        )
        self.log = LineReader(self.process.stdout)
        self.port = int(self.log.wait_for(r"mailrelay listening on 127\.0\.0\.1:(\d+)").group(1))
        self.log.wait_for(r"store open")
        return self


# Raw peers: the wire protocol spoken by hand, so they can misbehave.


class Peer(Protocol):
    """
    One connection to the relay.  Authenticates as C{identity} if given;
    records the fatal error the relay ends it with, and when it ends.
    """

    kind = "peer"

    def __init__(self, identity: keys.Identity | None = None, receive: bool = False) -> None:
        self.identity = identity
        self.receive = receive
        self.frames = wire.FrameBuffer(wire.LARGEST_ENVELOPE)
        self.opened_at: float | None = None
        self.closed_at: float | None = None
        self.hello: wire.Hello | None = None
        self.welcomed_at: float | None = None
        self.fatal: wire.Error | None = None
        self.trouble: str | None = None
        self.abandoned = False
        self.closed: defer.Deferred = defer.Deferred()

    @property
    def done(self) -> bool:
        return self.closed.called

    @property
    def code(self) -> str:
        """How it ended, for the report."""
        if self.abandoned:
            return "NOT CUT"
        if self.trouble is not None:
            return "TROUBLE"
        if self.fatal is not None:
            return self.fatal.code.name
        return "open" if not self.done else "closed without error"

    def write(self, frame: wire.Frame) -> None:
        self.transport.write(wire.encode(frame))

    def connectionMade(self) -> None:
        self.opened_at = now()
        self.onConnect()

    def dataReceived(self, data: bytes) -> None:
        self.frames.add(data)
        while self.closed_at is None:
            try:
                frame = self.frames.next()
            except wire.ProtocolError as e:
                self.trouble = f"relay sent a malformed frame: {e}"
                self.transport.abortConnection()
                return
            if frame is None:
                return
            self.handle(frame)

    def handle(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Hello):
            self.hello = frame
            if self.identity is not None:
                transcript = wire.auth_transcript(frame.challenge, frame.relay,
                                                  self.identity.name, self.receive)
                self.write(wire.Auth(wire.PROTOCOL_VERSION, self.identity.name,
                                     self.identity.public_der, self.identity.sign(transcript),
                                     self.receive))
            self.onHello()
        elif isinstance(frame, wire.Welcome):
            self.welcomed_at = now()
            self.onWelcome(frame)
        elif isinstance(frame, wire.Error) and frame.fatal:
            self.fatal = frame
        else:
            self.onFrame(frame)

    def connectionLost(self, reason) -> None:
        self.closed_at = now()
        self.onEnd()
        self.closed.callback(self)

    def cannotConnect(self, failure) -> None:
        self.trouble = f"could not connect: {failure.getErrorMessage()}"
        self.closed_at = now()
        self.closed.callback(self)

    # What subclasses do.

    def onConnect(self) -> None:
        pass

    def onHello(self) -> None:
        pass

    def onWelcome(self, frame: wire.Welcome) -> None:
        pass

    def onFrame(self, frame: wire.Frame) -> None:
        pass

    def onEnd(self) -> None:
        pass


class Registrar(Peer):
    """Registers its identity's key, and leaves."""

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.transport.loseConnection()


class Loris(Peer):
    """
    Trickles one frame, one byte a second, never finishing it: an AUTH
    before authenticating, or (given an identity) a SEND after.
    """

    def __init__(self, identity: keys.Identity | None = None) -> None:
        super().__init__(identity)
        self.kind = "slowloris, after auth" if identity else "slowloris, handshake"
        kind, size = (wire.Send.TYPE, 100_000) if identity else (wire.Auth.TYPE, 4_000)
        self.payload = wire.LENGTH_PREFIX.pack(size) + bytes([kind]) + b"\x00" * 64
        self.sent = 0
        self.first_byte_at: float | None = None
        self.drip: task.LoopingCall | None = None

    def onHello(self) -> None:
        if self.identity is None:
            self.trickle()

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.trickle()

    def trickle(self) -> None:
        self.first_byte_at = now()
        self.drip = task.LoopingCall(self.oneByte)
        self.drip.start(1.0)

    def oneByte(self) -> None:
        if self.sent < len(self.payload):
            self.transport.write(self.payload[self.sent:self.sent + 1])
            self.sent += 1

    def onEnd(self) -> None:
        if self.drip is not None and self.drip.running:
            self.drip.stop()

    @property
    def cut_after(self) -> float | None:
        """Seconds from what the relay's deadline counts from, to the cut."""
        if self.closed_at is None:
            return None
        start = self.first_byte_at if self.identity else self.opened_at
        return None if start is None else self.closed_at - start


class Oversize(Peer):
    """Announces a frame of 4 GiB - 1 bytes: before authenticating, or after."""

    PREFIX = b"\xff\xff\xff\xff"

    def __init__(self, identity: keys.Identity | None = None) -> None:
        super().__init__(identity)
        self.kind = "oversize, after auth" if identity else "oversize, handshake"
        self.sent_at: float | None = None

    def onConnect(self) -> None:
        if self.identity is None:
            self.announce()

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.announce()

    def announce(self) -> None:
        self.sent_at = now()
        self.transport.write(self.PREFIX)

    @property
    def cut_after(self) -> float | None:
        if self.closed_at is None or self.sent_at is None:
            return None
        return self.closed_at - self.sent_at


class Idle(Peer):
    """Connects and says nothing: admitted (then cut at the auth deadline) or BUSY."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    @property
    def admitted(self) -> bool:
        return self.hello is not None

    @property
    def cut_after(self) -> float | None:
        if self.closed_at is None or self.opened_at is None:
            return None
        return self.closed_at - self.opened_at


class FloodStats:
    def __init__(self) -> None:
        self.sent = 0
        self.accepted = 0
        self.limited = 0
        self.other: collections.Counter[str] = collections.Counter()
        self.bad_answers: list[str] = []
        self.first_sent_at: float | None = None
        self.last_answer_at: float | None = None


class Flooder(Peer):
    """
    Sends pre-sealed envelopes as fast as it is told to, pipelined, and
    checks each answer: ACCEPTED, or RATE_LIMITED naming that message.
    """

    TICK = 0.02
    AHEAD = 64

    def __init__(self, run: Run, identity: keys.Identity, pool: list[tuple[bytes, bytes]],
                 per_second: float, stats: FloodStats) -> None:
        super().__init__(identity)
        self.kind = "flood"
        self.run = run
        self.pool = pool
        self.per_tick = max(1, round(per_second * self.TICK))
        self.stats = stats
        self.next = 0
        self.outstanding: collections.deque[bytes] = collections.deque()
        self.pump: task.LoopingCall | None = None

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.pump = task.LoopingCall(self.tick)
        self.pump.start(self.TICK)

    def tick(self) -> None:
        if not self.run.attacking:
            self.pump.stop()
            self.finish()
            return
        for _ in range(self.per_tick):
            if len(self.outstanding) >= self.AHEAD:
                break
            message_id, sealed = self.pool[self.next % len(self.pool)]
            self.next += 1
            self.outstanding.append(message_id)
            if self.stats.first_sent_at is None:
                self.stats.first_sent_at = now()
            self.stats.sent += 1
            self.write(wire.Send(sealed))

    def onFrame(self, frame: wire.Frame) -> None:
        if not isinstance(frame, (wire.Accepted, wire.Error)):
            return
        expected = self.outstanding.popleft() if self.outstanding else None
        self.stats.last_answer_at = now()
        if isinstance(frame, wire.Accepted):
            self.stats.accepted += 1
            if frame.message_id != expected:
                self.stats.bad_answers.append("ACCEPTED out of order")
        elif frame.code == E.RATE_LIMITED:
            self.stats.limited += 1
            if frame.ref != expected:
                self.stats.bad_answers.append("RATE_LIMITED naming another message")
            if not re.fullmatch(rf"sending too fast: at most {RATE} messages/s; "
                                r"retry in \d+\.\d s", frame.text):
                self.stats.bad_answers.append(f"RATE_LIMITED saying {frame.text!r}")
        else:
            self.stats.other[frame.code.name] += 1
        self.finish()

    def finish(self) -> None:
        if not self.run.attacking and not self.outstanding and self.closed_at is None:
            self.transport.loseConnection()


class Stalled(Peer):
    """Authenticates to receive, then stops reading its socket until told to drain."""

    def __init__(self, identity: keys.Identity) -> None:
        super().__init__(identity, receive=True)
        self.kind = "stall"
        self.read_before = 0
        self.delivered = 0
        self.draining = False

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.transport.pauseProducing()

    def onFrame(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Deliver):
            self.delivered += 1
            if not self.draining:
                self.read_before += 1

    def drain(self) -> None:
        self.draining = True
        if self.closed_at is None:
            self.transport.resumeProducing()


class Filler(Peer):
    """Fills a mailbox with 16 KiB messages; waits when told to, stops once it is full."""

    AHEAD = 16

    def __init__(self, run: Run, identity: keys.Identity,
                 pool: list[tuple[bytes, bytes]]) -> None:
        super().__init__(identity)
        self.kind = "stall (filler)"
        self.run = run
        self.queue = collections.deque(pool)
        self.outstanding: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.accepted = 0
        self.limited = 0
        self.other_errors: collections.Counter[str] = collections.Counter()
        self.full = False
        self.resume_at = 0.0
        self.pump: task.LoopingCall | None = None

    def onWelcome(self, frame: wire.Welcome) -> None:
        self.pump = task.LoopingCall(self.tick)
        self.pump.start(0.02)

    def tick(self) -> None:
        finished = self.full or not self.run.attacking or not (self.queue or self.outstanding)
        if finished:
            self.pump.stop()
            if not self.outstanding:
                self.transport.loseConnection()
            return
        while self.queue and len(self.outstanding) < self.AHEAD and now() >= self.resume_at:
            item = self.queue.popleft()
            self.outstanding.append(item)
            self.write(wire.Send(item[1]))

    def onFrame(self, frame: wire.Frame) -> None:
        if not isinstance(frame, (wire.Accepted, wire.Error)) or not self.outstanding:
            return
        item = self.outstanding.popleft()
        if isinstance(frame, wire.Accepted):
            self.accepted += 1
        elif frame.code == E.RATE_LIMITED:
            # As a client should: that one again, after the wait said.
            self.limited += 1
            self.queue.appendleft(item)
            wait = re.search(r"retry in (\d+(?:\.\d+)?) s", frame.text)
            self.resume_at = max(self.resume_at, now() + float(wait.group(1) if wait else 1))
        elif frame.code == E.MAILBOX_FULL:
            self.full = True
        else:
            self.other_errors[frame.code.name] += 1
        if (self.full or not self.run.attacking) and not self.outstanding:
            self.transport.loseConnection()


class Pair:
    """
    The well-behaved sender and recipient, on the reference client: the
    sender sends PAIR_RATE messages a second (at most a few unanswered), the
    recipient times each from its send to its arrival.
    """

    AHEAD = 4

    def __init__(self, run: Run, sender: keys.Identity, recipient: keys.Identity) -> None:
        self.run = run
        self.sender_identity = sender
        self.recipient_identity = recipient
        self.sent_at: dict[int, float] = {}
        self.accepted: set[int] = set()
        self.delivered: dict[int, float] = {}
        self.failures: list[str] = []
        self.arrivals: list[float] = []
        self.unanswered = 0
        self.next = 0
        self.sending = False

    @defer.inlineCallbacks
    def start(self):
        self.recipient = yield connect(
            self.run.reactor, self.run.endpoint(PAIR_RECIPIENT), self.recipient_identity,
            contacts=MemoryContacts(), on_message=self.received, timeout=10,
        )
        self.sender = yield connect(
            self.run.reactor, self.run.endpoint(PAIR_SENDER), self.sender_identity,
            contacts=MemoryContacts(), timeout=10,
        )
        self.sending = True
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(1 / PAIR_RATE)

    def tick(self) -> None:
        if not self.sending or self.unanswered >= self.AHEAD:
            return
        seq = self.next
        self.next += 1
        self.unanswered += 1
        self.sent_at[seq] = now()
        d = self.sender.send(self.recipient_identity.name, b"%d" % seq)
        d.addCallbacks(self.wasAccepted, self.notAccepted, callbackArgs=(seq,),
                       errbackArgs=(seq,))

    def wasAccepted(self, message_id: bytes, seq: int) -> None:
        self.unanswered -= 1
        self.accepted.add(seq)

    def notAccepted(self, failure, seq: int) -> None:
        self.unanswered -= 1
        self.failures.append(f"message {seq} not accepted: {failure.getErrorMessage()}")

    def received(self, opened) -> None:
        seq = int(opened.plaintext)
        self.arrivals.append(now())
        if seq in self.delivered:
            self.failures.append(f"message {seq} delivered twice")
        self.delivered[seq] = now() - self.sent_at[seq]

    @defer.inlineCallbacks
    def finish(self, wait: float):
        """Stop sending; wait (at most C{wait} s) for what was sent to arrive."""
        self.sending = False
        self.loop.stop()
        deadline = now() + wait
        while now() < deadline and (self.unanswered or set(self.sent_at) - set(self.delivered)):
            yield sleep(self.run.reactor, 0.1)
        for client in (self.sender, self.recipient):
            yield client.close()

    def latencies(self, since: float | None = None, until: float | None = None) -> list[float]:
        return [latency for seq, latency in self.delivered.items()
                if (since is None or self.sent_at[seq] >= since)
                and (until is None or self.sent_at[seq] < until)]


class Run:
    """The whole attack, on one reactor; L{main} fills in what L{report} judges."""

    def __init__(self, reactor, relay: Relay, plan: Plan, ids: dict[str, keys.Identity]) -> None:
        self.reactor = reactor
        self.relay = relay
        self.pid = relay.process.pid
        self.plan = plan
        self.ids = ids
        self.attacking = False
        self.peers: list[Peer] = []
        self.waves: list[list[Idle]] = []
        self.full: list[Idle] = []
        self.flood = FloodStats()
        self.pair = Pair(self, ids["alice"], ids["bob"])
        self.baseline = self.peak = self.end = 0
        self.attack_started = self.attack_ended = 0.0
        self.finished = False

    def endpoint(self, source: str) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.relay.port, timeout=10,
                                  bindAddress=(source, 0))

    def launch(self, peer: Peer, source: str) -> Peer:
        self.peers.append(peer)
        connectProtocol(self.endpoint(source), peer).addErrback(peer.cannotConnect)
        return peer

    def sample(self) -> None:
        self.peak = max(self.peak, rss(self.pid))

    @defer.inlineCallbacks
    def main(self):
        reactor = self.reactor
        # Every identity registered first, so no attack waits on another.
        registrars = [Registrar(self.ids[name])
                      for name in ("mallory", "flooder", "sink", "filler", "dumb")]
        for peer in registrars:
            connectProtocol(self.endpoint(REGISTRAR), peer).addErrback(peer.cannotConnect)
        yield defer.DeferredList([p.closed for p in registrars])
        for peer in registrars:
            if peer.welcomed_at is None:
                raise RuntimeError(f"could not register {peer.identity.name}: {peer.code}")
        self.prepare()
        yield self.pair.start()
        yield sleep(reactor, 1.5)
        self.baseline = rss(self.pid)
        self.peak = self.baseline
        sampler = task.LoopingCall(self.sample)
        sampler.start(0.2)

        self.attacking = True
        self.attack_started = now()
        for n in range(LORISES):
            self.lorisSlot(n)
        oversize = task.LoopingCall(self.oversize)
        oversize.start(self.plan.oversize_every)
        crowd = task.LoopingCall(self.crowdWave)
        crowd.start(AUTH_TIMEOUT + 1.5)
        per_session = FLOOD_FACTOR * RATE / 2
        for _ in range(2):
            self.launch(Flooder(self, self.ids["flooder"], self.flood_pool, per_session,
                                self.flood), FLOOD)
        self.stalled = self.launch(Stalled(self.ids["dumb"]), STALLED)
        self.filler = self.launch(Filler(self, self.ids["filler"], self.filler_pool), FILLER)
        # Drained well after the relay's idle timer fired for it, and well
        # before its closing grace (30 s) would cut what it still holds.
        drain_at = self.plan.idle_timeout + 2
        reactor.callLater(drain_at, self.stalled.drain)

        yield sleep(reactor, self.plan.window)
        self.attacking = False
        self.attack_ended = now()
        oversize.stop()
        crowd.stop()
        yield self.fillUp()
        yield self.settle(max(FRAME_TIMEOUT, AUTH_TIMEOUT) + CUT_SLACK + 1,
                          self.attack_started + drain_at + 3)
        yield self.pair.finish(STALL + 5)
        sampler.stop()
        yield sleep(reactor, 1.0)
        self.end = rss(self.pid)
        self.finished = True

    def prepare(self) -> None:
        """Seal what the flood and the filler send ahead of time: the relay is what is timed."""
        sink, dumb = self.ids["sink"], self.ids["dumb"]
        self.flood_pool = []
        for n in range(300):
            message_id = os.urandom(wire.MESSAGE_ID_SIZE)
            self.flood_pool.append((message_id, envelope.seal(
                self.ids["flooder"], sink.name, sink.public_key, b"flood %d" % n, message_id)))
        self.filler_pool = []
        for n in range(self.plan.filler_messages):
            message_id = os.urandom(wire.MESSAGE_ID_SIZE)
            self.filler_pool.append((message_id, envelope.seal(
                self.ids["filler"], dumb.name, dumb.public_key, os.urandom(FILLER_SIZE),
                message_id)))

    @defer.inlineCallbacks
    def lorisSlot(self, n: int):
        source = f"127.0.1.{n % LORIS_ADDRESSES + 1}"
        identity = self.ids["mallory"] if n % 2 else None
        yield sleep(self.reactor, n * 0.005)  # not all in one SYN burst
        while self.attacking:
            peer = self.launch(Loris(identity), source)
            yield peer.closed
            yield sleep(self.reactor, 0.2)

    def oversize(self) -> None:
        self.oversizes = getattr(self, "oversizes", 0) + 1
        identity = self.ids["mallory"] if self.oversizes % 5 == 0 else None
        self.launch(Oversize(identity), f"127.0.2.{self.oversizes % 10 + 1}")

    def crowdWave(self) -> None:
        self.waves.append([self.launch(Idle("crowd"), CROWD) for _ in range(3 * MAX_PER_PEER)])

    @defer.inlineCallbacks
    def fillUp(self):
        """More connections than --max-sessions, from many addresses."""
        total = MAX_SESSIONS + 20
        addresses = -(-total // MAX_PER_PEER)
        for n in range(total):
            self.full.append(self.launch(Idle("full"), f"127.0.4.{n % addresses + 1}"))
            if n % 20 == 19:
                yield sleep(self.reactor, 0.05)

    @defer.inlineCallbacks
    def settle(self, grace: float, not_before: float):
        """Wait until every attacker is closed, or the cuts are overdue."""
        deadline = max(now() + grace, not_before)
        while now() < deadline and not all(p.done for p in self.peers):
            yield sleep(self.reactor, 0.1)
        for peer in self.peers:
            if not peer.done:
                peer.abandoned = True
                peer.transport.abortConnection()

    # The report.

    def report(self) -> list[str]:
        """Print what happened; the failures, if any."""
        failures: list[str] = []
        print()
        print(f"relay RSS: baseline {mib(self.baseline)}, peak {mib(self.peak)} "
              f"(+{mib(self.peak - self.baseline)}; bound +{mib(RSS_BOUND)}), "
              f"end {mib(self.end)}")
        if self.peak - self.baseline > RSS_BOUND:
            failures.append(f"the relay's RSS grew by {mib(self.peak - self.baseline)}, "
                            f"more than {mib(RSS_BOUND)}")
        print()
        print(f"{'attack':24} {'conns':>6}  {'ended with':42} time until cut")
        failures += self.reportLorises()
        failures += self.reportOversize()
        failures += self.reportCrowd(self.waves, "crowd",
                                     f"too many connections from your address ({MAX_PER_PEER})")
        failures += self.reportCrowd([self.full], "full",
                                     f"this relay is at its limit of {MAX_SESSIONS} "
                                     f"connections; try again later")
        failures += self.reportFlood()
        failures += self.reportStall()
        print()
        failures += self.reportPair()
        return failures

    def line(self, kind: str, peers: list, codes: collections.Counter, times: list[float],
             note: str = "") -> None:
        ended = ", ".join(f"{count} {code}" for code, count in codes.most_common())
        cut = (f"p50 {percentile(times, 50):.2f} s, max {max(times):.2f} s" if times else "-")
        print(f"{kind:24} {len(peers):6}  {ended:42} {cut}{note}")

    def reportLorises(self) -> list[str]:
        failures = []
        for kind, code, deadline in [
            ("slowloris, handshake", "AUTH_TIMEOUT", AUTH_TIMEOUT),
            ("slowloris, after auth", "FRAME_TIMEOUT", FRAME_TIMEOUT),
        ]:
            peers = [p for p in self.peers if p.kind == kind]
            codes = collections.Counter(p.code for p in peers)
            cut = [p for p in peers if p.code == code]
            times = [p.cut_after for p in cut if p.cut_after is not None]
            self.line(kind, peers, codes, times)
            if not cut:
                failures.append(f"{kind}: none was cut with {code}")
            late = [t for t in times if t > deadline + CUT_SLACK]
            early = [t for t in times if t < deadline - 0.5]
            if late or early:
                failures.append(f"{kind}: {len(late)} cut late, {len(early)} cut early "
                                f"(deadline {deadline:g} s)")
            # BUSY is fair (the address was at its limit as the relay had not
            # yet counted a cut one off); anything else was not cut as it should.
            wrong = sum(n for c, n in codes.items() if c not in (code, "BUSY"))
            if wrong:
                failures.append(f"{kind}: {wrong} ended otherwise than {code} or BUSY: "
                                f"{dict(codes)}")
        return failures

    def reportOversize(self) -> list[str]:
        failures = []
        for kind in ("oversize, handshake", "oversize, after auth"):
            peers = [p for p in self.peers if p.kind == kind]
            codes = collections.Counter(p.code for p in peers)
            times = [p.cut_after for p in peers if p.cut_after is not None]
            self.line(kind, peers, codes, times)
            if not peers or codes.get("MALFORMED_FRAME", 0) != len(peers):
                failures.append(f"{kind}: not every one refused MALFORMED_FRAME: {dict(codes)}")
            if any(t > CUT_SLACK for t in times):
                failures.append(f"{kind}: some were cut only after {max(times):.2f} s")
        return failures

    def reportCrowd(self, waves: list[list[Idle]], kind: str, text: str) -> list[str]:
        failures = []
        peers = [p for wave in waves for p in wave]
        codes = collections.Counter(p.code for p in peers)
        admitted = [p for p in peers if p.admitted]
        busy = [p for p in peers if not p.admitted and p.code == "BUSY"]
        times = [p.cut_after for p in admitted if p.cut_after is not None]
        limit = MAX_PER_PEER if kind == "crowd" else MAX_SESSIONS
        most = max((sum(p.admitted for p in wave) for wave in waves), default=0)
        if kind == "crowd":
            note = f"; admitted at most {most} a wave (--max-per-peer {limit})"
        else:
            note = (f"; admitted {most}, the rest of --max-sessions {limit} being "
                    f"the other attacks' and the pair's")
            if not any(f"{limit} open, the limit (--max-sessions)" in line
                       for line in self.relay.log.lines):
                failures.append(f"{kind}: the relay did not log reaching --max-sessions")
        self.line(kind, peers, codes, times, note)
        if not busy:
            failures.append(f"{kind}: no connection was answered BUSY")
        if any(p.fatal.text != text for p in busy):
            failures.append(f"{kind}: a BUSY said {busy[0].fatal.text!r}, not {text!r}")
        if most > limit:
            failures.append(f"{kind}: {most} connections admitted at once, over {limit}")
        if any(p.code not in ("BUSY", "AUTH_TIMEOUT") for p in peers):
            failures.append(f"{kind}: connections ended otherwise than BUSY or "
                            f"AUTH_TIMEOUT: {dict(codes)}")
        if any(t > AUTH_TIMEOUT + CUT_SLACK for t in times):
            failures.append(f"{kind}: admitted connections held past the auth deadline")
        slow = [p for p in busy if p.cut_after is not None and p.cut_after > BUSY_GRACE]
        if slow:
            failures.append(f"{kind}: {len(slow)} refused connections held over {BUSY_GRACE} s")
        return failures

    def reportFlood(self) -> list[str]:
        failures = []
        f = self.flood
        peers = [p for p in self.peers if p.kind == "flood"]
        elapsed = (f.last_answer_at or 0) - (f.first_sent_at or 0)
        allowed = BURST + RATE * (elapsed + 0.5) + 2
        let_through = f.accepted + sum(f.other.values())
        codes = collections.Counter({"ACCEPTED": f.accepted, "RATE_LIMITED": f.limited})
        codes.update(f.other)
        print(f"{'flood (2 sessions)':24} {len(peers):6}  "
              f"{', '.join(f'{n} {c}' for c, n in codes.most_common()):42} "
              f"{f.sent} sent in {elapsed:.1f} s ({f.sent / max(elapsed, 1e-9):.0f}/s); "
              f"{let_through} through, at most {allowed:.0f} allowed")
        if f.sent < 5 * RATE * max(elapsed, 1) or elapsed <= 0:
            failures.append(f"flood: only {f.sent} sends in {elapsed:.1f} s, not enough "
                            f"to test --rate {RATE}")
        if not f.limited:
            failures.append("flood: no send was refused RATE_LIMITED")
        if let_through > allowed:
            failures.append(f"flood: {let_through} sends let through in {elapsed:.1f} s, "
                            f"more than {allowed:.0f}")
        if f.bad_answers:
            failures.append(f"flood: {len(f.bad_answers)} wrong answers, "
                            f"such as {f.bad_answers[0]}")
        cut = [p.code for p in peers if p.fatal is not None or p.trouble is not None]
        if cut:
            failures.append(f"flood: its sessions ended with {cut}; only its sends should be")
        return failures

    def reportStall(self) -> list[str]:
        failures = []
        s, filler = self.stalled, self.filler
        decided = self.logged_idle_cut()
        print(f"{'stall':24} {1:6}  {s.code:42} "
              f"{'relay closed it ' + format(decided, '.0f') + ' s after auth (log)' if decided is not None else '-'}"
              f"; {s.delivered} deliveries sent to it (window {WINDOW})")
        print(f"{'stall (filler)':24} {1:6}  "
              f"{f'{filler.accepted} ACCEPTED, {filler.limited} RATE_LIMITED, ' + ('MAILBOX_FULL' if filler.full else 'not full'):42} "
              f"{dict(filler.other_errors) or ''}")
        if s.code != "IDLE_TIMEOUT":
            failures.append(f"stall: the recipient that never reads ended with {s.code}, "
                            f"not IDLE_TIMEOUT")
        if s.delivered > WINDOW:
            failures.append(f"stall: {s.delivered} deliveries pushed, over the window of "
                            f"{WINDOW}")
        if not filler.full and filler.accepted < len(self.filler_pool):
            failures.append(f"stall: the filler neither filled the mailbox nor sent all "
                            f"({filler.accepted} accepted)")
        if filler.other_errors or filler.fatal is not None:
            failures.append(f"stall: the filler got {dict(filler.other_errors)} "
                            f"{filler.code if filler.fatal else ''}")
        return failures

    def logged_idle_cut(self) -> float | None:
        """Seconds from the stalled recipient's auth to its IDLE_TIMEOUT, per the log (1 s steps)."""
        stamps = {}
        for event, pattern in [("auth", rf"\] dumb authenticated from {STALLED}:"),
                               ("cut", r"\] closing \S+ \(dumb\): IDLE_TIMEOUT")]:
            for line in self.relay.log.lines:
                if re.search(pattern, line):
                    stamps[event] = datetime.datetime.strptime(line.split()[0],
                                                               "%Y-%m-%dT%H:%M:%S%z")
                    break
        if len(stamps) != 2:
            return None
        return (stamps["cut"] - stamps["auth"]).total_seconds()

    def reportPair(self) -> list[str]:
        failures = []
        p = self.pair
        during = p.latencies(self.attack_started, self.attack_ended)
        every = p.latencies()
        lost = sorted(p.accepted - set(p.delivered))
        gaps = [b - a for a, b in zip(p.arrivals, p.arrivals[1:])]
        print(f"pair: {len(p.sent_at)} sent, {len(p.accepted)} accepted, "
              f"{len(p.delivered)} delivered; latency p50 {percentile(every, 50) * 1000:.0f} ms, "
              f"p99 {percentile(every, 99) * 1000:.0f} ms, max {max(every, default=0) * 1000:.0f} ms"
              f"; during the attacks ({len(during)} messages) p50 "
              f"{percentile(during, 50) * 1000:.0f} ms, p99 {percentile(during, 99) * 1000:.0f} ms"
              f"; longest gap between deliveries {max(gaps, default=0):.2f} s")
        if p.failures:
            failures.append(f"pair: {len(p.failures)} failures, such as: {p.failures[0]}")
        if lost:
            failures.append(f"pair: {len(lost)} accepted messages never delivered")
        unsettled = len(p.sent_at) - len(p.accepted) - len(p.failures)
        if unsettled:
            failures.append(f"pair: {unsettled} messages never answered")
        if max(every, default=STALL + 1) > STALL:
            failures.append(f"pair: stalled: a message took {max(every, default=0):.1f} s "
                            f"(limit {STALL:g} s)")
        if len(during) < PAIR_RATE * self.plan.window / 4:
            failures.append(f"pair: only {len(during)} messages during the attacks")
        return failures


def relay_log_summary(lines: list[str]) -> str:
    closings = collections.Counter()
    refusals = 0
    for line in lines:
        match = re.search(r"\] closing \S+ \(\S+\): (\w+):", line)
        if match:
            closings[match.group(1)] += 1
        elif "] refusing connections" in line:
            refusals += 1
    return (", ".join(f"{n} {code}" for code, n in closings.most_common())
            + f"; {refusals} lines about refused connections")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="attack for 10 s instead of 50 (under 30 s in all, for CI)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if not (BIN / "twistd").exists():
        print(f"no twistd beside {sys.executable}: run with .venv/bin/python", file=sys.stderr)
        return 2
    started = now()
    # Until the reactor takes SIGTERM over: leave through the cleanup below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    options = [
        "--frame-timeout", str(FRAME_TIMEOUT), "--auth-timeout", str(AUTH_TIMEOUT),
        "--idle-timeout", str(plan.idle_timeout), "--max-per-peer", str(MAX_PER_PEER),
        "--max-sessions", str(MAX_SESSIONS), "--rate", str(RATE), "--burst", str(BURST),
        "--window", str(WINDOW), "--quota-bytes", str(QUOTA_BYTES),
    ]
    with tempfile.TemporaryDirectory(prefix="mailrelay-hostile-") as root:
        relay = HostileRelay(Path(root) / "var", *options)
        try:
            relay.start()
            print(f"relay: pid {relay.process.pid} on 127.0.0.1:{relay.port}, "
                  f"{' '.join(options)}")
            ids = {name: keys.Identity.generate(name, bits=KEY_BITS)
                   for name in ("alice", "bob", "mallory", "flooder", "sink", "filler", "dumb")}
            return attack(relay, plan, ids, started)
        finally:
            relay.stop()


def attack(relay: Relay, plan: Plan, ids: dict[str, keys.Identity], started: float) -> int:
    from twisted.internet import reactor

    run = Run(reactor, relay, plan, ids)
    errors: list[str] = []

    def done(result):
        if isinstance(result, Failure):
            errors.append("the run failed:\n" + result.getTraceback())
        if reactor.running:
            reactor.stop()

    def overdue():
        errors.append(f"the run took longer than {limit:.0f} s; stopped")
        reactor.stop()

    limit = plan.window + 40
    reactor.callWhenRunning(lambda: defer.maybeDeferred(run.main).addBoth(done))
    reactor.callLater(limit, overdue)
    print(f"attacking for {plan.window:g} s: {LORISES} slowloris, oversize every "
          f"{plan.oversize_every:g} s, crowds of {3 * MAX_PER_PEER}, a flood of "
          f"{FLOOD_FACTOR * RATE}/s, a stalled recipient; then {MAX_SESSIONS + 20} at once")
    reactor.run()
    alive = relay.process.poll() is None
    relay.stop()
    try:
        relay.log.wait_for(r"Server Shut Down", timeout=30)
    except AssertionError:
        pass
    if not run.finished:
        errors.append("the run did not finish (interrupted, or it failed)")
    failures = list(errors)
    if run.finished:
        failures += run.report()
    print(f"relay log: {relay_log_summary(relay.log.lines)}")
    if not alive:
        failures.append(f"the relay died (exit status {relay.process.returncode})")
    print(f"run took {now() - started:.1f} s")
    if failures:
        print()
        for failure in failures:
            print(f"FAIL: {failure}")
        return 1
    print("PASS: every attack was cut, the pair kept exchanging, the relay's memory stayed "
          "bounded")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
