"""
mailrelay: a self-hostable relay for end-to-end encrypted, signed messages.

The relay stores sealed envelopes in per-recipient mailboxes and delivers
them when the recipient is connected; it can neither read nor forge them.
"""

__version__ = "0.1.0"
