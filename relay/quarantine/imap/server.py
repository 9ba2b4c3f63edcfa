"""IMAP listener: the asyncio layer that reads, feeds the parser, awaits the session, writes.

Takes TCP connections on the IMAP port (plain with STARTTLS, or implicit TLS) and hands
each one's bytes to a proto.Parser and the resulting commands to a session.Session over
the shared QuarantineStore; replies go back unchanged. Owns the limits that need a
clock or a socket: connections per client IP, the TLS handshake timeout, the idle
timeout (30 minutes once logged in, RFC 3501 5.4; one minute before), and STARTTLS's
buffer rule (bytes pipelined after STARTTLS are dropped with the connection, the
CVE-2011-0411 class of command injection). An IDLE client costs one parked read and
no task of its own beyond it.
RFCs: 3501, 2595 / 8314 (STARTTLS, implicit TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from relay.config import QuarantineConfig
from relay.quarantine.imap.proto import Bad, Command, Continue, Parser, RawLine
from relay.quarantine.imap.session import MAX_APPEND, OnRelease, Outcome, Session, State
from relay.quarantine.store import QuarantineStore

log = logging.getLogger("relay.quarantine.imap")

LOGIN_TIMEOUT = 60.0            # before authentication: a stalled client goes soon
IDLE_TIMEOUT = 30 * 60.0        # RFC 3501 5.4: at least 30 minutes once logged in
TLS_HANDSHAKE_TIMEOUT = 30.0
MAX_LINE = 64 * 1024
MAX_LITERAL_NOT_AUTH = 8 * 1024  # a password fits; an anonymous upload does not


class IMAPServer:
    """Start with `await start()`, stop with `await stop()`; `port` is the bound port."""

    def __init__(self, cfg: QuarantineConfig, store: QuarantineStore,
                 ssl_context: ssl.SSLContext | None, host: str, port: int,
                 implicit_tls: bool = False, on_release: OnRelease | None = None,
                 login_timeout: float = LOGIN_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT
                 ) -> None:
        self.cfg, self.store, self.ssl_context = cfg, store, ssl_context
        self.host, self.port = host, port
        self.implicit_tls = implicit_tls
        self.on_release = on_release
        self.login_timeout, self.idle_timeout = login_timeout, idle_timeout
        self._per_ip: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> asyncio.Server:
        if self.implicit_tls and self.ssl_context is None:
            raise ValueError("implicit TLS needs an ssl_context")
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port,
            ssl=self.ssl_context if self.implicit_tls else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self.implicit_tls else None,
            limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("imap listening on %s:%d%s", self.host, self.port,
                 " (implicit TLS)" if self.implicit_tls else "")
        return self._server

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip = str(peer[0])
        if self._per_ip.get(ip, 0) >= self.cfg.max_connections_per_ip:
            log.warning("imap refused ip=%s: too many connections", ip)
            writer.write(b"* BYE Too many connections from your address\r\n")
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()
            return
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        task = asyncio.current_task()
        self._conns.add(task)
        session = Session(self.store, writer.write, ip, tls=self.implicit_tls,
                          starttls_ok=self.ssl_context is not None and not self.implicit_tls,
                          on_release=self.on_release,
                          cleartext_login=self.cfg.cleartext_login or _is_loopback(ip))
        try:
            await self._run(reader, writer, session)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                writer.write(b"* BYE Server shutting down\r\n")
        except Exception:
            log.exception("imap session failed ip=%s", ip)
            with contextlib.suppress(Exception):
                writer.write(b"* BYE Internal error\r\n")
        finally:
            session.close()
            self._conns.discard(task)
            n = self._per_ip.get(ip, 1) - 1
            if n:
                self._per_ip[ip] = n
            else:
                self._per_ip.pop(ip, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   session: Session) -> None:
        parser = Parser(max_line=MAX_LINE, max_literal=MAX_LITERAL_NOT_AUTH)
        writer.write(session.greeting())
        await writer.drain()
        while session.state is not State.LOGOUT:
            authed = session.state is not State.NOT_AUTHENTICATED
            parser.max_literal = MAX_APPEND if authed else MAX_LITERAL_NOT_AUTH
            timeout = self.idle_timeout if authed else self.login_timeout
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout)
            except TimeoutError:
                writer.write(b"* BYE Autologout; idle for too long\r\n")
                await writer.drain()
                return
            if not data:
                return
            parser.feed(data)
            while session.state is not State.LOGOUT:
                ev = parser.next_event()
                if ev is None:
                    break
                outcome = Outcome.NONE
                if isinstance(ev, Continue):
                    writer.write(b"+ Ready for literal data\r\n")
                elif isinstance(ev, Bad):
                    outcome = session.bad(ev.tag, ev.text)
                elif isinstance(ev, RawLine):
                    outcome = await session.raw_line(ev.line)
                elif isinstance(ev, Command):
                    if session.idling:
                        # Only DONE ends IDLE; anything else is a client error.
                        outcome = session.bad(None, "Expected DONE")
                    else:
                        outcome = await session.handle(ev)
                if session.want_line:
                    session.want_line = False
                    parser.expect_line()
                await writer.drain()
                if outcome is Outcome.CLOSE:
                    return
                if outcome is Outcome.STARTTLS:
                    if parser.buffered:
                        # Plaintext pipelined behind STARTTLS must never be executed as
                        # if it came over TLS: hang up.
                        log.warning("imap ip=%s sent data after STARTTLS", session.peer)
                        return
                    await writer.start_tls(self.ssl_context,
                                           ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
                    session.tls = True


async def start_imap(cfg: QuarantineConfig, store: QuarantineStore,
                     ssl_context: ssl.SSLContext | None, host: str, port: int,
                     implicit_tls: bool = False, on_release: OnRelease | None = None
                     ) -> IMAPServer:
    """Start an IMAP listener (port 0: the OS picks; see `.port`). Stop it with
    `await server.stop()`."""
    server = IMAPServer(cfg, store, ssl_context, host, port, implicit_tls, on_release)
    await server.start()
    return server


def _is_loopback(ip: str) -> bool:
    from relay.pipeline.protocol import parse_ip
    addr = parse_ip(ip)
    return addr is not None and addr.is_loopback
