"""SMTP client protocol, sans I/O: reply parsing, command rendering, EHLO keywords.

Takes the bytes a next hop sends (`ReplyParser.feed`) and hands back complete `Reply`
values; renders commands as bytes. It trusts neither side: a reply line that is not
`DDD-text` / `DDD text`, a code that changes inside a multi-line reply, an over-long
line or an endless reply raises ProtocolError; a command argument containing CR, LF or
NUL raises CommandError before anything is written, so an address or DSN value taken
from a client can never add a line of its own on the wire. No asyncio here: the
connection layer (relay.delivery.client) only reads, feeds, awaits and writes.

RFCs: 5321 (4.2 replies, 4.5.3.1 limits), 2034/3463 (enhanced status codes), 1870 SIZE,
6152 8BITMIME, 2920 PIPELINING, 3461 DSN, 6531 SMTPUTF8, 4954 AUTH.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 4.5.3.1.5 says 512 octets per reply line; real servers exceed it a little
# (long EHLO keywords, banners), so allow 2 KiB before calling it garbage.
MAX_LINE = 2048
# A reply of more lines than this is no SMTP server we want to talk to (EHLO replies
# have a few dozen lines at most).
MAX_LINES = 128
MAX_REPLY = 64 * 1024

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class ProtocolError(Exception):
    """The next hop sent something that is not an SMTP reply."""


class CommandError(ValueError):
    """A command argument would break the line structure (CR, LF, NUL)."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]          # text after 'DDD-' / 'DDD ', one per line

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code when the server gave one of the reply's class, else ''."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code // 100):
            return m.group(0)
        return ""

    @property
    def text(self) -> str:
        """First line's text without the enhanced code (for logs)."""
        first = self.lines[0] if self.lines else ""
        e = self.enhanced
        return first[len(e):].strip() if e else first.strip()

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temp(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_perm(self) -> bool:
        return self.code >= 500

    def status(self, default_temp: str = "4.0.0", default_perm: str = "5.0.0") -> str:
        if self.enhanced:
            return self.enhanced
        return "2.0.0" if self.code < 400 else default_temp if self.code < 500 else default_perm

    def __str__(self) -> str:
        """One line for logs and Recipient.last_error: '550 5.1.1 text'."""
        return f"{self.code} {self.lines[0] if self.lines else ''}".strip()


class ReplyParser:
    """Feed bytes, pull complete replies. Line ends are CRLF; a bare LF is accepted
    (lenient servers), a bare CR inside a line is garbage."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0
        self._size = 0
        # How far the buffer was already searched for LF: keeps feeding O(bytes read)
        # even when a hostile server trickles a long line one byte at a time.
        self._scanned = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned reply (incl. partial lines)."""
        return len(self._buf) + (self._size if self._lines else 0)

    def next_reply(self) -> Reply | None:
        """A complete reply, or None when more bytes are needed."""
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(self._buf)
                if len(self._buf) > MAX_LINE:
                    raise ProtocolError("reply line too long")
                return None
            raw = bytes(self._buf[:nl + 1])
            del self._buf[:nl + 1]
            self._scanned = 0
            if len(raw) > MAX_LINE:
                raise ProtocolError("reply line too long")
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if b"\r" in line or b"\0" in line:
                raise ProtocolError("bare CR or NUL in reply")
            reply = self._take_line(line, len(raw))
            if reply is not None:
                return reply

    def _take_line(self, line: bytes, size: int) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise ProtocolError(f"not an SMTP reply line: {line[:40]!r}")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code out of range: {code}")
        if self._lines and code != self._code:
            raise ProtocolError("reply code changed inside a multi-line reply")
        self._code = code
        self._size += size
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_LINES or self._size > MAX_REPLY:
            raise ProtocolError("reply too long")
        if line[3:4] == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code, self._size = [], 0, 0
        return reply


# --- commands -----------------------------------------------------------------------

_FORBIDDEN = re.compile(r"[\r\n\0]")
# ESMTP parameter values (RFC 5321 4.1.2 esmtp-value; xtext of RFC 3461 fits inside):
# printable ASCII without '=' or space, so a value can never start another parameter.
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_ESMTP_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def _check(arg: str) -> str:
    if _FORBIDDEN.search(arg):
        raise CommandError(f"CR, LF or NUL in command argument {arg[:40]!r}")
    return arg


def render(verb: str, arg: str = "") -> bytes:
    """'VERB arg\\r\\n' as UTF-8 (RFC 6531 allows UTF-8 addresses once SMTPUTF8 is agreed)."""
    _check(verb)
    line = f"{verb} {_check(arg)}" if arg else verb
    return line.encode("utf-8") + b"\r\n"


def _params(params: dict[str, str | None]) -> str:
    out = []
    for key, value in params.items():
        if not _ESMTP_KEY.fullmatch(key):
            raise CommandError(f"bad ESMTP keyword {key!r}")
        if value is None:
            out.append(key)
        elif not _ESMTP_VALUE.fullmatch(value):
            raise CommandError(f"bad ESMTP value for {key}: {value[:40]!r}")
        else:
            out.append(f"{key}={value}")
    return "".join(" " + p for p in out)


def _path(address: str) -> str:
    if "<" in address or ">" in address:
        # An angle bracket inside the path would let the rest pose as parameters.
        raise CommandError(f"angle bracket in address {address[:40]!r}")
    return f"<{_check(address)}>"


def mail_from(sender: str, params: dict[str, str | None] | None = None) -> bytes:
    return render("MAIL", f"FROM:{_path(sender)}{_params(params or {})}")


def rcpt_to(address: str, params: dict[str, str | None] | None = None) -> bytes:
    return render("RCPT", f"TO:{_path(address)}{_params(params or {})}")


def ehlo(name: str) -> bytes:
    if not name or " " in name:
        raise CommandError(f"bad EHLO name {name!r}")
    return render("EHLO", name)


def helo(name: str) -> bytes:
    if not name or " " in name:
        raise CommandError(f"bad HELO name {name!r}")
    return render("HELO", name)


DATA = b"DATA\r\n"
RSET = b"RSET\r\n"
QUIT = b"QUIT\r\n"
STARTTLS = b"STARTTLS\r\n"


# --- EHLO keywords ------------------------------------------------------------------

@dataclass(frozen=True)
class Extensions:
    """What a next hop's EHLO reply offers. Keywords upper-cased, params as given."""

    keywords: dict[str, str]

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        kw: dict[str, str] = {}
        for line in reply.lines[1:]:      # the first line is the server's greeting name
            parts = line.strip().split(None, 1)
            if parts:
                kw[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
        return cls(kw)

    @classmethod
    def none(cls) -> Extensions:
        """After HELO: no extensions at all."""
        return cls({})

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int:
        """The SIZE the server declared; 0 = none declared (RFC 1870 4)."""
        v = self.keywords.get("SIZE", "")
        return int(v) if v.isdigit() else 0

    @property
    def auth_mechanisms(self) -> set[str]:
        mech = self.keywords.get("AUTH", "")
        out = {m.upper() for m in mech.split()}
        # Some old servers still say 'AUTH=LOGIN PLAIN'.
        for k, v in self.keywords.items():
            if k.startswith("AUTH="):
                out.add(k[5:])
                out.update(m.upper() for m in v.split())
        return out
