"""Property-based fuzzing of every parser that faces the network, the config loader and
the spool reader: only the exceptions each one documents may come out, and what comes
out is safe to use (no control characters in an address, replies framed, memory bounded).

The PROXY decoder and the SASL PLAIN decoder are fuzzed in test_smtp_proxy.py and
test_smtp_auth.py; DATA framing's crash-freedom in test_smtp_data.py. Here DATA is
checked differentially (any split of the input gives the same result, and the end is
only ever CRLF.CRLF), and LOGIN, the SMTP command grammar, POP3, IMAP, HTTP, the config
loader and the spool are fuzzed. Longer runs: tests/fuzz/ (see its README).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.config import ConfigError, Size, SpoolConfig, load
from relay.http import MAX_HEAD, HTTPError, RequestParser
from relay.quarantine.imap import proto as imap
from relay.quarantine.pop3 import proto as pop3
from relay.queue.model import Envelope, Recipient
from relay.queue.spool import Spool
from relay.smtp import auth as sasl
from relay.smtp import proto
from relay.smtp.data import DataError, DataReader

# tests/fuzz/fuzz_parsers.py raises this for long runs; CI keeps the default.
EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "300"))
FAST = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to line-based protocols, mixed with anything.
_SPECIAL = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\x00", b" ", b"<", b">", b":",
                            b"{", b"}", b"+", b"(", b")", b'"', b"\\", b"=", b"@", b"\xff",
                            b"\xc3\xa9", b"\t"])
WIRE = st.lists(st.one_of(_SPECIAL, st.binary(max_size=12)), max_size=40).map(b"".join)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return [c for c in out if c]


# --- SMTP command grammar (relay.smtp.proto) -----------------------------------------------

@given(st.binary(max_size=300))
@example(b"MAIL FROM:<a\r\nRCPT TO:<b@x>@y>")
@example(b"RCPT TO:<@a,@b:c@d> NOTIFY=SUCCESS,NEVER")
@FAST
def test_smtp_command_line_only_syntax_errors(line):
    try:
        verb, arg = proto.parse_command(line)
    except proto.SyntaxErr as e:
        assert 500 <= e.reply.code < 600
        assert e.reply.render().endswith(b"\r\n") and e.reply.render().count(b"\r\n") == 1
        return
    assert verb.isascii() and verb.isalpha() and verb == verb.upper()
    # No control character but TAB survives into an argument.
    assert not any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7f for c in arg)


_ADDR_PIECES = st.sampled_from(["a", "b.c", "@", "<", ">", '"', "\\", " ", "x.test", "[",
                                "]", "IPv6:", "::1", "127.0.0.1", ",", ":", "=", "é",
                                "\x00", "\r", "\n", "\x7f", "SIZE=1", "NOTIFY=NEVER",
                                "ORCPT=rfc822;a@b", "BODY=8BITMIME", "-", ".", "l" * 70])


@given(st.sampled_from(["FROM", "TO"]), st.lists(_ADDR_PIECES, max_size=14).map("".join),
       st.booleans())
@example("FROM", 'FROM:<"a\\\r\n"@x.test>', False)
@FAST
def test_smtp_paths_and_params(keyword, text, prefix):
    arg = (keyword + ":" + text) if prefix else text
    try:
        address, params = proto.parse_path(arg, keyword, allow_null=keyword == "FROM")
        if keyword == "FROM":
            proto.check_mail_params(params, 10**6, True)
        else:
            proto.check_rcpt_params(params)
    except proto.SyntaxErr as e:
        assert e.reply.code in (501, 552, 553, 555)
        return
    # What is accepted can go into a header, a log line and a next hop's command.
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in address)
    assert "<" not in address.replace('\\<', "") or address.startswith('"')
    assert len(address.encode()) <= proto.MAX_PATH
    for k, v in params.items():
        assert k.isascii() and " " not in k
        assert v is None or not any(ord(c) <= 0x20 or ord(c) == 0x7f for c in v)


@given(st.text(max_size=200))
@FAST
def test_smtp_sanitize_is_header_safe(text):
    out = proto.sanitize(text)
    assert out and all(0x21 <= ord(c) < 0x7f for c in out)
    assert not set(out) & set("()\\\"")


# --- DATA framing, differentially ----------------------------------------------------------

def _run_data(chunks: list[bytes], normalize: bool) -> tuple[bytes, bytes, DataError, bool]:
    r = DataReader(max_size=10**6, normalize=normalize)
    stored, rest = [], b""
    for c in chunks:
        if r.done:
            rest += c
            continue
        pieces, after = r.feed(c)
        stored += pieces
        rest += after
        assert len(r._tail) <= r.max_line + 64
    head = r.finish_head() if r.done else b""
    return head + b"".join(stored), rest, r.error, r.done


@given(WIRE, st.lists(st.integers(0, 500), max_size=8), st.booleans())
@example(b"a\r\n.\rMAIL FROM:<x>\r\n", [3, 5], False)
@example(b"x\n.\nRSET\r\n.\r\n", [1, 2, 3], True)
@FAST
def test_data_any_split_gives_the_same_message(data, cuts, normalize):
    data += b"\r\n.\r\nNEXT"
    whole = _run_data([data], normalize)
    split = _run_data(splits(data, cuts), normalize)
    # Same verdict and same boundary however the network chunks it; the same content
    # whenever the message is kept (a refused message's pieces are thrown away).
    assert whole[1:] == split[1:]
    content, rest, err, done = whole
    if err is DataError.NONE:
        assert content == split[0]
    assert done
    # The end of data is the first CRLF.CRLF (or '.CRLF' at the very start): whatever
    # bare CR/LF games precede it, the rest is exactly what follows that marker.
    first = 0 if data.startswith(b".\r\n") else data.find(b"\r\n.\r\n") + 2
    assert rest == data[first + 3:]
    if err is DataError.NONE:
        # Stored content is CRLF-clean: no bare CR or LF reaches the queue, so nothing
        # the next hop parses differently from us (outbound smuggling).
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")


# --- SASL LOGIN (PLAIN is fuzzed in test_smtp_auth.py) -------------------------------------

@given(st.lists(st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                          st.text(max_size=30), st.just("*"), st.just("=")),
                min_size=0, max_size=3),
       st.one_of(st.none(), st.text(max_size=20)))
@FAST
def test_sasl_login_only_auth_syntax_error(lines, initial):
    try:
        s = sasl.LoginSASL(initial)
        for line in lines:
            if s.challenge is None:
                break
            s.feed(line)
        if s.challenge is None:
            user, _ = s.credentials
            assert user and not set("\r\n\0") & set(user)
    except sasl.AuthSyntaxError:
        pass


# --- POP3 (relay.quarantine.pop3.proto) ----------------------------------------------------

MAILDROP = [pop3.MessageInfo("k1", "uid1", 120), pop3.MessageInfo("k2", "uid2", 30)]
POP3_WORDS = st.sampled_from([b"USER bob", b"PASS pw", b"STAT", b"LIST", b"LIST 1", b"LIST 99",
                              b"RETR 1", b"RETR 0", b"RETR -1", b"TOP 1 0", b"TOP 2 99999999999",
                              b"DELE 1", b"RSET", b"NOOP", b"UIDL", b"CAPA", b"STLS", b"QUIT",
                              b"AUTH PLAIN", b"AUTH PLAIN AGJvYgBwdw==", b"AUTH LOGIN", b"APOP x y",
                              b"*", b"=", b"\x00", b"\xff", b"LIST 1 2", b"RETR 1" * 300])


@given(st.lists(st.one_of(POP3_WORDS, st.binary(max_size=30)), max_size=25),
       st.sampled_from([b"\r\n", b"\n", b"\r"]), st.lists(st.integers(0, 4000), max_size=6),
       st.booleans(), st.booleans())
@FAST
def test_pop3_engine_any_input(cmds, eol, cuts, login_ok, tls):
    conn = pop3.Connection(pop3.Policy(cleartext_login=True, tls_available=tls))
    assert conn.greeting().startswith(b"+OK")
    wire = eol.join(cmds) + eol
    out = []
    for chunk in splits(wire, cuts) or [b""]:
        conn.receive_data(chunk)
        for _ in range(200):
            ev = conn.next_event()
            if ev is pop3.NEED_DATA:
                break
            if isinstance(ev, pop3.Send):
                out.append(ev.data)
            elif isinstance(ev, pop3.Login):
                assert not set("\r\n\0") & set(ev.user)
                out.append(conn.login_succeeded(MAILDROP) if login_ok else conn.login_failed())
            elif isinstance(ev, pop3.Retrieve):
                assert 1 <= ev.number <= len(MAILDROP)
                out.append(conn.retrieve_ok(ev.size))
                w = pop3.BodyWriter(ev.lines)
                out.append(w.feed(b"Subject: x\r\n\r\n.dot\r\nline\r\n"))
                out.append(w.finish())
            elif isinstance(ev, pop3.StartTLS):
                out.append(ev.data)
                conn.tls_started()
            elif isinstance(ev, pop3.Update):
                assert set(ev.keys) <= {"k1", "k2"}
                out.append(conn.update_done(True))
            else:  # pragma: no cover
                raise AssertionError(ev)
        # Memory stays bounded whatever the client sends (once closed, what the last
        # read brought stays until the connection is dropped, but nothing more is taken).
        assert len(conn._buf) <= conn.policy.max_line + 1 + (len(chunk) if conn.closed else 0)
    for reply in out:
        # Every reply is framed: starts with a status (or '+ ' challenge / body) and ends
        # in CRLF; no stray bare LF that a client would read as a second reply.
        assert reply.endswith(b"\r\n")
        assert reply.count(b"\n") == reply.count(b"\r\n")


# --- IMAP (relay.quarantine.imap.proto) ----------------------------------------------------

IMAP_WORDS = st.sampled_from([b"a1 LOGIN bob pw", b"a2 SELECT INBOX", b"a3 FETCH 1:* (FLAGS)",
                              b"a4 LOGIN {3}", b"a5 LOGIN {3+}", b"abc", b"x {99999999999+}",
                              b"t (((((((((((((((((((((((", b")))", b'"unterminated', b'"a\\"b"',
                              b"{0}", b"* OK", b"+", b"a6 APPEND INBOX {5}", b"DONE",
                              b"a7 UID FETCH 1 BODY[HEADER.FIELDS (SUBJECT)]<0.10>",
                              b"\x00", b"\xff\xfe", b"a8 NOOP " + b"x" * 300])


@given(st.lists(st.one_of(IMAP_WORDS, st.binary(max_size=30)), max_size=25),
       st.lists(st.integers(0, 4000), max_size=6), st.integers(4, 64))
@FAST
def test_imap_parser_any_input(lines, cuts, depth):
    p = imap.Parser(max_line=256, max_literal=1024, max_depth=depth, max_parts=20)
    wire = b"\r\n".join(lines) + b"\r\n"
    for chunk in splits(wire, cuts) or [b""]:
        p.feed(chunk)
        for _ in range(500):
            ev = p.next_event()
            if ev is None:
                break
            assert isinstance(ev, imap.Command | imap.Continue | imap.Bad | imap.RawLine)
            if isinstance(ev, imap.Command):
                assert ev.tag and ev.name == ev.name.upper()
                _depth_ok(ev.args, depth)
        # Bounded: at most one line plus one literal is ever held.
        assert p.buffered <= len(wire)
        assert sum(map(len, p._parts)) <= p.max_literal + p.max_line + 2


def _depth_ok(args, limit, d=0):
    assert d <= limit
    for a in args:
        if isinstance(a, list):
            _depth_ok(a, limit, d + 1)


@given(st.integers(1, 2000))
@settings(max_examples=30, deadline=None)
def test_imap_deep_nesting_refused_without_recursion_error(n):
    p = imap.Parser()
    p.feed(b"a1 FETCH 1 " + b"(" * n + b")" * n + b"\r\n")
    ev = p.next_event()
    assert isinstance(ev, imap.Command | imap.Bad)
    if n > p.max_depth:
        assert isinstance(ev, imap.Bad)


# --- HTTP (relay.http.RequestParser) -------------------------------------------------------

HTTP_PIECES = st.sampled_from([b"GET ", b"HEAD ", b"POST ", b"/metrics", b"/readyz", b" HTTP/1.1",
                               b" HTTP/1.0", b" HTTP/2.0", b"\r\n", b"\n", b"Host: x", b": ",
                               b"Content-Length: 5", b"Transfer-Encoding: chunked",
                               b"Connection: close", b" folded", b"\x00", b"\x7f", b"\xff"])


@given(st.lists(st.one_of(HTTP_PIECES, st.binary(max_size=20)), max_size=40).map(b"".join),
       st.lists(st.integers(0, 2000), max_size=5))
@FAST
def test_http_parser_only_http_error(data, cuts):
    p = RequestParser()
    try:
        for chunk in splits(data, cuts) or [b""]:
            p.feed(chunk)
            while (req := p.next_request()) is not None:
                assert req.path.startswith("/")
                assert all(not set("\r\n\0") & set(v) for _, v in req.headers)
            assert len(p._buf) <= MAX_HEAD + len(chunk) + 2
    except HTTPError as e:
        assert e.status in (400, 414, 431, 505)


def test_http_endless_head_is_bounded():
    p = RequestParser()
    with pytest.raises(HTTPError) as e:
        for _ in range(100):
            p.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 1000 + b"\r\n")
            p.next_request()
    assert e.value.status == 431


# --- config loader: random YAML -> only ConfigError ----------------------------------------

SECTIONS = ["hostname", "log", "tls", "listeners", "proxy_protocol", "smtp", "access", "auth",
            "spool", "delivery", "filters", "http", "quarantine", "workers", "bogus"]
KEYS = ["level", "format", "address", "name", "role", "max_message_size", "mynetworks",
        "relay_domains", "path", "relayhost", "retry_schedule", "users", "trusted", "timeout",
        "min_free_space", "transport", "domain", "nexthop", "options", "tls_policies",
        "imap_address", "password_hash", "bare_newline", "cert_file", "admin", "x"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["10MiB", "5m", "127.0.0.1:25", "[::1]:25", "0.0.0.0/0",
                                     "10.0.0.0/33", "*.x.test", ".", "-1", "1e400", "nan"]))
VALUES = st.recursive(SCALARS, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.sampled_from(KEYS), c, max_size=4)),
    max_leaves=15)


@given(st.dictionaries(st.sampled_from(SECTIONS), VALUES, max_size=5),
       st.dictionaries(st.sampled_from(["RELAY_SMTP__MAX_RECIPIENTS", "RELAY_LOG__LEVEL",
                                        "RELAY_LISTENERS", "RELAY___", "RELAY_SPOOL"]),
                       st.sampled_from(["7", "[", "{a: [}", "", "null", "- 1", "!!binary x"]),
                       max_size=2))
@FAST
def test_config_random_yaml_only_config_error(tmp_path_factory, data, environ):
    path = tmp_path_factory.mktemp("cfg") / "relay.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load(path, environ=environ)
    except ConfigError as e:
        assert str(e)


@given(st.text(max_size=300))
@example("a: &x [*x]")
@example("a: !!python/object:os.system {}")
@example("? [a, b]\n: c")
@example("smtp: {max_recipients: 0x10}")
@FAST
def test_config_random_text_only_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "relay.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load(path, environ={})
    except ConfigError:
        pass


# --- spool reader: corrupt segment files ---------------------------------------------------

_HDR = struct.Struct(">4scII")


def _spool(root: Path) -> Spool:
    return Spool(SpoolConfig(path=str(root), min_free_space=Size(0)))


async def _fill(root: Path, n: int) -> dict[str, bytes]:
    sp = _spool(root)
    await sp.open()
    out = {}
    for i in range(n):
        env = Envelope(f"QID{i:04d}", "a@x.test", [Recipient(f"r{i}@y.test")])
        msg = b"Subject: %d\r\n\r\n" % i + b"body\r\n" * (i + 1)
        await sp.add(env, msg)
        out[env.queue_id] = msg
    await sp.close()
    return out


async def _reopen(root: Path) -> dict[str, bytes]:
    sp = _spool(root)
    await sp.open()
    try:
        return {e.queue_id: await sp.read(e.queue_id) for e in sp.envelopes()}
    finally:
        await sp.close()


def _frame(kind: bytes, payload: bytes) -> bytes:
    from relay.queue.spool import MAGIC
    return _HDR.pack(MAGIC, kind[:1], len(payload), zlib.crc32(kind[:1] + payload)) + payload


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("spool-pristine")
    msgs = asyncio.run(_fill(root, 6))
    seg = next((root / "segments").glob("w0-*.log"))
    return root, seg.name, seg.read_bytes(), msgs


RAW_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                        min_size=1, max_size=4)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1,
                                                                            max_size=40))),
    st.tuples(st.just("append"), st.binary(max_size=60)),
)
# Well-framed records (valid magic, length, CRC) with garbage inside: the CRC cannot
# save us from these, only the record decoder's own checks can.
FRAMED_GARBAGE = st.tuples(st.just("record"), st.tuples(
    st.sampled_from([b"M", b"S", b"D", b"X"]),
    st.one_of(st.binary(max_size=40),
              st.sampled_from([b"\x00\x00\x00\x02{}", b'{"queue_id": 1}', b"[]", b"null",
                               b"\xff", b"\x00\x00\x00\x00", b'"x"']))))


def _mutate(data: bytes, m) -> bytes:
    kind, arg = m
    if kind == "truncate":
        return data[: arg % (len(data) + 1)]
    if kind == "flip":
        if not data:
            return data
        b = bytearray(data)
        for off, x in arg:
            b[off % len(b)] ^= x
        return bytes(b)
    if kind == "insert":
        off, junk = arg
        off %= len(data) + 1
        return data[:off] + junk + data[off:]
    if kind == "append":
        return data + arg
    rkind, payload = arg
    return data + _frame(rkind, payload)


def _check_reopen(pristine, root: Path, mutations) -> None:
    _, name, data, msgs = pristine
    for m in mutations:
        data = _mutate(data, m)
    (root / "segments").mkdir(parents=True)
    (root / "segments" / name).write_bytes(data)
    got = asyncio.run(_reopen(root))
    # Whatever was recovered is exactly what was stored (never a wrong body under a
    # right id): a CRC-clean record is the only way in.
    for qid, body in got.items():
        if qid in msgs:
            assert body == msgs[qid], qid
    # And the spool opens again afterwards (corrupt files moved aside, tail cut).
    again = asyncio.run(_reopen(root))
    assert set(again) == set(got)


SPOOL_FUZZ = settings(max_examples=max(120, EXAMPLES // 3), deadline=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])


@given(st.lists(RAW_MUTATIONS, min_size=1, max_size=3))
@SPOOL_FUZZ
def test_spool_open_survives_torn_and_flipped_segments(pristine, tmp_path_factory, mutations):
    _check_reopen(pristine, tmp_path_factory.mktemp("spool"), mutations)


@given(st.lists(st.one_of(RAW_MUTATIONS, FRAMED_GARBAGE), min_size=1, max_size=3))
@SPOOL_FUZZ
def test_spool_open_survives_framed_garbage(pristine, tmp_path_factory, mutations):
    _check_reopen(pristine, tmp_path_factory.mktemp("spool"), mutations)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x00\x00\x02{}"])
def test_spool_short_message_record_is_skipped_not_fatal(pristine, tmp_path, payload):
    _, name, data, msgs = pristine
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / name).write_bytes(data + _frame(b"M", payload))
    got = asyncio.run(_reopen(tmp_path))
    assert set(got) == set(msgs)


def test_spool_corrupt_segment_without_live_messages_opens(tmp_path):
    (tmp_path / "segments").mkdir()
    # One junk byte, then a well-framed record that is not a message: corruption "in the
    # middle" (something readable follows it) of a segment that holds nothing live.
    (tmp_path / "segments" / "w0-00000001.log").write_bytes(b"\xd3" + _frame(b"D", b"QIDX"))
    assert asyncio.run(_reopen(tmp_path)) == {}
    assert (tmp_path / "corrupt" / "w0-00000001.log").exists()


def test_spool_mid_file_corruption_is_moved_aside_and_counted(pristine, tmp_path):
    from relay import metrics
    _, name, data, msgs = pristine
    # Flip a byte inside the third record's payload: records before and after it stay.
    offs = [i for i in range(len(data)) if data.startswith(_frame(b"M", b"")[:4], i)]
    assert len(offs) >= 4
    bad = bytearray(data)
    bad[offs[2] + 20] ^= 0xFF
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / name).write_bytes(bytes(bad))
    before = metrics.SPOOL_CORRUPT._value.get()
    got = asyncio.run(_reopen(tmp_path))
    assert metrics.SPOOL_CORRUPT._value.get() == before + 1
    assert len(got) == len(msgs) - 1
    assert all(got[q] == msgs[q] for q in got)
    assert (tmp_path / "corrupt" / name).exists()


def test_fuzz_scripts_exist_and_are_not_collected():
    here = Path(__file__).parent / "fuzz"
    scripts = sorted(p.name for p in here.glob("fuzz_*.py"))
    assert scripts and (here / "README.md").exists()
    assert not list(here.glob("test_*.py"))



