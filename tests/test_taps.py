"""
Tests for the twistd plugins' options and service trees:
L{mailrelay.relay.tap} (C{twistd mailrelay}) and L{mailrelay.client.tap}
(C{twistd mailclient}), on a memory reactor.
"""

from __future__ import annotations

import email
import email.policy
import gc
import os
import stat

from twisted.application import service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python import monkey, usage
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import keys, wire
from mailrelay.client import tap as client_tap
from mailrelay.client.contacts import Contacts
from mailrelay.client.inbox import Inbox
from mailrelay.client.outbox import Outbox
from mailrelay.client.defaults import DEFAULT_SERVER
from mailrelay.relay import tap as relay_tap
from mailrelay.relay.protocol import RelayFactory
from mailrelay.relay.store import Quota, StoreError
from mailrelay.relay.store.memory import MemoryStore
from tests.test_cli import EnvMixin
from tests.test_client import ALICE, BOB, MemoryRelay, read_frames

E = wire.ErrorCode


def relay_options(*argv) -> relay_tap.Options:
    options = relay_tap.Options()
    options.parseOptions(list(argv))
    return options


class InTempDirectory:
    """Runs each test in a fresh working directory (the default --data is ./var)."""

    def setUp(self):
        super().setUp()
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.cwd)


class RelayOptionsTests(InTempDirectory, SynchronousTestCase):
    def test_defaults(self):
        """
        The defaults; --data ./var is made absolute and created (private)
        when the store is sqlite.
        """
        options = relay_options()
        self.assertRegex(options["name"], r"^relay-[0-9a-f]{12}$")
        self.assertEqual(dict(options), {
            "port": "tcp:9000",
            "data": os.path.join(self.cwd, "var"),
            "store": "sqlite",
            "name": options["name"],
            "max-envelope": 262144,
            "window": 64,
            "auth-timeout": 10.0,
            "idle-timeout": 300.0,
            "quota-messages": 10000,
            "quota-bytes": 268435456,
            "quota-per-sender": 1000,
            "quota-per-sender-bytes": 67108864,
            "max-per-peer": 64,
            "max-sessions": 10000,
            "frame-timeout": 60.0,
            "rate": 200.0,
            "burst": 1000,
            "retry-window": 30.0,
            "ttl": 30.0,
            "tls-cert": None,
            "tls-key": None,
            "tls": None,
            "ca": None,
            "ca-roots": None,
        })
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.cwd, "var")).st_mode) & 0o077,
                         0)

    def test_memory_store_leaves_data_alone(self):
        self.assertEqual(relay_options("--store", "memory")["data"], "./var")
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "var")))

    def test_unusable_data(self):
        """A --data that is a file, or a database that is not SQLite, is a usage error."""
        with open("afile", "w") as f:
            f.write("x")
        self.assertRaises(usage.UsageError, relay_options, "--data", "afile")
        os.makedirs("bad")
        with open(os.path.join("bad", "mailrelay.sqlite"), "wb") as f:
            f.write(b"this is not a database" * 100)
        self.assertRaises(usage.UsageError, relay_options, "--data", "bad")

    def test_values(self):
        options = relay_options(
            "-p", "9100", "-d", "/srv/relay", "--store", "memory", "--name", "relay.example",
            "--max-envelope", "65536", "--window", "8", "--auth-timeout", "2.5",
            "--idle-timeout", "60", "--quota-messages", "0", "--quota-bytes", "1000",
            "--quota-per-sender", "50", "--quota-per-sender-bytes", "0",
            "--max-per-peer", "0", "--max-sessions", "500", "--frame-timeout", "7.5",
            "--rate", "0.5", "--burst", "20", "--retry-window", "7", "--ttl", "0.5",
        )
        self.assertEqual(dict(options), {
            "port": "tcp:9100", "data": "/srv/relay", "store": "memory",
            "name": "relay.example", "max-envelope": 65536, "window": 8,
            "auth-timeout": 2.5, "idle-timeout": 60.0, "quota-messages": 0,
            "quota-bytes": 1000, "quota-per-sender": 50, "quota-per-sender-bytes": 0,
            "max-per-peer": 0, "max-sessions": 500,
            "frame-timeout": 7.5, "rate": 0.5, "burst": 20, "retry-window": 7.0,
            "ttl": 0.5, "tls-cert": None, "tls-key": None, "tls": None,
            "ca": None, "ca-roots": None,
        })

    def test_limits_off(self):
        """0 turns the limit of connections in all, and the send rate, off."""
        options = relay_options("--store", "memory", "--max-sessions", "0", "--rate", "0")
        self.assertEqual((options["max-sessions"], options["rate"]), (0, 0.0))

    def test_limit_usage_errors_name_the_option(self):
        """Mistakes in the limits are one line that names the option."""
        for argv, reason in [
            (["--max-sessions", "-1"], "--max-sessions must be 0 or more, not -1"),
            (["--max-sessions", "many"], "--max-sessions must be a whole number, not 'many'"),
            (["--max-sessions", "1.5"], "--max-sessions must be a whole number, not '1.5'"),
            (["--frame-timeout", "0"], "--frame-timeout must be positive, not 0"),
            (["--frame-timeout", "-1"], "--frame-timeout must be positive, not -1"),
            (["--frame-timeout", "inf"], "--frame-timeout must be positive, not inf"),
            (["--frame-timeout", "nan"], "--frame-timeout must be positive, not nan"),
            (["--frame-timeout", "soon"], "--frame-timeout must be a number, not 'soon'"),
            (["--rate", "-0.5"], "--rate must be 0 or more, not -0.5"),
            (["--rate", "inf"], "--rate must be 0 or more, not inf"),
            (["--rate", "nan"], "--rate must be 0 or more, not nan"),
            (["--burst", "0"], "--burst must be positive, not 0"),
            (["--burst", "2.5"], "--burst must be a whole number, not '2.5'"),
            (["--quota-messages", "-1"], "--quota-messages must be 0 or more, not -1"),
            (["--quota-bytes", "1e6"], "--quota-bytes must be a whole number, not '1e6'"),
            (["--quota-per-sender", "-1"], "--quota-per-sender must be 0 or more, not -1"),
            (["--quota-per-sender", "some"],
             "--quota-per-sender must be a whole number, not 'some'"),
            (["--quota-per-sender-bytes", "-5"],
             "--quota-per-sender-bytes must be 0 or more, not -5"),
            (["--quota-per-sender-bytes", "2.5"],
             "--quota-per-sender-bytes must be a whole number, not '2.5'"),
        ]:
            error = self.assertRaises(usage.UsageError, relay_options, "--store", "memory", *argv)
            self.assertIn(reason, str(error), argv)
            self.assertNotIn("\n", str(error))

    def test_port_number(self):
        self.assertEqual(relay_options("--port", "9000")["port"], "tcp:9000")

    def test_port_endpoint_unchanged(self):
        for port in ("tcp:9000:interface=127.0.0.1", "tcp6:9000:interface=\\:\\:1",
                     "unix:/tmp/mailrelay.sock"):
            self.assertEqual(relay_options("--port", port)["port"], port)

    def test_usage_errors(self):
        for argv in (
            ["--store", "postgres"],
            ["--port", "nonsense:9000"],
            ["--port", "tcp:notaport"],
            ["--port", "tcp:99999"],
            ["--port", "99999"],
            ["--port", "tcp:70000:interface=127.0.0.1"],
            ["--port", "tcp6:65536:interface=\\:\\:1"],
            ["--port", "ssl:99999:privateKey=key.pem"],
            ["--window", "0"],
            ["--window", "-3"],
            ["--window", "many"],
            ["--quota-messages", "-1"],
            ["--quota-bytes", "-1"],
            ["--quota-per-sender", "-1"],
            ["--quota-per-sender-bytes", "-1"],
            ["--auth-timeout", "0"],
            ["--idle-timeout", "-5"],
            ["--idle-timeout", "nan"],
            ["--auth-timeout", "inf"],
            ["--max-envelope", "0"],
            ["--max-envelope", str(2**30)],
            ["--name", "not valid"],
            ["--unknown"],
        ):
            self.assertRaises(usage.UsageError, relay_options, *argv)


class RelayServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def make(self, *argv):
        return relay_tap.makeService(relay_options("--store", "memory", *argv),
                                     reactor=self.reactor)

    def start(self, top):
        top.privilegedStartService()
        top.startService()
        self.addCleanup(lambda: top.running and top.stopService())

    def test_listens(self):
        """
        The service listens on the chosen port with a RelayFactory that has
        the options' settings, and opens the store when started.
        """
        top = self.make("--port", "9100", "--name", "relay1", "--window", "5",
                        "--max-envelope", "65536", "--auth-timeout", "3",
                        "--idle-timeout", "30", "--quota-messages", "7",
                        "--quota-per-sender", "3", "--quota-per-sender-bytes", "4096",
                        "--max-per-peer", "9", "--max-sessions", "99",
                        "--frame-timeout", "4", "--rate", "12.5", "--burst", "40")
        self.assertIsInstance(top, service.MultiService)
        self.assertEqual(self.reactor.tcpServers, [])
        top.privilegedStartService()
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (9100, ""))
        self.assertIsInstance(factory, RelayFactory)
        self.assertEqual(
            (factory.name, factory.max_envelope, factory.mailboxes.window,
             factory.auth_timeout, factory.idle_timeout, factory.clock),
            ("relay1", 65536, 5, 3.0, 30.0, self.reactor),
        )
        self.assertEqual(
            (factory.max_per_peer, factory.max_sessions, factory.frame_timeout,
             factory.send_rate.rate, factory.send_rate.burst, factory.send_rate.clock),
            (9, 99, 4.0, 12.5, 40, self.reactor),
        )
        self.assertIsInstance(factory.store, MemoryStore)
        self.assertEqual(factory.store.quota, Quota(messages=7, bytes=256 * 1024 * 1024,
                                                    sender_messages=3, sender_bytes=4096))
        self.assertNoResult(factory.ready())
        top.startService()
        self.successResultOf(factory.ready())
        self.successResultOf(top.stopService())
        self.assertFalse(top.running)

    def test_interface(self):
        top = self.make("--port", "tcp:9000:interface=127.0.0.1")
        self.start(top)
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (9000, "127.0.0.1"))

    def test_serves_clients(self):
        """A client reaching the listening factory authenticates and sends."""
        top = self.make()
        self.start(top)
        factory = self.reactor.tcpServers[0][1]
        relay = MemoryRelay(clock=self.reactor)
        relay.factory = factory
        relay.store = factory.store
        alice = relay.client(ALICE)
        bob = relay.client(BOB)
        self.successResultOf(alice.ready)
        self.successResultOf(bob.ready)
        d = alice.send("bob", b"through the tap")
        relay.flush()
        self.successResultOf(d)
        self.assertEqual(factory.mailboxes.accepted_total, 1)

    def test_stop_closes_sessions(self):
        """Stopping the relay ends every session with SHUTTING_DOWN."""
        top = self.make()
        self.start(top)
        factory = self.reactor.tcpServers[0][1]
        session = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = session
        session.makeConnection(transport)
        read_frames(transport)
        self.successResultOf(top.stopService())
        [frame] = read_frames(transport)
        self.assertEqual(frame.code, E.SHUTTING_DOWN)
        self.assertFalse(transport.connected)
        self.assertEqual(factory.sessions, set())

    def test_cannot_listen(self):
        """
        A port that cannot be bound makes privilegedStartService raise
        SystemExit with a one-line reason (twistd prints it, exits 1).
        """

        class Busy(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise error.CannotListenError(
                    interface, port, OSError(98, "Address already in use"))

        top = relay_tap.makeService(relay_options("--store", "memory", "--port", "tcp:9100"),
                                    reactor=Busy())
        exc = self.assertRaises(SystemExit, top.privilegedStartService)
        self.assertEqual(exc.code,
                         "mailrelay: cannot listen on tcp:9100: Address already in use")

    def test_store_fails_to_open(self):
        """A store that cannot be opened stops the reactor."""

        class Broken(MemoryStore):
            def start(self):
                return fail(StoreError("disk on fire"))

        events = []
        self.patch(relay_tap, "log", Logger(observer=events.append))
        self.patch(relay_tap, "open_store", lambda *a, **kw: Broken())
        top = self.make()
        self.start(top)
        self.assertTrue(self.reactor.hasStopped)
        self.assertTrue(any("disk on fire" in str(e.get("reason")) for e in events))
        self.assertNoResult(top.factory.ready())

    def test_totals_logged(self):
        """Totals are logged every minute when they changed."""
        events = []
        self.patch(relay_tap, "log", Logger(observer=events.append))
        top = self.make()
        self.start(top)
        totals = lambda: [e for e in events if e.get("log_format", "").startswith("totals")]
        self.reactor.advance(60)
        self.assertEqual(totals(), [])
        factory = self.reactor.tcpServers[0][1]
        factory.mailboxes.accepted_total = 3
        self.reactor.advance(60)
        self.assertEqual([e["accepted"] for e in totals()], [3])
        self.reactor.advance(60)
        self.assertEqual(len(totals()), 1)

    def test_sqlite_store(self):
        """With --store sqlite the store is a file in the data directory."""
        data = os.path.abspath(self.mktemp())
        top = relay_tap.makeService(relay_options("--data", data), reactor=self.reactor)
        self.assertTrue(os.path.isdir(data))
        self.assertEqual(top.factory.store.path, os.path.join(data, "mailrelay.sqlite"))


class HomeMixin(EnvMixin):
    """A clean environment, bob's home (his cached key) and a Maildir path."""

    def setUp(self):
        self.setenv("MAILRELAY_HOME", None)
        self.setenv("MAILRELAY_SERVER", None)
        self.home = os.path.abspath(self.mktemp())
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: BOB)))
        patcher.runWithPatches(keys.Home(self.home).create, "bob", bits=2048)
        self.maildir = os.path.abspath(self.mktemp())


