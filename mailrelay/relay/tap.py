"""
C{twistd mailrelay}: options and the service tree of the relay.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import secrets
from pathlib import Path

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import error, task
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from mailrelay import wire
from mailrelay.encoding import valid_identity
from mailrelay.endpoints import (
    TLS_PORT_KINDS,
    TLSSetupError,
    check_port,
    load_server_tls,
    server_description,
    server_endpoint,
    ssl_server_files,
)
from mailrelay.files import write_durably
from mailrelay.relay.mailbox import DEFAULT_TTL, DEFAULT_WINDOW
from mailrelay.relay.protocol import (
    DEFAULT_BURST,
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_MAX_PER_PEER,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_RATE,
    RelayFactory,
)
from mailrelay.relay.store import STORE_FILE, Quota, StoreError, open_store
from mailrelay.relay.store.sqlite import preflight

log = Logger()


_KINDS = {int: "a whole number", float: "a number"}


def _positive(kind, option=None):
    def convert(value):
        what = f"{option} must" if option else "must"
        try:
            number = kind(value)
        except ValueError:
            if option is None:
                raise
            raise ValueError(f"{what} be {_KINDS[kind]}, not {value!r}") from None
        if not 0 < number < math.inf:
            raise ValueError(f"{what} be positive, not {value}")
        return number

    convert.coerceDoc = "Must be positive."
    return convert


def _non_negative(kind, option):
    def convert(value):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"{option} must be {_KINDS[kind]}, not {value!r}") from None
        if not 0 <= number < math.inf:
            raise ValueError(f"{option} must be 0 or more, not {value}")
        return number

    convert.coerceDoc = "Must be 0 or more."
    return convert


def _non_negative_int(value):
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a mailrelay relay: it stores sealed envelopes in per-recipient "
        "mailboxes and delivers them when the recipient connects."
    )
    optParameters = [
        ["port", "p", "tcp:9000",
         "Where to listen: a port number or a Twisted endpoint string "
         "(tcp:9000:interface=127.0.0.1). With --tls-cert and --tls-key, a port number "
         "or a tcp:/tcp6: string, served in TLS."],
        ["tls-cert", None, None,
         "Serve TLS (1.3 only) with this certificate: a PEM file, "
         "the relay's certificate first, then any intermediate CA certificates. "
         "Needs --tls-key."],
        ["tls-key", None, None,
         "The private key of --tls-cert: an unencrypted PEM file, readable by the "
         "relay alone."],
        ["ca", None, None,
         "CA mode: admit only identities with a certificate from this CA root (a PEM "
         "file from `mailrelay ca init`), valid now, for their id and key."],
        ["data", "d", "./var", "Directory of the SQLite store (created if missing)."],
        ["store", None, "sqlite", "Store engine: sqlite (durable) or memory (lost at exit)."],
        ["name", None, None,
         "This relay's id, bound into every client's authentication and pinned by "
         "clients (default: one made up at first start and kept in the data directory)."],
        ["max-envelope", None, wire.MAX_ENVELOPE, "Largest envelope accepted, in bytes.",
         _positive(int)],
        ["window", None, DEFAULT_WINDOW, "Unacknowledged deliveries per session.",
         _positive(int)],
        ["auth-timeout", None, 10.0, "Seconds a new connection has to authenticate.",
         _positive(float)],
        ["idle-timeout", None, 300.0,
         "Seconds without a byte received before a session is closed.", _positive(float)],
        ["quota-messages", None, 10_000,
         "Messages waiting per mailbox, the relay's notices included (0: no limit); "
         "further sends are refused MAILBOX_FULL.", _non_negative(int, "--quota-messages")],
        ["quota-bytes", None, 256 * 1024 * 1024,
         "Bytes waiting per mailbox: the envelopes and the relay's notices (0: no limit); "
         "further sends are refused MAILBOX_FULL.", _non_negative(int, "--quota-bytes")],
        ["quota-per-sender", None, 1_000,
         "Messages one sender may have waiting in one mailbox (0: no limit); further "
         "sends are refused SENDER_QUOTA.", _non_negative(int, "--quota-per-sender")],
        ["quota-per-sender-bytes", None, 64 * 1024 * 1024,
         "Envelope bytes one sender may have waiting in one mailbox (0: no limit); "
         "further sends are refused SENDER_QUOTA.",
         _non_negative(int, "--quota-per-sender-bytes")],
        ["max-per-peer", None, DEFAULT_MAX_PER_PEER,
         "Connections one address may hold open at once (0: no limit); further ones "
         "are answered BUSY and closed.", _non_negative_int],
        ["max-sessions", None, DEFAULT_MAX_SESSIONS,
         "Connections the relay holds open at once, from everyone (0: no limit); "
         "further ones are answered BUSY and closed.", _non_negative(int, "--max-sessions")],
        ["frame-timeout", None, DEFAULT_FRAME_TIMEOUT,
         "Seconds a frame has to arrive whole, counted from its first byte: bytes "
         "trickled in do not extend it (they do keep --idle-timeout from firing).",
         _positive(float, "--frame-timeout")],
        ["rate", None, DEFAULT_RATE,
         "Messages a second one identity may send, over all its sessions, once its "
         "--burst is spent (0: no limit); further sends are refused RATE_LIMITED.",
         _non_negative(float, "--rate")],
        ["burst", None, DEFAULT_BURST,
         "Messages one identity may send at once before --rate applies.",
         _positive(int, "--burst")],
        ["retry-window", None, 30.0,
         "Days a delivered message's id is remembered, so a late retry of it is "
         "recognised and not delivered again.", _positive(float)],
        ["ttl", None, DEFAULT_TTL / 86400,
         "Days a message waits for its recipient; then it is discarded and the recipient "
         "gets a notice naming its sender and id (0: keep messages for ever).",
         _non_negative(float, "--ttl")],
    ]

    def _loadCARoots(self) -> None:
        self["ca-roots"] = None
        if self["ca"] is None:
            return
        from mailrelay import ca

        try:
            with open(self["ca"], "rb") as f:
                self["ca-roots"] = ca.load_roots(f.read())
        except OSError as e:
            raise usage.UsageError(f"--ca {self['ca']}: {e.strerror or e}")
        except ca.CAError as e:
            raise usage.UsageError(f"--ca {self['ca']}: {e}")
        if not self["ca-roots"]:
            raise usage.UsageError(f"--ca {self['ca']}: holds no certificate")

    def postOptions(self) -> None:
        self._loadCARoots()
        self["port"] = server_description(self["port"])
        self["tls"] = self._tls()
        if self["store"] not in ("sqlite", "memory"):
            raise usage.UsageError(f"--store must be sqlite or memory, not {self['store']!r}")
        if self["name"] is not None:
            self["name"] = self["name"].lower()
            if not valid_identity(self["name"]):
                raise usage.UsageError(f"--name {self['name']!r} is not a valid id")
        if not 4096 <= self["max-envelope"] <= 64 * 1024 * 1024:
            raise usage.UsageError("--max-envelope must be between 4096 bytes and 64 MiB")
        if self["store"] == "sqlite":
            self["data"] = os.path.abspath(self["data"])
            try:
                os.makedirs(self["data"], mode=0o700, exist_ok=True)
            except OSError as e:
                raise usage.UsageError(f"--data {self['data']}: {e.strerror}")
            try:
                preflight(os.path.join(self["data"], STORE_FILE))
            except StoreError as e:
                raise usage.UsageError(f"--data {self['data']}: {e}")
            if self["name"] is None:
                try:
                    self["name"] = relay_id(self["data"])
                except (OSError, ValueError) as e:
                    raise usage.UsageError(f"--data {self['data']}: {e}")
        elif self["name"] is None:
            self["name"] = new_relay_id()
        try:
            from twisted.internet import reactor

            check_port(self["port"], server=True)
            server_endpoint(reactor, self["port"], self["tls"])
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise usage.UsageError(f"--port {self['port']!r} is not a valid endpoint: {e}")

    def _tls(self):
        """
        The certificate and key to serve TLS with, read and checked now: from
        --tls-cert and --tls-key, or from an ssl: --port.  None for plain TCP.
        """
        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key go together: give both or neither")
        kind = self["port"].split(":", 1)[0].lower()
        try:
            if kind == "ssl":
                if cert is not None:
                    raise usage.UsageError(
                        "--tls-cert and --tls-key take a TCP --port (a port number or "
                        f"tcp:...), not {self['port']!r}: give the files one way only")
                try:
                    files = ssl_server_files(self["port"])
                except ValueError as e:
                    raise usage.UsageError(
                        f"--port {self['port']!r} is not a valid endpoint: {e}") from None
                try:
                    return load_server_tls(files["cert"], files["key"], files["chain"],
                                           files["dh"], cert_label="certKey=",
                                           key_label="privateKey=")
                except TLSSetupError as e:
                    raise usage.UsageError(f"--port: {e}") from None
            if cert is None:
                return None
            if kind not in TLS_PORT_KINDS:
                raise usage.UsageError(
                    f"--tls-cert and --tls-key need a TCP --port (a port number or "
                    f"tcp:...), not {self['port']!r}")
            return load_server_tls(cert, key)
        except TLSSetupError as e:
            raise usage.UsageError(str(e)) from None


RELAY_ID_FILE = "relay-id"


def new_relay_id() -> str:
    return f"relay-{secrets.token_hex(6)}"


def relay_id(data: str) -> str:
    """
    This relay's id: made up at first start and kept in C{data}, so every
    relay has its own, which clients pin.  A relay that answered with
    another's id would then be noticed.
    """
    path = os.path.join(data, RELAY_ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            name = f.read().strip()
    except FileNotFoundError:
        name = new_relay_id()
        write_durably(Path(path), name.encode("ascii") + b"\n", 0o644)
        return name
    if not valid_identity(name):
        raise ValueError(f"{path} does not hold a valid relay id")
    return name


class Listener(service.Service):
    """
    Listens on an endpoint.  A port that cannot be bound raises SystemExit
    from C{privilegedStartService}, so twistd exits 1 with a one-line reason
    instead of running without a listener.
    """

    def __init__(self, endpoint, factory, description: str, tls=None) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.tls = tls
        self.port = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        outcome = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            failure = outcome[0]
            reason = failure.getErrorMessage()
            if failure.check(error.CannotListenError):
                cause = failure.value.socketError
                reason = getattr(cause, "strerror", None) or str(cause)
            raise SystemExit(f"mailrelay: cannot listen on {self.description}: {reason}")
        if outcome:
            self._listening(outcome[0])
        else:
            d.addCallbacks(self._listening, self._cannotListen)

    def _listening(self, port) -> None:
        self.port = port
        address = port.getHost()
        where = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        log.info("mailrelay listening on {where} as {name}", where=where,
                 name=self.factory.name)
        self._logTransport(address, where)

    def _logTransport(self, address, where: str) -> None:
        """Say whether this relay serves TLS, and warn when plain TCP leaves the host."""
        tls = self.tls
        if tls is not None:
            log.info("serving TLS 1.3 with the certificate "
                     "for {certificate}", certificate=tls.describe())
            if getattr(tls, "key_exposed", False):
                log.warn("WARNING: the TLS key {file} is readable by other users: "
                         "chmod 600 it", file=tls.key_file)
            now = datetime.datetime.now(datetime.timezone.utc)
            if now > tls.not_after:
                log.warn("WARNING: the TLS certificate {file} expired on {when}: clients "
                         "that check it refuse this relay", file=tls.cert_file,
                         when=tls.not_after.strftime("%Y-%m-%d %H:%M:%S UTC"))
            elif now < tls.not_before:
                log.warn("WARNING: the TLS certificate {file} is not valid before {when}: "
                         "clients that check it refuse this relay", file=tls.cert_file,
                         when=tls.not_before.strftime("%Y-%m-%d %H:%M:%S UTC"))
            return
        if beyond_this_host(address):
            log.warn(
                "WARNING: serving plain TCP, without TLS, on {where}, beyond this host: "
                "clients' messages stay end-to-end encrypted, but their authentication "
                "is not bound to a TLS channel and the metadata (who talks to whom, "
                "when, sizes) is visible on the network. Give --tls-cert and --tls-key, "
                "or listen on 127.0.0.1 behind a TLS proxy", where=where)
        else:
            log.info("serving plain TCP, without TLS")

    def _cannotListen(self, failure) -> None:
        log.failure("cannot listen on {description}", failure, description=self.description)

    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def beyond_this_host(address) -> bool:
    """Whether C{address}, where a listener listens, is a TCP address other than loopback."""
    host = getattr(address, "host", None)
    if getattr(address, "type", None) != "TCP" or not isinstance(host, str):
        return False
    try:
        return not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return True  # a host name: not known to be this host only


class RelayService(service.MultiService):
    """
    The relay: opens the store at start, closes it after the listener stops.
    Once the store is open it forgets, hourly, the ids of messages delivered
    more than C{retry_window} days ago, and every minute replaces messages
    older than C{ttl} days by notices to their recipients.
    """

    EXPIRE_EVERY = 60.0
    """Seconds between two expiry sweeps: a message outlives its TTL by at most this."""

    def __init__(self, factory: RelayFactory, reactor, retry_window: float = 30.0,
                 ttl: float = DEFAULT_TTL / 86400) -> None:
        super().__init__()
        self.factory = factory
        self.reactor = reactor
        self.retry_window = retry_window
        self.ttl = ttl
        self._forget: task.LoopingCall | None = None
        self._expire: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        d = self.factory.store.start()
        d.addCallbacks(self._opened, self._cannotOpen)

    def _opened(self, ignored) -> None:
        log.info("store open")
        self.factory.storeReady()
        if self.running and self._forget is None:
            # Not before now: the store's tables may not exist until it is open.
            self._forget = task.LoopingCall(self.forgetOldIds, self.retry_window)
            self._forget.clock = self.reactor
            self._forget.start(3600, now=True).addErrback(
                lambda f: log.failure("forgetting old message ids stopped", f))
        if self.running and self._expire is None and self.ttl:
            self._expire = task.LoopingCall(self.expireOldMessages)
            self._expire.clock = self.reactor
            self._expire.start(self.EXPIRE_EVERY, now=True).addErrback(
                lambda f: log.failure("expiring old messages stopped", f))

    def _cannotOpen(self, failure) -> None:
        log.critical("cannot open the store: {reason}; stopping", reason=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self):
        for name in ("_forget", "_expire"):
            loop = getattr(self, name)
            setattr(self, name, None)
            if loop is not None and loop.running:
                loop.stop()
        d = super().stopService()
        for session in list(self.factory.sessions):
            session.fatal(wire.ErrorCode.SHUTTING_DOWN, "the relay is shutting down")

        def close(result):
            return self.factory.store.stop().addCallback(lambda _: result)

        return d.addBoth(close)

    def forgetOldIds(self, retry_window_days: float) -> None:
        before = int(self.reactor.seconds() - retry_window_days * 86400)
        d = self.factory.store.forget_acknowledged(before)

        def done(count: int) -> None:
            if count:
                log.info("forgot {count} ids of messages delivered over {days:g} days ago",
                         count=count, days=retry_window_days)

        d.addCallbacks(done, lambda f: log.failure("forgetting old message ids failed", f))

    def expireOldMessages(self):
        """One sweep; a failure is logged and the next sweep tries again."""
        d = self.factory.mailboxes.expire(self.ttl * 86400)

        def done(count: int) -> None:
            if count:
                log.info("{count} messages expired after {days:g} days; their recipients "
                         "get notices", count=count, days=self.ttl)

        return d.addCallbacks(done, lambda f: log.failure("expiring old messages failed", f))

    def logTotals(self) -> None:
        m = self.factory.mailboxes
        if (m.accepted_total, m.delivered_total) != getattr(self, "_last", (0, 0)):
            self._last = (m.accepted_total, m.delivered_total)
            log.info(
                "totals: {accepted} messages accepted, {delivered} delivered, "
                "{sessions} sessions open",
                accepted=m.accepted_total, delivered=m.delivered_total,
                sessions=len(self.factory.sessions),
            )


def makeService(options: Options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    data = options["data"] if options["store"] == "sqlite" else None
    quota = Quota(options["quota-messages"], options["quota-bytes"],
                  options["quota-per-sender"], options["quota-per-sender-bytes"])
    store = open_store(options["store"], data, quota, reactor=reactor)
    factory = RelayFactory(
        store,
        reactor,
        name=options["name"],
        max_envelope=options["max-envelope"],
        window=options["window"],
        auth_timeout=options["auth-timeout"],
        idle_timeout=options["idle-timeout"],
        max_per_peer=options["max-per-peer"],
        max_sessions=options["max-sessions"],
        frame_timeout=options["frame-timeout"],
        rate=options["rate"],
        burst=options["burst"],
        ca_roots=options["ca-roots"],
        ttl=options["ttl"] * 86400,
    )
    top = RelayService(factory, reactor, retry_window=options["retry-window"],
                       ttl=options["ttl"])
    endpoint = server_endpoint(reactor, options["port"], options["tls"])
    Listener(endpoint, factory, options["port"], options["tls"]).setServiceParent(top)
    stats = TimerService(60, top.logTotals)
    stats.clock = reactor
    stats.setServiceParent(top)
    return top
