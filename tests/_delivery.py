"""Test peers for delivery: aiosmtpd next hops on 127.0.0.x, a scripted raw SMTP
server (for what aiosmtpd will not do: PIPELINING, response injection), a DNS zone on
dnsmasq, configs and small waiting helpers. Used by tests/test_delivery_*.py."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

from relay.config import Config, DeliveryConfig, Duration, HostPort, SpoolConfig

# One zone for every delivery test (dnsmasq, authoritative for *.test).
ZONE = [
    "--local=/test/",
    "--mx-host=example.test,mx1.example.test,10", "--mx-host=example.test,mx2.example.test,20",
    "--host-record=mx1.example.test,127.0.0.2", "--host-record=mx2.example.test,127.0.0.3",
    "--mx-host=fallback.test,mxdown.fallback.test,10",
    "--mx-host=fallback.test,mxup.fallback.test,20",
    "--host-record=mxdown.fallback.test,127.0.0.4", "--host-record=mxup.fallback.test,127.0.0.5",
    "--host-record=amx.test,127.0.0.6",
    "--host-record=smart.test,127.0.0.7",
    "--mx-host=nullmx.test,.,0",
    "--mx-host=down.test,mx.down.test,10", "--host-record=mx.down.test,127.0.0.8",
    "--mx-host=equal.test,a.equal.test,10", "--mx-host=equal.test,b.equal.test,10",
    "--mx-host=equal.test,c.equal.test,5",
    "--host-record=a.equal.test,127.0.0.11", "--host-record=b.equal.test,127.0.0.12",
    "--host-record=c.equal.test,127.0.0.13",
    "--mx-host=noaddr.test,ghost.noaddr.test,10",
]


@dataclass
class Got:
    sender: str
    rcpts: list[str]
    content: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    tls: bool
    auth: Any


@dataclass
class Sink:
    """aiosmtpd handler: records messages; per-address replies script failures."""

    messages: list[Got] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    rcpt_seen: list[str] = field(default_factory=list)
    sessions: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_seen.append(address)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(Got(envelope.mail_from, list(envelope.rcpt_tos),
                                 envelope.original_content, list(envelope.mail_options),
                                 list(envelope.rcpt_options), session.ssl is not None,
                                 session.auth_data))
        return "250 2.0.0 queued"

    def to(self, addr: str) -> list[Got]:
        return [m for m in self.messages if addr in m.rcpts]


def _factory(handler: Sink, kw: dict[str, Any]) -> Callable[[], SMTP]:
    def make() -> SMTP:
        handler.sessions += 1
        return SMTP(handler, hostname="sink.test", **kw)
    return make


async def start_sinks(hosts: list[str], handlers: list[Sink], **smtp_kw: Any
                      ) -> tuple[int, list[asyncio.AbstractServer]]:
    """One aiosmtpd per host, all on the same OS-chosen port (MX hosts share smtp_port)."""
    loop = asyncio.get_running_loop()
    for _ in range(20):
        servers: list[asyncio.AbstractServer] = []
        try:
            first = await loop.create_server(_factory(handlers[0], smtp_kw), hosts[0], 0)
            servers.append(first)
            port = first.sockets[0].getsockname()[1]
            for h, hd in zip(hosts[1:], handlers[1:], strict=True):
                servers.append(await loop.create_server(_factory(hd, smtp_kw), h, port))
            return port, servers
        except OSError:
            for s in servers:
                s.close()
    raise RuntimeError("no common free port")


def free_port_on(hosts: list[str]) -> int:
    """A TCP port free on every host (for configs whose sinks start later)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        ok = True
        for h in hosts:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port")


def authenticator(user: str, password: str):
    def check(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        # aiosmtpd 1.4.6 needs handled=False on failure, or it never answers (TESTING.md).
        return AuthResult(success=True, auth_data=auth_data) if ok else AuthResult(success=False, handled=False)
    return check


class Scripted:
    """A raw SMTP server on loopback: `script(reader, writer)` plays the next hop."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                        Awaitable[None]]):
        self.script = script
        self.received = bytearray()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await self.script(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()
        self.server = await asyncio.start_server(handle, host, 0)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def make_config(spool_dir: Path, dns_port: int, smtp_port: int, **delivery: Any) -> Config:
    base: dict[str, Any] = dict(
        resolvers=(HostPort.parse(f"127.0.0.1:{dns_port}"),), dns_timeout=Duration(3),
        smtp_port=smtp_port, retry_schedule=(Duration(0.3),), retry_jitter=0.0,
        tls_policy="may", mta_sts=False, connect_timeout=Duration(3),
        command_timeout=Duration(5), data_timeout=Duration(5), helo_name="relay.test")
    base.update(delivery)
    return Config(hostname="relay.test", spool=SpoolConfig(path=str(spool_dir),
                                                           min_free_space=0),
                  delivery=DeliveryConfig(**base))


async def until(cond: Callable[[], bool], limit: float = 15.0, what: str = "condition") -> None:
    """Wait for `cond` (a deadline against hangs, not a speed assertion)."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def message(subject: str = "hello", extra_head: bytes = b"") -> bytes:
    return (b"From: s@example.test\r\nTo: r@example.test\r\n" + extra_head +
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <1@example.test>\r\n\r\n"
            b"body line\r\n.leading dot\r\n")
