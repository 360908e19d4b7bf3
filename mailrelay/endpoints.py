"""
Endpoint strings as people type them, and the TLS ends of the relay and
its clients.

C{--port 9000} means C{tcp:9000}; C{--server host:9000} means
C{tcp:host:9000} and C{--server tls://host:9443} C{tls:host:9443}.
Anything else is a Twisted endpoint string, passed on unchanged
(C{tcp:9000:interface=127.0.0.1}, C{tls:relay.example.org:9443}).

The relay serves TLS with L{load_server_tls} and L{server_endpoint}, and
clients reach a C{tls:} server through L{client_endpoint}, which checks the
relay's certificate against the CAs the client was given (C{--ca}, else
C{HOME/ca.pem}, else the system's) and against the host name, and says in
one line what did not match.

Both ends speak TLS 1.3 and nothing older.  Authentication is bound to the
TLS exporter of the connection (L{mailrelay.channel}), and only TLS 1.3
promises that no other connection has the same exporter: a TLS 1.2
connection without the extended master secret (RFC 7627) can be given the
master secret of another one by a malicious server (the triple handshake),
which could then pass a client's bound answer on to the real relay.
"""

from __future__ import annotations

import os
import re

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
_ENDPOINT_KINDS = ("tcp", "tcp6", "ssl", "unix", "tls", "tor", "onion", "systemd", "ssh")


def server_description(value: str) -> str:
    value = value.strip()
    if value.isdigit():
        return f"tcp:{int(value)}"
    return value


_URL = re.compile(r"^(?P<kind>tls|tcp)://(?P<rest>.*)$", re.IGNORECASE)


def client_description(value: str) -> str:
    value = value.strip()
    url = _URL.match(value)
    if url:
        m = _HOST_PORT.match(url.group("rest").rstrip("/"))
        if m:
            host = m.group("host").strip("[]").replace(":", r"\:")
            return f"{url.group('kind').lower()}:{host}:{m.group('port')}"
        return value
    kind = value.split(":", 1)[0].lower()
    if kind in _ENDPOINT_KINDS:
        return value
    m = _HOST_PORT.match(value)
    if m:
        host = m.group("host").strip("[]").replace(":", r"\:")
        return f"tcp:{host}:{m.group('port')}"
    return value


# Where the port number sits in the endpoint kinds that have one: the field
# after the kind for a server, the one after the host for a client.
_PORT_FIELD = {"server": {"tcp": 0, "tcp6": 0, "ssl": 0},
               "client": {"tcp": 1, "tcp6": 1, "ssl": 1, "tls": 1}}


def _fields(description: str) -> list[str]:
    """C{description} split at its unescaped colons (C{\\:} is a colon in a field)."""
    fields, current, chars = [], [], iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def check_port(description: str, server: bool = False) -> None:
    """
    ValueError when the port number in a tcp, tcp6, ssl or tls endpoint
    string is out of range (1 to 65535; a server may also ask for 0, any
    free port), which Twisted would only notice, with an OverflowError, when
    connecting or listening.  A port that is not a number is left for
    Twisted's parser to report.
    """
    fields = _fields(description.strip())
    index = _PORT_FIELD["server" if server else "client"].get(fields[0].lower())
    if index is None:
        return
    positional = [f for f in fields[1:] if "=" not in f]
    named = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    port = named.get("port", positional[index] if index < len(positional) else None)
    try:
        number = int(port)
    except (TypeError, ValueError):
        return
    lowest = 0 if server else 1
    if not lowest <= number <= 65535:
        raise ValueError(f"port must be {lowest} to 65535")


def _kind(description: str) -> str:
    return description.strip().split(":", 1)[0].lower()


