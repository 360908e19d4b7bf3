"""
The C{mailrelay} command: identities, sending, receiving and chat.

Every subcommand takes C{--home DIR} (default C{$MAILRELAY_HOME}, else
C{~/.mailrelay}) and C{--server ENDPOINT} (default C{$MAILRELAY_SERVER},
else C{tcp:localhost:9000}; C{HOST:PORT} works too).  Exit status: 0 on
success, 1 when the command failed (the reason is on standard error), 2 for
a usage mistake.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from twisted.internet import defer, endpoints, error, task
from twisted.internet.defer import inlineCallbacks

from mailrelay import __version__, ca, ca_cli, envelope, keys, wire
from mailrelay.client.defaults import DEFAULT_SERVER
from mailrelay.client.defaults import default_home as _default_home
from mailrelay.client.defaults import default_server as _default_server
from mailrelay.client.protocol import (
    Disconnected,
    LocalFailure,
    NotNow,
    Rejected,
    RelayError,
    UntrustedRelay,
    connect,
)
from mailrelay.client.contacts import ContactsError
from mailrelay.client.display import for_terminal
from mailrelay.client.inbox import Gap, InboxError, home_inbox
from mailrelay.client.outbox import OutboxError, home_outbox, queue_message
from mailrelay.endpoints import (
    TLSSetupError,
    check_port,
    client_description,
    client_endpoint,
    load_ca_certificates,
    tls_refusal,
)

class Failed(Exception):
    """A command failed for a reason the user can act on."""


class Unreachable(Failed):
    """The relay could not be reached or did not answer: worth trying again later."""


def _positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1 (else a usage error, exit 2)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value!r}")
    return number


def _positive_float(value: str) -> float:
    """An argparse type: a positive, finite number (else a usage error, exit 2)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value!r}")
    return number


def _ca_file(value: str) -> str:
    """An argparse type: a readable PEM file of one or more CA certificates."""
    try:
        load_ca_certificates(value)
    except TLSSetupError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--ca ")) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=None, metavar="DIR",
                        help="where the identity and pinned contacts live "
                             "(default: $MAILRELAY_HOME, else ~/.mailrelay)")
    common.add_argument("--server", default=None, metavar="ENDPOINT",
                        help="the relay: HOST:PORT, tls://HOST:PORT or a Twisted endpoint "
                             "string such as tls:HOST:PORT "
                             f"(default: $MAILRELAY_SERVER, else {DEFAULT_SERVER})")
    # Absent unless given (argparse.SUPPRESS): read with getattr(args, "ca", None).
    common.add_argument("--ca", type=_ca_file, default=argparse.SUPPRESS, metavar="FILE",
                        help="for a TLS server: the CA certificates (PEM) its certificate "
                             "must be signed by (default: HOME/ca.pem if it exists, else "
                             "the system's trusted CAs)")
    common.add_argument("--connect-timeout", type=_positive_float, default=10.0,
                        metavar="SECONDS",
                        help="give up connecting to the relay after this long (default 10)")
    common.add_argument("--passphrase-file", default=None, metavar="FILE",
                        help="the passphrase of a protected private key, on the first line "
                             "of FILE (default: $MAILRELAY_PASSPHRASE_FILE, else a prompt "
                             "on the terminal)")

    parser = argparse.ArgumentParser(
        prog="mailrelay",
        description="Send and receive end-to-end encrypted messages through a mailrelay relay.",
    )
    parser.add_argument("--version", action="version", version=f"mailrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create an identity (an RSA-3072 key pair)")
    p.add_argument("id", metavar="ID", help="the identity to create, e.g. alice or 123")
    p.add_argument("--offline", action="store_true",
                   help="do not try to publish the public key to the relay")
    p.add_argument("--ask-passphrase", action="store_true",
                   help="protect the private key with a passphrase typed at the prompt "
                        "(or give it with --passphrase-file)")

    p = sub.add_parser("rotate", parents=[common],
                       help="replace your key by a new one, signed over by the old one")
    p.add_argument("--certificate", metavar="FILE",
                   help="for a relay in CA mode: the CA's certificate for the new key (a "
                        "first `rotate` stages the key; `mailrelay ca request --next` "
                        "asks the CA for it)")

    p = sub.add_parser("trust", parents=[common],
                       help="accept a contact's new key, checked by its fingerprint")
    p.add_argument("id", metavar="ID", help="the contact")
    p.add_argument("--fingerprint", required=True, metavar="FP",
                   help="the fingerprint the contact told you, through another channel")

    p = sub.add_parser("fingerprint", parents=[common],
                       help="show your key's fingerprint, or a contact's")
    p.add_argument("id", metavar="ID", nargs="?", help="a contact (default: yourself)")

    p = sub.add_parser("verify", parents=[common],
                       help="mark a contact as verified, once you compared the safety number")
    p.add_argument("id", metavar="ID", help="the contact")
    p.add_argument("--safety-number", metavar="DIGITS",
                   help="the safety number the contact read to you (60 digits, spaces "
                        "allowed); without it, you are asked on the terminal")

    p = sub.add_parser("send", parents=[common], help="send one message")
    p.add_argument("--to", required=True, metavar="ID", help="the recipient")
    p.add_argument("--queue", action="store_true",
                   help="if the relay cannot take it now, leaving the message queued in "
                        "the outbox is success (exit 0)")
    p.add_argument("text", nargs="*", metavar="TEXT",
                   help="the message (default: read standard input)")

    sub.add_parser("flush", parents=[common], help="send the messages waiting in the outbox")

    p = sub.add_parser("outbox", parents=[common],
                       help="list the messages waiting in the outbox, and those refused")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--clear-failed", action="store_true",
                   help="forget the messages the relay refused for good")

    p = sub.add_parser("inbox", parents=[common], help="list the messages received so far")
    p.add_argument("--from", dest="sender", metavar="ID", help="only those from ID")
    p.add_argument("--last", type=_positive_int, metavar="N", help="only the last N")
    p.add_argument("--json", action="store_true", help="one JSON object per message")

    p = sub.add_parser("recv", parents=[common], help="print messages as they arrive")
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                   help="stop after this long (an error if --count messages did not arrive)")
    p.add_argument("--json", action="store_true", help="one JSON object per message")

    sub.add_parser("chat", parents=[common], help="interactive: send and receive")
    ca_cli.add_parsers(sub, common, _positive_int)
    return parser


