"""End to end: the real Spool, dnsmasq serving MX/A records on loopback, aiosmtpd next
hops on 127.0.0.x, the Scheduler in between; DSNs parsed back with the email package."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import ssl

import pytest
import trustme
from _delivery import ZONE, Sink, authenticator, make_config, message, start_sinks, until
from _dns import dnsmasq

from relay.config import Domain, DomainTLSPolicy, TransportRoute
from relay.delivery.scheduler import Scheduler
from relay.dns import DNSResolver
from relay.queue.model import Envelope, RcptState, Recipient, new_queue_id
from relay.queue.spool import Spool


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory):
    with dnsmasq(tmp_path_factory.mktemp("dns"), ZONE) as (_, port):
        yield port


def env_for(sender: str, *rcpts: str, **kw) -> Envelope:
    return Envelope(new_queue_id(), sender, [Recipient(r) for r in rcpts], **kw)


class Relay:
    """Spool + Scheduler for one test."""

    def __init__(self, tmp_path, dns_port, smtp_port, **delivery):
        self.cfg = make_config(tmp_path / "spool", dns_port, smtp_port, **delivery)
        self.dns_port = dns_port
        self.verify_context = None

    async def __aenter__(self):
        self.spool = Spool(self.cfg.spool)
        await self.spool.open()
        self.sched = Scheduler(self.cfg, self.spool,
                               DNSResolver([("127.0.0.1", self.dns_port)], 3.0),
                               verify_context=self.verify_context)
        self.sched.start()
        return self

    async def __aexit__(self, *exc):
        await self.sched.stop()
        await self.spool.close()

    async def add(self, env: Envelope, data: bytes) -> None:
        env.size = len(data)
        await self.spool.add(env, data)

    def queued(self) -> list[str]:
        return [e.queue_id for e in self.spool.envelopes()]


def dsn_of(got) -> email.message.Message:
    m = email.message_from_bytes(got.content, policy=email.policy.default)
    assert m.get_content_type() == "multipart/report"
    return m


def dsn_status(m) -> list[str]:
    for part in m.walk():
        if part.get_content_type() == "message/delivery-status":
            return [str(p) for p in part.get_payload()]
    raise AssertionError("no delivery-status part")


def test_mx_delivery_one_rcpt_bounced_other_delivered_once(tmp_path, dns_port, caplog):
    caplog.set_level(logging.INFO, "relay.delivery")

    async def go():
        mx1, mx2 = Sink(rcpt_replies={"bad@example.test": "550 5.1.1 no such user"}), Sink()
        port, servers = await start_sinks(["127.0.0.2", "127.0.0.3"], [mx1, mx2])
        async with Relay(tmp_path, dns_port, port) as relay:
            env = env_for("s@example.test", "ok@example.test", "bad@example.test")
            await relay.add(env, message())
            await until(lambda: len(mx1.messages) == 2 and not relay.queued(), what="delivery+DSN")
            await asyncio.sleep(0.3)       # nothing more may arrive
        for s in servers:
            s.close()
        return mx1, mx2, env
    mx1, mx2, env = asyncio.run(go())
    assert mx2.messages == []
    first, dsn = mx1.messages
    assert first.rcpts == ["ok@example.test"] and first.sender == "s@example.test"
    assert first.content == message()
    assert dsn.sender in ("", "<>") and dsn.rcpts == ["s@example.test"]
    m = dsn_of(dsn)
    text = "\n".join(dsn_status(m))
    assert "bad@example.test" in text and "5.1.1" in text and "ok@example.test" not in text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(env.queue_id + ": to=")]
    assert any("to=<ok@example.test>, relay=mx1.example.test[127.0.0.2]:" in x
               and "dsn=2.0.0, status=sent (250" in x for x in lines)
    assert any("to=<bad@example.test>" in x and "status=bounced (550 5.1.1" in x for x in lines)


def test_mx_fallback_and_no_mx_a_fallback(tmp_path, dns_port):
    async def go():
        up, amx = Sink(), Sink()
        # mxdown.fallback.test (127.0.0.4) has no server: connection refused.
        port, servers = await start_sinks(["127.0.0.5", "127.0.0.6"], [up, amx])
        async with Relay(tmp_path, dns_port, port) as relay:
            await relay.add(env_for("s@x.test", "a@fallback.test", "b@amx.test"), message())
            await until(lambda: up.messages and amx.messages and not relay.queued())
        for s in servers:
            s.close()
        return up, amx
    up, amx = asyncio.run(go())
    assert [m.rcpts for m in up.messages] == [["a@fallback.test"]]
    assert [m.rcpts for m in amx.messages] == [["b@amx.test"]]


def test_null_mx_bounces_at_once(tmp_path, dns_port):
    async def go():
        mx1 = Sink()
        port, servers = await start_sinks(["127.0.0.2"], [mx1])
        async with Relay(tmp_path, dns_port, port) as relay:
            await relay.add(env_for("s@example.test", "u@nullmx.test"), message())
            await until(lambda: mx1.messages and not relay.queued())
        for s in servers:
            s.close()
        return mx1
    mx1 = asyncio.run(go())
    (dsn,) = mx1.messages
    assert dsn.rcpts == ["s@example.test"]
    text = "\n".join(dsn_status(dsn_of(dsn)))
    assert "u@nullmx.test" in text and "5.1.10" in text


def test_tempfail_defers_then_delivers_when_next_hop_recovers(tmp_path, dns_port):
    async def go():
        mx1 = Sink(rcpt_replies={"r@example.test": "451 4.7.1 greylisted"})
        mx2 = Sink(rcpt_replies={"r@example.test": "451 4.7.1 greylisted"})
        port, servers = await start_sinks(["127.0.0.2", "127.0.0.3"], [mx1, mx2])
        async with Relay(tmp_path, dns_port, port) as relay:
            env = env_for("s@example.test", "r@example.test")
            await relay.add(env, message())
            # First attempt: both MX tried (4xx -> next MX), recipient deferred.
            await until(lambda: "r@example.test" in mx2.rcpt_seen)
            await until(lambda: env.recipients[0].attempts == 1)
            rc = relay.spool.get(env.queue_id).recipients[0]
            assert rc.state is RcptState.PENDING and rc.last_error.startswith("451 4.7.1")
            assert rc.next_attempt > env.arrival
            mx1.rcpt_replies.clear()
            await until(lambda: mx1.messages and not relay.queued())
        for s in servers:
            s.close()
        return mx1, mx2
    mx1, mx2 = asyncio.run(go())
    assert [m.rcpts for m in mx1.messages] == [["r@example.test"]]
    assert mx2.messages == []


def _through_transport(tmp_path, dns_port, sink: Sink, n: int = 3, domain: str = "a.corp.test",
                       route: str = "*.corp.test", **delivery) -> None:
    """n messages to u<i>@`domain`, routed by a transport map entry for `route` to
    `sink` (which may record what it likes), until all arrive and the queue is empty."""
    async def go():
        port, servers = await start_sinks(["127.0.0.9"], [sink])
        transport = (TransportRoute(Domain.parse(route), f"[127.0.0.9]:{port}"),)
        async with Relay(tmp_path, dns_port, port, transport=transport, **delivery) as relay:
            for i in range(n):
                await relay.add(env_for("s@x.test", f"u{i}@{domain}"), message(f"m{i}"))
            await until(lambda: len(sink.messages) == n and not relay.queued())
        for s in servers:
            s.close()
    asyncio.run(go())


def test_transport_map_and_connection_reuse(tmp_path, dns_port):
    sink = Sink()
    _through_transport(tmp_path, dns_port, sink, max_connections_per_destination=1)
    assert sorted(r for m in sink.messages for r in m.rcpts) == [f"u{i}@a.corp.test" for i in range(3)]
    # One destination slot: later messages reuse the session.
    assert sink.sessions < 3


def test_smarthost_with_starttls_verify_and_auth(tmp_path, dns_port):
    ca = trustme.CA()
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("smart.test").configure_cert(sctx)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))

    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.7"], [sink], tls_context=sctx,
                                          authenticator=authenticator("relay", "s3cret"),
                                          auth_require_tls=True)
        async with Relay(tmp_path, dns_port, port, relayhost=("[smart.test]",),
                         relayhost_username="relay", relayhost_password="s3cret",
                         ca_file=str(cafile),
                         tls_policies=(DomainTLSPolicy(Domain.parse("smart.test"), "verify"),)
                         ) as relay:
            await relay.add(env_for("s@x.test", "far@elsewhere.test"), message())
            await until(lambda: sink.messages and not relay.queued())
        for s in servers:
            s.close()
        return sink
    sink = asyncio.run(go())
    (got,) = sink.messages
    assert got.rcpts == ["far@elsewhere.test"] and got.tls and got.auth.login == b"relay"


def test_dead_destination_paused_without_stalling_others(tmp_path, dns_port):
    async def go():
        mx1 = Sink()
        port, servers = await start_sinks(["127.0.0.2"], [mx1])
        async with Relay(tmp_path, dns_port, port) as relay:
            dead = env_for("s@x.test", "a@down.test")
            await relay.add(dead, message())
            await until(lambda: dead.recipients[0].attempts >= 1)
            assert "4.4.1" in dead.recipients[0].last_error
            live = env_for("s@x.test", "b@example.test")
            await relay.add(live, message())
            await until(lambda: mx1.messages)
            assert relay.queued() == [dead.queue_id]
            dest = relay.sched._dests[f"down.test:{port}"]
            assert dest.failures >= 1 and dest.paused_until > 0
        for s in servers:
            s.close()
    asyncio.run(go())


def test_mail_loop_bounces_with_5_4_6(tmp_path, dns_port):
    async def go():
        mx1 = Sink()
        port, servers = await start_sinks(["127.0.0.2"], [mx1])
        async with Relay(tmp_path, dns_port, port, max_received_headers=5) as relay:
            head = b"".join(b"Received: from h%d by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                            for i in range(6))
            await relay.add(env_for("s@example.test", "r@example.test"), message(extra_head=head))
            await until(lambda: mx1.messages and not relay.queued())
        for s in servers:
            s.close()
        return mx1
    mx1 = asyncio.run(go())
    (dsn,) = mx1.messages
    assert dsn.sender in ("", "<>") and "5.4.6" in "\n".join(dsn_status(dsn_of(dsn)))


def test_no_bounce_of_a_bounce_and_expiry(tmp_path, dns_port):
    async def go():
        mx1 = Sink(rcpt_replies={"gone@example.test": "550 5.1.1 gone"})
        port, servers = await start_sinks(["127.0.0.2"], [mx1])
        async with Relay(tmp_path, dns_port, port, max_queue_lifetime=0) as relay:
            b = env_for("", "gone@example.test", is_bounce=True)
            await relay.add(b, message())
            # Expired at once (lifetime 0): a 4xx destination bounces, DSN to sender.
            e = env_for("s@example.test", "x@down.test")
            await relay.add(e, message())
            await until(lambda: not relay.queued() and len(mx1.messages) == 1)
            await asyncio.sleep(0.3)
        for s in servers:
            s.close()
        return mx1
    mx1 = asyncio.run(go())
    (dsn,) = mx1.messages
    assert dsn.rcpts == ["s@example.test"]
    assert "x@down.test" in "\n".join(dsn_status(dsn_of(dsn)))


def test_delay_warning_sent_once(tmp_path, dns_port):
    async def go():
        mx1 = Sink()
        port, servers = await start_sinks(["127.0.0.2"], [mx1])
        async with Relay(tmp_path, dns_port, port, delay_warning=60) as relay:
            e = env_for("s@example.test", "x@down.test")
            e.arrival -= 3600          # an hour in the queue already
            await relay.add(e, message())
            await until(lambda: e.recipients[0].attempts >= 3, what="three attempts")
            await until(lambda: mx1.messages)
            await asyncio.sleep(0.2)
            assert relay.queued() == [e.queue_id] and e.recipients[0].delay_warned
        for s in servers:
            s.close()
        return mx1
    mx1 = asyncio.run(go())
    (dsn,) = mx1.messages
    text = "\n".join(dsn_status(dsn_of(dsn)))
    assert "x@down.test" in text and "delayed" in text.lower()


def test_flush_retries_now(tmp_path, dns_port):
    async def go():
        mx1 = Sink(rcpt_replies={"r@example.test": "452 4.2.2 mailbox full"})
        mx2 = Sink(rcpt_replies={"r@example.test": "452 4.2.2 mailbox full"})
        port, servers = await start_sinks(["127.0.0.2", "127.0.0.3"], [mx1, mx2])
        async with Relay(tmp_path, dns_port, port, retry_schedule=(3600,)) as relay:
            e = env_for("s@example.test", "r@example.test")
            await relay.add(e, message())
            await until(lambda: e.recipients[0].attempts == 1)
            assert e.recipients[0].next_attempt > e.arrival + 3000
            mx1.rcpt_replies.clear()
            mx2.rcpt_replies.clear()
            relay.sched.flush()
            await until(lambda: (mx1.messages or mx2.messages) and not relay.queued())
        for s in servers:
            s.close()
        return mx1.messages + mx2.messages
    (got,) = asyncio.run(go())
    assert got.rcpts == ["r@example.test"]


def test_per_destination_rate_spaces_messages_out(tmp_path, dns_port):
    """delivery.rate_per_destination: 5 messages/s to one next hop means six messages
    take at least a second from first to last (a lower bound: only the limiter can make
    it that slow on loopback)."""
    import time

    class Timed(Sink):
        async def handle_DATA(self, server, session, envelope):
            self.times.append(time.monotonic())
            return await super().handle_DATA(server, session, envelope)

    sink = Timed()
    sink.times = []
    _through_transport(tmp_path, dns_port, sink, n=6, domain="rate.test", route="rate.test",
                       rate_per_destination=5.0)
    times = sink.times
    assert times[-1] - times[0] >= 0.9


def test_backlog_after_an_outage_is_worked_off_without_a_scan_per_message(tmp_path, dns_port):
    """30 due messages found by one scan, 2 attempt slots: the rest wait in a backlog
    and start as slots free; the whole queue is not rescanned after every attempt."""
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.9"], [sink])
        transport = (TransportRoute(Domain.parse("late.test"), f"[127.0.0.9]:{port}"),)
        relay = Relay(tmp_path, dns_port, port, transport=transport, max_connections=1)
        spool = Spool(relay.cfg.spool)
        await spool.open()
        for i in range(30):                 # queued while delivery was down
            e = env_for("s@x.test", f"u{i}@late.test")
            data = message(f"m{i}")
            e.size = len(data)
            await spool.add(e, data)
        scans = 0
        envelopes = spool.envelopes

        def counting():
            nonlocal scans
            scans += 1
            return envelopes()
        spool.envelopes = counting
        sched = Scheduler(relay.cfg, spool, DNSResolver([("127.0.0.1", dns_port)], 3.0))
        sched.start()
        await until(lambda: len(sink.messages) == 30 and not list(envelopes()))
        await sched.stop()
        await spool.close()
        for s in servers:
            s.close()
        return scans
    scans = asyncio.run(go())
    assert scans <= 5, f"{scans} full queue scans for 30 messages"


class _StaleSink(Sink):
    """Answers 421 to the second MAIL of every session: a cached session gone stale."""

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        session.mails = getattr(session, "mails", 0) + 1
        if session.mails > 1:
            return "421 4.4.2 idle too long, closing"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


def test_stale_cached_session_is_replaced_at_once_not_deferred(tmp_path, dns_port, caplog):
    caplog.set_level(logging.INFO, logger="relay.delivery")
    sink = _StaleSink()
    _through_transport(tmp_path, dns_port, sink, max_connections_per_destination=1)
    text = caplog.text
    assert "status=deferred" not in text
    # Each message after the first found the cached session stale and took a new one.
    assert text.count("was stale") >= 1 and sink.sessions >= 2
