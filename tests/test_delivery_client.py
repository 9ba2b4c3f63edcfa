"""relay.delivery.client over real loopback sockets: aiosmtpd next hops (STARTTLS with
trustme certificates, AUTH, SIZE, SMTPUTF8) and scripted servers (PIPELINING, response
injection after STARTTLS, DSN parameters)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme
from _delivery import Scripted, Sink, authenticator, start_sinks

from relay.delivery.client import (
    Connection,
    Message,
    SessionError,
    StaleSession,
    Timeouts,
    TLSFailure,
)
from relay.delivery.mx import Target
from relay.delivery.wire import to_wire

T = Timeouts(connect=3, command=3, data=3)
WIRE = to_wire(b"Subject: t\r\n\r\nhi\r\n")


def msg(*rcpts: str, sender: str = "s@example.test", wire: bytes = WIRE, **kw) -> Message:
    return Message(sender, tuple((r, None, None) for r in rcpts), wire, **kw)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def server_ctx(ca, *names):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def client_ctx(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_plain_delivery_reuse_and_bad_address():
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        conn = await Connection.open(Target("sink.test", "127.0.0.1", port), helo_name="relay.test",
                                     timeouts=T, tls_level="none")
        # A CR/LF address never reaches the wire; the good one is delivered.
        r = await conn.send(msg("a@x.test", "evil@x.test\r\nRCPT TO:<v@y.test>"))
        assert [x.code for x in r] == [250, 553] and r[1].enhanced == "5.1.3"
        assert await conn.reset()
        r = await conn.send(msg("b@x.test"))
        assert r[0].code == 250
        await conn.close()
        for s in servers:
            s.close()
        assert sink.sessions == 1
        assert [m.rcpts for m in sink.messages] == [["a@x.test"], ["b@x.test"]]
        assert sink.rcpt_seen == ["a@x.test", "b@x.test"]
        assert sink.messages[0].content == b"Subject: t\r\n\r\nhi\r\n"
    asyncio.run(go())


def test_per_recipient_replies_and_no_reuse_after_failed_data():
    async def go():
        sink = Sink(rcpt_replies={"bad@x.test": "550 5.1.1 no such user",
                                  "later@x.test": "451 4.7.1 greylisted"})
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        conn = await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                     timeouts=T, tls_level="none")
        r = await conn.send(msg("ok@x.test", "bad@x.test", "later@x.test"))
        assert [x.code for x in r] == [250, 550, 451]
        assert conn.usable
        sink.data_reply = "554 5.6.0 content rejected"
        await conn.reset()
        r = await conn.send(msg("ok@x.test"))
        assert r[0].code == 554 and not conn.usable
        assert not await conn.reset()
        conn.abort()
        for s in servers:
            s.close()
    asyncio.run(go())


def test_size_and_smtputf8_prechecks():
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink], data_size_limit=100)
        conn = await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                     timeouts=T, tls_level="none")
        assert conn.ext.size_limit == 100
        r = await conn.send(msg("a@x.test", wire=to_wire(b"x" * 200)))
        assert r[0].code == 552 and r[0].enhanced == "5.3.4"
        r = await conn.send(msg("j\u00fcrgen@x.test", "a@x.test"))
        assert [x.enhanced for x in r] == ["5.6.7", "5.6.7"]
        await conn.close()
        for s in servers:
            s.close()
        assert sink.messages == [] and sink.rcpt_seen == []
    asyncio.run(go())


def test_smtputf8_passed_when_offered():
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink], enable_SMTPUTF8=True)
        conn = await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                     timeouts=T, tls_level="none")
        r = await conn.send(msg("j\u00fcrgen@x.test", smtputf8=True))
        assert r[0].code == 250
        await conn.close()
        for s in servers:
            s.close()
        assert sink.messages[0].rcpts == ["j\u00fcrgen@x.test"]
        assert "SMTPUTF8" in sink.messages[0].mail_options
    asyncio.run(go())


def test_starttls_verify_and_auth(ca):
    async def go():
        sink = Sink()
        port, servers = await start_sinks(
            ["127.0.0.1"], [sink], tls_context=server_ctx(ca, "smart.test"),
            authenticator=authenticator("u", "p\u00e4ss"), auth_require_tls=True)
        target = Target("smart.test", "127.0.0.1", port)
        conn = await Connection.open(target, helo_name="relay.test", timeouts=T,
                                     tls_level="verify", ssl_context=client_ctx(ca),
                                     auth=("u", "p\u00e4ss"))
        assert conn.tls == "verified"
        r = await conn.send(msg("a@x.test"))
        assert r[0].code == 250
        await conn.close()
        # Wrong password: a temporary session error, nothing sent.
        with pytest.raises(SessionError) as e:
            await Connection.open(target, helo_name="relay.test", timeouts=T, tls_level="verify",
                                  ssl_context=client_ctx(ca), auth=("u", "wrong"))
        assert e.value.reply.enhanced == "4.7.8"
        # A certificate for another name fails verification.
        with pytest.raises(TLSFailure):
            await Connection.open(Target("other.test", "127.0.0.1", port), helo_name="relay.test",
                                  timeouts=T, tls_level="verify", ssl_context=client_ctx(ca))
        for s in servers:
            s.close()
        assert len(sink.messages) == 1 and sink.messages[0].tls
        assert sink.messages[0].auth.login == b"u"
    asyncio.run(go())


def test_auth_refused_without_tls():
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink],
                                          authenticator=authenticator("u", "p"),
                                          auth_require_tls=False)
        with pytest.raises(SessionError) as e:
            await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                  timeouts=T, tls_level="none", auth=("u", "p"))
        assert e.value.kind == "auth" and "without TLS" in str(e.value.reply)
        for s in servers:
            s.close()
    asyncio.run(go())


def test_encrypt_required_but_not_offered():
    async def go():
        port, servers = await start_sinks(["127.0.0.1"], [Sink()])
        with pytest.raises(TLSFailure):
            await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                  timeouts=T, tls_level="encrypt",
                                  ssl_context=ssl.create_default_context())
        for s in servers:
            s.close()
    asyncio.run(go())


@pytest.mark.parametrize("split", [False, True])
def test_starttls_response_injection_refused(ca, split):
    """A 220 to STARTTLS followed by more bytes (same packet or a later one, before the
    handshake) is a TLS failure. The server then really does TLS and answers everything
    with 250, so a client that read the injected lines as its EHLO reply would go on."""
    seen: list[bytes] = []

    async def script(r, w):
        w.write(b"220 inj.test ESMTP\r\n")
        await r.readline()
        w.write(b"250-inj.test\r\n250 STARTTLS\r\n")
        seen.append(await r.readline())
        if split:
            w.write(b"220 ready\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"250-injected\r\n250 AUTH PLAIN\r\n")
        else:
            w.write(b"220 ready\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        await w.drain()
        await w.start_tls(server_ctx(ca, "inj.test"))
        while line := await r.readline():
            seen.append(line)
            w.write(b"250 ok\r\n")

    async def go():
        srv = Scripted(script)
        port = await srv.start()
        with pytest.raises(TLSFailure) as e:
            await Connection.open(Target("inj.test", "127.0.0.1", port), helo_name="relay.test",
                                  timeouts=T, tls_level="encrypt",
                                  ssl_context=client_ctx(ca))
        await asyncio.sleep(0.05)
        srv.close()
        return e.value
    err = asyncio.run(go())
    assert seen[0] == b"STARTTLS\r\n" and seen[1:] == []
    if not split:
        assert "injection" in str(err.reply)


def test_pipelining_and_dsn_parameters():
    """The server answers MAIL only after DATA arrived: a client that waited for each
    reply would time out instead of delivering."""
    lines: list[bytes] = []
    body: list[bytes] = []

    async def script(r, w):
        w.write(b"220 pipe.test ESMTP\r\n")
        await r.readline()
        w.write(b"250-pipe.test\r\n250-PIPELINING\r\n250-DSN\r\n250-8BITMIME\r\n250 SIZE 100000\r\n")
        while True:
            line = await r.readline()
            lines.append(line)
            if line == b"DATA\r\n" or not line:
                break
        w.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 nope\r\n354 go\r\n")
        body.append(await r.readuntil(b"\r\n.\r\n"))
        w.write(b"250 2.0.0 queued as X\r\n")
        await r.readline()
        w.write(b"221 bye\r\n")

    async def go():
        srv = Scripted(script)
        port = await srv.start()
        conn = await Connection.open(Target("pipe.test", "127.0.0.1", port),
                                     helo_name="relay.test", timeouts=T, tls_level="none")
        m = Message("s@x.test", (("a@x.test", "FAILURE,DELAY", "rfc822;a@x.test"),
                                 ("b@x.test", "NEVER", None)), to_wire(b"caf\xc3\xa9\r\n"),
                    ret="HDRS", envid="QQ123", body8bit=True)
        r = await conn.send(m)
        await conn.close()
        srv.close()
        return r
    r = asyncio.run(go())
    assert [x.code for x in r] == [250, 550]
    assert lines == [
        b"MAIL FROM:<s@x.test> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=QQ123\r\n",
        b"RCPT TO:<a@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a@x.test\r\n",
        b"RCPT TO:<b@x.test> NOTIFY=NEVER\r\n",
        b"DATA\r\n"]
    assert body == [b"caf\xc3\xa9\r\n.\r\n"]


def test_garbage_reply_is_a_session_error():
    async def script(r, w):
        w.write(b"220 ok\r\n")
        await r.readline()
        w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await w.drain()
        await r.read(100)

    async def go():
        srv = Scripted(script)
        port = await srv.start()
        with pytest.raises(SessionError) as e:
            await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                  timeouts=T, tls_level="none")
        srv.close()
        return e.value
    err = asyncio.run(go())
    assert err.kind == "protocol" and err.reply.is_temp


def test_connect_refused_is_temporary():
    async def go():
        with pytest.raises(SessionError) as e:
            await Connection.open(Target("h", "127.0.0.9", 1), helo_name="relay.test",
                                  timeouts=T, tls_level="none")
        return e.value
    err = asyncio.run(go())
    assert err.kind == "network" and err.reply.enhanced == "4.4.1"


class _CountingSink(Sink):
    """Counts RSETs; `stale_after`: answer 421 to a session's MAIL after that many."""

    def __init__(self, stale_after: int = 0, **kw):
        super().__init__(**kw)
        self.rsets = 0
        self.stale_after = stale_after

    async def handle_RSET(self, server, session, envelope):
        self.rsets += 1
        return "250 OK"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        n = getattr(session, "mails", 0) + 1
        session.mails = n
        if self.stale_after and n > self.stale_after:
            return "421 4.4.2 idle too long, closing"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