def _endpoint(reactor, args):
    """
    The relay's endpoint.  A TLS server's certificate is checked against
    --ca, else the home's ca.pem if there is one, else the system's CAs.
    """
    server = args.server or _default_server()
    description = client_description(server)
    try:
        check_port(description)
    except ValueError as e:
        raise Failed(f"--server {server}: {e}") from None
    try:
        return client_endpoint(reactor, description, ca=getattr(args, "ca", None),
                               default_ca=str(_home(args).path / "ca.pem"))
    except TLSSetupError as e:
        raise Failed(str(e)) from None
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise Failed(f"--server {description!r} is not a valid endpoint: {e}") from None


def check_tls_options(parser: argparse.ArgumentParser, args) -> None:
    """A usage error (exit 2): --ca for a server that is not TLS, where it cannot apply."""
    ca = getattr(args, "ca", None)
    if ca is None:
        return
    server = args.server or _default_server()
    if client_description(server).split(":", 1)[0].lower() != "tls":
        parser.error(f"--ca applies to a TLS server (--server tls:HOST:PORT or "
                     f"tls://HOST:PORT), not {server}")


def _home(args) -> keys.Home:
    return keys.Home(args.home or _default_home())


def _read_passphrase(args, prompt: str, confirm: bool = False) -> bytes | None:
    """
    The passphrase from --passphrase-file or $MAILRELAY_PASSPHRASE_FILE (its
    first line), else typed at the terminal; None when there is neither.
    """
    path = getattr(args, "passphrase_file", None) or os.environ.get("MAILRELAY_PASSPHRASE_FILE")
    if path:
        try:
            return keys.read_passphrase_file(path)
        except OSError as e:
            raise Failed(f"cannot read the passphrase file {path}: {e.strerror or e}") from None
    if not sys.stdin.isatty():
        return None
    import getpass

    typed = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != typed:
        raise Failed("the two passphrases differ; nothing was created")
    return typed.encode("utf-8")


def _identity(args, home: keys.Home | None = None) -> keys.Identity:
    """This home's identity, its key opened with the passphrase if it has one."""
    home = home or _home(args)
    if not home.protected():
        return home.load()
    passphrase = _read_passphrase(args, f"Passphrase for {home.private_key_file}: ")
    return home.load(passphrase)


