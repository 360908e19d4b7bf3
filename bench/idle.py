"""
Idle sessions: what one authenticated, idle connection costs the relay in
resident memory.

A relay is mostly idle connections: people's `mailrelay recv` or chat
sessions waiting for the next message.  Their count, not the message rate,
is what sizes a relay's memory, so this measures, on a real `twistd
mailrelay` (SQLite store, loopback TCP):

  baseline  the relay's VmRSS once a few sessions are authenticated (one
            receiving session per identity and a few sending ones): imports,
            the store, the directory and the code paths are all warm
  loaded    its VmRSS once COUNT more sessions are authenticated and idle
            (send-only sessions, so many of one identity coexist), after a
            short settle

and reports (loaded - baseline) / COUNT, the resident bytes per session.
Each COUNT gets a relay of its own: a ramp in one process would let the
second figure reuse what the allocator kept from the first, and the first
pay for the second's growth of shared tables.

The sessions are opened by generator processes (this module run with
--generator), one per core (two at most): each AUTH needs an RSA-3072 signature over the
relay's per-connection challenge (about 1 ms), so 10,000 sessions are about
10 s of client CPU.  Each generator keeps a bounded number of handshakes in
flight, so the relay's auth deadline never fires, holds its sessions open
until told to close, and reports how long setting them up took.

`python bench/idle.py --breakdown N` runs the relay in this very process
instead, under tracemalloc, opens N sessions against it the same way, and
lists where the Python-level memory per session is allocated (memory
allocated outside Python's allocator, by OpenSSL or the kernel's socket
buffers, is not in that list: compare with the RSS figure).

Bounded: at most the COUNTs asked for, a deadline on every wait, and every
child process killed on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay import keys, wire  # noqa: E402

BIN = Path(sys.executable).parent

IDENTITIES = 8
"""Identities the sessions are spread over; each has one receiving session."""

WARM_SENDERS = 24
"""Send-only sessions opened with the receiving ones, before the baseline."""

HANDSHAKES_IN_FLIGHT = 16
"""
Connections one generator has between connect and WELCOME at once.  Two
generators stay under the relay's listen backlog (Twisted's default, 50):
beyond it, connections are dropped and retried a second later, which would
count as setup time.
"""

SETTLE = 2.0
"""Seconds the relay is left alone before its memory is read."""

STARTUP_DEADLINE = 30.0
"""Seconds a relay or a generator has to start."""

HOLD_LIMIT = 900.0
"""Seconds a generator keeps its sessions open at most, whatever it is told."""


class BenchError(Exception):
    """The benchmark could not run as planned; the message says why."""


# Process helpers, shared with bench/client.py


def raise_nofile(wanted: int) -> int:
    """
    Raise this process's open-file limit to at least C{wanted} if allowed
    (as root, the hard limit too, up to fs.nr_open); the limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard < wanted:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = wanted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, nr_open),) * 2)
            return min(wanted, nr_open)
        except (ValueError, OSError):
            pass  # not root: the old hard limit is the most we get
    new = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (or another /proc status field) in KiB; -1 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used so far; -1 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    # utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after C{grace} seconds: nothing outlives the benchmark."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


