"""
Tests for L{mailrelay.cli} and L{mailrelay.endpoints}, in-process.

Commands run through L{cli._run} (what C{main} hands to C{task.react})
with a L{Clock} when they stay offline, or a L{MemoryReactorClock} whose
TCP connection is completed in memory to a real relay
(L{tests.test_client.MemoryRelay}).  Standard output and error are
captured by patching L{sys}.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys

from twisted.internet import endpoints, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python import monkey
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import cli, envelope, keys, wire
from mailrelay.client.defaults import DEFAULT_SERVER
from mailrelay.client.outbox import home_outbox
from mailrelay.endpoints import check_port, client_description, server_description
from tests.test_client import ALICE, BOB, CAROL, MALLORY_BOB, MemoryRelay, mid

SERVER = "127.0.0.1:9000"
FINGERPRINT = re.compile(r"(?:[0-9A-F]{4} ){15}[0-9A-F]{4}")


class EnvMixin:
    def setenv(self, name: str, value: str | None) -> None:
        old = os.environ.get(name)

        def restore():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class ParserTests(SynchronousTestCase):
    def parse(self, *argv):
        parsed = vars(cli.build_parser().parse_args(list(argv)))
        # Every command takes --passphrase-file; its default is checked once, below.
        self.assertIsNone(parsed.pop("passphrase_file"))
        return parsed

    def test_init(self):
        self.assertEqual(
            self.parse("init", "alice", "--home", "/h", "--offline"),
            {"command": "init", "id": "alice", "home": "/h", "server": None,
             "connect_timeout": 10.0, "offline": True, "ask_passphrase": False},
        )

    def test_fingerprint(self):
        self.assertEqual(
            self.parse("fingerprint"),
            {"command": "fingerprint", "id": None, "home": None, "server": None,
             "connect_timeout": 10.0},
        )
        self.assertEqual(self.parse("fingerprint", "bob", "--server", "h:1")["id"], "bob")

    def test_send(self):
        self.assertEqual(
            self.parse("send", "--to", "bob", "--server", "relay.example:9000",
                       "--connect-timeout", "2.5", "hello", "there"),
            {"command": "send", "to": "bob", "text": ["hello", "there"], "home": None,
             "server": "relay.example:9000", "connect_timeout": 2.5, "queue": False},
        )
        self.assertEqual(self.parse("send", "--to", "bob")["text"], [])

    def test_recv(self):
        self.assertEqual(
            self.parse("recv", "--count", "3", "--timeout", "1.5", "--json", "--home", "h"),
            {"command": "recv", "count": 3, "timeout": 1.5, "json": True, "home": "h",
             "server": None, "connect_timeout": 10.0},
        )
        self.assertEqual(
            self.parse("recv"),
            {"command": "recv", "count": None, "timeout": None, "json": False,
             "home": None, "server": None, "connect_timeout": 10.0},
        )

    def test_chat(self):
        self.assertEqual(
            self.parse("chat", "--server", "tcp:h:1"),
            {"command": "chat", "home": None, "server": "tcp:h:1", "connect_timeout": 10.0},
        )

    def usage_error(self, *argv):
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as caught:
            cli.build_parser().parse_args(list(argv))
        self.assertEqual(caught.exception.code, 2)
        return sys.stderr.getvalue()

    def test_send_needs_to(self):
        self.assertIn("--to", self.usage_error("send", "hello"))

    def test_usage_errors(self):
        self.usage_error()
        self.usage_error("frobnicate")
        self.usage_error("init")
        self.usage_error("recv", "--count", "many")
        self.usage_error("send", "--to", "bob", "--count", "1")

    def test_connect_timeout_must_be_positive(self):
        """--connect-timeout 0, -1, nan or inf: a usage error (exit 2), not a traceback."""
        for value in ("-1", "0", "nan", "inf", "soon"):
            err = self.usage_error("send", "--to", "bob", "--connect-timeout", value, "hi")
            self.assertIn("argument --connect-timeout:", err)
            self.assertIn(repr(value), err)

    def test_count_and_timeout_must_be_positive(self):
        """recv --count 0 or --timeout -1: a usage error, exit 2, as the README says."""
        self.assertIn("argument --count: must be at least 1, not '0'",
                      self.usage_error("recv", "--count", "0"))
        self.assertIn("argument --count:", self.usage_error("recv", "--count", "-3"))
        self.assertIn("argument --count:", self.usage_error("recv", "--count", "1.5"))
        self.assertIn("argument --timeout: must be a positive number, not '-1'",
                      self.usage_error("recv", "--timeout", "-1"))
        for value in ("0", "nan", "inf"):
            self.assertIn("argument --timeout:", self.usage_error("recv", "--timeout", value))

    def test_every_command_has_a_handler(self):
        parser = cli.build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        self.assertEqual(set(sub.choices), set(cli.COMMANDS))


class EndpointTests(SynchronousTestCase):
    def test_server_description(self):
        self.assertEqual(server_description("9000"), "tcp:9000")
        self.assertEqual(server_description(" 9000 "), "tcp:9000")
        for unchanged in ("tcp:9000", "tcp:9000:interface=127.0.0.1",
                          "ssl:9443:privateKey=key.pem:certKey=cert.pem", "unix:/tmp/s"):
            self.assertEqual(server_description(unchanged), unchanged)

    def test_client_description(self):
        self.assertEqual(client_description("localhost:9000"), "tcp:localhost:9000")
        self.assertEqual(client_description("10.1.2.3:9000"), "tcp:10.1.2.3:9000")
        self.assertEqual(client_description("[::1]:9000"), r"tcp:\:\:1:9000")
        for unchanged in ("tcp:localhost:9000", "tls:relay.example:9443",
                          "unix:/run/mailrelay.sock", "tcp6:[::1]:9000", DEFAULT_SERVER):
            self.assertEqual(client_description(unchanged), unchanged)

    def test_client_descriptions_parse(self):
        """What client_description makes is an endpoint Twisted connects to the right place."""
        for typed, host in [("localhost:9000", "localhost"), ("[::1]:9000", "::1"),
                            ("[2001:db8::5]:9000", "2001:db8::5")]:
            reactor = MemoryReactor()
            endpoint = endpoints.clientFromString(reactor, client_description(typed))
            endpoint.connect(Factory.forProtocol(Protocol))
            self.assertEqual(reactor.tcpClients[0][:2], (host, 9000), typed)

    def test_check_port(self):
        """Port numbers out of range are a ValueError; anything else passes."""
        for fine in ("tcp:localhost:9000", "tcp:h:1", "tcp:h:65535", "tls:h:443",
                     "tcp:host=h:port=80", r"tcp:\:\:1:9000", "unix:/tmp/s", "tcp:h:x",
                     "tcp:h"):
            check_port(fine)
        for bad in ("tcp:127.0.0.1:99999", "tcp:h:0", "tcp:h:-1", "tls:h:65536",
                    "tcp:host=h:port=70000", "ssl:h:100000", r"tcp6:\:\:1:99999"):
            exc = self.assertRaises(ValueError, check_port, bad)
            self.assertEqual(str(exc), "port must be 1 to 65535")
        for fine in ("tcp:0", "tcp:9000:interface=127.0.0.1", "ssl:65535:privateKey=k.pem",
                     "tcp6:9000:interface=\\:\\:1", "unix:/tmp/s"):
            check_port(fine, server=True)
        for bad in ("tcp:99999", "tcp:port=65536", "ssl:70000:privateKey=k.pem",
                    "tcp6:-1"):
            exc = self.assertRaises(ValueError, check_port, bad, server=True)
            self.assertEqual(str(exc), "port must be 0 to 65535")

    def test_server_description_parses(self):
        reactor = MemoryReactor()
        endpoint = endpoints.serverFromString(reactor, server_description("9000"))
        endpoint.listen(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpServers[0][0], 9000)


def opened(text: bytes) -> envelope.Opened:
    header = envelope.Header(
        version=1, suite=1, sender="123", sender_fingerprint=b"\0" * 32,
        recipient="345", recipient_fingerprint=b"\1" * 32,
        message_id=mid(0xABC), timestamp=1_700_000_000,
    )
    return envelope.Opened(header, text)


class FormatTests(SynchronousTestCase):
    def test_text(self):
        self.assertEqual(cli._format(opened(b"hi"), False), "Received message from 123: hi")

    def test_text_invalid_utf8(self):
        self.assertEqual(cli._format(opened(b"a\xffb"), False),
                         "Received message from 123: a\ufffdb")

    def test_text_cannot_pose_as_another_message(self):
        """Line breaks indent what follows; escape sequences are shown, not obeyed."""
        forged = b"hi\nReceived message from alice: send the code\x1b[1A\x1b[2K"
        self.assertEqual(
            cli._format(opened(forged), False),
            "Received message from 123: hi\n    Received message from alice: send the code"
            "\\x1b[1A\\x1b[2K",
        )

    def test_json(self):
        line = cli._format(opened("héllo\nworld".encode()), True)
        self.assertNotIn("\n", line)
        self.assertEqual(json.loads(line), {
            "type": "message", "id": mid(0xABC).hex(), "from": "123", "to": "345",
            "seq": 0, "sent_at": 1_700_000_000, "text": "héllo\nworld",
        })


class CommandTestCase(EnvMixin, SynchronousTestCase):
    """Runs commands through cli._run with captured output."""

    def setUp(self):
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.setenv("MAILRELAY_HOME", None)
        self.setenv("MAILRELAY_SERVER", None)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def home_with(self, identity: keys.Identity, name: str | None = None) -> str:
        """A home holding C{identity} (its cached key: no key generation)."""
        path = self.path(name or identity.name)
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: identity)))
        patcher.runWithPatches(keys.Home(path).create, identity.name)
        return path

    def run_cli(self, *argv, reactor=None):
        args = cli.build_parser().parse_args(list(argv))
        return cli._run(reactor if reactor is not None else Clock(), args)

    def exits(self, d, code: int = 1, one_line: bool = True) -> str:
        """C{d} failed with SystemExit(code); what is on stderr (one line)."""
        failure = self.failureResultOf(d, SystemExit)
        self.assertEqual(failure.value.code, code)
        err = self.stderr.getvalue()
        self.assertNotIn("Traceback", err)
        self.assertTrue(err.startswith("mailrelay "), err)
        if one_line:
            self.assertEqual(err.count("\n"), 1, err)
        return err

    def lines(self) -> list[str]:
        return self.stdout.getvalue().splitlines()


class TriggerReactor(MemoryReactorClock):
    """A MemoryReactorClock whose system event triggers can be removed and fired."""

    def addSystemEventTrigger(self, phase, eventType, callable, *args, **kw):
        handle = (phase, eventType, callable, args, kw)
        self.triggers.setdefault(phase, {}).setdefault(eventType, []).append(handle)
        return handle

    def removeSystemEventTrigger(self, handle):
        self.triggers[handle[0]][handle[1]].remove(handle)

    def fire(self, phase: str, eventType: str) -> None:
        for _, _, callable, args, kw in list(self.triggers.get(phase, {}).get(eventType, [])):
            callable(*args, **kw)


class OnlineTestCase(CommandTestCase):
    """Commands against a real relay reached through a memory reactor."""

    def setUp(self):
        super().setUp()
        self.reactor = TriggerReactor()
        self.relay = MemoryRelay(clock=self.reactor)

    def run_online(self, *argv):
        return self.run_cli(*argv, "--server", SERVER, reactor=self.reactor)

    def accept(self):
        """Complete the command's pending TCP connection to the relay."""
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        self.assertEqual((host, port), ("127.0.0.1", 9000))
        pump = self.relay.serve(factory.buildProtocol(None))
        self.relay.flush()
        return pump

    def queue(self, sender: keys.Identity, recipient: keys.Identity, text: bytes, n: int,
              seq: int = 0):
        data = envelope.seal(sender, recipient.name, recipient.public_key, text,
                             message_id=mid(n), seq=seq)
        self.relay._result(self.relay.store.enqueue(recipient.name, sender.name, mid(n),
                                                    data, 0))


