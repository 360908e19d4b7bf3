"""The TLS channel binding of a connection, for the authentication transcript."""

from __future__ import annotations

from mailrelay import wire


def channel_binding(transport) -> bytes:
    """
    The TLS exporter value (RFC 5705, RFC 8446 section 7.5) of
    C{transport}'s connection: the same on both ends of one TLS connection,
    and on no other connection.
    """
    return transport.getHandle().export_keying_material(
        wire.TLS_EXPORTER_LABEL, wire.CHANNEL_BINDING_SIZE
    )
