"""
The crash test: messages are never lost, never shown twice, never reordered,
while the relay and the clients are killed with SIGKILL at random moments.

    .venv/bin/python tools/crash_test.py                 # 10,000 messages, 20 relay kills
    .venv/bin/python tools/crash_test.py --messages 1000 --relay-kills 5 --client-kills 5

Several sender processes and recipient processes (this script, run as
workers) exchange messages through a real C{twistd mailrelay} on its SQLite
store.  Senders queue each message in their outbox (sealed, numbered) and
flush; recipients record each message in their inbox, then print it (to a
log), then acknowledge it.  Meanwhile the relay is killed and restarted on
the same data directory, and random workers are killed and restarted on the
same homes, at moments spread over the whole run.

At the end the messages every sender recorded as accepted by the relay are
compared with what every recipient recorded: lost (accepted, never
received), duplicated (printed more than once), reordered (a sender's
message received after a later one of the same sender).  Any of them, a
worker that failed, or a run that did not finish in time, exits 1.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import Relay, cli, environment  # noqa: E402

BATCH = 25
"""Messages a sender queues between two flushes."""


# Workers ---------------------------------------------------------------------


def _connect_forever(reactor, endpoint, home, identity, server, **kwargs):
    """Fire with a connected client, retrying every 0.2 s while the relay is down."""
    from twisted.internet import task
    from twisted.internet.defer import inlineCallbacks

    from mailrelay.client.protocol import connect

    @inlineCallbacks
    def attempt():
        while True:
            try:
                client = yield connect(
                    reactor, endpoint, identity, contacts=home, timeout=5,
                    relay_check=lambda relay: home.pin_relay(server, relay), **kwargs)
                return client
            except Exception:
                yield task.deferLater(reactor, 0.2, lambda: None)

    return attempt()


def sender_worker(args) -> None:
    """Queue C{--count} messages to each recipient and flush until all are accepted."""
    from twisted.internet import endpoints, task
    from twisted.internet.defer import inlineCallbacks

    from mailrelay import keys
    from mailrelay.client.outbox import home_outbox, queue_message

    home = keys.Home(args.home)
    identity = home.load()
    outbox = home_outbox(home)
    recipients = args.to.split(",")

    def numbered() -> dict[str, int]:
        rows = outbox._db.execute("SELECT recipient, last_seq FROM sequences").fetchall()
        found = dict(rows)
        return {r: found.get(r, 0) for r in recipients}

    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    @inlineCallbacks
    def run(reactor):
        endpoint = endpoints.clientFromString(reactor, args.server)
        while True:
            say("connecting")
            client = yield _connect_forever(reactor, endpoint, home, identity, args.server)
            say("connected")
            while True:
                counts = numbered()
                behind = [r for r in recipients if counts[r] < args.count]
                if not behind and not outbox.pending():
                    yield client.close()
                    return
                for i in range(BATCH if behind else 0):
                    recipient = behind[i % len(behind)]
                    if counts[recipient] >= args.count:
                        continue
                    counts[recipient] += 1
                    text = f"{identity.name} to {recipient} #{counts[recipient]}".encode()
                    # Sealed with the pinned key: no round trip before it is queued.
                    yield queue_message(outbox, identity, recipient, text, contacts=home)
                say(f"flushing {len(outbox.pending())}")
                result = yield outbox.flush(client)
                say(f"flushed: {len(result.accepted)} accepted, {len(result.held)} held"
                    + (f" ({result.held[0][1]})" if result.held else ""))
                if client.close_reason is not None or client.closed.called:
                    break
                if result.held:
                    yield task.deferLater(reactor, 0.1, lambda: None)
            yield client.close()

    task.react(lambda reactor: run(reactor))


def recipient_worker(args) -> None:
    """Receive for good: record, print to C{--shown}, acknowledge; reconnect when cut."""
    from twisted.internet import endpoints, task
    from twisted.internet.defer import inlineCallbacks

    from mailrelay import keys
    from mailrelay.client.inbox import home_inbox

    home = keys.Home(args.home)
    identity = home.load()
    inbox = home_inbox(home)
    shown = open(args.shown, "a", encoding="utf-8")

    def on_message(opened) -> None:
        shown.write(json.dumps({"from": opened.sender, "id": opened.message_id.hex(),
                                "seq": opened.header.seq}) + "\n")
        shown.flush()

    @inlineCallbacks
    def run(reactor):
        endpoint = endpoints.clientFromString(reactor, args.server)
        while True:
            client = yield _connect_forever(reactor, endpoint, home, identity, args.server,
                                            on_message=on_message, inbox=inbox)
            yield client.closed
            yield task.deferLater(reactor, 0.1, lambda: None)

    task.react(lambda reactor: run(reactor))


# The orchestrator ------------------------------------------------------------


class Worker:
    def __init__(self, kind: str, name: str, argv: list[str], log: Path) -> None:
        self.kind = kind
        self.name = name
        self.argv = argv
        self.log = log
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        out = open(self.log, "a")
        self.process = subprocess.Popen(
            [sys.executable, __file__, *self.argv], stdout=out, stderr=subprocess.STDOUT,
            env=environment())
        out.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.kills += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(path: Path, sql: str) -> list[tuple]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # the worker has not created its tables yet
    finally:
        db.close()


def count(path: Path, table: str) -> int:
    rows = query(path, f"SELECT count(*) FROM {table}")
    return rows[0][0] if rows else 0


def make_homes(root: Path, senders: list[str], recipients: list[str]) -> dict[str, Path]:
    from mailrelay import keys

    homes: dict[str, Path] = {}
    identities = {}
    for name in senders + recipients:
        homes[name] = root / "homes" / name
        # 2048-bit keys: the smallest allowed, to spend the time on delivery.
        identities[name] = keys.Home(homes[name]).create(name, bits=2048)
    for name in senders:
        for other in recipients:
            keys.Home(homes[name]).pin(other, identities[other].public_der)
    return homes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="in all (default 10000)")
    parser.add_argument("--senders", type=int, default=5)
    parser.add_argument("--recipients", type=int, default=4)
    parser.add_argument("--relay-kills", type=int, default=20)
    parser.add_argument("--client-kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="seconds before the run counts as failed (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    per_pair = max(1, args.messages // (args.senders * args.recipients))
    total = per_pair * args.senders * args.recipients
    senders = [f"sender{i}" for i in range(args.senders)]
    recipients = [f"rcpt{i}" for i in range(args.recipients)]
    root = Path(tempfile.mkdtemp(prefix="mailrelay-crash-"))
    print(f"crash test: {total} messages ({args.senders} senders x {args.recipients} "
          f"recipients x {per_pair}), {args.relay_kills} relay kills, {args.client_kills} "
          f"client kills, seed {seed}, in {root}", flush=True)
    homes = make_homes(root, senders, recipients)
    data = root / "relay"
    data.mkdir()
    port = free_port()
    server = f"tcp:127.0.0.1:{port}"
    relay = Relay(data, "--window", "16")
    relay_kills = 0
    workers: list[Worker] = []
    started = time.monotonic()
    failed: list[str] = []
    client_kills = 0
    try:
        relay.start(port)
        for name in recipients:
            # Registered before anyone sends to them: the real CLI's first session.
            done = cli(homes[name], server, "recv", "--timeout", "0.1")
            if done.returncode != 0:
                raise SystemExit(f"cannot register {name}: {done.stderr}")
        for name in senders:
            workers.append(Worker("sender", name, [
                "worker-send", "--home", str(homes[name]), "--server", server,
                "--to", ",".join(recipients), "--count", str(per_pair)],
                root / f"{name}.log"))
        for name in recipients:
            workers.append(Worker("recipient", name, [
                "worker-recv", "--home", str(homes[name]), "--server", server,
                "--shown", str(root / f"{name}.shown")], root / f"{name}.log"))
        for worker in workers:
            worker.start()

        def accepted_count() -> int:
            return sum(count(homes[s] / "outbox.sqlite", "sent") for s in senders)

        # Kills happen as the accepted count crosses thresholds spread over
        # the run, each after a random delay: every phase of delivery is hit.
        events = ([("relay", total * (i + 1) / (args.relay_kills + 1))
                   for i in range(args.relay_kills)]
                  + [("client", total * (i + 0.5) / (args.client_kills + 1))
                     for i in range(args.client_kills)])
        events.sort(key=lambda e: e[1])
        deadline = started + args.time_limit
        while events and time.monotonic() < deadline:
            if accepted_count() < events[0][1]:
                time.sleep(0.05)
                if all(not w.running() for w in workers if w.kind == "sender"):
                    break
                continue
            what, _ = events.pop(0)
            time.sleep(rng.uniform(0, 0.3))
            if what == "relay":
                relay.kill()
                relay_kills += 1
                relay.start(port)
            else:
                worker = rng.choice([w for w in workers if w.running()] or workers)
                worker.kill()
                client_kills += 1
                worker.start()
        # The rest of the run: senders finish, recipients catch up.
        while time.monotonic() < deadline:
            for w in workers:
                if w.kind == "sender" and not w.running() and w.process.returncode != 0:
                    failed.append(f"{w.name} exited with {w.process.returncode}")
            if failed or all(not w.running() for w in workers if w.kind == "sender"):
                break
            time.sleep(0.2)
        while time.monotonic() < deadline and not failed:
            received = sum(count(homes[r] / "inbox.sqlite", "messages") for r in recipients)
            if received >= accepted_count():
                break
            time.sleep(0.2)
        else:
            if not failed:
                failed.append(f"not finished within {args.time_limit:g} s")
    finally:
        for worker in workers:
            worker.kill()
        relay.stop()
    elapsed = time.monotonic() - started

    # The verdict, from the clients' own files.
    accepted: dict[tuple[str, str], dict[bytes, int]] = defaultdict(dict)
    queued_left = 0
    for s in senders:
        path = homes[s] / "outbox.sqlite"
        for message_id, recipient, seq in query(path,
                                                "SELECT message_id, recipient, seq FROM sent"):
            accepted[s, recipient][bytes(message_id)] = seq
        queued_left += len(query(path, "SELECT 1 FROM outbox"))
    lost = duplicated = reordered = unprinted = 0
    received_total = 0
    for r in recipients:
        rows = query(homes[r] / "inbox.sqlite",
                     "SELECT sender, message_id, seq FROM messages ORDER BY rowid")
        received_total += len(rows)
        got = {(s, bytes(m)) for s, m, _ in rows}
        highest: dict[str, int] = {}
        for s, _, seq in rows:
            if seq <= highest.get(s, 0):
                reordered += 1
            highest[s] = max(highest.get(s, 0), seq)
        for s in senders:
            lost += sum(1 for m in accepted[s, r] if (s, m) not in got)
        shown_path = root / f"{r}.shown"
        printed = Counter()
        if shown_path.exists():
            for line in shown_path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    printed[entry["from"], entry["id"]] += 1
        duplicated += sum(n - 1 for n in printed.values() if n > 1)
        unprinted += sum(1 for s, m, _ in rows if (s, bytes(m).hex()) not in printed)
    accepted_total = sum(len(v) for v in accepted.values())
    refused = sum(count(homes[s] / "outbox.sqlite", "failed") for s in senders)
    if refused:
        failed.append(f"the relay refused {refused} message(s) for good (see the outboxes)")
    print(f"accepted {accepted_total}, shown {received_total}, lost {lost}, "
          f"duplicated {duplicated}, reordered {reordered}")
    print(f"relay kills {relay_kills}, client kills {client_kills}, still queued "
          f"{queued_left}, recorded but not printed {unprinted}, {elapsed:.1f} s "
          f"({accepted_total / elapsed:.0f} messages/s), seed {seed}")
    ok = (not failed and lost == 0 and duplicated == 0 and reordered == 0
          and accepted_total == total and queued_left == 0 and relay_kills == args.relay_kills
          and refused == 0)
    for reason in failed:
        print(f"FAILED: {reason}")
    if accepted_total != total:
        print(f"FAILED: {accepted_total} of {total} messages were accepted")
    if relay_kills != args.relay_kills:
        print(f"FAILED: only {relay_kills} of {args.relay_kills} relay kills happened")
    print("crash test passed" if ok else f"crash test FAILED; logs in {root}", flush=True)
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("worker-"):
        worker = argparse.ArgumentParser()
        worker.add_argument("kind")
        worker.add_argument("--home", required=True)
        worker.add_argument("--server", required=True)
        worker.add_argument("--to")
        worker.add_argument("--count", type=int)
        worker.add_argument("--shown")
        wargs = worker.parse_args()
        (sender_worker if wargs.kind == "worker-send" else recipient_worker)(wargs)
    else:
        sys.exit(main())