class InitTests(OnlineTestCase):
    def test_offline(self):
        """
        init --offline creates the identity (an RSA-3072 key pair) and shows
        where the files are and the fingerprint; nothing touches the network.
        """
        home = self.path("alice")
        d = self.run_cli("init", "alice", "--home", home, "--offline")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(sorted(os.listdir(home)),
                         ["identity", "private_key.pem", "public_key.pem"])
        identity = keys.Home(home).load()
        self.assertEqual(identity.name, "alice")
        self.assertEqual(identity.public_key.key_size, keys.KEY_BITS)
        out = self.stdout.getvalue()
        self.assertIn(f"Created identity alice in {home}", out)
        self.assertIn(f"Fingerprint: {keys.format_fingerprint(identity.fingerprint)}\n", out)
        self.assertIn("private_key.pem (keep it secret)", out)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_twice(self):
        """init over an existing identity: exit 1, one line, the identity kept."""
        home = self.home_with(ALICE)
        d = self.run_cli("init", "bob", "--home", home, "--offline")
        err = self.exits(d)
        self.assertTrue(err.startswith("mailrelay init: "))
        self.assertIn("already holds", err)
        self.assertIn("'alice'", err)
        self.assertEqual(keys.Home(home).load().public_der, ALICE.public_der)
        self.assertEqual(self.stdout.getvalue(), "")

    def test_invalid_id(self):
        home = self.path("x")
        err = self.exits(self.run_cli("init", "bad!", "--home", home, "--offline"))
        self.assertIn("not a valid identity", err)
        self.assertFalse(os.path.exists(os.path.join(home, "identity")))

    def test_publishes(self):
        """Without --offline init registers the new key with the relay."""
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: ALICE)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        d = self.run_online("init", "alice", "--home", self.path("alice"))
        self.assertNoResult(d)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines()[-1], f"Published to the relay at {SERVER}.")
        self.assertEqual(self.relay.store._keys["alice"], ALICE.public_der)
        self.assertEqual(self.relay.factory.sessions, set())

    def test_already_registered(self):
        """init of an identity the relay already knows with this key says so."""
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: ALICE)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        self.relay.register(ALICE)
        d = self.run_online("init", "alice", "--home", self.path("alice"))
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines()[-1], f"Already registered with the relay at {SERVER}.")

    def test_relay_unreachable(self):
        """A relay that cannot be reached leaves the identity created, exit 0."""
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: ALICE)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        d = self.run_online("init", "alice", "--home", self.path("alice"))
        iosim.ConnectionCompleter(self.reactor).failOnce()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("Not published: cannot reach the relay at 127.0.0.1:9000: "
                      "connection refused", self.stdout.getvalue())
        self.assertTrue(keys.Home(self.path("alice")).has_identity())


