"""The relay: the server side of mailrelay."""
