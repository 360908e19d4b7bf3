"""
Endpoint strings as people type them.

C{--port 9000} means C{tcp:9000}; C{--server host:9000} means
C{tcp:host:9000}.  Anything else is a Twisted endpoint string, passed on
unchanged (C{tcp:9000:interface=127.0.0.1}, C{ssl:9443:privateKey=...}).
"""

from __future__ import annotations

import re

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
_ENDPOINT_KINDS = ("tcp", "tcp6", "ssl", "unix", "tls", "tor", "onion", "systemd", "ssh")


def server_description(value: str) -> str:
    value = value.strip()
    if value.isdigit():
        return f"tcp:{int(value)}"
    return value


def client_description(value: str) -> str:
    value = value.strip()
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