class ClientOptionsTests(HomeMixin, SynchronousTestCase):

    def parse(self, *argv):
        options = client_tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_incomplete_server(self):
        """--server tcp:127.0.0.1 (no port) is refused now, not a TypeError at start."""
        exc = self.assertRaises(usage.UsageError, self.parse, "--home", self.home,
                                "--maildir", self.maildir, "--server", "tcp:127.0.0.1")
        self.assertIn("--server 'tcp:127.0.0.1' is not a valid endpoint", str(exc))

    def test_server_usage_errors(self):
        for server in ("127.0.0.1:99999", "tcp:h:0", "nonsense:x", "tcp:h:notaport"):
            exc = self.assertRaises(usage.UsageError, self.parse, "--home", self.home,
                                    "--maildir", self.maildir, "--server", server)
            self.assertIn("--server", str(exc))

    def test_maildir_is_a_file(self):
        """--maildir naming a file is a usage error with the reason."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("x")
        exc = self.assertRaises(usage.UsageError, self.parse, "--home", self.home,
                                "--maildir", path)
        self.assertEqual(str(exc), f"--maildir {path}: Not a directory")

    def test_maildir_created(self):
        self.parse("--home", self.home, "--maildir", self.maildir)
        self.assertEqual(sorted(os.listdir(self.maildir)), ["cur", "new", "tmp"])

    def test_maildir_required(self):
        exc = self.assertRaises(usage.UsageError, self.parse, "--home", self.home)
        self.assertIn("--maildir", str(exc))

    def test_no_identity(self):
        exc = self.assertRaises(usage.UsageError, self.parse, "--home", self.mktemp(),
                                "--maildir", self.maildir)
        self.assertIn("mailrelay init", str(exc))

    def test_options(self):
        options = self.parse("--home", self.home, "--maildir", self.maildir,
                             "--server", "host:9000")
        identity = options["identity"]
        self.assertEqual((identity.name, identity.public_der), ("bob", BOB.public_der))
        self.assertEqual(
            {k: v for k, v in options.items()
             if k not in ("identity", "inbox", "outbox", "contacts")},
            {"home": self.home, "maildir": self.maildir, "server": "tcp:host:9000",
             "ca": None, "passphrase-file": None, "certificate": b"",
             "identity-roots": None},
        )
        self.assertIsInstance(options["inbox"], Inbox)
        self.assertIsInstance(options["outbox"], Outbox)
        self.assertIsInstance(options["contacts"], Contacts)
        self.assertEqual(options["contacts"].path, os.path.join(self.home, "contacts.sqlite"))

    def test_server_endpoint_unchanged(self):
        options = self.parse("--home", self.home, "--maildir", self.maildir,
                             "--server", "tls:relay.example:9443")
        self.assertEqual(options["server"], "tls:relay.example:9443")

    def test_defaults(self):
        """Without --server: tcp:localhost:9000."""
        self.setenv("MAILRELAY_HOME", self.home)
        options = self.parse("--maildir", self.maildir)
        self.assertEqual(options["server"], DEFAULT_SERVER)
        self.assertEqual(options["home"], self.home)

    def test_server_from_environment(self):
        self.setenv("MAILRELAY_SERVER", "relay.example:9100")
        options = self.parse("--home", self.home, "--maildir", self.maildir)
        self.assertEqual(options["server"], "tcp:relay.example:9100")


class ClientServiceTests(HomeMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.reactor = MemoryReactorClock()
        self.relay = MemoryRelay(clock=self.reactor)
        self.relay.register(BOB)
        self.events: list[dict] = []
        self.patch(client_tap, "log", Logger(observer=self.events.append))

    def make(self):
        options = client_tap.Options()
        options.parseOptions(["--home", self.home, "--maildir", self.maildir,
                              "--server", "relay.example:9000"])
        return client_tap.makeService(options, reactor=self.reactor)

    def accept(self):
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        self.assertEqual((host, port), ("relay.example", 9000))
        self.relay.serve(factory.buildProtocol(None))

    def forget(self):
        """Drop every reference to the connection, so it can be collected now."""
        self.relay = self.reactor = None

    def connected_events(self):
        return [e for e in self.events if e.get("log_format", "").startswith("connected to")]

    def test_files_messages(self):
        """
        Started, the client connects to the relay; a message sent to bob is
        filed into the Maildir and acknowledged.
        """
        top = self.make()
        self.assertIsInstance(top, service.MultiService)
        self.assertTrue(os.path.isdir(os.path.join(self.maildir, "new")))
        top.startService()
        self.accept()
        self.assertEqual(len(self.connected_events()), 1)
        alice = self.relay.client(ALICE)
        d = alice.send("bob", b"filed")
        self.relay.flush()
        message_id = self.successResultOf(d)
        [name] = os.listdir(os.path.join(self.maildir, "new"))
        with open(os.path.join(self.maildir, "new", name), "rb") as f:
            msg = email.message_from_bytes(f.read(), policy=email.policy.default)
        self.assertEqual(msg["From"], "alice@mailrelay.invalid")
        self.assertEqual(msg.get_content().strip(), "filed")
        self.assertEqual(self.relay.count("bob"), 0)
        self.assertTrue(os.path.exists(os.path.join(self.home, "inbox.sqlite")))
        self.assertEqual(keys.public_der(keys.Home(self.home).pinned("alice")),
                         ALICE.public_der)
        self.assertTrue(any(e.get("log_format", "").startswith("filed message")
                            and e["id"] == message_id.hex() for e in self.events))
        stopping = top.stopService()
        self.relay.flush()
        self.successResultOf(stopping)
        self.assertEqual([s.identity for s in self.relay.factory.sessions], ["alice"])

    def test_stop_while_connected(self):
        """Stopping the client while it is connected leaves no unhandled error behind."""
        top = self.make()
        top.startService()
        self.accept()
        stopping = top.stopService()
        self.relay.flush()
        self.successResultOf(stopping)
        self.assertEqual(self.relay.factory.sessions, set())
        self.forget()
        del top, stopping
        gc.collect()
        unhandled = self.flushLoggedErrors(CancelledError)
        self.assertEqual(unhandled, [])

    def test_reconnects(self):
        """
        When the relay drops the connection the client reconnects after a
        backoff, and the new session is reported once.
        """
        top = self.make()
        top.startService()
        self.addCleanup(top.stopService)
        self.accept()
        self.assertEqual(len(self.connected_events()), 1)
        [session] = self.relay.factory.sessions
        session.fatal(E.SHUTTING_DOWN, "restarting")
        self.relay.flush()
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.accept()
        self.assertEqual(len(self.connected_events()), 2)

    def test_rotation_logged_once(self):
        """A contact's key followed along its rotation is one warning in the log, not two."""
        from twisted.logger import capturedLogs

        from tests.test_trust import ALICE_2

        top = self.make()
        top.startService()
        self.addCleanup(top.stopService)
        self.accept()
        alice = self.relay.client(ALICE)
        d = alice.send("bob", b"before")
        self.relay.flush()
        self.successResultOf(d)
        d = alice.rotate(ALICE_2, int(self.reactor.seconds()))
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(self.relay.store._keys["alice"], ALICE_2.public_der)
        with capturedLogs() as protocol_events:
            d = self.relay.client(ALICE_2).send("bob", b"after")
            self.relay.flush()
            self.successResultOf(d)
        self.assertEqual(len(os.listdir(os.path.join(self.maildir, "new"))), 2, [formatEvent(e) for e in [*self.events, *protocol_events]])
        told = [e for e in [*self.events, *protocol_events] if "rotated" in formatEvent(e)]
        self.assertEqual(len(told), 1, [formatEvent(e) for e in told])

    def test_filer_rejected_logged(self):
        from mailrelay.client.protocol import Rejected

        client_tap.Filer.rejected(Rejected(b"\x01" * 16, "alice", "garbled"))
        [event] = self.events
        self.assertEqual((event["sender"], event["reason"]), ("alice", "garbled"))


