"""
The client side: what mailrelay's own code adds to the cryptography, and
how long one `mailrelay send` takes from process start to ACCEPTED.

  seal, open  envelopes per second with L{mailrelay.envelope.seal} and
              L{mailrelay.envelope.open_envelope} (RSA-3072 keys, a short
              text sealed into a 1 KiB envelope), against the same
              primitives called directly with `cryptography` in the same
              process: RSA-OAEP(SHA-256) wrap of a 32-byte key, AES-256-GCM
              and an RSA-PSS-SHA256 signature to seal; the signature check,
              the unwrap and the decryption to open.  The two are timed in
              CPU seconds of this process, in alternating blocks (A B, B A,
              ...), and the overhead is the median of the paired ratios, so
              a busy neighbour or a frequency change hits both sides alike.
  send        the wall time of `mailrelay send` against a real relay on
              loopback (SQLite store), from fork to exit, beside the time of
              `python -c "import mailrelay.cli"`, of `mailrelay --help` and
              of loading the sender's private key in-process (which
              `cryptography` validates on every load): what part of it is
              only starting up.

Overhead above 10% (or --profile) adds a cProfile of seal and open: where
the time goes besides the primitives.

Bounded: fixed numbers of blocks and runs, a timeout on every subprocess,
the relay terminated (killed if need be) on the way out.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.idle import BenchError, Relay, print_table  # noqa: E402
from mailrelay import envelope, keys  # noqa: E402

BIN = Path(sys.executable).parent

ENVELOPE_SIZE = 1024
"""Bytes of the sealed envelope: a short text (about 100 bytes of it with RSA-3072)."""

OVERHEAD_TARGET = 10.0
"""Percent mailrelay's seal and open may cost over the bare primitives."""

COMMAND_TIMEOUT = 60.0
"""Seconds any one command may take."""

# The bare primitives, as the envelope format uses them, built here rather
# than imported so that nothing of mailrelay is on this side.
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(),
                     label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


class Primitives:
    """
    Seal and open done with `cryptography` alone: the floor mailrelay's
    envelope code is compared with.  The header is encoded once, outside
    the timing; the parts are joined as the envelope joins them.
    """

    def __init__(self, sender: keys.Identity, recipient: keys.Identity, header: bytes,
                 plaintext: bytes) -> None:
        self.sign_key = sender.private_key
        self.verify_key = sender.private_key.public_key()
        self.unwrap_key = recipient.private_key
        self.wrap_key = recipient.private_key.public_key()
        self.header = header
        self.plaintext = plaintext

    def seal(self) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        content_key = os.urandom(32)
        nonce = os.urandom(12)
        ciphertext = AESGCM(content_key).encrypt(nonce, self.plaintext, self.header)
        wrapped = self.wrap_key.encrypt(content_key, _OAEP)
        signed = b"".join((self.header, wrapped, nonce, ciphertext))
        return signed, self.sign_key.sign(signed, _PSS, hashes.SHA256()), wrapped, nonce, \
            ciphertext

    def open(self, sealed: tuple[bytes, bytes, bytes, bytes, bytes]) -> bytes:
        signed, signature, wrapped, nonce, ciphertext = sealed
        self.verify_key.verify(signature, signed, _PSS, hashes.SHA256())
        content_key = self.unwrap_key.decrypt(wrapped, _OAEP)
        return AESGCM(content_key).decrypt(nonce, ciphertext, self.header)


def _block(operation: Callable[[], object], size: int) -> float:
    """
    CPU seconds of this process per call of C{operation}, over C{size}
    calls.  CPU time, not wall time: on a shared machine, the time a block
    spends descheduled is the neighbours' work, not ours.
    """
    gc.collect()
    start = time.process_time()
    for _ in range(size):
        operation()
    return (time.process_time() - start) / size


def _compare(ours: Callable[[], object], bare: Callable[[], object], rounds: int,
             size: int) -> dict:
    """
    Time C{ours} and C{bare} in alternating blocks (A B, then B A, ...);
    the median rate of each and the median of the per-round ratios.
    """
    ours_s, bare_s, ratios = [], [], []
    for n in range(rounds):
        if n % 2:
            b = _block(bare, size)
            a = _block(ours, size)
        else:
            a = _block(ours, size)
            b = _block(bare, size)
        ours_s.append(a)
        bare_s.append(b)
        ratios.append(a / b)
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "per_s": 1 / statistics.median(ours_s),
        "primitives_per_s": 1 / statistics.median(bare_s),
        "overhead_pct": (statistics.median(ratios) - 1) * 100,
        "overhead_iqr_pct": ((quartiles[0] - 1) * 100, (quartiles[2] - 1) * 100),
    }


