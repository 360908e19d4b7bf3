"""
Tests for L{mailrelay.ca}: roots, identity certificates from requests, the
relay's TLS certificate, and the checks a relay or client makes.
"""

from __future__ import annotations

import datetime
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import ca, keys
from tests import skips
from tests.test_keys import identity

_authorities: dict[str, ca.Authority] = {}


def authority(name: str = "Test Root") -> ca.Authority:
    if name not in _authorities:
        _authorities[name] = ca.create_authority(name, bits=2048)
    return _authorities[name]


def certificate_for(who: keys.Identity, root: ca.Authority | None = None, days: int = 30) -> bytes:
    return ca.issue_identity(root or authority(), ca.make_request(who), days=days)


LEAF = x509.BasicConstraints(ca=False, path_length=None)
SIGNING = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)


def crafted_certificate(holder: keys.Identity, ids: list[str],
                        constraints: x509.BasicConstraints | None = LEAF,
                        usage: x509.KeyUsage | None = SIGNING,
                        root: ca.Authority | None = None) -> bytes:
    """
    An identity certificate (PEM) for C{holder}'s key, built by hand and
    signed by the test CA, as a careless or compromised CA might sign it: for
    the ids C{ids} (each a C{mailrelay:} URI; an id with a colon is taken as
    the whole URI), with C{constraints} and
    C{usage} (None: without that extension).  With the defaults it is what
    L{ca.issue_identity} issues.
    """
    root = root or authority()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                    (ids or ["nobody"])[0])]))
        .issuer_name(root.certificate.subject)
        .public_key(holder.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(i if ":" in i else ca.URI_PREFIX + i)
             for i in ids]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ca.IDENTITY_EKU]), critical=True)
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(root.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def without_digital_signature() -> x509.KeyUsage:
    """A key usage for encryption only: the key may not sign."""
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)


class IssueAndVerifyTests(SynchronousTestCase):
    def test_valid_certificate(self):
        alice = identity("alice")
        pem = certificate_for(alice)
        ca.verify_identity(pem, [authority().certificate], "alice", alice.public_der)
        certificate = x509.load_pem_x509_certificate(pem)
        self.assertEqual(certificate.issuer, authority().certificate.subject)
        self.assertEqual(keys.public_der(certificate.public_key()), alice.public_der)

    def assertRefused(self, pem, who="alice", der=None, roots=None, now=None, says=""):
        error = self.assertRaises(
            ca.CAError, ca.verify_identity, pem, roots or [authority().certificate], who,
            der if der is not None else identity("alice").public_der, now)
        self.assertIn(says, str(error))

    def test_other_identity(self):
        self.assertRefused(certificate_for(identity("alice")), who="bob",
                           says="is for 'alice', not for 'bob'")

    def test_other_key(self):
        self.assertRefused(certificate_for(identity("alice")),
                           der=identity("alice", "other").public_der,
                           says="for another key of 'alice'")

    def test_other_root(self):
        pem = certificate_for(identity("alice"), authority("Another Root"))
        self.assertRefused(pem, says="not by a trusted root")

    def test_same_name_other_root_key(self):
        """A root with the same name but another key: the signature check refuses it."""
        impostor = ca.create_authority("Test Root", bits=2048)
        pem = certificate_for(identity("alice"), impostor)
        self.assertRefused(pem, says="does not verify with the root")

    def test_expired_and_not_yet_valid(self):
        pem = certificate_for(identity("alice"), days=1)
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)
        self.assertRefused(pem, now=later, says="not now")
        earlier = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        self.assertRefused(pem, now=earlier, says="not now")

    def test_server_certificate_is_not_an_identity(self):
        _, server_pem = ca.issue_server(authority(), "alice")
        error = self.assertRaises(ca.CAError, ca.verify_identity, server_pem,
                                  [authority().certificate], "alice",
                                  keys.public_der(x509.load_pem_x509_certificate(
                                      server_pem).public_key()))
        self.assertIn("not a mailrelay identity certificate", str(error))

    def test_issued_certificate_shape(self):
        """
        What the CA issues passes the checks of L{ca.verify_identity}: one
        id, CA:FALSE, and a critical key usage of digitalSignature alone.
        """
        certificate = x509.load_pem_x509_certificate(certificate_for(identity("alice")))
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertEqual(usage.value, SIGNING)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertEqual(constraints.value, LEAF)
        self.assertEqual(certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier), ["mailrelay:alice"])

    def test_request_checked(self):
        request = ca.make_request(identity("alice"))
        error = self.assertRaises(ca.CAError, ca.issue_identity, authority(), request,
                                  expected="bob")
        self.assertIn("is for 'alice', not 'bob'", str(error))
        tampered = x509.load_pem_x509_csr(request).public_bytes(serialization.Encoding.DER)
        tampered = bytearray(tampered)
        tampered[-10] ^= 1
        pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n"
               + __import__("base64").encodebytes(bytes(tampered))
               + b"-----END CERTIFICATE REQUEST-----\n")
        error = self.assertRaises(ca.CAError, ca.issue_identity, authority(), pem)
        self.assertIn("does not verify", str(error))
        self.assertRaises(ca.CAError, ca.issue_identity, authority(), b"garbage")

    def test_authority_round_trip(self):
        root = authority()
        key_pem = root.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"ca secret"))
        loaded = ca.load_authority(key_pem, root.certificate_pem, b"ca secret")
        self.assertEqual(loaded.certificate, root.certificate)
        other = authority("Another Root")
        error = self.assertRaises(ca.CAError, ca.load_authority, key_pem,
                                  other.certificate_pem, b"ca secret")
        self.assertIn("do not belong together", str(error))

    def test_openssl_verifies_the_chain(self):
        executable = skips.openssl()
        root_path = self.mktemp()
        with open(root_path, "wb") as f:
            f.write(authority().certificate_pem)
        _, server_pem = ca.issue_server(authority(), "localhost")
        server_path = self.mktemp()
        with open(server_path, "wb") as f:
            f.write(server_pem)
        result = subprocess.run([executable, "verify", "-CAfile", root_path,
                                 "-verify_hostname", "localhost", server_path],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)