def _split(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and the named fields after the kind."""
    fields = _fields(description.strip())[1:]
    positional = [f for f in fields if "=" not in f]
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    return positional, named


class TLSSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


MINIMUM_TLS = "TLS 1.3"
"""The oldest TLS either end speaks: the first whose exporter is unique to a connection."""


def _min_version():
    from twisted.internet.ssl import TLSVersion

    return TLSVersion.TLSv1_3


def _name(label: str, path: str) -> str:
    """How a message names a file: C{--ca /etc/ca.pem}, C{trustRoots=/etc/ca}."""
    return f"{label}{path}" if label.endswith("=") else f"{label} {path}"


def _read(label: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{_name(label, path)}: {e.strerror or e}") from None


def _pem_certificates(label: str, path: str, data: bytes) -> list:
    from cryptography import x509

    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSSetupError(f"{_name(label, path)} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(f"{_name(label, path)} holds a damaged PEM certificate") \
            from None


def load_ca_certificates(path: str, label: str = "--ca") -> list:
    """The certificates of the PEM file C{path} (one or more); L{TLSSetupError} if none."""
    return _pem_certificates(label, path, _read(label, path))


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def certificate_names(certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is for (its subjectAltName)."""
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(n) for n in san.get_values_for_type(x509.IPAddress)])


def certificate_subject(certificate) -> str:
    return certificate.subject.rfc4514_string() or "an empty subject"


class ServerTLS:
    """
    The relay's certificate (with the chain after it) and its key, checked
    to belong together, and the L{CertificateOptions} that serve them: TLS
    1.3 only, so that the channel binding is unique to each connection.
    """

    def __init__(self, certificate, chain, key, cert_file: str, dh_file: str | None = None):
        from OpenSSL import crypto
        from twisted.internet.ssl import CertificateOptions, DiffieHellmanParameters
        from twisted.python.filepath import FilePath

        self.certificate = certificate
        self.chain = list(chain)
        self.cert_file = cert_file
        extra = {}
        if dh_file is not None:
            extra["dhParameters"] = DiffieHellmanParameters.fromFile(FilePath(dh_file))
        self.options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(certificate),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in self.chain],
            raiseMinimumTo=_min_version(),
            **extra,
        )
        self.options.getContext()  # any refusal by OpenSSL now, not at the first client

    @property
    def subject(self) -> str:
        return certificate_subject(self.certificate)

    @property
    def names(self) -> list[str]:
        return certificate_names(self.certificate)

    @property
    def not_after(self):
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self):
        return self.certificate.not_valid_before_utc

    def describe(self) -> str:
        names = ", ".join(self.names) or "no subjectAltName"
        return (f"{self.subject} ({names}), valid until {_when(self.not_after)}")


def load_server_tls(cert_file: str, key_file: str, chain_file: str | None = None,
                    dh_file: str | None = None, cert_label: str = "--tls-cert",
                    key_label: str = "--tls-key") -> ServerTLS:
    """
    Read and check the relay's certificate file (PEM: the certificate, then
    any intermediate CA certificates) and its unencrypted private key.
    L{TLSSetupError}, with a one-line reason naming the file, when a file
    cannot be read, holds no certificate or key, or the key is not the
    certificate's.
    """
    from cryptography.hazmat.primitives import serialization

    certificates = _pem_certificates(cert_label, cert_file, _read(cert_label, cert_file))
    if chain_file is not None:
        certificates += load_ca_certificates(chain_file, "extraCertChain=")
    data = _read(key_label, key_file)
    if b"PRIVATE KEY-----" not in data:
        raise TLSSetupError(f"{_name(key_label, key_file)} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(f"{_name(key_label, key_file)} is encrypted: the relay needs "
                            f"the key unencrypted (readable by it alone)") from None
    except (ValueError, serialization.UnsupportedAlgorithm) as e:
        reason = str(e).split(". See https://")[0]
        raise TLSSetupError(f"{_name(key_label, key_file)} holds no usable private key: "
                            f"{reason}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != \
            certificates[0].public_key().public_bytes(der, spki):
        raise TLSSetupError(f"{_name(key_label, key_file)} is not the key of the "
                            f"certificate in {_name(cert_label, cert_file)}")
    if dh_file is not None:
        _read("dhParameters=", dh_file)
    try:
        tls = ServerTLS(certificates[0], certificates[1:], key, cert_file, dh_file)
        try:
            # Group or others may read the relay's private key: worth a warning.
            tls.key_exposed = bool(os.stat(key_file).st_mode & 0o077)
        except OSError:
            tls.key_exposed = False
        tls.key_file = key_file
        return tls
    except Exception as e:  # pyOpenSSL's refusal of an odd key or certificate
        raise TLSSetupError(f"{_name(cert_label, cert_file)}: cannot serve it: {e}") \
            from None


# The arguments of Twisted's ssl: server endpoint that the relay takes over,
# and those of its tcp: endpoint that stay.
_SSL_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")
_TCP_SERVER_ARGS = ("port", "interface", "backlog")


def ssl_server_files(description: str) -> dict[str, str | None]:
    """
    The files named in an C{ssl:} server endpoint string, as Twisted reads
    them (C{privateKey} defaults to C{server.pem}, C{certKey} to the
    private key's file).  C{sslmethod} is refused: the relay always serves
    TLS 1.3, and nothing older.
    """
    positional, named = _split(description)
    unknown = sorted(set(named) - set(_SSL_FILES) - set(_TCP_SERVER_ARGS))
    if "sslmethod" in unknown:
        raise ValueError(f"sslmethod= is not supported: the relay serves {MINIMUM_TLS}, "
                         f"nothing older")
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]}=")
    key = named.get("privateKey", "server.pem")
    return {"key": key, "cert": named.get("certKey", key),
            "chain": named.get("extraCertChain"), "dh": named.get("dhParameters")}


