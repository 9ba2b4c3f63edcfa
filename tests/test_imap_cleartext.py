"""IMAP refuses passwords in clear text off loopback (RFC 3501 6.2.3, RFC 2595 3.2):
LOGINDISABLED until STARTTLS; `quarantine.cleartext_login: true` lifts it."""

from __future__ import annotations

import asyncio

from relay.quarantine.imap.proto import Parser
from relay.quarantine.imap.session import Session
from tests.test_quarantine_store import make_store


def dialogue(tmp_path, peer: str, tls: bool, cleartext_login: bool, lines: list[bytes]) -> bytes:
    out: list[bytes] = []
    s = Session(make_store(tmp_path), out.append, peer, tls=tls, starttls_ok=True,
                cleartext_login=cleartext_login)
    out.append(s.greeting())
    p = Parser()

    async def run():
        for line in lines:
            p.feed(line)
            while (ev := p.next_event()) is not None:
                await s.handle(ev)
    asyncio.run(run())
    return b"".join(out)


def test_login_disabled_before_tls_for_a_remote_client(tmp_path):
    text = dialogue(tmp_path, "192.0.2.7", False, False,
                    [b"a CAPABILITY\r\n", b"b LOGIN bob bobpw\r\n",
                     b"c AUTHENTICATE PLAIN AGJvYgBib2Jwdw==\r\n"])
    assert b"LOGINDISABLED" in text and b"AUTH=PLAIN" not in text
    assert b"b NO [PRIVACYREQUIRED]" in text and b"c NO [PRIVACYREQUIRED]" in text
    assert b"Logged in" not in text


def test_login_allowed_over_tls_or_when_configured(tmp_path):
    for tls, flag in ((True, False), (False, True)):
        text = dialogue(tmp_path, "192.0.2.7", tls, flag, [b"b LOGIN bob bobpw\r\n"])
        assert b"b OK" in text and b"LOGINDISABLED" not in text