def _profile(operation: Callable[[], object], calls: int, top: int = 12) -> list[tuple[str, float]]:
    """The functions C{operation} spends its own time in: (function, microseconds per call)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        operation()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, _, tottime, _, _) in stats.stats.items():
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        rows.append((where, tottime / calls * 1e6))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "mailrelay/", "lib/python"):
        if marker in filename:
            return filename[filename.index(marker):]
    return filename


def envelope_rates(quick: bool = False, profile: bool | None = None) -> dict:
    """
    Seal and open, mailrelay's against the bare primitives.  C{profile}:
    True to profile both, None to profile those over the target.
    """
    sender = keys.Identity.generate("bench-sender")
    recipient = keys.Identity.generate("bench-recipient")
    size = ENVELOPE_SIZE - envelope.overhead(sender.name, recipient.name)
    plaintext = (b"A short text, as people send them. " * 8)[:size]
    sealed = envelope.seal(sender, recipient.name, recipient.public_key, plaintext)
    if len(sealed) != ENVELOPE_SIZE:
        raise BenchError(f"sealed {len(sealed)} bytes, not {ENVELOPE_SIZE}: the envelope "
                         f"format changed, update this benchmark")
    header = envelope.parse(sealed).header_bytes
    bare = Primitives(sender, recipient, header, plaintext)
    bare_sealed = bare.seal()
    if bare.open(bare_sealed) != plaintext:
        raise BenchError("the bare primitives do not round-trip")
    recipient_key = recipient.public_key
    sender_key = sender.public_key

    def seal() -> bytes:
        return envelope.seal(sender, recipient.name, recipient_key, plaintext)

    def open_() -> envelope.Opened:
        return envelope.open_envelope(sealed, recipient, sender_key)

    rounds, size = (6, 30) if quick else (30, 50)
    results = {"envelope_bytes": len(sealed), "plaintext_bytes": len(plaintext)}
    for name, ours, theirs in (("seal", seal, bare.seal),
                               ("open", open_, lambda: bare.open(bare_sealed))):
        found = _compare(ours, theirs, rounds, size)
        results[f"{name}_per_s"] = found["per_s"]
        results[f"{name}_primitives_per_s"] = found["primitives_per_s"]
        results[f"{name}_overhead_pct"] = found["overhead_pct"]
        results[f"{name}_overhead_iqr_pct"] = found["overhead_iqr_pct"]
        if profile or (profile is None and found["overhead_pct"] > OVERHEAD_TARGET):
            results[f"{name}_profile"] = _profile(ours, 100 if quick else 300)
    return results


# `mailrelay send`, as a person runs it


def _run(command: Sequence[str], env: dict, what: str) -> tuple[float, str]:
    """Run C{command}; its wall time in seconds and its output, or L{BenchError}."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took more than {COMMAND_TIMEOUT:g} s") from None
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{what} exited with status {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-300:]}")
    return wall, done.stdout