def _tcp_listen_args(description: str) -> tuple[int, str, int]:
    """Port, interface and backlog of a tcp:, tcp6: or ssl: server endpoint string."""
    kind = _kind(description)
    positional, named = _split(description)
    extra = sorted(set(named) - set(_TCP_SERVER_ARGS) - (set(_SSL_FILES) if kind == "ssl"
                                                          else set()))
    if extra:
        raise ValueError(f"unknown argument {extra[0]}=")
    port = named.get("port", positional[0] if positional else None)
    if port is None:
        raise ValueError("no port number")
    if len(positional) > (0 if "port" in named else 1):
        raise ValueError(f"unexpected {positional[-1]!r}")
    interface = named.get("interface", "::" if kind == "tcp6" else "")
    return int(port), interface, int(named.get("backlog", 50))


TLS_PORT_KINDS = ("tcp", "tcp6")


def server_endpoint(reactor, description: str, tls: ServerTLS | None = None):
    """
    The relay's listening endpoint: C{description} as Twisted reads it, or
    with C{tls}, TLS on the TCP port that C{description} (C{tcp:},
    C{tcp6:} or C{ssl:}) names, served with C{tls.options}.
    """
    from twisted.internet import endpoints

    if tls is None:
        return endpoints.serverFromString(reactor, description)
    port, interface, backlog = _tcp_listen_args(description)
    return endpoints.SSL4ServerEndpoint(reactor, port, tls.options, backlog=backlog,
                                        interface=interface)


# Clients

_CLIENT_TLS_ARGS = ("host", "port", "timeout", "bindAddress", "trustRoots", "certificate",
                    "privateKey", "endpoint")

