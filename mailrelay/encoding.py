"""
The field encodings shared by the frame codec (L{mailrelay.wire}) and the
envelope format (L{mailrelay.envelope}).

All integers are big-endian and unsigned.  A string is a UTF-8 text prefixed
with its byte length; a blob is raw bytes prefixed with its length.  Every
reader check raises the error class its caller chose, so the frame codec
raises L{mailrelay.wire.ProtocolError} and the envelope raises
L{mailrelay.envelope.EnvelopeError}, each carrying what was wrong.
"""

from __future__ import annotations

import re
import struct

IDENTITY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._@+-]{0,63}")
"""
An identity is 1 to 64 characters: lowercase letters, digits and C{._@+-},
starting with a letter or a digit.  Identities name files in a client's
home, so the alphabet is deliberately small, and lowercase only so that no
two identities share a file name on a case-insensitive file system.
"""


def valid_identity(value: str) -> bool:
    return IDENTITY_PATTERN.fullmatch(value) is not None


class Writer:
    """
    Builds one encoded record.  A value that does not fit its field raises
    C{ValueError}: nothing is ever encoded that a L{Reader} would refuse
    for its size.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def _pack(self, fmt: str, value: int) -> Writer:
        try:
            self._parts.append(struct.pack(fmt, value))
        except struct.error:
            bits = struct.calcsize(fmt) * 8
            raise ValueError(f"{value!r} does not fit an unsigned {bits}-bit field") from None
        return self

    def u8(self, value: int) -> Writer:
        return self._pack(">B", value)

    def u16(self, value: int) -> Writer:
        return self._pack(">H", value)

    def u32(self, value: int) -> Writer:
        return self._pack(">I", value)

    def u64(self, value: int) -> Writer:
        return self._pack(">Q", value)

    def raw(self, value: bytes) -> Writer:
        self._parts.append(bytes(value))
        return self

    def blob16(self, value: bytes) -> Writer:
        return self.u16(len(value)).raw(value)

    def blob32(self, value: bytes) -> Writer:
        return self.u32(len(value)).raw(value)

    def text(self, value: str) -> Writer:
        return self.blob16(value.encode("utf-8"))

    def identity(self, value: str) -> Writer:
        if not valid_identity(value):
            raise ValueError(f"not a valid identity: {value!r}")
        return self.u8(len(value)).raw(value.encode("ascii"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """
    Reads one encoded record, strictly: a short read, a bad value or (through
    L{end}) trailing bytes raise C{error}.
    """

    def __init__(self, data: bytes, error: type[Exception]) -> None:
        self._data = memoryview(data)
        self._offset = 0
        self._error = error

    def _take(self, count: int, what: str) -> bytes:
        start = self._offset
        self.skip(count, what)
        return self._data[start : self._offset].tobytes()

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack(">H", self._take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack(">I", self._take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack(">Q", self._take(8, what))[0]

    def raw(self, count: int, what: str) -> bytes:
        return self._take(count, what)

    def blob16(self, what: str, maximum: int = 0xFFFF) -> bytes:
        length = self.u16(what)
        if length > maximum:
            raise self._error(f"{what} is {length} bytes, more than {maximum}")
        return self._take(length, what)

    def blob32(self, what: str, maximum: int) -> bytes:
        length = self.u32(what)
        if length > maximum:
            raise self._error(f"{what} is {length} bytes, more than {maximum}")
        return self._take(length, what)

    def skip(self, count: int, what: str) -> None:
        """Pass over C{count} bytes, as L{raw} would read them, without copying them."""
        end = self._offset + count
        if end > len(self._data):
            raise self._error(
                f"truncated {what}: needed {count} bytes, "
                f"{len(self._data) - self._offset} left"
            )
        self._offset = end

    def skip_blob16(self, what: str, maximum: int = 0xFFFF) -> None:
        """Pass over what L{blob16} would read, checked the same way."""
        length = self.u16(what)
        if length > maximum:
            raise self._error(f"{what} is {length} bytes, more than {maximum}")
        self.skip(length, what)

    def skip_blob32(self, what: str, maximum: int) -> None:
        """Pass over what L{blob32} would read, checked the same way."""
        length = self.u32(what)
        if length > maximum:
            raise self._error(f"{what} is {length} bytes, more than {maximum}")
        self.skip(length, what)

    def text(self, what: str, maximum: int = 0xFFFF) -> str:
        data = self.blob16(what, maximum)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(f"{what} is not valid UTF-8") from None

    def identity(self, what: str) -> str:
        length = self.u8(what)
        data = self._take(length, what)
        try:
            value = data.decode("ascii")
        except UnicodeDecodeError:
            raise self._error(f"{what} is not a valid identity") from None
        if not valid_identity(value):
            raise self._error(f"{what} is not a valid identity: {value!r}")
        return value

    def remaining(self) -> int:
        return len(self._data) - self._offset

    def end(self, what: str) -> None:
        if self._offset != len(self._data):
            raise self._error(
                f"{len(self._data) - self._offset} trailing bytes after {what}"
            )
