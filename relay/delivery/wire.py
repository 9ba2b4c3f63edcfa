"""Outbound wire form of a message: the exact DATA bytes we send to a next hop.

Takes a message as stored by the spool (head + body; normally CRLF-clean because the
inbound side rejects bare newlines, but a release from quarantine or an old spool may
not be), whole (`to_wire`) or piece by piece as it streams from the spool
(`WireEncoder`), and hands back the DATA payload ending in the terminating
CRLF.CRLF. It trusts nothing about the input: every bare CR and bare LF becomes CRLF,
and every line that starts with '.' gets one more (RFC 5321 4.5.2), so no byte sequence
in a message can end the DATA phase early at the next hop (SMTP smuggling,
CVE-2023-51764/51765/51766). Plain code, no I/O.
"""

from __future__ import annotations

import re

# Any line end we might meet: CRLF first so it is kept as one line end, then a lone CR
# or LF, each of which a lenient next hop could take as the end of a line.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_TERMINATOR = b".\r\n"

Piece = bytes | memoryview


def is_crlf_clean(message: bytes) -> bool:
    """True when every CR and LF in `message` belongs to a CRLF pair."""
    crlf = message.count(b"\r\n")
    return message.count(b"\r") == crlf and message.count(b"\n") == crlf


def _convert(message: bytes) -> bytes:
    """The full conversion: CRLF line ends, dot-stuffed, a final CRLF, no terminator."""
    if not is_crlf_clean(message):
        # Slow path (rare): rebuild the line ends from our own line model.
        message = _LINE_END.sub(b"\r\n", message)
    # Dot-stuffing: with only CRLF line ends left, a line start is the buffer start or
    # the byte after a CRLF, so one replace covers every line.
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed


def to_wire(message: bytes, ready: bool = False) -> bytes:
    """DATA payload for `message`: CRLF line ends, dot-stuffed, ending in CRLF.CRLF.
    `ready`: the inbound side already proved the message CRLF-only with no line
    starting with '.' (Envelope.wire_ready), so every line up to the last CRLF goes out
    as it is; only a first line starting with '.' or an unfinished last line (neither
    can come from the inbound side) gets the full conversion."""
    if ready and not message.startswith(b"."):
        i = message.rfind(b"\r\n")
        cut = i + 2 if i >= 0 else 0
        if cut == len(message):
            return message + _TERMINATOR
        return message[:cut] + _convert(message[cut:]) + _TERMINATOR
    return _convert(message) + _TERMINATOR


class WireEncoder:
    """to_wire one piece at a time, with exactly to_wire's output however the message
    is cut: `feed` each stored piece, send what it returns, then what `finish` returns.
    Holds O(1) state for the full conversion (an unpaired CR at a piece's end waits for
    the next piece, which may start with its LF), and in `ready` mode only the
    unfinished last line (at most a line, 1000 bytes, for a truthful flag)."""

    # A `ready` message whose unfinished line grows past this is lying about its lines
    # (the inbound side allows 1000 bytes): convert everything from there on instead of
    # holding an unbounded line. Only then can the output differ from to_wire (it is
    # still CRLF-only and dot-stuffed from that point).
    MAX_CARRY = 64 * 1024

    __slots__ = ("_ready", "_started", "_carry", "_cr", "_bol")

    def __init__(self, ready: bool = False):
        self._ready = ready
        self._started = False       # a non-empty piece was fed
        self._carry = b""           # ready: bytes after the last CRLF so far
        self._cr = False            # full: the input so far ends in a CR (held back)
        self._bol = True            # full: the output so far ends a line

    def feed(self, data: bytes) -> list[Piece]:
        if not data:
            return []
        if not self._started:
            self._started = True
            if data[:1] == b".":
                self._ready = False     # to_wire converts such a message in full
        if not self._ready:
            return self._full(data)
        i = data.rfind(b"\r\n")
        if i >= 0:
            cut = i + 2
        elif data[:1] == b"\n" and self._carry.endswith(b"\r"):
            cut = 1                     # a CRLF split between two pieces
        else:
            self._carry += data
            if len(self._carry) > self.MAX_CARRY:
                carry, self._carry, self._ready = self._carry, b"", False
                return self._full(carry)
            return []
        out: list[Piece] = [self._carry] if self._carry else []
        out.append(data if cut == len(data) else memoryview(data)[:cut])
        self._carry = data[cut:]
        return out

    def _full(self, data: bytes) -> list[Piece]:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            # Its LF may start the next piece: a CRLF must stay one line end.
            data = data[:-1]
            self._cr = True
            if not data:
                return []
        out = _convert_open(data)
        if self._bol and out[:1] == b".":
            out = b"." + out
        self._bol = out.endswith(b"\r\n")
        return [out]

    def finish(self) -> list[Piece]:
        """The rest: a held CR or an unfinished last line, then the terminator."""
        out: list[Piece] = []
        if self._ready:
            if self._carry:
                out = self._full(self._carry)
                self._carry = b""
            else:
                return [_TERMINATOR]
        if self._cr:
            out.append(b"\r\n")     # a CR at the very end is a line end of its own
            self._cr = False
        elif not self._bol:
            out.append(b"\r\n")
        self._bol = True
        out.append(_TERMINATOR)
        return out


def _convert_open(data: bytes) -> bytes:
    """_convert without the final CRLF and the first line's dot (the encoder knows
    whether this piece starts a line)."""
    if not is_crlf_clean(data):
        data = _LINE_END.sub(b"\r\n", data)
    return data.replace(b"\r\n.", b"\r\n..")


def needs_8bit(message: bytes) -> bool:
    """True when the message has bytes above 127 (BODY=8BITMIME territory, RFC 6152)."""
    return not message.isascii()
