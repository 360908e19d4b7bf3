"""
The crash test: messages are never lost, never shown twice, never reordered,
while the relay and the clients are killed with SIGKILL at random moments.

    .venv/bin/python tools/crash_test.py                 # 10,000 messages, 20 relay kills
    .venv/bin/python tools/crash_test.py --messages 1000 --relay-kills 5 --client-kills 5

Sender and recipient processes run the real C{mailrelay} command against a
real C{twistd mailrelay} on its SQLite store.  Each recipient is a
C{mailrelay recv --json}, started again whenever it exits.  Each sender sends
its messages one at a time, each by its own C{mailrelay send} process, and
after a send that failed runs C{mailrelay flush} until that exits 0.  (The
send and flush processes are forked from a worker that has already imported
the command, and run its C{main} as the installed C{mailrelay} does: that
spares the run a thousand interpreter starts.)  Meanwhile the relay is
killed and restarted on the same data directory, and senders (with their
send in flight) and recipients are killed and started again on the same
homes, alternately, at moments spread over the whole run.

The verdict rests on what the commands printed, collected by this script,
not on the product's own records: a message is I{accepted} when C{send} or
C{flush} printed "Message ID accepted by the relay for R.", and I{shown}
when a recipient's C{recv --json} printed it; each text is one this script
chose, so it also says who sent it, to whom, and in which place.  The run
fails if any of these is not 0: accepted but never printed; lost (accepted,
and neither printed nor recorded in the recipient's inbox); recorded (listed
by C{mailrelay inbox}) but not printed; a send that ended without being
killed whose text was never printed; printed twice; printed after a later
message of the same sender; printed but never sent (or with another text
than the one sent under that id).  It also fails unless, at the end, every
outbox is empty (C{mailrelay outbox --json} prints nothing), a fresh
C{mailrelay recv} for each recipient gets nothing, and the relay's store
file, read once the relay has stopped, holds no message; unless every kill
asked for was made (client kills on senders and recipients both); and if a
command printed a traceback, a worker failed or the run did not finish in
time.  Only a send killed before it printed anything may come to nothing:
the message may never have reached the outbox.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.processes import BIN, Relay, cli, environment, stored_messages  # noqa: E402

MARK = "crash-test: "
"""The prefix of the lines a sender worker writes itself, among its commands' output."""
ACCEPTED = re.compile(r"^Message ([0-9a-f]{32}) accepted by the relay for (\S+)\.$")
"""What C{mailrelay send} and C{mailrelay flush} print for each message the relay accepted."""
TEXT = re.compile(r"^(\S+) to (\S+) #(\d+)$")
RESTART_AFTER = 0.3
"""Seconds before a recipient that exited (the relay was down, say) is started again."""


def text_of(sender: str, recipient: str, number: int) -> str:
    """The text of C{sender}'s message number C{number} to C{recipient}."""
    return f"{sender} to {recipient} #{number}"


def plan(recipients: list[str], count: int) -> list[tuple[str, int]]:
    """A sender's messages, in the order it sends them: (recipient, number)."""
    return [(r, k) for k in range(1, count + 1) for r in recipients]


# The sender worker -------------------------------------------------------------


