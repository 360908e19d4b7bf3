"""
The load generator of `make bench`: one process drives a range of
sender/recipient pairs against one server and prints a JSON result.

bench/run.py starts one or more of these per run (--procs) and merges their
results; bench/README.md explains the figures.  A process:

 1. loads the cached RSA-3072 keys of its pairs (build/bench/keys/, made by
    L{ensure_keys}) and seals ONE real envelope per pair with
    L{mailrelay.envelope.seal}, of exactly --size bytes;
 2. checks its hand-built frames against L{mailrelay.wire.encode};
 3. when told to (4), connects every recipient (receiving), then every
    sender, to the target: the relay (mailrelay's protocol, authenticated),
    the bare forwarder (bench/forwarder.py) or Mosquitto (MQTT 3.1.1, QoS 1,
    bench/mqtt.py);
 4. talks to run.py over stdin and stdout: writes "LOADED" once its
    envelopes are sealed, connects on "CONNECT", writes "READY" once every
    connection is up, and starts on "GO <t>", t a CLOCK_MONOTONIC time in
    nanoseconds shared by every process of the run;
 5. sends from t, for --warmup then --measure seconds: as fast as a window
    of --window unaccepted messages per sender allows (saturate), or
    --rate messages/s spread over its pairs in 1 ms ticks (rate, open
    loop: latency counts from the scheduled send time);
 6. stops sending, drains (every sent message accepted, every accepted one
    delivered and acknowledged, within --drain seconds), and writes
    "RESULT {json}": counts inside the measuring interval, a latency
    histogram, and any message lost, duplicated or refused.

Each message is the pair's sealed envelope with a fresh message id patched
into its header: (run tag, process, pair, sequence number).  The relay
routes on the header and checks its names and fingerprints, but only the
recipient verifies the signature, so the relay's work per message is that
of a message sealed for real.

Alone, `python bench/loadgen.py --make-keys N` fills the key cache for N
pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from array import array
from collections import deque
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from mailrelay import envelope, keys, wire  # noqa: E402

KEY_DIR = ROOT / "build" / "bench" / "keys"

now_ns = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux: one clock for every process

MESSAGE_ID = struct.Struct(">4sHHQ")
"""A bench message id: run tag, generator process, pair, sequence number (16 bytes)."""
assert MESSAGE_ID.size == wire.MESSAGE_ID_SIZE

U32 = struct.Struct(">I")

# Frame types of the relay protocol, and of the bare forwarder, which borrows them.
HELLO, WELCOME, SEND, ACCEPTED, DELIVER, ACK, ERROR = 0x01, 0x03, 0x20, 0x21, 0x22, 0x23, 0x7F


# --- keys ------------------------------------------------------------------------


def sender_name(pair: int) -> str:
    return f"bs{pair:04d}"


def recipient_name(pair: int) -> str:
    return f"br{pair:04d}"


def _generate_one(path: str) -> str:
    identity = keys.Identity.generate("bench")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(keys.private_pem(identity.private_key, None))
    os.replace(tmp, path)
    return path


def ensure_keys(pairs: int, key_dir: Path = KEY_DIR, log=print) -> int:
    """Generate (in parallel, once) the 2 x C{pairs} keys missing from C{key_dir}."""
    key_dir.mkdir(parents=True, exist_ok=True)
    missing = [str(key_dir / f"{name}.pem") for p in range(pairs)
               for name in (sender_name(p), recipient_name(p))
               if not (key_dir / f"{name}.pem").exists()]
    if missing:
        log(f"generating {len(missing)} RSA-{keys.KEY_BITS} keys into {key_dir} "
            f"(once: later runs reuse them)")
        with Pool(os.cpu_count() or 1) as pool:
            for n, _ in enumerate(pool.imap_unordered(_generate_one, missing, chunksize=4), 1):
                if n % 200 == 0 or n == len(missing):
                    log(f"  {n}/{len(missing)} keys")
    return len(missing)


def load_identity(name: str, key_dir: Path = KEY_DIR) -> keys.Identity:
    pem = (key_dir / f"{name}.pem").read_bytes()
    # Keys we generated ourselves: skip the RSA consistency check (0.1 s a key).
    key = serialization.load_pem_private_key(pem, None, unsafe_skip_rsa_key_validation=True)
    return keys.Identity(name, key)


# --- envelopes --------------------------------------------------------------------


def message_id_offset(sender: str, recipient: str) -> int:
    """Where the message id sits in an envelope: after version, suite and the two ids."""
    return 2 + 1 + len(sender) + envelope.FINGERPRINT_SIZE + 1 + len(recipient) \
        + envelope.FINGERPRINT_SIZE


def seal_exact(sender: keys.Identity, recipient: keys.Identity, size: int,
               rng: random.Random) -> bytes:
    """One real envelope from C{sender} to C{recipient} of exactly C{size} bytes."""
    room = size - envelope.overhead(sender.name, recipient.name,
                                    recipient.public_key.key_size // 8)
    if room < 0:
        raise SystemExit(f"--size {size} is smaller than an envelope's overhead")
    sealed = envelope.seal(sender, recipient.name, recipient.public_key, rng.randbytes(room),
                           message_id=bytes(wire.MESSAGE_ID_SIZE))
    if len(sealed) != size:
        raise SystemExit(f"sealed {len(sealed)} bytes, wanted {size}")
    return sealed


# --- latency histogram: log buckets, 128 per power of two (< 0.8 % error), in µs -----

HIST_BUCKETS = 256 + 40 * 128


def bucket(us: int) -> int:
    if us < 256:
        return us if us > 0 else 0
    e = us.bit_length() - 8
    return min(256 + ((e - 1) << 7) + ((us >> e) - 128), HIST_BUCKETS - 1)


def bucket_value(index: int) -> float:
    """The middle of a bucket, in µs."""
    if index < 256:
        return float(index)
    e = ((index - 256) >> 7) + 1
    m = ((index - 256) & 127) + 128
    return ((m << e) + ((m + 1) << e)) / 2


def percentile(hist: dict, q: float) -> float | None:
    """The C{q} quantile (0..1) of a sparse histogram {bucket: count}, in µs."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, int(q * total + 0.999999))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(max(hist))


