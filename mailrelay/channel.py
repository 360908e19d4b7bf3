"""What a session needs of its connection: the TLS channel binding, and no delay for small frames."""

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


def no_delay(transport) -> None:
    """
    Send small frames (ACCEPTED, ACK) at once rather than holding them for
    the peer's delayed acknowledgement (Nagle's algorithm): a relay's
    latency is made of such frames.  TLS transports pass it to their TCP
    connection; transports without TCP (tests, pipes) have nothing to set.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass
