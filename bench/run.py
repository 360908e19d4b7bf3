#!/usr/bin/env python3
"""
`make bench`: mailrelay's throughput and latency against two references.

For each configuration (--configs), number of pairs (--pairs) and envelope
size (--sizes), starts a fresh server on an ephemeral loopback port and
--procs load generator processes (bench/loadgen.py), lets them warm up, then
measures for a fixed time:

  memory     twistd mailrelay --store memory
  sqlite     twistd mailrelay --store sqlite (durable, the default store)
  bare       reference A: bench/forwarder.py, a bare Twisted frame forwarder
  mosquitto  reference B: Mosquitto, MQTT 3.1.1 at QoS 1, one topic a pair

first at saturation (each sender keeps --window messages unaccepted), then at
a fixed offered rate (--rate messages/s over --rate-pairs pairs, 1 KiB) for
latency.  It reports delivered and accepted messages/s, end-to-end latency
percentiles, the server's CPU and peak RSS and the generators' CPU, and
fails (exit 1) if any message accepted was lost or delivered twice, or any
send refused.  Then
the idle-connection and client measures (bench/idle.py, bench/client.py),
when present.

Writes OUT/<UTC time>.json, .md and .png (and copies them to OUT/latest.*);
prints the markdown.  bench/README.md says what each figure means.

Bounded: every phase has a deadline; --quick (CI) runs in about a minute,
the default run in under ten.  Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib
import json
import os
import platform
import pwd
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from tests.skips import in_ci  # noqa: E402  (what counts as CI, as for the tests)

BIN = Path(sys.executable).parent
CONFIGS = ("memory", "sqlite", "bare", "mosquitto")
PAIRS = (1, 10, 100, 1000)
SIZES = (1024, 16384)
CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = os.cpu_count() or 1
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class RunFailed(Exception):
    pass


# --- child processes ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In each child: its own process group, and SIGKILL if this orchestrator dies."""
    os.setpgid(0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Children:
    """Every process a run starts; L{kill_all} ends them and their process groups."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, **kw) -> subprocess.Popen:
        try:
            proc = subprocess.Popen([str(a) for a in argv], preexec_fn=_child_setup, **kw)
        finally:
            for stream in (kw.get("stdout"), kw.get("stderr")):
                if hasattr(stream, "close"):
                    stream.close()  # the child has its own copy of a log file
        self.procs.append(proc)
        return proc

    def _kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def kill_all(self) -> None:
        for proc in self.procs:
            self._kill(proc)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"server exited with {proc.returncode}: {tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RunFailed(f"server not listening on {port} after {timeout:.0f} s: {tail(log)}")


def tail(paths, lines: int = 3) -> str:
    """The last lines of a log file (or of each of a list of them), on one line."""
    out = []
    for path in paths if isinstance(paths, list) else [paths]:
        with contextlib.suppress(OSError):
            out += path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(out) or "(nothing logged)"


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def system_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal, in ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def system_share(before: list[int], after: list[int], ours_pct: float) -> dict:
    """
    What the whole machine did over an interval, in % of one core (NPROC x 100 in
    all): busy, busy outside this run's processes (others), stolen by the
    hypervisor (steal), waiting for I/O (iowait).
    """
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    scale = 100.0 * NPROC / total
    busy = (d[0] + d[1] + d[2] + d[5] + d[6]) * scale
    return {"busy_pct": round(busy, 1), "others_pct": round(max(0.0, busy - ours_pct), 1),
            "steal_pct": round(d[7] * scale, 1), "iowait_pct": round(d[4] * scale, 1)}


def status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# --- servers ----------------------------------------------------------------------


def start_server(config: str, work: Path, children: Children, args) -> tuple:
    port = free_port()
    log = work / "server.log"
    if config in ("memory", "sqlite"):
        argv = [BIN / "twistd", "--nodaemon", "--pidfile=", "--logfile", log, "mailrelay",
                "--port", f"tcp:{port}:interface=127.0.0.1", "--store", config,
                "--data", work / "var", "--rate", "0", "--quota-messages", "0",
                "--quota-bytes", "0", "--quota-per-sender", "0",
                "--quota-per-sender-bytes", "0", "--max-per-peer", "0", "--max-sessions", "0",
                "--window", args.relay_window, "--idle-timeout", "3600",
                "--auth-timeout", "120"]
        proc = children.start(argv, cwd=work, stdout=open(work / "server.err", "wb"),
                              stderr=subprocess.STDOUT)
        log = [work / "server.err", log]
    elif config == "bare":
        proc = children.start([sys.executable, ROOT / "bench" / "forwarder.py", "--port", port],
                              cwd=work, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    elif config == "mosquitto":
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"# written by bench/run.py\n"
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # Run as whoever runs this: a broker started by root would otherwise switch to
            # the mosquitto user, which clears the parent-death signal (_child_setup).
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            # Same bounds as the relay: 64 unacknowledged deliveries a subscriber (the
            # relay's --window), and no cap on queued messages (the relay's quota is off).
            f"max_inflight_messages {args.relay_window}\n"
            "max_queued_messages 0\n"
            # Mosquitto's default leaves Nagle on, which coalesces its small packets: its
            # better setting here (--mosquitto-nodelay to compare: bench/README.md).
            f"set_tcp_nodelay {'true' if args.mosquitto_nodelay else 'false'}\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n")
        proc = children.start([MOSQUITTO, "-c", conf], cwd=work, stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))
    else:
        raise ValueError(config)
    return proc, port, log


# --- one run ------------------------------------------------------------------------


def _reader(index: int, stream, lines: queue.Queue) -> None:
    for raw in stream:
        lines.put((index, raw.decode(errors="replace").rstrip("\n")))
    lines.put((index, None))


def split(pairs: int, procs: int) -> list[tuple[int, int]]:
    procs = max(1, min(procs, pairs))
    base, extra = divmod(pairs, procs)
    out, first = [], 0
    for k in range(procs):
        count = base + (1 if k < extra else 0)
        out.append((first, count))
        first += count
    return out


def run_load(config: str, pairs: int, size: int, mode: str, rate: float, args,
             work_root: Path, index: int) -> dict:
    """One measured run on a fresh server; a dict of its figures (never raises RunFailed)."""
    target = {"memory": "relay", "sqlite": "relay", "bare": "bare", "mosquitto": "mqtt"}[config]
    work = work_root / f"{index:02d}-{config}-{mode}-{pairs}-{size}"
    work.mkdir()
    measure = args.measure
    record = {"config": config, "mode": mode, "pairs": pairs, "size": size,
              "window": args.window, "warmup_s": args.warmup, "measure_s": measure,
              "rate_target": rate if mode == "rate" else None}
    children = Children()
    tag = os.urandom(4).hex()
    connect_timeout = 60 + 0.1 * pairs
    try:
        phases = record["phases_s"] = {}
        t = time.monotonic()
        # The server and the generators start at once: the generators load their keys and
        # seal their envelopes while the server starts, and connect when told to.
        server, port, log = start_server(config, work, children, args)
        lines: queue.Queue = queue.Queue()
        gens = []
        for k, (first, count) in enumerate(split(pairs, args.procs)):
            argv = [sys.executable, ROOT / "bench" / "loadgen.py", "--target", target,
                    "--port", port, "--first", first, "--count", count, "--proc", k,
                    "--size", size, "--window", args.window, "--mode", mode,
                    "--warmup", args.warmup, "--measure", measure, "--drain", args.drain,
                    "--connect-timeout", connect_timeout, "--tag", tag,
                    "--seed", args.seed, "--key-dir", args.key_dir]
            if mode == "rate":
                argv += ["--rate", rate * count / pairs]
            proc = children.start(argv, cwd=work, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=open(work / f"loadgen-{k}.err", "wb"))
            threading.Thread(target=_reader, args=(k, proc.stdout, lines), daemon=True).start()
            gens.append(proc)
        record["procs"] = len(gens)

        def expect(word: str, deadline: float) -> dict:
            got: dict[int, str] = {}
            while len(got) < len(gens):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(len(gens))) - set(got))
                    raise RunFailed(f"no {word} from generators {missing} in time: "
                                    f"{tail(work / f'loadgen-{missing[0]}.err')}")
                try:
                    k, line = lines.get(timeout=min(left, 0.5))
                except queue.Empty:
                    if server.poll() is not None:
                        raise RunFailed(f"server exited with {server.returncode}: {tail(log)}")
                    continue
                if line is None and k in got:
                    continue  # done: a generator exits once it has written its RESULT
                if line is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        gens[k].wait(timeout=5)
                    raise RunFailed(f"generator {k} exited ({gens[k].returncode}) before {word}: "
                                    f"{tail(work / f'loadgen-{k}.err')}")
                if line.startswith(word):
                    got[k] = line[len(word):].strip()
            return got

        wait_port(port, server, log)
        phases["server_start"] = round(time.monotonic() - t, 2)
        expect("LOADED", time.monotonic() + 60)
        phases["generators_start"] = round(time.monotonic() - t, 2)
        for proc in gens:
            proc.stdin.write(b"CONNECT\n")
            proc.stdin.flush()
        expect("READY", time.monotonic() + connect_timeout + 30)
        phases["connected"] = round(time.monotonic() - t, 2)
        # One start time for every generator, on the clock they all read (CLOCK_MONOTONIC).
        t_start = time.perf_counter_ns() + 100_000_000
        for proc in gens:
            proc.stdin.write(f"GO {t_start}\n".encode())
            proc.stdin.flush()
        t0 = t_start + int(args.warmup * 1e9)
        t1 = t0 + int(measure * 1e9)
        pids = [server.pid] + [g.pid for g in gens]
        time.sleep(max(0.0, (t0 - time.perf_counter_ns()) / 1e9))
        spy = start_profile(server.pid, measure, work) if args.profile else None
        c0, s0, w0 = [cpu_ticks(p) for p in pids], system_ticks(), time.perf_counter_ns()
        time.sleep(max(0.0, (t1 - time.perf_counter_ns()) / 1e9))
        c1, s1, w1 = [cpu_ticks(p) for p in pids], system_ticks(), time.perf_counter_ns()
        if spy is not None:
            record["profile"] = finish_profile(spy, work, args.out, args.stamp,
                                               f"{config}-{mode}-{pairs}-{size}")
        rss_at_end = status_kib(server.pid, "VmRSS")
        pct = [100.0 * (b - a) / CLK_TCK / ((w1 - w0) / 1e9) for a, b in zip(c0, c1)]
        results = expect("RESULT", time.monotonic() + args.drain + 60)
        phases["drained"] = round(time.monotonic() - t, 2)
        hwm = status_kib(server.pid, "VmHWM")
        if server.poll() is not None:
            raise RunFailed(f"server exited with {server.returncode}: {tail(log)}")
        for proc in gens:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Every figure is in: no need to wait for a graceful stop.
        children.kill_all()
        phases["stopped"] = round(time.monotonic() - t, 2)
        record.update(summarise([json.loads(r) for r in results.values()], measure,
                                mode, rate))
        record.update({
            "server_cpu_pct": round(pct[0], 1),
            "gen_cpu_pct": [round(p, 1) for p in pct[1:]],
            "system": system_share(s0, s1, sum(pct)),
            "server_rss_mib": round(rss_at_end / 1024, 1) if rss_at_end else None,
            "server_rss_peak_mib": round(hwm / 1024, 1) if hwm else None,
        })
        record["bound"] = bound(record["server_cpu_pct"], record["gen_cpu_pct"],
                                record["system"])
    except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
        if not isinstance(e, RunFailed):
            traceback.print_exc()
        record["ok"] = False
        record["failures"] = [f"{type(e).__name__}: {e}" if not isinstance(e, RunFailed)
                              else str(e)]
    finally:
        children.kill_all()
    return record


PY_SPY = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")


def start_profile(pid: int, seconds: float, work: Path) -> subprocess.Popen | None:
    """py-spy sampling the server (every thread, Python frames) for the measuring interval."""
    if PY_SPY is None:
        print("bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen(
        [PY_SPY, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", "250", "--format", "raw", "--output", str(work / "profile.txt")],
        stdout=subprocess.DEVNULL, stderr=open(work / "py-spy.err", "wb"))


def finish_profile(spy: subprocess.Popen, work: Path, out: Path, stamp: str,
                   label: str) -> dict:
    """
    The profile's summary for the JSON: the functions where the server's
    samples were (own time) and the ones they passed through (total), in %
    of all samples; the collapsed stacks are kept beside the results (they
    load in speedscope or flamegraph.pl).
    """
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        return {"error": "py-spy did not finish"}
    raw = work / "profile.txt"
    if not raw.exists():
        return {"error": f"py-spy failed: {tail([work / 'py-spy.err'])}"}
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    kept = out / f"{stamp}-profile-{label}.txt"
    shutil.copyfile(raw, kept)

    def top(counts: dict[str, int], n: int) -> list:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [[frame, round(100.0 * c / max(samples, 1), 1)] for frame, c in best]

    return {"samples": samples, "own_pct": top(own, 25), "total_pct": top(total, 40),
            "stacks": str(kept.relative_to(ROOT) if kept.is_relative_to(ROOT) else kept)}


def summarise(parts: list[dict], measure: float, mode: str, rate: float) -> dict:
    total = {k: sum(p[k] for p in parts) for k in (
        "sent", "sent_window", "scheduled_window", "accepted", "accepted_window",
        "completed_window", "delivered", "lost", "unaccepted", "delivered_unaccepted",
        "dup_accepted", "dup_delivered", "foreign", "error_count", "lat_n")}
    hist = loadgen.merge_hists(p["hist"] for p in parts)

    def ms(q):
        v = loadgen.percentile(hist, q)
        return None if v is None else round(v / 1000, 3)

    failures = []
    if total["lost"]:
        failures.append(f"{total['lost']} accepted messages never delivered (lost)")
    if total["dup_delivered"]:
        failures.append(f"{total['dup_delivered']} messages delivered twice")
    if total["dup_accepted"]:
        failures.append(f"{total['dup_accepted']} messages accepted twice")
    if total["unaccepted"]:
        failures.append(f"{total['unaccepted']} messages sent and never accepted")
    if total["foreign"]:
        failures.append(f"{total['foreign']} deliveries or accepts of unknown messages")
    if total["error_count"]:
        errors = [e for p in parts for e in p["errors"]]
        failures.append(f"{total['error_count']} errors, first: {errors[0]}")
    if not all(p["drained"] for p in parts):
        failures.append("not drained within --drain seconds")
    out = {
        "delivered_per_s": round(total["completed_window"] / measure, 1),
        "accepted_per_s": round(total["accepted_window"] / measure, 1),
        "offered_per_s": round(total["sent_window"] / measure, 1),
        "latency_ms": {"p50": ms(0.50), "p99": ms(0.99), "p999": ms(0.999),
                       "max": round(max(p["lat_max_us"] for p in parts) / 1000, 3),
                       "samples": total["lat_n"]},
        "counts": total,
        # The merged histogram: [bucket middle in µs, count] (128 buckets a power of two).
        "latency_hist_us": [[loadgen.bucket_value(i), hist[i]] for i in sorted(hist)],
        "connect_s": max(p["connect_s"] for p in parts),
        "drain_s": max(p["drain_s"] for p in parts),
        "ok": not failures,
        "failures": failures,
    }
    if mode == "rate":
        out["scheduled_per_s"] = round(total["scheduled_window"] / measure, 1)
    return out


def bound(server: float, gens: list[float], system: dict) -> str:
    """Which side ran out of CPU over the measuring interval (see bench/README.md)."""
    busy_server, busy_gen = server >= 90, bool(gens) and max(gens) >= 90
    if busy_server and busy_gen:
        return "server+generator"
    if busy_server:
        return "server"
    if busy_gen:
        return "generator"
    if system["busy_pct"] + system["steal_pct"] >= 90 * NPROC:
        return "cpus"
    return "-"


# --- reporting --------------------------------------------------------------------------


def machine_info() -> dict:
    import twisted

    def cmd(argv) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                  cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    mosquitto = ""
    if os.path.exists(MOSQUITTO):
        out = cmd([MOSQUITTO, "-h"]).splitlines()
        mosquitto = out[0].replace("mosquitto version ", "") if out else ""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": NPROC,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": mosquitto,
        "commit": cmd(["git", "rev-parse", "HEAD"]),
        "dirty": bool(cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


def _n(v, digits=0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _others(r: dict) -> str:
    system = r.get("system")
    return f"{system['others_pct']:.0f} / {system['steal_pct']:.0f}" if system else "–"


def _check(r: dict) -> str:
    return "ok" if r.get("ok") else "FAIL: " + "; ".join(r.get("failures", []))[:120]


def render_markdown(doc: dict) -> str:
    m = doc["machine"]
    out = [f"# mailrelay benchmark, {doc['started']}", ""]
    out.append(f"{m['nproc']} cores ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
               f"Twisted {m['twisted']}, SQLite {m['sqlite']}, "
               f"Mosquitto {m['mosquitto'] or 'absent'}; "
               f"commit {m['commit'][:12]}{' (with uncommitted changes)' if m['dirty'] else ''}.")
    out.append(f"Flags: `{doc['argv']}`. Window {doc['flags']['window']} unaccepted messages a "
               f"sender, {doc['flags']['procs']} generator processes at most, warm-up "
               f"{doc['flags']['warmup']} s, measured {doc['flags']['measure']} s.")
    out.append("")
    sat = [r for r in doc["runs"] if r["mode"] == "saturate"]
    if sat:
        out += ["## Saturation", "",
                "| config | pairs | envelope | delivered/s | accepted/s | p50 ms | p99 ms | "
                "p99.9 ms | server CPU % | server peak RSS MiB | generator CPU % | "
                "others / steal % | bound | check |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
        for r in sat:
            lat = r.get("latency_ms", {})
            out.append(
                f"| {r['config']} | {r['pairs']} | {_size(r['size'])} | "
                f"{_n(r.get('delivered_per_s'))} | {_n(r.get('accepted_per_s'))} | "
                f"{_n(lat.get('p50'), 2)} | {_n(lat.get('p99'), 2)} | {_n(lat.get('p999'), 2)} | "
                f"{_n(r.get('server_cpu_pct'))} | {_n(r.get('server_rss_peak_mib'), 1)} | "
                f"{' + '.join(f'{p:.0f}' for p in r.get('gen_cpu_pct', [])) or '–'} | "
                f"{_others(r)} | {r.get('bound', '–')} | {_check(r)} |")
        out.append("")
    fixed = [r for r in doc["runs"] if r["mode"] == "rate"]
    if fixed:
        out += ["## Fixed offered rate (open loop, latency from the scheduled send time)", "",
                "| config | pairs | envelope | target/s | offered/s | delivered/s | p50 ms | "
                "p99 ms | p99.9 ms | max ms | server CPU % | server peak RSS MiB | "
                "generator CPU % | others / steal % | check |",
                "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in fixed:
            lat = r.get("latency_ms", {})
            out.append(
                f"| {r['config']} | {r['pairs']} | {_size(r['size'])} | {_n(r['rate_target'])} | "
                f"{_n(r.get('offered_per_s'))} | {_n(r.get('delivered_per_s'))} | "
                f"{_n(lat.get('p50'), 2)} | {_n(lat.get('p99'), 2)} | {_n(lat.get('p999'), 2)} | "
                f"{_n(lat.get('max'), 1)} | {_n(r.get('server_cpu_pct'))} | "
                f"{_n(r.get('server_rss_peak_mib'), 1)} | "
                f"{' + '.join(f'{p:.0f}' for p in r.get('gen_cpu_pct', [])) or '–'} | "
                f"{_others(r)} | {_check(r)} |")
        out.append("")
    shared = [r for r in doc["runs"] if r.get("system")
              and r["system"]["others_pct"] + r["system"]["steal_pct"] > 25]
    if shared:
        out += [f"{len(shared)} of {len(doc['runs'])} runs shared the machine (others + steal "
                f"over 25% of a core): their figures are less reliable.", ""]
    ratios = ratio_lines(sat)
    if ratios:
        out += ["## Ratios of delivered/s (saturation)", ""] + ratios + [""]
    for key, title in (("idle", "Idle connections (bench/idle.py)"),
                       ("client", "Client (bench/client.py)")):
        section = doc.get(key)
        if section is None:
            continue
        out += [f"## {title}", ""]
        rows = section.get("table") if isinstance(section, dict) else None
        if rows is None and isinstance(section, dict):
            rows = [(k, v) for k, v in section.items()
                    if isinstance(v, (int, float, str, bool)) or v is None]
        out += ["| figure | value |", "|---|--:|"]
        out += [f"| {label} | {value} |" for label, value in rows or []]
        out.append("")
    out.append("PASS: no message lost or duplicated." if doc["ok"] else
               "FAIL: see the check column and the failures in the JSON.")
    return "\n".join(out) + "\n"


def ratio_lines(sat: list[dict]) -> list[str]:
    by = {(r["config"], r["pairs"], r["size"]): r for r in sat if r.get("ok")}
    lines, starred = [], False
    for a, b in (("memory", "bare"), ("sqlite", "mosquitto"), ("sqlite", "memory")):
        for size in sorted({r["size"] for r in sat}):
            parts = []
            for pairs in sorted({r["pairs"] for r in sat}):
                x, y = by.get((a, pairs, size)), by.get((b, pairs, size))
                if x and y and x["delivered_per_s"] and y["delivered_per_s"]:
                    star = "*" if "generator" in x["bound"] + y["bound"] else ""
                    starred |= bool(star)
                    parts.append(f"{pairs} pair{'s' if pairs > 1 else ''} "
                                 f"{x['delivered_per_s'] / y['delivered_per_s']:.2f}{star}")
            if parts:
                lines.append(f"- {a} / {b}, {_size(size)}: " + ", ".join(parts))
    if starred:
        lines.append("- \\* a generator process was at 90% of a core or more in one of the two "
                     "runs: that figure is a lower bound on the server's, so the ratio is "
                     "only an estimate.")
    return lines


def render_png(doc: dict, path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sat = [r for r in doc["runs"] if r["mode"] == "saturate" and r.get("ok")]
    size = 1024 if any(r["size"] == 1024 for r in sat) else min((r["size"] for r in sat),
                                                                 default=1024)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in CONFIGS:
        rows = sorted((r for r in sat if r["config"] == config and r["size"] == size),
                      key=lambda r: r["pairs"])
        if not rows:
            continue
        xs = [r["pairs"] for r in rows]
        ax1.plot(xs, [r["delivered_per_s"] for r in rows], marker="o", label=config)
        ax2.plot(xs, [r["latency_ms"]["p99"] or float("nan") for r in rows], marker="o",
                 label=config)
    for ax, title, unit in ((ax1, "throughput", "delivered messages/s"),
                            (ax2, "p99 latency, SEND written to DELIVER read", "ms")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sender/recipient pairs")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"make bench {doc['started']}: saturation, {_size(size)} envelopes, window "
                 f"{doc['flags']['window']}; commit {m['commit'][:10]}, {m['nproc']} cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def optional_measure(name: str, work: Path, quick: bool, **kw):
    """bench.<name>.measure(...), if that module exists; its dict, or an error."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return None
        return {"error": f"cannot import bench/{name}.py: {e}"}
    except Exception as e:  # noqa: BLE001
        return {"error": f"cannot import bench/{name}.py: {type(e).__name__}: {e}"}
    work.mkdir(parents=True, exist_ok=True)
    try:
        return module.measure(BIN, work, quick=quick, **kw)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"bench/{name}.py measure failed: {type(e).__name__}: {e}"}


# --- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="make bench: mailrelay against a bare forwarder and Mosquitto "
                    "(bench/README.md)")
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    p.add_argument("--quick", action="store_true",
                   help="CI size: pairs 1,10; 1 KiB; warm-up 1 s, measure 2 s; fixed rate "
                        "1000/s over 10 pairs, relay only; idle counts 100; about a minute")
    p.add_argument("--pairs", type=ints, help=f"pair counts (default {','.join(map(str, PAIRS))})")
    p.add_argument("--sizes", type=ints, help="envelope sizes in bytes (default 1024,16384)")
    p.add_argument("--configs", type=lambda s: tuple(x for x in s.split(",") if x),
                   help=f"servers to measure (default {','.join(CONFIGS)})")
    p.add_argument("--shapes", type=lambda s: tuple(x for x in s.split(",") if x),
                   default=("saturate", "rate"),
                   help="load shapes: saturate, rate or both (default saturate,rate)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (default 2)")
    p.add_argument("--measure", type=float, help="seconds measured (default 5)")
    p.add_argument("--procs", type=int, default=max(1, min(4, NPROC - 1)),
                   help="load generator processes at most (default: one core for the server, "
                        "the others for generators, at most 4; here %(default)s)")
    p.add_argument("--window", type=int, default=64,
                   help="unaccepted messages a sender (default 64)")
    p.add_argument("--relay-window", type=int, default=64,
                   help="unacknowledged deliveries a recipient (relay --window, Mosquitto "
                        "max_inflight_messages; default 64)")
    p.add_argument("--rate", type=float, help="fixed-rate run: messages/s (default 5000; 0: none)")
    p.add_argument("--rate-pairs", type=int, help="fixed-rate run: pairs (default 100)")
    p.add_argument("--mosquitto-nodelay", action="store_true",
                   help="set_tcp_nodelay true in Mosquitto, as the relay and the forwarder do "
                        "(default: Mosquitto's own, false)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds a run may take to deliver what is left after measuring "
                        "(default 60)")
    p.add_argument("--seed", type=int, default=1, help="seed of the plaintext bytes")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="where the results go (default bench/results)")
    p.add_argument("--key-dir", type=Path, default=loadgen.KEY_DIR,
                   help="the cache of RSA keys (default build/bench/keys)")
    p.add_argument("--no-idle", action="store_true", help="skip bench/idle.py")
    p.add_argument("--profile", action="store_true",
                   help="sample each server with py-spy while measuring: the top functions "
                        "go in the JSON, the stacks beside it")
    p.add_argument("--no-client", action="store_true", help="skip bench/client.py")
    args = p.parse_args(argv)
    q = args.quick
    args.pairs = args.pairs or ((1, 10) if q else PAIRS)
    args.sizes = args.sizes or ((1024,) if q else SIZES)
    args.configs = args.configs or CONFIGS
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 2.0)
    args.measure = args.measure if args.measure is not None else (2.0 if q else 5.0)
    args.rate = args.rate if args.rate is not None else (1000.0 if q else 5000.0)
    args.rate_pairs = args.rate_pairs or (10 if q else 100)
    for shape in args.shapes:
        if shape not in ("saturate", "rate"):
            p.error(f"unknown shape {shape!r}: saturate or rate")
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}: choose from {', '.join(CONFIGS)}")
    if min(args.pairs) < 1 or args.procs < 1 or args.window < 1 or args.measure <= 0:
        p.error("pairs, --procs, --window and --measure must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    started = datetime.datetime.now(datetime.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    args.stamp = stamp
    args.out.mkdir(parents=True, exist_ok=True)
    configs = list(args.configs)
    if "mosquitto" in configs and not os.path.exists(MOSQUITTO):
        print(f"bench: no {MOSQUITTO}: skipping the mosquitto configuration", file=sys.stderr)
        configs.remove("mosquitto")
    needed = max(max(args.pairs) if "saturate" in args.shapes else 0,
                 args.rate_pairs if "rate" in args.shapes and args.rate else 0)
    loadgen.ensure_keys(needed, args.key_dir,
                        log=lambda m: print(m, file=sys.stderr))
    plan = []
    if "saturate" in args.shapes:
        plan += [(c, n, s, "saturate", 0.0) for c in configs for s in args.sizes
                 for n in args.pairs]
    if "rate" in args.shapes and args.rate:
        # --quick (CI) keeps the fixed-rate run for the relay only, to stay near a minute.
        plan += [(c, args.rate_pairs, 1024, "rate", args.rate) for c in configs
                 if not args.quick or c in ("memory", "sqlite")]
    work_root = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    doc = {"started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
           "argv": " ".join(["bench/run.py"] + (argv if argv is not None else sys.argv[1:])),
           "flags": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
           "machine": machine_info(), "runs": []}
    keep_work = False
    interrupted = True
    try:
        for i, (config, pairs, size, mode, rate) in enumerate(plan):
            t = time.monotonic()
            r = run_load(config, pairs, size, mode, rate, args, work_root, i)
            doc["runs"].append(r)
            lat = r.get("latency_ms", {})
            print(f"[{i + 1}/{len(plan)}] {config:9} {mode:8} {pairs:5} pairs {_size(size):>6}: "
                  f"{_n(r.get('delivered_per_s')):>8} delivered/s, p99 {_n(lat.get('p99'), 2)} ms,"
                  f" server {_n(r.get('server_cpu_pct'))}%, gen "
                  f"{'+'.join(f'{p:.0f}' for p in r.get('gen_cpu_pct', []))}%, others/steal "
                  f"{_others(r)}% ({time.monotonic() - t:.1f} s) "
                  f"{'ok' if r.get('ok') else 'FAIL: ' + '; '.join(r.get('failures', []))}",
                  file=sys.stderr, flush=True)
            keep_work |= not r.get("ok")
        if not args.no_idle:
            counts = (100,) if args.quick else (1000, 10000)
            doc["idle"] = optional_measure("idle", work_root / "idle", args.quick, counts=counts)
        if not args.no_client:
            doc["client"] = optional_measure("client", work_root / "client", args.quick)
        for key in ("idle", "client"):
            if doc.get(key) is None:
                doc.pop(key, None)
        interrupted = False
    finally:
        if interrupted:
            print("bench: interrupted; every child process killed, no results written",
                  file=sys.stderr)
        if not keep_work:
            shutil.rmtree(work_root, ignore_errors=True)
        else:
            print(f"bench: logs of the failed runs kept in {work_root}", file=sys.stderr)
    extra_failed = any(isinstance(doc.get(k), dict) and "error" in doc[k]
                       for k in ("idle", "client"))
    doc["ok"] = all(r.get("ok") for r in doc["runs"]) and not extra_failed
    finished = datetime.datetime.now(datetime.timezone.utc)
    doc["finished"] = finished.strftime("%Y-%m-%d %H:%M:%S UTC")
    doc["duration_s"] = round((finished - started).total_seconds(), 1)

    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / stamp
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    markdown = render_markdown(doc)
    base.with_suffix(".md").write_text(markdown)
    problem = plot(doc, base.with_suffix(".png"))
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
    for suffix in (".json", ".md", ".png"):
        if base.with_suffix(suffix).exists():
            shutil.copyfile(base.with_suffix(suffix), args.out / f"latest{suffix}")
        else:
            # No latest.png left over from an earlier run beside this run's figures.
            (args.out / f"latest{suffix}").unlink(missing_ok=True)
    print(markdown)
    print(f"bench: wrote {base}.json, .md{'' if problem else ', .png'} "
          f"({doc['duration_s']:.0f} s)", file=sys.stderr)
    if problem and in_ci():
        print("bench: under CI the plot must be written: failing", file=sys.stderr)
        return 1
    return 0 if doc["ok"] else 1


def plot(doc: dict, path: Path) -> str | None:
    """
    Write the plot to C{path} (L{render_png}); what went wrong, or None once
    the file is there.  Without it a run still writes its JSON and table,
    but under CI, which checks the plot, it fails.
    """
    try:
        problem = render_png(doc, path)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return f"plotting failed ({type(e).__name__}: {e}): no plot"
    if problem is None and not path.exists():
        return f"plotting wrote no {path}"
    return problem


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
