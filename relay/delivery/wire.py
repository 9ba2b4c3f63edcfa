"""Outbound wire form of a message: the exact DATA bytes we send to a next hop.

Takes a message as stored by the spool (head + body; normally CRLF-clean because the
inbound side rejects bare newlines, but a release from quarantine or an old spool may
not be) and hands back the DATA payload ending in the terminating CRLF.CRLF. It trusts
nothing about the input: every bare CR and bare LF becomes CRLF, and every line that
starts with '.' gets one more (RFC 5321 4.5.2), so no byte sequence in a message can end
the DATA phase early at the next hop (SMTP smuggling, CVE-2023-51764/51765/51766).
Plain code, no I/O.
"""

from __future__ import annotations

import re

# Any line end we might meet: CRLF first so it is kept as one line end, then a lone CR
# or LF, each of which a lenient next hop could take as the end of a line.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_TERMINATOR = b".\r\n"


def is_crlf_clean(message: bytes) -> bool:
    """True when every CR and LF in `message` belongs to a CRLF pair."""
    crlf = message.count(b"\r\n")
    return message.count(b"\r") == crlf and message.count(b"\n") == crlf


def to_wire(message: bytes, ready: bool = False) -> bytes:
    """DATA payload for `message`: CRLF line ends, dot-stuffed, ending in CRLF.CRLF.
    `ready`: the inbound side already proved the message CRLF-only with no line
    starting with '.' (Envelope.wire_ready), so only the terminator is added."""
    if ready and (not message or message.endswith(b"\r\n")) and not message.startswith(b"."):
        return message + _TERMINATOR
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
    return stuffed + _TERMINATOR


def needs_8bit(message: bytes) -> bool:
    """True when the message has bytes above 127 (BODY=8BITMIME territory, RFC 6152)."""
    return not message.isascii()
