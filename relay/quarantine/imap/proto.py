"""IMAP4rev1 wire format, sans I/O: bytes in -> typed command events; values -> reply bytes.

Takes raw bytes from a client connection (`Parser.feed`) and hands on events
(`next_event`): a complete `Command` (tag, name, tokens with literals resolved), a
`Continue` the server must answer with "+" before a synchronizing literal is sent, a
`RawLine` (AUTHENTICATE responses, IDLE's DONE) or a `Bad` the server answers with BAD.
Renders values (strings, nstrings, lists, NIL) back to bytes with `render`.

Trusts nothing: every line is capped (`max_line`), a literal's announced size is checked
against `max_literal` before a byte of it is read (RFC 7888: for a non-synchronizing
literal the announced bytes are skipped, not stored, so the connection stays in step),
parenthesized lists nest at most `max_depth` deep, and scanning is O(bytes fed).
No asyncio here: tests feed bytes split at every offset.
RFCs: 3501 (syntax, section 9), 7888 (LITERAL+).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class Atom(str):
    """An unquoted token (atom, flag, sequence set, fetch attribute, NIL)."""


@dataclass(frozen=True)
class Command:
    tag: str
    name: str                    # upper-cased
    args: list = field(default_factory=list)   # Atom | bytes (strings) | list (nested)


@dataclass(frozen=True)
class Continue:
    """Send '+ ...' now: the client waits for it before a synchronizing literal."""


@dataclass(frozen=True)
class Bad:
    tag: str | None              # None: answer with an untagged '* BAD'
    text: str


@dataclass(frozen=True)
class RawLine:
    line: bytes


class ParseError(Exception):
    pass


_LITERAL_RE = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5a\x5e-\x7a\x7c\x7e]{1,64}")
# RFC 3501 9: ATOM-CHAR is any CHAR except atom-specials; we also take "*" and "%"
# (sequence sets, LIST patterns: list-char), "\\" (flags) and "]" (sections), like
# Dovecot does; '[' opens a section spec that atom() reads whole.
_ATOM_STOP = frozenset(b"(){ \"]\r\n") | frozenset(range(0, 0x20)) | {0x7F}


class Parser:
    def __init__(self, max_line: int = 16 * 1024, max_literal: int = 64 * 1024 * 1024,
                 max_depth: int = 16, max_parts: int = 1000) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_depth = max_depth
        self.max_parts = max_parts
        self._buf = bytearray()
        self._scanned = 0            # bytes of _buf already searched for LF
        self._parts: list[bytes] = []
        self._literal = 0            # bytes of literal still to read
        self._discard = False        # skipping an oversized non-synchronizing literal
        self._skip_line = False      # skipping the rest of an over-long line
        self._pending_bad: Bad | None = None
        self._raw = False
        self._total = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def expect_line(self) -> None:
        """The next event is the next line as a RawLine (AUTHENTICATE, IDLE)."""
        self._raw = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _reset(self) -> None:
        self._parts, self._total = [], 0

    def _tag_of(self, line: bytes) -> str | None:
        m = _TAG_RE.match(line)
        return m.group().decode() if m and line[m.end():m.end() + 1] in (b" ", b"") else None

    def next_event(self) -> Command | Continue | Bad | RawLine | None:
        while True:
            if self._literal:
                take = min(self._literal, len(self._buf))
                if not take:
                    return None
                if not self._discard:
                    self._parts[-1] += bytes(self._buf[:take])
                del self._buf[:take]
                self._literal -= take
                self._scanned = 0
                if self._literal:
                    return None
                if not self._discard:
                    self._parts.append(b"")
                continue
            idx = self._buf.find(b"\n", self._scanned)
            if idx < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > self.max_line:
                    # Drop what we have and everything up to the next LF (the answer
                    # is BAD, and the next line is parsed as a fresh command).
                    if not self._skip_line:
                        tag = self._tag_of(bytes(self._buf[:70])) if not self._parts else (
                            self._tag_of(self._parts[0][:70]))
                        self._pending_bad = Bad(tag, "Line too long")
                    self._skip_line = True
                    del self._buf[:]
                    self._scanned = 0
                return None
            line = bytes(self._buf[:idx])
            del self._buf[:idx + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._skip_line:
                self._skip_line = False
                self._reset()
                bad, self._pending_bad = self._pending_bad, None
                return bad or Bad(None, "Line too long")
            if len(line) > self.max_line:
                tag = self._tag_of((self._parts[0] if self._parts else line)[:70])
                self._reset()
                return Bad(tag, "Line too long")
            if self._raw:
                self._raw = False
                return RawLine(line)
            if self._discard:
                # The line after a skipped literal ends the refused command, unless it
                # announces another non-synchronizing literal: skip that one too. (A
                # synchronizing one waits for a '+' that never comes; the BAD ends it.)
                m = _LITERAL_RE.search(line)
                if m and m.group(2):
                    self._literal = int(m.group(1))
                    continue
                self._discard = False
                bad, self._pending_bad = self._pending_bad, None
                self._reset()
                return bad or Bad(None, "Command refused")
            if self._parts:
                self._parts[-1] += line
            else:
                self._parts.append(line)
            self._total += len(line)
            m = _LITERAL_RE.search(line)
            if not m:
                parts = self._parts
                self._reset()
                return self._parse(parts)
            n, nonsync = int(m.group(1)), bool(m.group(2))
            tag = self._tag_of(self._parts[0][:70])
            if tag is None:
                self._reset()
                if nonsync:
                    self._literal, self._discard = n, True
                    self._pending_bad = Bad(None, "Invalid tag")
                    continue
                return Bad(None, "Invalid tag")
            # Checked before reading it (RFC 7888 4): the limit is on what is announced.
            if n > self.max_literal or self._total + n > self.max_literal + self.max_line or (
                    len(self._parts) >= self.max_parts):
                self._reset()
                text = "[TOOBIG] Literal too big"
                if nonsync:
                    self._literal, self._discard = n, True
                    self._pending_bad = Bad(tag, text)
                    continue
                return Bad(tag, text)
            self._parts[-1] = self._parts[-1][:m.start()] + b"{%d}" % n
            self._parts.append(b"")      # the literal's bytes go here
            self._total += n
            self._literal = n
            if n == 0:
                self._parts.append(b"")
            if not nonsync:
                return Continue()

    def _parse(self, parts: list[bytes]) -> Command | Bad:
        first = parts[0]
        tag = self._tag_of(first[:70])
        if tag is None:
            return Bad(None, "Invalid tag" if first.strip() else "Empty command line")
        rest = first[len(tag):]
        if not rest.startswith(b" "):
            return Bad(tag, "Missing command")
        tok = _Tokens(parts, len(tag) + 1, self.max_depth)
        try:
            name = tok.atom()
            args = tok.rest()
        except ParseError as e:
            return Bad(tag, str(e))
        return Command(tag, name.upper(), args)


class _Tokens:
    """Walks a command's parts: text segments, each literal in its own element, so
    literal bytes are never scanned for syntax."""

    def __init__(self, parts: list[bytes], pos: int, max_depth: int) -> None:
        # parts alternate: text, literal, text, literal, ..., text
        self.parts = parts
        self.i = 0
        self.pos = pos
        self.max_depth = max_depth

    @property
    def text(self) -> bytes:
        return self.parts[self.i]

    def _peek(self) -> int | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def atom(self) -> Atom:
        start = self.pos
        t = self.text
        depth = 0
        while self.pos < len(t):
            c = t[self.pos]
            if c == 0x5B:           # '[': a section spec may hold spaces and lists
                depth += 1
            elif c == 0x5D and depth:
                depth -= 1
            elif depth and c not in (0x0D, 0x0A) and c >= 0x20:
                pass
            elif c in _ATOM_STOP and c != 0x5D:
                break
            self.pos += 1
        if depth:
            raise ParseError("Unbalanced brackets")
        if self.pos == start:
            raise ParseError("Syntax error")
        return Atom(t[start:self.pos].decode("ascii", "replace"))

    def rest(self) -> list:
        out = self._items(0)
        if self.i != len(self.parts) - 1 or self.pos != len(self.text):
            raise ParseError("Unexpected ')'")
        return out

    def _items(self, depth: int) -> list:
        out: list = []
        while True:
            c = self._peek()
            if c is None:
                if self.i == len(self.parts) - 1:
                    if depth:
                        raise ParseError("Missing ')'")
                    return out
                raise ParseError("Syntax error near literal")
            if c == 0x20:
                self.pos += 1
                if self._peek() == 0x20 or self._peek() is None and not out:
                    raise ParseError("Unexpected space")
                continue
            if c == 0x29:           # ')'
                if not depth:
                    raise ParseError("Unexpected ')'")
                self.pos += 1
                return out
            if out and self.text[self.pos - 1] not in (0x20, 0x28):
                raise ParseError("Missing space")
            if c == 0x28:           # '('
                if depth + 1 > self.max_depth:
                    raise ParseError("Too deeply nested")
                self.pos += 1
                out.append(self._items(depth + 1))
            elif c == 0x22:         # '"'
                out.append(self._quoted())
            elif c == 0x7B:         # '{': a literal; its bytes are the next part
                m = re.match(rb"\{(\d+)\}\Z", self.text[self.pos:])
                if not m or self.i + 2 >= len(self.parts) + 1:
                    raise ParseError("Bad literal")
                out.append(self.parts[self.i + 1])
                self.i += 2
                self.pos = 0
            else:
                out.append(self.atom())

    def _quoted(self) -> bytes:
        t = self.text
        self.pos += 1
        out = bytearray()
        while self.pos < len(t):
            c = t[self.pos]
            if c == 0x5C:           # backslash escapes only '"' and '\'
                if self.pos + 1 < len(t) and t[self.pos + 1] in (0x22, 0x5C):
                    out.append(t[self.pos + 1])
                    self.pos += 2
                    continue
                raise ParseError("Bad escape in quoted string")
            if c == 0x22:
                self.pos += 1
                return bytes(out)
            if c in (0x0D, 0x0A, 0x00):
                break
            out.append(c)
            self.pos += 1
        raise ParseError("Unterminated quoted string")


# --- rendering -------------------------------------------------------------------------

NIL = Atom("NIL")


class Raw(bytes):
    """Bytes put on the wire as they are (an already rendered piece)."""


class Literal(bytes):
    """Bytes always sent as a literal (message data: served exactly)."""


def string(value: bytes | str) -> bytes:
    """A quoted string when safe, else a literal (CR, LF, 8-bit or long); NUL dropped."""
    b = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if 0 in b:      # NUL may appear in no IMAP string (RFC 3501 9: CHAR8 is %x01-ff)
        b = b.replace(b"\0", b"")
    if len(b) > 1024 or 0x0D in b or 0x0A in b or any(c > 0x7E for c in b):
        return b"{%d}\r\n" % len(b) + b
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def render(value) -> bytes:
    if value is None:
        return b"NIL"
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, Literal):
        return b"{%d}\r\n" % len(value) + value
    if isinstance(value, Atom):
        return value.encode("ascii", "replace")
    if isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, bytes | str):
        return string(value)
    if isinstance(value, list | tuple):
        return b"(" + b" ".join(render(v) for v in value) + b")"
    raise TypeError(f"cannot render {type(value).__name__}")


def astring_value(tok) -> str:
    """An astring argument (atom or string) as text (UTF-8, bad bytes kept escaped)."""
    if isinstance(tok, bytes):
        return tok.decode("utf-8", "surrogateescape")
    if isinstance(tok, str):
        return str(tok)
    raise ParseError("Expected a string")


# --- modified UTF-7 mailbox names (RFC 3501 5.1.3) -------------------------------------

def mutf7_valid(name: str) -> bool:
    """True if `name` is well-formed modified UTF-7 (we store names as clients send them)."""
    i = 0
    while i < len(name):
        c = name[i]
        if ord(c) > 0x7E or ord(c) < 0x20:
            return False
        if c == "&":
            j = name.find("-", i)
            if j < 0:
                return False
            if j > i + 1 and not re.fullmatch(r"[A-Za-z0-9+,]+", name[i + 1:j]):
                return False
            i = j
        i += 1
    return True
