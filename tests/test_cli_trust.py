"""
The trust commands of C{mailrelay}: passphrase-protected keys, C{trust},
safety numbers, and C{ca} (a relay in CA mode, reached in memory).
"""

from __future__ import annotations

import os

from twisted.python import monkey

from mailrelay import ca, keys
from tests.test_ca import authority
from tests.test_cli import OnlineTestCase
from tests.test_client import ALICE, BOB, MALLORY_BOB, MemoryRelay


class PassphraseCommandTests(OnlineTestCase):
    def setUp(self):
        super().setUp()
        self.secret = self.path("secret")
        with open(self.secret, "w") as f:
            f.write("correct horse\n")
        self.home = self.path("alice")
        patcher = monkey.MonkeyPatcher(
            (keys.Identity, "generate", classmethod(lambda cls, n, bits=0: ALICE)))
        patcher.patch()
        self.addCleanup(patcher.restore)
        d = self.run_cli("init", "alice", "--home", self.home, "--offline",
                         "--passphrase-file", self.secret)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("protected by your passphrase", self.stdout.getvalue())
        self.setenv("MAILRELAY_PASSPHRASE_FILE", None)

    def test_key_is_protected(self):
        self.assertTrue(keys.Home(self.home).protected())
        self.assertEqual(keys.Home(self.home).load(b"correct horse").public_der,
                         ALICE.public_der)

    def test_commands_need_the_passphrase(self):
        self.stdout.truncate(0)
        self.stdout.seek(0)
        err = self.exits(self.run_cli("fingerprint", "--home", self.home))
        self.assertIn("protected by a passphrase", err)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertEqual(self.successResultOf(self.run_cli(
            "fingerprint", "--home", self.home, "--passphrase-file", self.secret)), 0)
        self.assertIn(keys.format_fingerprint(ALICE.fingerprint), self.stdout.getvalue())
        wrong = self.path("wrong")
        with open(wrong, "w") as f:
            f.write("wrong\n")
        self.setenv("MAILRELAY_PASSPHRASE_FILE", wrong)
        err = self.exits(self.run_cli("fingerprint", "--home", self.home))
        self.assertIn("the passphrase does not open", err)


class TrustCommandTests(OnlineTestCase):
    def setUp(self):
        super().setUp()
        self.home = self.home_with(ALICE)
        self.relay.register(ALICE)
        self.relay.register(BOB)
        keys.Home(self.home).pin("bob", BOB.public_der)
        # Bob's key changed on the relay (a new device, or an impostor).
        self.relay.store._keys["bob"] = MALLORY_BOB.public_der
        self.relay.factory.directory._known.pop("bob", None)

    def test_changed_key_blocks_sending_until_trusted(self):
        d = self.run_online("send", "--home", self.home, "--to", "bob", "hi")
        self.accept()
        err = self.exits(d, one_line=False)
        self.assertIn("differs from the one pinned", err)
        self.assertIn(f"pinned:  {keys.format_fingerprint(BOB.fingerprint)}", err)
        self.assertIn(f"offered: {keys.format_fingerprint(MALLORY_BOB.fingerprint)}", err)
        self.assertIn("mailrelay trust bob --fingerprint", err)

        # Trusting with the wrong fingerprint changes nothing.
        self.stderr.truncate(0)
        self.stderr.seek(0)
        d = self.run_online("trust", "bob", "--home", self.home,
                            "--fingerprint", keys.format_fingerprint(BOB.fingerprint))
        self.accept()
        err = self.exits(d)
        self.assertIn("nothing was changed", err)
        self.assertEqual(keys.public_der(keys.Home(self.home).pinned("bob")), BOB.public_der)

        d = self.run_online("trust", "bob", "--home", self.home,
                            "--fingerprint", MALLORY_BOB.fingerprint.hex())
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertIn("Now trusting the new key of bob", self.stdout.getvalue())
        self.assertEqual(keys.public_der(keys.Home(self.home).pinned("bob")),
                         MALLORY_BOB.public_der)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "hi")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)

    def test_safety_number_shown(self):
        self.successResultOf(self.run_cli("fingerprint", "bob", "--home", self.home))
        expected = keys.safety_number("alice", ALICE.public_key, "bob", BOB.public_key)
        self.assertIn(f"Safety number with alice: {expected}", self.stdout.getvalue())


