"""
Reference A of `make bench`: the least a relay could do.  A bare Twisted
forwarder of length-prefixed frames, with no store, no authentication and no
envelope parsing, so the benchmark can show what mailrelay's own work costs.

Frames are u32 length + type byte + body, with mailrelay's type numbers:
  HELLO    0x01 role u8 (0 sender, 1 recipient) + pair u32, answered WELCOME 0x03
  SEND     0x20 message id (16) + envelope, from sender i: written to recipient i
           as DELIVER 0x22 (same body) and answered ACCEPTED 0x21 + message id
  ACK      0x23 message id, from a recipient: read and dropped
A recipient's full write buffer pauses reading from its sender; TCP_NODELAY
is set, as the relay does.  Run: python bench/forwarder.py --port N
"""

import argparse
import struct

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol

U32 = struct.Struct(">I")
ACCEPTED_HEAD = U32.pack(17) + b"\x21"
WELCOME_FRAME = U32.pack(1) + b"\x03"


class Forward(Protocol):
    peer = None

    def connectionMade(self):
        self.buf = bytearray()
        self.transport.setTcpNoDelay(True)  # as the relay's sessions do

    def dataReceived(self, data):
        buf = self.buf
        buf += data
        n, off, forward, accepted = len(buf), 0, [], []
        while n - off >= 5:
            (length,) = U32.unpack_from(buf, off)
            end = off + 4 + length
            if end > n:
                break
            kind = buf[off + 4]
            if kind == 0x20:
                forward.append(U32.pack(length) + b"\x22" + buf[off + 5:end])
                accepted.append(ACCEPTED_HEAD + buf[off + 5:off + 21])
            elif kind == 0x01:
                self.factory.join(self, buf[off + 5], U32.unpack_from(buf, off + 6)[0])
            off = end
        del buf[:off]
        if forward and self.peer is not None:
            self.peer.transport.write(b"".join(forward))
        if accepted:
            self.transport.write(b"".join(accepted))


class Forwarder(Factory):
    protocol = Forward

    def __init__(self):
        self.waiting = {}

    def join(self, proto, role, pair):
        other = self.waiting.pop((1 - role, pair), None)
        if other is None:
            self.waiting[(role, pair)] = proto
        else:
            sender, recipient = (proto, other) if role == 0 else (other, proto)
            sender.peer = recipient
            recipient.transport.registerProducer(sender.transport, True)
        proto.transport.write(WELCOME_FRAME)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bare forwarder, reference A of make bench")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    endpoints.TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1").listen(
        Forwarder())
    reactor.run()
