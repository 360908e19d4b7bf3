"""
The C{mailrelay ca ...} commands: running a certificate authority, and an
identity's side of it (requesting, installing its certificate, trusting a
root).

  ca init DIR                 a CA key (DIR/ca-key.pem, 0600) and root (DIR/ca.pem)
  ca request [--out F]        a certificate request for this home's identity
  ca sign DIR REQUEST --id ID [--days N] [--out F]
                              the CA issues a certificate for a request
  ca relay-cert DIR HOSTNAME [--days N] [--out-dir D]
                              a TLS key and certificate for the relay
  ca install CERT             keep this identity's certificate (checked) in the home
  ca use ROOT                 check every contact's key against this root from now on
"""

from __future__ import annotations

import sys
from pathlib import Path

from mailrelay import ca, keys
from mailrelay.files import write_durably

MAX_DAYS = 36500
"""The longest validity accepted: a hundred years."""

CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca.pem"
CERTIFICATE_FILE = keys.CERTIFICATE_FILE
IDENTITY_ROOTS_FILE = keys.IDENTITY_ROOTS_FILE


def add_parsers(sub, common, positive_int) -> None:
    p = sub.add_parser("ca", help="certificate authority: issue and use certificates")
    actions = p.add_subparsers(dest="ca_command", required=True, metavar="ACTION")

    a = actions.add_parser("init", help="create a CA key and self-signed root in DIR", parents=[common])
    a.add_argument("dir", metavar="DIR")
    a.add_argument("--ask-passphrase", action="store_true",
                   help="protect the CA key with a passphrase typed at the prompt (or give "
                        "it with --passphrase-file)")
    a.add_argument("--name", default="mailrelay CA", help="the root's common name")
    a.add_argument("--days", type=_days(positive_int), default=ca.ROOT_DAYS)

    a = actions.add_parser("request", parents=[common],
                           help="a certificate request for this home's identity")
    a.add_argument("--out", metavar="FILE", help="write it here (default: standard output)")
    a.add_argument("--next", action="store_true",
                   help="for the key `mailrelay rotate` staged, not the current one")

    a = actions.add_parser("sign", help="issue a certificate for a request", parents=[common])
    a.add_argument("dir", metavar="DIR", help="the CA's directory (from `ca init`)")
    a.add_argument("request", metavar="REQUEST", help="the request file (PEM)")
    a.add_argument("--id", required=True, metavar="ID",
                   help="the identity the request must be for (checked)")
    a.add_argument("--days", type=_days(positive_int), default=ca.DEFAULT_DAYS)
    a.add_argument("--out", metavar="FILE", help="write it here (default: standard output)")

    a = actions.add_parser("relay-cert", help="a TLS key and certificate for the relay", parents=[common])
    a.add_argument("dir", metavar="DIR", help="the CA's directory")
    a.add_argument("hostname", metavar="HOSTNAME", help="the name clients connect to")
    a.add_argument("--days", type=_days(positive_int), default=ca.DEFAULT_DAYS)
    a.add_argument("--out-dir", default=".", metavar="D",
                   help="where to write relay-key.pem and relay-cert.pem (default: here)")

    a = actions.add_parser("install", parents=[common],
                           help="keep this identity's certificate in the home")
    a.add_argument("certificate", metavar="CERT")

    a = actions.add_parser("use", parents=[common],
                           help="check every contact's key against this CA root")
    a.add_argument("root", metavar="ROOT")


def _days(positive_int):
    """An argparse type: whole days from 1 to L{MAX_DAYS}."""
    import argparse

    def convert(value: str) -> int:
        days = positive_int(value)
        if days > MAX_DAYS:
            raise argparse.ArgumentTypeError(f"must be at most {MAX_DAYS}, not {value!r}")
        return days

    return convert


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ca.CAError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _emit(data: bytes, out: str | None, mode: int = 0o644) -> str:
    if out is None:
        sys.stdout.write(data.decode("ascii"))
        sys.stdout.flush()
        return "standard output"
    write_durably(Path(out), data, mode)
    return out


def _authority(args, passphrase_reader) -> ca.Authority:
    base = Path(args.dir)
    key_pem = _read(str(base / CA_KEY_FILE), "the CA key")
    passphrase = None
    if keys.is_protected_pem(key_pem):
        passphrase = passphrase_reader(args, f"Passphrase for {base / CA_KEY_FILE}: ")
        if passphrase is None:
            raise ca.CAError(f"{base / CA_KEY_FILE} is protected by a passphrase: give it "
                             f"with --passphrase-file FILE, or at the prompt")
    return ca.load_authority(key_pem, _read(str(base / CA_CERT_FILE), "the CA root"),
                             passphrase)


