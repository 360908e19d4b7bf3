"""
The least of MQTT 3.1.1 that bench/loadgen.py needs to drive Mosquitto as
reference B: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 1 and PUBACK.

One topic per pair.  The publisher is the pair's sender: a PUBACK from the
broker is its "accepted", and at most --window PUBLISHes wait for one.  The
subscriber (QoS 1) is the recipient: each PUBLISH is a delivery, answered
with PUBACK (its "ack").  Written for the benchmark, not as a general
client: frames are built from pre-encoded pieces and read with no more than
the fields the benchmark uses (paho-mqtt's threads would make the client
the bottleneck).
"""

from __future__ import annotations

import struct
import sys
from time import perf_counter_ns

from twisted.internet import defer
from twisted.internet.protocol import Protocol

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
U16 = struct.Struct(">H")
PACKET_IDS = 65535
"""Packet ids run 1..65535; a sender's in-flight window is far smaller."""


def varint(n: int) -> bytes:
    """The remaining-length encoding: 7 bits a byte, least significant first."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(text: str) -> bytes:
    raw = text.encode()
    return U16.pack(len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(client_id: str, keepalive: int = 0) -> bytes:
    # Protocol "MQTT", level 4 (3.1.1), flags: clean session; no keep-alive pings.
    return packet(CONNECT << 4, string("MQTT") + bytes([4, 0x02]) + U16.pack(keepalive)
                  + string(client_id))


def subscribe(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    return packet((SUBSCRIBE << 4) | 0x02, U16.pack(packet_id) + string(topic_filter)
                  + bytes([qos]))


def topic(pair: int) -> str:
    return f"bench/{pair}"


def publish_head(topic_name: str, payload_len: int) -> bytes:
    """A QoS 1 PUBLISH up to its packet id: fixed header, remaining length, topic."""
    t = string(topic_name)
    return bytes([(PUBLISH << 4) | 0x02]) + varint(len(t) + 2 + payload_len) + t


def packet_id(seq: int) -> bytes:
    """The packet id of a sender's message number C{seq}."""
    return U16.pack(seq % PACKET_IDS + 1)


def seq_of(packet_id: int, last_seq: int) -> int:
    """The message number in flight with this packet id (the latest one that has it)."""
    return last_seq - ((last_seq - (packet_id - 1)) % PACKET_IDS)


def publish(topic_name: str, pid: int, payload: bytes) -> bytes:
    """A whole QoS 1 PUBLISH (for the self-check)."""
    return publish_head(topic_name, len(payload)) + U16.pack(pid) + payload


def puback(pid: int) -> bytes:
    return bytes([PUBACK << 4, 2]) + U16.pack(pid)


class Client(Protocol):
    """One MQTT connection of the load generator: a pair's publisher or subscriber."""

    def __init__(self, gen, j: int, receiving: bool, id_offset: int, tag: str) -> None:
        self.gen = gen
        self.j = j
        self.receiving = receiving
        self.id_offset = id_offset
        self.client_id = f"b{tag}{'r' if receiving else 's'}{gen.first + j}"
        self.ready = defer.Deferred()
        self._buf = bytearray()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(connect(self.client_id))

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        off = 0
        t = perf_counter_ns()
        gen, j = self.gen, self.j
        acks = []
        accepts = 0
        while n - off >= 2:
            # Remaining length: 1 to 4 bytes.
            length, shift, i, whole = 0, 0, off + 1, False
            while i < n:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    whole = True
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("malformed MQTT remaining length")
            if not whole:
                break
            end = i + length
            if end > n:
                break
            first = buf[off]
            kind = first >> 4
            if kind == PUBLISH:
                tlen = (buf[i] << 8) | buf[i + 1]
                p = i + 2 + tlen
                qos = (first >> 1) & 3
                if qos:
                    pid = (buf[p] << 8) | buf[p + 1]
                    p += 2
                    acks.append(puback(pid))
                start = p + self.id_offset
                gen.delivered(j, bytes(buf[start:start + 16]), t)
            elif kind == PUBACK:
                pid = (buf[i] << 8) | buf[i + 1]
                gen.accepted(j, seq_of(pid, len(gen.sent[j]) - 1), t)
                accepts += 1
            elif kind == CONNACK:
                if buf[i + 1] != 0:
                    self._refused(f"CONNACK return code {buf[i + 1]}")
                elif self.receiving:
                    self.transport.write(subscribe(1, topic(gen.first + j)))
                else:
                    self.ready.callback(self)
            elif kind == SUBACK:
                if buf[i + 2] & 0x80:
                    self._refused("SUBSCRIBE refused")
                else:
                    self.ready.callback(self)
            else:
                gen.error(f"unexpected MQTT packet type {kind}")
            off = end
        del buf[:off]
        if acks:
            self.transport.write(b"".join(acks))
        if accepts:
            gen.after_accepts(j)

    def _refused(self, why: str) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(why))
        else:
            self.gen.error(why)

    def connectionLost(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        elif not self.gen.finished:
            self.gen.error(f"pair {self.gen.first + self.j} MQTT connection lost: "
                           f"{reason.getErrorMessage()}")


def self_check() -> None:
    assert varint(0) == b"\x00" and varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01" and varint(16383) == b"\xff\x7f"
    assert varint(2097152) == b"\x80\x80\x80\x01"
    for seq in (0, 1, 65534, 65535, 65536, 10**6):
        pid = U16.unpack(packet_id(seq))[0]
        assert 1 <= pid <= PACKET_IDS and seq_of(pid, seq + 40) == seq, seq
    assert connect("c") == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x00\x00\x01c"


if __name__ == "__main__":
    self_check()
    print("mqtt codec self-check passed", file=sys.stderr)