class ForgetTimerTests(SynchronousTestCase):
    def test_forgets_old_ids_hourly(self):
        """The relay's timer forgets ids acknowledged more than --retry-window days ago."""
        reactor = MemoryReactorClock()
        options = relay_tap.Options()
        options.parseOptions(["--store", "memory", "--retry-window", "1",
                              "--port", "tcp:0:interface=127.0.0.1"])
        top = relay_tap.makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        store = top.factory.store
        self.successResultOf(store.enqueue("b", "a", b"\x01" * 16, b"env", 0))
        self.successResultOf(store.delete("b", b"\x01" * 16, 0))
        reactor.advance(86400 + 3600)
        self.assertIs(self.successResultOf(store.enqueue("b", "a", b"\x01" * 16, b"env", 0)),
                      True)

    def test_not_before_the_store_is_open(self):
        """
        Nothing is forgotten until the store is open (before that its tables
        may not exist); then at once and hourly, until the relay stops.
        """
        opened = Deferred()
        calls = []

        class Slow(MemoryStore):
            def start(self):
                return opened

            def forget_acknowledged(self, before):
                calls.append(before)
                return super().forget_acknowledged(before)

        reactor = MemoryReactorClock()
        self.patch(relay_tap, "open_store", lambda *a, **kw: Slow())
        options = relay_tap.Options()
        options.parseOptions(["--store", "memory", "--retry-window", "1",
                              "--port", "tcp:0:interface=127.0.0.1"])
        top = relay_tap.makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        reactor.advance(7200)
        self.assertEqual(calls, [])
        opened.callback(None)
        self.assertEqual(calls, [7200 - 86400])
        reactor.advance(3600)
        self.assertEqual(calls, [7200 - 86400, 10800 - 86400])
        self.successResultOf(top.stopService())
        reactor.advance(3600 * 5)
        self.assertEqual(len(calls), 2)
        self.assertEqual(reactor.getDelayedCalls(), [])