def merge_hists(hists) -> dict:
    merged: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            merged[int(k)] = merged.get(int(k), 0) + v
    return merged


# --- the generator's state -------------------------------------------------------


class Generator:
    """Per-pair send tables, counters and the schedule of one process."""

    def __init__(self, args, reactor) -> None:
        self.args = args
        self.reactor = reactor
        self.first = args.first
        self.count = args.count
        self.tag = bytes.fromhex(args.tag)
        self.proc = args.proc
        self.window = args.window
        # Per local pair j: send time of each sequence number (ns; scheduled time in
        # rate mode), and flags (1: accepted, 2: delivered).
        self.sent = [array("q") for _ in range(self.count)]
        self.flags = [bytearray() for _ in range(self.count)]
        self.inflight = [0] * self.count
        self.backlog = [deque() for _ in range(self.count)]  # rate mode: scheduled times
        self.senders: list = [None] * self.count
        self.recipients: list = [None] * self.count
        self.hist = array("q", bytes(8 * HIST_BUCKETS))
        self.lat_n = 0
        self.lat_max = 0
        self.sent_total = self.accepted_total = self.delivered_total = 0
        self.sent_window = self.accepted_window = self.completed_window = 0
        self.scheduled = self.scheduled_window = 0
        self.dup_accepted = self.dup_delivered = self.foreign = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.sending = False
        self.t_start = self.t0 = self.t1 = 0
        self.connect_s = 0.0
        self.drain_done = 0
        self.finished = False

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 10:
            self.errors.append(text)

    # Send side ------------------------------------------------------------------

    def fill(self, j: int) -> None:
        """Saturation: top the pair's window up."""
        room = self.window - self.inflight[j]
        if room > 0 and self.sending:
            self.send(j, room, None)

    def send(self, j: int, n: int, scheduled) -> None:
        """Write C{n} messages of pair C{j}, stamped now or with their C{scheduled} times."""
        sent, flags = self.sent[j], self.flags[j]
        t = now_ns()
        frames = []
        build = self.senders[j].frame
        for i in range(n):
            seq = len(sent)
            sent.append(t if scheduled is None else scheduled[i])
            flags.append(0)
            frames.append(build(seq))
        self.inflight[j] += n
        self.sent_total += n
        if self.t0 <= t < self.t1:
            self.sent_window += n
        self.senders[j].transport.write(b"".join(frames))

    def accepted(self, j: int, seq: int, t: int) -> None:
        flags = self.flags[j]
        if seq >= len(flags):
            self.foreign += 1
            return
        f = flags[seq]
        if f & 1:
            self.dup_accepted += 1
            return
        flags[seq] = f | 1
        self.accepted_total += 1
        self.inflight[j] -= 1
        if self.t0 <= t < self.t1:
            self.accepted_window += 1
            if f & 2:
                self.completed_window += 1

    def after_accepts(self, j: int) -> None:
        """After a read's worth of accepts: send more, as the mode allows."""
        backlog = self.backlog[j]
        if backlog:
            room = min(self.window - self.inflight[j], len(backlog))
            if room > 0:
                self.send(j, room, [backlog.popleft() for _ in range(room)])
        elif self.args.mode == "saturate":
            self.fill(j)

    # Receive side ----------------------------------------------------------------

    def delivered(self, j: int, mid: bytes, t: int) -> None:
        tag, proc, pair, seq = MESSAGE_ID.unpack(mid)
        flags = self.flags[j]
        if tag != self.tag or proc != self.proc or pair != self.first + j or seq >= len(flags):
            self.foreign += 1
            return
        f = flags[seq]
        if f & 2:
            self.dup_delivered += 1
            return
        flags[seq] = f | 2
        self.delivered_total += 1
        t0, t1 = self.t0, self.t1
        if f & 1 and t0 <= t < t1:
            self.completed_window += 1
        s = self.sent[j][seq]
        if t0 <= s < t1:
            us = (t - s) // 1000
            if us > self.lat_max:
                self.lat_max = us
            self.lat_n += 1
            self.hist[bucket(us)] += 1

    # Schedule ------------------------------------------------------------------------

    def go(self, t_start: int) -> None:
        a = self.args
        self.t_start = t_start
        self.t0 = t_start + int(a.warmup * 1e9)
        self.t1 = self.t0 + int(a.measure * 1e9)
        delay = max(0.0, (t_start - now_ns()) / 1e9)
        self.reactor.callLater(delay, self._start)
        self.reactor.callLater(max(0.0, (self.t1 - now_ns()) / 1e9), self._stop)

    def _start(self) -> None:
        self.sending = True
        if self.args.mode == "saturate":
            for j in range(self.count):
                self.fill(j)
        else:
            from twisted.internet import task

            self._ticker = task.LoopingCall(self._tick)
            self._ticker.clock = self.reactor
            self._ticker.start(0.001)

    def _tick(self) -> None:
        """Rate mode: send every message due by now, round-robin over the pairs."""
        t = now_ns()
        interval = 1e9 / self.args.rate
        due = int((min(t, self.t1) - self.t_start) / interval) + 1
        k0 = self.scheduled
        if due <= k0:
            return
        per_pair: dict[int, list] = {}
        for k in range(k0, due):
            per_pair.setdefault(k % self.count, []).append(self.t_start + int(k * interval))
        self.scheduled = due
        for j, times in per_pair.items():
            self.scheduled_window += sum(1 for s in times if self.t0 <= s < self.t1)
            backlog = self.backlog[j]
            backlog.extend(times)
            room = min(self.window - self.inflight[j], len(backlog))
            if room > 0:
                self.send(j, room, [backlog.popleft() for _ in range(room)])

    def _stop(self) -> None:
        self.sending = False
        ticker = getattr(self, "_ticker", None)
        if ticker is not None and ticker.running:
            self._tick()
            ticker.stop()
        self.drain_deadline = now_ns() + int(self.args.drain * 1e9)
        self.drain_done = 0
        self._grace_until = 0
        from twisted.internet import task

        self._drainer = task.LoopingCall(self._check_drained)
        self._drainer.clock = self.reactor
        self._drainer.start(0.02)

    def drained(self) -> bool:
        return (not any(self.backlog)
                and self.accepted_total == self.sent_total
                and self.delivered_total >= self.accepted_total)

    def _check_drained(self) -> None:
        t = now_ns()
        if self._grace_until:
            # Drained: wait a little longer, so that a duplicate would show.
            if t >= self._grace_until:
                self._drainer.stop()
                self.finish()
        elif self.drained():
            self.drain_done = t
            self._grace_until = t + int(0.1e9)
        elif t > self.drain_deadline or self.error_count:
            self.drain_done = t
            self._drainer.stop()
            self.finish()

    def finish(self) -> None:
        self.on_finish(self.result())

    def result(self) -> dict:
        lost = unaccepted = delivered_unaccepted = 0
        for flags in self.flags:
            lost += flags.count(1)
            unaccepted += flags.count(0)
            delivered_unaccepted += flags.count(2)
        hist = {i: c for i, c in enumerate(self.hist) if c}
        return {
            "proc": self.proc, "first": self.first, "pairs": self.count,
            "connect_s": round(self.connect_s, 3),
            "sent": self.sent_total, "sent_window": self.sent_window,
            "scheduled_window": self.scheduled_window,
            "accepted": self.accepted_total, "accepted_window": self.accepted_window,
            "completed_window": self.completed_window, "delivered": self.delivered_total,
            "lost": lost, "unaccepted": unaccepted,
            "delivered_unaccepted": delivered_unaccepted,
            "dup_accepted": self.dup_accepted, "dup_delivered": self.dup_delivered,
            "foreign": self.foreign,
            "drained": self.drained(),
            "drain_s": round(((self.drain_done or now_ns()) - self.t1) / 1e9, 3),
            "errors": self.errors, "error_count": self.error_count,
            "lat_n": self.lat_n, "lat_max_us": self.lat_max, "hist": hist,
        }