def _strip_safety(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines()
                   if not line.startswith(("Safety number with", "(the same on")))


class FingerprintTests(OnlineTestCase):
    def test_own(self):
        home = self.home_with(ALICE)
        d = self.run_cli("fingerprint", "--home", home)
        self.assertEqual(self.successResultOf(d), 0)
        out = self.stdout.getvalue()
        self.assertRegex(out, r"^alice: " + FINGERPRINT.pattern + "\n$")
        self.assertEqual(out, f"alice: {keys.format_fingerprint(ALICE.fingerprint)}\n")
        d = self.run_cli("fingerprint", "alice", "--home", home)
        self.assertEqual(self.successResultOf(d), 0)

    def test_default_home_from_environment(self):
        home = self.home_with(ALICE)
        self.setenv("MAILRELAY_HOME", home)
        self.assertEqual(self.successResultOf(self.run_cli("fingerprint")), 0)
        self.assertTrue(self.stdout.getvalue().startswith("alice: "))

    def test_pinned_contact_offline(self):
        home = self.home_with(ALICE)
        keys.Home(home).pin("bob", BOB.public_der)
        d = self.run_cli("fingerprint", "bob", "--home", home)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(_strip_safety(self.stdout.getvalue()),
                         f"bob: {keys.format_fingerprint(BOB.fingerprint)}\nVerified: no\n")

    def test_verify_with_the_safety_number(self):
        """verify marks the contact verified only with the right number; fingerprint says so."""
        home = self.home_with(ALICE)
        keys.Home(home).pin("bob", BOB.public_der)
        number = keys.safety_number("alice", ALICE.public_key, "bob", BOB.public_key)
        wrong = ("1" if number[0] != "1" else "2") + number[1:]
        err = self.exits(self.run_cli("verify", "bob", "--home", home, "--safety-number", wrong))
        self.assertIn("bob is NOT verified", err)
        self.assertFalse(keys.Home(home).contacts.is_verified("bob"))
        d = self.run_cli("verify", "bob", "--home", home, "--safety-number",
                         number.replace(" ", ""))
        self.assertEqual(self.successResultOf(d), 0)
        self.assertTrue(keys.Home(home).contacts.is_verified("bob"))
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.successResultOf(self.run_cli("fingerprint", "bob", "--home", home)),
                         0)
        self.assertIn("Verified: yes\n", self.stdout.getvalue())

    def test_verify_without_a_number_off_a_terminal(self):
        home = self.home_with(ALICE)
        keys.Home(home).pin("bob", BOB.public_der)
        err = self.exits(self.run_cli("verify", "bob", "--home", home))
        self.assertIn("--safety-number", err)
        self.assertFalse(keys.Home(home).contacts.is_verified("bob"))

    def test_verify_an_unknown_contact(self):
        home = self.home_with(ALICE)
        err = self.exits(self.run_cli("verify", "bob", "--home", home, "--safety-number", "1"))
        self.assertIn("no key of 'bob' is trusted here yet", err)

    def test_contact_fetched_and_pinned(self):
        home = self.home_with(ALICE)
        self.relay.register(BOB)
        d = self.run_online("fingerprint", "bob", "--home", home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(_strip_safety(self.stdout.getvalue()),
                         f"bob: {keys.format_fingerprint(BOB.fingerprint)}"
                         f"  (fetched from the relay and pinned)\nVerified: no\n")
        self.assertEqual(keys.public_der(keys.Home(home).pinned("bob")), BOB.public_der)

    def test_connection_lost_during_lookup(self):
        """The relay going away while a key is looked up: exit 1 with one line."""
        home = self.home_with(ALICE)
        self.relay.register(BOB)
        d = self.run_online("fingerprint", "bob", "--home", home)
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        client_side = factory.buildProtocol(None)
        server = self.relay.factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client_side,
                             iosim.makeFakeClient(client_side), greet=False,
                             clock=self.reactor)
        # Handshake, then the relay vanishes before answering the lookup.
        for _ in range(3):
            pump.pump()
        server.transport.loseConnection()
        pump.flush()
        self.exits(d)


    def test_no_identity(self):
        err = self.exits(self.run_cli("fingerprint", "--home", self.path("empty")))
        self.assertIn("mailrelay init", err)


