"""Delivery scheduler (Postfix's qmgr + smtp): picks due messages from the spool and
relays them, one result per recipient.

Takes the config, the Spool (envelopes, message pieces, durable update/remove/add), a
Resolver for MX lookups, the DSN builder (relay.delivery.bounce.build_dsn) and
optionally an MTA-STS source; hands messages to next hops through relay.delivery.client
and hands DSNs back to the spool as new messages. Trusts the spool's envelopes (they
were validated on the way in) and nothing a next hop says beyond its reply codes.

Per recipient: 2xx -> DONE (never sent again); 4xx or network -> PENDING with the next
attempt from delivery.retry_schedule (+- jitter) and last_error kept; 5xx -> BOUNCED and
a DSN (RFC 3464) to the sender unless the sender is null, the message is itself a bounce
or NOTIFY says otherwise (RFC 3461 4.1); a deferral older than max_queue_lifetime
bounces; one delay warning per recipient after delay_warning. The envelope is persisted
(spool.update) after every attempt and removed when no recipient is pending. The DSN is
added to the spool before the update that marks its recipients bounced: a crash between
the two can repeat a delivery attempt, never lose a bounce.

Limits: overall and per-destination connection counts, an optional per-destination
message rate, and a destination whose every address refused or timed out the connection
is paused (backoff) so it does not hold slots that other destinations need. A connection
is reused for the next message to the same destination (no RSET after a completed
transaction; one found stale at MAIL is replaced by a fresh one at once).
Memory: a message is never held whole. It goes out as a stream of the spool's pieces
(a small one: head and body, two preads; a big one: CHUNK-sized reads) turned into its
wire form piece by piece (relay.delivery.wire.WireEncoder) and written with flow
control, so a delivery holds O(CHUNK) however big the message; only the header section
is read to count Received fields, and only a DSN with RET=FULL reads a (small) message
whole.
Loop protection: more than max_received_headers Received headers bounces with 5.4.6
(RFC 5321 6.3).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from relay import metrics
from relay.config import Config
from relay.delivery import mx
from relay.delivery.bounce import MAX_FULL, wants_dsn
from relay.delivery.client import (
    Connection,
    Message,
    SessionError,
    StaleSession,
    Timeouts,
    TLSFailure,
    local_reply,
)
from relay.delivery.route import Route, RouteError, Router
from relay.delivery.smtp_proto import Reply
from relay.delivery.tls_policy import TLSDecision, TLSPolicies
from relay.delivery.wire import Piece, WireEncoder
from relay.metrics import (
    DELIVERY_ATTEMPTS,
    DELIVERY_LATENCY,
    DSN_SENT,
    MESSAGES_BOUNCED,
    MESSAGES_DEFERRED,
    MESSAGES_RELAYED,
)
from relay.queue.model import Envelope, RcptState, Recipient

log = logging.getLogger("relay.delivery")

# Idle connections kept for reuse are closed after this long (Postfix's
# smtp_connection_cache_time_limit is 2 s; next hops often drop idle sessions after 10).
IDLE_TIMEOUT = 5.0
# The longest the loop sleeps without looking at the spool (new messages wake it sooner).
MAX_SLEEP = 30.0


@dataclass
class _Destination:
    """Per-destination state: limits, pause after connection failures, idle sessions."""

    slots: asyncio.Semaphore
    failures: int = 0
    paused_until: float = 0.0
    pause_reply: Reply | None = None
    next_slot: float = 0.0                       # rate limit (loop clock)
    idle: list[tuple[Connection, float]] = field(default_factory=list)


@dataclass
class _Outcome:
    rcpt: Recipient
    reply: Reply
    relay: str = "none"
    kind: str = "mx"            # metrics label: route kind
    reason: str = ""            # bounce/defer reason label
    # Accepted by a next hop that does not offer DSN: our duty to report ends here,
    # so NOTIFY=SUCCESS gets a "relayed" DSN (RFC 3461 5.2.2).
    relayed: bool = False


def count_received(message: bytes) -> int:
    """Received header fields in the head (up to the first empty line)."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = (message if end < 0 else message[:end + 2]).lower()
    return head.count(b"\nreceived:") + head.startswith(b"received:")