def poisoned_certificate(who: keys.Identity) -> bytes:
    """A DER certificate whose issuer name is not valid UTF-8: parsed lazily, it fails late."""
    now = datetime.datetime.now(datetime.timezone.utc)
    der = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, who.name)]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "zzzzzzzzzzzz")]))
        .public_key(who.public_key).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(who.private_key, __import__("cryptography.hazmat.primitives.hashes",
                                          fromlist=["SHA256"]).SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    return der.replace(b"zzzzzzzzzzzz", b"\xff\xfe" + b"z" * 10)


class CertificateShapeTests(SynchronousTestCase):
    """
    Certificates signed by the trusted CA that are still not one identity's
    certificate for one key: each is refused, saying which check failed.
    """

    def refusal(self, pem: bytes, who: str, holder: keys.Identity) -> str:
        error = self.assertRaises(ca.CAError, ca.verify_identity, pem,
                                  [authority().certificate], who, holder.public_der)
        self.assertNotIn("\n", str(error))
        return str(error)

    def test_hand_built_certificate_is_valid(self):
        """The hand-built certificate passes when nothing is wrong with it."""
        alice = identity("alice")
        ca.verify_identity(crafted_certificate(alice, ["alice"]), [authority().certificate],
                           "alice", alice.public_der)

    def test_certificate_for_two_ids(self):
        """
        mallory got the CA to sign a certificate naming her and bob: it is not
        bob's certificate (nor hers: a certificate is for exactly one id).
        """
        mallory = identity("mallory")
        pem = crafted_certificate(mallory, ["mallory", "bob"])
        for who in ("bob", "mallory"):
            self.assertEqual(
                self.refusal(pem, who, mallory),
                "the certificate names 2 identities ('mallory', 'bob'): an identity "
                "certificate names exactly one")

    def test_second_id_in_another_case(self):
        """A URI's scheme is case-insensitive: MAILRELAY:bob names a second id too."""
        mallory = identity("mallory")
        pem = crafted_certificate(mallory, ["mallory", "MAILRELAY:bob"])
        self.assertIn("names 2 identities", self.refusal(pem, "mallory", mallory))

    def test_ca_true_leaf(self):
        alice = identity("alice")
        pem = crafted_certificate(alice, ["alice"],
                                  constraints=x509.BasicConstraints(ca=True, path_length=None))
        self.assertEqual(self.refusal(pem, "alice", alice),
                         "the certificate is a CA certificate (CA:TRUE), not an identity's")

    def test_no_basic_constraints(self):
        alice = identity("alice")
        pem = crafted_certificate(alice, ["alice"], constraints=None)
        self.assertEqual(self.refusal(pem, "alice", alice),
                         "the certificate has no basic constraints: an identity certificate "
                         "says CA:FALSE")

    def test_key_usage_without_digital_signature(self):
        alice = identity("alice")
        pem = crafted_certificate(alice, ["alice"], usage=without_digital_signature())
        self.assertEqual(self.refusal(pem, "alice", alice),
                         "the certificate's key usage does not allow digitalSignature")

    def test_no_key_usage(self):
        """As certificates issued by earlier versions of mailrelay: issue them again."""
        alice = identity("alice")
        message = self.refusal(crafted_certificate(alice, ["alice"], usage=None), "alice",
                               alice)
        self.assertIn("the certificate has no key usage (digitalSignature)", message)
        self.assertIn("mailrelay ca sign", message)


class HostileCertificateTests(SynchronousTestCase):
    def test_malformed_certificate_is_a_refusal(self):
        alice = identity("alice")
        poison = poisoned_certificate(alice)
        self.assertRaises(ca.CAError, ca.load_certificate, poison)
        self.assertRaises(ca.CAError, ca.certificate_der, poison)
        self.assertRaises(ca.CAError, ca.verify_identity, poison, [authority().certificate],
                          "alice", alice.public_der)

    def test_only_roots_are_roots(self):
        """A leaf (a relay's TLS certificate, an identity's) cannot serve as a root."""
        _, server = ca.issue_server(authority(), "localhost")
        error = self.assertRaises(ca.CAError, ca.load_roots, server)
        self.assertIn("not a CA certificate", str(error))
        error = self.assertRaises(ca.CAError, ca.load_roots, certificate_for(identity("alice")))
        self.assertIn("not a CA certificate", str(error))
        self.assertEqual(ca.load_roots(authority().certificate_pem), [authority().certificate])

    def test_expired_root(self):
        root = ca.create_authority("Short Root", days=1, bits=2048)
        pem = certificate_for(identity("alice"), root, days=30)
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=25)
        error = self.assertRaises(ca.CAError, ca.verify_identity, pem, [root.certificate],
                                  "alice", identity("alice").public_der, later)
        self.assertIn("the root CN=Short Root is not valid now", str(error))

    def test_roots_sharing_a_name(self):
        """Two roots with one name (a CA being replaced): the signature picks the right one."""
        old, new = ca.create_authority("Same Name", bits=2048), ca.create_authority(
            "Same Name", bits=2048)
        pem = certificate_for(identity("alice"), new)
        ca.verify_identity(pem, [old.certificate, new.certificate], "alice",
                           identity("alice").public_der)

    def test_host_names(self):
        for bad in ("", "a b", "a..b"):
            self.assertRaises(ca.CAError, ca.issue_server, authority(), bad)
        _, pem = ca.issue_server(authority(), "rélay.example")
        names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        self.assertEqual(names, ["xn--rlay-bpa.example"])


