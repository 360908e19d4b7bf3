"""
Real processes for the integration tests: a C{twistd mailrelay} on an
ephemeral loopback port, a C{twistd mailclient}, and the C{mailrelay} CLI.
Waits are on conditions (a log line, an exit) with deadlines, never sleeps.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MAILRELAY_HOME", None)
    env.pop("MAILRELAY_SERVER", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LineReader:
    """Collects a process's output lines in a thread, for waiting on them."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def _next(self, deadline: float) -> str | None:
        """The next line (None once the stream has ended); queue.Empty at C{deadline}."""
        if self.ended:
            return None
        line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            self.ended = True
        else:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first new line matching C{pattern}; AssertionError at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._next(deadline)
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} in:\n" + "".join(self.lines)) from None
            if line is None:
                raise AssertionError(
                    f"process ended without a line matching {pattern!r}:\n" + "".join(self.lines)
                )
            match = regex.search(line)
            if match:
                return match

    def wait_quiet(self, pattern: str, quiet: float, timeout: float = 30.0) -> None:
        """
        Return once no new line has matched C{pattern} for C{quiet} seconds,
        or the stream has ended; AssertionError at the deadline.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        until = time.monotonic() + quiet
        while until <= deadline:
            try:
                line = self._next(until)
            except queue.Empty:
                return
            if line is None:
                return
            if regex.search(line):
                until = time.monotonic() + quiet
        raise AssertionError(f"lines matching {pattern!r} still coming after {timeout:g} s:\n"
                             + "".join(self.lines))

    def rest(self, timeout: float = 60.0) -> str:
        """All the lines, once the stream has ended; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        try:
            while self._next(deadline) is not None:
                pass
        except queue.Empty:
            raise AssertionError(f"the stream did not end within {timeout:g} s:\n"
                                 + "".join(self.lines)) from None
        return "".join(self.lines)


class Relay:
    """A C{twistd -n mailrelay} on 127.0.0.1, on a port the kernel picks."""

    def __init__(self, data: Path, *extra: str, listen: str = "tcp:{port}:interface=127.0.0.1",
                 scheme: str = "tcp:127.0.0.1") -> None:
        self.data = data
        self.extra = extra
        self.listen = listen
        self.scheme = scheme
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, port: int = 0) -> Relay:
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "mailrelay",
             "--port", self.listen.format(port=port), "--data", str(self.data), *self.extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
            cwd=self.data.parent,
        )
        self.log = LineReader(self.process.stdout)
        self.port = int(self.log.wait_for(r"mailrelay listening on 127\.0\.0\.1:(\d+)").group(1))
        self.log.wait_for(r"store open")
        return self

    @property
    def server(self) -> str:
        return f"{self.scheme}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power cut."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)


def stored_messages(data: Path) -> int:
    """
    The messages (and notices) left in the store of a relay that has
    stopped, counted in its SQLite file opened read-only, not through the
    relay's code.
    """
    path = data / "mailrelay.sqlite"
    if not path.exists():
        raise AssertionError(f"no relay store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()


def cli(home: Path, server: str | None, *args: str, stdin: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real C{mailrelay} command and return what it did."""
    command = [str(BIN / "mailrelay"), *args, "--home", str(home)]
    if server is not None:
        command += ["--server", server]
    return subprocess.run(command, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=environment())