class CACommandTests(OnlineTestCase):
    """From `ca init` to a relay in CA mode admitting a certified identity."""

    def setUp(self):
        super().setUp()
        self.ca_dir = self.path("ca")
        root = authority("mailrelay CA")  # made before the patch: no 3072-bit key per test
        patcher = monkey.MonkeyPatcher(
            (ca, "create_authority", lambda name, days=0, bits=0: root))
        patcher.patch()
        self.addCleanup(patcher.restore)
        self.assertEqual(self.successResultOf(self.run_cli("ca", "init", self.ca_dir)), 0)
        self.root_pem = os.path.join(self.ca_dir, "ca.pem")
        self.home = self.home_with(ALICE)

    def certify(self, home: str, name: str) -> None:
        request = self.path(f"{name}.csr")
        certificate = self.path(f"{name}.pem")
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "request", "--home", home, "--out", request)), 0)
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "sign", self.ca_dir, request, "--id", name, "--out", certificate)), 0)
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "install", certificate, "--home", home)), 0)

    def test_ca_files(self):
        self.assertEqual(os.stat(os.path.join(self.ca_dir, "ca-key.pem")).st_mode & 0o777, 0o600)
        err = self.exits(self.run_cli("ca", "init", self.ca_dir))
        self.assertIn("already holds a CA", err)

    def test_certified_identity_admitted_by_a_relay_in_ca_mode(self):
        self.relay = MemoryRelay(clock=self.reactor, ca_roots=ca.load_roots(
            open(self.root_pem, "rb").read()))
        # Without a certificate: refused, with the reason.
        d = self.run_online("fingerprint", "bob", "--home", self.home)
        self.accept()
        err = self.exits(d)
        self.assertIn("admits only identities certified by its CA: no certificate was given",
                      err)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        home = keys.Home(self.home)
        self.certify(self.home, "alice")
        self.assertTrue((home.path / "certificate.pem").exists())
        d = self.run_online("flush", "--home", self.home)
        self.assertEqual(self.successResultOf(d), 0)  # empty outbox: no connection
        bob_home = self.home_with(BOB)
        self.certify(bob_home, "bob")
        d = self.run_online("recv", "--home", bob_home, "--timeout", "1")
        self.accept()
        self.reactor.advance(1)
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.relay.store._keys["bob"], BOB.public_der)
        d = self.run_online("send", "--home", self.home, "--to", "bob", "certified")
        self.accept()
        self.assertEqual(self.successResultOf(d), 0)

    def test_sign_checks_the_id(self):
        request = self.path("alice.csr")
        self.successResultOf(self.run_cli("ca", "request", "--home", self.home, "--out", request))
        err = self.exits(self.run_cli("ca", "sign", self.ca_dir, request, "--id", "bob"))
        self.assertIn("is for 'alice', not 'bob'", err)

    def test_install_refuses_another_keys_certificate(self):
        bob_home = self.home_with(BOB)
        request = self.path("bob.csr")
        certificate = self.path("bob.pem")
        self.successResultOf(self.run_cli("ca", "request", "--home", bob_home, "--out", request))
        self.successResultOf(self.run_cli("ca", "sign", self.ca_dir, request, "--id", "bob",
                                          "--out", certificate))
        err = self.exits(self.run_cli("ca", "install", certificate, "--home", self.home))
        self.assertIn("for another key than alice's", err)

    def test_use_root_makes_contacts_checked(self):
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "use", self.root_pem, "--home", self.home)), 0)
        self.relay.register(BOB)  # bob has no certificate on this relay
        d = self.run_online("send", "--home", self.home, "--to", "bob", "x")
        self.accept()
        err = self.exits(d)
        self.assertIn("has no valid certificate from your CA", err)

    def test_relay_cert(self):
        out = self.path("tls")
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "relay-cert", self.ca_dir, "localhost", "--out-dir", out)), 0)
        self.assertEqual(sorted(os.listdir(out)), ["relay-cert.pem", "relay-key.pem"])
        certificate = ca.load_certificate(open(os.path.join(out, "relay-cert.pem"), "rb").read())
        self.assertEqual(certificate.issuer, authority("mailrelay CA").certificate.subject)


class CAHardeningCommandTests(CACommandTests):
    """What a review of the CA commands found, kept found."""

    def test_no_offline_sealing_with_a_ca(self):
        """With a CA root in use, a key is never used without its certificate checked."""
        from twisted.internet import error
        from twisted.python.failure import Failure
        from twisted.test import iosim

        self.successResultOf(self.run_cli("ca", "use", self.root_pem, "--home", self.home))
        keys.Home(self.home).pin("bob", BOB.public_der)  # pinned before, unchecked
        d = self.run_online("send", "--home", self.home, "--to", "bob", "--queue", "x")
        iosim.ConnectionCompleter(self.reactor).failOnce(
            Failure(error.ConnectionRefusedError()))
        err = self.exits(d)
        self.assertIn("checks contacts' keys against a CA", err)
        self.assertIn("nothing was queued", err)

    def test_ca_key_with_a_passphrase(self):
        secret = self.path("ca-secret")
        with open(secret, "w") as f:
            f.write("ca pass\n")
        protected = self.path("protected-ca")
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "init", protected, "--passphrase-file", secret)), 0)
        key = open(os.path.join(protected, "ca-key.pem"), "rb").read()
        self.assertTrue(key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        request = self.path("alice.csr")
        self.successResultOf(self.run_cli("ca", "request", "--home", self.home, "--out", request))
        self.setenv("MAILRELAY_PASSPHRASE_FILE", None)
        err = self.exits(self.run_cli("ca", "sign", protected, request, "--id", "alice"))
        self.assertIn("protected by a passphrase", err)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        self.assertEqual(self.successResultOf(self.run_cli(
            "ca", "sign", protected, request, "--id", "alice", "--passphrase-file", secret,
            "--out", self.path("alice.pem"))), 0)

    def test_use_refuses_a_leaf(self):
        out = self.path("tls")
        self.successResultOf(self.run_cli("ca", "relay-cert", self.ca_dir, "localhost",
                                          "--out-dir", out))
        err = self.exits(self.run_cli("ca", "use", os.path.join(out, "relay-cert.pem"),
                                      "--home", self.home))
        self.assertIn("not a CA certificate", err)
        self.stderr.truncate(0)
        self.stderr.seek(0)
        err = self.exits(self.run_cli("ca", "relay-cert", self.ca_dir, "localhost",
                                      "--out-dir", out))
        self.assertIn("exists; move it aside first", err)

    def test_days_bounded(self):
        from mailrelay import cli

        self.assertRaises(SystemExit, cli.build_parser().parse_args,
                          ["ca", "init", self.path("x"), "--days", "3000000"])
