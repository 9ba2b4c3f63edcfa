"""DATA framing: find the end of data, undo dot-stuffing, refuse smuggling. Sans-IO.

Takes the raw bytes that follow `354` in whatever chunks the network delivers; hands
on the message content (dot-unstuffed, CRLF line ends) in pieces, the header block
separately (so filters can read and edit it while the body streams to the spool), and
whatever bytes came after the terminating CRLF.CRLF (pipelined commands).

Trusts nothing. The only end of data is CRLF "." CRLF (RFC 5321 4.1.1.4): `\\n.\\n`,
`\\r.\\r`, `\\r\\n.\\r`, `\\n.\\r\\n` are content, never an end, so a message can never be
split into two (SMTP smuggling, CVE-2023-51766 and friends). A bare CR or LF anywhere
makes the whole message refused once it ends (as Postfix's smtpd_forbid_bare_newline),
or, if configured, turned into CRLF. Work per chunk is O(bytes) in C: one find for the
end marker, counts for bare line ends, one replace for dot-stuffing (RFC 5321 4.5.2).
We only keep the unfinished last line between chunks, never more than a line (lines
longer than the limit are flagged and their bytes passed on), so memory is bounded.
"""

from __future__ import annotations

import enum
import re

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF; a client's
# transparency dot may add one more.
MAX_LINE = 1001
# The header section is kept in memory for filters to read and edit (and to remove
# forged Authentication-Results from); one larger than this is refused (552 5.3.4), as
# no real mail needs it and streaming it as "body" would hide headers from the filters.
HEADER_LIMIT = 1 << 20
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

try:
    # The C fast path for clean chunks (relay/smtp/_scan.c); this module stays the
    # reference and takes every chunk when the extension was not built.
    from relay.smtp._scan import scan as _scan
except ImportError:             # pragma: no cover - depends on the build
    _scan = None


def _cut(buf: bytes | bytearray, i: int, j: int) -> tuple[bytes | bytearray, bytes]:
    """(buf[:i], bytes(buf[j:])): the first part is the big one (content), the second
    is small (an unfinished line, or commands pipelined after the final dot). A
    bytearray is the reader's own (the connection hands its buffer over, or it was
    built here), so it is cut in place rather than copied."""
    if isinstance(buf, bytearray):
        rest = bytes(buf[j:])
        del buf[i:]
        return buf, rest
    return buf[:i], buf[j:]


class DataError(enum.Enum):
    NONE = "none"
    TOO_BIG = "too_big"             # 552 5.3.4
    BARE_NEWLINE = "bare_newline"   # 550 5.5.2 (smuggling defence)
    LINE_TOO_LONG = "line_too_long"  # 500 5.5.2
    HEADER_TOO_BIG = "header_too_big"  # 552 5.3.4


