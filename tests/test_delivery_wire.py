"""relay.delivery.wire: outbound DATA bytes are CRLF-only and dot-stuffed, whatever came in."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.wire import is_crlf_clean, needs_8bit, to_wire


def unstuff(wire: bytes) -> bytes:
    """What a strict receiver reconstructs: lines up to the first lone '.', unstuffed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    return b"\r\n".join(out) + (b"\r\n" if out else b"")


def test_clean_message_fast_path():
    msg = b"Subject: x\r\n\r\nhello\r\n.dot line\r\n..two\r\n"
    assert is_crlf_clean(msg)
    assert to_wire(msg) == b"Subject: x\r\n\r\nhello\r\n..dot line\r\n...two\r\n.\r\n"


def test_leading_dot_on_first_line_and_missing_final_crlf():
    assert to_wire(b".x") == b"..x\r\n.\r\n"
    assert to_wire(b"") == b".\r\n"


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n",
                                     b"\r.\r\n", b"\r\n.\r\n"])
def test_smuggling_variants_are_harmless(smuggle):
    msg = b"Subject: a\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n"
    wire = to_wire(msg)
    # Exactly one end-of-data, at the very end; no bare CR or LF anywhere.
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert is_crlf_clean(wire)
    assert re.search(rb"\r\n\.\r\n(?!$)", wire) is None
    # The injected commands stay message text (stuffed dot line, not a terminator).
    assert b"\r\n..\r\nMAIL FROM:" in wire


def test_bare_line_ends_become_crlf():
    assert to_wire(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n.\r\n"


def test_needs_8bit():
    assert not needs_8bit(b"plain")
    assert needs_8bit("caf\u00e9".encode())


@given(st.binary(max_size=300))
def test_any_input_frames_safely(data):
    wire = to_wire(data)
    assert is_crlf_clean(wire)
    assert wire.endswith(b".\r\n")
    # The first lone '.' line is the final one.
    lines = wire.split(b"\r\n")
    assert lines.index(b".") == len(lines) - 2
    # Content survives (with line ends normalised).
    normalised = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(wire) == normalised


def test_ready_fast_path_matches_the_full_conversion_for_clean_input():
    from relay.delivery.wire import to_wire
    for msg in [b"", b"a\r\n", b"Subject: x\r\n\r\nbody\r\nmore\r\n"]:
        assert to_wire(msg, ready=True) == to_wire(msg)
    # A wrong flag on unsafe bytes never skips the conversion that matters.
    assert to_wire(b".x\r\n", ready=True) == b"..x\r\n.\r\n"
    assert to_wire(b"x\r\n.", ready=True) == to_wire(b"x\r\n.")
