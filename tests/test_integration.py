"""
End to end: a real C{twistd mailrelay} on a loopback port, the real
C{mailrelay} command, real SQLite files, real TCP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailrelay import keys
from mailrelay.client.outbox import home_outbox, queue_message
from tests import skips
from tests.processes import BIN, LineReader, Relay, cli, environment, stored_messages


class RelayEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.relay = Relay(self.root / "var").start()
        self.addCleanup(self.relay.stop)
        self.alice = self.root / "home-123"
        self.bob = self.root / "home-345"

    def run_ok(self, home, *args, **kwargs) -> subprocess.CompletedProcess:
        result = cli(home, self.relay.server, *args, **kwargs)
        self.assertEqual(
            result.returncode, 0, f"mailrelay {' '.join(args)}:\n{result.stdout}{result.stderr}"
        )
        return result

    def init_both(self) -> None:
        self.assertIn("Published to the relay", self.run_ok(self.alice, "init", "123").stdout)
        self.assertIn("Published to the relay", self.run_ok(self.bob, "init", "345").stdout)

    def test_send_and_receive_between_two_homes(self) -> None:
        """
        The seed's exchange: 123 sends to 345, who prints it verified and
        decrypted; the relay's log shows the session, never the text.
        """
        self.init_both()
        sent = self.run_ok(self.alice, "send", "--to", "345", "Hey!", "How", "are", "you?")
        self.assertRegex(sent.stdout, r"Message [0-9a-f]{32} accepted by the relay for 345")
        received = self.run_ok(self.bob, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: Hey! How are you?\n")
        self.relay.stop()
        self.assertNotIn("How are you", "".join(self.relay.log.lines))

    def test_recv_json_and_stdin(self) -> None:
        self.init_both()
        sent = self.run_ok(self.bob, "send", "--to", "123", stdin="from standard input\n")
        message_id = sent.stdout.split()[1]
        received = self.run_ok(self.alice, "recv", "--count", "1", "--timeout", "30", "--json")
        record = json.loads(received.stdout)
        self.assertEqual(record["id"], message_id)
        self.assertEqual((record["from"], record["to"]), ("345", "123"))
        self.assertEqual(record["text"], "from standard input")
        self.assertIsInstance(record["sent_at"], int)

    def test_waiting_recipient_gets_message_while_connected(self) -> None:
        """A recipient already listening receives the message as it is accepted."""
        self.init_both()
        listener = subprocess.Popen(
            [str(BIN / "mailrelay"), "recv", "--count", "2", "--timeout", "60",
             "--home", str(self.bob), "--server", self.relay.server],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
        )
        self.addCleanup(lambda: listener.poll() is None and listener.kill())
        self.relay.log.wait_for(r"345 authenticated")
        # 345 sending meanwhile does not displace its own listening session.
        self.run_ok(self.bob, "send", "--to", "123", "busy listening")
        self.run_ok(self.alice, "send", "--to", "345", "one")
        self.run_ok(self.alice, "send", "--to", "345", "two")
        # Standard output holds the messages; standard error may say that this
        # recv also sent what 345's own send had just queued (the same envelope:
        # stored once).
        out, err = listener.communicate(timeout=60)
        self.assertEqual(listener.returncode, 0, out + err)
        self.assertEqual(out, "Received message from 123: one\nReceived message from 123: two\n")
        self.assertNotIn("Traceback", err)

    def test_nothing_shown_twice(self) -> None:
        """
        Once received and acknowledged, a message is gone from the relay: a
        second recv gets nothing, and the store, read once the relay has
        stopped, holds no message (a relay that kept it would deliver it
        again, and only the client's inbox would keep it from being shown).
        """
        self.init_both()
        self.run_ok(self.alice, "send", "--to", "345", "only once")
        received = self.run_ok(self.bob, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: only once\n")
        again = cli(self.bob, self.relay.server, "recv", "--count", "1", "--timeout", "2")
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stdout, "")
        self.assertIn("only 0 of 1 messages arrived", again.stderr)
        self.relay.stop()
        self.assertEqual(stored_messages(self.relay.data), 0)

    def test_sending_does_not_take_the_mailbox(self) -> None:
        """
        A message waiting for 345 stays waiting while 345 sends (its send
        session does not receive), and does not disturb a running recv.
        """
        self.init_both()
        self.run_ok(self.alice, "send", "--to", "345", "waiting for you")
        self.run_ok(self.bob, "send", "--to", "123", "sent while a message waits")
        self.run_ok(self.bob, "fingerprint", "123")
        received = self.run_ok(self.bob, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: waiting for you\n")

    def test_recv_timeout_without_count_is_success(self) -> None:
        self.init_both()
        result = cli(self.bob, self.relay.server, "recv", "--timeout", "1")
        self.assertEqual((result.returncode, result.stdout), (0, ""))

    def test_unknown_recipient_is_a_clear_error(self) -> None:
        self.init_both()
        result = cli(self.alice, self.relay.server, "send", "--to", "nobody", "hi")
        self.assertEqual(result.returncode, 1)
        self.assertIn("no identity 'nobody' on this relay", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_impersonation_refused(self) -> None:
        """
        A second home claiming an id already registered is refused when it
        authenticates, in so many words; nothing it tries to send reaches
        the recipient, nor waits to be sent later; the real owner of the id
        still gets through.
        """
        self.init_both()
        server = self.relay.server
        refusal = (f"the relay at {server} refused us: '123' is registered with another key "
                   f"on this relay. Another key is registered there for '123'.")
        mallory = self.root / "mallory"
        result = cli(mallory, server, "init", "123")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"Not published: {refusal}.\n", result.stdout)
        sent = cli(mallory, server, "send", "--to", "345", "I am 123, honest")
        self.assertEqual((sent.returncode, sent.stdout, sent.stderr),
                         (1, "", f"mailrelay send: {refusal}\n"))
        self.assertEqual(cli(mallory, None, "outbox").stdout, "The outbox is empty.\n")
        # 345 gets nothing: no message, and no forgery dropped on the way.
        nothing = cli(self.bob, server, "recv", "--timeout", "2")
        self.assertEqual((nothing.returncode, nothing.stdout, nothing.stderr), (0, "", ""))
        self.assertEqual(self.run_ok(self.bob, "inbox").stdout, "")
        self.run_ok(self.alice, "send", "--to", "345", "the real 123")
        received = self.run_ok(self.bob, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: the real 123\n")

    def test_recv_interrupted_exits_0(self) -> None:
        """
        Ctrl-C (SIGINT) ends a waiting recv as the user asked: exit 0,
        nothing on standard error (not "the relay closed the connection").
        """
        self.init_both()
        self.relay.log.wait_for(r"345 authenticated")  # init's session, not recv's
        listener = subprocess.Popen(
            [str(BIN / "mailrelay"), "recv", "--home", str(self.bob),
             "--server", self.relay.server],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
        )
        self.addCleanup(lambda: listener.poll() is None and listener.kill())
        self.relay.log.wait_for(r"345 authenticated")
        listener.send_signal(signal.SIGINT)
        out, err = listener.communicate(timeout=60)
        self.assertEqual((listener.returncode, out, err), (0, "", ""))

    def test_fingerprints_agree(self) -> None:
        """What 123 pins for 345 is what 345 says its fingerprint is."""
        self.init_both()
        own = self.run_ok(self.bob, "fingerprint").stdout.split(":", 1)[1].strip()
        seen = self.run_ok(self.alice, "fingerprint", "345").stdout
        self.assertIn(own, seen)
        self.assertIn("pinned", seen)


class CrashTests(SynchronousTestCase):
    COUNT = 50
    """Messages queued for the flush that the relay's SIGKILL cuts."""

    def test_sigkill_loses_nothing_accepted(self) -> None:
        """
        The relay is SIGKILLed while a `mailrelay flush` is sending, with a
        commit held up (as by a slow disk): every message the flush printed
        as accepted is delivered, in order, by the relay restarted on the
        same data, before anything is sent again.  The next flush sends the
        rest, and each message arrives exactly once.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        relay = Relay(root / "var").start()
        self.addCleanup(relay.stop)
        alice, bob = root / "a", root / "b"
        for home, name in ((alice, "123"), (bob, "345")):
            self.assertEqual(cli(home, relay.server, "init", name).returncode, 0)
        pinned = cli(alice, relay.server, "fingerprint", "345")
        self.assertIn("pinned", pinned.stdout, pinned.stderr)
        # Sealed and queued with 345's pinned key, as `send` does while the
        # relay is away: the flush below then sends them back to back.
        home = keys.Home(alice)
        identity, outbox = home.load(), home_outbox(home)
        texts = [f"message {i}" for i in range(self.COUNT)]
        for text in texts:
            self.successResultOf(queue_message(outbox, identity, "345", text.encode(),
                                               contacts=home))
        outbox.close()

        errors = root / "flush.err"
        with errors.open("w") as stderr:
            flush = subprocess.Popen(
                [str(BIN / "mailrelay"), "flush", "--home", str(alice), "--server", relay.server],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment(),
            )
        self.addCleanup(lambda: flush.poll() is None and flush.kill())
        printed = LineReader(flush.stdout)
        # Once the flush has printed a few as accepted, the store's write
        # lock is taken from here: the relay's next commit waits for it, and
        # once the flush has printed nothing more for a while the relay is
        # killed as it waits, with a send in flight, then the lock is let go.
        ACCEPTED = r"^Message ([0-9a-f]{32}) accepted by the relay for 345\.$"
        for _ in range(5):
            printed.wait_for(ACCEPTED)
        store = sqlite3.connect(relay.data / "mailrelay.sqlite", timeout=10,
                                isolation_level=None)
        store.execute("BEGIN IMMEDIATE")
        printed.wait_quiet(ACCEPTED, quiet=0.3)
        relay.kill()
        self.assertEqual(relay.process.returncode, -9)
        store.execute("ROLLBACK")
        store.close()
        out = printed.rest(timeout=60)
        flush.wait(timeout=60)
        err = errors.read_text()
        accepted = re.findall(ACCEPTED, out, re.MULTILINE)

        relay.start(port=relay.port)
        first = cli(bob, relay.server, "recv", "--json", "--count", str(len(accepted)),
                    "--timeout", "30")
        self.assertEqual(first.returncode, 0, first.stderr)
        shown = [json.loads(line) for line in first.stdout.splitlines()]
        self.assertEqual([r["id"] for r in shown], accepted)
        self.assertEqual([r["text"] for r in shown], texts[:len(accepted)])
        # The kill did cut the flush short.
        self.assertEqual(flush.returncode, 1, out + err)
        self.assertTrue(5 <= len(accepted) < self.COUNT, (len(accepted), out, err))

        again = cli(alice, relay.server, "flush")
        self.assertEqual(again.returncode, 0, again.stderr)
        rest = cli(bob, relay.server, "recv", "--json", "--count",
                   str(self.COUNT - len(accepted)), "--timeout", "30")
        self.assertEqual(rest.returncode, 0, rest.stderr)
        shown += [json.loads(line) for line in rest.stdout.splitlines()]
        self.assertEqual([r["text"] for r in shown], texts)
        self.assertEqual(len({r["id"] for r in shown}), self.COUNT)
        nothing = cli(bob, relay.server, "recv", "--timeout", "2")
        self.assertEqual((nothing.returncode, nothing.stdout), (0, ""))


class RelayIdentityTests(SynchronousTestCase):
    def test_another_relay_at_the_same_address_is_refused(self) -> None:
        """
        A home pins the id of the relay at each address. Another relay there
        (one passing on the first's challenge would show the first's id, but
        on its own connection) is refused with what to do about it.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        first = Relay(root / "one").start()
        self.addCleanup(first.stop)
        alice = root / "alice"
        self.assertEqual(cli(alice, first.server, "init", "123").returncode, 0)
        self.assertEqual(cli(alice, first.server, "fingerprint").returncode, 0)
        first.stop()

        second = Relay(root / "two").start(port=first.port)
        self.addCleanup(second.stop)
        result = cli(alice, second.server, "send", "--to", "123", "hello?")
        self.assertEqual(result.returncode, 1)
        self.assertIn("calls itself", result.stderr)
        self.assertIn(str(alice / "relays"), result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        second.log.wait_for(r"gave up before authenticating: AUTH_FAILED: client refuses")


class RelayStartupTests(SynchronousTestCase):
    def test_busy_port_fails_loudly(self) -> None:
        """A relay that cannot listen exits non-zero and says why."""
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            result = subprocess.run(
                [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "mailrelay",
                 "--port", f"tcp:{port}:interface=127.0.0.1", "--data", str(root / "var")],
                capture_output=True, text=True, timeout=60, env=environment(),
            )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Address already in use", result.stdout + result.stderr)
        self.assertIn(f"mailrelay: cannot listen on tcp:{port}:interface=127.0.0.1: "
                      f"Address already in use", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_fresh_relay_starts_cleanly(self) -> None:
        """
        A relay starting on a new, empty --data logs no error: nothing runs
        against the store before its tables exist.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        relay = Relay(root / "var").start()
        self.addCleanup(relay.stop)
        relay.stop()
        relay.log.wait_for(r"Server Shut Down")
        output = "".join(relay.log.lines)
        for bad in ("CRITICAL", "critical", "Traceback", "no such table"):
            self.assertNotIn(bad, output)

    def test_data_that_is_not_a_store_is_refused_before_start(self) -> None:
        """A --data directory holding something else is refused with the reason, exit 1."""
        root = Path(self.mktemp()).resolve()
        (root / "var").mkdir(parents=True)
        (root / "var" / "mailrelay.sqlite").write_text("not a database")
        result = subprocess.run(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "mailrelay",
             "--port", "tcp:0:interface=127.0.0.1", "--data", str(root / "var")],
            capture_output=True, text=True, timeout=60, env=environment(),
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("file is not a database", result.stdout + result.stderr)
        self.assertEqual((root / "var" / "mailrelay.sqlite").read_text(), "not a database")

    def test_lost_or_truncated_store_is_refused_not_started_empty(self) -> None:
        """
        A relay whose database went missing, or was cut short, refuses to
        start and says what to do; it never starts empty on that data.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        relay = Relay(root / "var").start()
        alice, bob = root / "a", root / "b"
        for home, name in ((alice, "123"), (bob, "345")):
            self.assertEqual(cli(home, relay.server, "init", name).returncode, 0)
        for i in range(12):
            self.assertEqual(cli(alice, relay.server, "send", "--to", "345", "x" * 20000,
                                 f"message {i}").returncode, 0)
        relay.stop()
        store = root / "var" / "mailrelay.sqlite"

        def start() -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "mailrelay",
                 "--port", "tcp:0:interface=127.0.0.1", "--data", str(root / "var")],
                capture_output=True, text=True, timeout=60, env=environment(),
            )

        kept = store.read_bytes()
        with open(store, "r+b") as f:
            f.truncate(len(kept) // 2)
        result = start()
        self.assertEqual(result.returncode, 1)
        self.assertIn(str(store), result.stdout + result.stderr)
        self.assertIn("backup", result.stdout + result.stderr)

        store.unlink()
        result = start()
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"the message store {store} is missing", result.stdout + result.stderr)
        self.assertFalse(store.exists())

    def test_bad_option_is_a_usage_error(self) -> None:
        result = subprocess.run(
            [str(BIN / "twistd"), "--nodaemon", "mailrelay", "--port", "bogus:thing"],
            capture_output=True, text=True, timeout=60, env=environment(),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--port", result.stdout + result.stderr)


class MailclientTests(SynchronousTestCase):
    def test_files_messages_into_maildir(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        relay = Relay(root / "var").start()
        self.addCleanup(relay.stop)
        alice, bob, maildir = root / "a", root / "b", root / "Maildir"
        for home, name in ((alice, "123"), (bob, "345")):
            self.assertEqual(cli(home, relay.server, "init", name).returncode, 0)
        self.assertEqual(cli(alice, relay.server, "send", "--to", "345", "waited").returncode, 0)
        client = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "mailclient",
             "--home", str(bob), "--server", relay.server, "--maildir", str(maildir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
        )
        self.addCleanup(lambda: client.poll() is None and (client.terminate(), client.wait(30)))
        log = LineReader(client.stdout)
        log.wait_for(r"filed message")
        self.assertEqual(cli(alice, relay.server, "send", "--to", "345", "live").returncode, 0)
        log.wait_for(r"filed message")
        files = sorted((maildir / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)
        self.assertEqual(len(files), 2)
        first = files[0].read_text()
        self.assertIn("From: 123@", first)
        self.assertIn("To: 345@", first)
        self.assertIn("Message-ID: <", first)
        self.assertIn("Date: ", first)
        self.assertTrue(first.rstrip().endswith("waited"))
        self.assertEqual(os.listdir(maildir / "tmp"), [])


def _openssl(port: int, *flags: str) -> subprocess.CompletedProcess:
    """C{openssl s_client} against the relay: the handshake only, no application data."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *flags],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=30,
    )


class TLSTests(SynchronousTestCase):
    """
    A relay serving TLS with --tls-cert and --tls-key (a throwaway CA and a
    certificate for localhost made here), and clients that check it.
    """

    def setUp(self) -> None:
        from tests.test_endpoints import PKI

        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.pki = PKI(self.root / "pki")
        self.key, self.cert, self.certificate = self.pki.issue()
        self.ca = str(self.pki.ca_file)

    def start_relay(self) -> Relay:
        relay = Relay(self.root / "var", "--tls-cert", str(self.cert), "--tls-key",
                      str(self.key), scheme="tls:localhost").start()
        self.addCleanup(relay.stop)
        return relay

    def test_exchange(self) -> None:
        """
        The relay says it serves TLS, and with which certificate; the command
        (with --ca, or the home's ca.pem) and twistd mailclient (with --ca)
        exchange messages with it.
        """
        relay = self.start_relay()
        log = "".join(relay.log.lines)
        self.assertIn("serving TLS 1.3 with the certificate for "
                      "CN=localhost (localhost), valid until", log)
        self.assertNotIn("WARNING", log)
        url = f"tls://localhost:{relay.port}"
        alice, bob, maildir = self.root / "a", self.root / "b", self.root / "Maildir"
        result = cli(alice, url, "init", "123", "--ca", self.ca)
        self.assertIn("Published to the relay", result.stdout, result.stderr)
        bob.mkdir(mode=0o700)
        (bob / "ca.pem").write_bytes(self.pki.ca_file.read_bytes())
        result = cli(bob, relay.server, "init", "345")
        self.assertIn("Published to the relay", result.stdout, result.stderr)

        sent = cli(alice, url, "send", "--ca", self.ca, "--to", "345", "over TLS")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        received = cli(bob, relay.server, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: over TLS\n",
                         received.stderr)

        client = subprocess.Popen(
            [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "mailclient",
             "--home", str(alice), "--server", url, "--ca", self.ca,
             "--maildir", str(maildir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(),
        )
        self.addCleanup(lambda: client.poll() is None and (client.terminate(), client.wait(30)))
        client_log = LineReader(client.stdout)
        client_log.wait_for(r"connected to tls:localhost:\d+ as 123")
        self.assertEqual(cli(bob, relay.server, "send", "--to", "123", "back").returncode, 0)
        client_log.wait_for(r"filed message")
        [filed] = (maildir / "new").iterdir()
        self.assertTrue(filed.read_text().rstrip().endswith("back"))

    def assertRefused(self, result: subprocess.CompletedProcess, why: str) -> str:
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertIn("refusing the relay at ", result.stderr)
        self.assertIn(why, result.stderr)
        return result.stderr

    def test_untrusted_relay_refused(self) -> None:
        """
        A client given another CA, the system's CAs, or a host name the
        certificate is not for refuses the relay: exit 1 (even with --queue),
        one line saying what did not match, nothing queued.
        """
        from tests.test_endpoints import PKI

        relay = self.start_relay()
        other = PKI(self.root / "other", "Other CA")
        alice = self.root / "a"
        self.assertEqual(cli(alice, None, "init", "123", "--offline").returncode, 0)
        port = relay.port
        err = self.assertRefused(
            cli(alice, f"tls://localhost:{port}", "send", "--ca", str(other.ca_file),
                "--queue", "--to", "345", "x"), "(unknown CA)")
        self.assertIn(f"is not signed by a CA in {other.ca_file}", err)
        err = self.assertRefused(cli(alice, f"tls:localhost:{port}", "fingerprint", "345"),
                                 "(unknown CA)")
        self.assertIn("is not signed by a CA this system trusts", err)
        err = self.assertRefused(
            cli(alice, f"tls:127.0.0.1:{port}", "send", "--ca", self.ca, "--to", "345", "x"),
            "(host name mismatch)")
        self.assertIn("the relay's TLS certificate is for localhost, not 127.0.0.1", err)
        outbox = cli(alice, None, "outbox")
        self.assertEqual(outbox.stdout, "The outbox is empty.\n")
        relay.stop()
        self.assertNotIn("authenticated", "".join(relay.log.lines))

    def test_expired_certificate(self) -> None:
        """An expired certificate: the relay warns at start, and clients refuse it."""
        import datetime

        self.key, self.cert, _ = self.pki.issue(
            prefix="expired",
            not_before=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
            not_after=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc))
        relay = self.start_relay()
        self.assertRegex("".join(relay.log.lines),
                         r"WARNING: the TLS certificate .* expired on 2025-01-01")
        alice = self.root / "a"
        self.assertEqual(cli(alice, None, "init", "123", "--offline").returncode, 0)
        self.assertRefused(
            cli(alice, relay.server, "send", "--ca", self.ca, "--to", "345", "x"),
            "the relay's TLS certificate (CN=localhost) expired on 2025-01-01 00:00:00 UTC "
            "(expired)")

    def test_tls_versions(self) -> None:
        """
        openssl s_client: TLS 1.3 completes a handshake; TLS 1.2 does not (its
        exporter need not be unique to the connection), nor does TLS 1.1.
        """
        skips.openssl()
        relay = self.start_relay()
        tls13 = _openssl(relay.port, "-tls1_3")
        self.assertEqual(tls13.returncode, 0, tls13.stdout + tls13.stderr)
        self.assertRegex(tls13.stdout, r"(New|Protocol *:), TLSv1\.3")
        tls12 = _openssl(relay.port, "-tls1_2")
        self.assertNotEqual(tls12.returncode, 0, tls12.stdout)
        self.assertRegex(tls12.stderr, r"alert protocol version|unsupported protocol")
        # SECLEVEL=0 lets this openssl offer TLS 1.1 at all: the refusal is the relay's.
        tls11 = _openssl(relay.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        self.assertNotEqual(tls11.returncode, 0, tls11.stdout)
        self.assertNotIn("no protocols available", tls11.stderr)
        self.assertRegex(tls11.stderr, r"alert protocol version|unsupported protocol")

    def test_unusable_files_stop_the_relay_at_once(self) -> None:
        """A key that is not the certificate's, or one file alone: one line, exit 1."""
        other_key, _, _ = self.pki.issue(prefix="other")
        for flags, reason in [
            (["--tls-cert", str(self.cert), "--tls-key", str(other_key)],
             f"--tls-key {other_key} is not the key of the certificate in "
             f"--tls-cert {self.cert}"),
            (["--tls-cert", str(self.cert)], "--tls-cert and --tls-key go together"),
            (["--tls-cert", str(self.root / "none.pem"), "--tls-key", str(self.key)],
             f"--tls-cert {self.root / 'none.pem'}: No such file or directory"),
        ]:
            result = subprocess.run(
                [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "mailrelay", "--store",
                 "memory", "--port", "tcp:0:interface=127.0.0.1", *flags],
                capture_output=True, text=True, timeout=60, env=environment(),
            )
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn(reason, result.stdout + result.stderr)
            self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_ssl_port_and_trust_roots(self) -> None:
        """
        The older spelling still works: --port ssl:...:privateKey=...:certKey=...,
        and a client's tls:...:trustRoots=DIRECTORY.
        """
        relay = Relay(
            self.root / "var",
            listen=f"ssl:{{port}}:privateKey={self.key}:certKey={self.cert}"
                   f":interface=127.0.0.1",
            scheme="tls:localhost",
        ).start()
        self.addCleanup(relay.stop)
        self.assertIn("serving TLS", "".join(relay.log.lines))
        server = f"{relay.server}:trustRoots={self.pki.directory}"
        alice, bob = self.root / "a", self.root / "b"
        for home, name in ((alice, "123"), (bob, "345")):
            result = cli(home, server, "init", name)
            self.assertIn("Published to the relay", result.stdout, result.stderr)
        sent = cli(alice, server, "send", "--to", "345", "over TLS")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        received = cli(bob, server, "recv", "--count", "1", "--timeout", "30")
        self.assertEqual(received.stdout, "Received message from 123: over TLS\n")


class CATests(SynchronousTestCase):
    """
    `mailrelay ca` from end to end, with real processes: a CA, the relay's TLS
    certificate from it, a relay in CA mode on TLS, and certified clients.
    """

    def test_certified_clients_over_tls_from_the_same_ca(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        ca_dir, tls = root / "ca", root / "tls"
        done = cli(root, None, "ca", "init", str(ca_dir), "--name", "Example CA")
        self.assertEqual(done.returncode, 0, done.stderr)
        done = cli(root, None, "ca", "relay-cert", str(ca_dir), "localhost",
                   "--out-dir", str(tls))
        self.assertEqual(done.returncode, 0, done.stderr)
        relay = Relay(root / "var", "--tls-cert", str(tls / "relay-cert.pem"), "--tls-key",
                      str(tls / "relay-key.pem"), "--ca", str(ca_dir / "ca.pem"),
                      scheme="tls:localhost").start()
        self.addCleanup(relay.stop)
        tls_ca = str(ca_dir / "ca.pem")
        homes = {"alice": root / "alice", "bob": root / "bob"}
        for name, home in homes.items():
            done = cli(home, relay.server, "init", name, "--offline")
            self.assertEqual(done.returncode, 0, done.stderr)
        # Not certified yet: the relay refuses, saying why.
        refused = cli(homes["alice"], relay.server, "send", "--ca", tls_ca, "--to", "bob", "x")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("admits only identities certified by its CA", refused.stderr)
        for name, home in homes.items():
            request, certificate = root / f"{name}.csr", root / f"{name}.pem"
            for args in (("ca", "request", "--out", str(request)),):
                done = cli(home, None, *args)
                self.assertEqual(done.returncode, 0, done.stderr)
            done = cli(root, None, "ca", "sign", str(ca_dir), str(request), "--id", name,
                       "--out", str(certificate))
            self.assertEqual(done.returncode, 0, done.stderr)
            for args in (("ca", "install", str(certificate)), ("ca", "use", tls_ca)):
                done = cli(home, None, *args)
                self.assertEqual(done.returncode, 0, done.stderr)
        done = cli(homes["bob"], relay.server, "recv", "--ca", tls_ca, "--timeout", "1")
        self.assertEqual(done.returncode, 0, done.stderr)
        sent = cli(homes["alice"], relay.server, "send", "--ca", tls_ca, "--to", "bob",
                   "certified and over TLS")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        received = cli(homes["bob"], relay.server, "recv", "--ca", tls_ca, "--count", "1",
                       "--timeout", "30")
        self.assertEqual(received.returncode, 0, received.stderr)
        self.assertEqual(received.stdout.splitlines(),
                         ["Received message from alice: certified and over TLS"])
        # A client trusting another root refuses the relay's certificate.
        other = root / "other"
        done = cli(root, None, "ca", "init", str(other), "--name", "Other CA")
        self.assertEqual(done.returncode, 0, done.stderr)
        refused = cli(homes["alice"], relay.server, "send", "--ca", str(other / "ca.pem"),
                      "--to", "bob", "y")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("not signed by a CA in", refused.stderr)
        self.assertNotIn("Traceback", refused.stderr)
