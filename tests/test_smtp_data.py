"""DATA framing, sans-IO: every split point, every smuggling variant.

Every test here runs twice: with the C fast path (relay/smtp/_scan.c) and with the pure
Python reference alone, and a property test holds the two to the same answers."""

import os
import shutil
import sysconfig

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp import data as data_mod
from relay.smtp.data import MAX_LINE, DataError, DataReader

FAST = data_mod._scan


@pytest.fixture(autouse=True, params=["c", "python"])
def scan_path(request, monkeypatch):
    if request.param == "c":
        if FAST is None:
            pytest.skip("the C fast path is not built")
    else:
        monkeypatch.setattr(data_mod, "_scan", None)
    return request.param


def feed_all(chunks, **kw):
    r = DataReader(max_size=kw.pop("max_size", 10_000_000), **kw)
    out = []
    rest = b""
    for i, c in enumerate(chunks):
        pieces, rest = r.feed(c)
        out += pieces
        if r.done:
            rest += b"".join(chunks[i + 1:])   # the session reads these as commands
            break
    head = r.finish_head() if r.done else None
    return r, (head or b"") + b"".join(out), rest


def splits(data: bytes):
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


MSG = b"Subject: x\r\nFrom: a@b\r\n\r\n..dotted\r\nline\r\n.\r\nQUIT\r\n"


@pytest.mark.parametrize("chunks", list(splits(MSG)))
def test_end_found_and_unstuffed_at_every_split(chunks):
    r, content, rest = feed_all(chunks)
    assert r.done and r.error is DataError.NONE
    assert content == b"Subject: x\r\nFrom: a@b\r\n\r\n.dotted\r\nline\r\n"
    assert r.head == b"Subject: x\r\nFrom: a@b\r\n"
    assert rest == b"QUIT\r\n"


def test_byte_by_byte():
    r, content, rest = feed_all([bytes([b]) for b in MSG])
    assert content == b"Subject: x\r\nFrom: a@b\r\n\r\n.dotted\r\nline\r\n" and rest == b"QUIT\r\n"


def test_empty_message_and_leading_dot():
    r, content, rest = feed_all([b".\r\n"])
    assert r.done and content == b""
    r, content, _ = feed_all([b"..x\r\n.\r\n"])
    assert content == b".x\r\n"


SMUGGLE = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n"]


@pytest.mark.parametrize("marker", SMUGGLE)
def test_smuggling_markers_are_content_and_refused(marker):
    data = (b"Subject: a\r\n\r\nfirst" + marker + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    for chunks in splits(data):
        r, _, rest = feed_all(chunks)
        assert r.done
        assert r.error is DataError.BARE_NEWLINE
        assert rest == b"NOOP\r\n"      # one message, ended only by CRLF.CRLF


def test_bare_lf_in_body_refused_or_normalised():
    data = b"Subject: a\r\n\r\nline\nnext\r\n.\r\n"
    r, _, _ = feed_all([data])
    assert r.error is DataError.BARE_NEWLINE
    r, content, _ = feed_all([data], normalize=True)
    assert r.error is DataError.NONE and content == b"Subject: a\r\n\r\nline\r\nnext\r\n"


def test_size_limit_reads_to_end_and_stores_nothing():
    body = b"x" * 100 + b"\r\n"
    r = DataReader(max_size=1000)
    stored = []
    for _ in range(20):
        p, _ = r.feed(body)
        stored += p
    p, rest = r.feed(b".\r\nQUIT\r\n")
    assert r.done and r.error is DataError.TOO_BIG and rest == b"QUIT\r\n"


def test_long_line_flagged_memory_bounded():
    r = DataReader(max_size=10**9)
    for _ in range(100):
        r.feed(b"y" * 10_000)
        assert len(r._tail) <= 10_000
    r.feed(b"\r\n.\r\n")
    assert r.done and r.error is DataError.LINE_TOO_LONG


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 50))
def test_random_input_never_crashes_and_is_bounded(parts, step):
    data = b"".join(parts) + b"\r\n.\r\n"
    r = DataReader(max_size=10**6)
    for i in range(0, len(data), step):
        if r.done:
            break
        r.feed(data[i:i + step])
        assert len(r._tail) <= r.max_line + 64
    assert r.done


@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"..", b"Subject: x", b"\r\n\r\n"]),
                max_size=40), st.integers(1, 7))
def test_stuffing_roundtrip(tokens, step):
    original = b"".join(tokens)
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    if b"\r" in original.replace(b"\r\n", b"") or b"\n" in original.replace(b"\r\n", b""):
        return
    lines = original.split(b"\r\n")[:-1]
    wire = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    wire += b".\r\n"
    r = DataReader(max_size=10**6)
    out = []
    for i in range(0, len(wire), step):
        p, rest = r.feed(wire[i:i + step])
        out += p
        if r.done:
            break
    assert r.done and rest == b""
    assert (r.finish_head() or b"") + b"".join(out) == original


