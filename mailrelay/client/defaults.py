"""Where a client looks for its home and its relay when not told."""

from __future__ import annotations

import os

DEFAULT_SERVER = "tcp:localhost:9000"


def default_home() -> str:
    return os.environ.get("MAILRELAY_HOME") or os.path.join("~", ".mailrelay")


def default_server() -> str:
    return os.environ.get("MAILRELAY_SERVER") or DEFAULT_SERVER
