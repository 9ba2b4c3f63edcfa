"""Outbound SMTP connection: one session with one next hop, thin asyncio over smtp_proto.

Takes a Target (host, address, port), the TLS level and SSL context from tls_policy,
optional smarthost credentials and the delivery timeouts; hands the scheduler one final
Reply per recipient for each message sent (`send`), real or made up locally for
failures (connect, TLS, timeouts, lost connections), and says whether the session may
carry another message. Trusts nothing the next hop sends: replies go through
smtp_proto.ReplyParser, and a STARTTLS 220 followed by any further byte is refused as
response injection (CVE-2011-0411 class) instead of being read as if it came over TLS.

Reading and writing only: parsing and rendering live in smtp_proto, the bytes of DATA
come ready-made from relay.delivery.wire, whole or as a stream of pieces written with
flow control (the next piece is asked for only once the transport has room), so a
session holds O(piece) of a message however big it is. RFC 5321 (4.5.3.2 timeouts),
3207 STARTTLS, 4954 AUTH (PLAIN/LOGIN, only over TLS), 2920 PIPELINING (MAIL, RCPTs and
DATA in one write), 1870 SIZE, 6152 8BITMIME, 6531 SMTPUTF8, 3461 DSN parameters.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from relay.deadline import Deadline
from relay.delivery import smtp_proto as sp
from relay.delivery.mx import Target
from relay.delivery.smtp_proto import Extensions, Reply
from relay.metrics import OUTBOUND_CONNECTIONS, TLS_OUTBOUND

log = logging.getLogger("relay.delivery")

# A next hop that sends more than this without us asking is flooding: hang up.
_MAX_UNREAD = 1024 * 1024
_WRITE_CHUNK = 256 * 1024


def local_reply(code: int, enhanced: str, text: str) -> Reply:
    """A reply we make up for a failure that has no server reply (connect, TLS, ...)."""
    return Reply(code, (f"{enhanced} {text}",))


class SessionError(Exception):
    """The session cannot carry mail: `reply` says why (code class = temp or perm)."""

    def __init__(self, reply: Reply, kind: str = "reply"):
        super().__init__(str(reply))
        self.reply = reply
        self.kind = kind    # network | tls | protocol | reply | auth | local


class StaleSession(Exception):
    """A reused session that the next hop had already dropped (lost, or a 421, before
    it answered MAIL): nothing of the message was accepted, so a fresh session to the
    same target may try at once instead of deferring the message."""


class TLSFailure(SessionError):
    def __init__(self, text: str):
        super().__init__(local_reply(454, "4.7.5", text), "tls")


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0
    data: float = 600.0


class WireSource(Protocol):
    """DATA bytes as a stream (the scheduler's: WireEncoder over the spool's pieces)."""

    # The message's size as stored, for SIZE= (RFC 1870 4: CRLF line ends counted, the
    # transparency dots and the final dot not).
    size: int

    def pieces(self) -> AsyncIterator[bytes | memoryview]:
        """A fresh stream of the whole wire form (terminator included) per call."""
        ...

    def whole(self) -> list[bytes | memoryview] | None:
        """The whole wire form at once when it is small (no async stream for the common
        case), else None: the client then streams pieces()."""
        ...


@dataclass(frozen=True)
class Message:
    """One transaction: envelope values as queued, DATA bytes from relay.delivery.wire
    (whole, as to_wire gives them, or a WireSource)."""

    sender: str
    recipients: tuple[tuple[str, str | None, str | None], ...]   # (address, NOTIFY, ORCPT)
    wire: bytes | WireSource
    ret: str | None = None
    envid: str | None = None
    body8bit: bool = False
    smtputf8: bool = False        # the client asked for SMTPUTF8 on MAIL


class _Pipe(asyncio.Protocol):
    """Bytes in -> ReplyParser; write flow control. No SMTP knowledge beyond that."""

    def __init__(self) -> None:
        self.parser = sp.ReplyParser()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._loop = asyncio.get_event_loop()
        self._deadline = Deadline(self._loop, self._expire)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.parser.buffered > _MAX_UNREAD and self.transport is not None:
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.close()
        self.eof = True
        self.lost = exc
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError())

    async def read_reply(self, seconds: float) -> Reply:
        """The next reply, waiting at most `seconds` in all. A reply already buffered
        (pipelined answers) costs no timer; one is armed only when we must wait."""
        deadline = None
        while True:
            reply = self.parser.next_reply()
            if reply is not None:
                return reply
            if self.eof:
                raise ConnectionResetError("connection closed by next hop")
            if deadline is None:
                deadline = self._loop.time() + seconds
            self._waiter = self._loop.create_future()
            self._deadline.start(deadline)
            try:
                await self._waiter
            finally:
                self._deadline.stop()
                self._waiter = None

    async def write(self, data: bytes | memoryview, seconds: float) -> None:
        """Write all of `data` within `seconds` (flow control: waits only while the
        transport is paused, so the common case arms no timer)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        deadline = asyncio.get_running_loop().time() + seconds
        view = memoryview(data)
        for i in range(0, len(view), _WRITE_CHUNK):
            if not self._can_write.is_set():
                async with asyncio.timeout_at(deadline):
                    await self._can_write.wait()
            if self.eof:
                raise ConnectionResetError("connection closed by next hop")
            self.transport.write(view[i:i + _WRITE_CHUNK])
        if not self._can_write.is_set():
            async with asyncio.timeout_at(deadline):
                await self._can_write.wait()

    async def writelines(self, pieces: list[bytes | memoryview], seconds: float) -> None:
        """Write several pieces with one system call (a small message's head, body and
        final dot would otherwise be three sends, each waking the next hop)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        deadline = asyncio.get_running_loop().time() + seconds
        if not self._can_write.is_set():
            async with asyncio.timeout_at(deadline):
                await self._can_write.wait()
        if self.eof:
            raise ConnectionResetError("connection closed by next hop")
        self.transport.writelines(pieces)
        if not self._can_write.is_set():
            async with asyncio.timeout_at(deadline):
                await self._can_write.wait()


class Connection:
    """One SMTP session. Use `open`, then `send` once per message, `reset` between
    messages, `close` at the end. Failures of `open` raise SessionError."""

    def __init__(self, target: Target, pipe: _Pipe, timeouts: Timeouts):
        self.target = target
        self._pipe = pipe
        self.timeouts = timeouts
        self.ext = Extensions.none()
        self.tls = "none"            # none | encrypted | verified
        self.usable = True
        self.messages = 0
        self._open = False              # a transaction the next hop still holds open
        self._mail_answered = False     # this transaction's MAIL got a reply
        self._counted = True
        OUTBOUND_CONNECTIONS.inc()

    # --- opening ---------------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target, *, helo_name: str, timeouts: Timeouts,
                   tls_level: str = "may", ssl_context: ssl.SSLContext | None = None,
                   auth: tuple[str, str] | None = None) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.connect):
                _, pipe = await loop.create_connection(_Pipe, target.address, target.port)
        except (OSError, TimeoutError) as e:
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise SessionError(local_reply(421, "4.4.1", f"connect to {target}: {why}"),
                               "network") from None
        conn = cls(target, pipe, timeouts)
        try:
            await conn._greet(helo_name, tls_level, ssl_context, auth)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _command(self, data: bytes, seconds: float | None = None) -> Reply:
        t = self.timeouts.command if seconds is None else seconds
        await self._pipe.write(data, t)
        return await self._pipe.read_reply(t)

    async def _guard(self, coro):  # type: ignore[no-untyped-def]
        """Map lower-layer failures to SessionError at the edge (httpcore style)."""
        try:
            return await coro
        except sp.ProtocolError as e:
            raise SessionError(local_reply(421, "4.5.0", f"protocol error from {self.target}: {e}"),
                               "protocol") from None
        except TimeoutError:
            raise SessionError(local_reply(421, "4.4.2", f"timeout talking to {self.target}"),
                               "network") from None
        except (OSError, EOFError) as e:
            raise SessionError(local_reply(421, "4.4.2", f"lost connection with {self.target}: {e}"),
                               "network") from None

    async def _greet(self, helo_name: str, tls_level: str, ctx: ssl.SSLContext | None,
                     auth: tuple[str, str] | None) -> None:
        greeting = await self._guard(self._pipe.read_reply(self.timeouts.command))
        if greeting.code != 220:
            raise SessionError(greeting)
        await self._hello(helo_name)
        if tls_level != "none" and ctx is not None:
            await self._starttls(helo_name, tls_level, ctx)
        else:
            TLS_OUTBOUND.labels("plaintext").inc()
        if auth is not None:
            await self._auth(*auth)

    async def _hello(self, name: str) -> None:
        reply = await self._guard(self._command(sp.ehlo(name)))
        if reply.code == 250:
            self.ext = Extensions.from_ehlo(reply)
            return
        if reply.is_temp:
            raise SessionError(reply)
        # RFC 5321 3.2: a server without EHLO answers 500/502; fall back to HELO.
        reply = await self._guard(self._command(sp.helo(name)))
        if reply.code != 250:
            raise SessionError(reply)
        self.ext = Extensions.none()

    async def _starttls(self, name: str, level: str, ctx: ssl.SSLContext) -> None:
        required = level in ("encrypt", "verify")
        if "STARTTLS" not in self.ext:
            if required:
                TLS_OUTBOUND.labels("failed").inc()
                raise TLSFailure(f"TLS required but not offered by {self.target}")
            TLS_OUTBOUND.labels("plaintext").inc()
            return
        reply = await self._guard(self._command(sp.STARTTLS))
        if reply.code != 220:
            if required:
                TLS_OUTBOUND.labels("failed").inc()
                raise TLSFailure(f"STARTTLS refused by {self.target}: {reply}")
            TLS_OUTBOUND.labels("plaintext").inc()
            return
        # Anything already received after the 220 was sent in plaintext by someone
        # (possibly a man in the middle) and would be read as if it came over TLS.
        if self._pipe.parser.buffered:
            TLS_OUTBOUND.labels("failed").inc()
            raise TLSFailure(f"{self.target} sent data after STARTTLS 220 (response injection)")
        loop = asyncio.get_running_loop()
        transport = self._pipe.transport
        assert transport is not None
        try:
            # Awaited directly (not in a task) so no data_received can run between the
            # check above and start_tls pausing the plaintext reader.
            new = await loop.start_tls(transport, self._pipe, ctx,
                                       server_hostname=self.target.host,
                                       ssl_handshake_timeout=self.timeouts.command)
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError,
                ConnectionError) as e:
            TLS_OUTBOUND.labels("failed").inc()
            raise TLSFailure(f"TLS handshake with {self.target} failed: {e}") from None
        if new is None or self._pipe.parser.buffered:
            TLS_OUTBOUND.labels("failed").inc()
            raise TLSFailure(f"{self.target} sent data after STARTTLS 220 (response injection)")
        self._pipe.transport = new  # type: ignore[assignment]
        self.tls = "verified" if ctx.verify_mode == ssl.CERT_REQUIRED else "encrypted"
        TLS_OUTBOUND.labels(self.tls).inc()
        # RFC 3207 4.2: forget everything learnt before TLS and ask again.
        await self._hello(name)

    async def _auth(self, user: str, password: str) -> None:
        mechs = self.ext.auth_mechanisms
        if not mechs:
            return      # the smarthost does not ask for AUTH: send without
        if self.tls == "none":
            raise SessionError(local_reply(454, "4.7.0",
                                           f"refusing to send credentials to {self.target} "
                                           "without TLS"), "auth")
        if "PLAIN" in mechs:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await self._guard(self._command(sp.render("AUTH", f"PLAIN {token}")))
        elif "LOGIN" in mechs:
            reply = await self._guard(self._command(sp.render("AUTH", "LOGIN")))
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._guard(self._command(
                    base64.b64encode(secret.encode()) + b"\r\n"))
        else:
            raise SessionError(local_reply(454, "4.7.0",
                                           f"no supported AUTH mechanism at {self.target}"), "auth")
        if reply.code != 235:
            # Deferred, not bounced: wrong credentials are our configuration's fault.
            raise SessionError(local_reply(454, "4.7.8",
                                           f"authentication failed at {self.target}: {reply}"),
                               "auth")

    # --- mail -------------------------------------------------------------------------

    @staticmethod
    def _size(msg: Message) -> int:
        return len(msg.wire) if isinstance(msg.wire, bytes) else msg.wire.size

    def _mail_params(self, msg: Message) -> dict[str, str | None]:
        p: dict[str, str | None] = {}
        if "SIZE" in self.ext:
            p["SIZE"] = str(self._size(msg))
        if msg.body8bit and "8BITMIME" in self.ext:
            p["BODY"] = "8BITMIME"
        if msg.smtputf8 and "SMTPUTF8" in self.ext:
            p["SMTPUTF8"] = None
        if "DSN" in self.ext:
            if msg.ret:
                p["RET"] = msg.ret
            if msg.envid:
                p["ENVID"] = msg.envid
        return p

    def _rcpt_params(self, notify: str | None, orcpt: str | None) -> dict[str, str | None]:
        p: dict[str, str | None] = {}
        if "DSN" in self.ext:
            if notify:
                p["NOTIFY"] = notify
            if orcpt:
                p["ORCPT"] = orcpt
        return p

    def _precheck(self, msg: Message) -> Reply | None:
        """A reason no recipient of `msg` can go to this next hop, before any command."""
        limit = self.ext.size_limit
        size = self._size(msg)
        if limit and size > limit:
            return local_reply(552, "5.3.4",
                               f"message size {size} exceeds {self.target}'s limit {limit}")
        needs_utf8 = not msg.sender.isascii() or any(not a.isascii() for a, _, _ in msg.recipients)
        if needs_utf8 and "SMTPUTF8" not in self.ext:
            return local_reply(553, "5.6.7",
                               f"{self.target} does not support SMTPUTF8, needed by an address")
        return None

    async def send(self, msg: Message) -> list[Reply]:
        """One transaction; one final Reply per recipient in order. Never raises for
        the next hop's answers; sets `usable` False when the session must not carry
        another message."""
        n = len(msg.recipients)
        pre = self._precheck(msg)
        if pre is not None:
            return [pre] * n
        try:
            mail_cmd = sp.mail_from(msg.sender, self._mail_params(msg))
        except sp.CommandError as e:
            return [local_reply(553, "5.1.7", f"bad sender address: {e}")] * n
        rcpt_cmds: list[bytes | None] = []
        local: list[Reply | None] = []
        for addr, notify, orcpt in msg.recipients:
            try:
                rcpt_cmds.append(sp.rcpt_to(addr, self._rcpt_params(notify, orcpt)))
                local.append(None)
            except sp.CommandError as e:
                rcpt_cmds.append(None)
                local.append(local_reply(553, "5.1.3", f"bad recipient address: {e}"))
        if all(c is None for c in rcpt_cmds):
            return [r for r in local if r is not None]
        self.messages += 1
        self._mail_answered = False
        try:
            return await self._guard(self._transaction(msg, mail_cmd, rcpt_cmds, local))
        except SessionError as e:
            self.usable = False
            if self.messages > 1 and not self._mail_answered:
                raise StaleSession(str(e.reply)) from None
            # Lost mid-transaction: nobody knows what the next hop kept; retry later.
            return [r if r is not None else e.reply for r in local]

    async def _transaction(self, msg: Message, mail_cmd: bytes, rcpt_cmds: list[bytes | None],
                           local: list[Reply | None]) -> list[Reply]:
        t = self.timeouts.command
        sent = [c for c in rcpt_cmds if c is not None]
        pipelining = "PIPELINING" in self.ext
        results: list[Reply | None] = list(local)
        if pipelining:
            # RFC 2920 3.1: MAIL, every RCPT and DATA in one write; replies come in order.
            await self._pipe.write(mail_cmd + b"".join(sent) + sp.DATA, t)
            mail = await self._mail_reply(self._pipe.read_reply(t))
            rcpt_replies = [await self._pipe.read_reply(t) for _ in sent]
            data = await self._pipe.read_reply(t)
        else:
            mail = await self._mail_reply(self._command(mail_cmd))
            rcpt_replies = []
            if mail.code == 250:
                for c in sent:
                    rcpt_replies.append(await self._command(c))
            data = None
        if mail.code != 250:
            if mail.code == 421:
                self.usable = False
            if pipelining and data is not None and data.code == 354:
                await self._abort_data()
            return [r if r is not None else mail for r in results]
        it = iter(rcpt_replies)
        for i, c in enumerate(rcpt_cmds):
            if c is not None:
                results[i] = next(it)
        accepted = [i for i, r in enumerate(results) if r is not None and r.code in (250, 251)]
        if any(r is not None and r.code == 421 for r in results):
            self.usable = False
        if not accepted:
            if pipelining and data is not None and data.code == 354:
                await self._abort_data()
            return [r for r in results if r is not None]  # type: ignore[misc]
        if data is None:
            data = await self._command(sp.DATA)
        if data.code != 354:
            for i in accepted:
                results[i] = data
            if data.code == 421:
                self.usable = False
            return results  # type: ignore[return-value]
        try:
            if isinstance(msg.wire, bytes):
                await self._pipe.write(msg.wire, self.timeouts.data)
            else:
                await self._write_stream(msg.wire)
            final = await self._pipe.read_reply(self.timeouts.data)
        except BaseException:
            self.usable = False
            raise
        self._open = False
        if not final.is_ok:
            # Never reuse after a failed DATA: the server's state is not worth trusting.
            self.usable = False
        for i in accepted:
            results[i] = final
        return results  # type: ignore[return-value]

    async def _write_stream(self, source: WireSource) -> None:
        """Each piece within the data timeout (RFC 5321 4.5.3.2.5: per block sent). A
        failure to read the message ends the session without the final dot, so the next
        hop discards the partial message; the recipients get a local 4xx."""
        try:
            small = source.whole()
        except Exception as e:     # the spool's error, not the next hop's
            raise self._unreadable(e) from None
        if small is not None:
            await self._pipe.writelines(small, self.timeouts.data)
            return
        pieces = source.pieces()
        batch: list[bytes | memoryview] = []
        size = 0
        try:
            while True:
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                except Exception as e:
                    raise self._unreadable(e) from None
                # Pieces go out together up to _WRITE_CHUNK: one send per small message.
                batch.append(piece)
                size += len(piece)
                if size >= _WRITE_CHUNK:
                    await self._pipe.writelines(batch, self.timeouts.data)
                    batch, size = [], 0
            if batch:
                await self._pipe.writelines(batch, self.timeouts.data)
        finally:
            await pieces.aclose()       # type: ignore[attr-defined]

    def _unreadable(self, e: Exception) -> SessionError:
        log.warning("reading a queued message for %s failed: %r", self.target, e)
        return SessionError(local_reply(451, "4.3.0", f"cannot read the queued message: {e}"),
                            "local")

    async def _abort_data(self) -> None:
        """A 354 with no recipient accepted (RFC 2920 3.1): send an empty message's end
        and drop the session, whatever it says."""
        self.usable = False
        await self._pipe.write(b".\r\n", self.timeouts.command)
        await self._pipe.read_reply(self.timeouts.command)

    async def _mail_reply(self, coro) -> Reply:  # type: ignore[no-untyped-def]
        mail = await coro
        self._mail_answered = True
        if mail.code == 421 and self.messages > 1:
            self.usable = False
            raise StaleSession(str(mail))
        self._open = mail.code == 250
        return mail

    async def reset(self) -> bool:
        """Ready the session for another message; False = do not reuse. After the reply
        to the final dot the next hop is ready for a new MAIL (RFC 5321 4.1.1.4), so
        only a transaction left open (no recipient taken, DATA refused) costs an RSET
        and its round trip."""
        if not self.usable or self._pipe.eof:
            return False
        if not self._open:
            return True
        try:
            reply = await self._guard(self._command(sp.RSET))
        except SessionError:
            self.usable = False
            return False
        self.usable = reply.code == 250
        self._open = False
        return self.usable

    async def close(self) -> None:
        """QUIT politely (short wait), then close."""
        if self._pipe.transport is not None and not self._pipe.eof and self.usable:
            try:
                await self._guard(self._command(sp.QUIT, min(5.0, self.timeouts.command)))
            except SessionError:
                pass
        self.abort()

    def abort(self) -> None:
        if self._pipe.transport is not None:
            self._pipe.transport.close()
        if self._counted:
            self._counted = False
            OUTBOUND_CONNECTIONS.dec()
        self.usable = False

    @property
    def closed(self) -> bool:
        return self._pipe.eof
