from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.relay.tap",
    "A relay for end-to-end encrypted messages, with durable mailboxes.",
    "mailrelay",
)
mailclient = ServiceMaker(
    "mailclient",
    "mailrelay.client.tap",
    "A mailrelay client that stays connected and files messages into a Maildir.",
    "mailclient",
)
