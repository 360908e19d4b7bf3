"""
CA mode, against a real relay in memory: a relay with CA roots admits only
identities certified for their key, and a client that knows the root
verifies each contact's certificate before it seals to or trusts a key.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.client.contacts import MemoryContacts
from mailrelay import ca, keys, wire
from mailrelay.client.protocol import RelayError, UncertifiedKey
from tests.test_ca import (
    authority,
    certificate_for,
    crafted_certificate,
    without_digital_signature,
)
from tests.test_client import ALICE, BOB, CAROL, MALLORY_BOB, MemoryRelay

E = wire.ErrorCode


def der(pem: bytes) -> bytes:
    return ca.certificate_der(pem)


class RelayCAModeTests(SynchronousTestCase):
    def setUp(self):
        self.relay = MemoryRelay(ca_roots=[authority().certificate])

    def connect(self, who, certificate=b"", **settings):
        client = self.relay.client(who, certificate=certificate, **settings)
        self.relay.flush()
        # A refused client's ready fails: close_reason says why (checked below).
        client.ready.addErrback(lambda failure: failure.trap(RelayError))
        return client

    def refusal(self, client) -> str:
        self.assertIsNotNone(client.close_reason)
        self.assertIsInstance(client.close_reason, RelayError)
        self.assertEqual(client.close_reason.code, E.AUTH_FAILED)
        return client.close_reason.text

    def test_certified_identity_registers(self):
        client = self.connect(ALICE, der(certificate_for(ALICE)))
        self.assertTrue(client.ready.called)
        self.assertIsNone(client.close_reason)
        self.assertEqual(self.relay.store._keys["alice"], ALICE.public_der)

    def test_no_certificate_refused(self):
        text = self.refusal(self.connect(ALICE))
        self.assertIn("admits only identities certified by its CA", text)
        self.assertIn("no certificate was given", text)
        self.assertNotIn("alice", self.relay.store._keys)

    def test_certificate_for_another_id_refused(self):
        text = self.refusal(self.connect(ALICE, der(certificate_for(BOB))))
        self.assertIn("not for 'alice'", text)

    def test_certificate_for_another_key_refused(self):
        text = self.refusal(self.connect(MALLORY_BOB, der(certificate_for(BOB))))
        self.assertIn("another key of 'bob'", text)

    def test_certificate_from_another_ca_refused(self):
        text = self.refusal(self.connect(ALICE, der(certificate_for(
            ALICE, authority("Another Root")))))
        self.assertIn("not by a trusted root", text)

    def test_expired_certificate_refused(self):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        root = authority()
        now = datetime.datetime.now(datetime.timezone.utc)
        expired = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "alice")]))
            .issuer_name(root.certificate.subject)
            .public_key(ALICE.public_key)
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=10))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("mailrelay:alice")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ca.IDENTITY_EKU]), critical=True)
            .sign(root.key, hashes.SHA256())
        )
        from cryptography.hazmat.primitives import serialization

        text = self.refusal(self.connect(ALICE, expired.public_bytes(serialization.Encoding.DER)))
        self.assertIn("not now", text)

    def test_certificate_for_two_ids_refused(self):
        """
        mallory holds a CA-signed certificate naming her and bob: with it she
        cannot register bob's id for her key.
        """
        pem = crafted_certificate(MALLORY_BOB, ["mallory", "bob"])
        text = self.refusal(self.connect(MALLORY_BOB, der(pem)))
        self.assertIn("the certificate names 2 identities ('mallory', 'bob')", text)
        self.assertNotIn("bob", self.relay.store._keys)

    def test_certificates_not_for_an_identity_refused(self):
        """A CA:TRUE leaf, no basic constraints, no key usage, or no digitalSignature."""
        from cryptography import x509

        for settings, says in [
            ({"constraints": x509.BasicConstraints(ca=True, path_length=None)}, "CA:TRUE"),
            ({"constraints": None}, "no basic constraints"),
            ({"usage": None}, "no key usage"),
            ({"usage": without_digital_signature()}, "does not allow digitalSignature"),
        ]:
            text = self.refusal(self.connect(ALICE, der(crafted_certificate(
                ALICE, ["alice"], **settings))))
            self.assertIn(says, text)
            self.assertNotIn("alice", self.relay.store._keys)
        self.connect(ALICE, der(crafted_certificate(ALICE, ["alice"])))
        self.assertEqual(self.relay.store._keys["alice"], ALICE.public_der)

    def test_lookup_carries_the_certificate(self):
        certificate = der(certificate_for(BOB))
        self.connect(BOB, certificate)
        alice = self.connect(ALICE, der(certificate_for(ALICE)))
        d = alice.lookup("bob")
        self.relay.flush()
        self.assertEqual(self.successResultOf(d), BOB.public_der)
        self.assertEqual(alice._certificates["bob"], certificate)


class ClientVerifiesContactsTests(SynchronousTestCase):
    """A client that knows the root refuses keys the CA did not certify."""

    def setUp(self):
        self.relay = MemoryRelay()  # no CA mode: the relay hands out whatever it holds
        self.roots = [authority().certificate]

    def test_certified_contact_used(self):
        self.relay.client(BOB, certificate=der(certificate_for(BOB)))
        alice = self.relay.client(ALICE, identity_roots=self.roots)
        self.relay.flush()
        d = alice.send("bob", b"hi")
        self.relay.flush()
        self.successResultOf(d)

    def test_substituted_key_caught(self):
        """The relay (or whoever registered first) holds mallory's key for bob: refused."""
        self.relay.client(MALLORY_BOB, certificate=der(certificate_for(BOB)))
        alice = self.relay.client(ALICE, identity_roots=self.roots)
        self.relay.flush()
        d = alice.send("bob", b"for bob only")
        self.relay.flush()
        failure = self.failureResultOf(d, UncertifiedKey)
        self.assertIn("has no valid certificate from your CA", str(failure.value))
        self.assertIn("another key of 'bob'", str(failure.value))
        self.assertEqual(self.relay.count("bob"), 0)

    def test_certificate_for_two_ids_caught(self):
        """
        On a relay that is not in CA mode, mallory registered bob's id with a
        CA-signed certificate naming her and bob: a client that knows the root
        does not seal to that key.
        """
        self.relay.client(MALLORY_BOB, certificate=der(crafted_certificate(
            MALLORY_BOB, ["mallory", "bob"])))
        alice = self.relay.client(ALICE, identity_roots=self.roots)
        self.relay.flush()
        d = alice.send("bob", b"for bob only")
        self.relay.flush()
        failure = self.failureResultOf(d, UncertifiedKey)
        self.assertIn("the certificate names 2 identities", str(failure.value))
        self.assertEqual(self.relay.count("bob"), 0)

    def test_uncertified_sender_rejected_on_receipt(self):
        """A message from a sender without a certificate is dropped, not shown."""
        received, rejected = [], []
        self.relay.client(BOB, identity_roots=self.roots, on_message=received.append,
                          on_rejected=rejected.append)
        carol = self.relay.client(CAROL)
        self.relay.flush()
        d = carol.send("bob", b"trust me")
        self.relay.flush()
        self.successResultOf(d)
        self.assertEqual(received, [])
        [why] = rejected
        self.assertIn("no valid certificate from your CA", why.reason)
        self.assertEqual(self.relay.count("bob"), 0)  # acknowledged and dropped

    def test_keys_not_pinned_when_uncertified(self):
        contacts = MemoryContacts()
        self.relay.client(CAROL)
        alice = self.relay.client(ALICE, identity_roots=self.roots, contacts=contacts)
        self.relay.flush()
        d = alice.contact_key("carol")
        self.relay.flush()
        self.failureResultOf(d, UncertifiedKey)
        self.assertIsNone(contacts.pinned("carol"))