# Found by mutation testing (make mutation-test): checks no test above guarded.

def extension(certificate: x509.Certificate, kind):
    found = certificate.extensions.get_extension_for_class(kind)
    return found.value, found.critical


def made_root(key, name: str, constraints=x509.BasicConstraints(ca=True, path_length=0),
              usage: bool | None = True, signer=None, issuer: str | None = None) -> bytes:
    """A root certificate (PEM) built by hand: C{usage} True, False (no keyCertSign) or None."""
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                          issuer or name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=usage, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign((signer or key), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class IssuedShapeTests(SynchronousTestCase):
    """Exactly what the CA issues: each extension, its criticality, the validity."""

    def assertBackdated(self, certificate, before):
        """Valid from five minutes before it was made (clocks differ a little)."""
        after = datetime.datetime.now(datetime.timezone.utc)
        start = certificate.not_valid_before_utc + datetime.timedelta(minutes=5)
        self.assertTrue(before - datetime.timedelta(seconds=1) <= start <= after,
                        (before, start, after))

    def test_root(self):
        asked = []
        key = identity("ca-root").private_key

        def generate(public_exponent, key_size):
            asked.append(key_size)
            return key

        self.patch(ca.rsa, "generate_private_key", generate)
        before = datetime.datetime.now(datetime.timezone.utc)
        root = ca.create_authority("Shape Root").certificate
        self.assertEqual(asked, [3072])
        self.assertEqual(extension(root, x509.BasicConstraints),
                         (x509.BasicConstraints(ca=True, path_length=0), True))
        usage, critical = extension(root, x509.KeyUsage)
        self.assertTrue(critical)
        self.assertEqual((usage.digital_signature, usage.content_commitment,
                          usage.key_encipherment, usage.data_encipherment, usage.key_agreement,
                          usage.key_cert_sign, usage.crl_sign),
                         (False, False, False, False, False, True, True))
        self.assertBackdated(root, before)
        self.assertEqual(root.not_valid_after_utc - root.not_valid_before_utc,
                         datetime.timedelta(days=3650, minutes=5))

    def test_identity(self):
        before = datetime.datetime.now(datetime.timezone.utc)
        certificate = x509.load_pem_x509_certificate(
            ca.issue_identity(authority(), ca.make_request(identity("alice"))))
        self.assertEqual(extension(certificate, x509.BasicConstraints),
                         (x509.BasicConstraints(ca=False, path_length=None), True))
        self.assertFalse(extension(certificate, x509.SubjectAlternativeName)[1])
        self.assertEqual(extension(certificate, x509.ExtendedKeyUsage),
                         (x509.ExtendedKeyUsage([ca.IDENTITY_EKU]), True))
        self.assertFalse(extension(certificate, x509.AuthorityKeyIdentifier)[1])
        self.assertBackdated(certificate, before)
        self.assertEqual(certificate.not_valid_after_utc - certificate.not_valid_before_utc,
                         datetime.timedelta(days=365, minutes=5))

    def test_server(self):
        before = datetime.datetime.now(datetime.timezone.utc)
        _, pem = ca.issue_server(authority(), "localhost")
        certificate = x509.load_pem_x509_certificate(pem)
        self.assertEqual(extension(certificate, x509.BasicConstraints),
                         (x509.BasicConstraints(ca=False, path_length=None), True))
        self.assertFalse(extension(certificate, x509.SubjectAlternativeName)[1])
        self.assertFalse(extension(certificate, x509.ExtendedKeyUsage)[1])
        self.assertBackdated(certificate, before)

    def test_one_day_is_the_shortest(self):
        pem = ca.issue_identity(authority(), ca.make_request(identity("alice")), days=1)
        certificate = x509.load_pem_x509_certificate(pem)
        self.assertEqual(certificate.not_valid_after_utc - certificate.not_valid_before_utc,
                         datetime.timedelta(days=1, minutes=5))
        with self.assertRaises(ca.CAError) as caught:
            ca.issue_identity(authority(), ca.make_request(identity("alice")), days=0)
        self.assertIn("at least one day", str(caught.exception))


class RequestTests(SynchronousTestCase):
    def request(self, names: list[str], key=None) -> bytes:
        key = key or identity("alice").private_key
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, n) for n in names])
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
            key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.PEM)

    def test_exactly_one_identity(self):
        for names in ([], ["alice", "bob"]):
            with self.assertRaises(ca.CAError) as caught:
                ca.issue_identity(authority(), self.request(names))
            self.assertIn("exactly one identity", str(caught.exception))
        ca.issue_identity(authority(), self.request(["alice"]))

    def test_key_outside_the_limits(self):
        from tests.test_keys import small_rsa_key

        with self.assertRaises(ca.CAError) as caught:
            ca.issue_identity(authority(), self.request(["alice"], small_rsa_key()))
        self.assertIn("not usable", str(caught.exception))


