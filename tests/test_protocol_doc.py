"""
docs/protocol.md against the code.

The document promises to be enough to write an interoperating client
without reading the code.  These tests read it the way such a writer
would: they parse each frame's field table (field name, encoding) and the
envelope layout tables, build the bytes by hand from them with an encoder
of their own (never L{wire.encode} or L{mailrelay.encoding.Writer}), and
check that the code reads those bytes as the document says, and writes
exactly them.  The envelope is sealed by hand with C{cryptography}
primitives (RSA-OAEP-SHA256, AES-256-GCM with the header as associated
data, RSA-PSS-SHA256) and must be opened by L{envelope.open_envelope}.

So a field's encoding or order changed in the document, or in the code,
fails a test here: the document and the code cannot drift apart silently.
The worked examples (hex dumps), the byte-by-byte descriptions of the two
signed statements, and the error code table are checked too; and a few
things the document says the relay does that a client must rely on (the
idle timer and its text, ROTATE's refusal, answer and supersession, where
RATE_LIMITED sits among a SEND's checks) are driven through a relay session.

Conventions the tables keep so they stay machine-readable: one table per
frame, under a C{### NAME `0xNN`} heading (C{### PING `0x30` / PONG `0x31`}
for two frames with the same body); the first column names the field as
the frame's dataclass does, the second starts with the encoding in
backticks, then optional limits (C{≤ N bytes}, C{below 2^63}, the allowed
values of a C{u8}: C{`u8`: 0 or 1}).  A list is C{`u8` count (≤ N), then
that many `NAME` entries}, with the entry's table under C{#### `NAME` entry}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import SynchronousTestCase

from mailrelay import envelope, keys, wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

INT_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


# Reading the markdown --------------------------------------------------------


@dataclasses.dataclass
class Section:
    level: int
    title: str
    lines: list[str]
    """The section's own lines, up to the next heading of any level."""



def expect(condition, why="") -> None:
    """Like assert, but kept under python -O: the test's own parsing must not go unchecked."""
    if not condition:
        raise AssertionError(why)

def read_doc() -> str:
    return DOC.read_text(encoding="utf-8")


