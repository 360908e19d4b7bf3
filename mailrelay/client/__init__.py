"""
The client side of mailrelay: a Twisted protocol and a small API.

    client = yield connect(reactor, endpoint, identity, on_message=show)
    message_id = yield client.send("345", b"Hey! How are you?")
"""

from mailrelay.client.protocol import (
    ClientProtocol,
    RelayError,
    SendRefused,
    connect,
)

__all__ = ["ClientProtocol", "RelayError", "SendRefused", "connect"]