# A message up to this size that sits in its segment is read with two preads (head,
# body) each time it is sent; a bigger or spilled one streams in CHUNK-sized reads.
SMALL = 1 << 20
CHUNK = 256 * 1024
# The first piece of a message queued whole (DSN, release) holds its header section as
# far as counting Received fields or returning headers needs.
HEADER_PEEK = 64 * 1024


class _SpoolWire:
    """A queued message's wire form, read afresh from the spool each time it is sent
    (client.WireSource): nothing of it is kept between sends or while a send waits."""

    __slots__ = ("spool", "queue_id", "ready", "size")

    def __init__(self, spool: Any, env: Envelope):
        self.spool = spool
        self.queue_id = env.queue_id
        self.ready = env.wire_ready
        self.size = env.size

    def whole(self) -> list[Piece] | None:
        """The wire form at once, when the message is small and in its segment (one
        pread): no async generator for the common case. None: use pieces()."""
        parts = self.spool.parts(self.queue_id, SMALL)
        if parts is None:
            return None
        enc = WireEncoder(self.ready)
        out = [x for p in parts for x in enc.feed(p)]
        out += enc.finish()
        return out

    async def pieces(self) -> AsyncIterator[Piece]:
        whole = self.whole()
        if whole is not None:
            for out in whole:
                yield out
            return
        enc = WireEncoder(self.ready)
        async with contextlib.aclosing(self.spool.chunks(self.queue_id, CHUNK)) as it:
            async for p in it:
                for out in enc.feed(p):
                    yield out
        for out in enc.finish():
            yield out