class CAFilesTests(SynchronousTestCase):
    def test_unreadable_authority(self):
        root = authority()
        key_pem = root.key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        with self.assertRaises(ca.CAError) as caught:
            ca.load_authority(b"junk", root.certificate_pem)
        self.assertIn("cannot read the CA", str(caught.exception))
        from cryptography.hazmat.primitives.asymmetric import ec

        other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        with self.assertRaises(ca.CAError) as caught:
            ca.load_authority(other, root.certificate_pem)
        self.assertIn("not an RSA key", str(caught.exception))
        self.assertEqual(ca.load_authority(key_pem, root.certificate_pem).certificate,
                         root.certificate)

    def test_certificate_as_pem_from_any_form(self):
        pem = certificate_for(identity("alice"))
        parsed = x509.load_pem_x509_certificate(pem)
        for form in (pem, ca.certificate_der(pem), parsed):
            self.assertEqual(ca.certificate_pem(form), parsed.public_bytes(
                serialization.Encoding.PEM))

    def test_malformed_extension_fails_on_loading(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        alice = identity("alice")
        der = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "alice")]))
               .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
               .public_key(alice.public_key).serial_number(1)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.UnrecognizedExtension(
                   x509.ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01"), critical=True)
               .sign(alice.private_key, hashes.SHA256())
               .public_bytes(serialization.Encoding.DER))
        self.assertRaises(ca.CAError, ca.load_certificate, der)


