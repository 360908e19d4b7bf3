"""
C{make demo}: the seed's exchange, replayed with the real programs.

Starts a relay on a free loopback port, creates identities 123 and 345 in
two temporary homes, sends "Hey! How are you?" from 123 to 345 while 345 is
listening, then a second message while 345 is offline, which 345 receives
when it next connects.  Prints what each side sees, then stops everything.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the relay did not start listening on port {port}")


def show(who: str, text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"[{who}] {line}", flush=True)


def cli(who: str, home: Path, server: str, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(BIN / "mailrelay"), *args, "--home", str(home), "--server", server],
        input=stdin, capture_output=True, text=True, timeout=60,
    )
    show(who, result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"`mailrelay {args[0]}` for {who} failed ({result.returncode})")
    return result.stdout


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mailrelay-demo-"))
    port = free_port()
    server = f"tcp:127.0.0.1:{port}"
    relay_log = work / "relay.log"
    print(f"Starting a relay on 127.0.0.1:{port} (log: {relay_log})", flush=True)
    relay = subprocess.Popen(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(relay_log),
         "mailrelay", "--port", f"tcp:{port}:interface=127.0.0.1", "--data", str(work / "var")],
        cwd=work,
    )
    listener = None
    try:
        wait_for_port(port, time.monotonic() + 30)
        alice, bob = work / "home-123", work / "home-345"
        print("\n== Both clients create their key pairs and publish them", flush=True)
        cli("123", alice, server, "init", "123")
        cli("345", bob, server, "init", "345")

        print("\n== 345 is online; 123 sends it a message", flush=True)
        listener = subprocess.Popen(
            [str(BIN / "mailrelay"), "recv", "--count", "1", "--timeout", "30",
             "--home", str(bob), "--server", server],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(1.0)  # let the listener authenticate first, as in the seed
        cli("123", alice, server, "send", "--to", "345", "Hey! How are you?")
        out, _ = listener.communicate(timeout=60)
        listener = None
        show("345", out)

        print("\n== 345 goes offline; 123 sends again; the relay keeps it", flush=True)
        cli("123", alice, server, "send", "--to", "345", "Are you there? Reply when you're back.")
        print("\n== 345 comes back and receives what waited", flush=True)
        cli("345", bob, server, "recv", "--count", "1", "--timeout", "30")

        print("\n== 345 answers", flush=True)
        cli("345", bob, server, "send", "--to", "123", "I'm well, thanks!")
        cli("123", alice, server, "recv", "--count", "1", "--timeout", "30")

        print("\n== What the relay logged (no message contents)", flush=True)
    finally:
        if listener is not None:
            listener.kill()
        relay.terminate()
        try:
            relay.wait(timeout=15)
        except subprocess.TimeoutExpired:
            relay.kill()
    for line in relay_log.read_text().splitlines():
        if "mailrelay." in line:
            show("relay", line.split("] ", 1)[-1])
    shutil.rmtree(work, ignore_errors=True)
    print("\nDemo finished; relay stopped.", flush=True)


if __name__ == "__main__":
    main()