@inlineCallbacks
def _connect(reactor, args, home: keys.Home, identity: keys.Identity, certificate=None,
             **kwargs):
    server = args.server or _default_server()
    pin_as = client_description(server)
    endpoint = _endpoint(reactor, args)
    try:
        kwargs.setdefault("on_key_rotated", _show_rotation)
        kwargs.setdefault("on_quarantined", _show_quarantined)
        client = yield connect(
            reactor, endpoint, identity, contacts=home.contacts,
            timeout=args.connect_timeout,
            relay_check=lambda relay: home.pin_relay(pin_as, relay),
            certificate=home.certificate() if certificate is None else certificate,
            identity_roots=home.identity_roots(), **kwargs,
        )
    except error.ConnectionRefusedError:
        raise Unreachable(f"cannot reach the relay at {server}: connection refused "
                     f"(is `twistd mailrelay` running there?)") from None
    except (error.DNSLookupError, error.ConnectError) as e:
        raise Unreachable(f"cannot reach the relay at {server}: {e}") from None
    except defer.TimeoutError:
        raise Unreachable(f"the relay at {server} did not answer within "
                          f"{args.connect_timeout} seconds") from None
    except Disconnected as e:
        refusal = tls_refusal(endpoint, str(e))
        if refusal is not None:
            # Not a passing state: nothing goes to a relay whose TLS cannot be trusted.
            raise Failed(f"refusing the relay at {server}: {refusal}") from None
        raise Unreachable(f"cannot talk to the relay at {server}: {e}") from None
    except UntrustedRelay as e:
        raise Failed(f"refusing the relay at {server}: {e}") from None
    except keys.RelayMismatch as e:
        raise Failed(str(e)) from None
    except RelayError as e:
        if e.code == e.code.KEY_CONFLICT:
            hint = (" A key rotation was interrupted: run `mailrelay rotate` to finish it."
                    if home.next_key_file.exists() else "")
            raise Failed(f"the relay at {server} refused us: {e.text}. Another key is "
                         f"registered there for {identity.name!r}.{hint}") from None
        if e.code in (e.code.BUSY, e.code.SHUTTING_DOWN, e.code.INTERNAL_ERROR):
            # Passing states of the relay: worth trying again later.
            raise Unreachable(f"the relay at {server} cannot take us now: {e.text}") from None
        raise Failed(f"the relay at {server} refused us: {e.text}") from None
    return client


def _show_rotation(name: str, outcome) -> None:
    _err(f"mailrelay: {outcome.notice(name)}")


def _show_quarantined(quarantined) -> None:
    _err(f"mailrelay: {quarantined.describe()}")


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _err(line: str) -> None:
    # Errors quote what the relay said (its error texts) and what it sent:
    # shown escaped, like messages, so they cannot rewrite the screen.
    sys.stderr.write(for_terminal(line) + "\n")
    sys.stderr.flush()


@inlineCallbacks
def cmd_init(reactor, args):
    home = _home(args)
    name = keys.check_identity(args.id)
    passphrase = None
    if (args.ask_passphrase or args.passphrase_file
            or os.environ.get("MAILRELAY_PASSPHRASE_FILE")):
        passphrase = _read_passphrase(args, f"Passphrase for {name}'s private key: ",
                                      confirm=True)
        if passphrase is None:
            raise Failed("--ask-passphrase needs a terminal to type it on, or "
                         "--passphrase-file FILE")
    identity = home.create(name, passphrase=passphrase)
    _out(f"Created identity {identity.name} in {home.path}")
    _out(f"Fingerprint: {keys.format_fingerprint(identity.fingerprint)}")
    _out(f"Private key: {home.private_key_file} (keep it secret"
         f"{'; protected by your passphrase' if passphrase else ''})")
    _out(f"Public key:  {home.public_key_file}")
    if args.offline:
        return 0
    try:
        client = yield _connect(reactor, args, home, identity)
    except Failed as e:
        _out(f"Not published: {e}.")
        _out("The key is published the first time this identity connects.")
        return 0
    yield client.close()
    server = args.server or _default_server()
    if client.registered:
        _out(f"Published to the relay at {server}.")
    else:
        _out(f"Already registered with the relay at {server}.")
    return 0


