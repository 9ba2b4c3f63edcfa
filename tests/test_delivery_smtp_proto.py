"""relay.delivery.smtp_proto: reply parsing (split at every offset), limits, garbage,
command rendering that refuses CR/LF/NUL, EHLO keywords. No sockets."""

from __future__ import annotations

import pytest

from relay.delivery import smtp_proto as sp
from relay.delivery.smtp_proto import Extensions, ProtocolError, Reply, ReplyParser

EHLO = (b"250-mx.example.test Hello\r\n250-SIZE 1000\r\n250-PIPELINING\r\n"
        b"250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-DSN\r\n250 STARTTLS\r\n")
STREAM = b"220 mx ESMTP ready\r\n" + EHLO + b"550 5.1.1 <x@y>: no such user\r\n"


def parse_all(chunks: list[bytes]) -> list[Reply]:
    p = ReplyParser()
    out = []
    for c in chunks:
        p.feed(c)
        while (r := p.next_reply()) is not None:
            out.append(r)
    return out


def test_replies_in_one_chunk():
    greet, ehlo, rcpt = parse_all([STREAM])
    assert greet.code == 220 and greet.lines == ("mx ESMTP ready",)
    assert ehlo.code == 250 and len(ehlo.lines) == 7
    assert rcpt.code == 550 and rcpt.enhanced == "5.1.1" and rcpt.text == "<x@y>: no such user"
    assert str(rcpt) == "550 5.1.1 <x@y>: no such user"
    assert rcpt.is_perm and not rcpt.is_temp


def test_split_at_every_offset():
    whole = parse_all([STREAM])
    for i in range(len(STREAM) + 1):
        assert parse_all([STREAM[:i], STREAM[i:]]) == whole
    # And one byte at a time.
    assert parse_all([STREAM[i:i + 1] for i in range(len(STREAM))]) == whole


def test_enhanced_code_must_match_class():
    (r,) = parse_all([b"451 5.1.1 odd\r\n"])
    assert r.enhanced == "" and r.status() == "4.0.0"
    (r,) = parse_all([b"250 ok\r\n"])
    assert r.status() == "2.0.0" and r.is_ok


def test_bare_lf_line_end_accepted():
    (r,) = parse_all([b"250 ok\n"])
    assert r.code == 250


@pytest.mark.parametrize("garbage", [
    b"hello\r\n", b"25 short\r\n", b"2500 x\r\n", b"250x\r\n", b"999 no\r\n", b"abc def\r\n",
    b"250-a\r\n251 b\r\n", b"250 a\rb\r\n", b"250 a\0b\r\n",
])
def test_garbage_is_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        parse_all([garbage])


def test_line_and_reply_limits():
    with pytest.raises(ProtocolError):
        parse_all([b"250 " + b"x" * (sp.MAX_LINE + 10)])          # no line end at all
    with pytest.raises(ProtocolError):
        parse_all([b"250 " + b"x" * sp.MAX_LINE + b"\r\n"])
    with pytest.raises(ProtocolError):
        parse_all([b"250-x\r\n" * (sp.MAX_LINES + 1) + b"250 end\r\n"])


def test_buffered_counts_bytes_after_a_reply():
    p = ReplyParser()
    p.feed(b"220 go ahead\r\n250 injected\r\n")
    assert p.next_reply().code == 220
    assert p.buffered > 0
    p2 = ReplyParser()
    p2.feed(b"220 go ahead\r\n")
    assert p2.next_reply().code == 220 and p2.buffered == 0


@pytest.mark.parametrize("bad", ["a@b\r\nRSET", "a@b\nDATA", "a@b\rX", "a\0@b"])
def test_commands_refuse_cr_lf_nul(bad):
    with pytest.raises(sp.CommandError):
        sp.rcpt_to(bad)
    with pytest.raises(sp.CommandError):
        sp.mail_from(bad)


def test_commands_refuse_param_injection():
    with pytest.raises(sp.CommandError):
        sp.rcpt_to("a@b", {"NOTIFY": "NEVER ORCPT=x"})
    with pytest.raises(sp.CommandError):
        sp.rcpt_to("a@b", {"ORCPT": "rfc822;a=b"})
    with pytest.raises(sp.CommandError):
        sp.rcpt_to("a@b> NOTIFY=NEVER <c@d")
    with pytest.raises(sp.CommandError):
        sp.ehlo("two words")


def test_render_commands():
    assert sp.mail_from("", {"SIZE": "10", "SMTPUTF8": None}) == b"MAIL FROM:<> SIZE=10 SMTPUTF8\r\n"
    assert (sp.rcpt_to("x@y.test", {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;x+40y.test"})
            == b"RCPT TO:<x@y.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x+40y.test\r\n")
    assert sp.rcpt_to("j\u00fcrgen@y.test") == "RCPT TO:<j\u00fcrgen@y.test>\r\n".encode()
    assert sp.ehlo("relay.test") == b"EHLO relay.test\r\n"


def test_extensions():
    (_, ehlo, _) = parse_all([STREAM])
    ext = Extensions.from_ehlo(ehlo)
    assert "pipelining" in ext and "STARTTLS" in ext and "DSN" in ext
    assert "SMTPUTF8" not in ext
    assert ext.size_limit == 1000
    assert ext.auth_mechanisms == {"PLAIN", "LOGIN"}
    (old,) = parse_all([b"250-x\r\n250 AUTH=LOGIN\r\n"])
    assert Extensions.from_ehlo(old).auth_mechanisms == {"LOGIN"}
    assert Extensions.none().size_limit == 0
