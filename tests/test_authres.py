"""Authentication-Results: rendering (RFC 8601 grammar, folding) and stripping forged
fields with our authserv-id while every other byte stays as it was."""

from __future__ import annotations

import email.parser
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.pipeline.authres import read_authserv_id, render, strip_forged
from relay.pipeline.protocol import AuthResult

ID = "mx.relay.test"


def _unfold(value: str) -> str:
    return value.replace("\r\n\t", " ")


# --- render -------------------------------------------------------------------------

def test_render_none():
    assert render(ID, []) == "mx.relay.test; none"


def test_render_typical():
    value = render(ID, [
        AuthResult("spf", "pass", (("smtp.mailfrom", "example.com"),)),
        AuthResult("dkim", "pass", (("header.d", "example.com"), ("header.s", "sel"),
                                    ("header.b", "abCD+/12"))),
        AuthResult("dmarc", "fail", (("header.from", "example.com"),),
                   "p=reject sp=reject dis=reject"),
    ])
    assert value == (
        "mx.relay.test;\r\n"
        "\tspf=pass smtp.mailfrom=example.com;\r\n"
        '\tdkim=pass header.d=example.com header.s=sel header.b="abCD+/12";\r\n'
        "\tdmarc=fail (p=reject sp=reject dis=reject) header.from=example.com")


def test_render_lines_stay_short_and_parse_back():
    long = [AuthResult("dkim", "fail", (("header.d", "a-very-long-subdomain.of.example.com"),
                                        ("header.s", "selector-2025-11-with-a-long-name"),
                                        ("header.b", "AbCdEfGh")), "body hash mismatch")] * 3
    value = render(ID, long)
    field = f"Authentication-Results: {value}\r\n"
    lines = field.split("\r\n")
    assert all(len(line) <= 78 for line in lines), lines
    assert all(line[:1] in ("\t", "") for line in lines[1:])
    msg = email.parser.Parser(policy=email.policy.compat32).parsestr(field + "\r\n")
    assert _unfold(msg["Authentication-Results"]).count("dkim=fail") == 3


def test_render_quotes_what_is_not_a_token_and_escapes_comments():
    value = render(ID, [
        AuthResult("spf", "pass", (("smtp.mailfrom", "user@example.com"),)),
        AuthResult("spf", "none", (("smtp.mailfrom", ""),)),
        AuthResult("x", "pass", (("p.v", 'has space "and" \\'),), "a (nested) \\ c\r\nX-Evil: 1"),
    ])
    flat = _unfold(value)
    assert "smtp.mailfrom=user@example.com" in flat
    assert 'smtp.mailfrom=""' in flat
    assert 'p.v="has space \\"and\\" \\\\"' in flat
    assert "(a \\(nested\\) \\\\ c X-Evil: 1)" in flat
    # No line of the result can be taken for a new header field.
    assert all(line.startswith("\t") for line in value.split("\r\n")[1:])


def test_render_quotes_odd_authserv_id():
    assert render("my host", []) == '"my host"; none'


# --- strip_forged -------------------------------------------------------------------

BLOCK = (
    b"Received: from a by b; Mon, 24 Nov 2025 10:00:00 +0000\r\n"
    b"Authentication-Results: mx.relay.test; spf=pass smtp.mailfrom=evil.test\r\n"
    b"Authentication-Results: other.example; dkim=pass header.d=x.test\r\n"
    b"Subject: hi\r\n"
    b"authentication-results:\r\n"
    b"  (forged by the sender (nested)) MX.Relay.Test\r\n"
    b"  ; dkim=pass header.d=paypal.com\r\n"
    b"Authentication-Results : \"mx.relay.test\"; dmarc=pass\r\n"
    b"Authentication-Results: mx.relay.test.; dmarc=pass\r\n"
    b"Authentication-Results: mx.relay.test.evil; dmarc=pass\r\n"
    b"Authentication-Results: mx.relay.testing; none\r\n"
    b"X-Authentication-Results: mx.relay.test; spf=pass\r\n"
    b"From: a@b.test\r\n"
)

KEPT = (
    b"Received: from a by b; Mon, 24 Nov 2025 10:00:00 +0000\r\n"
    b"Authentication-Results: other.example; dkim=pass header.d=x.test\r\n"
    b"Subject: hi\r\n"
    b"Authentication-Results: mx.relay.test.evil; dmarc=pass\r\n"
    b"Authentication-Results: mx.relay.testing; none\r\n"
    b"X-Authentication-Results: mx.relay.test; spf=pass\r\n"
    b"From: a@b.test\r\n"
)


def test_strip_forged():
    assert strip_forged(BLOCK, ID) == KEPT
    assert strip_forged(BLOCK, "MX.RELAY.TEST") == KEPT


def test_strip_keeps_bytes_exactly():
    odd = (b"X-Odd:  \xff\xfe bytes\r\n\tfolded\r\n"
           b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
           b"X-Bare-LF: yes\n"
           b"Authentication-Results: mx.relay.test; none\r\n"
           b"  more of it\r\n"
           b"Authentication-Results: (only a comment\r\n"
           b"X-Last: no newline at end")
    assert strip_forged(odd, ID) == (
        b"X-Odd:  \xff\xfe bytes\r\n\tfolded\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"X-Bare-LF: yes\n"
        b"Authentication-Results: (only a comment\r\n"
        b"X-Last: no newline at end")
    assert strip_forged(b"", ID) == b""
    assert strip_forged(b"Subject: x\r\n", ID) == b"Subject: x\r\n"


def test_strip_does_not_touch_lookalike_names_or_values():
    block = (b"Authentication-Results-Old: mx.relay.test; none\r\n"
             b"Subject: Authentication-Results: mx.relay.test; none\r\n"
             b"X-Note: see\r\n Authentication-Results: mx.relay.test;\r\n")
    assert strip_forged(block, ID) == block


@pytest.mark.parametrize("value,found", [
    (b" mx.relay.test; none", "mx.relay.test"),
    (b"mx.relay.test 1; none", "mx.relay.test"),
    (b" (c) (d (e) \\) ) mx.relay.test;", "mx.relay.test"),
    (b'\r\n\t "mx.relay\\.test" ; none', "mx.relay.test"),
    (b" ; none", None),
    (b"", None),
])
def test_read_authserv_id(value, found):
    assert read_authserv_id(value) == found


_field = st.sampled_from([
    b"Subject: s\r\n", b"Authentication-Results: mx.relay.test; none\r\n",
    b"Authentication-Results: (x) MX.relay.test;\r\n\tspf=pass\r\n",
    b"Authentication-Results: other.test; none\r\n", b"X-A: 1\r\n  2\r\n",
    b"Received: by x\r\n\tid 1\r\n",
])


@given(st.lists(_field, max_size=12))
def test_strip_is_exactly_the_other_fields(fields):
    ours = {f for f in fields if f.lower().startswith(b"authentication-results")
            and b"mx.relay.test" in f.lower()}
    assert strip_forged(b"".join(fields), ID) == b"".join(f for f in fields if f not in ours)