class DataReader:
    def __init__(self, max_size: int, normalize: bool = False, max_line: int = MAX_LINE):
        self.max_size = max_size
        self.normalize = normalize
        self.max_line = max_line
        self.size = 0                   # content bytes seen (after unstuffing)
        self.error = DataError.NONE
        self.done = False
        self.head: bytes | None = None  # header block, incl. the CRLF of its last line
        # Did any line start with '.'? If not, the content (CRLF-only by now) is its own
        # wire form: delivery sends it without scanning it again for dots.
        self.dots = False
        # Any byte above 127? Delivery must know before MAIL FROM (BODY=8BITMIME).
        self.eight_bit = False
        self._head_buf = bytearray()
        self._tail = b""                # an unfinished line, at most max_line-ish

    def feed(self, data: bytes | bytearray) -> tuple[list[bytes], bytes]:
        """Consume network bytes. Returns (body pieces to store, bytes after the end).
        Once `done` is True, the second value holds what the client pipelined after
        the final dot; nothing more may be fed. `data` may be a bytearray the caller
        gives up (the connection's buffer): the reader then owns it, cuts it in place
        and may hand it on as a piece."""
        assert not self.done
        if self._tail:
            buf = bytearray(self._tail)     # the line carried over, then the new bytes:
            buf += data                     # one copy, into a buffer of our own
        else:
            buf = data
        fast = _scan(buf, self.max_line) if _scan is not None else None
        if fast is not None:
            # A clean chunk (the usual case): the C scan found the end, the cut and
            # whether any line starts with a dot, in one pass.
            end, cut, dots = fast
            if end >= 0:
                content, rest = _cut(buf, end, end + 3)
                self._tail = b""
                self.done = True
            else:
                content, self._tail = _cut(buf, cut, cut)
                rest = b""
            if not content:
                return [], rest
            return self._store(self._unstuff(content) if dots else content), rest
        # The content always starts at a line start, so the end marker may be the first
        # three bytes; elsewhere it is CRLF.CRLF with the CRLF belonging to the content.
        if buf.startswith(b".\r\n"):
            end, skip = 0, 3
        else:
            end = buf.find(b"\r\n.\r\n")
            skip = 5
        if end >= 0:
            content = buf[: end + 2] if skip == 5 else b""
            rest = buf[end + skip:]
            self._tail = b""
            self.done = True
        else:
            # Hand on whole lines only, so dot-stuffing and line-end checks never straddle
            # a chunk boundary. A line longer than the limit is an error anyway: pass its
            # bytes on (keeping a few for the end-marker search) to stay bounded.
            # Only CRLF ends a line: after a bare LF the next byte is not at a line
            # start (else "\n.\r\n" would end the data: smuggling).
            cut = buf.rfind(b"\r\n") + 2
            if cut == 1:
                cut = 0
            if cut == 0 and len(buf) > self.max_line:
                cut = len(buf) - 4
                self._flag(DataError.LINE_TOO_LONG)
            content, self._tail = buf[:cut], buf[cut:]
            if len(self._tail) > self.max_line:
                self._flag(DataError.LINE_TOO_LONG)
            rest = b""
        return (self._process(content) if content else []), rest

    def _flag(self, err: DataError) -> None:
        if self.error is DataError.NONE:
            self.error = err

    def _process(self, content: bytes) -> list[bytes]:
        # One split on CRLF answers both checks in C: what is left between the CRLFs
        # must hold no CR or LF (else a bare one exists), and the pieces are the lines.
        # (Three counts plus a split on LF cost twice as much per byte.)
        lines = content.split(b"\r\n")
        rest = b"".join(lines)
        if b"\r" in rest or b"\n" in rest:
            if self.normalize:
                content = _BARE.sub(b"\r\n", content)
            else:
                self._flag(DataError.BARE_NEWLINE)
            longest = max(map(len, content.split(b"\n")))
        else:
            # A piece lacks the CR an LF-split line would count, except the last.
            longest = max(max(map(len, lines[:-1]), default=-1) + 1, len(lines[-1]))
        if len(content) > self.max_line and self.error is DataError.NONE:
            if longest > self.max_line:
                self._flag(DataError.LINE_TOO_LONG)
        if b"." in content:
            content = self._unstuff(content)
        return self._store(content)

    def _unstuff(self, content: bytes) -> bytes:
        """Undo dot-stuffing (RFC 5321 4.5.2) in whole CRLF-only lines."""
        # content starts at a line start: a leading dot is stuffing too.
        if content[:1] == b".":
            content = content[1:]
            self.dots = True
        # Every LF left is part of a CRLF here (bare ones were refused or normalised),
        # and searching the three bytes is cheaper than "\n." (fewer false starts).
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
            self.dots = True
        return content

    def _store(self, content: bytes) -> list[bytes]:
        self.size += len(content)
        if not self.eight_bit and not content.isascii():
            self.eight_bit = True
        if self.size > self.max_size:
            self._flag(DataError.TOO_BIG)
        if self.error is not DataError.NONE:
            return []               # keep reading to the end, store nothing
        if self.head is None:
            return self._split_head(content)
        return [content]

    def _split_head(self, content: bytes) -> list[bytes]:
        """Collect the header block (up to the empty line) for filters to edit."""
        hb = self._head_buf
        if not hb:
            # Usually the whole header block is in the first chunk: split it there,
            # without copying the chunk into the buffer first.
            i = 0 if content[:2] == b"\r\n" else content.find(b"\r\n\r\n")
            if i >= 0:
                end = i + 2 if i else 0
                if end > HEADER_LIMIT:
                    self._flag(DataError.HEADER_TOO_BIG)
                    return []
                self.head = bytes(content[:end])
                if end == len(content):
                    return []
                if isinstance(content, bytearray):
                    del content[:end]       # ours: drop the head in place, no copy
                    return [content]
                return [content[end:]]
        start = max(0, len(hb) - 3)
        hb += content
        if hb[:2] == b"\r\n":
            end = 0                 # no header at all: the body starts at once
        else:
            i = hb.find(b"\r\n\r\n", start)
            end = i + 2 if i >= 0 else -1
        if 0 <= end <= HEADER_LIMIT:
            self.head = bytes(hb[:end])
            body = bytes(hb[end:])
            self._head_buf = bytearray()
            return [body] if body else []
        if end > HEADER_LIMIT or len(hb) > HEADER_LIMIT:
            self._flag(DataError.HEADER_TOO_BIG)
            self._head_buf = bytearray()
        return []

    def finish_head(self) -> bytes:
        """At end of data: a message with no empty line is all header."""
        if self.head is None:
            self.head = bytes(self._head_buf)
            self._head_buf = bytearray()
        return self.head
