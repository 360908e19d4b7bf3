"""
The certificate authority: X.509 certificates that bind an identity id to
its public key, and the relay's TLS certificate.  Pure functions over PEM
bytes, built on C{cryptography.x509}.

An identity's owner makes a certificate signing request with its own key
(L{make_request}): the request proves possession of the key and names the
id.  The CA checks the request and issues a certificate for that id and key
(L{issue_identity}); it never sees a private key.  A certificate names the
id in its subject common name and, as a URI, C{mailrelay:ID}, in its subject
alternative names; its extended key usage is the mailrelay identity purpose
(L{IDENTITY_EKU}), so no such certificate can pass for a TLS server's; it is
C{CA:FALSE}, with a critical key usage of C{digitalSignature} alone.

L{verify_identity} is what a relay in CA mode and a client that knows the
root check: signed by that root, currently valid, an identity certificate
(the mailrelay purpose, C{CA:FALSE}, C{digitalSignature}) naming exactly one
id, that id, and for that key.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from mailrelay import keys

IDENTITY_EKU = ObjectIdentifier("2.25.263466145756517326490700071155324096613")
"""
Extended key usage of identity certificates: an OID under the UUID arc
(2.25, ITU-T X.667), which needs no registration and is mailrelay's alone.
"""

URI_PREFIX = "mailrelay:"
CA_KEY_BITS = 3072
DEFAULT_DAYS = 365
ROOT_DAYS = 3650


class CAError(Exception):
    """A request, certificate or CA file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Authority:
    """A CA: its private key and self-signed root certificate."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A key usage extension allowing what is named, and nothing else."""
    flags = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False)
    flags.update(allowed)
    return x509.KeyUsage(**flags)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_authority(name: str, days: int = ROOT_DAYS, bits: int = CA_KEY_BITS) -> Authority:
    """A new CA key and its self-signed root certificate, valid for C{days}."""
    key = rsa.generate_private_key(public_exponent=keys.PUBLIC_EXPONENT, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, certificate)