class RootBundleTests(SynchronousTestCase):
    def test_not_a_bundle(self):
        with self.assertRaises(ca.CAError) as caught:
            ca.load_roots(b"-----BEGIN CERTIFICATE-----\njunk\n-----END CERTIFICATE-----\n")
        self.assertIn("not a PEM certificate bundle", str(caught.exception))

    def test_a_root_needs_every_mark_of_one(self):
        key = identity("ca-shape").private_key
        for pem, why in ((made_root(key, "No Constraints", constraints=None), "not a CA"),
                         (made_root(key, "No Usage", usage=None), "not a CA"),
                         (made_root(key, "No Cert Sign", usage=False), "may not sign"),
                         (made_root(key, "Leaf Root", constraints=x509.BasicConstraints(
                             ca=False, path_length=None)), "may not sign"),
                         (made_root(key, "Issued", issuer="Another CA"), "not self-signed"),
                         (made_root(key, "Forged", signer=identity("ca-other").private_key),
                          "not self-signed")):
            with self.assertRaises(ca.CAError) as caught:
                ca.load_roots(pem)
            self.assertIn(why, str(caught.exception))
        self.assertEqual(len(ca.load_roots(made_root(key, "Good Root"))), 1)


class IdentityCheckEdgeTests(SynchronousTestCase):
    def setUp(self):
        self.alice = identity("alice")
        self.pem = certificate_for(self.alice)
        self.certificate = x509.load_pem_x509_certificate(self.pem)
        self.roots = [authority().certificate]

    def check(self, pem=None, now=None, roots=None):
        ca.verify_identity(pem or self.pem, roots or self.roots, "alice", self.alice.public_der,
                           now)

    def test_valid_at_both_ends_of_its_validity(self):
        self.check(now=self.certificate.not_valid_before_utc)
        self.check(now=self.certificate.not_valid_after_utc)
        # And the root's: a root valid one day, the certificate thirty.
        short = ca.create_authority("Edge Root", days=1, bits=2048)
        start = short.certificate.not_valid_before_utc
        pem = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "alice")]))
               .issuer_name(short.certificate.subject)
               .public_key(self.alice.public_key).serial_number(1)
               .not_valid_before(start - datetime.timedelta(days=1))
               .not_valid_after(start + datetime.timedelta(days=30))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.UniformResourceIdentifier("mailrelay:alice")]), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ca.IDENTITY_EKU]), critical=True)
               .add_extension(LEAF, critical=True).add_extension(SIGNING, critical=True)
               .sign(short.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        for now in (start, short.certificate.not_valid_after_utc):
            ca.verify_identity(pem, [short.certificate], "alice", self.alice.public_der, now)

    def test_anything_malformed_is_a_refusal(self):
        self.assertRaises(ca.CAError, self.check, roots=[None])

    def test_certificate_without_the_purpose_or_names(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                               "alice")]))
                   .issuer_name(authority().certificate.subject)
                   .public_key(self.alice.public_key).serial_number(1)
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(LEAF, critical=True).add_extension(SIGNING, critical=True))
        bare = builder.sign(authority().key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)
        with self.assertRaises(ca.CAError) as caught:
            self.check(bare)
        self.assertIn("not a mailrelay identity certificate", str(caught.exception))
        unnamed = builder.add_extension(x509.ExtendedKeyUsage([ca.IDENTITY_EKU]), critical=True)
        with self.assertRaises(ca.CAError) as caught:
            self.check(unnamed.sign(authority().key, hashes.SHA256()).public_bytes(
                serialization.Encoding.PEM))
        self.assertIn("no identity", str(caught.exception))

    def test_other_uris_do_not_count_as_ids(self):
        pem = crafted_certificate(self.alice, ["alice", "https://alice.example/"])
        self.check(pem)


