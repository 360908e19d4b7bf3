"""
C{twistd mailclient}: a headless client that stays connected to the relay,
reconnecting with backoff, and files every message it receives into a
Maildir before acknowledging it.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.logger import Logger
from twisted.python import usage

from mailrelay import keys
from mailrelay.client.contacts import ContactsError
from mailrelay.client.defaults import default_home, default_server
from mailrelay.client.maildir import Maildir
from mailrelay.client.protocol import ClientFactory
from mailrelay.client.inbox import InboxError, home_inbox
from mailrelay.client.outbox import OutboxError, home_outbox
from mailrelay.endpoints import (
    TLSSetupError,
    check_port,
    client_description,
    client_endpoint,
    tls_refusal,
)

log = Logger()


class Options(usage.Options):
    synopsis = "--maildir DIR [--home DIR] [--server ENDPOINT] [--ca FILE]"
    optParameters = [
        ["home", None, None, "The identity's home (default: $MAILRELAY_HOME, else ~/.mailrelay)."],
        ["server", None, None,
         "The relay: HOST:PORT, tls://HOST:PORT or a Twisted endpoint string such as "
         "tls:HOST:PORT (default: $MAILRELAY_SERVER, else tcp:localhost:9000)."],
        ["ca", None, None,
         "For a TLS server: the CA certificates (PEM) its certificate must be signed by "
         "(default: HOME/ca.pem if it exists, else the system's trusted CAs)."],
        ["maildir", None, None, "The Maildir to file messages into (created if missing)."],
        ["passphrase-file", None, None,
         "The passphrase of a protected private key, on the first line of this file "
         "(default: $MAILRELAY_PASSPHRASE_FILE)."],
    ]

    def _passphrase(self, home: keys.Home) -> bytes | None:
        """A daemon cannot prompt: the passphrase comes from a file, if the key has one."""
        path = self["passphrase-file"] or os.environ.get("MAILRELAY_PASSPHRASE_FILE")
        if not home.protected() or not path:
            return None
        try:
            return keys.read_passphrase_file(path)
        except OSError as e:
            raise usage.UsageError(f"--passphrase-file {path}: {e.strerror or e}")

    def postOptions(self) -> None:
        if not self["maildir"]:
            raise usage.UsageError("--maildir is required")
        self["home"] = self["home"] or default_home()
        self["server"] = client_description(self["server"] or default_server())
        home = keys.Home(self["home"])
        try:
            from twisted.internet import reactor

            check_port(self["server"])
            server_endpoint(reactor, self)
        except TLSSetupError as e:
            raise usage.UsageError(str(e))
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise usage.UsageError(f"--server {self['server']!r} is not a valid endpoint: {e}")
        try:
            self["identity"] = home.load(self._passphrase(home))
            self["certificate"] = home.certificate()
            self["identity-roots"] = home.identity_roots()
        except keys.IdentityError as e:
            raise usage.UsageError(str(e))
        try:
            Maildir(self["maildir"])  # created now, or refused now with the reason
        except OSError as e:
            raise usage.UsageError(f"--maildir {self['maildir']}: {e.strerror or e}")
        try:
            self["inbox"] = home_inbox(home)
            self["outbox"] = home_outbox(home)
            self["contacts"] = home.contacts
        except (InboxError, OutboxError, ContactsError) as e:
            raise usage.UsageError(str(e))


def server_endpoint(reactor, options):
    """The relay's endpoint; a TLS server is checked against --ca, HOME/ca.pem or the system."""
    return client_endpoint(reactor, options["server"], ca=options["ca"],
                           default_ca=str(keys.Home(options["home"]).path / "ca.pem"))


class Filer:
    """C{on_message}: file into the Maildir and log it."""

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir

    def __call__(self, opened) -> None:
        path = self.maildir.add(opened)
        log.info("filed message {id} from {sender} as {name}",
                 id=opened.message_id.hex(), sender=opened.sender, name=path.name)

    @staticmethod
    def notice(notice) -> None:
        log.warn("message {id} from {sender} {text}; it will not arrive",
                 id=notice.message_id.hex(), sender=notice.sender, text=notice.text)

    @staticmethod
    def gap(gap) -> None:
        log.warn("{gap}", gap=gap.describe())

    @staticmethod
    def key_rotated(name: str, outcome) -> None:
        log.warn("{notice}", notice=outcome.notice(name))

    @staticmethod
    def quarantined(quarantined) -> None:
        log.warn("{what}", what=quarantined.describe())

    @staticmethod
    def rejected(rejected) -> None:
        log.warn("dropped message {id} from {sender}: {reason}",
                 id=rejected.message_id.hex(), sender=rejected.sender,
                 reason=rejected.reason)


class MailclientFactory(ClientFactory):
    """Builds the client's protocol for each connection and logs how each session went."""

    def __init__(self, server: str, outbox=None, endpoint=None, **settings) -> None:
        super().__init__(**settings)
        self.server = server
        self.outbox = outbox
        self.endpoint = endpoint

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        name = self.settings["identity"].name
        protocol.ready.addCallbacks(self._ready, self._notReady, callbackArgs=(name,))
        return protocol

    def _notReady(self, failure) -> None:
        refusal = tls_refusal(self.endpoint, failure.getErrorMessage())
        if refusal is not None:
            log.warn("refusing the relay at {server}: {reason}", server=self.server,
                     reason=refusal)
            return
        log.warn("session with {server} ended before it began: {reason}",
                 server=self.server, reason=failure.getErrorMessage())

    def _ready(self, protocol, name: str) -> None:
        log.info("connected to {server} as {identity}; messages waiting: {queued}",
                 server=self.server, identity=name, queued=protocol.queued)
        if self.outbox is not None and self.outbox.pending():
            # Whatever `mailrelay send --queue` left behind goes now.
            self.outbox.flush(protocol).addCallbacks(self._flushed, lambda f: log.failure(
                "sending the outbox failed", f))

    @staticmethod
    def _flushed(result) -> None:
        for entry in result.accepted:
            log.info("sent queued message {id} to {recipient}",
                     id=entry.message_id.hex(), recipient=entry.recipient)
        for entry, why in result.refused:
            log.warn("the relay refused queued message {id} to {recipient}: {why}",
                     id=entry.message_id.hex(), recipient=entry.recipient, why=why)
        if result.held:
            log.info("{count} message(s) still queued: {why}",
                     count=len(result.held), why=result.held[-1][1])


def makeService(options: Options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    home = keys.Home(options["home"])
    filer = Filer(Maildir(options["maildir"]))
    endpoint = server_endpoint(reactor, options)
    factory = MailclientFactory(
        options["server"],
        endpoint=endpoint,
        identity=options["identity"],
        contacts=options["contacts"],
        on_message=filer,
        on_rejected=filer.rejected,
        on_notice=filer.notice,
        on_gap=filer.gap,
        on_key_rotated=filer.key_rotated,
        on_quarantined=filer.quarantined,
        inbox=options["inbox"],
        outbox=options["outbox"],
        durable_handler=True,
        certificate=options["certificate"],
        identity_roots=options["identity-roots"],
        clock=reactor,
        relay_check=lambda relay: home.pin_relay(options["server"], relay),
    )
    top = service.MultiService()
    # ClientService reconnects whenever the connection ends, with backoff.
    client = ClientService(endpoint, factory, retryPolicy=backoffPolicy(maxDelay=60),
                           clock=reactor)
    client.setServiceParent(top)
    return top