def load_authority(key_pem: bytes, certificate_pem: bytes, passphrase: bytes | None = None
                   ) -> Authority:
    try:
        key = serialization.load_pem_private_key(key_pem, password=passphrase)
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except (ValueError, TypeError) as e:
        raise CAError(f"cannot read the CA: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CAError("the CA key is not an RSA key")
    if keys.public_der(key.public_key()) != keys.public_der(certificate.public_key()):
        raise CAError("the CA key and the root certificate do not belong together")
    return Authority(key, certificate)


def _parsed(certificate: x509.Certificate) -> x509.Certificate:
    """
    C{certificate} with every field read once: cryptography parses lazily,
    and a malformed name or extension must fail here, as L{CAError}, not
    later in some caller that expects a usable certificate.
    """
    certificate.subject, certificate.issuer, certificate.not_valid_before_utc
    certificate.not_valid_after_utc, certificate.public_key()
    for _ in certificate.extensions:
        pass
    return certificate


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate in PEM or DER, every field of it readable."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return _parsed(x509.load_pem_x509_certificate(data))
        return _parsed(x509.load_der_x509_certificate(data))
    except Exception as e:  # any parse failure of bytes from outside
        raise CAError(f"not a usable certificate: {e}") from None


def certificate_pem(certificate: x509.Certificate | bytes) -> bytes:
    """A certificate (object, PEM or DER) as PEM, the form files hold."""
    if isinstance(certificate, (bytes, bytearray)):
        certificate = load_certificate(bytes(certificate))
    return certificate.public_bytes(serialization.Encoding.PEM)


def certificate_der(data: bytes) -> bytes:
    """A certificate (PEM or DER) as DER, the form the wire carries."""
    return load_certificate(data).public_bytes(serialization.Encoding.DER)


def load_roots(pem: bytes) -> list[x509.Certificate]:
    """
    Every certificate in a PEM bundle, each checked to be a CA root: self-
    signed, C{CA:TRUE} with C{keyCertSign}.  A leaf (a relay's TLS
    certificate, a person's identity certificate) is refused: whoever holds
    its key could otherwise certify any key as anyone.
    """
    try:
        roots = [_parsed(r) for r in x509.load_pem_x509_certificates(pem)]
    except Exception as e:
        raise CAError(f"not a PEM certificate bundle: {e}") from None
    for root in roots:
        name = root.subject.rfc4514_string()
        try:
            constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            raise CAError(f"{name} is not a CA certificate (no basic constraints or key "
                          f"usage)") from None
        if not constraints.ca or not usage.key_cert_sign:
            raise CAError(f"{name} is not a CA certificate: it may not sign certificates")
        try:
            if root.issuer != root.subject:
                raise ValueError
            root.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise CAError(f"{name} is not a root: it is not self-signed") from None
    return roots


def make_request(identity: keys.Identity) -> bytes:
    """A CSR (PEM) for C{identity}, signed with its own key: the CA sees no private key."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                URI_PREFIX + identity.name)]),
            critical=False,
        )
        .sign(identity.private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _request_identity(csr: x509.CertificateSigningRequest) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CAError("the request must name exactly one identity (common name)")
    return keys.check_identity(str(names[0].value))


def issue_identity(authority: Authority, request_pem: bytes, days: int = DEFAULT_DAYS,
                   expected: str | None = None) -> bytes:
    """
    A certificate (PEM) binding the id and key of the request, valid for
    C{days}.  The request's signature must verify with its own key (proof
    of possession), its key must meet mailrelay's limits, and its id must be
    C{expected} when given.  The certificate has every extension
    L{verify_identity} requires, the critical key usage C{digitalSignature}
    among them (certificates issued before it was required lack it).
    """
    try:
        csr = x509.load_pem_x509_csr(request_pem)
    except ValueError as e:
        raise CAError(f"not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise CAError("the request's signature does not verify with its own key")
    key = csr.public_key()
    try:
        keys.load_public_der(keys.public_der(key))
    except keys.BadKey as e:
        raise CAError(f"the request's key is not usable: {e}") from None
    name = _request_identity(csr)
    if expected is not None and name != keys.check_identity(expected):
        raise CAError(f"the request is for {name!r}, not {expected!r}")
    if days < 1:
        raise CAError("a certificate must be valid for at least one day")
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URI_PREFIX + name)]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([IDENTITY_EKU]), critical=True)
        .add_extension(
            _key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def issue_server(authority: Authority, hostname: str, days: int = DEFAULT_DAYS
                 ) -> tuple[bytes, bytes]:
    """
    A TLS server key and certificate (both PEM) for C{hostname}, for the
    relay's C{--tls-key} and C{--tls-cert}.
    """
    if not hostname or any(c.isspace() for c in hostname) or ".." in hostname:
        raise CAError(f"{hostname!r} is not a host name")
    try:
        hostname.encode("ascii")
    except UnicodeEncodeError:
        try:
            hostname = hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise CAError(f"{hostname!r} is not a host name") from None
    key = rsa.generate_private_key(public_exponent=keys.PUBLIC_EXPONENT, key_size=CA_KEY_BITS)
    try:
        import ipaddress

        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        alt = x509.DNSName(hostname)
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def verify_identity(certificate_data: bytes, roots: list[x509.Certificate], identity: str,
                    public_key_der: bytes, now: datetime.datetime | None = None) -> None:
    """
    Raise L{CAError}, saying which check failed, unless C{certificate_data}
    (PEM or DER) is an identity certificate signed by one of C{roots}, valid at C{now},
    for C{identity} and for the key C{public_key_der}.

    An identity certificate has the mailrelay purpose (L{IDENTITY_EKU}),
    basic constraints saying C{CA:FALSE}, a key usage allowing
    C{digitalSignature}, and exactly one C{mailrelay:} URI among its subject
    alternative names: a certificate naming several ids would be good for
    each, so whoever holds its key could sign as all of them.
    """
    try:
        _verify_identity(certificate_data, roots, identity, public_key_der, now)
    except CAError:
        raise
    except Exception as e:  # whatever else malformed input provokes: a refusal
        raise CAError(f"the certificate cannot be checked: {e}") from None


def _verify_identity(certificate_data, roots, identity, public_key_der, now) -> None:
    if not certificate_data:
        raise CAError("no certificate was given")
    certificate = load_certificate(certificate_data)
    now = now or _now()
    candidates = [r for r in roots if r.subject == certificate.issuer]
    if not candidates:
        raise CAError(f"the certificate is issued by {certificate.issuer.rfc4514_string()}, "
                      f"not by a trusted root")
    issuer = None
    for root in candidates:  # roots may share a name: the signature decides
        try:
            certificate.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            continue
        issuer = root
        if root.not_valid_before_utc <= now <= root.not_valid_after_utc:
            break  # else a root renewed with the same key may come later
    if issuer is None:
        raise CAError("the certificate's signature does not verify with the root")
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CAError(
            f"the certificate is valid from {certificate.not_valid_before_utc:%Y-%m-%d} to "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}, not now")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = []
    if IDENTITY_EKU not in usage:
        raise CAError("the certificate is not a mailrelay identity certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError("the certificate has no basic constraints: an identity certificate "
                      "says CA:FALSE") from None
    if constraints.ca:
        raise CAError("the certificate is a CA certificate (CA:TRUE), not an identity's")
    try:
        key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CAError("the certificate has no key usage (digitalSignature): mailrelay "
                      "issued such certificates before it required one; have it issued "
                      "again (mailrelay ca sign)") from None
    if not key_usage.digital_signature:
        raise CAError("the certificate's key usage does not allow digitalSignature")
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        names = []
    # A URI's scheme is case-insensitive (RFC 3986): MAILRELAY:bob names bob too.
    certified = [n[len(URI_PREFIX):] for n in names if n.lower().startswith(URI_PREFIX)]
    if len(certified) > 1:
        listed = ", ".join(repr(c) for c in certified)
        raise CAError(f"the certificate names {len(certified)} identities ({listed}): an "
                      f"identity certificate names exactly one")
    if certified != [identity]:
        raise CAError(f"the certificate is for {', '.join(certified) or 'no identity'!r}, "
                      f"not for {identity!r}")
    if keys.public_der(certificate.public_key()) != public_key_der:
        raise CAError(f"the certificate is for another key of {identity!r}")
    if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
        raise CAError(f"the root {issuer.subject.rfc4514_string()} is not valid now "
                      f"(until {issuer.not_valid_after_utc:%Y-%m-%d})")