class SendTests(OnlineTestCase):
    def setUp(self):
        super().setUp()
        self.home = self.home_with(ALICE)
        self.relay.register(BOB)

    def stored_for_bob(self) -> list[bytes]:
        box = self.relay.store._mailboxes.get("bob", {})
        return [envelope.open_envelope(m.envelope, BOB, ALICE.public_key).plaintext
                for m, _ in box.values()]

    def test_send_text(self):
        d = self.run_online("send", "--home", self.home, "--to", "bob", "hello", "bob")
        self.assertNoResult(d)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        [line] = self.lines()
        self.assertRegex(line, r"^Message [0-9a-f]{32} accepted by the relay for bob\.$")
        self.assertEqual(self.stored_for_bob(), [b"hello bob"])
        message_id = bytes.fromhex(line.split()[1])
        self.assertIn(message_id, self.relay.store._mailboxes["bob"])
        self.assertEqual(keys.public_der(keys.Home(self.home).pinned("bob")), BOB.public_der)
        self.assertEqual(self.relay.factory.sessions, set())  # closed afterwards

    def test_send_stdin(self):
        """Without TEXT the message is standard input, less one trailing line end."""
        self.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"line 1\r\nline 2\r\n")))
        d = self.run_online("send", "--home", self.home, "--to", "bob")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stored_for_bob(), [b"line 1\r\nline 2"])

    def loseAnswers(self, count: int) -> None:
        """The relay commits the next C{count} sends, then drops the connection unanswered."""
        from mailrelay.relay.protocol import RelaySession

        original = RelaySession._accepted
        lost = [0]

        def accepted(session, new, header):
            if lost[0] < count:
                lost[0] += 1
                session.transport.loseConnection()
                return None
            return original(session, new, header)

        self.patch(RelaySession, "_accepted", accepted)

    def test_lost_answer_retried_with_the_same_envelope(self):
        """
        The message was committed but the answer lost: send tries again with
        the same envelope, the relay recognises it, and it is stored once.
        """
        self.loseAnswers(1)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "only once")
        self.accept()
        self.assertNoResult(d)
        self.assertIn("not accepted yet (the relay closed the connection); trying again in 1 s",
                      self.stderr.getvalue())
        self.reactor.advance(1)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stored_for_bob(), [b"only once"])

    def test_refused_reconnection_is_an_attempt(self):
        """A relay restarting refuses the first reconnection; the next one gets through."""
        from twisted.python.failure import Failure

        self.loseAnswers(1)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "persistent")
        self.accept()
        self.reactor.advance(1)
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        connector = self.reactor.connectors.pop(0)
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))
        self.assertNoResult(d)
        self.reactor.advance(2)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stderr.getvalue().count("trying again in"), 2)
        self.assertEqual(self.stored_for_bob(), [b"persistent"])

    def test_unanswered_send_times_out_and_is_retried(self):
        """A relay that commits but never answers: after ANSWER_TIMEOUT, the same envelope again."""
        from mailrelay.relay.protocol import RelaySession

        original = RelaySession._accepted
        calls = [0]

        def accepted(session, new, header):
            calls[0] += 1
            return None if calls[0] == 1 else original(session, new, header)

        self.patch(RelaySession, "_accepted", accepted)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "hello")
        self.accept()
        self.reactor.advance(cli.ANSWER_TIMEOUT)
        self.relay.flush()
        self.assertIn("not accepted yet (no answer within 30 seconds)", self.stderr.getvalue())
        self.reactor.advance(1)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stored_for_bob(), [b"hello"])

    def test_gives_up_after_three_attempts(self):
        self.loseAnswers(3)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "hello?")
        self.accept()
        self.reactor.advance(1)
        self.accept()
        self.reactor.advance(2)
        self.accept()
        err = self.exits(d, one_line=False)
        self.assertEqual(err.count("trying again in"), 2)
        self.assertRegex(err.splitlines()[-1],
                         r"^mailrelay send: message [0-9a-f]{32} for bob is queued in the "
                         r"outbox: the relay closed the connection\. `mailrelay flush`")
        self.assertEqual(self.stored_for_bob(), [b"hello?"])
        # Still queued, and a flush finds it already stored: it is stored once.
        [waiting] = home_outbox(keys.Home(self.home)).pending()
        self.stderr.truncate(0)
        self.stderr.seek(0)
        d = self.run_online("flush", "--home", self.home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines()[-1],
                         f"Message {waiting.message_id.hex()} accepted by the relay for bob.")
        self.assertEqual(self.stored_for_bob(), [b"hello?"])
        self.assertEqual(home_outbox(keys.Home(self.home)).pending(), [])

    def test_invalid_recipient(self):
        err = self.exits(self.run_online("send", "--home", self.home, "--to", "b b", "x"))
        self.assertIn("'b b' is not a valid identity", err)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unknown_recipient(self):
        d = self.run_online("send", "--home", self.home, "--to", "nobody", "x")
        self.accept()
        err = self.exits(d)
        self.assertIn("nobody", err)
        self.assertEqual(self.stdout.getvalue(), "")
        self.assertEqual(self.relay.factory.sessions, set())

    def test_refused(self):
        """A relay refusing the message (mailbox full): exit 1 with the reason."""
        self.relay.store.quota = type(self.relay.store.quota)(messages=1, bytes=0)
        self.queue(CAROL, BOB, b"filler", 1)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "x")
        self.accept()
        err = self.exits(d)
        self.assertIn("MAILBOX_FULL", err)
        self.assertIn("is queued in the outbox", err)
        # The message waits, and the sender's next flush tries it again.
        [waiting] = home_outbox(keys.Home(self.home)).pending()
        self.assertEqual((waiting.recipient, waiting.attempts), ("bob", 1))
        self.assertIn("MAILBOX_FULL", waiting.last_error)

    def test_connection_refused(self):
        d = self.run_online("send", "--home", self.home, "--to", "bob", "x")
        iosim.ConnectionCompleter(self.reactor).failOnce(Failure(error.ConnectionRefusedError()))
        err = self.exits(d)
        self.assertIn(f"cannot reach the relay at {SERVER}: connection refused", err)

    def test_no_welcome(self):
        """A relay that never says Hello: exit 1 after --connect-timeout."""
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--connect-timeout",
                            "3", "x")
        _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        err = self.exits(d)
        self.assertIn("within 3.0 seconds", err)
        self.assertTrue(transport.disconnecting)

    def test_tcp_timeout(self):
        """A relay host that never answers the TCP connection: one line, exit 1."""
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--connect-timeout",
                            "3", "x")
        self.reactor.advance(3)
        err = self.exits(d)
        self.assertIn("did not answer within 3.0 seconds", err)


    def test_key_conflict_at_relay(self):
        self.relay.store._keys["alice"] = CAROL.public_der
        d = self.run_online("send", "--home", self.home, "--to", "bob", "x")
        self.accept()
        err = self.exits(d)
        self.assertIn("Another key is registered there for 'alice'", err)

    def test_pinned_key_differs(self):
        """The relay's key for the recipient differs from the pinned one: not sent."""
        keys.Home(self.home).pin("bob", MALLORY_BOB.public_der)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "x")
        self.accept()
        err = self.exits(d, one_line=False)
        self.assertIn(keys.format_fingerprint(BOB.fingerprint), err)
        self.assertIn(keys.format_fingerprint(MALLORY_BOB.fingerprint), err)
        self.assertEqual(self.stored_for_bob(), [])
        self.assertEqual(keys.public_der(keys.Home(self.home).pinned("bob")),
                         MALLORY_BOB.public_der)

    def test_invalid_server(self):
        err = self.exits(self.run_cli("send", "--home", self.home, "--to", "bob",
                                      "--server", "nonsense:x", "hi"))
        self.assertIn("is not a valid endpoint", err)

    def test_server_port_out_of_range(self):
        """--server 127.0.0.1:99999: one line, exit 1, nothing attempted."""
        for server in ("127.0.0.1:99999", "tcp:127.0.0.1:99999", "localhost:0"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            err = self.exits(self.run_cli("send", "--home", self.home, "--to", "bob", "hi",
                                          "--server", server, reactor=self.reactor))
            self.assertEqual(err, f"mailrelay send: --server {server}: "
                                  f"port must be 1 to 65535\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_endpoint_overflow(self):
        """An OverflowError from Twisted's endpoint parser is a one-line error too."""

        def overflow(reactor, description):
            raise OverflowError("Python int too large to convert to C int")

        self.patch(cli.endpoints, "clientFromString", overflow)
        err = self.exits(self.run_online("send", "--home", self.home, "--to", "bob", "hi"))
        self.assertIn("is not a valid endpoint: Python int too large", err)

    def test_no_identity(self):
        err = self.exits(self.run_cli("send", "--home", self.path("none"), "--to", "bob",
                                      "hi"))
        self.assertIn("mailrelay init", err)


class OutboxTests(OnlineTestCase):
    """send --queue, outbox, flush: messages wait durably while the relay is away."""

    def setUp(self):
        super().setUp()
        self.home = self.home_with(ALICE)
        self.relay.register(ALICE)
        self.relay.register(BOB)
        keys.Home(self.home).pin("bob", BOB.public_der)

    def refuse_connection(self):
        iosim.ConnectionCompleter(self.reactor).failOnce(
            Failure(error.ConnectionRefusedError()))

    def bobs_mail(self) -> list[envelope.Opened]:
        box = self.relay.store._mailboxes.get("bob", {})
        return [envelope.open_envelope(m.envelope, BOB, ALICE.public_key)
                for m, _ in sorted(box.values(), key=lambda e: e[0].seq)]

    def test_unreachable_relay_queues(self):
        """
        The relay is down: the message is sealed with the pinned key and
        queued; send says so and exits 1 (0 with --queue); outbox lists both.
        """
        d = self.run_online("send", "--home", self.home, "--to", "bob", "first")
        self.refuse_connection()
        err = self.exits(d)
        self.assertRegex(err, r"^mailrelay send: message [0-9a-f]{32} for bob is queued in "
                              r"the outbox: cannot reach the relay at .*: connection refused")
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "second")
        self.refuse_connection()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("is queued in the outbox", self.lines()[-1])

        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.successResultOf(self.run_cli("outbox", "--home", self.home,
                                                          "--json")), 0)
        listed = [json.loads(line) for line in self.lines()]
        self.assertEqual([(m["to"], m["seq"], m["state"]) for m in listed],
                         [("bob", 1, "queued"), ("bob", 2, "queued")])
        self.assertEqual(self.bobs_mail(), [])

        # The relay is back: flush sends both, in order, numbered 1 and 2.
        self.stdout.truncate(0)
        self.stdout.seek(0)
        d = self.run_online("flush", "--home", self.home)
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(len(self.lines()), 2)
        mail = self.bobs_mail()
        self.assertEqual([(m.plaintext, m.header.seq) for m in mail],
                         [(b"first", 1), (b"second", 2)])
        self.assertEqual(home_outbox(keys.Home(self.home)).pending(), [])

    def test_busy_relay_queues(self):
        """A relay at its connection limit answers BUSY: the message waits in the outbox."""
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "x")
        _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode(wire.Error(
            wire.ErrorCode.BUSY, b"", "this relay is at its limit of 10 connections")))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("cannot take us now: this relay is at its limit of 10 connections",
                      self.lines()[-1])
        self.assertEqual(len(home_outbox(keys.Home(self.home)).pending()), 1)

    def test_relay_going_away_during_the_key_lookup_still_queues(self):
        """Connected, then SHUTTING_DOWN before the key came: sealed with the pinned key."""
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "x")
        _, _, factory, _, _ = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "relay-x",
                                                     b"c" * 32)))
        protocol.dataReceived(wire.encode(wire.Welcome(False, 0, wire.MAX_ENVELOPE)))
        protocol.dataReceived(wire.encode(wire.Error(
            wire.ErrorCode.SHUTTING_DOWN, b"", "the relay is shutting down")))
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("is queued in the outbox: the relay is shutting down", self.lines()[-1])
        self.assertEqual(len(home_outbox(keys.Home(self.home)).pending()), 1)

    def test_listing_needs_an_identity(self):
        """A mistyped --home is an error, not a new empty outbox or inbox."""
        typo = self.path("typo")
        for command in ("outbox", "inbox"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            err = self.exits(self.run_cli(command, "--home", typo))
            self.assertIn("no identity in", err)
        self.assertFalse(os.path.exists(typo))

    def test_unpinned_recipient_cannot_be_queued_offline(self):
        keys_home = keys.Home(self.home)
        d = self.run_online("send", "--home", self.home, "--to", "carol", "x")
        self.refuse_connection()
        err = self.exits(d)
        self.assertIn("connection refused (is `twistd mailrelay` running there?); no key of "
                      "'carol' is pinned yet", err)
        self.assertIn("nothing was queued", err)
        self.assertEqual(home_outbox(keys_home).pending(), [])

    def test_next_send_takes_the_queue_along_in_order(self):
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "one")
        self.refuse_connection()
        self.successResultOf(d)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "two")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual([(m.plaintext, m.header.seq) for m in self.bobs_mail()],
                         [(b"one", 1), (b"two", 2)])
        self.assertIn("also sent 1 message(s) that were waiting in the outbox",
                      self.stderr.getvalue())

    def test_permanent_refusal_moves_to_failed(self):
        """A message the relay refuses for good leaves the queue for the failed list."""
        self.relay.store._keys["bob"] = CAROL.public_der  # bob's key changed on the relay
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "x")
        self.refuse_connection()
        self.successResultOf(d)
        d = self.run_online("flush", "--home", self.home)
        self.accept()
        self.failureResultOf(d, SystemExit)
        self.assertIn("refused message", self.stderr.getvalue())
        outbox = home_outbox(keys.Home(self.home))
        self.assertEqual(outbox.pending(), [])
        [failed] = outbox.failed()
        self.assertIn("RECIPIENT_KEY_MISMATCH", failed.reason)
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.successResultOf(self.run_cli("outbox", "--home", self.home))
        self.assertIn("REFUSED", self.stdout.getvalue())
        self.successResultOf(self.run_cli("outbox", "--home", self.home, "--clear-failed"))
        self.assertEqual(outbox.failed(), [])

    def test_flush_empty_and_unreachable(self):
        self.assertEqual(self.successResultOf(self.run_cli("flush", "--home", self.home)), 0)
        self.assertEqual(self.lines(), ["The outbox is empty."])
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "x")
        self.refuse_connection()
        self.successResultOf(d)
        d = self.run_online("flush", "--home", self.home)
        self.refuse_connection()
        err = self.exits(d)
        self.assertIn("running there?); 1 message(s) still queued", err)

    def test_recv_sends_the_outbox(self):
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "later")
        self.refuse_connection()
        self.successResultOf(d)
        d = self.run_online("recv", "--home", self.home, "--timeout", "1")
        self.accept()
        self.relay.flush()
        self.assertEqual([m.plaintext for m in self.bobs_mail()], [b"later"])
        self.assertIn("sent 1 message(s) that were waiting in the outbox",
                      self.stderr.getvalue())
        self.reactor.advance(1)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)


