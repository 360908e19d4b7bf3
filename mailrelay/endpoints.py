"""
Endpoint strings as people type them.

C{--port 9000} means C{tcp:9000}; C{--server host:9000} means
C{tcp:host:9000}.  Anything else is a Twisted endpoint string, passed on
unchanged (C{tcp:9000:interface=127.0.0.1}, C{ssl:9443:privateKey=...}).
"""

from __future__ import annotations

import re

_KNOWN_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
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