def send_times(bin_dir: Path, work: Path, runs: int) -> dict:
    """
    Two homes initialised against a real relay (which registers both), one
    untimed send (it pins the recipient's key), then C{runs} timed sends,
    each alternated with the start-up references.
    """
    bin_dir = Path(bin_dir).absolute()
    python = bin_dir / "python" if (bin_dir / "python").exists() else Path(sys.executable)
    mailrelay = str(bin_dir / "mailrelay")
    # Nothing from the caller's environment picks another home, relay or key.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    homes = {name: work / f"client-home-{name}" for name in ("alice", "bob")}
    for home in homes.values():
        shutil.rmtree(home, ignore_errors=True)
    timings: dict[str, list[float]] = {"send": [], "import": [], "help": [], "python": []}
    with Relay(bin_dir, work, "client-relay") as relay:
        common = ["--server", relay.server]
        for name, home in homes.items():
            _, out = _run([mailrelay, "init", name, "--home", str(home), *common], env,
                          f"mailrelay init {name}")
            if "Published" not in out:
                raise BenchError(f"mailrelay init {name} did not register: {out.strip()}")
        send = [mailrelay, "send", "--to", "bob", "--home", str(homes["alice"]), *common]
        _run([*send, "first message: pins bob's key"], env, "the first mailrelay send")
        for n in range(runs):
            wall, out = _run([*send, f"message {n}"], env, "mailrelay send")
            if "accepted by the relay" not in out:
                raise BenchError(f"mailrelay send did not say accepted: {out.strip()}")
            timings["send"].append(wall)
            timings["import"].append(
                _run([str(python), "-c", "import mailrelay.cli"], env, "import")[0])
            timings["help"].append(_run([mailrelay, "--help"], env, "mailrelay --help")[0])
            timings["python"].append(_run([str(python), "-c", "pass"], env, "python")[0])
    return {
        "send_wall_ms_median": statistics.median(timings["send"]) * 1000,
        "send_wall_ms_min": min(timings["send"]) * 1000,
        "import_ms_median": statistics.median(timings["import"]) * 1000,
        "help_ms_median": statistics.median(timings["help"]) * 1000,
        "python_ms_median": statistics.median(timings["python"]) * 1000,
        "send_runs": runs,
    }


def key_load_ms(home: Path, runs: int) -> float:
    """
    Median milliseconds to load a home's private key the way every command
    does (L{keys.Home.load}): `cryptography` checks an RSA private key's
    consistency on every load, which is a large part of a short command.
    """
    home_keys = keys.Home(home)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        home_keys.load()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(bin_dir: Path, work: Path, quick: bool = False, profile: bool | None = None) -> dict:
    """
    Envelope rates against the bare primitives, and the wall time of one
    `mailrelay send` (C{quick}: fewer blocks, 3 runs instead of 10).
    Returns the figures and C{table}, (label, value) rows for a report.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    result = envelope_rates(quick, profile)
    runs = 3 if quick else 10
    result.update(send_times(Path(bin_dir), work, runs))
    result["key_load_ms_median"] = key_load_ms(work / "client-home-alice", runs)
    table = []
    for name in ("seal", "open"):
        low, high = result[f"{name}_overhead_iqr_pct"]
        table.append((f"envelope {name}, {result['envelope_bytes']} B, RSA-3072",
                      f"{result[f'{name}_per_s']:,.0f}/s (bare primitives "
                      f"{result[f'{name}_primitives_per_s']:,.0f}/s); overhead "
                      f"{result[f'{name}_overhead_pct']:+.1f}%, median of paired rounds "
                      f"(middle half {low:+.1f} .. {high:+.1f}%)"))
    table += [
        (f"mailrelay send, wall, {result['send_runs']} runs",
         f"median {result['send_wall_ms_median']:.0f} ms, min {result['send_wall_ms_min']:.0f} ms"),
        ("python -c pass", f"median {result['python_ms_median']:.0f} ms"),
        ("python -c 'import mailrelay.cli'", f"median {result['import_ms_median']:.0f} ms"),
        ("mailrelay --help", f"median {result['help_ms_median']:.0f} ms"),
        ("load the sender's RSA-3072 key (Home.load)",
         f"median {result['key_load_ms_median']:.0f} ms"),
    ]
    result["table"] = table
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and runs")
    parser.add_argument("--profile", action="store_true",
                        help="profile seal and open even within the target")
    parser.add_argument("--work", type=Path, help="keep files here (default: a temporary dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mailrelay-client-"))
    try:
        result = measure(BIN, work, quick=args.quick, profile=True if args.profile else None)
    except BenchError as e:
        raise SystemExit(f"client bench: {e}") from None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("mailrelay client side: envelopes in-process, `mailrelay send` against a "
          "loopback relay (SQLite store)")
    print_table(result["table"])
    for name in ("seal", "open"):
        if f"{name}_profile" in result:
            print(f"  where {name} spends its own time (cProfile, microseconds per {name}):")
            print_table([(f"  {where}", f"{us:,.1f} us") for where, us in
                         result[f"{name}_profile"]])


if __name__ == "__main__":
    main()
