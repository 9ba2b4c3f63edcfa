"""DSN builder (relay.delivery.bounce): every report parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from relay.delivery.bounce import MAX_FULL, build_dsn, status_of, wants_dsn
from relay.queue.model import Envelope, Recipient

ORIGINAL = (b"Received: from client.example (client [192.0.2.1])\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@example.net\r\n"
            b"Subject: quarterly numbers\r\n"
            b"Message-ID: <orig-1@example.org>\r\n"
            b"\r\n"
            b"Hello Bob,\r\n"
            b".a line that started with a dot\r\n"
            b"SECRET-BODY-MARKER\r\n")
NOW = 1_700_000_000.0
ARRIVAL = NOW - 3600


def make_env(**kw) -> Envelope:
    rcpts = kw.pop("recipients", None) or [
        Recipient("bob@example.net", last_error="550 5.1.1 <bob@example.net>: no such user")]
    return Envelope(queue_id="QID123", sender=kw.pop("sender", "alice@example.org"),
                    recipients=rcpts, arrival=ARRIVAL, **kw)


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def status_blocks(msg) -> tuple[email.message.Message, list[email.message.Message]]:
    """The per-message block and per-recipient blocks of the message/delivery-status."""
    ds = msg.get_payload(1)
    assert ds.get_content_type() == "message/delivery-status"
    blocks = ds.get_payload()
    return blocks[0], blocks[1:]


def assert_wire_clean(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_failed_dsn_every_field():
    env = make_env(envid="QQ+2B314", ret="HDRS")
    env.recipients[0].orcpt = "rfc822;bob+2Bx@example.net"
    env.recipients[0].notify = "FAILURE"
    dsn_env, data = build_dsn(env, env.recipients, "failed", ORIGINAL, "mx.relay.test",
                              now=NOW)
    assert data.isascii()
    assert_wire_clean(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.relay.test>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.relay\.test>", msg["Message-ID"])
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"

    parts = msg.get_payload()
    assert len(parts) == 3
    human = parts[0]
    assert human.get_content_type() == "text/plain"
    text = human.get_payload()
    assert "<bob@example.net>" in text and "no such user" in text

    per_msg, per_rcpt = status_blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.relay.test"
    assert per_msg["Original-Envelope-Id"] == "QQ+314"      # xtext decoded
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == ARRIVAL
    assert len(per_rcpt) == 1
    r = per_rcpt[0]
    assert r["Final-Recipient"] == "rfc822; bob@example.net"
    assert r["Original-Recipient"] == "rfc822; bob+x@example.net"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert email.utils.parsedate_to_datetime(r["Last-Attempt-Date"]).timestamp() == NOW
    assert r["Will-Retry-Until"] is None

    orig = parts[2]
    assert orig.get_content_type() == "text/rfc822-headers"
    assert b"Subject: quarterly numbers" in data
    assert b"SECRET-BODY-MARKER" not in data

    assert dsn_env.sender == ""
    assert [r.address for r in dsn_env.recipients] == ["alice@example.org"]
    assert dsn_env.is_bounce
    assert dsn_env.queue_id and dsn_env.queue_id != env.queue_id
    assert dsn_env.size == len(data)
    assert not dsn_env.smtputf8 and dsn_env.body is None


def test_ret_full_returns_whole_message():
    env = make_env(ret="FULL")
    _, data = build_dsn(env, env.recipients, "failed", ORIGINAL, "mx.relay.test", now=NOW)
    msg = parse(data)
    orig = msg.get_payload(2)
    assert orig.get_content_type() == "message/rfc822"
    inner = orig.get_payload(0)
    assert inner["Subject"] == "quarterly numbers"
    assert "SECRET-BODY-MARKER" in inner.get_payload()
    # The dot-line is stored as-is; dot-stuffing is the SMTP client's job.
    assert ".a line that started with a dot" in inner.get_payload()


def test_ret_full_but_large_sends_headers_only():
    big = ORIGINAL + b"x" * 76 + b"\r\n"
    big = big + (b"y" * 998 + b"\r\n") * ((MAX_FULL // 1000) + 1)
    env = make_env(ret="FULL")
    _, data = build_dsn(env, env.recipients, "failed", big, "mx.relay.test", now=NOW)
    msg = parse(data)
    assert msg.get_payload(2).get_content_type() == "text/rfc822-headers"
    assert b"SECRET-BODY-MARKER" not in data
    assert len(data) < 10_000
    assert "only its header" in msg.get_payload(0).get_payload()


def test_ret_full_ignored_for_delay():
    env = make_env(ret="FULL")
    env.recipients[0].last_error = "451 4.3.0 try later"
    _, data = build_dsn(env, env.recipients, "delayed", ORIGINAL, "mx.relay.test", now=NOW)
    assert b"SECRET-BODY-MARKER" not in data


def test_delayed_dsn():
    rc = Recipient("carol@example.net", last_error="421 4.4.2 mx.example.net timeout",
                   notify="DELAY,FAILURE")
    env = make_env(recipients=[rc])
    _, data = build_dsn(env, [rc], "delayed", ORIGINAL, "mx.relay.test", now=NOW,
                        lifetime=5 * 86400)
    msg = parse(data)
    assert msg["Subject"].startswith("Delayed Mail")
    _, (r,) = status_blocks(msg)
    assert r["Action"] == "delayed"
    assert r["Status"] == "4.4.2"
    assert (email.utils.parsedate_to_datetime(r["Will-Retry-Until"]).timestamp()
            == ARRIVAL + 5 * 86400)


def test_multi_recipient_and_notify_filter():
    rcpts = [
        Recipient("a@x.test", last_error="550 5.1.1 unknown"),
        Recipient("b@x.test", last_error="552 5.2.2 mailbox full", notify="FAILURE,DELAY"),
        Recipient("c@x.test", last_error="550 5.7.1 denied", notify="NEVER"),
        Recipient("d@x.test", last_error="554 no enhanced code", notify="SUCCESS"),
        Recipient("e@x.test", last_error=""),
    ]
    env = make_env(recipients=rcpts)
    _, data = build_dsn(env, rcpts, "failed", ORIGINAL, "mx.relay.test", now=NOW)
    _, blocks = status_blocks(parse(data))
    got = {b["Final-Recipient"]: b["Status"] for b in blocks}
    assert got == {"rfc822; a@x.test": "5.1.1", "rfc822; b@x.test": "5.2.2",
                   "rfc822; e@x.test": "5.0.0"}
    assert blocks[2]["Diagnostic-Code"] is None
    assert b"c@x.test" not in data and b"d@x.test" not in data


def test_success_dsn_only_when_asked():
    rc = Recipient("a@x.test", notify="SUCCESS", last_error="250 2.0.0 Ok queued as X")
    env = make_env(recipients=[rc])
    _, data = build_dsn(env, [rc], "delivered", ORIGINAL, "mx.relay.test", now=NOW)
    _, (b,) = status_blocks(parse(data))
    assert b["Action"] == "delivered" and b["Status"] == "2.0.0"
    plain = Recipient("a@x.test", last_error="250 ok")
    with pytest.raises(ValueError):
        build_dsn(make_env(recipients=[plain]), [plain], "delivered", ORIGINAL, "m", now=NOW)


def test_refuses_null_sender_bounce_and_bad_action():
    env = make_env(sender="")
    with pytest.raises(ValueError):
        build_dsn(env, env.recipients, "failed", ORIGINAL, "m")
    env = make_env()
    env.is_bounce = True
    with pytest.raises(ValueError):
        build_dsn(env, env.recipients, "failed", ORIGINAL, "m")
    with pytest.raises(ValueError):
        build_dsn(make_env(), make_env().recipients, "exploded", ORIGINAL, "m")


def test_remote_mta_and_hostile_reply_text():
    evil = ("mx1.example.net[192.0.2.7]:25 said: 550 5.7.1 bad\r\nBcc: victim@evil.test"
            "\r\n\r\n--injected\x00\x1b[31m caf\u00e9 " + "z" * 3000)
    rc = Recipient("bob@example.net", last_error=evil)
    env = make_env(recipients=[rc])
    _, data = build_dsn(env, [rc], "failed", ORIGINAL, "mx.relay.test", now=NOW)
    assert data.isascii()
    assert_wire_clean(data)
    msg = parse(data)
    assert msg["Bcc"] is None
    _, (b,) = status_blocks(msg)
    assert b["Bcc"] is None
    assert b["Remote-MTA"] == "dns; mx1.example.net"
    assert b["Status"] == "5.7.1"
    diag = re.sub(r"\s+", " ", b["Diagnostic-Code"])
    assert diag.startswith("smtp; 550 5.7.1 bad Bcc: victim@evil.test --injected")
    assert len(diag) < 1000


def test_remote_mta_given_explicitly():
    env = make_env()
    _, data = build_dsn(env, env.recipients, "failed", ORIGINAL, "mx.relay.test", now=NOW,
                        remote_mtas={"bob@example.net": "mx9.example.net"})
    _, (b,) = status_blocks(parse(data))
    assert b["Remote-MTA"] == "dns; mx9.example.net"


def test_local_error_text_is_not_a_diagnostic_code():
    rc = Recipient("bob@example.net", last_error="connect to mx.example.net: refused")
    env = make_env(recipients=[rc])
    _, data = build_dsn(env, [rc], "failed", ORIGINAL, "mx.relay.test", now=NOW)
    _, (b,) = status_blocks(parse(data))
    assert b["Diagnostic-Code"] is None
    assert b["Status"] == "5.0.0"
    assert "refused" in b["X-Relay-Diagnostic"]


def test_boundary_in_original_cannot_break_the_report():
    # An original that contains lines shaped like MIME boundaries and bare newlines.
    nasty = (b"Subject: x\r\n\r\n--" + b"A" * 30 + b"\r\nbare\nlf\rcr\r\n.\r\n")
    env = make_env(ret="FULL")
    _, data = build_dsn(env, env.recipients, "failed", nasty, "mx.relay.test", now=NOW)
    assert_wire_clean(data)
    msg = parse(data)
    assert len(msg.get_payload()) == 3
    assert "bare\r\nlf\r\ncr" in msg.get_payload(2).get_payload(0).get_payload().replace(
        "\n", "\r\n").replace("\r\r\n", "\r\n")


def test_smtputf8_sender_and_recipient():
    rc = Recipient("j\u00f6rg@b\u00fccher.example", last_error="550 5.1.1 nope",
                   orcpt="utf-8;j\\x{F6}rg@b\\x{FC}cher.example")
    head = "From: J\u00f6rg <alice@example.org>\r\nSubject: gr\u00fc\u00dfe\r\n\r\nbody\r\n"
    env = make_env(sender="\u00fcser@example.org", recipients=[rc], smtputf8=True)
    dsn_env, data = build_dsn(env, [rc], "failed", head.encode(), "mx.relay.test", now=NOW)
    assert dsn_env.smtputf8 and dsn_env.body == "8BITMIME"
    assert dsn_env.recipients[0].address == "\u00fcser@example.org"
    assert_wire_clean(data)
    # RFC 6532 headers: parse the UTF-8 text (the bytes parser assumes ASCII).
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert msg["To"].addresses[0].addr_spec == "\u00fcser@example.org"
    _, (b,) = status_blocks(msg)
    assert b["Final-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    assert b["Original-Recipient"] == "utf-8; j\\x{F6}rg@b\\x{FC}cher.example"
    part = msg.get_payload(2)
    assert part.get_content_type() == "message/global-headers"
    assert part["Content-Transfer-Encoding"] == "8bit"
    # Everything except the To: header and the returned headers is ASCII.
    assert data.split(b"\r\n--")[1].isascii() and data.split(b"\r\n--")[2].isascii()


def test_ascii_sender_with_8bit_original_keeps_ascii_envelope():
    env = make_env(body="8BITMIME")
    _, data = build_dsn(env, env.recipients, "failed",
                        "Subject: caf\u00e9\r\n\r\nx\r\n".encode(), "m.test", now=NOW)
    msg = parse(data)
    assert msg.get_payload(2).get_content_type() == "text/rfc822-headers"
    assert msg["Content-Transfer-Encoding"] == "8bit"


@pytest.mark.parametrize("err,action,want", [
    ("550 5.1.1 x", "failed", "5.1.1"),
    ("550-5.1.1 first line", "failed", "5.1.1"),
    ("550 4.1.1 inconsistent", "failed", "5.0.0"),
    ("451 4.7.1 greylisted", "failed", "4.7.1"),   # expired after transient errors
    ("554 transaction failed", "failed", "5.0.0"),
    ("", "failed", "5.0.0"),
    ("garbage", "delayed", "4.0.0"),
    ("550 5.1.1 x", "delayed", "4.0.0"),
    ("450 4.2.0 busy", "delayed", "4.2.0"),
    ("250 2.1.5 ok", "delivered", "2.1.5"),
    ("host.example[1.2.3.4]:25 said: 552 5.3.4 too big", "failed", "5.3.4"),
])
def test_status_of(err, action, want):
    assert status_of(err, action) == want


def test_wants_dsn():
    assert wants_dsn(Recipient("a@b"), "failed")
    assert wants_dsn(Recipient("a@b"), "delayed")
    assert not wants_dsn(Recipient("a@b"), "delivered")
    assert not wants_dsn(Recipient("a@b", notify="NEVER"), "failed")
    assert wants_dsn(Recipient("a@b", notify="success,failure"), "failed")
    assert not wants_dsn(Recipient("a@b", notify="FAILURE"), "delayed")


def test_dsn_travels_over_real_smtp():
    """The DSN as built goes through a real SMTP exchange (aiosmtplib -> aiosmtpd on
    loopback) with the null reverse-path, and arrives byte-for-byte parseable."""
    import asyncio

    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    got = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 2.0.0 Ok"

    env = make_env(ret="FULL")
    dsn_env, data = build_dsn(env, env.recipients, "failed", ORIGINAL, "mx.relay.test",
                              now=NOW)

    async def go():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Sink(), hostname="sink.test"),
                                          "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            # aiosmtplib.send() refuses a null sender, so drive the commands.
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await client.connect()
            await client.ehlo()
            await client.mail(dsn_env.sender)
            for r in dsn_env.recipients:
                await client.rcpt(r.address)
            await client.data(data)
            await client.quit()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())
    (mail_from, rcpts, content), = got
    assert mail_from == "<>" and rcpts == ["alice@example.org"]   # aiosmtpd keeps "<>"
    msg = parse(content if isinstance(content, bytes) else content.encode())
    assert msg.get_content_type() == "multipart/report"
    _, (b,) = status_blocks(msg)
    assert b["Status"] == "5.1.1"
    assert "SECRET-BODY-MARKER" in msg.get_payload(2).get_payload(0).get_payload()