# --- protocols ----------------------------------------------------------------------


def _protocols():
    """The Twisted protocols, defined once the reactor may be imported."""
    from twisted.internet import defer
    from twisted.internet.protocol import Protocol

    class Framed(Protocol):
        """A u32-length-prefixed stream, read with no more than the type byte and id."""

        def __init__(self, gen: Generator, j: int, receiving: bool) -> None:
            self.gen = gen
            self.j = j
            self.receiving = receiving
            self.ready = defer.Deferred()
            self._buf = bytearray()

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            buf = self._buf
            buf += data
            n = len(buf)
            off = 0
            t = now_ns()
            gen, j = self.gen, self.j
            acks = []
            accepts = 0
            unpack = U32.unpack_from
            while n - off >= 5:
                (length,) = unpack(buf, off)
                end = off + 4 + length
                if end > n:
                    break
                kind = buf[off + 4]
                if kind == DELIVER:
                    mid = bytes(buf[off + 5:off + 21])
                    gen.delivered(j, mid, t)
                    acks.append(self.ACK_HEAD + mid)
                elif kind == ACCEPTED:
                    mid = bytes(buf[off + 5:off + 21])
                    gen.accepted(j, MESSAGE_ID.unpack(mid)[3], t)
                    accepts += 1
                else:
                    self.other(kind, bytes(buf[off + 4:end]))
                off = end
            del buf[:off]
            if acks:
                self.transport.write(b"".join(acks))
            if accepts:
                gen.after_accepts(j)

        def connectionLost(self, reason) -> None:
            if not self.ready.called:
                self.ready.errback(reason)
            elif not self.gen.finished:
                self.gen.error(f"pair {self.gen.first + self.j} connection lost: "
                               f"{reason.getErrorMessage()}")

    class RelayClient(Framed):
        ACK_HEAD = U32.pack(17) + bytes([ACK])

        def other(self, kind: int, body: bytes) -> None:
            frame = wire.decode(body, wire.LARGEST_ENVELOPE)
            if isinstance(frame, wire.Hello):
                identity = self.identity
                transcript = wire.auth_transcript(frame.challenge, frame.relay, identity.name,
                                                  self.receiving)
                self.transport.write(wire.encode(wire.Auth(
                    wire.PROTOCOL_VERSION, identity.name, identity.public_der,
                    identity.sign(transcript), self.receiving)))
            elif isinstance(frame, wire.Welcome):
                self.ready.callback(self)
            elif isinstance(frame, wire.Error):
                text = f"relay error {frame.code.name}: {frame.text}"
                if not self.ready.called:
                    self.ready.errback(RuntimeError(text))
                else:
                    self.gen.error(text)
            else:
                self.gen.error(f"unexpected {type(frame).__name__}")

    class BareClient(Framed):
        ACK_HEAD = U32.pack(17) + bytes([ACK])

        def connectionMade(self) -> None:
            super().connectionMade()
            role = 1 if self.receiving else 0
            self.transport.write(U32.pack(6) + bytes([HELLO, role])
                                 + U32.pack(self.gen.first + self.j))

        def other(self, kind: int, body: bytes) -> None:
            if kind == WELCOME and not self.ready.called:
                self.ready.callback(self)
            else:
                self.gen.error(f"unexpected frame type 0x{kind:02x} from the forwarder")

    return RelayClient, BareClient


