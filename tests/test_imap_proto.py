"""IMAP wire format without sockets: commands, literals, limits, every split offset."""

from __future__ import annotations

import pytest

from relay.quarantine.imap.proto import (
    Atom,
    Bad,
    Command,
    Continue,
    Literal,
    Parser,
    RawLine,
    mutf7_valid,
    render,
)


def events(data: bytes, split: int | None = None, **kw) -> list:
    p = Parser(**kw)
    out = []
    chunks = [data] if split is None else [data[:split], data[split:]]
    for c in chunks:
        p.feed(c)
        while (e := p.next_event()) is not None:
            out.append(e)
    return out


STREAM = (b'a1 LOGIN {3}\r\nbob "p\\"w"\r\n'
          b"a2 FETCH 1:* (BODY.PEEK[HEADER.FIELDS (From To)]<0.10> FLAGS)\r\n"
          b"a3 APPEND Box (\\Seen) {5+}\r\nab\r\nc\r\n"
          b"a4 STORE 1 +FLAGS (\\Deleted $Junk)\r\n")
EXPECTED = [
    Continue(),
    Command("a1", "LOGIN", [b"bob", b'p"w']),
    Command("a2", "FETCH", ["1:*", ["BODY.PEEK[HEADER.FIELDS (From To)]<0.10>", "FLAGS"]]),
    Command("a3", "APPEND", ["Box", ["\\Seen"], b"ab\r\nc"]),
    Command("a4", "STORE", ["1", "+FLAGS", ["\\Deleted", "$Junk"]]),
]


def test_stream_parses():
    evs = events(STREAM)
    assert evs == EXPECTED
    assert all(isinstance(a, Atom) for a in evs[2].args[1])
    assert isinstance(evs[1].args[0], bytes) and not isinstance(evs[1].args[0], Atom)


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_every_split_offset_gives_the_same_events(split):
    assert events(STREAM, split) == EXPECTED


def test_byte_at_a_time():
    p = Parser()
    out = []
    for i in range(len(STREAM)):
        p.feed(STREAM[i:i + 1])
        while (e := p.next_event()) is not None:
            out.append(e)
    assert out == EXPECTED


def test_literal_bytes_are_not_parsed_as_syntax():
    data = b"t APPEND x {11}\r\n) ( \" {3}\r\n\r\n"
    evs = events(data)
    assert evs == [Continue(), Command("t", "APPEND", ["x", b') ( " {3}\r\n'])]


def test_oversized_sync_literal_refused_before_reading():
    evs = events(b"t1 APPEND x {999999}\r\nt2 NOOP\r\n", max_literal=1000)
    assert evs == [Bad("t1", "[TOOBIG] Literal too big"), Command("t2", "NOOP", [])]


def test_oversized_nonsync_literal_skipped_and_stream_stays_in_step():
    body = b"A" * 5000
    evs = events(b"t1 APPEND x {5000+}\r\n" + body + b"\r\nt2 NOOP\r\n", max_literal=1000)
    assert evs == [Bad("t1", "[TOOBIG] Literal too big"), Command("t2", "NOOP", [])]
    # even when the literal itself looks like commands
    evs = events(b"t1 X {22+}\r\nt9 LOGOUT\r\nt8 LOGOUT\r\n\r\nt2 NOOP\r\n", max_literal=10)
    assert evs == [Bad("t1", "[TOOBIG] Literal too big"), Command("t2", "NOOP", [])]


def test_line_too_long_then_recovers():
    evs = events(b"t1 NOOP " + b"x" * 5000 + b"\r\nt2 NOOP\r\n", max_line=1024)
    assert evs[0] == Bad("t1", "Line too long")
    assert evs[1] == Command("t2", "NOOP", [])
    evs = events(b"t1 NOOP " + b"x" * 5000, max_line=1024)
    assert evs == []        # nothing buffered beyond the limit, waiting for the LF


def test_nesting_limit():
    evs = events(b"t SEARCH " + b"(" * 40 + b"ALL" + b")" * 40 + b"\r\n", max_depth=16)
    assert evs == [Bad("t", "Too deeply nested")]
    assert events(b"t SEARCH ((ALL))\r\n")[0] == Command("t", "SEARCH", [[["ALL"]]])


@pytest.mark.parametrize("line", [b"\r\n", b"*\r\n", b"+ x\r\n", b"t\r\n", b"t  NOOP\r\n",
                                  b't LOGIN "unterminated\r\n', b"t X (a\r\n", b"t X a)\r\n",
                                  b"t X [a\r\n", b't X "a\\q"\r\n', b"t X a(b\r\n"])
def test_junk_gives_bad_not_exception(line):
    evs = events(line)
    assert len(evs) == 1 and isinstance(evs[0], Bad)


def test_raw_line_mode():
    p = Parser()
    p.expect_line()
    p.feed(b"DONE\r\nt NOOP\r\n")
    assert p.next_event() == RawLine(b"DONE")
    assert p.next_event() == Command("t", "NOOP", [])


def test_render():
    assert render([Atom("NIL"), None, 5, b"a\"b", b"x\r\ny", [b"\xff"]]) == (
        b'(NIL NIL 5 "a\\"b" {4}\r\nx\r\ny ({1}\r\n\xff))')
    assert render(Literal(b"abc")) == b"{3}\r\nabc"


def test_mutf7():
    assert mutf7_valid("Entw&APw-rfe") and mutf7_valid("a&-b")
    assert not mutf7_valid("Entwürfe") and not mutf7_valid("a&b")
