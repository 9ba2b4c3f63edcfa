"""One inbound SMTP session: the dialogue, relay access control, DATA to the spool.

Takes a Connection (relay.smtp.connection) from the listener; runs the filter chain at
connect, HELO, MAIL, RCPT and end of DATA; streams DATA through relay.smtp.data into a
spool MessageWriter and answers 250 only after the spool's commit returned (message and
envelope on stable storage), or hands the message to the quarantine (just as durable).
Grammar and replies live in relay.smtp.proto; this module is the state machine and I/O.

Security: this is the code the Internet talks to. Everything from the client is
validated before use (proto), envelope metadata is stored as JSON (never lines built from
client strings), names that reach the Received header are sanitised, bytes pipelined
after STARTTLS end the connection (RFC 3207 5, CVE-2011-0411 class), and DATA can only
end at CRLF.CRLF (smuggling). Relaying needs mynetworks, authentication, or a recipient
in relay_domains: 554 5.7.1 otherwise (the default config is not an open relay).

RFCs: 5321, 1870 SIZE, 2920 PIPELINING, 2034/3463 enhanced codes, 3207 STARTTLS,
4954 AUTH, 6152 8BITMIME, 6531 SMTPUTF8, 3461 DSN, 3848 (with ESMTPSA etc.).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
from dataclasses import dataclass, field

from relay import metrics
from relay.pipeline.protocol import Action, Context, Stage, Verdict
from relay.queue.model import Envelope, Recipient, new_queue_id
from relay.queue.spool import MessageWriter, SpoolError, SpoolFull
from relay.smtp import auth as sasl
from relay.smtp import proto
from relay.smtp.connection import Connection, LineTooLong
from relay.smtp.data import DataError, DataReader
from relay.smtp.proto import Reply, SyntaxErr

log = logging.getLogger("relay.smtp")


_R_GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")


def _reply_counter(stage: str, code: int):
    """The SMTP_REPLIES child for (stage, code), looked up once (metrics.child)."""
    return metrics.child(metrics.SMTP_REPLIES, stage, metrics.reply_class(code))


@dataclass
class Transaction:
    queue_id: str
    sender: str
    params: dict[str, str | None]
    recipients: list[Recipient] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    route: str | None = None


class Session:
    def __init__(self, server, conn: Connection):
        self.server = server            # relay.smtp.server.SMTPServer: config and parts
        self.cfg = server.cfg
        self.lcfg = server.listener
        self.conn = conn
        peer = conn.extra("peername") or ("", 0)
        self.ip, self.port = str(peer[0]), int(peer[1]) if len(peer) > 1 else 0
        self.ctx = Context(client_ip=self.ip, client_port=self.port, listener=self.lcfg.name,
                           resolver=server.resolver)
        self.esmtp = False
        self.greeted = False
        self.tls = False
        self.auth_user = ""
        self.txn: Transaction | None = None
        self.errors = 0
        self.in_data = False
        self.quit = False
        self.counts: dict[str, int] = {}

    # --- replies ----------------------------------------------------------------------

    def reply(self, r: Reply, stage: str) -> None:
        self.conn.write(r.render())
        _reply_counter(stage, r.code).inc()
        if r.code >= 500 and stage not in ("data",):
            self.errors += 1

    def _client(self) -> str:
        return f"{self.ctx.helo or 'unknown'}[{self.ip}]"

    # --- the dialogue -------------------------------------------------------------------

    async def run(self) -> None:
        srv = self.server
        try:
            if self.lcfg.proxy_protocol and not await self._proxy():
                return
            if not srv.admit(self.ip):
                self.reply(Reply(421, "4.7.0", f"{srv.hostname} Error: too many connections"),
                           "connect")
                metrics.CONNECTIONS.labels(self.lcfg.name, "limit").inc()
                log.warning("connect from [%s]: too many connections, refused", self.ip)
                return
            try:
                await self._serve()
            finally:
                srv.release(self.ip)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            log.info("lost connection from %s", self._client())
        except TimeoutError:
            self.reply(proto.R_TIMEOUT, "timeout")
            log.info("timeout after %s from %s", self._last_verb(), self._client())
        except Exception:
            log.exception("session with %s failed", self._client())
            self.reply(Reply(421, "4.3.0", "Error: internal error, closing connection"), "error")
        finally:
            if self.txn is not None and self.txn.queue_id and self._writer is not None:
                self._writer.abort()
            try:
                await asyncio.wait_for(self.conn.flush(), 5)
            except Exception:  # noqa: BLE001 - the peer is gone; nothing more to say
                pass
            self.conn.close()
            summary = " ".join(f"{k}={v}" for k, v in self.counts.items())
            log.info("disconnect from %s %s", self._client(), summary)

    _writer: MessageWriter | None = None

    def _last_verb(self) -> str:
        return next(reversed(self.counts), "CONNECT")

    async def _proxy(self) -> bool:
        """HAProxy PROXY v1/v2 header, only from trusted proxies (the client address it
        carries replaces the socket's peer for access control, logs and headers)."""
        from relay.smtp import proxy as pp
        ppc = self.cfg.proxy_protocol
        if not self.server.trusted_proxy(self.ip):
            metrics.CONNECTIONS.labels(self.lcfg.name, "proxy_untrusted").inc()
            log.warning("connect from [%s]: PROXY listener, peer is not a trusted proxy; "
                        "disconnected", self.ip)
            return False
        try:
            async with asyncio.timeout(ppc.timeout):
                buf = b""
                while True:
                    buf = await self.conn.peek(len(buf))
                    res = pp.parse(buf, ppc.max_header)
                    if res is not None:
                        break
        except (pp.ProxyError, TimeoutError, ConnectionResetError) as e:
            metrics.CONNECTIONS.labels(self.lcfg.name, "proxy_error").inc()
            log.warning("connect from [%s]: bad PROXY header (%s); disconnected", self.ip, e)
            return False
        self.conn.consume(res.consumed)
        if not res.use_peer:
            log.info("connect via proxy [%s]: client [%s]:%s", self.ip, res.src_ip, res.src_port)
            self.ip, self.port = str(res.src_ip), int(res.src_port or 0)
            self.ctx.client_ip, self.ctx.client_port = self.ip, self.port
        return True

    async def _serve(self) -> None:
        srv = self.server
        if self.lcfg.role == "smtps":
            await self._start_tls()
        log.info("connect from [%s]:%d on %s", self.ip, self.port, self.lcfg.name)
        metrics.child(metrics.CONNECTIONS, self.lcfg.name, "accepted").inc()
        self.ctx.trusted = srv.in_mynetworks(self.ip) and self.lcfg.role == "mta"
        v = await srv.chain.run(Stage.CONNECT, self.ctx) if srv.chain.handles(Stage.CONNECT) \
            else None
        if v is not None and v.action in (Action.REJECT, Action.TEMPFAIL):
            self.reply(Reply(554 if v.action is Action.REJECT else 421, v.enhanced, v.text),
                       "connect")
            return
        if self.cfg.smtp.reject_early_talkers and self.conn.buffered and self.lcfg.role != "smtps":
            # RFC 5321 4.3.1: the client waits for the greeting. Bytes already here came
            # from a client that did not (a spambot's fire-and-forget, or pipelining
            # abuse): as Postfix's postscreen pregreet test, refuse it.
            metrics.CONNECTIONS.labels(self.lcfg.name, "early_talker").inc()
            log.warning("connect from [%s]: talked before the greeting; disconnected", self.ip)
            self.reply(Reply(554, "5.5.1", "Error: talked before the greeting"), "connect")
            return
        self.reply(Reply(220, "", f"{srv.hostname} {self.cfg.smtp.banner}"), "connect")
        while not self.quit:
            if srv.draining and not self.in_data:
                self.reply(proto.R_SHUTDOWN, "shutdown")
                return
            if self.errors >= self.cfg.smtp.max_errors:
                self.reply(Reply(421, "4.7.0", "Error: too many errors"), "error")
                log.warning("too many errors from %s", self._client())
                return
            try:
                line = await self.conn.readline(proto.MAX_COMMAND_LINE,
                                                self.cfg.smtp.command_timeout)
            except LineTooLong:
                self.reply(proto.R_CMD_TOO_LONG, "command")
                continue
            await self._command(line.rstrip(b"\r\n"))

    async def _command(self, line: bytes) -> None:
        try:
            verb, arg = proto.parse_command(line)
        except SyntaxErr as e:
            self.reply(e.reply, "command")
            return
        lverb = verb.lower()
        self.counts[lverb] = self.counts.get(lverb, 0) + 1
        handler = getattr(self, f"smtp_{verb}", None)
        if handler is None:
            self.reply(Reply(502, "5.5.2", "Error: command not recognized"), "command")
            return
        try:
            await handler(arg)
        except SyntaxErr as e:
            self.reply(e.reply, verb.lower())

    # --- commands -----------------------------------------------------------------------

    def _ehlo_lines(self) -> list[str]:
        srv = self.server
        lines = [srv.hostname, "PIPELINING", f"SIZE {self.cfg.smtp.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        if srv.ssl_context is not None and not self.tls and self.lcfg.starttls:
            lines.append("STARTTLS")
        if self.tls and srv.authenticator is not None and not self.auth_user:
            lines.append("AUTH PLAIN LOGIN")
        return lines

    async def _hello(self, arg: str, esmtp: bool) -> None:
        if not arg:
            raise SyntaxErr(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
        name = arg.split(" ", 1)[0]
        self.ctx.helo = proto.sanitize(name, 255)
        self._reset()
        self.esmtp, self.greeted = esmtp, True
        srv = self.server
        if srv.chain.handles(Stage.HELO):
            v = await srv.chain.run(Stage.HELO, self.ctx)
            if v.action in (Action.REJECT, Action.TEMPFAIL):
                self.reply(Reply(v.code, v.enhanced, v.text), "helo")
                self.greeted = False
                return
        if esmtp:
            lines = self._ehlo_lines()
            out = [f"250-{x}\r\n" for x in lines[:-1]] + [f"250 {lines[-1]}\r\n"]
            self.conn.write("".join(out).encode())
            _reply_counter("helo", 250).inc()
        else:
            self.reply(Reply(250, "", srv.hostname), "helo")

    async def smtp_EHLO(self, arg: str) -> None:
        await self._hello(arg, True)

    async def smtp_HELO(self, arg: str) -> None:
        await self._hello(arg, False)

    async def smtp_NOOP(self, arg: str) -> None:
        self.reply(proto.R_OK, "noop")

    async def smtp_QUIT(self, arg: str) -> None:
        self.reply(Reply(221, "2.0.0", "Bye"), "quit")
        self.quit = True

    async def smtp_RSET(self, arg: str) -> None:
        self._reset()
        self.reply(proto.R_OK, "rset")

    async def smtp_VRFY(self, arg: str) -> None:
        # RFC 5321 3.5.3: 252 when we will not verify (no user enumeration).
        self.reply(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message"), "vrfy")

    async def smtp_HELP(self, arg: str) -> None:
        self.reply(Reply(214, "2.0.0", "See RFC 5321"), "help")

    async def smtp_STARTTLS(self, arg: str) -> None:
        srv = self.server
        if arg:
            raise SyntaxErr(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.tls or srv.ssl_context is None or not self.lcfg.starttls:
            self.reply(Reply(502 if self.tls else 454, "5.5.1" if self.tls else "4.7.0",
                             "TLS not available" if not self.tls else "Error: already using TLS"),
                       "starttls")
            return
        if self.conn.buffered:
            # RFC 3207 5 / CVE-2011-0411: plaintext pipelined behind STARTTLS would be
            # executed as if it came over TLS. Such a client is broken or an attacker.
            log.warning("%s: commands pipelined after STARTTLS; disconnected", self._client())
            metrics.CONNECTIONS.labels(self.lcfg.name, "starttls_injection").inc()
            self.quit = True
            return
        self.reply(Reply(220, "2.0.0", "Ready to start TLS"), "starttls")
        await self._start_tls()
        # RFC 3207 4.2: forget everything learned before TLS.
        self._reset()
        self.greeted = self.esmtp = False
        self.ctx.helo = ""

    async def _start_tls(self) -> None:
        srv = self.server
        try:
            await self.conn.start_tls(srv.ssl_context, timeout=self.cfg.smtp.tls_handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            metrics.CONNECTIONS.labels(self.lcfg.name, "tls_failed").inc()
            log.info("TLS handshake with [%s] failed: %s", self.ip, e)
            raise ConnectionResetError("TLS handshake failed") from None
        ssl_obj = self.conn.extra("ssl_object")
        self.tls = True
        self.ctx.tls = True
        if ssl_obj is not None:
            self.ctx.tls_version = ssl_obj.version() or ""
            self.ctx.tls_cipher = (ssl_obj.cipher() or ("",))[0]
        metrics.TLS_INBOUND.labels(self.ctx.tls_version or "unknown").inc()

    async def smtp_AUTH(self, arg: str) -> None:
        srv = self.server
        if not self.greeted or not self.esmtp:
            self.reply(Reply(503, "5.5.1", "Error: send EHLO first"), "auth")
            return
        if srv.authenticator is None:
            self.reply(Reply(502, "5.5.1", "Error: authentication not enabled"), "auth")
            return
        if not self.tls:
            self.reply(proto.R_ENCRYPTION_REQUIRED, "auth")
            return
        if self.auth_user:
            self.reply(Reply(503, "5.5.1", "Error: already authenticated"), "auth")
            return
        if self.txn is not None:
            self.reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"), "auth")
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        try:
            if mech == "PLAIN":
                authzid, user, password = sasl.decode_plain(initial or await self._challenge(""))
                if authzid and authzid != user:
                    raise sasl.AuthSyntaxError("acting for another identity is not allowed")
            elif mech == "LOGIN":
                login = sasl.LoginSASL(initial or None)
                while (challenge := login.challenge) is not None:
                    login.feed(await self._challenge(challenge))
                user, password = login.credentials
            else:
                self.reply(Reply(504, "5.5.4", "Error: unsupported authentication mechanism"), "auth")
                return
        except sasl.AuthCancelled:
            self.reply(Reply(501, "5.0.0", "Authentication cancelled"), "auth")
            return
        except sasl.AuthSyntaxError:
            metrics.AUTH_RESULTS.labels(mech.lower(), "malformed").inc()
            self.reply(Reply(501, "5.5.2", "Error: malformed authentication data"), "auth")
            return
        auth = srv.authenticator
        delay = auth.delay_for(self.ip)
        ok = await auth.check(user, password)
        if not ok:
            auth.record_failure(self.ip)
            await asyncio.sleep(delay)
            metrics.AUTH_RESULTS.labels(mech.lower(), "failure").inc()
            log.warning("%s: SASL %s authentication failed for %r", self._client(), mech,
                        proto.sanitize(user, 64))
            self.reply(Reply(535, "5.7.8", "Error: authentication failed"), "auth")
            return
        auth.record_success(self.ip)
        metrics.AUTH_RESULTS.labels(mech.lower(), "success").inc()
        self.auth_user = user
        self.ctx.auth_user = user
        self.ctx.trusted = True
        log.info("%s: sasl_method=%s, sasl_username=%s", self._client(), mech,
                 proto.sanitize(user, 64))
        self.reply(Reply(235, "2.7.0", "Authentication successful"), "auth")

    async def _challenge(self, prompt: str) -> str:
        self.conn.write(f"334 {prompt}\r\n".encode())
        async with asyncio.timeout(self.cfg.smtp.command_timeout):
            line = await self.conn.readline(proto.MAX_COMMAND_LINE)
        return line.rstrip(b"\r\n").decode("ascii", "replace")

    def _reset(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self.txn = None
        self.ctx.new_transaction()

    async def smtp_MAIL(self, arg: str) -> None:
        srv = self.server
        if not self.greeted:
            self.reply(proto.R_BAD_SEQUENCE_MAIL, "mail")
            return
        if self.txn is not None:
            self.reply(proto.R_NESTED_MAIL, "mail")
            return
        if self.lcfg.role in ("submission", "smtps") and not self.auth_user:
            self.reply(proto.R_AUTH_REQUIRED, "mail")
            return
        sender, params = proto.parse_path(arg, "FROM", allow_null=True)
        if not self.esmtp and params:
            raise SyntaxErr(Reply(555, "5.5.4", "Error: parameters need EHLO"))
        proto.check_mail_params(params, self.cfg.smtp.max_message_size, True)
        if not sender.isascii() and "SMTPUTF8" not in params:
            raise SyntaxErr(Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8"))
        try:
            srv.spool.check_space(int(params.get("SIZE") or 0))
        except SpoolFull:
            self.reply(proto.R_STORAGE_FULL, "mail")
            log.warning("reject: MAIL from %s: 452 4.3.1 insufficient spool space", self._client())
            return
        except SpoolError:
            self.reply(proto.R_STORAGE, "mail")
            return
        qid = new_queue_id()
        self.ctx.new_transaction()
        self.ctx.queue_id, self.ctx.mail_from, self.ctx.mail_params = qid, sender, params
        if srv.chain.handles(Stage.MAIL):
            v = await srv.chain.run(Stage.MAIL, self.ctx)
            if v.action in (Action.REJECT, Action.TEMPFAIL):
                self._reject_log("MAIL", v)
                self.reply(Reply(v.code, v.enhanced, v.text), "mail")
                self.ctx.new_transaction()
                return
        else:
            v = Verdict()
        self.txn = Transaction(qid, sender, params, headers=list(v.headers), route=v.route)
        if v.action is Action.QUARANTINE or v.action is Action.DISCARD:
            self.ctx.notes["_verdict"] = v
        extra = f", sasl_username={proto.sanitize(self.auth_user, 64)}" if self.auth_user else ""
        log.info("%s: client=%s%s", qid, self._client(), extra)
        self.reply(proto.R_OK, "mail")

    def _reject_log(self, what: str, v: Verdict, rcpt: str = "") -> None:
        metrics.MESSAGES_REJECTED.labels(v.filter or "policy").inc()
        to = f" to=<{rcpt}>" if rcpt else ""
        log.info("%s: reject: %s from %s: %d %s %s;%s filter=%s", self.ctx.queue_id or "NOQUEUE",
                 what, self._client(), v.code, v.enhanced, v.text, to, v.filter)

    async def smtp_RCPT(self, arg: str) -> None:
        srv = self.server
        if self.txn is None:
            self.reply(proto.R_NEED_MAIL, "rcpt")
            return
        rcpt, params = proto.parse_path(arg, "TO", allow_null=False)
        if not self.esmtp and params:
            raise SyntaxErr(Reply(555, "5.5.4", "Error: parameters need EHLO"))
        proto.check_rcpt_params(params)
        if not rcpt.isascii() and "SMTPUTF8" not in self.txn.params:
            raise SyntaxErr(Reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8"))
        if len(self.txn.recipients) >= self.cfg.smtp.max_recipients:
            self.reply(proto.R_TOO_MANY_RCPTS, "rcpt")
            return
        if not self.ctx.trusted and not srv.relay_domain(proto.domain_of(rcpt)):
            metrics.MESSAGES_REJECTED.labels("relay_denied").inc()
            log.info("%s: reject: RCPT from %s: 554 5.7.1 <%s>: Relay access denied; from=<%s>",
                     self.txn.queue_id, self._client(), rcpt, self.txn.sender)
            self.reply(proto.R_RELAY_DENIED, "rcpt")
            return
        route = None
        if srv.chain.handles(Stage.RCPT):
            v = await srv.chain.run(Stage.RCPT, self.ctx, rcpt)
            if v.action in (Action.REJECT, Action.TEMPFAIL):
                self._reject_log("RCPT", v, rcpt)
                self.reply(Reply(v.code, v.enhanced, v.text), "rcpt")
                return
            self.txn.headers.extend(v.headers)
            route = v.route
            if v.action in (Action.QUARANTINE, Action.DISCARD):
                self.ctx.notes["_verdict"] = v
        self.txn.recipients.append(Recipient(rcpt, notify=params.get("NOTIFY"),
                                             orcpt=params.get("ORCPT"), route=route))
        self.ctx.rcpts.append(rcpt)
        self.reply(proto.R_OK, "rcpt")

    async def smtp_DATA(self, arg: str) -> None:
        srv = self.server
        if self.txn is None:
            self.reply(proto.R_NEED_MAIL, "data")
            return
        if not self.txn.recipients:
            self.reply(Reply(554, "5.5.1", "Error: no valid recipients"), "data")
            return
        if arg:
            raise SyntaxErr(Reply(501, "5.5.4", "Syntax: DATA"))
        txn = self.txn
        self.reply(_R_GO_AHEAD, "data")
        reader = DataReader(self.cfg.smtp.max_message_size,
                            normalize=self.cfg.smtp.bare_newline == "normalize")
        writer = self._writer = srv.spool.writer(txn.queue_id)
        self.in_data = True
        storage_error: Exception | None = None
        try:
            while not reader.done:
                chunk = await self.conn.read(1 << 20, self.cfg.smtp.data_timeout)
                if not chunk:
                    raise ConnectionResetError("connection lost in DATA")
                pieces, rest = reader.feed(chunk)
                if storage_error is None:
                    try:
                        for p in pieces:
                            writer.write(p)
                    except OSError as e:
                        storage_error = e
                if reader.done and rest:
                    self.conn.unread(rest)
            reply = await self._finish_data(txn, reader, writer, storage_error)
            self.reply(reply, "data")
        finally:
            # Only now is the transaction over: a drain must not answer 421 to a session
            # whose message is being committed (the client would send it again).
            self.in_data = False
        self._writer = None
        self._reset()

    async def _finish_data(self, txn: Transaction, reader: DataReader, writer: MessageWriter,
                           storage_error: Exception | None) -> Reply:
        srv = self.server
        qid = txn.queue_id
        if reader.error is not DataError.NONE:
            writer.abort()
            r = {DataError.TOO_BIG: proto.R_TOO_BIG, DataError.BARE_NEWLINE: proto.R_BARE_NEWLINE,
                 DataError.LINE_TOO_LONG: proto.R_LINE_TOO_LONG,
                 DataError.HEADER_TOO_BIG: proto.R_HEADER_TOO_BIG}[reader.error]
            metrics.MESSAGES_REJECTED.labels(reader.error.value).inc()
            log.info("%s: reject: DATA from %s: %d %s %s; from=<%s>", qid, self._client(),
                     r.code, r.enhanced, r.text, txn.sender)
            return r
        if storage_error is not None:
            writer.abort()
            metrics.SPOOL_ERRORS.labels("write").inc()
            log.error("%s: spool write failed: %s", qid, storage_error)
            return proto.R_STORAGE
        head = reader.finish_head()
        if srv.authres is not None:
            head = srv.authres.strip_forged(head, srv.hostname)
        self.ctx.size = len(head) + writer.size
        self.ctx._load = lambda: _join(head, writer)
        verdict = self.ctx.notes.pop("_verdict", None)
        if srv.chain.handles(Stage.DATA):
            v = await srv.chain.run(Stage.DATA, self.ctx)
            if v.action in (Action.REJECT, Action.TEMPFAIL):
                writer.abort()
                self._reject_log("DATA", v)
                return Reply(v.code, v.enhanced, v.text)
            txn.headers.extend(v.headers)
            if v.route:
                txn.route = v.route
            if v.action in (Action.QUARANTINE, Action.DISCARD):
                verdict = v
        env = Envelope(
            queue_id=qid, sender=txn.sender, recipients=txn.recipients,
            ret=txn.params.get("RET"), envid=txn.params.get("ENVID"),
            body=txn.params.get("BODY"), smtputf8="SMTPUTF8" in txn.params,
            client_ip=self.ip, client_helo=self.ctx.helo, auth_user=self.auth_user,
            listener=self.lcfg.name)
        if txn.route:
            for r in env.recipients:
                r.route = r.route or txn.route
        added = list(txn.headers)
        if srv.authres is not None and self.ctx.auth_results:
            added.insert(0, ("Authentication-Results",
                             srv.authres.render(srv.hostname, self.ctx.auth_results)))
        new_head = "".join(f"{k}: {v}\r\n" for k, v in added).encode("utf-8", "replace")
        new_head += self._received(txn).encode("utf-8", "replace")
        # Our headers are CRLF-only and never start a line with '.', but filters supply
        # values: check the few bytes rather than trust them.
        env.eight_bit = reader.eight_bit or not new_head.isascii()
        env.wire_ready = (not reader.dots and b"\r\n." not in new_head
                          and new_head.count(b"\n") == new_head.count(b"\r\n")
                          == new_head.count(b"\r"))
        try:
            if verdict is not None and verdict.action is Action.DISCARD:
                writer.abort()
                metrics.MESSAGES_DISCARDED.labels(verdict.filter or "unknown").inc()
                log.info("%s: discard: %s (filter %s)", qid, verdict.reason, verdict.filter)
            elif verdict is not None and verdict.action is Action.QUARANTINE:
                message = new_head + await self.ctx.message()
                writer.abort()
                await srv.quarantine(env, message, verdict)
                metrics.MESSAGES_QUARANTINED.labels(verdict.filter or "unknown").inc()
                log.info("%s: quarantine: mailbox=%s filter=%s reason=%s", qid, verdict.mailbox,
                         verdict.filter, verdict.reason)
            else:
                await writer.commit(env, new_head + head)
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", qid, txn.sender,
                         env.size, len(env.recipients))
        except SpoolFull:
            return proto.R_STORAGE_FULL
        except (SpoolError, OSError) as e:
            log.error("%s: cannot store message: %s", qid, e)
            return proto.R_STORAGE
        # Every 250 after DATA counts as received, whether queued, held or dropped.
        metrics.child(metrics.MESSAGES_RECEIVED, self.lcfg.name).inc()
        metrics.RECEIVED_BYTES.inc(env.size)
        return Reply(250, "2.0.0", f"Ok: queued as {qid}")

    def _received(self, txn: Transaction) -> str:
        """RFC 5321 4.4 trace header; 'with' per RFC 3848. Only sanitised values."""
        proto_name = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            proto_name += "S"
        if self.auth_user:
            proto_name += "A"
        if "SMTPUTF8" in txn.params:
            proto_name = "UTF8" + proto_name if self.esmtp else proto_name
        tls = ""
        if self.tls:
            tls = (f"\r\n\t(using {proto.sanitize(self.ctx.tls_version, 16)} with cipher "
                   f"{proto.sanitize(self.ctx.tls_cipher, 64)})")
        auth = f"\r\n\t(Authenticated sender: {proto.sanitize(self.auth_user, 64)})" \
            if self.auth_user else ""
        rcpt = ""
        if len(txn.recipients) == 1 and txn.recipients[0].address.isascii():
            rcpt = f"\r\n\tfor <{txn.recipients[0].address}>"
        date = _rfc5322_now()
        return (f"Received: from {self.ctx.helo or 'unknown'} ([{self.ip}]){tls}{auth}\r\n"
                f"\tby {self.server.hostname} (relay) with {proto_name} id {txn.queue_id}"
                f"{rcpt}; {date}\r\n")


async def _join(head: bytes, writer: MessageWriter) -> bytes:
    return head + await writer.body()


_date = (0, "")


def _rfc5322_now() -> str:
    """The Received header's date, formatted once a second (it showed in the profile)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, localtime=True))
    return _date[1]
