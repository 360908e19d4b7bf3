"""
Load generator for the relay: `make bench`.

Starts a real `twistd mailrelay` (SQLite store in a temporary directory) on a
loopback port, then measures, with pre-sealed envelopes so client-side
cryptography is not what is timed:

  accept   one sender pipelining SENDs; time until every ACCEPTED arrived
           (each one is a durable SQLite commit)
  deliver  the recipient connects afterwards and drains its mailbox,
           acknowledging each DELIVER; time until the mailbox is empty
  live     sender and connected recipient at once: end-to-end latency
           from SEND to DELIVER, p50 / p99
  fan-in   --senders sessions at once, each pipelining its share of
           --messages to its own offline recipient; commits are shared

and the pure parts in-process: envelope seal/open per second, and the frame
buffer fed a maximum-size frame one byte at a time.

Bounded: --messages (default 2000) and --deadline seconds (default 120);
loopback only.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import Factory, Protocol
from twisted.python import failure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay import envelope, keys, wire  # noqa: E402

BIN = Path(sys.executable).parent


class BenchClient(Protocol):
    """A bare protocol client: authenticates, then counts frames."""

    def __init__(self, identity: keys.Identity) -> None:
        self.identity = identity
        self.buffer = wire.FrameBuffer()
        self.ready = defer.Deferred()
        self.accepted = 0
        self.delivered: list[tuple[bytes, float]] = []
        self.on_accepted = None
        self.on_deliver = None

    def dataReceived(self, data: bytes) -> None:
        for frame in self.buffer.feed(data):
            if isinstance(frame, wire.Hello):
                transcript = wire.auth_transcript(frame.challenge, frame.relay, self.identity.name)
                self.transport.write(wire.encode(wire.Auth(
                    wire.PROTOCOL_VERSION, self.identity.name, self.identity.public_der,
                    self.identity.sign(transcript))))
            elif isinstance(frame, wire.Welcome):
                self.ready.callback(self)
            elif isinstance(frame, wire.Accepted):
                self.accepted += 1
                if self.on_accepted:
                    self.on_accepted(frame)
            elif isinstance(frame, wire.Deliver):
                self.delivered.append((frame.message_id, time.perf_counter()))
                self.transport.write(wire.encode(wire.Ack(frame.message_id)))
                if self.on_deliver:
                    self.on_deliver(frame)
            elif isinstance(frame, wire.Error):
                raise SystemExit(f"relay error: {frame.code.name}: {frame.text}")


def connect(reactor, port: int, identity: keys.Identity):
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    factory = Factory.forProtocol(lambda: BenchClient(identity))
    d = endpoint.connect(factory)
    return d.addCallback(lambda p: p.ready)


def wait_until(reactor, condition, deadline: float):
    d = defer.Deferred()

    def check():
        if condition():
            loop.stop()
            d.callback(None)
        elif time.monotonic() > deadline:
            loop.stop()
            d.errback(SystemExit("benchmark deadline passed"))

    loop = task.LoopingCall(check)
    loop.clock = reactor
    loop.start(0.005)
    return d


@defer.inlineCallbacks
def relay_bench(reactor, port: int, args, sender, recipient, sealed, live_sealed, fan_in):
    deadline = time.monotonic() + args.deadline
    results = {}

    a = yield connect(reactor, port, sender)
    # Register the recipient, then leave it offline.
    b = yield connect(reactor, port, recipient)
    b.transport.loseConnection()

    start = time.perf_counter()
    for env in sealed:
        a.transport.write(wire.encode(wire.Send(env)))
    yield wait_until(reactor, lambda: a.accepted == len(sealed), deadline)
    results["accept"] = len(sealed) / (time.perf_counter() - start)

    start = time.perf_counter()
    b = yield connect(reactor, port, recipient)
    yield wait_until(reactor, lambda: len(b.delivered) == len(sealed), deadline)
    results["deliver"] = len(sealed) / (time.perf_counter() - start)

    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    b.on_deliver = lambda f: latencies.append(time.perf_counter() - sent_at[f.message_id])
    outstanding = [0]

    def send_next(frame=None):
        if frame is not None:
            outstanding[0] -= 1
        while live_sealed and outstanding[0] < 8:
            message_id, env = live_sealed.pop()
            sent_at[message_id] = time.perf_counter()
            outstanding[0] += 1
            a.transport.write(wire.encode(wire.Send(env)))

    a.on_accepted = send_next
    total_live = len(sent_at) + len(live_sealed)
    send_next()
    yield wait_until(reactor, lambda: len(latencies) == total_live, deadline)
    latencies.sort()
    results["p50"] = latencies[len(latencies) // 2] * 1000
    results["p99"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
    a.transport.loseConnection()
    b.transport.loseConnection()

    sessions = []
    for identity, peer, _ in fan_in:
        sessions.append((yield connect(reactor, port, identity)))
        (yield connect(reactor, port, peer)).transport.loseConnection()
    start = time.perf_counter()
    for session, (_, _, envelopes) in zip(sessions, fan_in):
        for env in envelopes:
            session.transport.write(wire.encode(wire.Send(env)))
    total = sum(len(envelopes) for _, _, envelopes in fan_in)
    yield wait_until(reactor, lambda: sum(s.accepted for s in sessions) == total, deadline)
    results["fan_in"] = total / (time.perf_counter() - start)
    for session in sessions:
        session.transport.loseConnection()
    return results


def pure_bench(sender, recipient, size: int) -> dict:
    data = os.urandom(size)
    count = 200
    start = time.perf_counter()
    sealed = [envelope.seal(sender, recipient.name, recipient.public_key, data)
              for _ in range(count)]
    seal_rate = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for env in sealed:
        envelope.open_envelope(env, recipient, sender.public_key)
    open_rate = count / (time.perf_counter() - start)

    body = os.urandom(wire.MAX_ENVELOPE)
    frame = wire.encode(wire.Send(body))
    buf = wire.FrameBuffer()
    start = time.perf_counter()
    got = []
    for i in range(len(frame)):
        got.extend(buf.feed(frame[i:i + 1]))
    trickle = time.perf_counter() - start
    assert len(got) == 1
    return {"seal": seal_rate, "open": open_rate, "trickle": trickle, "frame": len(frame)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="plaintext bytes per message")
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--senders", type=int, default=16, help="sessions in the fan-in phase")
    args = parser.parse_args()

    sender = keys.Identity.generate("bench-sender")
    recipient = keys.Identity.generate("bench-recipient")
    plaintext = os.urandom(args.size)
    sealed = [envelope.seal(sender, recipient.name, recipient.public_key, plaintext)
              for _ in range(args.messages)]
    live = []
    for _ in range(min(args.messages, 500)):
        message_id = envelope.new_message_id()
        live.append((message_id, envelope.seal(sender, recipient.name, recipient.public_key,
                                               plaintext, message_id)))

    fan_in = []
    per_sender = max(1, args.messages // args.senders)
    for n in range(args.senders):
        a = keys.Identity.generate(f"fan-{n}", bits=2048)
        b = keys.Identity.generate(f"fan-{n}-peer", bits=2048)
        fan_in.append((a, b, [envelope.seal(a, b.name, b.public_key, plaintext)
                              for _ in range(per_sender)]))

    work = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    port = free_port()
    relay = subprocess.Popen(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(work / "relay.log"),
         "mailrelay", "--port", f"tcp:{port}:interface=127.0.0.1", "--data", str(work / "var"),
         "--quota-messages", "0", "--quota-bytes", "0", "--rate", "0"],
        cwd=work,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        results = {}

        from twisted.internet import reactor

        done = []
        bench = relay_bench(reactor, port, args, sender, recipient, sealed, live, fan_in)
        bench.addBoth(lambda r: (done.append(r), reactor.stop()))
        reactor.run()
        if isinstance(done[0], failure.Failure):
            done[0].raiseException()
        results.update(done[0])
        rss = _rss_kib(relay.pid)
    finally:
        relay.terminate()
        relay.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    pure = pure_bench(sender, recipient, args.size)

    print(f"mailrelay bench: {args.messages} messages of {args.size} bytes plaintext "
          f"({len(sealed[0])} bytes sealed), SQLite store, loopback TCP")
    print(f"  accept  (durable commit per message): {results['accept']:8.0f} messages/s")
    print(f"  deliver (drain with acks):            {results['deliver']:8.0f} messages/s")
    print(f"  live    send->deliver latency:        p50 {results['p50']:.2f} ms, "
          f"p99 {results['p99']:.2f} ms (8 in flight)")
    print(f"  fan-in  ({args.senders} senders at once):      {results['fan_in']:8.0f} messages/s")
    print(f"  relay resident memory after the run:  {rss} KiB")
    print(f"  envelope seal: {pure['seal']:.0f}/s, open: {pure['open']:.0f}/s (RSA-3072)")
    print(f"  frame buffer, {pure['frame']}-byte frame fed 1 byte at a time: "
          f"{pure['trickle']:.2f} s")
    print(f"  bench process max RSS: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB")


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


if __name__ == "__main__":
    main()