# OpenSSL's X509_V_ERR_* codes, grouped by what they mean to a person.
_UNKNOWN_CA = {2, 3, 18, 19, 20, 21, 27}
_EXPIRED = 10
_NOT_YET_VALID = 9
_VERIFY_ERRORS = {
    4: "its signature cannot be read",
    7: "its signature is wrong",
    8: "its CRL signature is wrong",
    13: "its 'not before' date is malformed",
    14: "its 'not after' date is malformed",
    22: "its chain is too long",
    23: "it was revoked",
    24: "it is signed by a certificate that is not a CA",
    25: "its chain is longer than a CA in it allows",
    26: "it is not for a TLS server",
    28: "a CA refuses it",
    32: "it is signed by a certificate not allowed to sign certificates",
}


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientCreator:
    """
    A client connection creator (L{IOpenSSLClientConnectionCreator}) like
    Twisted's C{optionsForClientTLS}: it requires a certificate chained to
    C{trust_root} and made out to C{hostname}, and speaks TLS 1.3 only (the
    channel binding is unique to a connection only there).
    It also remembers, in L{problem}, what was wrong with the certificate of
    the last connection it refused, in words.
    """

    def __init__(self, hostname: str, trust_root, trust: str, client_certificate=None):
        from twisted.internet.abstract import isIPAddress, isIPv6Address
        from twisted.internet.ssl import CertificateOptions

        self.hostname = hostname
        self.trust = trust
        self.is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        extra = {}
        if client_certificate is not None:
            extra = {"privateKey": client_certificate.privateKey.original,
                     "certificate": client_certificate.original}
        self.options = CertificateOptions(trustRoot=trust_root, raiseMinimumTo=_min_version(),
                                          **extra)
        self.problem: str | None = None

    def clientConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL

        self.problem = None
        connection = SSL.Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if not self.is_ip:
            connection.set_tlsext_host_name(_idna(self.hostname))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(self, connection, x509, error: int, depth: int, ok: int) -> bool:
        # An exception here would be lost inside OpenSSL: whatever happens,
        # answer, and say why when the answer is no.
        try:
            certificate = x509.to_cryptography()
            if not ok:
                self.problem = self._why(certificate, error, depth)
                return False
            if depth == 0:
                mismatch = self._mismatch(certificate)
                if mismatch is not None:
                    self.problem = mismatch
                    return False
            return True
        except Exception as e:
            self.problem = f"cannot check the relay's TLS certificate: {e}"
            return False

    def _why(self, certificate, error: int, depth: int) -> str:
        whose = ("the relay's TLS certificate" if depth == 0
                 else "a CA certificate in the relay's TLS chain")
        what = f"{whose} ({certificate_subject(certificate)})"
        if error in _UNKNOWN_CA:
            issuer = certificate.issuer.rfc4514_string() or "an empty name"
            return (f"{what}, issued by {issuer}, is not signed by {self.trust} "
                    f"(unknown CA)")
        if error == _EXPIRED:
            return f"{what} expired on {_when(certificate.not_valid_after_utc)} (expired)"
        if error == _NOT_YET_VALID:
            return (f"{what} is not valid before {_when(certificate.not_valid_before_utc)} "
                    f"(not yet valid; check the clocks)")
        reason = _VERIFY_ERRORS.get(error, f"OpenSSL verification error {error}")
        return f"{what} is refused: {reason}"

    def _mismatch(self, certificate) -> str | None:
        from service_identity import CertificateError, VerificationError
        from service_identity.cryptography import (
            verify_certificate_hostname,
            verify_certificate_ip_address,
        )

        try:
            if self.is_ip:
                verify_certificate_ip_address(certificate, self.hostname)
            else:
                verify_certificate_hostname(certificate, self.hostname)
        except (VerificationError, CertificateError):
            names = ", ".join(certificate_names(certificate)) or "no host name at all"
            return (f"the relay's TLS certificate is for {names}, not {self.hostname} "
                    f"(host name mismatch)")
        return None


def _idna(hostname: str) -> bytes:
    try:
        import idna
    except ImportError:  # pragma: no cover - service_identity brings it
        return hostname.encode("idna")
    return idna.encode(hostname)


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    A TLS client endpoint whose certificate check is L{VerifyingClientCreator}:
    after a refused connection, L{problem} says why in one line.
    """

    def __init__(self, reactor, wrapped, creator: VerifyingClientCreator) -> None:
        self.reactor = reactor
        self.wrapped = wrapped
        self.creator = creator

    def connect(self, factory):
        """As Twisted's C{wrapClientTLS}, with TLS's writes timed by our reactor."""
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls = TLSMemoryBIOFactory(self.creator, True, factory, clock=self.reactor)
        return self.wrapped.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)

    @property
    def problem(self) -> str | None:
        return self.creator.problem


def _trust_root(certificates):
    from cryptography.hazmat.primitives import serialization
    from twisted.internet import ssl

    return ssl.trustRootFromCertificates([
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
        for c in certificates
    ])


def _trust_roots_path(path: str) -> list:
    """Twisted's C{trustRoots=}: a directory of PEM files (or here, one PEM file)."""
    if not os.path.isdir(path):
        return load_ca_certificates(path, "trustRoots=")
    certificates = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            data = _read("trustRoots=", full)
            if b"-----BEGIN CERTIFICATE-----" in data:
                certificates += _pem_certificates("trustRoots=", full, data)
    if not certificates:
        raise TLSSetupError(f"trustRoots={path} holds no PEM certificate")
    return certificates