class Scheduler:
    def __init__(self, cfg: Config, spool: Any, resolver: Any,
                 bounce_fn: Callable[..., tuple[Envelope, bytes]] | None = None,
                 mta_sts: Any = None, verify_context: Any = None,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.d = cfg.delivery
        self.spool = spool
        self.resolver = resolver
        if bounce_fn is None:
            from relay.delivery.bounce import build_dsn
            bounce_fn = build_dsn
        self.bounce_fn = bounce_fn
        self.clock = clock
        self.router = Router(self.d)
        self.tls = TLSPolicies(self.d, mta_sts, verify_context)
        self.timeouts = Timeouts(self.d.connect_timeout, self.d.command_timeout,
                                 self.d.data_timeout)
        self.helo_name = self.d.helo_name or cfg.fqdn
        self._global = asyncio.Semaphore(max(1, self.d.max_connections))
        self._dests: dict[str, _Destination] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._max_inflight = max(2, 2 * self.d.max_connections)
        # New messages, in arrival order, waiting for an attempt slot.
        self._new: collections.deque[Envelope] = collections.deque()
        # Due messages a scan found while every slot was busy: started as slots free,
        # before the queue is scanned again (a scan per finished attempt would cost
        # O(queue) per message when a backlog builds up after an outage).
        self._backlog: collections.deque[str] = collections.deque()
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush = False
        self._scan_at = 0.0
        self._rng = random.Random()

    # --- control ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            if hasattr(self.spool, "subscribe"):
                self.spool.subscribe(self.wake)
            self._task = asyncio.create_task(self._run(), name="delivery-scheduler")

    async def stop(self) -> None:
        """Stop picking messages, cancel attempts in flight (their recipients stay
        pending: at worst one is delivered again), close idle sessions."""
        task, self._task = self._task, None
        tasks = list(self._inflight.values())
        if task is not None:
            tasks.append(task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for dest in self._dests.values():
            idle, dest.idle = dest.idle, []
            for conn, _ in idle:
                await conn.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self, env: Envelope | None = None) -> None:
        """A new message is durable in the spool: try it now."""
        if env is not None:
            self._new.append(env)
        self._event.set()

    def flush(self) -> None:
        """Retry every pending recipient now (`relay queue flush`), paused or not."""
        self._flush = True
        for dest in self._dests.values():
            dest.paused_until, dest.failures = 0.0, 0
        self._event.set()

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                sleep = self._pick()
            except Exception:
                log.exception("delivery scheduler: scan failed")
                sleep = 5.0
            self._close_idle()
            if sleep > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._event.wait()
            self._event.clear()

    def _pick(self) -> float:
        """Start attempts for due messages; return how long to sleep."""
        now = self.clock()
        # New messages start in arrival order while there are slots; the rest stay
        # queued here (a finishing attempt sets the event). Dropping them and
        # rescanning the whole queue on every wake cost O(queue) per message under load.
        new = self._new
        while new and len(self._inflight) < self._max_inflight:
            self._maybe_start(new.popleft(), now, False)
        backlog = self._backlog
        if self._flush:
            backlog.clear()             # the flush scan below finds them all again
        while backlog and len(self._inflight) < self._max_inflight:
            env = self.spool.get(backlog.popleft())
            if env is not None and not env.held:
                self._maybe_start(env, now, False)
        if backlog:
            return MAX_SLEEP            # a finishing attempt sets the event
        if not (self._flush or now >= self._scan_at):
            return max(0.0, min(self._scan_at - now, MAX_SLEEP))
        flush, self._flush = self._flush, False
        next_due = now + MAX_SLEEP
        waiting = {e.queue_id for e in new}
        for env in self.spool.envelopes():
            if env.queue_id in self._inflight or env.held or env.queue_id in waiting:
                continue
            if not env.pending() or flush or env.next_attempt() <= now:
                if len(self._inflight) < self._max_inflight:
                    self._maybe_start(env, now, flush)
                else:
                    backlog.append(env.queue_id)
            else:
                next_due = min(next_due, env.next_attempt())
        self._scan_at = next_due
        return MAX_SLEEP if backlog else max(0.0, min(next_due - now, MAX_SLEEP))

    def _maybe_start(self, env: Envelope, now: float, flush: bool) -> bool:
        if env.queue_id in self._inflight:
            return True
        if len(self._inflight) >= self._max_inflight:
            self._scan_at = now
            return False
        task = asyncio.create_task(self._attempt(env.queue_id, env, flush))
        self._inflight[env.queue_id] = task
        task.add_done_callback(lambda _t, q=env.queue_id: self._done(q))
        return True

    def _done(self, queue_id: str) -> None:
        self._inflight.pop(queue_id, None)
        self._event.set()

    def _close_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        for dest in self._dests.values():
            keep = []
            for conn, since in dest.idle:
                if now - since > IDLE_TIMEOUT or conn.closed:
                    asyncio.create_task(conn.close())
                else:
                    keep.append((conn, since))
            dest.idle = keep

    # --- one message ------------------------------------------------------------------

    async def _attempt(self, queue_id: str, env: Envelope, flush: bool) -> None:
        try:
            await self._attempt_inner(queue_id, env, flush)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt failed", queue_id)
            # Keep it from spinning: the next scan finds it due again only later.
            for r in env.pending():
                r.next_attempt = self.clock() + self.d.retry_schedule[0]

    async def _attempt_inner(self, queue_id: str, env: Envelope, flush: bool) -> None:
        current = self.spool.get(queue_id)
        if current is None or current.held:
            return                       # removed or put on hold meanwhile
        env = current
        if env.finished:
            await self.spool.remove(queue_id)
            return
        now = self.clock()
        due = [r for r in env.pending() if flush or r.next_attempt <= now]
        if not due:
            return
        if count_received(await self._header(queue_id)) > self.d.max_received_headers:
            reply = local_reply(554, "5.4.6", "too many Received headers: mail forwarding loop")
            outcomes = [_Outcome(r, reply, reason="loop") for r in due]
        else:
            outcomes = await self._deliver(env, due)
        await self._settle(env, outcomes)

    async def _header(self, queue_id: str) -> bytes:
        """The header section, or a piece of the message that starts with it. A message
        received over SMTP has its whole header section in the stored head (the session
        stores the DATA reader's header block there); one queued whole (DSN, release,
        drain) has an empty head and its header section at the start of the body."""
        head = self.spool.head(queue_id)
        if head:
            return head
        async with contextlib.aclosing(self.spool.chunks(queue_id, HEADER_PEEK)) as it:
            async for piece in it:
                if piece:
                    return piece
        return b""

    async def _eight_bit(self, env: Envelope) -> bool:
        """BODY=8BITMIME on MAIL (RFC 6152) must be known before any byte is sent: as
        declared, as found at receipt, else by scanning the stored pieces (once; the
        answer is kept in the envelope)."""
        if (env.body or "").upper() == "8BITMIME":
            return True
        if env.eight_bit is None:
            env.eight_bit = await self._scan_8bit(env.queue_id)
        return env.eight_bit

    async def _scan_8bit(self, queue_id: str) -> bool:
        parts = self.spool.parts(queue_id, SMALL)
        if parts is not None:
            return not all(p.isascii() for p in parts)
        async with contextlib.aclosing(self.spool.chunks(queue_id, CHUNK)) as it:
            async for piece in it:
                if not piece.isascii():
                    return True
        return False

    async def _deliver(self, env: Envelope, due: list[Recipient]) -> list[_Outcome]:
        groups: dict[Route, list[Recipient]] = {}
        outcomes: list[_Outcome] = []
        for r in due:
            try:
                groups.setdefault(self.router.route(r), []).append(r)
            except RouteError as e:
                # A routing filter's mistake is ours to fix: keep the mail, retry later.
                outcomes.append(_Outcome(r, local_reply(451, "4.3.5", f"bad next hop: {e}"),
                                         kind="route", reason="config"))
        if not groups:
            return outcomes
        wire = _SpoolWire(self.spool, env)
        body8bit = await self._eight_bit(env)
        if len(groups) == 1:
            # The usual case: one next hop, no task per group.
            [(route, rcpts)] = groups.items()
            return outcomes + await self._deliver_group(env, route, rcpts, wire, body8bit)
        results = await asyncio.gather(*(self._deliver_group(env, route, rcpts, wire, body8bit)
                                         for route, rcpts in groups.items()))
        for res in results:
            outcomes.extend(res)
        return outcomes

    async def _deliver_group(self, env: Envelope, route: Route, rcpts: list[Recipient],
                             wire: _SpoolWire, body8bit: bool) -> list[_Outcome]:
        dest = self._dests.get(route.name)
        if dest is None:
            dest = self._dests[route.name] = _Destination(
                asyncio.Semaphore(max(1, self.d.max_connections_per_destination)))
        if dest.paused_until > self.clock() and dest.pause_reply is not None:
            return [_Outcome(r, dest.pause_reply, kind=route.kind, reason="paused") for r in rcpts]
        decision = await self.tls.decide(route)
        targets, last = await self._targets(route, decision)
        if not targets:
            assert last is not None
            reason = "null_mx" if last.status() == "5.1.10" else "dns"
            return [_Outcome(r, last, kind=route.kind, reason=reason) for r in rcpts]
        msg_base = dict(sender=env.sender, wire=wire, ret=env.ret, envid=env.envid,
                        body8bit=body8bit, smtputf8=env.smtputf8)
        remaining = list(rcpts)
        done: list[_Outcome] = []
        transacted = False
        async with self._global, dest.slots:
            await self._rate_wait(dest)
            conn = await self._take_idle(dest)
            order = list(targets)
            if conn is not None:
                order = [conn.target] + [t for t in targets if t != conn.target]
            for i, target in enumerate(order):
                if conn is None:
                    try:
                        conn = await self._connect(target, decision, route)
                    except SessionError as e:
                        last = e.reply
                        log.info("%s: %s", env.queue_id, e.reply)
                        continue
                msg = Message(recipients=tuple((r.address, r.notify, r.orcpt) for r in remaining),
                              **msg_base)
                try:
                    conn, replies = await self._send(conn, msg, target, decision, route)
                except SessionError as e:       # no fresh session for a stale one
                    conn = None
                    last = e.reply
                    log.info("%s: %s", env.queue_id, e.reply)
                    continue
                transacted = True
                more = i + 1 < len(order)
                retry: list[Recipient] = []
                for r, rep in zip(remaining, replies, strict=True):
                    if rep.is_temp and more:
                        retry.append(r)     # RFC 5321 5.1: try the next MX
                        last = rep
                    else:
                        done.append(_Outcome(r, rep, str(conn.target), route.kind,
                                             relayed="DSN" not in conn.ext))
                await self._release(dest, conn)
                conn = None
                remaining = retry
                if not remaining:
                    break
        assert last is not None or not remaining
        for r in remaining:
            done.append(_Outcome(r, last, "none", route.kind, "network"))   # type: ignore[arg-type]
        if transacted:
            dest.failures, dest.paused_until, dest.pause_reply = 0, 0.0, None
        elif last is not None and last.is_temp:
            dest.failures += 1
            sched = self.d.retry_schedule
            dest.paused_until = self.clock() + sched[min(dest.failures - 1, len(sched) - 1)]
            dest.pause_reply = local_reply(last.code, last.status(),
                                           f"destination {route.name} paused: {last}")
        return done

    async def _send(self, conn: Connection, msg: Message, target: mx.Target,
                    decision: TLSDecision, route: Route) -> tuple[Connection, list[Reply]]:
        """conn.send; a cached session that the next hop had dropped (nothing accepted
        on it) is replaced, once, by a fresh one to the same target. Raises SessionError
        when that fresh one cannot be opened."""
        for _ in range(2):
            try:
                return conn, await conn.send(msg)
            except StaleSession as e:
                log.info("reused session with %s was stale (%s); opening a new one",
                         conn.target, e)
                conn.abort()
            except BaseException:
                conn.abort()        # cancelled (stop) mid-transaction: never reuse
                raise
            conn = await self._connect(target, decision, route)
        raise AssertionError("a new session is never stale")

    async def _targets(self, route: Route, decision: TLSDecision) -> tuple[list[mx.Target], Reply | None]:
        targets: list[mx.Target] = []
        last: Reply | None = None
        for hop in route.hops:
            try:
                found = await mx.resolve(hop, self.resolver)
            except mx.MXError as e:
                last = local_reply(e.code, e.enhanced, e.text)
                continue
            allowed = [t for t in found if decision.allows(t.host)]
            if found and not allowed:
                last = local_reply(451, "4.7.5", f"no MX of {hop.host} matches its MTA-STS policy")
            targets.extend(allowed)
        return targets, last

    async def _connect(self, target: mx.Target, decision: TLSDecision, route: Route) -> Connection:
        auth = None
        if route.kind == "relayhost" and self.d.relayhost_username:
            auth = (self.d.relayhost_username, self.d.relayhost_password)
        level = decision.level
        try:
            return await Connection.open(target, helo_name=self.helo_name, timeouts=self.timeouts,
                                         tls_level=level, ssl_context=self.tls.context(level),
                                         auth=auth)
        except TLSFailure as e:
            if level != "may":
                raise
            # Opportunistic TLS that fails falls back to plaintext on a new session,
            # as Postfix does; encrypt/verify/MTA-STS enforce never get here.
            log.info("TLS with %s failed (%s); retrying in plaintext", target, e.reply)
            return await Connection.open(target, helo_name=self.helo_name, timeouts=self.timeouts,
                                         tls_level="none", auth=auth)

    async def _take_idle(self, dest: _Destination) -> Connection | None:
        while dest.idle:
            conn, _ = dest.idle.pop()
            if await conn.reset():
                return conn
            conn.abort()
        return None

    async def _release(self, dest: _Destination, conn: Connection) -> None:
        if conn.usable and not conn.closed and conn.messages < self.d.max_messages_per_connection:
            dest.idle.append((conn, asyncio.get_running_loop().time()))
            self._event.set()       # the loop closes it if nobody reuses it soon
        else:
            await conn.close()

    async def _rate_wait(self, dest: _Destination) -> None:
        rate = self.d.rate_per_destination
        if rate <= 0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, dest.next_slot)
        dest.next_slot = start + 1.0 / rate
        if start > now:
            await asyncio.sleep(start - now)

    # --- results ----------------------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        sched = self.d.retry_schedule
        base = float(sched[min(max(attempts, 1) - 1, len(sched) - 1)])
        j = self.d.retry_jitter
        return base * (1 + self._rng.uniform(-j, j))

    async def _settle(self, env: Envelope, outcomes: list[_Outcome]) -> None:
        now = self.clock()
        age = now - env.arrival
        failed: list[Recipient] = []
        delayed: list[Recipient] = []
        relayed: list[Recipient] = []
        remote: dict[str, str] = {}
        for o in outcomes:
            r, reply = o.rcpt, o.reply
            if o.relay != "none":
                remote[r.address] = o.relay.partition("[")[0]
            r.attempts += 1
            status = "sent"
            if reply.is_ok:
                r.state = RcptState.DONE
                r.last_error = ""
                metrics.child(DELIVERY_ATTEMPTS, "sent", o.kind).inc()
                DELIVERY_LATENCY.observe(max(0.0, age))
                if o.relayed and wants_dsn(r, "relayed"):
                    relayed.append(r)
            elif reply.is_perm or age >= self.d.max_queue_lifetime:
                status = "bounced" if reply.is_perm else "expired"
                r.state = RcptState.BOUNCED
                r.last_error = str(reply)
                DELIVERY_ATTEMPTS.labels("bounced", o.kind).inc()
                MESSAGES_BOUNCED.labels(o.reason if reply.is_perm and o.reason in (
                    "loop", "null_mx") else "permanent" if reply.is_perm else "expired").inc()
                if wants_dsn(r, "failed"):
                    failed.append(r)
                else:
                    r.dsn_sent = True     # NOTIFY said not to tell: nothing pending
            else:
                status = "deferred"
                r.last_error = str(reply)
                r.next_attempt = now + self._backoff(r.attempts)
                if o.reason == "paused":
                    r.next_attempt = max(r.next_attempt, self._pause_end(r))
                DELIVERY_ATTEMPTS.labels("deferred", o.kind).inc()
                MESSAGES_DEFERRED.labels(o.reason or "tempfail").inc()
                if (self.d.delay_warning > 0 and age >= self.d.delay_warning
                        and not r.delay_warned and wants_dsn(r, "delayed")):
                    delayed.append(r)
            log.info("%s: to=<%s>, relay=%s, delay=%.1f, dsn=%s, status=%s (%s)",
                     env.queue_id, r.address, o.relay, age, reply.status(), status, reply)
        for action, rcpts in (("failed", failed), ("delayed", delayed), ("relayed", relayed)):
            if rcpts:
                await self._notify(env, rcpts, action, now, remote)
        all_done = all(r.state is RcptState.DONE for r in env.recipients)
        if not all_done:
            # When every recipient is delivered the D record below is the whole durable
            # outcome: an S record first would cost a second append per message, and a
            # crash before the D record redelivers either way (at worst a repeat).
            await self.spool.update(env)
        if not env.finished:
            # Look again when its earliest recipient is due (a scan may be planned later).
            self._scan_at = min(self._scan_at, env.next_attempt())
        else:
            if all_done:
                MESSAGES_RELAYED.inc()
            await self.spool.remove(env.queue_id)

    def _pause_end(self, r: Recipient) -> float:
        try:
            dest = self._dests.get(self.router.route(r).name)
        except RouteError:
            return 0.0
        return dest.paused_until if dest is not None else 0.0

    async def _notify(self, env: Envelope, rcpts: list[Recipient], action: str,
                      now: float, remote: dict[str, str]) -> None:
        """Tell the sender. Never to the null sender, never about a bounce (RFC 3461
        6.2, RFC 5321 6.1): those only get the log line."""
        for r in rcpts:
            if action == "failed":
                r.dsn_sent = True
            elif action == "delayed":
                r.delay_warned = True
        if env.sender == "" or env.is_bounce:
            log.info("%s: no %s DSN: %s", env.queue_id, action,
                     "null sender" if env.sender == "" else "message is a bounce")
            return
        # RFC 3461 4.3: the whole message only for RET=FULL failures, and only when it
        # is small enough to return (bounce.MAX_FULL); else its header section.
        if (action == "failed" and (env.ret or "").upper() == "FULL"
                and env.size <= MAX_FULL):
            original, size = await self.spool.read(env.queue_id), None
        else:
            original, size = await self._header(env.queue_id), env.size
        try:
            benv, data = self.bounce_fn(env, rcpts, action, original, self.cfg.fqdn, now,
                                        lifetime=self.d.max_queue_lifetime, remote_mtas=remote,
                                        original_size=size)
        except ValueError as e:
            log.warning("%s: no %s DSN: %s", env.queue_id, action, e)
            return
        await self.spool.add(benv, data)
        DSN_SENT.labels(action).inc()
        kind = {"failed": "non-delivery", "delayed": "delay"}.get(action, "success")
        log.info("%s: sender %s DSN: %s", env.queue_id, kind, benv.queue_id)
        self.wake(benv)