def test_header_section_over_the_limit_is_refused():
    from relay.smtp.data import HEADER_LIMIT
    r = DataReader(max_size=10 * HEADER_LIMIT)
    line = b"X-F: " + b"f" * 990 + b"\r\n"
    for _ in range(HEADER_LIMIT // len(line) + 2):
        r.feed(line)
    r.feed(b"\r\nbody\r\n.\r\n")
    assert r.done and r.error is DataError.HEADER_TOO_BIG


def test_dots_flag_tells_whether_any_line_started_with_a_dot():
    for wire, dots in [(b"a\r\nb\r\n.\r\n", False), (b"..a\r\nb\r\n.\r\n", True),
                       (b"a\r\n..b\r\n.\r\n", True), (b"a.b\r\n.\r\n", False)]:
        for chunks in splits(wire):
            r, content, _ = feed_all(chunks)
            assert r.done and r.dots is dots, (wire, chunks)
            if not dots:
                # The stored bytes are their own wire form.
                assert content + b".\r\n" == wire


def test_fast_path_is_built_where_a_compiler_is():
    """`pip install -e .` compiles relay/smtp/_scan.c (optional: a box without a C
    compiler runs the Python path). Where a compiler exists, a missing module means
    the build broke silently."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) on this machine")
    assert FAST is not None


def _outcome(wire: bytes, step: int, max_line: int, normalize: bool = False,
             kind: type = bytes):
    r = DataReader(max_size=1 << 20, normalize=normalize, max_line=max_line)
    out, rest = [], b""
    for i in range(0, len(wire), step):
        pieces, rest = r.feed(kind(wire[i:i + step]))
        out += pieces
        if r.done:
            rest += wire[i + step:]
            break
    head = r.finish_head() if r.done else None
    return (r.done, r.error, r.dots, r.size, head, b"".join(out), rest)


@settings(max_examples=int(os.environ.get("RELAY_FUZZ_EXAMPLES", "400")), deadline=None)
@given(st.lists(st.sampled_from([b"a", b"X" * 9, b".", b"\r\n", b"\r", b"\n", b"..",
                                 b"\r\n.\r\n", b"\r\n\r\n", b"H: v"]), max_size=60),
       st.integers(1, 40), st.sampled_from([8, 20, MAX_LINE]), st.booleans())
def test_fast_path_agrees_with_the_reference(tokens, step, max_line, normalize):
    """Whatever the bytes and however they are cut, the C path ends, refuses, unstuffs
    and splits exactly as the Python reference does."""
    if data_mod._scan is None:
        pytest.skip("compares the C path with the reference: once is enough")
    wire = b"".join(tokens) + b"\r\n.\r\nQUIT\r\n"
    fast = _outcome(wire, step, max_line, normalize)
    # The connection hands over its buffer (a bytearray): same answers.
    assert _outcome(wire, step, max_line, normalize, bytearray) == fast
    data_mod._scan = None
    try:
        ref = _outcome(wire, step, max_line, normalize)
        assert _outcome(wire, step, max_line, normalize, bytearray) == ref
    finally:
        data_mod._scan = FAST
    assert fast == ref


def test_eight_bit_flag_tells_whether_any_byte_is_above_127():
    for wire, eight in [(b"a\r\n\r\nb\r\n.\r\n", False), (b"a\r\n\r\nb\xc3\xa9\r\n.\r\n", True),
                        (b"S: \xff\r\n\r\nb\r\n.\r\n", True)]:
        for chunks in splits(wire):
            r, _, _ = feed_all(chunks)
            assert r.done and r.eight_bit is eight, (wire, chunks)


def test_header_section_over_the_limit_is_refused_even_in_one_chunk():
    from relay.smtp.data import HEADER_LIMIT
    line = b"X-F: " + b"f" * 990 + b"\r\n"
    wire = line * (HEADER_LIMIT // len(line) + 2) + b"\r\nbody\r\n.\r\n"
    r, _, _ = feed_all([wire], max_size=10 * HEADER_LIMIT)
    assert r.done and r.error is DataError.HEADER_TOO_BIG


@pytest.mark.parametrize("first", [1000, 65536, 900_000])
def test_header_section_over_the_limit_is_refused_however_it_is_cut(first):
    from relay.smtp.data import HEADER_LIMIT
    line = b"X-F: " + b"f" * 990 + b"\r\n"
    wire = line * (HEADER_LIMIT // len(line) + 2) + b"\r\nbody\r\n.\r\n"
    r, _, _ = feed_all([wire[:first], wire[first:]], max_size=10 * HEADER_LIMIT)
    assert r.done and r.error is DataError.HEADER_TOO_BIG