@inlineCallbacks
def cmd_fingerprint(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    if args.id is None or args.id == identity.name:
        _out(f"{identity.name}: {keys.format_fingerprint(identity.fingerprint)}")
        return 0
    name = keys.check_identity(args.id)
    contacts = home.contacts
    pinned = contacts.pinned(name)
    if pinned is not None:
        key, how = pinned, ""
    else:
        client = yield _connect(reactor, args, home, identity)
        try:
            key = yield client.contact_key(name)
        finally:
            yield client.close()
        how = "  (fetched from the relay and pinned)"
    verified = contacts.is_verified(name)
    _out(f"{name}: {keys.key_fingerprint(key)}{how}")
    _out(f"Verified: {'yes' if verified else 'no'}")
    retired = [k for k in contacts.history(name) if k.retired_at is not None]
    if retired:
        _out(f"Earlier keys of {name} trusted here: "
             + ", ".join(keys.format_fingerprint(k.fingerprint)[:19] + "..." for k in retired))
    _out(f"Safety number with {identity.name}: "
         f"{keys.safety_number(identity.name, identity.public_key, name, key)}")
    _out(f"(the same on {name}'s side: compare it in person or by phone"
         + ("" if verified else f", then `mailrelay verify {name}`") + ")")
    return 0


def cmd_verify(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    name = keys.check_identity(args.id)
    contacts = home.contacts
    key = contacts.pinned(name)
    if key is None:
        raise Failed(f"no key of {name!r} is trusted here yet: `mailrelay fingerprint {name}` "
                     f"fetches it first")
    number = keys.safety_number(identity.name, identity.public_key, name, key)
    if args.safety_number is not None:
        given = "".join(c for c in args.safety_number if not c.isspace())
        if given != number.replace(" ", ""):
            raise Failed(f"that is not the safety number of {identity.name} and {name} "
                         f"({number}): {name} is NOT verified. Someone may be impersonating "
                         f"{name}, or the number was misread")
    elif sys.stdin.isatty():
        _out(f"Safety number with {name}: {number}")
        answer = input(f"Does {name} read the same number to you? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise Failed(f"{name} is not verified")
    else:
        raise Failed("give the number the contact read to you with --safety-number, or run "
                     "this on a terminal to be asked")
    contacts.verify(name, der=keys.public_der(key))
    _out(f"{name} is verified: {keys.key_fingerprint(key)}. If their key ever changes, you "
         f"are told, and {name} is no longer verified.")
    return 0


@inlineCallbacks
def cmd_trust(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    name = keys.check_identity(args.id)
    expected = keys.parse_fingerprint(args.fingerprint)
    client = yield _connect(reactor, args, home, identity)
    try:
        der = yield client.lookup(name)
        certificate = client.certificate_of(name)
        roots = home.identity_roots()
        if roots is not None:
            # A CA's word comes first: its certificate must vouch for the key.
            try:
                ca.verify_identity(certificate, roots, name, der)
            except ca.CAError as e:
                raise Failed(f"the relay's key for {name!r} has no valid certificate from "
                             f"your CA ({e}); not trusting it") from None
    except RelayError as e:
        raise Failed(f"the relay has no key for {name!r}: {e.text}") from None
    finally:
        yield client.close()
    replaced = home.contacts.trust(name, der, expected, client.rotations_of(name), certificate)
    if replaced is None:
        _out(f"Pinned the key of {name}: {keys.format_fingerprint(expected)}")
    elif keys.public_der(replaced) == der:
        _out(f"The key of {name} was already this one: {keys.format_fingerprint(expected)}")
    else:
        _out(f"Now trusting the new key of {name}: {keys.format_fingerprint(expected)}")
        _out(f"(it replaces {keys.key_fingerprint(replaced)}, kept in the history)")
    _out(f"{name} is verified: you checked the fingerprint with them.")
    return 0


@inlineCallbacks
def cmd_rotate(reactor, args):
    import time

    home = _home(args)
    passphrase = None
    if home.protected():
        passphrase = _read_passphrase(args, f"Passphrase for {home.private_key_file}: ")
    identity = home.load(passphrase)
    certificate = b""
    if args.certificate:
        try:
            with open(args.certificate, "rb") as f:
                certificate = ca.certificate_der(f.read())
        except OSError as e:
            raise Failed(f"cannot read {args.certificate}: {e.strerror or e}") from None
    if home.next_key_file.exists():
        # A rotation was staged and perhaps never finished: go on with that key,
        # and if the relay already has it, only the files here are left to do.
        new = keys.Identity(identity.name, home._load_next(passphrase))
        try:
            probe = yield _connect(reactor, args, home, new,
                                   certificate=certificate if args.certificate else None)
        except Failed:
            pass
        else:
            yield probe.close()
            kept = home.finish_rotation(identity, new)
            _install_certificate(home, certificate)
            _out(f"Finished the key rotation the relay had already taken: "
                 f"{keys.format_fingerprint(new.fingerprint)} (old key in {kept})")
            return 0
    else:
        new = keys.Identity.generate(identity.name)
        home.stage_rotation(new, passphrase)
    client = yield _connect(reactor, args, home, identity)
    try:
        answer = yield client.rotate(new, int(time.time()), certificate)
    except RelayError as e:
        raise Failed(f"the relay refused the new key: {e.text}") from None
    finally:
        yield client.close()
    if answer.public_key != new.public_der:
        raise Failed("the relay answered with another key; nothing was changed here")
    kept = home.finish_rotation(identity, new)
    _install_certificate(home, certificate)
    _out(f"New key for {identity.name}: {keys.format_fingerprint(new.fingerprint)}")
    _out(f"The old key is kept in {kept}, to open messages sealed for it.")
    _out("Contacts who trust the old key follow to the new one (the rotation is signed by "
         "both), with a notice; a contact who had verified you is told to verify again.")
    return 0


def _install_certificate(home: keys.Home, certificate: bytes) -> None:
    """After a rotation in CA mode, the new key's certificate is the one to present."""
    if certificate:
        from mailrelay.files import write_durably

        write_durably(home.path / keys.CERTIFICATE_FILE, ca.certificate_pem(certificate),
                      0o644)


def cmd_ca(reactor, args):
    return ca_cli.run(
        args, _home,
        lambda a, need_key=True: _identity(a) if need_key else _home(a).load_name(),
        _out, _read_passphrase,
    )


@inlineCallbacks
def cmd_send(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    recipient = keys.check_identity(args.to)
    if args.text:
        data = " ".join(args.text).encode("utf-8")
    else:
        data = sys.stdin.buffer.read()
        # `echo hi | mailrelay send` means "hi": drop the one line end the shell added.
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
    outbox = home_outbox(home)
    try:
        client = yield _connect(reactor, args, home, identity)
    except Unreachable as e:
        # Sealed with the pinned key and queued: the next flush sends it.
        try:
            entry = yield queue_message(outbox, identity, recipient, data, contacts=home)
        except keys.IdentityError as why:
            raise Failed(f"{e}; {why}") from None
        return _queued(args, entry.message_id, recipient, str(e))
    try:
        entry = yield queue_message(outbox, identity, recipient, data, client=client)
    except (Disconnected, RelayError) as e:
        yield client.close()
        if isinstance(e, RelayError) and (not e.code.fatal or e.code == e.code.KEY_CONFLICT):
            raise  # about this recipient (unknown, say): not a passing state of the relay
        # The relay went away while we asked for the key: seal with the pinned one.
        try:
            entry = yield queue_message(outbox, identity, recipient, data, contacts=home)
        except keys.IdentityError as why:
            raise Failed(f"{e}; {why}") from None
        return _queued(args, entry.message_id, recipient, str(e))
    except BaseException:
        yield client.close()
        raise
    # A lost answer is retried with the very same envelope, from the outbox,
    # which the relay recognises: the message is stored, and shown, once.  A
    # reconnection that fails counts as an attempt too (the relay may be
    # restarting).
    attempt = 1
    while True:
        reason = None
        if client is None:
            try:
                client = yield _connect(reactor, args, home, identity)
            except Unreachable as e:
                reason = str(e)
        if client is not None:
            result = yield _flush(reactor, outbox, client)
            yield client.close()
            client = None
            _report_others(result, entry.message_id)
            if outbox.sent(entry.message_id):
                _say_accepted(entry)
                return 0
            for refused, why in result.refused:
                if refused.message_id == entry.message_id:
                    raise Failed(f"the relay refused message {entry.message_id.hex()}: {why}")
            reason = next((why for held, why in result.held
                           if held.message_id == entry.message_id), "no answer")
            if entry.message_id in result.deferred_by_relay:
                # A full mailbox or a rate limit does not pass in seconds.
                return _queued(args, entry.message_id, recipient, reason)
        if attempt == SEND_ATTEMPTS:
            return _queued(args, entry.message_id, recipient, reason)
        delay = 2 ** (attempt - 1)
        _err(f"mailrelay send: not accepted yet ({reason}); trying again in {delay} s")
        attempt += 1
        yield task.deferLater(reactor, delay, lambda: None)


def _queued(args, message_id: bytes, recipient: str, reason: str) -> int:
    text = (f"message {message_id.hex()} for {recipient} is queued in the outbox: {reason}. "
            f"`mailrelay flush` (or any later recv or chat) sends it")
    if args.queue:
        _out(text[0].upper() + text[1:] + ".")
        return 0
    raise Failed(text)


SEND_ATTEMPTS = 3
ANSWER_TIMEOUT = 30.0
"""Seconds a flush waits for the relay's answers before it gives up on the connection."""


@inlineCallbacks
def _flush(reactor, outbox, client, accepted=None):
    """
    Flush C{outbox} through C{client}, cutting the connection if answers
    stop coming; C{accepted} is called with each entry the relay accepts.
    """
    timer = reactor.callLater(ANSWER_TIMEOUT, client.transport.abortConnection)
    try:
        result = yield outbox.flush(client, accepted)
    finally:
        timed_out = not timer.active()
        if not timed_out:
            timer.cancel()
    if timed_out:
        silent = f"no answer within {ANSWER_TIMEOUT:g} seconds"
        result.held = [(e, why if e.message_id in result.deferred_by_relay else silent)
                       for e, why in result.held]
    return result


def _say_accepted(entry) -> None:
    _out(f"Message {entry.message_id.hex()} accepted by the relay for {entry.recipient}.")


def _report_others(result, own: bytes | None = None, accepted: bool = True) -> None:
    """Say on standard error what happened to queued messages other than C{own}."""
    others = [e for e in result.accepted if e.message_id != own]
    if others and accepted:
        _err(f"mailrelay: also sent {len(others)} message(s) that were waiting in the outbox")
    for entry, why in result.refused:
        if entry.message_id != own:
            _err(f"mailrelay: the relay refused message {entry.message_id.hex()} for "
                 f"{entry.recipient}: {why} (moved to the failed list of `mailrelay outbox`)")
    waiting = [e for e, _ in result.held if e.message_id != own]
    if waiting:
        _err(f"mailrelay: {len(waiting)} message(s) still wait in the outbox "
             f"({result.held[-1][1]})")


@inlineCallbacks
def cmd_flush(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    outbox = home_outbox(home)
    waiting = len(outbox.pending())
    if not waiting:
        _out("The outbox is empty.")
        return 0
    try:
        client = yield _connect(reactor, args, home, identity)
    except Failed as e:
        raise Failed(f"{e}; {waiting} message(s) still queued") from None
    try:
        # Each is reported as it is accepted: a flush cut short (by a lost
        # connection or a kill) has said which ones the relay holds.
        result = yield _flush(reactor, outbox, client, _say_accepted)
    finally:
        yield client.close()
    for entry, why in result.refused:
        _err(f"mailrelay flush: the relay refused message {entry.message_id.hex()} for "
             f"{entry.recipient}: {why}")
    for entry, why in result.held:
        _err(f"mailrelay flush: message {entry.message_id.hex()} for {entry.recipient} "
             f"is still queued: {why}")
    return 0 if not result.refused and not result.held else 1


def _when(timestamp: int) -> str:
    import time as _time

    try:
        return _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(timestamp))
    except (OverflowError, ValueError, OSError):
        return str(timestamp)


def cmd_outbox(reactor, args):
    home = _home(args)
    home.load_name()  # a mistyped --home is an error, not a new empty outbox
    outbox = home_outbox(home)
    if args.clear_failed:
        count = outbox.clear_failed()
        _out(f"Forgot {count} refused message(s).")
        return 0
    pending, failed = outbox.pending(), outbox.failed()
    for q in pending:
        if args.json:
            _out(json.dumps({"id": q.message_id.hex(), "to": q.recipient, "seq": q.seq,
                             "state": "queued", "queued_at": q.queued_at,
                             "attempts": q.attempts, "last_error": q.last_error}))
        else:
            line = (f"{q.message_id.hex()}  to {q.recipient}  #{q.seq}  "
                    f"queued {_when(q.queued_at)}  attempts {q.attempts}")
            if q.last_error:
                line += f"  last error: {q.last_error}"
            _out(line)
    for f in failed:
        if args.json:
            _out(json.dumps({"id": f.message_id.hex(), "to": f.recipient, "seq": f.seq,
                             "state": "refused", "queued_at": f.queued_at,
                             "failed_at": f.failed_at, "reason": f.reason}))
        else:
            _out(f"{f.message_id.hex()}  to {f.recipient}  #{f.seq}  REFUSED "
                 f"{_when(f.failed_at)}: {f.reason}")
    if not args.json and not pending and not failed:
        _out("The outbox is empty.")
    return 0


def cmd_inbox(reactor, args):
    home = _home(args)
    home.load_name()  # a mistyped --home is an error, not a new empty inbox
    inbox = home_inbox(home)
    sender = keys.check_identity(args.sender) if args.sender else None
    for m in inbox.messages(sender, args.last):
        text = None if m.body is None else m.body.decode("utf-8", "replace")
        if args.json:
            _out(json.dumps({"type": "message", "id": m.message_id.hex(), "from": m.sender,
                             "seq": m.seq, "sent_at": m.sent_at,
                             "received_at": m.received_at, "text": text},
                            ensure_ascii=False))
        else:
            shown = "(text not kept)" if text is None else for_terminal(text)
            _out(f"{_when(m.received_at)}  from {m.sender}: {shown}")
    for n in inbox.notices():
        if sender is not None and n.sender != sender:
            continue
        if args.json:
            _out(json.dumps(_notice_json(n), ensure_ascii=False))
        else:
            _out(for_terminal(_notice_line(n)))
    for q in inbox.quarantined():
        if sender is not None and q.sender != sender:
            continue
        if args.json:
            _out(json.dumps({"type": "quarantined", "id": q.message_id.hex(),
                             "claimed_from": q.sender, "reason": q.reason,
                             "attempts": q.attempts, "quarantined_at": q.quarantined_at,
                             "envelope_bytes": len(q.envelope)}, ensure_ascii=False))
        else:
            who = f"claimed from {q.sender}" if q.sender else "sender unreadable"
            _out(f"{_when(q.quarantined_at)}  QUARANTINED {q.message_id.hex()} ({who}, not "
                 f"verified): could not be kept in {q.attempts} attempts: "
                 f"{for_terminal(q.reason)}")
    return 0


def _notice_json(notice: wire.Notice) -> dict:
    return {"type": "expired", "id": notice.message_id.hex(), "from": notice.sender,
            "accepted_at": notice.accepted_at, "text": notice.text}


def _notice_line(notice: wire.Notice) -> str:
    # The text is the relay's: printed through for_terminal (here, or by _err)
    # so it cannot pose as a message or rewrite the screen.
    return (f"Message {notice.message_id.hex()} from {notice.sender} {notice.text}; "
            f"it will not arrive")


def _format(opened: envelope.Opened, as_json: bool) -> str:
    text = opened.plaintext.decode("utf-8", "replace")
    if as_json:
        return json.dumps({
            "type": "message",
            "id": opened.message_id.hex(),
            "from": opened.header.sender,
            "to": opened.header.recipient,
            "seq": opened.header.seq,
            "sent_at": opened.header.timestamp,
            "text": text,
        }, ensure_ascii=False)
    # The text is the sender's: it must not pose as another message.
    return f"Received message from {opened.sender}: {for_terminal(text)}"


def _show_rejected(rejected: Rejected) -> None:
    who = rejected.sender or "an unknown sender"
    _err(f"mailrelay: dropped message {rejected.message_id.hex()} from {who}: {rejected.reason}")


def _ended(reason) -> str:
    """Why a receiving session ended: this client's own failure, or the relay's doing."""
    if isinstance(reason, LocalFailure):
        return str(reason)
    return f"the relay closed the connection: {reason or 'connection lost'}"


def _show_gap(gap: Gap) -> None:
    _err(f"mailrelay: {gap.describe()}")


@inlineCallbacks
def _flush_in_background(reactor, home, client, outbox=None):
    """Send what waits in the outbox over a receiving session; report on stderr."""
    outbox = outbox if outbox is not None else home_outbox(home)
    if not outbox.pending():
        return
    try:
        result = yield outbox.flush(client)
    except Exception as e:  # the session goes on; the messages stay queued
        _err(f"mailrelay: could not send the outbox: {e}")
        return
    if result.accepted:
        _err(f"mailrelay: sent {len(result.accepted)} message(s) that were waiting "
             f"in the outbox")
    _report_others(result, None, accepted=False)


@inlineCallbacks
def cmd_recv(reactor, args):
    home = _home(args)
    identity = _identity(args, home)
    finished = defer.Deferred()
    received = [0]
    clients = []

    def on_message(opened):
        if finished.called:
            raise NotNow("stopped")  # not acknowledged: delivered again later
        _out(_format(opened, args.json))
        received[0] += 1
        if args.count is not None and received[0] >= args.count:
            clients[0].pause_receiving()
            reactor.callLater(0, lambda: finished.called or finished.callback("count"))

    inbox = home_inbox(home)

    def on_notice(notice):
        if finished.called:
            raise NotNow("stopped")
        if args.json:
            _out(json.dumps(_notice_json(notice), ensure_ascii=False))
        else:
            _err(f"mailrelay: {_notice_line(notice)}")

    # Ctrl-C or SIGTERM stops the reactor: that is the user ending recv, not a
    # failure, although the connection is lost on the way out.
    trigger = reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: finished.called or finished.callback("interrupted"))
    try:
        client = yield _connect(reactor, args, home, identity, on_message=on_message,
                                on_rejected=_show_rejected, inbox=inbox,
                                on_notice=on_notice, on_gap=_show_gap)
    except Exception:
        if finished.called:  # interrupted while connecting: nothing to report
            return 0
        reactor.removeSystemEventTrigger(trigger)
        raise
    clients.append(client)
    _flush_in_background(reactor, home, client)
    timer = None
    if args.timeout is not None:
        timer = reactor.callLater(
            args.timeout, lambda: finished.called or finished.callback("timeout"))
    client.closed.addCallback(lambda _: finished.called or finished.callback("closed"))
    why = yield finished
    if why != "interrupted":
        reactor.removeSystemEventTrigger(trigger)
    if timer is not None and timer.active():
        timer.cancel()
    reason = client.close_reason
    yield client.close()
    if why == "interrupted":
        return 0
    if why == "closed":
        raise Failed(_ended(reason))
    if args.count is not None and received[0] < args.count:
        raise Failed(f"only {received[0]} of {args.count} messages arrived "
                     f"within {args.timeout:g} seconds")
    return 0


@inlineCallbacks
def cmd_chat(reactor, args):
    from twisted.internet.stdio import StandardIO

    from mailrelay.client.console import ChatConsole

    home = _home(args)
    identity = _identity(args, home)
    outbox = home_outbox(home)
    console = ChatConsole(identity.name, outbox=outbox)
    client = yield _connect(reactor, args, home, identity, on_message=console.show,
                            on_rejected=console.rejected, inbox=home_inbox(home),
                            on_notice=console.notice, on_gap=console.gap,
                            on_key_rotated=console.key_rotated,
                            on_quarantined=console.quarantined)
    console.client = client
    # The console's own outbox: its sends join this flush rather than race it.
    _flush_in_background(reactor, home, client, outbox)
    StandardIO(console, reactor=reactor)
    yield defer.DeferredList([console.done, client.closed], fireOnOneCallback=True,
                             consumeErrors=True)
    reason = client.close_reason
    yield client.close()
    if reason is not None:
        raise Failed(_ended(reason))
    return 0


COMMANDS = {
    "init": cmd_init,
    "fingerprint": cmd_fingerprint,
    "send": cmd_send,
    "recv": cmd_recv,
    "chat": cmd_chat,
    "flush": cmd_flush,
    "outbox": cmd_outbox,
    "inbox": cmd_inbox,
    "trust": cmd_trust,
    "verify": cmd_verify,
    "rotate": cmd_rotate,
    "ca": cmd_ca,
}

# Errors a user can act on: shown as one line, never as a traceback.
USER_ERRORS = (
    Failed,
    keys.IdentityError,
    envelope.EnvelopeError,
    RelayError,
    Disconnected,
    defer.TimeoutError,
    OSError,
    InboxError,
    OutboxError,
    ContactsError,
    ca.CAError,
)


def _run(reactor, args):
    d = defer.maybeDeferred(COMMANDS[args.command], reactor, args)

    def exited(code):
        if code:
            raise SystemExit(code)
        return code

    d.addCallback(exited)

    def failed(failure):
        if failure.check(*USER_ERRORS):
            _err(f"mailrelay {args.command}: {failure.value}")
            raise SystemExit(1)
        return failure

    return d.addErrback(failed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_tls_options(parser, args)
    from twisted.internet import task

    task.react(_run, (args,))


if __name__ == "__main__":
    main()