class RelayCAOptionTests(SynchronousTestCase):
    def test_ca_roots_loaded_and_given_to_the_factory(self):
        from tests.test_ca import authority

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(authority().certificate_pem)
        options = relay_tap.Options()
        options.parseOptions(["--store", "memory", "--ca", path,
                              "--port", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(options["ca-roots"], [authority().certificate])
        top = relay_tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(top.factory.ca_roots, [authority().certificate])

    def test_bad_ca_file(self):
        garbage = self.mktemp()
        with open(garbage, "w") as f:
            f.write("not a certificate")
        for path, says in ((garbage, "not a PEM certificate bundle"),
                           (self.mktemp(), "No such file")):
            options = relay_tap.Options()
            error = self.assertRaises(usage.UsageError, options.parseOptions,
                                      ["--store", "memory", "--ca", path])
            self.assertIn(f"--ca {path}: ", str(error))
            self.assertIn(says, str(error))


class ExpiryTimerTests(SynchronousTestCase):
    def start(self, *argv):
        reactor = MemoryReactorClock()
        options = relay_tap.Options()
        options.parseOptions(["--store", "memory", "--port", "tcp:0:interface=127.0.0.1",
                              *argv])
        top = relay_tap.makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        return reactor, top

    def test_expires_after_ttl_with_notice(self):
        """
        Every minute the relay replaces messages older than --ttl days by
        notices: a message outlives its TTL by at most a minute.
        """
        reactor, top = self.start("--ttl", "1")
        store = top.factory.store
        self.successResultOf(store.enqueue("bob", "alice", b"\x01" * 16, b"env", 0))
        reactor.advance(86400)
        self.assertEqual(self.successResultOf(store.pending("bob", 0, 10))[0].kind, 0)
        reactor.advance(60)
        [notice] = self.successResultOf(store.pending("bob", 0, 10))
        self.assertEqual(notice.frame().message_id, b"\x01" * 16)
        self.assertEqual(notice.frame().text, "expired unread after 1 day on the relay")

    def test_ttl_zero_keeps_messages(self):
        reactor, top = self.start("--ttl", "0")
        store = top.factory.store
        self.successResultOf(store.enqueue("bob", "alice", b"\x01" * 16, b"env", 0))
        reactor.advance(400 * 86400)
        self.assertEqual(self.successResultOf(store.pending("bob", 0, 10))[0].kind, 0)

    def test_bad_ttl(self):
        options = relay_tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--store", "memory", "--ttl", "-1"])
        self.assertIn("--ttl must be 0 or more", str(error))


class RelayIdTests(SynchronousTestCase):
    """Each relay has its own id, kept in its data directory, unless --name sets one."""

    def setUp(self):
        self.data = os.path.abspath(self.mktemp())

    def test_made_once_and_kept(self):
        first = relay_options("--data", self.data)["name"]
        self.assertRegex(first, r"^relay-[0-9a-f]{12}$")
        self.assertEqual(relay_options("--data", self.data)["name"], first)
        with open(os.path.join(self.data, "relay-id")) as f:
            self.assertEqual(f.read().strip(), first)
        other = os.path.abspath(self.mktemp())
        self.assertNotEqual(relay_options("--data", other)["name"], first)

    def test_name_option_wins(self):
        self.assertEqual(relay_options("--data", self.data, "--name", "Relay.Example")["name"],
                         "relay.example")
        self.assertFalse(os.path.exists(os.path.join(self.data, "relay-id")))

    def test_memory_relay_gets_a_fresh_id(self):
        self.assertRegex(relay_options("--store", "memory")["name"], r"^relay-[0-9a-f]{12}$")

    def test_damaged_id_file(self):
        os.makedirs(self.data)
        with open(os.path.join(self.data, "relay-id"), "w") as f:
            f.write("not/an id\n")
        self.assertRaises(usage.UsageError, relay_options, "--data", self.data)


def _text(event) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


class RelayTLSOptionsTests(InTempDirectory, SynchronousTestCase):
    """--tls-cert and --tls-key, and an ssl: --port: read and checked before start."""

    def setUp(self):
        super().setUp()
        from tests.test_endpoints import PKI

        self.pki = PKI(os.path.join(self.cwd, "pki"))
        key, cert, self.certificate = self.pki.issue()
        self.key, self.cert = str(key), str(cert)

    def parse(self, *argv):
        return relay_options("--store", "memory", *argv)

    def usage_error(self, *argv) -> str:
        error = self.assertRaises(usage.UsageError, self.parse, *argv)
        self.assertNotIn("\n", str(error))
        return str(error)

    def test_tls(self):
        from mailrelay.endpoints import ServerTLS

        options = self.parse("--port", "9443", "--tls-cert", self.cert, "--tls-key", self.key)
        self.assertEqual(options["port"], "tcp:9443")
        self.assertIsInstance(options["tls"], ServerTLS)
        self.assertEqual(options["tls"].certificate, self.certificate)
        options = self.parse("--port", "tcp6:9443:interface=\\:\\:1", "--tls-cert", self.cert,
                             "--tls-key", self.key)
        self.assertIsInstance(options["tls"], ServerTLS)

    def test_both_or_neither(self):
        for argv in (["--tls-cert", self.cert], ["--tls-key", self.key]):
            self.assertEqual(self.usage_error(*argv),
                             "--tls-cert and --tls-key go together: give both or neither")

    def test_unusable_files(self):
        other_key, _, _ = self.pki.issue(prefix="other")
        missing = os.path.join(self.cwd, "missing.pem")
        for argv, reason in [
            (["--tls-cert", missing, "--tls-key", self.key],
             f"--tls-cert {missing}: No such file or directory"),
            (["--tls-cert", self.cert, "--tls-key", missing],
             f"--tls-key {missing}: No such file or directory"),
            (["--tls-cert", self.key, "--tls-key", self.key],
             f"--tls-cert {self.key} holds no PEM certificate"),
            (["--tls-cert", self.cert, "--tls-key", str(other_key)],
             f"--tls-key {other_key} is not the key of the certificate in "
             f"--tls-cert {self.cert}"),
        ]:
            self.assertEqual(self.usage_error(*argv), reason)

    def test_tls_needs_a_tcp_port(self):
        error = self.usage_error("--port", "unix:/tmp/relay.sock", "--tls-cert", self.cert,
                                 "--tls-key", self.key)
        self.assertIn("need a TCP --port", error)
        error = self.usage_error("--port", f"ssl:9443:privateKey={self.key}",
                                 "--tls-cert", self.cert, "--tls-key", self.key)
        self.assertIn("give the files one way only", error)
        self.assertIn("not a valid endpoint", self.usage_error(
            "--port", "tcp:9443:colour=blue", "--tls-cert", self.cert, "--tls-key", self.key))

    def test_ssl_port(self):
        """An ssl: --port is served the same way, with its files checked now."""
        from mailrelay.endpoints import ServerTLS

        options = self.parse("--port", f"ssl:9443:privateKey={self.key}:certKey={self.cert}")
        self.assertIsInstance(options["tls"], ServerTLS)
        self.assertEqual(options["tls"].certificate, self.certificate)
        missing = os.path.join(self.cwd, "missing.pem")
        self.assertEqual(
            self.usage_error("--port", f"ssl:9443:privateKey={missing}:certKey={self.cert}"),
            f"--port: privateKey={missing}: No such file or directory")
        self.assertIn("sslmethod= is not supported", self.usage_error(
            "--port", f"ssl:9443:privateKey={self.key}:certKey={self.cert}:"
                      f"sslmethod=TLSv1_METHOD"))


class InterfaceReactor(MemoryReactorClock):
    """A memory reactor whose ports report the interface they were asked for."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.internet.testing import _FakePort

        super().listenTCP(port, factory, backlog, interface)
        kind = IPv6Address if ":" in interface else IPv4Address
        return _FakePort(kind("TCP", interface or "0.0.0.0", port))


class RelayTLSServiceTests(InTempDirectory, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        from tests.test_endpoints import PKI

        self.pki = PKI(os.path.join(self.cwd, "pki"))
        key, cert, self.certificate = self.pki.issue()
        self.key, self.cert = str(key), str(cert)
        self.events = []
        self.patch(relay_tap, "log", Logger(observer=self.events.append))

    def start(self, *argv, reactor=None):
        reactor = reactor or MemoryReactorClock()
        top = relay_tap.makeService(relay_options("--store", "memory", *argv), reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(lambda: top.running and top.stopService())
        return reactor

    def lines(self, level=None):
        return [_text(e) for e in self.events
                if level is None or e.get("log_level") == level]

    def test_listens_in_tls(self):
        """TLS on the TCP port and interface of --port, with the relay's own factory."""
        reactor = self.start("--port", "tcp:9443:interface=127.0.0.1",
                             "--tls-cert", self.cert, "--tls-key", self.key)
        self.assertEqual(reactor.tcpServers, [])
        [(port, factory, context, backlog, interface)] = reactor.sslServers
        self.assertEqual((port, interface), (9443, "127.0.0.1"))
        self.assertIsInstance(factory, RelayFactory)
        expiry = self.certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        self.assertIn(f"serving TLS 1.3 with the certificate for "
                      f"CN=localhost (localhost), valid until {expiry}", self.lines())
        self.assertEqual(self.lines(LogLevel.warn), [])

    def test_key_readable_by_others_warns(self):
        os.chmod(self.key, 0o644)
        self.start("--port", "tcp:9443:interface=127.0.0.1",
                   "--tls-cert", self.cert, "--tls-key", self.key)
        [warning] = self.lines(LogLevel.warn)
        self.assertEqual(warning, f"WARNING: the TLS key {self.key} is readable by other users: "
                                  f"chmod 600 it")
        del self.events[:]
        os.chmod(self.key, 0o600)
        self.start("--port", "tcp:9444:interface=127.0.0.1",
                   "--tls-cert", self.cert, "--tls-key", self.key)
        self.assertEqual(self.lines(LogLevel.warn), [])

    def test_ssl_port_served_the_same(self):
        reactor = self.start("--port", f"ssl:9443:privateKey={self.key}:certKey={self.cert}")
        [(port, factory, context, backlog, interface)] = reactor.sslServers
        self.assertEqual((port, interface), (9443, ""))
        self.assertTrue(any(line.startswith("serving TLS") for line in self.lines()))

    def test_plain_tcp_beyond_this_host_warns(self):
        for port in ("9000", "tcp:9000:interface=0.0.0.0", "tcp:9000:interface=10.1.2.3",
                     "tcp6:9000", r"tcp6:9000:interface=2001\:db8\:\:1"):
            del self.events[:]
            self.start("--port", port, reactor=InterfaceReactor())
            [warning] = self.lines(LogLevel.warn)
            self.assertTrue(warning.startswith("WARNING: serving plain TCP, without TLS, on "),
                            warning)
            for words in ("messages stay end-to-end encrypted",
                          "authentication is not bound to a TLS channel",
                          "metadata", "is visible on the network", "--tls-cert"):
                self.assertIn(words, warning)

    def test_plain_tcp_on_loopback_does_not_warn(self):
        for port in ("tcp:9000:interface=127.0.0.1", "tcp:9000:interface=127.0.0.2",
                     r"tcp6:9000:interface=\:\:1"):
            del self.events[:]
            self.start("--port", port, reactor=InterfaceReactor())
            self.assertEqual(self.lines(LogLevel.warn), [], port)
            self.assertIn("serving plain TCP, without TLS", self.lines())

    def test_beyond_this_host(self):
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        for address, beyond in [
            (IPv4Address("TCP", "0.0.0.0", 1), True),
            (IPv4Address("TCP", "192.0.2.1", 1), True),
            (IPv6Address("TCP", "::", 1), True),
            (IPv4Address("TCP", "127.0.0.1", 1), False),
            (IPv4Address("TCP", "127.1.2.3", 1), False),
            (IPv6Address("TCP", "::1", 1), False),
            (UNIXAddress(b"/run/relay.sock"), False),
        ]:
            self.assertEqual(relay_tap.beyond_this_host(address), beyond, address)

    def test_expired_certificate_warns(self):
        import datetime

        key, cert, _ = self.pki.issue(
            prefix="old",
            not_before=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
            not_after=datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc))
        self.start("--port", "9443", "--tls-cert", str(cert), "--tls-key", str(key))
        [warning] = self.lines(LogLevel.warn)
        self.assertEqual(warning, f"WARNING: the TLS certificate {cert} expired on "
                                  f"2025-01-01 00:00:00 UTC: clients that check it refuse "
                                  f"this relay")


class ClientTLSTests(HomeMixin, SynchronousTestCase):
    """twistd mailclient with a TLS server and --ca."""

    def setUp(self):
        super().setUp()
        from tests.test_endpoints import PKI

        self.pki = PKI(self.mktemp())
        self.ca = str(self.pki.ca_file)

    def parse(self, *argv):
        options = client_tap.Options()
        options.parseOptions(["--home", self.home, "--maildir", self.maildir, *argv])
        return options

    def test_ca(self):
        options = self.parse("--server", "tls://relay.example:9443", "--ca", self.ca)
        self.assertEqual((options["server"], options["ca"]), ("tls:relay.example:9443", self.ca))

    def test_ca_mistakes(self):
        for argv, reason in [
            (["--server", "relay.example:9000", "--ca", self.ca], "is for a TLS server"),
            (["--server", "tls:relay.example:9443", "--ca", self.home],
             f"--ca {self.home}: Is a directory"),
            (["--server", "tls:relay.example:9443", "--ca", self.home + "/none"],
             "No such file or directory"),
        ]:
            error = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn(reason, str(error))
            self.assertNotIn("\n", str(error))

    def test_service_checks_the_certificate(self):
        from mailrelay.endpoints import TLSClientEndpoint

        made = []

        def recording(endpoint, factory, **kwargs):
            made.append((endpoint, factory))
            return service.Service()

        self.patch(client_tap, "ClientService", recording)
        client_tap.makeService(self.parse("--server", "tls:relay.example:9443", "--ca",
                                          self.ca), reactor=MemoryReactorClock())
        [(endpoint, factory)] = made
        self.assertIsInstance(endpoint, TLSClientEndpoint)
        self.assertIs(factory.endpoint, endpoint)
        self.assertEqual(factory.endpoint.creator.trust, f"a CA in {self.ca}")
        self.assertEqual(factory.endpoint.creator.hostname, "relay.example")

    def test_home_ca_by_default(self):
        home_ca = os.path.join(self.home, "ca.pem")
        with open(home_ca, "wb") as f:
            f.write(self.pki.ca_file.read_bytes())
        options = self.parse("--server", "tls:relay.example:9443")
        self.assertEqual(client_tap.server_endpoint(MemoryReactorClock(), options)
                         .creator.trust, f"a CA in {home_ca}")

    def test_refusal_logged(self):
        """A certificate that does not match is logged in one line saying what did not."""
        from twisted.python.failure import Failure

        from mailrelay.client.protocol import Disconnected

        events = []
        self.patch(client_tap, "log", Logger(observer=events.append))
        options = self.parse("--server", "tls:relay.example:9443", "--ca", self.ca)
        endpoint = client_tap.server_endpoint(MemoryReactorClock(), options)
        factory = client_tap.MailclientFactory(options["server"], endpoint=endpoint,
                                               identity=options["identity"])
        endpoint.creator.problem = ("the relay's TLS certificate is for localhost, not "
                                    "relay.example (host name mismatch)")
        factory._notReady(Failure(Disconnected("TLS failed: certificate verify failed")))
        self.assertEqual([_text(e) for e in events],
                         ["refusing the relay at tls:relay.example:9443: the relay's TLS "
                          "certificate is for localhost, not relay.example (host name "
                          "mismatch)"])
        del events[:]
        endpoint.creator.problem = None  # as each new connection starts
        factory._notReady(Failure(Disconnected("the relay closed the connection")))
        self.assertEqual([_text(e) for e in events],
                         ["session with tls:relay.example:9443 ended before it began: "
                          "the relay closed the connection"])