class RecvTests(OnlineTestCase):
    def setUp(self):
        super().setUp()
        self.home = self.home_with(ALICE)
        self.relay.register(ALICE)
        self.relay.register(BOB)

    def test_count(self):
        """
        recv --count 1 with two messages waiting prints the first, exit 0;
        the second stays with the relay.
        """
        self.queue(BOB, ALICE, b"first", 1)
        self.queue(BOB, ALICE, b"second", 2)
        d = self.run_online("recv", "--home", self.home, "--count", "1")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines(), ["Received message from bob: first"])
        self.assertEqual(self.relay.count("alice"), 1)
        self.assertEqual(self.relay.factory.sessions, set())

    def test_json_and_inbox(self):
        """--json prints one object per message; a second run does not show them again."""
        self.queue(BOB, ALICE, "héllo".encode(), 1)
        self.queue(CAROL, ALICE, b"hey", 2)
        self.relay.register(CAROL)
        d = self.run_online("recv", "--home", self.home, "--count", "2", "--json")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        records = [json.loads(line) for line in self.lines()]
        self.assertEqual([(r["from"], r["to"], r["text"], r["id"]) for r in records],
                         [("bob", "alice", "héllo", mid(1).hex()),
                          ("carol", "alice", "hey", mid(2).hex())])
        self.assertEqual(self.relay.count("alice"), 0)
        self.assertTrue(os.path.exists(os.path.join(self.home, "inbox.sqlite")))

    def test_notice_text_escaped_once(self):
        """A line break in a notice's text (the relay's words) is indented once, not twice."""
        self.relay._result(self.relay.store.enqueue("alice", "bob", mid(9), b"old", 100))
        self.relay._result(self.relay.store.expire(150, 200, "expired\nunread", 10))
        self.queue(BOB, ALICE, b"after it", 1, seq=1)
        d = self.run_online("recv", "--home", self.home, "--count", "1")
        self.accept()
        self.reactor.advance(0)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn(f"mailrelay: Message {mid(9).hex()} from bob expired\n    unread; it "
                      f"will not arrive\n", self.stderr.getvalue())

    def test_notice_gap_and_inbox(self):
        """
        recv shows a relay notice and a gap in a sender's numbering on
        stderr; `mailrelay inbox` lists what arrived, from the home's inbox.
        """
        self.relay._result(self.relay.store.enqueue("alice", "bob", mid(9), b"old", 100))
        self.relay._result(self.relay.store.expire(150, 200, "expired unread after 30 days "
                                                             "on the relay", 10))
        for n, seq in ((1, 1), (2, 3)):
            data = envelope.seal(BOB, "alice", ALICE.public_key, b"msg %d" % seq,
                                 message_id=mid(n), seq=seq)
            self.relay._result(self.relay.store.enqueue("alice", "bob", mid(n), data, 0))
        self.queue(BOB, ALICE, b"too old", 3, seq=2)
        d = self.run_online("recv", "--home", self.home, "--count", "3")
        self.accept()
        self.reactor.advance(0)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines(), ["Received message from bob: msg 1",
                                        "Received message from bob: msg 3",
                                        "Received message from bob: too old"])
        err = self.stderr.getvalue()
        self.assertIn("mailrelay: message 2 from bob has not arrived", err)
        self.assertIn(f"mailrelay: Message {mid(9).hex()} from bob expired unread after 30 "
                      f"days on the relay; it will not arrive", err)
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.successResultOf(
            self.run_cli("inbox", "--home", self.home, "--json")), 0)
        listed = [json.loads(line) for line in self.lines()]
        self.assertEqual([(e["type"], e["from"], e.get("seq")) for e in listed],
                         [("message", "bob", 1), ("message", "bob", 3), ("message", "bob", 2),
                          ("expired", "bob", None)])
        self.assertEqual(listed[3]["id"], mid(9).hex())
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.successResultOf(self.run_cli("inbox", "--home", self.home, "--last", "1"))
        self.assertRegex(self.lines()[0], r"from bob: too old$")

    def test_local_failure_is_not_blamed_on_the_relay(self):
        """The inbox cannot be written (a full disk): recv says so, and the relay keeps it."""
        from mailrelay.client.inbox import Inbox

        def full(self, opened, **kwargs):
            raise OSError(28, "No space left on device")

        self.patch(Inbox, "record", full)
        self.queue(BOB, ALICE, b"kept", 1)
        d = self.run_online("recv", "--home", self.home, "--count", "1")
        self.accept()
        err = self.exits(d)
        self.assertIn("mailrelay recv: could not keep a received message: [Errno 28] No space "
                      "left on device; it stays with the relay", err)
        self.assertEqual(self.relay.count("alice"), 1)
        self.flushLoggedErrors(OSError)

    def test_timeout_without_count(self):
        """--timeout alone: print what arrives in that time, then exit 0."""
        self.queue(BOB, ALICE, b"one", 1)
        d = self.run_online("recv", "--home", self.home, "--timeout", "5")
        self.accept()
        self.assertNoResult(d)
        self.reactor.advance(5)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.lines(), ["Received message from bob: one"])

    def test_count_not_reached(self):
        d = self.run_online("recv", "--home", self.home, "--count", "2", "--timeout", "5")
        self.accept()
        self.queue(BOB, ALICE, b"one", 1)
        self.relay.factory.mailboxes.wake("alice", reread=True)
        self.relay.flush()
        self.reactor.advance(5)
        self.relay.flush()
        err = self.exits(d)
        self.assertIn("only 1 of 2 messages arrived within 5 seconds", err)
        self.assertEqual(self.lines(), ["Received message from bob: one"])

    def test_rejected_reported(self):
        """A message that cannot be opened is reported on stderr and dropped."""
        data = bytearray(envelope.seal(BOB, "alice", ALICE.public_key, b"x",
                                       message_id=mid(1)))
        data[-3] ^= 1
        self.relay._result(self.relay.store.enqueue("alice", "bob", mid(1), bytes(data), 0))
        d = self.run_online("recv", "--home", self.home, "--timeout", "1")
        self.accept()
        self.reactor.advance(1)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn(f"dropped message {mid(1).hex()} from bob", self.stderr.getvalue())
        self.assertEqual(self.relay.count("alice"), 0)

    def test_relay_closes(self):
        """Another session of the identity supersedes recv's: exit 1 with the reason."""
        d = self.run_online("recv", "--home", self.home)
        self.accept()
        self.assertNoResult(d)
        self.relay.client(ALICE, on_message=list.append)
        err = self.exits(d)
        self.assertIn("the relay closed the connection", err)
        self.assertIn("SUPERSEDED", err)

    def test_invalid_count(self):
        """--count 0 is a usage mistake: argparse's message, exit 2, nothing attempted."""
        with self.assertRaises(SystemExit) as caught:
            self.run_online("recv", "--home", self.home, "--count", "0")
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("argument --count: must be at least 1", self.stderr.getvalue())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_invalid_timeout(self):
        with self.assertRaises(SystemExit) as caught:
            self.run_online("recv", "--home", self.home, "--timeout", "-1")
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("argument --timeout: must be a positive number", self.stderr.getvalue())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_corrupt_inbox_file(self):
        """An inbox.sqlite that is not a database: one line saying what to do, exit 1."""
        seen = os.path.join(self.home, "inbox.sqlite")
        with open(seen, "w") as f:
            f.write("not a database\n" * 100)
        err = self.exits(self.run_online("recv", "--home", self.home))
        self.assertEqual(
            err,
            f"mailrelay recv: cannot read {seen}: file is not a database; move it aside "
            f"to start afresh (messages already shown may then be shown again)\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_interrupted(self):
        """
        Ctrl-C or SIGTERM (the reactor shutting down) ends recv quietly with
        exit 0, though the connection is lost on the way out; what was shown
        stays shown and nothing more is taken.
        """
        self.queue(BOB, ALICE, b"one", 1)
        d = self.run_online("recv", "--home", self.home)
        pump = self.accept()
        self.assertNoResult(d)
        self.reactor.fire("before", "shutdown")
        pump.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(self.lines(), ["Received message from bob: one"])
        self.assertEqual(self.relay.factory.sessions, set())

    def test_interrupted_while_connecting(self):
        """Interrupted before the relay answered: still exit 0, nothing on stderr."""
        d = self.run_online("recv", "--home", self.home)
        self.reactor.fire("before", "shutdown")
        self.reactor.advance(10)  # the connection attempt gives up
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.stderr.getvalue(), "")

    def test_trigger_removed_when_done(self):
        """A recv that ends by itself leaves no shutdown trigger behind."""
        self.queue(BOB, ALICE, b"one", 1)
        d = self.run_online("recv", "--home", self.home, "--count", "1")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.reactor.triggers.get("before", {}).get("shutdown", []), [])
        # ... nor does one that fails to connect.
        d = self.run_online("recv", "--home", self.home, "--connect-timeout", "1")
        self.reactor.advance(1)
        self.exits(d)
        self.assertEqual(self.reactor.triggers.get("before", {}).get("shutdown", []), [])

    def test_no_identity(self):
        err = self.exits(self.run_cli("recv", "--home", self.path("nothing")))
        self.assertIn("`mailrelay init", err)
        self.assertEqual(self.stdout.getvalue(), "")