class HostileCertificateTests(SynchronousTestCase):
    def test_malformed_certificate_does_not_block_the_mailbox(self):
        """
        A sender registered (on an ordinary relay) with a malformed certificate:
        a recipient that knows the root drops that sender's message and goes on
        to the next, instead of failing on it for ever.
        """
        from tests.test_ca import poisoned_certificate
        from tests.test_client import ident

        mallory = ident("mallory")
        relay = MemoryRelay()
        received, rejected = [], []
        alice = relay.client(ALICE, identity_roots=[authority().certificate],
                             on_message=received.append, on_rejected=rejected.append)
        poisoner = relay.client(mallory, certificate=poisoned_certificate(mallory))
        bob = relay.client(BOB, certificate=der(certificate_for(BOB)))
        relay.flush()
        for client, text in ((poisoner, b"poison"), (bob, b"hello")):
            d = client.send("alice", text)
            relay.flush()
            self.successResultOf(d)
        self.assertEqual([m.plaintext for m in received], [b"hello"])
        [why] = rejected
        self.assertIn("no valid certificate from your CA", why.reason)
        self.assertIsNone(alice.close_reason)
        self.assertEqual(relay.count("alice"), 0)

    def test_ca_mode_relay_refuses_a_malformed_certificate_cleanly(self):
        from tests.test_ca import poisoned_certificate

        relay = MemoryRelay(ca_roots=[authority().certificate])
        client = relay.client(ALICE, certificate=poisoned_certificate(ALICE))
        client.ready.addErrback(lambda failure: failure.trap(RelayError))
        relay.flush()
        self.assertEqual(client.close_reason.code, E.AUTH_FAILED)
        self.assertIn("not a usable certificate", client.close_reason.text)
        self.assertEqual(self.flushLoggedErrors(), [])


class UniformAuthFailureTests(SynchronousTestCase):
    """
    A failed authentication says the same, and costs the same store work
    (none), whether the id is registered or not: the signature and, in CA
    mode, the certificate are checked before the directory is consulted.
    """

    def failure_for(self, relay, who, **settings):
        lookups = []
        original = relay.store.get_key
        relay.store.get_key = lambda identity: (lookups.append(identity), original(identity))[1]
        client = relay.client(who, **settings)
        client.ready.addErrback(lambda failure: failure.trap(RelayError))
        relay.flush()
        relay.store.get_key = original
        return client.close_reason, lookups

    def test_ca_mode(self):
        relay = MemoryRelay(ca_roots=[authority().certificate])
        relay.register(BOB)  # bob is known; carol is not
        from tests.test_client import CAROL

        known, known_lookups = self.failure_for(relay, MALLORY_BOB)
        unknown, unknown_lookups = self.failure_for(relay, CAROL)
        self.assertEqual((known.code, unknown.code), (E.AUTH_FAILED, E.AUTH_FAILED))
        self.assertEqual(known.text, unknown.text)
        self.assertEqual((known_lookups, unknown_lookups), ([], []))

    def test_bad_signature(self):
        from mailrelay.client import protocol as client_protocol
        from tests.test_client import CAROL

        relay = MemoryRelay()
        relay.register(BOB)
        original = client_protocol.keys.Identity.sign
        self.patch(client_protocol.keys.Identity, "sign",
                   lambda self, data: original(self, data + b"tampered"))
        known, known_lookups = self.failure_for(relay, BOB)
        unknown, unknown_lookups = self.failure_for(relay, CAROL)
        self.assertEqual((known.code, known.text), (unknown.code, unknown.text))
        self.assertEqual((known_lookups, unknown_lookups), ([], []))