class Relay:
    """
    A real C{twistd mailrelay} on a free loopback port, SQLite store in
    C{work}, for as long as a C{with} block: started and reachable on
    entry, terminated (killed if need be) on exit.
    """

    def __init__(self, bin_dir: Path, work: Path, name: str, extra: Sequence[str] = (),
                 nofile: int | None = None) -> None:
        self.bin_dir = Path(bin_dir).absolute()
        self.work = work
        self.log = work / f"{name}.log"
        self.data = work / f"{name}-var"
        self.extra = list(extra)
        self.nofile = nofile
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def server(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def rss_kib(self, field: str = "VmRSS") -> int:
        return rss_kib(self.pid, field)

    def __enter__(self) -> Relay:
        self.work.mkdir(parents=True, exist_ok=True)
        # A fresh relay each time: an old log would say "listening" already,
        # and an old store would hold other keys for the same identities.
        for old in self.work.glob(f"{self.log.name}*"):
            old.unlink()
        shutil.rmtree(self.data, ignore_errors=True)
        nofile = self.nofile
        command = [
            str(self.bin_dir / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(self.log),
            "mailrelay", "--port", f"tcp:{self.port}:interface=127.0.0.1",
            "--store", "sqlite", "--data", str(self.data), *self.extra,
        ]
        try:
            self.proc = subprocess.Popen(
                command, cwd=self.work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=(lambda: raise_nofile(nofile)) if nofile else None,
            )
        except OSError as e:
            raise BenchError(f"cannot start {command[0]}: {e.strerror or e}") from None
        try:
            self._wait_listening()
        except BaseException:
            stop_process(self.proc)
            raise
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the relay exited with status {self.proc.returncode}: "
                                 f"{self.log_tail()}")
            # The log says so once the port is bound: no probe connection
            # that would be a session of its own.
            if self.log.exists() and "mailrelay listening on" in self.log.read_text(
                    errors="replace"):
                return
            time.sleep(0.05)
        raise BenchError(f"the relay did not listen within {STARTUP_DEADLINE:g} s: "
                         f"{self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# Identities


def make_identities(directory: Path, count: int = IDENTITIES) -> list[Path]:
    """C{count} RSA-3072 identities as unprotected PEM files, for the generators."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        identity = keys.Identity.generate(f"idle-{n}")
        path = directory / f"{identity.name}.pem"
        path.write_bytes(keys.private_pem(identity.private_key, None))
        paths.append(path)
    return paths


def load_identities(paths: Sequence[Path]) -> list[keys.Identity]:
    """
    The identities L{make_identities} wrote.  They are not validated again:
    `cryptography` checks an RSA private key on every load (about 0.1 s for
    RSA-3072), and these were generated a moment ago by the parent process.
    """
    from cryptography.hazmat.primitives import serialization

    return [keys.Identity(path.stem, serialization.load_pem_private_key(
                path.read_bytes(), None, unsafe_skip_rsa_key_validation=True))
            for path in paths]


# The generator: a child process holding sessions open


def generator_main(port: int, key_files: Sequence[Path], count: int, offset: int,
                   receivers: bool, in_flight: int, deadline: float) -> None:
    """
    Open C{count} authenticated sessions to the relay on C{port}, at most
    C{in_flight} handshakes at once; print one JSON line when they are all
    up (or the deadline passed), then keep them open.  Reads commands from
    standard input: C{status} prints how many are still open, C{close} (or
    the end of input) closes them all and exits.
    """
    raise_nofile(count + 256)
    from twisted.internet import reactor, threads
    from twisted.internet.protocol import ClientFactory, Protocol
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Warnings and failures to standard error (the generators' log file);
    # nothing per connection.
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])], redirectStandardIO=False)

    identities = load_identities(key_files)
    ders = [identity.public_der for identity in identities]
    plan_size = count
    started = time.perf_counter()
    cpu_started = time.process_time()
    state = {"next": 0, "connecting": 0, "ready": 0, "failed": 0, "lost": 0, "reported": False}
    errors: list[str] = []
    sessions: set[Protocol] = set()

    class Session(Protocol):
        def __init__(self, index: int) -> None:
            self.index = index
            self.identity = identities[(offset + index) % len(identities)]
            self.der = ders[(offset + index) % len(identities)]
            self.receive = receivers and index < len(identities)
            self.frames = wire.FrameBuffer(wire.MIN_FRAME_ROOM)
            self.up = False

        def dataReceived(self, data: bytes) -> None:
            for frame in self.frames.feed(data):
                if isinstance(frame, wire.Hello):
                    transcript = wire.auth_transcript(frame.challenge, frame.relay,
                                                      self.identity.name, self.receive)
                    self.transport.write(wire.encode(wire.Auth(
                        wire.PROTOCOL_VERSION, self.identity.name, self.der,
                        self.identity.sign(transcript), self.receive)))
                elif isinstance(frame, wire.Welcome):
                    self.up = True
                    self.frames.set_limit(frame.max_envelope)
                    sessions.add(self)
                    finished(ok=True)
                elif isinstance(frame, wire.Error) and len(errors) < 5:
                    errors.append(f"{frame.code.name}: {frame.text}")

        def connectionLost(self, reason) -> None:
            if self.up:
                state["lost"] += 1
                sessions.discard(self)
            else:
                if len(errors) < 5:
                    errors.append(reason.getErrorMessage())
                finished(ok=False)

    class Factory(ClientFactory):
        noisy = False

        def __init__(self, index: int) -> None:
            self.index = index

        def buildProtocol(self, addr):
            return Session(self.index)

        def clientConnectionFailed(self, connector, reason) -> None:
            if len(errors) < 5:
                errors.append(reason.getErrorMessage())
            finished(ok=False)

    def emit(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def launch() -> None:
        while state["connecting"] < in_flight and state["next"] < plan_size:
            index = state["next"]
            state["next"] += 1
            state["connecting"] += 1
            reactor.connectTCP("127.0.0.1", port, Factory(index), timeout=30)

    def finished(ok: bool) -> None:
        state["connecting"] -= 1
        state["ready" if ok else "failed"] += 1
        if state["ready"] + state["failed"] == plan_size:
            report(timed_out=False)
        else:
            launch()

    def report(timed_out: bool) -> None:
        if state["reported"]:
            return
        state["reported"] = True
        emit({"ready": state["ready"], "failed": state["failed"], "timed_out": timed_out,
              "seconds": time.perf_counter() - started,
              "cpu": time.process_time() - cpu_started, "errors": errors[:5]})

    def too_late() -> None:
        if not state["reported"]:
            report(timed_out=True)

    def commands() -> None:
        """In a thread: standard input blocks."""
        for line in sys.stdin:
            if line.strip() == "status":
                reactor.callFromThread(
                    emit, {"open": len(sessions), "lost": state["lost"]})
            elif line.strip() == "close":
                break
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(launch)
    reactor.callLater(deadline, too_late)
    reactor.callLater(HOLD_LIMIT, reactor.stop)
    reactor.suggestThreadPoolSize(1)
    threads.deferToThread(commands)
    reactor.run()
    os._exit(0)  # the command thread may still be blocked on standard input


class Generator:
    """The parent's handle on one generator process."""

    def __init__(self, python: Path, port: int, key_files: Sequence[Path], count: int,
                 offset: int, receivers: bool, deadline: float, log: Path) -> None:
        self.count = count
        self.log = log
        self.started = time.perf_counter()
        command = [str(python), str(Path(__file__).resolve()), "--generator",
                   "--port", str(port), "--count", str(count), "--offset", str(offset),
                   "--in-flight", str(HANDSHAKES_IN_FLIGHT), "--deadline", str(deadline)]
        if receivers:
            command.append("--receivers")
        command += [str(p) for p in key_files]
        self._stderr = open(log, "ab")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self._pending = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def read(self, deadline: float) -> dict:
        """The generator's next JSON line, or L{BenchError} by C{deadline} (monotonic)."""
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"a generator did not answer in time (see {self.log})")
            if self._selector.select(timeout=left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"a generator exited early with status "
                                     f"{self.proc.poll()} (see {self.log})")
                self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, deadline: float) -> dict:
        answer = self.read(deadline)
        answer["wall"] = time.perf_counter() - self.started
        return answer

    def status(self, deadline: float) -> dict:
        self.proc.stdin.write(b"status\n")
        self.proc.stdin.flush()
        return self.read(deadline)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(b"close\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
        finally:
            stop_process(self.proc, grace=5)
            self._selector.close()
            self.proc.stdout.close()
            self._stderr.close()


def open_sessions(python: Path, port: int, key_files: Sequence[Path], count: int,
                  processes: int, receivers: bool, log: Path, generators: list[Generator],
                  deadline: float) -> dict:
    """
    Open C{count} sessions from C{processes} generators (appended to
    C{generators}, for the caller to close); wait until all are up.
    """
    share, extra = divmod(count, processes)
    started = time.perf_counter()
    mine = []
    offset = 0
    for n in range(processes):
        size = share + (1 if n < extra else 0)
        if not size:
            continue
        generator = Generator(python, port, key_files, size, offset, receivers and n == 0,
                              max(deadline - time.monotonic(), 1.0), log)
        generators.append(generator)
        mine.append(generator)
        offset += size
    # Each generator gives up at the deadline itself and says how far it got:
    # wait a little longer than that for its answer.
    answers = [g.wait_ready(deadline + 10) for g in mine]
    wall = time.perf_counter() - started
    ready = sum(a["ready"] for a in answers)
    if ready != count:
        problems = sorted({e for a in answers for e in a["errors"]})
        raise BenchError(f"only {ready} of {count} sessions authenticated"
                         f"{' (deadline passed)' if any(a['timed_out'] for a in answers) else ''}"
                         f": {'; '.join(problems) or 'no reason given'}")
    return {"wall_s": wall, "connect_s": max(a["seconds"] for a in answers),
            "cpu_s": sum(a["cpu"] for a in answers), "processes": len(mine)}


def read_settled_rss(relay: Relay, settle: float) -> int:
    """VmRSS after C{settle} seconds, the median of three readings half a second apart."""
    time.sleep(settle)
    readings = []
    for _ in range(3):
        readings.append(relay.rss_kib())
        time.sleep(0.5)
    if min(readings) < 0:
        raise BenchError(f"the relay is gone: {relay.log_tail()}")
    return sorted(readings)[1]


def measure_count(bin_dir: Path, work: Path, key_files: Sequence[Path], count: int,
                  deadline_s: float) -> dict:
    """One relay, a warm baseline, then C{count} more idle sessions."""
    bin_dir = Path(bin_dir).absolute()
    python = bin_dir / "python" if (bin_dir / "python").exists() else Path(sys.executable)
    margin = 1024
    flags = ["--max-sessions", str(count + margin), "--max-per-peer", str(count + margin),
             "--idle-timeout", "3600", "--auth-timeout", "300", "--rate", "0"]
    processes = 1 if count <= 200 else max(1, min(2, os.cpu_count() or 1))
    generators: list[Generator] = []
    log = work / f"idle-generators-{count}.log"
    log.unlink(missing_ok=True)
    with Relay(bin_dir, work, f"idle-relay-{count}", flags, nofile=count + 2 * margin) as relay:
        try:
            deadline = time.monotonic() + deadline_s
            warm = IDENTITIES + WARM_SENDERS
            open_sessions(python, relay.port, key_files, warm, 1, True, log, generators,
                          deadline)
            baseline = read_settled_rss(relay, SETTLE)
            relay_cpu = cpu_seconds(relay.pid)
            setup = open_sessions(python, relay.port, key_files, count, processes, False, log,
                                  generators, deadline)
            relay_cpu = cpu_seconds(relay.pid) - relay_cpu
            loaded = read_settled_rss(relay, SETTLE)
            still_open = sum(g.status(time.monotonic() + 30)["open"] for g in generators)
            if still_open != warm + count:
                raise BenchError(f"{warm + count - still_open} sessions were closed while "
                                 f"idle: {relay.log_tail()}")
            peak = relay.rss_kib("VmHWM")
        finally:
            for generator in generators:
                generator.close()
        closed = read_settled_rss(relay, SETTLE)
    return {
        "count": count,
        "baseline_kib": baseline,
        "rss_kib": loaded,
        "peak_kib": peak,
        "after_close_kib": closed,
        "bytes_per_session": (loaded - baseline) * 1024 / count,
        "setup_s": setup["wall_s"],
        "connect_s": setup["connect_s"],
        "generator_processes": setup["processes"],
        "generator_cpu_ms_per_session": setup["cpu_s"] * 1000 / count,
        "relay_cpu_ms_per_session": relay_cpu * 1000 / count,
        "warm_sessions": warm,
    }


def _kib(value: float) -> str:
    return f"{value / 1024:.1f} KiB"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def measure(bin_dir: Path, work: Path, counts: Sequence[int] = (1000, 10000),
            quick: bool = False, deadline_s: float = 300.0) -> dict:
    """
    Resident memory per idle session, one fresh relay per count in C{counts}
    (C{quick}: 100 sessions only).  Returns C{sessions} (per count: RSS
    before and after in KiB, bytes per session, setup time) and C{table},
    (label, value) rows for a report.
    """
    if quick:
        counts = (100,)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    key_files = make_identities(work / "idle-keys")
    keygen = time.perf_counter() - started
    sessions: dict[str, dict] = {}
    table: list[tuple[str, str]] = []
    for count in counts:
        result = measure_count(bin_dir, work, key_files, count, deadline_s)
        sessions[str(count)] = result
        table.append((f"idle RSS per session at {count:,}",
                      f"{_kib(result['bytes_per_session'])} "
                      f"({_mib(result['baseline_kib'])} -> {_mib(result['rss_kib'])})"))
        table.append((f"open+auth {count:,} sessions ({result['generator_processes']} "
                      f"generator process{'es' if result['generator_processes'] > 1 else ''})",
                      f"{result['setup_s']:.1f} s ({count / result['connect_s']:,.0f}/s "
                      f"once started)"))
        table.append((f"CPU per session set up, {count:,}",
                      f"relay {result['relay_cpu_ms_per_session']:.2f} ms, generator "
                      f"{result['generator_cpu_ms_per_session']:.2f} ms"))
        table.append((f"relay RSS after the {count:,} closed",
                      f"{_mib(result['after_close_kib'])} (peak {_mib(result['peak_kib'])})"))
    return {"sessions": sessions, "keygen_s": keygen, "table": table}


# In-process breakdown under tracemalloc


def breakdown(count: int, work: Path, top: int = 15) -> dict:
    """
    Run the relay in this process under tracemalloc, open C{count}
    sessions from generator processes, then close them.  Returns
    C{per_session}: the allocation sites that grew with the sessions open,
    as (site, bytes per session), largest first, with their total first;
    and C{retained}: the Python bytes still allocated, per session, once
    they are all closed again (what a leak would show as).
    """
    import gc
    import linecache
    import tracemalloc

    raise_nofile(count + 2048)
    tracemalloc.start(1)
    from twisted.internet import reactor, threads
    from twisted.internet.threads import blockingCallFromThread
    from twisted.logger import globalLogBeginner

    from mailrelay.relay import tap

    key_files = make_identities(work / "idle-keys")
    port = free_port()
    options = tap.Options()
    options.parseOptions([
        "--port", f"tcp:{port}:interface=127.0.0.1", "--store", "sqlite",
        "--data", str(work / "breakdown-var"), "--max-sessions", str(count + 1024),
        "--max-per-peer", str(count + 1024), "--idle-timeout", "3600",
        "--auth-timeout", "300", "--rate", "0",
    ])
    service = tap.makeService(options, reactor)
    python = BIN / "python" if (BIN / "python").exists() else Path(sys.executable)
    outcome: list = []
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]

    def snapshot() -> tracemalloc.Snapshot:
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces(ignore)

    def drive() -> None:
        """In a thread: the reactor serves the relay meanwhile."""
        warm: list[Generator] = []
        load: list[Generator] = []
        log = work / "breakdown-generators.log"
        try:
            deadline = time.monotonic() + 300
            open_sessions(python, port, key_files, IDENTITIES + WARM_SENDERS, 1, True, log,
                          warm, deadline)
            time.sleep(SETTLE)
            before = blockingCallFromThread(reactor, snapshot)
            open_sessions(python, port, key_files, count, 2, False, log, load, deadline)
            time.sleep(SETTLE)
            loaded = blockingCallFromThread(reactor, snapshot)
            for generator in load:
                generator.close()
            time.sleep(SETTLE)
            closed = blockingCallFromThread(reactor, snapshot)
            outcome.append((before, loaded, closed))
        except Exception as e:
            outcome.append(e)
        finally:
            for generator in warm + load:
                generator.close()
            reactor.callFromThread(reactor.stop)

    # Discard the relay's log: until logging begins, events are buffered,
    # and would count as per-session memory.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    service.privilegedStartService()
    service.startService()
    reactor.callWhenRunning(threads.deferToThread, drive)
    reactor.callLater(600, reactor.stop)
    reactor.run()
    if not outcome:
        raise BenchError("the breakdown did not finish within 600 s")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    before, loaded, closed = outcome[0]
    stats = loaded.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    rows = [("total (Python allocations)", round(total / count))]
    for stat in stats[:top]:
        frame = stat.traceback[0]
        source = linecache.getline(frame.filename, frame.lineno).strip()[:60]
        rows.append((f"{_short(frame.filename)}:{frame.lineno}  {source}",
                     round(stat.size_diff / count), round(stat.count_diff / count, 2)))
    retained = sum(s.size_diff for s in closed.compare_to(before, "lineno"))
    return {"per_session": rows, "retained": round(retained / count)}