class RenewedRootTests(SynchronousTestCase):
    def test_root_renewed_with_the_same_key(self):
        """
        The CA renewed its root (same name, same key) and both are in the
        bundle: a certificate it issued is good whichever comes first.
        """
        root = ca.create_authority("Renewed Root", bits=2048)
        now = datetime.datetime.now(datetime.timezone.utc)
        expired = (x509.CertificateBuilder().subject_name(root.certificate.subject)
                   .issuer_name(root.certificate.subject).public_key(root.key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=400))
                   .not_valid_after(now - datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(root.key, hashes.SHA256()))
        alice = identity("alice")
        pem = certificate_for(alice, root)
        for roots in ([expired, root.certificate], [root.certificate, expired]):
            ca.verify_identity(pem, roots, "alice", alice.public_der)
        with self.assertRaises(ca.CAError) as caught:
            ca.verify_identity(pem, [expired], "alice", alice.public_der)
        self.assertIn("is not valid now", str(caught.exception))

    def test_renewed_root_valid_at_either_end(self):
        """The first root that verifies and is valid at that very second is the one."""
        root = ca.create_authority("Renewed Edge Root", bits=2048)
        alice = identity("alice")
        pem = certificate_for(alice, root, days=30)
        start = x509.load_pem_x509_certificate(pem).not_valid_before_utc + datetime.timedelta(
            days=1)

        def copy(valid_from, valid_until):
            return (x509.CertificateBuilder().subject_name(root.certificate.subject)
                    .issuer_name(root.certificate.subject).public_key(root.key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(valid_from).not_valid_after(valid_until)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .sign(root.key, hashes.SHA256()))

        day = datetime.timedelta(days=1)
        expired, later = copy(start - 400 * day, start - day), copy(start + day, start + 400 * day)
        for roots in ([copy(start, start + 10 * day), expired],
                      [copy(start - 10 * day, start), later]):
            ca.verify_identity(pem, roots, "alice", alice.public_der, start)


class HostNameEncodingTests(SynchronousTestCase):
    def test_name_that_cannot_be_encoded(self):
        with self.assertRaises(ca.CAError) as caught:
            ca.issue_server(authority(), "é" * 64 + ".example")
        self.assertIn("is not a host name", str(caught.exception))

    def test_authority_cannot_be_altered(self):
        import dataclasses

        self.assertRaises(dataclasses.FrozenInstanceError, setattr, authority(), "key", None)