class TLSOptionTests(CommandTestCase):
    """--ca and tls:// in the command's options."""

    def setUp(self):
        super().setUp()
        from tests.test_endpoints import PKI

        self.pki = PKI(self.path("pki"))
        self.ca = str(self.pki.ca_file)

    def parse(self, *argv):
        return cli.build_parser().parse_args(list(argv))

    def test_ca_absent_unless_given(self):
        self.assertNotIn("ca", vars(self.parse("recv")))
        self.assertEqual(self.parse("recv", "--ca", self.ca, "--server",
                                    "tls://relay.example:9443").ca, self.ca)

    def usage_error(self, *argv) -> str:
        with self.assertRaises(SystemExit) as caught:
            cli.main(list(argv))
        self.assertEqual(caught.exception.code, 2)
        err = self.stderr.getvalue()
        self.assertNotIn("Traceback", err)
        return err

    def test_unreadable_ca_is_a_usage_error(self):
        missing = self.path("none.pem")
        err = self.usage_error("send", "--to", "bob", "--ca", missing, "hi")
        self.assertIn(f"argument --ca: {missing}: No such file or directory", err)
        junk = self.path("junk.pem")
        with open(junk, "w") as f:
            f.write("not a certificate")
        err = self.usage_error("recv", "--ca", junk)
        self.assertIn(f"argument --ca: {junk} holds no PEM certificate", err)

    def test_ca_without_tls_is_a_usage_error(self):
        for argv in (["--server", "relay.example:9000"], ["--server", "tcp:h:9000"], []):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            err = self.usage_error("send", "--to", "bob", "--ca", self.ca, *argv, "hi")
            self.assertIn("--ca applies to a TLS server (--server tls:HOST:PORT or "
                          "tls://HOST:PORT), not ", err)
        self.setenv("MAILRELAY_SERVER", "relay.example:9000")
        self.usage_error("recv", "--ca", self.ca)

    def test_ca_with_tls_passes_the_check(self):
        parser = cli.build_parser()
        for server in ("tls:relay.example:9443", "tls://relay.example:9443"):
            cli.check_tls_options(parser, parser.parse_args(
                ["recv", "--ca", self.ca, "--server", server]))
        self.setenv("MAILRELAY_SERVER", "tls://relay.example:9443")
        cli.check_tls_options(parser, parser.parse_args(["recv", "--ca", self.ca]))

    def test_endpoint(self):
        """A TLS server: checked against --ca, else HOME/ca.pem if it exists, else the system."""
        from mailrelay.endpoints import TLSClientEndpoint

        home = self.path("home")
        args = self.parse("recv", "--home", home, "--server", "tls://relay.example:9443",
                          "--ca", self.ca)
        endpoint = cli._endpoint(Clock(), args)
        self.assertIsInstance(endpoint, TLSClientEndpoint)
        self.assertEqual((endpoint.creator.hostname, endpoint.creator.trust),
                         ("relay.example", f"a CA in {self.ca}"))
        args = self.parse("recv", "--home", home, "--server", "tls:relay.example:9443")
        self.assertEqual(cli._endpoint(Clock(), args).creator.trust, "a CA this system trusts")
        os.makedirs(home)
        with open(os.path.join(home, "ca.pem"), "wb") as f:
            f.write(self.pki.ca_file.read_bytes())
        self.assertEqual(cli._endpoint(Clock(), args).creator.trust,
                         f"a CA in {os.path.join(home, 'ca.pem')}")

    def test_endpoint_ca_mistakes_are_one_line(self):
        home = self.home_with(ALICE)
        with open(os.path.join(home, "ca.pem"), "w") as f:
            f.write("damaged")
        err = self.exits(self.run_cli("send", "--home", home, "--to", "bob", "x", "--server",
                                      "tls:relay.example:9443"))
        self.assertEqual(err, f"mailrelay send: CA file {os.path.join(home, 'ca.pem')} holds "
                              f"no PEM certificate\n")