def _short(filename: str) -> str:
    for marker in ("site-packages/", "mailrelay/", "lib/python"):
        if marker in filename:
            return filename[filename.index(marker):]
    return filename


def print_table(table: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in table)
    for label, value in table:
        print(f"  {label:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 sessions only")
    parser.add_argument("--counts", type=lambda s: tuple(int(c) for c in s.split(",")),
                        default=(1000, 10000), help="comma-separated session counts")
    parser.add_argument("--breakdown", type=int, metavar="N",
                        help="instead: tracemalloc breakdown of N sessions, relay in-process")
    parser.add_argument("--work", type=Path, help="keep files here (default: a temporary dir)")
    # The generator's own options (internal).
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, default=HANDSHAKES_IN_FLIGHT,
                        help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--receivers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("keys", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generator:
        generator_main(args.port, args.keys, args.count, args.offset, args.receivers,
                       args.in_flight, args.deadline)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="mailrelay-idle-"))
    try:
        if args.breakdown:
            found = breakdown(args.breakdown, work)
            print(f"relay memory per idle session, by allocation site "
                  f"({args.breakdown:,} sessions, tracemalloc, relay in-process):")
            print_table([(row[0], f"{row[1]:,} B" + (f" in {row[2]:g} blocks" if len(row) > 2
                                                      else ""))
                         for row in found["per_session"]])
            print(f"  still allocated per session once all are closed: {found['retained']:,} B")
            return
        result = measure(BIN, work, args.counts, quick=args.quick)
    except BenchError as e:
        raise SystemExit(f"idle bench: {e}") from None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("mailrelay idle sessions: relay VmRSS, SQLite store, loopback TCP, RSA-3072 keys")
    print_table(result["table"])


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
