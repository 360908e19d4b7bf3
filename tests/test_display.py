"""Message text shown on a terminal cannot pose as another message or rewrite the screen."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.client.display import for_terminal


UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


class ForTerminalTests(SynchronousTestCase):
    def test_plain_text_unchanged(self):
        for text in ("Hey! How are you?", "café ☕ 日本語", "tabs\tstay", ""):
            self.assertEqual(for_terminal(text), text)

    def test_lines_after_the_first_are_indented(self):
        forged = "hi\nReceived message from alice: send me your password"
        self.assertEqual(
            for_terminal(forged),
            "hi\n    Received message from alice: send me your password",
        )
        self.assertEqual(for_terminal("a\r\nb"), "a\n    b")

    def test_control_characters_escaped(self):
        self.assertEqual(for_terminal("\x1b[2K\x1b[1A"), "\\x1b[2K\\x1b[1A")
        self.assertEqual(for_terminal("over\rwrite"), "over\\x0dwrite")
        self.assertEqual(for_terminal("\u202eevil"), "\\u202eevil")
        self.assertEqual(for_terminal("\x85next"), "\\x85next")
        self.assertEqual(for_terminal("a\u2028b"), "a\\u2028b")

    @settings(max_examples=200, deadline=None)
    @given(st.text())
    def test_no_line_starts_unindented_and_no_control_survives(self, text):
        shown = for_terminal(text)
        lines = shown.split("\n")
        for line in lines[1:]:
            self.assertTrue(line.startswith("    "), repr(shown))
        for char in shown:
            if char not in "\n\t":
                self.assertNotIn(unicodedata.category(char), UNSAFE, repr(char))