def client_endpoint(reactor, description: str, ca: str | None = None,
                    default_ca: str | None = None):
    """
    The endpoint a client connects through.  A C{tls:} description becomes
    a L{TLSClientEndpoint} trusting, in this order: the CAs in the PEM file
    C{ca} (C{--ca}), those of a C{trustRoots=} argument, those in
    C{default_ca} (the home's C{ca.pem}) if that file exists, else the
    system's trust store.  Any other description is Twisted's, and a C{ca}
    with it is an error: there is no certificate to check.

    L{TLSSetupError} for a CA file that cannot be used (or C{ca} without
    TLS); ValueError, KeyError or TypeError for a malformed description.
    """
    from twisted.internet import endpoints

    if _kind(description) != "tls":
        if ca is not None:
            raise TLSSetupError(f"--ca {ca} is for a TLS server (tls:HOST:PORT or "
                                f"tls://HOST:PORT), not {description}")
        return endpoints.clientFromString(reactor, description)
    if "://" in description:
        raise ValueError("a TLS server is tls://HOST:PORT")
    positional, named = _split(description)
    unknown = sorted(set(named) - set(_CLIENT_TLS_ARGS))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]}=")
    for index, name in enumerate(("host", "port")):
        if name not in named and len(positional) > index:
            named[name] = positional[index]
    if not named.get("host") or "port" not in named:
        raise ValueError("a TLS server needs a host and a port: tls:HOST:PORT")
    host, port = named["host"], int(named["port"])
    timeout = float(named.get("timeout", 30))
    roots = named.get("trustRoots")
    if ca is not None and roots is not None:
        raise TLSSetupError(f"--ca {ca} and trustRoots={roots}: give one of them")
    if ca is not None:
        trust, label = load_ca_certificates(ca), f"a CA in {ca}"
    elif roots is not None:
        trust, label = _trust_roots_path(roots), f"a CA in {roots}"
    elif default_ca is not None and os.path.exists(default_ca):
        trust, label = load_ca_certificates(default_ca, "CA file"), f"a CA in {default_ca}"
    else:
        trust, label = None, "a CA this system trusts"
    if trust is None:
        from twisted.internet.ssl import platformTrust

        trust_root = platformTrust()
    else:
        trust_root = _trust_root(trust)
    client_certificate = None
    if "certificate" in named or "privateKey" in named:
        from twisted.internet.ssl import PrivateCertificate

        cert_file = named.get("certificate") or named.get("privateKey")
        key_file = named.get("privateKey") or cert_file
        client_certificate = PrivateCertificate.loadPEM(
            _read("certificate=", cert_file) + b"\n" + _read("privateKey=", key_file))
    if "endpoint" in named:
        wrapped = endpoints.clientFromString(reactor, named["endpoint"])
    else:
        bind = named.get("bindAddress")
        wrapped = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout,
                                             bindAddress=(bind, 0) if bind else None)
    return TLSClientEndpoint(reactor, wrapped, VerifyingClientCreator(host, trust_root, label,
                                                             client_certificate))


def tls_refusal(endpoint, message: str) -> str | None:
    """
    Why a connection through C{endpoint} that ended with C{message} (the
    client protocol's one-line reason) failed in TLS, in one line; None when
    it did not fail in TLS.
    """
    problem = getattr(endpoint, "problem", None)
    if problem:
        return problem
    if isinstance(endpoint, TLSClientEndpoint) and message.startswith("TLS failed: "):
        detail = message[len("TLS failed: "):].split(" (check the relay's certificate")[0]
        if "protocol version" in detail or "unsupported protocol" in detail:
            return (f"the TLS handshake failed: {detail} (the relay must speak "
                    f"{MINIMUM_TLS}; this client speaks nothing older)")
        return (f"the TLS handshake failed: {detail} (does the relay serve TLS on that "
                f"port?)")
    return None