class TLSConnectTests(OnlineTestCase):
    """
    The command against a real relay over real TLS, in memory: the relay's
    side is Twisted's TLS over the relay factory, the command's its own
    endpoint; a certificate that does not match is refused in one line.
    """

    def setUp(self):
        super().setUp()
        from mailrelay.endpoints import load_server_tls
        from tests.test_endpoints import PKI

        self.pki = PKI(self.path("pki"))
        key, cert, _ = self.pki.issue()
        self.tls = load_server_tls(str(cert), str(key))
        self.home = self.home_with(ALICE)
        self.relay.register(BOB)

    def server(self, host="localhost"):
        # The TLS endpoint over a TCP endpoint: the memory reactor takes the connection.
        return rf"tls:{host}:9000:endpoint=tcp\:127.0.0.1\:9000"

    def run_tls(self, *argv, host="localhost", options=None):
        from twisted.protocols.tls import TLSMemoryBIOFactory

        d = self.run_cli(*argv, "--server", self.server(host), reactor=self.reactor)
        host_, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        client = factory.buildProtocol(None)
        server = TLSMemoryBIOFactory(options or self.tls.options, False, self.relay.factory,
                                     clock=self.reactor).buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), clock=self.reactor)
        self.relay.pumps.append(pump)
        self.relay.flush()
        return d

    def outbox_is_empty(self):
        self.assertEqual(home_outbox(keys.Home(self.home)).pending(), [])

    def test_trusted(self):
        """Over TLS the relay asks for the channel binding; the message goes through."""
        d = self.run_tls("send", "--home", self.home, "--to", "bob", "--ca",
                         str(self.pki.ca_file), "over TLS")
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("accepted by the relay for bob", self.lines()[-1])
        self.assertEqual(self.relay.count("bob"), 1)

    def test_unknown_ca(self):
        """Refused, exit 1 even with --queue, nothing queued: the relay is not trusted."""
        from tests.test_endpoints import PKI

        other = PKI(self.path("other"), "Other CA")
        d = self.run_tls("send", "--home", self.home, "--to", "bob", "--queue", "--ca",
                         str(other.ca_file), "x")
        err = self.exits(d)
        self.assertEqual(err, f"mailrelay send: refusing the relay at {self.server()}: the "
                              f"relay's TLS certificate (CN=localhost), issued by CN=Test CA, "
                              f"is not signed by a CA in {other.ca_file} (unknown CA)\n")
        self.outbox_is_empty()
        self.assertEqual(self.relay.count("bob"), 0)

    def test_host_name_mismatch(self):
        d = self.run_tls("send", "--home", self.home, "--to", "bob", "--ca",
                         str(self.pki.ca_file), "x", host="relay.example.org")
        err = self.exits(d)
        self.assertTrue(err.endswith(": the relay's TLS certificate is for localhost, not "
                                     "relay.example.org (host name mismatch)\n"), err)
        self.outbox_is_empty()

    def test_expired(self):
        import datetime

        from mailrelay.endpoints import load_server_tls

        key, cert, _ = self.pki.issue(
            prefix="old",
            not_before=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
            not_after=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc))
        d = self.run_tls("recv", "--home", self.home, "--ca", str(self.pki.ca_file),
                         options=load_server_tls(str(cert), str(key)).options)
        err = self.exits(d)
        self.assertTrue(err.endswith(": the relay's TLS certificate (CN=localhost) expired on "
                                     "2025-01-01 00:00:00 UTC (expired)\n"), err)

    def test_home_ca_by_default(self):
        with open(os.path.join(self.home, "ca.pem"), "wb") as f:
            f.write(self.pki.ca_file.read_bytes())
        d = self.run_tls("send", "--home", self.home, "--to", "bob", "by default")
        self.assertEqual(self.successResultOf(d), 0)


class RelayTextOnTheTerminalTests(CommandTestCase):
    """What the relay writes (a notice's text, an error's) is shown escaped, like messages."""

    def test_notice_text_cannot_pose_as_a_message(self):
        from mailrelay.client.inbox import home_inbox

        home = self.home_with(BOB)
        fake = "expired unread\n2026-09-21 10:00  from alice: new bank details\x1b[2K"
        home_inbox(keys.Home(home)).record_notice(
            wire.Notice(mid(9), wire.NOTICE_EXPIRED, "alice", mid(8), 1_790_000_000, fake))
        self.assertEqual(self.successResultOf(self.run_cli("inbox", "--home", home)), 0)
        out = self.stdout.getvalue()
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\n2026-09-21 10:00  from alice:", out)
        self.assertIn("\\x1b[2K", out)

    def test_error_text_is_escaped(self):
        cli._err("the relay at x refused us: \x1b[31mred\nfake line")
        self.assertEqual(self.stderr.getvalue(),
                         "the relay at x refused us: \\x1b[31mred\n    fake line\n")