def sender_worker(args) -> None:
    """
    Send the messages of L{plan} from C{--start} on, each by a C{mailrelay
    send} process of its own; drain the outbox with C{mailrelay flush} first
    (a killed predecessor may have left a message there) and after every
    send that failed, so that every message accepted is announced by the
    command that sent it.  Writes C{MARK} lines around each command.
    """
    from mailrelay import cli as command
    from mailrelay import keys

    name = keys.Home(args.home).load_name()
    common = ["--home", args.home, "--server", args.server]

    def say(line: str) -> None:
        print(MARK + line, flush=True)

    def run(argv: list[str]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                command.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def drain() -> None:
        while True:
            say("flush")
            code = run(["flush", *common])
            say(f"exit {code}")
            if code == 0:
                return
            time.sleep(0.2)

    drain()
    messages = plan(args.to.split(","), args.count)
    for index in range(args.start, len(messages)):
        recipient, number = messages[index]
        say(f"send {index}")
        code = run(["send", *common, "--to", recipient, text_of(name, recipient, number)])
        say(f"exit {code}")
        if code != 0:
            drain()
    say("done")


# What the processes printed ------------------------------------------------------


class Tail:
    """The complete lines a file gained since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


@dataclass
class Attempt:
    """One C{mailrelay send} of the plan, as its output tells it."""
    index: int
    message_id: str | None = None
    exit: int | None = None
    cut: bool = False


class SenderLog:
    """A sender worker's standard output, read as it grows."""

    def __init__(self, name: str, path: Path, recipients: list[str], count: int) -> None:
        self.name = name
        self.tail = Tail(path)
        self.plan = plan(recipients, count)
        self.accepted: dict[str, str] = {}
        """Message id -> recipient, for every "accepted" line."""
        self.attempts: dict[int, Attempt] = {}
        self.current: Attempt | str | None = None
        """The command running: an L{Attempt} (a send), "flush", or None."""
        self.done = False
        self.odd: list[str] = []

    def update(self) -> None:
        for line in self.tail.lines():
            if line.startswith(MARK):
                word, _, rest = line[len(MARK):].partition(" ")
                if word in ("send", "flush", "done"):
                    self.cut()
                if word == "send":
                    self.current = self.attempts[int(rest)] = Attempt(int(rest))
                elif word == "flush":
                    self.current = "flush"
                elif word == "exit":
                    if isinstance(self.current, Attempt):
                        self.current.exit = int(rest)
                    self.current = None
                elif word == "done":
                    self.done = True
                continue
            match = ACCEPTED.match(line)
            if match:
                message_id, recipient = match.groups()
                self.accepted[message_id] = recipient
                if isinstance(self.current, Attempt):
                    self.current.message_id = message_id
                    if recipient != self.plan[self.current.index][0]:
                        self.odd.append(f"send {self.current.index} printed: {line}")
            elif line != "The outbox is empty.":
                self.odd.append(line)

    def cut(self) -> None:
        """The command running (if any) was killed before it exited."""
        if isinstance(self.current, Attempt) and self.current.exit is None:
            self.current.cut = True
        self.current = None

    def next_index(self) -> int:
        return max(self.attempts, default=-1) + 1


class RecipientLog:
    """A recipient's C{recv --json} lines, over all its processes."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.tail = Tail(path)
        self.records: list[dict] = []
        self.garbled: list[str] = []

    def update(self) -> None:
        for line in self.tail.lines():
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(line)
            except ValueError:
                self.garbled.append(line)
                continue
            self.records.append(record)


# The processes -----------------------------------------------------------------


class Process:
    """A client process, its output appended to files that outlive it."""

    def __init__(self, kind: str, name: str, argv: list[str], out: Path, err: Path) -> None:
        self.kind = kind
        self.name = name
        self.argv = argv
        self.out = out
        self.err = err
        self.process: subprocess.Popen | None = None
        self.exited_at = 0.0
        self.starts = 0

    def start(self, *extra: str) -> None:
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            # A session of its own: a kill takes the worker and the command it runs.
            self.process = subprocess.Popen(
                [*self.argv, *extra], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=environment(), start_new_session=True)
        self.starts += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> bool:
        """SIGKILL the process and what it started; False if it had already exited."""
        if not self.running():
            return False
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.process.wait(timeout=30)
        self.exited_at = time.monotonic()
        return self.process.returncode == -signal.SIGKILL

    def terminate(self) -> None:
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def together(calls: list[tuple]) -> list[subprocess.CompletedProcess]:
    """Run the C{mailrelay} commands C{calls} (arguments of L{cli}) at once; their results."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: cli(*call), calls))


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


# The run -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="in all (default 10000)")
    parser.add_argument("--senders", type=int, default=5)
    parser.add_argument("--recipients", type=int, default=4)
    parser.add_argument("--relay-kills", type=int, default=20)
    parser.add_argument("--client-kills", type=int, default=20,
                        help="alternately of a sender and of a recipient (default 20)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="seconds for the messages to go through (default 900)")
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
    relay = Relay(data, "--window", "16")
    logs = {s: SenderLog(s, root / f"{s}.out", recipients, per_pair) for s in senders}
    shown = {r: RecipientLog(r, root / f"{r}.out") for r in recipients}
    workers: list[Process] = []  # once the relay has its port
    failed: list[str] = []
    relay_kills = 0
    client_kills: Counter[str] = Counter()
    started = time.monotonic()
    finished = False

    def update() -> None:
        for log in logs.values():
            log.update()
        for log in shown.values():
            log.update()

    def expected_for(recipient: str) -> int:
        return sum(1 for log in logs.values() for r in log.accepted.values() if r == recipient)

    def client_kill(kind: str) -> bool:
        """Kill a running client of C{kind}: a sender mid-command, a recipient with work."""
        candidates = [w for w in workers if w.kind == kind and w.running()]
        if kind == "sender":
            busy = [w for w in candidates if logs[w.name].current is not None]
        else:
            busy = [w for w in candidates
                    if len(shown[w.name].records) < expected_for(w.name)]
        for worker in rng.sample(busy, len(busy)) + rng.sample(candidates, len(candidates)):
            if not worker.kill():
                continue
            client_kills[kind] += 1
            if kind == "sender":
                log = logs[worker.name]
                log.update()
                log.cut()
                worker.start("--start", str(log.next_index()))
            return True
        return False

    try:
        # On a port the kernel picks; after each kill, restarted on the same one.
        port = relay.start().port
        server = relay.server
        workers += (
            [Process("sender", s, [sys.executable, __file__, "worker-send", "--home",
                                   str(homes[s]), "--server", server, "--to",
                                   ",".join(recipients), "--count", str(per_pair)],
                     root / f"{s}.out", root / f"{s}.err") for s in senders]
            + [Process("recipient", r, [str(BIN / "mailrelay"), "recv", "--json", "--home",
                                        str(homes[r]), "--server", server],
                       root / f"{r}.out", root / f"{r}.err") for r in recipients])
        for name in recipients:
            # Registered before anyone sends to them: the real CLI's first session.
            done = cli(homes[name], server, "recv", "--timeout", "0.1")
            if done.returncode != 0:
                raise SystemExit(f"cannot register {name}: {done.stderr}")
        for worker in workers:
            worker.start(*(["--start", "0"] if worker.kind == "sender" else []))

        # Kills happen as the accepted count crosses thresholds spread over
        # the run, each after a random delay: every phase of delivery is hit.
        # Client kills alternate between senders and recipients; when none of
        # the kind is running, the other kind is killed.
        kinds = rng.sample(["sender", "recipient"], 2)
        events = ([(total * (i + 1) / (args.relay_kills + 1), "relay")
                   for i in range(args.relay_kills)]
                  + [(total * (i + 0.5) / (args.client_kills + 1), kinds[i % 2])
                     for i in range(args.client_kills)])
        events.sort(key=lambda e: e[0])
        deadline = started + args.time_limit
        while time.monotonic() < deadline:
            update()
            now = time.monotonic()
            for w in workers:
                if w.running():
                    continue
                if w.kind == "recipient":
                    if not w.exited_at:
                        w.exited_at = now
                    elif now - w.exited_at >= RESTART_AFTER:
                        w.exited_at = 0.0
                        w.start()
                else:
                    logs[w.name].update()  # its last lines, written before it exited
                    if not logs[w.name].done or w.process.returncode != 0:
                        failed.append(f"{w.name}'s worker exited with "
                                      f"{w.process.returncode} before it was done "
                                      f"(see {w.err})")
            if failed:
                break
            senders_done = all(log.done for log in logs.values())
            accepted = sum(len(log.accepted) for log in logs.values())
            # Once the senders are done, what is left of the kills happens at once.
            if events and (accepted >= events[0][0] or senders_done):
                what = events[0][1]
                time.sleep(rng.uniform(0, 0.3))
                if what == "relay":
                    relay.kill()
                    relay_kills += 1
                    relay.start(port)
                    events.pop(0)
                elif client_kill(what) or client_kill(kinds[kinds.index(what) - 1]):
                    events.pop(0)
                continue
            if not events and senders_done and not waiting_for(logs, shown):
                finished = True
                break
            time.sleep(0.05)
        if not finished and not failed:
            failed.append(f"not finished within {args.time_limit:g} s"
                          + (f" ({len(events)} kill(s) not made)" if events else ""))
        # Stopped at once: a message the relay still holds (shown but not
        # yet acknowledged, say) goes to the fresh recv below, which fails
        # the run if it prints it, shown again or shown late.
        for worker in workers:
            if worker.kind == "recipient":
                worker.terminate()
            else:
                worker.kill()
        update()
        running = time.monotonic() - started

        # The end state, through the commands and the stopped relay's file.
        recorded: dict[str, set[tuple[str, str]]] = {}
        inboxes = together([(homes[r], None, "inbox", "--json") for r in recipients])
        outboxes = together([(homes[s], None, "outbox", "--json") for s in senders])
        fresh = together([(homes[r], server, "recv", "--json", "--timeout", "3")
                          for r in recipients])
        for r, done in zip(recipients, inboxes):
            if done.returncode != 0:
                failed.append(f"mailrelay inbox for {r} failed: {done.stderr.strip()}")
            recorded[r] = {(rec["from"], rec["id"]) for rec in map(json.loads,
                                                                     done.stdout.splitlines())
                           if rec.get("type") == "message"}
        for s, done in zip(senders, outboxes):
            if done.returncode != 0 or done.stdout.strip():
                failed.append(f"{s}'s outbox is not empty at the end: "
                              f"{(done.stdout + done.stderr).strip()[:300]}")
        late = 0
        for r, done in zip(recipients, fresh):
            late += len(done.stdout.splitlines())
            if done.returncode != 0:
                failed.append(f"a last mailrelay recv for {r} failed: {done.stderr.strip()}")
        if late:
            failed.append(f"a fresh mailrelay recv, once everything was printed, got {late} "
                          f"message(s)")
    finally:
        for worker in workers:
            worker.kill()
        relay.stop()
    try:
        left = stored_messages(data)
    except (AssertionError, sqlite3.Error) as e:
        left = None
        failed.append(f"cannot read the relay's store: {e}")
    if left:
        failed.append(f"the relay's store still holds {left} message(s) at the end")
    elapsed = time.monotonic() - started

    # The verdict, from what the commands printed.
    counts = verdict(logs, shown, recorded)
    for worker in workers:
        errors = worker.err.read_text(errors="replace") if worker.err.exists() else ""
        if "Traceback" in errors:
            failed.append(f"{worker.name}: a command printed a traceback (see {worker.err})")
    for log in logs.values():
        if log.odd:
            failed.append(f"{log.name}: unexpected output: {log.odd[0]!r}"
                          + (f" and {len(log.odd) - 1} more" if len(log.odd) > 1 else ""))
    if relay_kills != args.relay_kills:
        failed.append(f"only {relay_kills} of {args.relay_kills} relay kills were made")
    made = sum(client_kills.values())
    if made != args.client_kills:
        failed.append(f"only {made} of {args.client_kills} client kills were made")
    elif args.client_kills >= 2 and min(client_kills["sender"], client_kills["recipient"]) == 0:
        failed.append(f"the client kills did not hit both kinds: {dict(client_kills)}")
    for name, value in counts.items():
        if name in FAILING and value:
            failed.append(f"{value} {name.replace('_', ' ')}")

    print(f"planned {total}, accepted {counts['accepted']} (as send and flush printed), "
          f"shown {counts['shown']} (as recv printed)")
    print(f"lost {counts['lost']}, accepted but never printed "
          f"{counts['accepted_but_never_printed']}, recorded but not printed "
          f"{counts['recorded_but_not_printed']}, sent but never printed "
          f"{counts['sent_but_never_printed']}, duplicated {counts['duplicated']}, reordered "
          f"{counts['reordered']}, foreign {counts['foreign']}")
    print(f"sends killed before they exited {counts['cut']} ({counts['cut_shown']} shown "
          f"anyway), relay kills {relay_kills}/{args.relay_kills}, client kills "
          f"{made}/{args.client_kills} ({client_kills['sender']} senders, "
          f"{client_kills['recipient']} recipients), recv started "
          f"{sum(w.starts for w in workers if w.kind == 'recipient')} times")
    print(f"relay store at the end: {left} message(s); {running:.1f} s to deliver "
          f"({counts['shown'] / running:.0f} messages/s), {elapsed:.1f} s in all, seed {seed}")
    for reason in failed:
        print(f"FAILED: {reason}")
    ok = not failed
    print("crash test passed" if ok else f"crash test FAILED; logs in {root}", flush=True)
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


FAILING = ("lost", "accepted_but_never_printed", "recorded_but_not_printed",
           "sent_but_never_printed", "duplicated", "reordered", "foreign")
"""The counts of L{verdict} that fail the run unless 0."""


def waiting_for(logs: dict[str, SenderLog], shown: dict[str, RecipientLog]) -> list[str]:
    """The messages still to be printed: every one accepted, and every send not killed."""
    texts = {rec.get("text") for log in shown.values() for rec in log.records}
    ids = {(rec.get("from"), rec.get("id")) for log in shown.values() for rec in log.records}
    waiting = [f"{log.name} {m}" for log in logs.values() for m in log.accepted
               if (log.name, m) not in ids]
    waiting += [text_of(log.name, *log.plan[i]) for log in logs.values()
                for i, a in log.attempts.items()
                if not a.cut and a.message_id is None
                and text_of(log.name, *log.plan[i]) not in texts]
    return waiting


def verdict(logs: dict[str, SenderLog], shown: dict[str, RecipientLog],
            recorded: dict[str, set[tuple[str, str]]]) -> dict[str, int]:
    """
    The counts: what was accepted, what was shown, and each way a message
    can go wrong (L{FAILING}), from the senders' and recipients' output and
    what each recipient's inbox lists.
    """
    counts = Counter()
    texts_by_id: dict[tuple[str, str], str] = {}
    for log in logs.values():
        for a in log.attempts.values():
            if a.message_id is not None:
                texts_by_id[log.name, a.message_id] = text_of(log.name, *log.plan[a.index])
    printed_ids: set[tuple[str, str]] = set()
    printed_texts: Counter[str] = Counter()
    for r, log in shown.items():
        counts["foreign"] += len(log.garbled)
        highest: dict[str, int] = {}
        for rec in log.records:
            counts["shown"] += 1
            sender, message_id, text = rec.get("from"), rec.get("id"), rec.get("text")
            match = TEXT.match(text) if isinstance(text, str) else None
            if (rec.get("type") != "message" or rec.get("to") != r or match is None
                    or match.group(1) != sender or match.group(2) != r
                    or sender not in logs
                    or texts_by_id.get((sender, message_id), text) != text):
                counts["foreign"] += 1
                continue
            printed_ids.add((sender, message_id))
            printed_texts[text] += 1
            if printed_texts[text] > 1:
                continue  # shown twice, counted once below, not also as reordered
            number = int(match.group(3))
            if number <= highest.get(sender, 0):
                counts["reordered"] += 1
            highest[sender] = max(highest.get(sender, 0), number)
    counts["duplicated"] = sum(n - 1 for n in printed_texts.values())
    for log in logs.values():
        counts["accepted"] += len(log.accepted)
        for message_id, r in log.accepted.items():
            if (log.name, message_id) not in printed_ids:
                counts["accepted_but_never_printed"] += 1
                if (log.name, message_id) not in recorded.get(r, set()):
                    counts["lost"] += 1
        for a in log.attempts.values():
            text = text_of(log.name, *log.plan[a.index])
            if a.cut:
                counts["cut"] += 1
                counts["cut_shown"] += text in printed_texts
            elif text not in printed_texts:
                counts["sent_but_never_printed"] += 1
    for r, ids in recorded.items():
        counts["recorded_but_not_printed"] += len(ids - printed_ids)
    return counts


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker-send":
        worker = argparse.ArgumentParser()
        worker.add_argument("kind")
        worker.add_argument("--home", required=True)
        worker.add_argument("--server", required=True)
        worker.add_argument("--to", required=True)
        worker.add_argument("--count", type=int, required=True)
        worker.add_argument("--start", type=int, default=0)
        sender_worker(worker.parse_args())
    else:
        sys.exit(main())