def sections(text: str) -> list[Section]:
    found: list[Section] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^(#{1,6}) (.*)$", line)
        if heading:
            found.append(Section(len(heading.group(1)), heading.group(2).strip(), []))
        elif found:
            found[-1].lines.append(line)
    return found


def split_row(line: str) -> list[str]:
    cells = line.strip()
    expect(cells.startswith("|") and cells.endswith("|"), line)
    return [cell.strip() for cell in cells[1:-1].split("|")]


def tables(lines: list[str]) -> list[list[list[str]]]:
    """The tables among C{lines}: each a list of rows (header row first), cells stripped."""
    found, current, in_code = [], None, False
    for line in lines + [""]:
        if line.startswith("```"):
            in_code = not in_code
        if line.startswith("|") and not in_code:
            if current is None:
                current = []
            current.append(split_row(line))
        elif current is not None:
            header, separator, *rows = current
            expect(all(set(cell) <= set("-: ") for cell in separator), separator)
            found.append([header] + rows)
            current = None
    return found


def code_block_after(text: str, position: int) -> list[str]:
    """The lines of the first fenced code block after C{position}."""
    start = text.index("```", position)
    start = text.index("\n", start) + 1
    end = text.index("```", start)
    return text[start:end].splitlines()


# The field tables ------------------------------------------------------------


@dataclasses.dataclass
class Field:
    name: str
    kind: str
    """u8, u16, u32, u64, identity, blob16, blob32, text, bytes, or list."""
    size: int = 0
    """bytes[n]: n."""
    maximum: int | None = None
    """A blob's or text's largest length in bytes, or a list's largest count."""
    allowed: tuple | None = None
    """The only values an integer may take, when the document lists them."""
    below: int | None = None
    """An integer's exclusive upper bound, when the document gives one (2^63)."""
    count_kind: str = ""
    entry: str = ""
    """A list: the encoding of its count, and the name of its entries' table."""
    error_code: bool = False
    """The integer is a code of the error table (§6)."""


ENCODING = re.compile(r"^`(u8|u16|u32|u64|identity|blob16|blob32|text|bytes\[(\d+)\])`")
LIST = re.compile(r"^`(u8|u16|u32)` count \(≤ ([\d,]+)\), then that many `(\w+)` entries")


def parse_field(name: str, cell: str) -> Field:
    listed = LIST.match(cell)
    if listed:
        return Field(name, "list", maximum=int(listed.group(2).replace(",", "")),
                     count_kind=listed.group(1), entry=listed.group(3))
    encoding = ENCODING.match(cell)
    expect(encoding, f"field {name!r}: no encoding this test knows in {cell!r}")
    kind = encoding.group(1)
    field = Field(name, kind)
    if encoding.group(2):
        field.kind, field.size = "bytes", int(encoding.group(2))
    maximum = re.search(r"≤ ([\d,]+) bytes", cell)
    if maximum:
        field.maximum = int(maximum.group(1).replace(",", ""))
    allowed = re.match(r"^`u\d+`: (\d+(?: or \d+)*) \(other values are malformed\)", cell)
    if allowed:
        field.allowed = tuple(int(v) for v in allowed.group(1).split(" or "))
    below = re.search(r"below 2\^(\d+)", cell)
    if below:
        field.below = 2 ** int(below.group(1))
    if re.match(r"^`u\d+`: a code of §6", cell):
        field.error_code = True
    return field


def field_table(table: list[list[str]]) -> list[Field]:
    header, *rows = table
    expect(header[:2] == ["field", "encoding"], header)
    return [parse_field(row[0], row[1]) for row in rows]


@dataclasses.dataclass
class FrameDoc:
    name: str
    type: int
    fields: list[Field]


def frame_docs(text: str) -> tuple[list[FrameDoc], dict[str, list[Field]]]:
    """Every frame section's table, and every entry table (by entry name)."""
    frames, entries = [], {}
    for section in sections(text):
        if section.level == 3:
            named = re.findall(r"([A-Z]+) `0x([0-9A-F]{2})`", section.title)
            if not named:
                continue
            found = tables(section.lines)
            expect(len(found) == 1, f"{section.title}: {len(found)} tables, not one")
            fields = field_table(found[0])
            frames += [FrameDoc(name, int(code, 16), fields) for name, code in named]
        entry = re.match(r"^`(\w+)` entry$", section.title)
        if section.level == 4 and entry:
            [table] = tables(section.lines)
            entries[entry.group(1)] = field_table(table)
    return frames, entries


# A client writer's own encoder -----------------------------------------------


def put(field: Field, value, entries: dict[str, list[Field]]) -> bytes:
    """C{value} encoded as the document says C{field} is, by hand."""
    kind = field.kind
    if kind in INT_SIZES:
        return value.to_bytes(INT_SIZES[kind], "big")
    if kind == "identity":
        data = value.encode("ascii")
        return bytes([len(data)]) + data
    if kind == "blob16":
        return len(value).to_bytes(2, "big") + value
    if kind == "blob32":
        return len(value).to_bytes(4, "big") + value
    if kind == "text":
        data = value.encode("utf-8")
        return len(data).to_bytes(2, "big") + data
    if kind == "bytes":
        expect(len(value) == field.size)
        return value
    if kind == "list":
        out = len(value).to_bytes(INT_SIZES[field.count_kind], "big")
        for item in value:
            for sub in entries[field.entry]:
                out += put(sub, getattr(item, sub.name), entries)
        return out
    raise AssertionError(f"unknown encoding {kind}")


def seed(*parts: str) -> bytes:
    return hashlib.sha256(".".join(parts).encode()).digest()


def sample(owner: str, field: Field, entries: dict[str, list[Field]]):
    """
    A value for C{field} of C{owner}, derived from their names, so that no
    two fields share one and a field moved in a table carries its value along.
    """
    digest = seed(owner, field.name)
    kind = field.kind
    if field.error_code:
        return wire.ErrorCode.BAD_ENVELOPE
    if field.allowed:
        return max(field.allowed)
    if kind in INT_SIZES:
        value = int.from_bytes(digest[: INT_SIZES[kind]], "big")
        if kind == "u64":
            value >>= 1  # below 2^63, as every time and sequence number must be
        return value or 1
    if kind == "identity":
        return f"{owner.lower()}.{digest.hex()[:6]}"
    if kind in ("blob16", "blob32"):
        return f"{owner}:{field.name}".encode()
    if kind == "text":
        return f"{owner} {field.name} \u00e9\u20ac"
    if kind == "bytes":
        return (digest * (field.size // 32 + 1))[: field.size]
    if kind == "list":
        item_fields = entries[field.entry]
        cls = getattr(wire, field.entry.title())
        return tuple(
            cls(**{sub.name: sample(f"{owner}{i}", sub, entries) for sub in item_fields})
            for i in range(2)
        )
    raise AssertionError(f"unknown encoding {kind}")


def frame_class(name: str):
    cls = getattr(wire, name.title(), None)
    expect(cls is not None and dataclasses.is_dataclass(cls), f"no frame class for {name}")
    return cls


def build(doc: FrameDoc, values: dict, entries) -> bytes:
    """The frame's body (type byte first), by hand."""
    return bytes([doc.type]) + b"".join(put(f, values[f.name], entries) for f in doc.fields)


def prefixed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


class FrameTableTests(SynchronousTestCase):
    """Every frame's bytes, built from its table in the document, are the code's."""

    def setUp(self):
        self.frames, self.entries = frame_docs(read_doc())

    def test_every_frame_is_documented(self):
        documented = {doc.name for doc in self.frames}
        self.assertEqual(documented, {cls.__name__.upper() for cls in wire._FRAME_TYPES})
        self.assertEqual(len(documented), len(self.frames), "a frame is documented twice")

    def test_type_bytes(self):
        for doc in self.frames:
            self.assertEqual(frame_class(doc.name).TYPE, doc.type, doc.name)

    def test_type_table(self):
        """The summary table of §5 names the same type byte for each frame."""
        text = read_doc()
        [summary] = [t for t in tables(text.splitlines()) if t[0][:2] == ["type", "name"]]
        rows = {row[1]: int(row[0].strip("`"), 16) for row in summary[1:]}
        self.assertEqual(rows, {doc.name: doc.type for doc in self.frames})
        self.assertEqual([r[1] for r in summary[1:]],
                         [r[1] for r in sorted(summary[1:], key=lambda r: r[0])],
                         "the type table is not sorted by type")

    def test_fields_are_the_frames(self):
        for doc in self.frames:
            cls = frame_class(doc.name)
            self.assertEqual({f.name for f in doc.fields},
                             {f.name for f in dataclasses.fields(cls)}, doc.name)
        for name, fields in self.entries.items():
            cls = getattr(wire, name.title())
            self.assertEqual({f.name for f in fields}, {f.name for f in dataclasses.fields(cls)})

    def test_bytes_by_hand(self):
        """
        The code decodes the hand-built bytes to the frame with the sample
        values, and encodes that frame to exactly those bytes.
        """
        for doc in self.frames:
            cls = frame_class(doc.name)
            values = {f.name: sample(doc.name, f, self.entries) for f in doc.fields}
            frame = cls(**values)
            body = build(doc, values, self.entries)
            self.assertEqual(wire.decode(body), frame, doc.name)
            self.assertEqual(wire.encode(frame), prefixed(body), doc.name)
            self.assertEqual(wire.encode(frame)[4], doc.type, doc.name)
            # Strict: a byte more or less is malformed.
            self.assertRaises(wire.ProtocolError, wire.decode, body + b"\x00")
            self.assertRaises(wire.ProtocolError, wire.decode, body[:-1])

    def test_limits(self):
        """Each documented maximum is the code's: at it decodes, one over is malformed."""
        checked = 0
        for doc in self.frames:
            base = {f.name: sample(doc.name, f, self.entries) for f in doc.fields}
            for field in doc.fields:
                if field.maximum is None:
                    continue
                for size, good in ((field.maximum, True), (field.maximum + 1, False)):
                    values = dict(base)
                    if field.kind == "list":
                        values[field.name] = (base[field.name] * size)[:size]
                    elif field.kind == "text":
                        values[field.name] = "t" * size
                    else:
                        values[field.name] = b"b" * size
                    body = build(doc, values, self.entries)
                    what = f"{doc.name}.{field.name} of {size}"
                    if good:
                        self.assertEqual(wire.decode(body), frame_class(doc.name)(**values), what)
                    else:
                        self.assertRaises(wire.ProtocolError, wire.decode, body)
                checked += 1
            for field in doc.fields:
                if field.kind != "list":
                    continue
                for sub in self.entries[field.entry]:
                    if sub.maximum is None:
                        continue
                    for size, good in ((sub.maximum, True), (sub.maximum + 1, False)):
                        values = dict(base)
                        first = dataclasses.replace(base[field.name][0],
                                                    **{sub.name: b"b" * size})
                        values[field.name] = (first,) + base[field.name][1:]
                        body = build(doc, values, self.entries)
                        if good:
                            self.assertEqual(wire.decode(body).rotations[0], first)
                        else:
                            self.assertRaises(wire.ProtocolError, wire.decode, body)
                    checked += 1
        # AUTH 3, KEY 3 (the rotation count included) and 5 in each rotation, ROTATE 4,
        # NOTICE 1, ERROR 2: none may go unparsed.
        self.assertEqual(checked, 18)

    def test_restricted_values(self):
        """A value the document says is malformed is refused by the decoder."""
        checked = 0
        for doc in self.frames:
            base = {f.name: sample(doc.name, f, self.entries) for f in doc.fields}
            for field in doc.fields:
                if field.allowed:
                    bad = max(field.allowed) + 1
                elif field.error_code:
                    bad = max(wire.ErrorCode) + 1
                else:
                    continue
                body = build(doc, dict(base, **{field.name: bad}), self.entries)
                self.assertRaises(wire.ProtocolError, wire.decode, body)
                checked += 1
        # HELLO.binding, AUTH.receive, WELCOME.registered, NOTICE.kind, ERROR.code.
        self.assertEqual(checked, 5)


# Worked examples ---------------------------------------------------------------


EXAMPLE = re.compile(
    r'`\.venv/bin/python -c "from mailrelay import wire; print\((.+?)\.hex\(\)\)"`')
SAFE = {"__builtins__": {"bytes": bytes, "range": range}, "wire": wire}


def hex_token(token: str) -> str:
    repeated = re.fullmatch(r"([0-9a-f]{2})×(\d+)", token)
    if repeated:
        return repeated.group(1) * int(repeated.group(2))
    expect(re.fullmatch(r"(?:[0-9a-f]{2})+", token), f"not hex: {token!r}")
    return token


def dump(lines: list[str]) -> tuple[bytes, list[str]]:
    """
    A worked example's code block: the whole hex (up to the first blank
    line), and the field-by-field lines after it (hex, two spaces, words).
    """
    blank = lines.index("") if "" in lines else len(lines)
    whole = bytes.fromhex("".join(line.strip() for line in lines[:blank]))
    return whole, [line for line in lines[blank + 1:] if line.strip()]


class WorkedExampleTests(SynchronousTestCase):
    """The hex dumps of the document are what the code produces and reads."""

    def setUp(self):
        self.text = read_doc()

    def test_examples(self):
        covered = set()
        for match in EXAMPLE.finditer(self.text):
            expression = match.group(1)
            whole, fields = dump(code_block_after(self.text, match.end()))
            if expression.startswith("wire.encode("):
                frame = eval(expression[len("wire.encode("):-1], SAFE)
                self.assertEqual(wire.decode(whole[4:]), frame, expression)
                self.assertEqual(int.from_bytes(whole[:4], "big"), len(whole) - 4)
                covered.add(type(frame).__name__)
            else:
                covered.add(expression.split("(")[0])
            self.assertEqual(whole, eval(expression, SAFE), expression)
            if fields:
                by_field = "".join(hex_token(token)
                                   for line in fields
                                   for token in re.split(r"\s{2,}", line.strip())[0].split())
                self.assertEqual(bytes.fromhex(by_field), whole,
                                 f"the field-by-field lines of {expression}")
        self.assertEqual(covered, {"Hello", "Welcome", "Key", "Ping", "wire.auth_transcript",
                                   "wire.rotation_statement"})

    def test_frame_lines(self):
        """The lines C{wire.Frame(...)   hex} of the PING/PONG section."""
        found = re.findall(r"^(wire\.[A-Z]\w*\(.*\))\s{2,}([0-9a-f ]+)$", self.text, re.M)
        self.assertGreaterEqual(len(found), 4)
        for expression, spaced in found:
            frame = eval(expression, SAFE)
            data = bytes.fromhex(spaced.replace(" ", ""))
            self.assertEqual(wire.encode(frame), data, expression)
            self.assertEqual(wire.decode(data[4:]), frame, expression)


STATEMENT_PART = re.compile(r"(?:=|\|\|)\s*(u8|u16|u32|u64|identity|blob16)\((.+?)\)\s*(?:--|$)")


def statement_parts(text: str, name: str) -> list[tuple[str, str]]:
    """The parts of C{name = enc(arg) || enc(arg) ...}, as the document lays them out."""
    start = text.index(f"\n{name} = ")
    block = text[start: text.index("```", start)]
    return STATEMENT_PART.findall(block)


def put_part(kind: str, value) -> bytes:
    if isinstance(value, str) and kind != "identity":
        value = value.encode()
    return put(Field("", kind), value, {})


class SignedStatementTests(SynchronousTestCase):
    """The byte-by-byte descriptions of what is signed, built by hand."""

    def test_auth_transcript(self):
        challenge, binding = os.urandom(32), os.urandom(32)
        args = {"challenge": challenge, "relay id": "relay-0a1b2c3d4e5f",
                "client id": "alice", "receive": 0, "channel_binding": binding}
        parts = statement_parts(read_doc(), "auth_transcript")
        self.assertEqual(len(parts), 6)
        by_hand = b"".join(put_part(kind, args.get(arg, arg.strip('"'))) for kind, arg in parts)
        self.assertEqual(by_hand, wire.auth_transcript(challenge, "relay-0a1b2c3d4e5f", "alice",
                                                       False, binding))

    def test_rotation_statement(self):
        old, new = os.urandom(300), os.urandom(420)
        args = {"id": "alice", "old key DER": old, "new key DER": new, "time": 2**63 - 1}
        parts = statement_parts(read_doc(), "rotation_statement")
        self.assertEqual(len(parts), 5)
        by_hand = b"".join(put_part(kind, args.get(arg, arg.strip('"'))) for kind, arg in parts)
        self.assertEqual(by_hand, wire.rotation_statement("alice", old, new, 2**63 - 1))


# Error codes -----------------------------------------------------------------


class ErrorTableTests(SynchronousTestCase):
    def test_every_code_has_its_row(self):
        text = read_doc()
        [section] = [s for s in sections(text) if s.title == "6. Error codes"]
        [table] = tables(section.lines)
        header, *rows = table
        self.assertEqual(header[:3], ["code", "name", "fatal"])
        documented = []
        for row in rows:
            code, name, fatal = int(row[0]), row[1].strip("`"), row[2]
            self.assertIn(name, wire.ErrorCode.__members__, f"row {code}: no such code")
            self.assertEqual(wire.ErrorCode[name].value, code, name)
            self.assertEqual(fatal, "yes" if wire.ErrorCode[name].fatal else "no", name)
            documented.append(code)
        self.assertEqual(documented, sorted(documented), "the table is not sorted by code")
        self.assertEqual(documented, sorted(c.value for c in wire.ErrorCode))


# The envelope ----------------------------------------------------------------


def _identity(name: str) -> keys.Identity:
    return keys.Identity(name, rsa.generate_private_key(public_exponent=65537, key_size=2048))


ALICE = _identity("alice")
BOB = _identity("bob")
PSS_32 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def envelope_tables(text: str) -> dict[int, list[list[str]]]:
    """The layout tables of §8.1, by the version their first row gives."""
    [section] = [s for s in sections(text) if s.title == "8.1 Layout"]
    found = {}
    for table in tables(section.lines):
        header, *rows = table
        expect(header[:4] == ["#", "field", "encoding", "content"], header)
        [version] = [row for row in rows if row[1] == "version"]
        found[int(re.match(r"\d+", version[3]).group())] = rows
    return found


def seal_by_hand(rows, plaintext: bytes, **overrides) -> tuple[bytes, envelope.Header]:
    """
    An envelope laid out as the table C{rows} says, sealed by ALICE for
    BOB with C{cryptography} alone; and the header the code must read.
    """
    content_key, nonce = os.urandom(32), os.urandom(12)
    values = {
        "suite": int(re.match(r"\d+", [r for r in rows if r[1] == "suite"][0][3]).group()),
        "version": int(re.match(r"\d+", [r for r in rows if r[1] == "version"][0][3]).group()),
        "sender": "alice",
        "sender fingerprint": hashlib.sha256(ALICE.public_der).digest(),
        "recipient": "bob",
        "recipient fingerprint": hashlib.sha256(BOB.public_der).digest(),
        "message id": bytes(range(16)),
        "timestamp": 1_700_000_000,
        "sequence": 42,
        "nonce": nonce,
    }
    values.update(overrides)
    out, header = b"", None
    for row in rows:
        field = parse_field(row[1], row[2])
        name = row[1]
        if name == "wrapped key":
            header = out
            value = BOB.public_key.encrypt(content_key, OAEP)
        elif name == "ciphertext":
            value = AESGCM(content_key).encrypt(nonce, plaintext, header)
        elif name == "signature":
            value = ALICE.private_key.sign(out, PSS_32, hashes.SHA256())
        else:
            value = values[name]
        out += put(field, value, {})
    expected = envelope.Header(values["version"], values["suite"], "alice",
                               values["sender fingerprint"], "bob",
                               values["recipient fingerprint"], values["message id"],
                               values["timestamp"],
                               values["sequence"] if any(r[1] == "sequence" for r in rows) else 0)
    return out, expected


class EnvelopeLayoutTests(SynchronousTestCase):
    """Envelopes sealed by hand from §8.1 are read and opened by the code."""

    def setUp(self):
        self.text = read_doc()
        self.layouts = envelope_tables(self.text)

    def test_both_versions_documented(self):
        self.assertEqual(set(self.layouts), set(envelope.VERSIONS))
        self.assertEqual(max(self.layouts), envelope.VERSION)

    def test_open(self):
        for version, rows in self.layouts.items():
            data, expected = seal_by_hand(rows, b"hello, bob")
            self.assertEqual(envelope.read_header(data), expected, f"version {version}")
            opened = envelope.open_envelope(data, BOB, ALICE.public_key)
            self.assertEqual(opened.header, expected)
            self.assertEqual(opened.plaintext, b"hello, bob")

    def test_header_size(self):
        """The header sizes the document gives (version 2, then 1)."""
        sizes = [int(n) for n in
                 re.findall(r"`(\d+) \+ len\(sender\) \+ len\(recipient\)`", self.text)]
        self.assertEqual(sizes, [100, 92])
        for version, size in zip((2, 1), sizes):
            data, _ = seal_by_hand(self.layouts[version], b"")
            parsed = envelope.parse(data)
            self.assertEqual(len(parsed.header_bytes), size + len("alice") + len("bob"))

    def test_ranges(self):
        """A value the document bounds (below 2^63) is malformed at the bound."""
        checked = 0
        for version, rows in self.layouts.items():
            for row in rows:
                field = parse_field(row[1], row[2])
                if field.below is None:
                    continue
                data, expected = seal_by_hand(rows, b"x", **{row[1]: field.below - 1})
                self.assertEqual(envelope.read_header(data), expected)
                data, _ = seal_by_hand(rows, b"x", **{row[1]: field.below})
                self.assertRaises(envelope.EnvelopeError, envelope.read_header, data)
                self.assertRaises(envelope.EnvelopeError, envelope.parse, data)
                checked += 1
        # The timestamp of both versions, the sequence number of version 2.
        self.assertEqual(checked, 3)

    def test_tampered(self):
        """Whatever byte of an envelope is changed, it no longer opens."""
        for version, rows in self.layouts.items():
            data, _ = seal_by_hand(rows, b"hello")
            for i in range(len(data)):
                tampered = bytearray(data)
                tampered[i] ^= 0x01
                self.assertRaises(envelope.EnvelopeError, envelope.open_envelope,
                                  bytes(tampered), BOB, ALICE.public_key)


# What the relay says ---------------------------------------------------------


def error_row(name: str) -> list[str]:
    [section] = [s for s in sections(read_doc()) if s.title == "6. Error codes"]
    [row] = [r for r in tables(section.lines)[0][1:] if r[1] == f"`{name}`"]
    return row


class Connection:
    """One client connection to a relay on a L{Clock}, frames in and out."""

    def __init__(self, factory) -> None:
        from twisted.internet.testing import StringTransportWithDisconnection

        self.transport = StringTransportWithDisconnection()
        self.session = factory.buildProtocol(None)
        self.transport.protocol = self.session
        self.session.makeConnection(self.transport)
        self.reader = wire.FrameBuffer(wire.LARGEST_ENVELOPE)
        [self.hello] = self.frames()

    def frames(self) -> list:
        data = self.transport.value()
        self.transport.clear()
        return self.reader.feed(data)

    def send(self, frame) -> None:
        self.session.dataReceived(wire.encode(frame))

    def auth(self, identity: keys.Identity, receive: bool = False) -> wire.Welcome:
        transcript = wire.auth_transcript(self.hello.challenge, self.hello.relay, identity.name,
                                          receive)
        self.send(wire.Auth(wire.PROTOCOL_VERSION, identity.name, identity.public_der,
                            identity.sign(transcript), receive))
        [welcome] = self.frames()
        return welcome


def relay(**settings):
    from twisted.internet.task import Clock

    from mailrelay.relay.protocol import RelayFactory
    from mailrelay.relay.store.memory import MemoryStore

    clock = Clock()
    factory = RelayFactory(MemoryStore(), clock, **settings)
    factory.storeReady()
    return factory, clock


class IdleTimeoutTextTests(SynchronousTestCase):
    """
    The idle timer of §4.4 restarts on any byte received, whole frame or
    not, and the relay's IDLE_TIMEOUT text is the one §6 quotes.
    """

    def setUp(self):
        # The auth and frame deadlines longer than the idle timeout, so that
        # only the idle timer can fire.
        factory, self.clock = relay(idle_timeout=300.0, auth_timeout=10_000.0,
                                    frame_timeout=10_000.0)
        connection = Connection(factory)
        self.transport, self.session, self.reader = (
            connection.transport, connection.session, connection.reader)

    def quoted(self) -> str:
        return re.search(r"The text says `([^`]+)`", error_row("IDLE_TIMEOUT")[3]).group(1)

    def test_text(self):
        self.clock.advance(299)
        self.assertTrue(self.transport.connected)
        self.clock.advance(1)
        [error] = self.reader.feed(self.transport.value())
        self.assertEqual((error.code, error.text), (wire.ErrorCode.IDLE_TIMEOUT, self.quoted()))

    def test_any_byte_restarts_it(self):
        self.clock.advance(299)
        self.session.dataReceived(b"\x00")  # the first byte of a frame's length, no more
        self.clock.advance(299)
        self.assertTrue(self.transport.connected)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        [error] = self.reader.feed(self.transport.value())
        self.assertEqual(error.code, wire.ErrorCode.IDLE_TIMEOUT)


class RotateTests(SynchronousTestCase):
    """ROTATE as §5 and §6 describe it: its refusal, its answer, the sessions it ends."""

    def setUp(self):
        self.factory, self.clock = relay()
        # Sending sessions both: neither supersedes the other (§4.5).
        self.rotating = Connection(self.factory)
        self.rotating.auth(ALICE)
        self.other = Connection(self.factory)
        self.other.auth(ALICE)
        self.new = _identity("alice")

    def rotate(self, timestamp: int) -> list:
        statement = wire.rotation_statement("alice", ALICE.public_der, self.new.public_der,
                                            timestamp)
        self.rotating.send(wire.Rotate(self.new.public_der, timestamp, ALICE.sign(statement),
                                       self.new.sign(statement)))
        return self.rotating.frames()

    def test_time_out_of_range(self):
        """Refused ROTATION_REFUSED with an empty ref; the session goes on."""
        [refusal] = self.rotate(2**63)
        self.assertEqual(refusal.code, wire.ErrorCode.ROTATION_REFUSED)
        self.assertEqual(refusal.ref, b"")
        self.assertTrue(refusal.text.startswith("key rotation refused: "), refusal.text)
        self.assertIn("`ref` is empty", error_row("ROTATION_REFUSED")[3])
        self.rotating.send(wire.Ping(bytes(8)))
        self.assertEqual(self.rotating.frames(), [wire.Pong(bytes(8))])

    def test_answer_and_supersession(self):
        """KEY with the new key and the rotation, both signatures; SUPERSEDED as quoted."""
        [answer] = self.rotate(1_700_000_000)
        statement = wire.rotation_statement("alice", ALICE.public_der, self.new.public_der,
                                            1_700_000_000)
        self.assertEqual((answer.identity, answer.public_key, answer.certificate),
                         ("alice", self.new.public_der, b""))
        [step] = answer.rotations
        self.assertEqual((step.old_key, step.new_key, step.timestamp, step.old_certificate),
                         (ALICE.public_der, self.new.public_der, 1_700_000_000, b""))
        self.assertTrue(keys.verify(ALICE.public_key, step.old_signature, statement))
        self.assertTrue(keys.verify(self.new.public_key, step.new_signature, statement))
        [ended] = self.other.frames()
        quoted = re.search(r"text `([^`]+)`\) a `ROTATE`", error_row("SUPERSEDED")[3]).group(1)
        self.assertEqual((ended.code, ended.text), (wire.ErrorCode.SUPERSEDED, quoted))
        self.assertFalse(self.other.transport.connected)


class RateLimitTests(SynchronousTestCase):
    """RATE_LIMITED sits where §5 SEND puts it: after the envelope is read, before the sender."""

    def test_order_and_ref(self):
        factory, clock = relay(rate=0.001, burst=1)
        bob = Connection(factory)
        bob.auth(BOB)
        # Not an envelope: refused before the rate, so it takes nothing.
        bob.send(wire.Send(b"not an envelope"))
        [bad] = bob.frames()
        self.assertEqual((bad.code, bad.ref), (wire.ErrorCode.BAD_ENVELOPE, b""))
        # Sealed by alice: not this session's, yet it counts against the rate...
        first = envelope.seal(ALICE, "bob", BOB.public_key, b"1", message_id=bytes(16))
        bob.send(wire.Send(first))
        [mismatch] = bob.frames()
        self.assertEqual(mismatch.code, wire.ErrorCode.SENDER_MISMATCH)
        # ... and the next is refused for the rate before its sender is looked at.
        second = envelope.seal(ALICE, "bob", BOB.public_key, b"2", message_id=b"\x01" * 16)
        bob.send(wire.Send(second))
        [limited] = bob.frames()
        self.assertEqual((limited.code, limited.ref), (wire.ErrorCode.RATE_LIMITED, b"\x01" * 16))
        self.assertIn("retry in", limited.text)