def run(args, home_of, load_identity, say, passphrase_reader) -> int:
    """Carry out C{mailrelay ca ACTION}; C{say} prints a line for people."""
    action = args.ca_command
    if action == "init":
        base = Path(args.dir)
        if (base / CA_KEY_FILE).exists():
            raise ca.CAError(f"{base} already holds a CA ({CA_KEY_FILE}); use another DIR")
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        authority = ca.create_authority(args.name, days=args.days)
        passphrase = passphrase_reader(args, "Passphrase for the CA key: ", confirm=True) \
            if (args.passphrase_file or args.ask_passphrase) else None
        if (args.passphrase_file or args.ask_passphrase) and not passphrase:
            raise ca.CAError("--ask-passphrase needs a terminal to type it on, or "
                             "--passphrase-file FILE")
        key_pem = keys.private_pem(authority.key, passphrase)
        write_durably(base / CA_KEY_FILE, key_pem, 0o600)
        write_durably(base / CA_CERT_FILE, authority.certificate_pem, 0o644)
        say(f"Created CA {args.name!r} in {base}: key {base / CA_KEY_FILE} (keep it secret, "
            f"offline if you can), root {base / CA_CERT_FILE} (give it to relays and clients)")
        return 0
    if action == "request":
        identity = load_identity(args)
        if args.next:
            home = home_of(args)
            if not home.next_key_file.exists():
                raise ca.CAError("no key is staged: run `mailrelay rotate` first")
            passphrase = None
            if keys.is_protected_pem(home.next_key_file.read_bytes()):
                passphrase = passphrase_reader(args, f"Passphrase for {home.next_key_file}: ")
            identity = keys.Identity(identity.name, home._load_next(passphrase))
        where = _emit(ca.make_request(identity), args.out)
        if args.out:
            say(f"Wrote a certificate request for {identity.name} to {where}; send it to "
                f"the CA (it holds no secret)")
        return 0
    if action == "sign":
        authority = _authority(args, passphrase_reader)
        request = _read(args.request, "the request")
        certificate = ca.issue_identity(authority, request, days=args.days,
                                        expected=args.id)
        where = _emit(certificate, args.out)
        if args.out:
            say(f"Issued a certificate for {keys.check_identity(args.id)} valid for "
                f"{args.days} days: {where}")
        return 0
    if action == "relay-cert":
        authority = _authority(args, passphrase_reader)
        out = Path(args.out_dir)
        if (out / "relay-key.pem").exists():
            raise ca.CAError(f"{out / 'relay-key.pem'} exists; move it aside first, or choose "
                             f"another --out-dir")
        key_pem, cert_pem = ca.issue_server(authority, args.hostname, days=args.days)
        out.mkdir(parents=True, exist_ok=True)
        write_durably(out / "relay-key.pem", key_pem, 0o600)
        write_durably(out / "relay-cert.pem", cert_pem, 0o644)
        say(f"Wrote {out / 'relay-key.pem'} and {out / 'relay-cert.pem'} for {args.hostname} "
            f"(twistd mailrelay --tls-key ... --tls-cert ...)")
        return 0
    if action == "install":
        home = home_of(args)
        identity = load_identity(args)
        pem = _read(args.certificate, "the certificate")
        certificate = ca.load_certificate(pem)
        if keys.public_der(certificate.public_key()) != identity.public_der:
            raise ca.CAError(f"{args.certificate} is for another key than {identity.name}'s")
        write_durably(home.path / CERTIFICATE_FILE, ca.certificate_pem(certificate), 0o644)
        say(f"Installed the certificate for {identity.name}, valid until "
            f"{certificate.not_valid_after_utc:%Y-%m-%d}; it is presented to the relay "
            f"from now on")
        return 0
    if action == "use":
        home = home_of(args)
        load_identity(args, need_key=False)
        roots = ca.load_roots(_read(args.root, "the CA root"))
        write_durably(home.path / IDENTITY_ROOTS_FILE,
                      b"".join(ca.certificate_pem(r) for r in roots), 0o644)
        say(f"From now on every contact's key must carry a certificate from "
            f"{', '.join(r.subject.rfc4514_string() for r in roots)}")
        return 0
    raise ca.CAError(f"unknown action {action!r}")