# --- main ---------------------------------------------------------------------------


def self_check(sealed: bytes, id_off: int, tag: bytes) -> None:
    """The hand-built frames must be what mailrelay.wire encodes."""
    mid = MESSAGE_ID.pack(tag, 7, 3, 123456)
    patched = sealed[:id_off] + mid + sealed[id_off + 16:]
    assert envelope.parse(patched).header.message_id == mid, "message id offset"
    head = U32.pack(1 + 4 + len(sealed)) + bytes([SEND]) + U32.pack(len(sealed)) + sealed[:id_off]
    assert head + mid + sealed[id_off + 16:] == wire.encode(wire.Send(patched)), "SEND"
    assert U32.pack(17) + bytes([ACK]) + mid == wire.encode(wire.Ack(mid)), "ACK"
    for frame in (wire.Accepted(mid), wire.Deliver(mid, patched)):
        raw = wire.encode(frame)
        assert U32.unpack_from(raw)[0] == len(raw) - 4 and raw[4] == frame.TYPE, "type"
        assert raw[5:21] == mid, "id in ACCEPTED/DELIVER"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="One load generator process (bench/run.py runs it).")
    p.add_argument("--make-keys", type=int, metavar="PAIRS",
                   help="only generate the cached keys for PAIRS pairs, then exit")
    p.add_argument("--target", choices=("relay", "bare", "mqtt"), default="relay")
    p.add_argument("--port", type=int)
    p.add_argument("--first", type=int, default=0, help="first pair (global index)")
    p.add_argument("--count", type=int, default=1, help="pairs driven by this process")
    p.add_argument("--proc", type=int, default=0)
    p.add_argument("--size", type=int, default=1024, help="envelope bytes")
    p.add_argument("--window", type=int, default=64, help="unaccepted messages per sender")
    p.add_argument("--mode", choices=("saturate", "rate"), default="saturate")
    p.add_argument("--rate", type=float, default=0.0, help="rate mode: messages/s, this process")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--measure", type=float, default=5.0)
    p.add_argument("--drain", type=float, default=60.0, help="seconds to deliver what is left")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--go-timeout", type=float, default=300.0,
                   help="seconds to wait for GO after READY")
    p.add_argument("--tag", default="62656e63", help="run tag, 4 bytes in hex")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--key-dir", type=Path, default=KEY_DIR)
    args = p.parse_args(argv)
    if args.make_keys is None and args.port is None:
        p.error("--port is needed")
    if args.mode == "rate" and args.rate <= 0:
        p.error("--mode rate needs --rate")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_keys is not None:
        ensure_keys(args.make_keys, args.key_dir, log=lambda m: print(m, file=sys.stderr))
        return 0

    tag = bytes.fromhex(args.tag)
    rng = random.Random(args.seed * 1_000_003 + args.size)
    # Identities and one real envelope per pair.
    pairs = range(args.first, args.first + args.count)
    senders = [load_identity(sender_name(p), args.key_dir) for p in pairs]
    recipients = [load_identity(recipient_name(p), args.key_dir) for p in pairs]
    sealed = [seal_exact(s, r, args.size, rng) for s, r in zip(senders, recipients)]
    id_off = message_id_offset(senders[0].name, recipients[0].name)
    self_check(sealed[0], id_off, tag)

    from twisted.internet import defer, endpoints, reactor, stdio
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    from bench import mqtt

    mqtt.self_check()

    RelayClient, BareClient = _protocols()
    gen = Generator(args, reactor)
    outcome = {"code": 1}

    def frame_builder(j: int):
        """The function making pair j's SEND (or PUBLISH) frame for a sequence number."""
        env = sealed[j]
        env_head, env_tail = env[:id_off], env[id_off + 16:]
        pack, pair = MESSAGE_ID.pack, args.first + j
        if args.target == "relay":
            head = U32.pack(1 + 4 + len(env)) + bytes([SEND]) + U32.pack(len(env)) + env_head
            return lambda seq: b"".join((head, pack(tag, args.proc, pair, seq), env_tail))
        if args.target == "bare":
            head = U32.pack(1 + 16 + len(env)) + bytes([SEND])

            def bare(seq):
                mid = pack(tag, args.proc, pair, seq)
                return b"".join((head, mid, env_head, mid, env_tail))
            return bare
        head = mqtt.publish_head(mqtt.topic(pair), len(env))

        def publish(seq):
            return b"".join((head, mqtt.packet_id(seq), env_head,
                             pack(tag, args.proc, pair, seq), env_tail))
        return publish

    def make(j: int, receiving: bool):
        if args.target == "relay":
            proto = RelayClient(gen, j, receiving)
            proto.identity = recipients[j] if receiving else senders[j]
        elif args.target == "bare":
            proto = BareClient(gen, j, receiving)
        else:
            proto = mqtt.Client(gen, j, receiving, id_off, args.tag)
        if not receiving:
            proto.frame = frame_builder(j)
        return proto

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", args.port, timeout=30)
    limit = defer.DeferredSemaphore(32)

    def connect(j: int, receiving: bool):
        def attempt():
            proto = make(j, receiving)
            d = endpoint.connect(Factory.forProtocol(lambda: proto))
            d.addCallback(lambda p: p.ready)
            return d

        def placed(proto):
            (gen.recipients if receiving else gen.senders)[j] = proto
        return limit.run(attempt).addCallback(placed)

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            gen.on_finish = self.finished

        def lineReceived(self, line: bytes) -> None:
            if line == b"CONNECT":
                connect_all().addErrback(
                    lambda f: fail(f"connecting failed: {f.getErrorMessage()}"))
            elif line.startswith(b"GO "):
                go_timer.cancel()
                gen.go(int(line[3:]))

        def finished(self, result: dict) -> None:
            gen.finished = True
            outcome["code"] = 0
            self.transport.write(b"RESULT " + json.dumps(result).encode() + b"\n")
            self.transport.loseConnection()

        def connectionLost(self, reason) -> None:
            if outcome["code"]:
                print("loadgen: stdin closed before the end; stopping", file=sys.stderr)
            if reactor.running:
                reactor.stop()

    control = Control()
    stdio.StandardIO(control)

    def fail(why: str) -> None:
        print(f"loadgen {args.proc}: {why}", file=sys.stderr)
        outcome["code"] = 2
        if reactor.running:
            reactor.stop()

    go_timer = reactor.callLater(args.connect_timeout + args.go_timeout, fail,
                                 "no GO in time")
    hard = args.connect_timeout + args.go_timeout + args.warmup + args.measure + args.drain + 30
    reactor.callLater(hard, fail, "hard deadline passed")

    @defer.inlineCallbacks
    def connect_all():
        t = time.monotonic()
        timer = reactor.callLater(args.connect_timeout, lambda: d.cancel())
        try:
            d = defer.gatherResults([connect(j, True) for j in range(args.count)],
                                    consumeErrors=True)
            yield d
            d = defer.gatherResults([connect(j, False) for j in range(args.count)],
                                    consumeErrors=True)
            yield d
        finally:
            if timer.active():
                timer.cancel()
        gen.connect_s = time.monotonic() - t
        control.transport.write(b"READY\n")

    control.transport.write(b"LOADED\n")
    reactor.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