def test_no_rset_after_a_completed_transaction_one_after_an_open_one():
    """RFC 5321 4.1.1.4: after the reply to the final dot the server is ready for MAIL.
    Only a transaction left open (every recipient refused) needs RSET before reuse."""
    async def go():
        sink = _CountingSink(rcpt_replies={"nobody@x.test": "550 5.1.1 no such user"})
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        conn = await Connection.open(Target("h", "127.0.0.1", port), helo_name="relay.test",
                                     timeouts=T, tls_level="none")
        assert [r.code for r in await conn.send(msg("a@x.test"))] == [250]
        assert await conn.reset() and sink.rsets == 0
        assert [r.code for r in await conn.send(msg("nobody@x.test"))] == [550]
        assert await conn.reset() and sink.rsets == 1
        assert [r.code for r in await conn.send(msg("b@x.test"))] == [250]
        await conn.close()
        for s in servers:
            s.close()
        assert [m.rcpts for m in sink.messages] == [["a@x.test"], ["b@x.test"]]
    asyncio.run(go())


def test_a_reused_session_refused_at_mail_is_stale_a_new_one_is_not():
    async def go():
        sink = _CountingSink(stale_after=1)
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        target = Target("h", "127.0.0.1", port)
        conn = await Connection.open(target, helo_name="relay.test", timeouts=T,
                                     tls_level="none")
        assert [r.code for r in await conn.send(msg("a@x.test"))] == [250]
        assert await conn.reset()
        with pytest.raises(StaleSession):
            await conn.send(msg("b@x.test"))
        assert not conn.usable
        conn.abort()
        # On a fresh session the same 421 is the next hop's answer, not staleness.
        sink.stale_after = 0
        conn = await Connection.open(target, helo_name="relay.test", timeouts=T,
                                     tls_level="none")
        sink.stale_after = -1      # every MAIL: 421 (n > -1)
        r = await conn.send(msg("c@x.test"))
        assert [x.code for x in r] == [421] and not conn.usable
        conn.abort()
        for s in servers:
            s.close()
    asyncio.run(go())
