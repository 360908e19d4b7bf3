"""
Showing message text on a terminal without letting it pose as anything else.

A message is text its sender chose.  Printed raw, a newline could start a
line that looks like another message ("Received message from alice: ...")
and an escape sequence could rewrite or hide what is already on screen.
"""

from __future__ import annotations

import unicodedata

CONTINUATION = "\n    "
"""What a line break in a message becomes: following lines are indented."""


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def for_terminal(text: str) -> str:
    """
    C{text} made safe to print after a "from" line: control characters
    (escape sequences, carriage returns, bidirectional overrides) shown as
    escapes, and every line after the first indented, so no line of a
    message can start where a new message would.
    """
    out = []
    for char in text.replace("\r\n", "\n"):
        if char == "\n":
            out.append(CONTINUATION)
        elif char == "\t":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(_escape(char))
        else:
            out.append(char)
    return "".join(out)
