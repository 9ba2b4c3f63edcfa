"""Hand the whole queue to another relay (`relay queue drain --to HOST:PORT`), and put a
message into the queue from the CLI (`relay quarantine release`).

Drain takes the spool and a peer (host, port, HELO name, TLS level, timeouts from the
delivery config); hands every queued message that is not on hold to the peer over SMTP
through relay.delivery.client, with its pending recipients and the DSN parameters as
received (RFC 3461: RET, ENVID, NOTIFY, ORCPT travel unchanged when the peer offers
DSN). A message leaves our spool only after the peer's 250 for every one of its
pending recipients; recipients the peer took are marked done (never sent twice), the
rest stay queued with the peer's answer as last error. A peer that cannot be reached
ends the drain: what is left stays on the volume. Messages on hold stay too (an
operator kept them; handing them on would deliver them).

Only the owner of a spool writer may change it. When a relay runs, the CLI asks each
running worker through relay.queue.control (op "drain"; the worker first stops taking
mail through the app's `quiesce` callback, so nothing new arrives and its own delivery
no longer races the hand-off) and waits for the answers; writers no process holds are
opened here. `enqueue_via_smtp_or_spool` likewise goes through a running worker (op
"enqueue", the message in a file under control/) or opens the spool itself.

Trusts the spool's envelopes (validated when they came in) and nothing the peer says
beyond its reply codes. RFC 5321 (the transaction), 2920, 3461.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config import Config, DeliveryConfig, HostPort
from relay.delivery.client import Connection, Message, SessionError, Timeouts
from relay.delivery.mx import Target
from relay.delivery.tls_policy import TLSPolicies
from relay.delivery.wire import needs_8bit, to_wire
from relay.queue import control
from relay.queue.model import Envelope, RcptState
from relay.queue.spool import Spool, SpoolError

log = logging.getLogger("relay.queue")

# How long the CLI waits for a running worker to hand over its queue. A preStop hook
# is bounded by terminationGracePeriodSeconds anyway; this only stops a CLI that waits
# for a worker that will never answer.
DRAIN_TIMEOUT = 3600.0
ENQUEUE_TIMEOUT = 30.0


class DrainIncomplete(RuntimeError):
    """Some messages could not be handed over; str() says how many and why."""


@dataclass(frozen=True)
class Peer:
    """Where and how to hand the queue over: plain values, so a control request can
    carry it to a running worker as JSON."""

    host: str
    port: int
    helo: str
    tls_level: str = "may"
    timeouts: tuple[float, float, float] = (30.0, 300.0, 600.0)
    ca_file: str = ""
    max_messages_per_connection: int = 100

    @classmethod
    def from_config(cls, cfg: Config, to: str) -> Peer:
        try:
            hp = HostPort.parse(to)
        except ValueError as e:
            raise ValueError(f"--to: {e}") from None
        if not hp.host:
            raise ValueError(f"--to: a host is needed in {to!r}")
        d = cfg.delivery
        return cls(hp.host, hp.port, d.helo_name or cfg.fqdn, d.tls_policy,
                   (float(d.connect_timeout), float(d.command_timeout), float(d.data_timeout)),
                   d.ca_file, max(1, d.max_messages_per_connection))

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "helo": self.helo,
                "tls_level": self.tls_level, "timeouts": list(self.timeouts),
                "ca_file": self.ca_file,
                "max_messages_per_connection": self.max_messages_per_connection}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Peer:
        return cls(str(d["host"]), int(d["port"]), str(d["helo"]), str(d["tls_level"]),
                   tuple(float(t) for t in d["timeouts"]), str(d.get("ca_file", "")),
                   int(d.get("max_messages_per_connection", 100)))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class DrainResult:
    sent: list[str] = field(default_factory=list)      # handed over and removed
    kept: list[str] = field(default_factory=list)      # still here: peer refused or gone
    held: list[str] = field(default_factory=list)      # on hold: never handed over
    errors: list[str] = field(default_factory=list)    # why, one line each

    def add(self, other: DrainResult) -> None:
        self.sent += other.sent
        self.kept += other.kept
        self.held += other.held
        self.errors += other.errors

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.sent, "kept": self.kept, "held": self.held, "errors": self.errors}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DrainResult:
        return cls(list(d.get("sent", [])), list(d.get("kept", [])), list(d.get("held", [])),
                   list(d.get("errors", [])))


# --- the hand-over (runs wherever the spool writer is open) --------------------------

class _Session:
    """One SMTP session with the peer at a time, reused while it is usable."""

    def __init__(self, peer: Peer):
        self.peer = peer
        self.conn: Connection | None = None
        # The same contexts delivery uses: opportunistic for may/encrypt, the CA file
        # (or the system's) for verify.
        self._ctx = TLSPolicies(DeliveryConfig(ca_file=peer.ca_file, mta_sts=False)
                                ).context(peer.tls_level)

    async def get(self) -> Connection:
        if self.conn is not None:
            if self.conn.messages < self.peer.max_messages_per_connection \
                    and await self.conn.reset():
                return self.conn
            await self.close()
        p = self.peer
        # The address is the name: create_connection resolves it with the system's
        # resolver, as a Kubernetes Service name (relay:25) needs.
        self.conn = await Connection.open(
            Target(p.host, p.host, p.port), helo_name=p.helo, timeouts=Timeouts(*p.timeouts),
            tls_level=p.tls_level, ssl_context=self._ctx)
        return self.conn

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


async def drain_spool(spool: Spool, peer: Peer) -> DrainResult:
    """Hand every message of this open spool to `peer`, oldest first."""
    res = DrainResult()
    session = _Session(peer)
    envs = sorted(spool.envelopes(), key=lambda e: e.arrival)
    try:
        for i, env in enumerate(envs):
            qid = env.queue_id
            env = spool.get(qid)
            if env is None:
                continue                    # delivered or deleted meanwhile
            if env.held:
                res.held.append(qid)
                log.warning("%s: on hold, not drained", qid)
                continue
            pending = env.pending()
            if not pending:
                await spool.remove(qid)     # finished, only its removal was missing
                continue
            try:
                conn = await session.get()
            except SessionError as e:
                left = [q for q in (e2.queue_id for e2 in envs[i:])
                        if (e3 := spool.get(q)) is not None and not e3.held]
                res.kept += left
                res.errors.append(f"cannot reach {peer}: {e.reply}")
                log.error("drain to %s stopped, %d messages stay queued: %s", peer, len(left),
                          e.reply)
                break
            message = await spool.read(qid)
            msg = Message(sender=env.sender,
                          recipients=tuple((r.address, r.notify, r.orcpt) for r in pending),
                          wire=to_wire(message, env.wire_ready), ret=env.ret, envid=env.envid,
                          body8bit=(env.body or "").upper() == "8BITMIME" or needs_8bit(message),
                          smtputf8=env.smtputf8)
            replies = await conn.send(msg)
            refused = []
            for r, reply in zip(pending, replies, strict=True):
                if reply.is_ok:
                    r.state = RcptState.DONE
                    r.last_error = ""
                else:
                    r.last_error = f"drain to {peer}: {reply}"
                    refused.append(reply)
            if not refused:
                await spool.remove(qid)
                res.sent.append(qid)
                log.info("%s: drained to %s (%d recipients), relay=%s", qid, peer,
                         len(pending), conn.target)
                continue
            # Recipients the peer took are its now (DONE, never sent twice); the rest
            # stay here with the peer's answer.
            await spool.update(env)
            res.kept.append(qid)
            res.errors.append(f"{qid}: {peer} refused {len(refused)} of {len(pending)} "
                              f"recipients: {refused[0]}")
            log.warning("%s: %s refused %d of %d recipients, kept in the queue: %s", qid, peer,
                        len(refused), len(pending), refused[0])
    finally:
        await session.close()
    return res


# --- worker side: the control ops ----------------------------------------------------

Quiesce = Callable[[], Awaitable[None]]


async def handle(spool: Spool, req: dict[str, Any], directory: Path,
                 quiesce: Quiesce | None = None) -> dict[str, Any]:
    """Run a control request of op "drain" or "enqueue" in the worker that owns `spool`;
    returns the answer's fields (control.poll adds ok)."""
    if req["op"] == "enqueue":
        # The name comes from our own CLI, but keep it inside the control directory.
        path = directory / Path(str(req["message"])).name
        env = Envelope.from_json(req["envelope"])
        message = await asyncio.to_thread(path.read_bytes)
        await spool.add(env, message)
        path.unlink(missing_ok=True)
        log.info("%s: queued by operator (from=<%s>, %d recipients)", env.queue_id,
                 env.sender, len(env.recipients))
        return {"ids": [env.queue_id]}
    if req["op"] == "drain":
        peer = Peer.from_json(req["peer"])
        if quiesce is not None:
            # No new mail, no delivery of our own while the queue changes hands.
            await quiesce()
        log.info("draining the queue (%d messages) to %s", len(spool.envelopes()), peer)
        res = await drain_spool(spool, peer)
        return {"ids": res.sent, "drain": res.to_json()}
    raise ValueError(f"unknown op {req['op']!r}")


# --- CLI side ------------------------------------------------------------------------

def _writers_on_disk(root: Path) -> list[int]:
    seg = root / "segments"
    if not seg.is_dir():
        return []
    out = set()
    for p in seg.glob("w*-*.log"):
        w = p.name.split("-", 1)[0][1:]
        if w.isdigit():
            out.add(int(w))
    return sorted(out)


async def _offline_drain(cfg: Config, peer: Peer, writers: list[int]) -> DrainResult:
    total = DrainResult()
    for w in writers:
        sp = Spool(cfg.spool, worker=w, workers=w + 1)
        try:
            await sp.open(adopt=False)
        except SpoolError as e:
            # A relay took this writer since we looked: it is its to drain.
            total.errors.append(str(e))
            continue
        try:
            total.add(await drain_spool(sp, peer))
        finally:
            await sp.close()
    return total


def drain_result(cfg: Config, to: str, timeout: float = DRAIN_TIMEOUT) -> DrainResult:
    """Drain every writer of the spool: running ones through their worker, the rest
    here. Blocking (the CLI)."""
    peer = Peer.from_config(cfg, to)
    root = Path(cfg.spool.path)
    running = control.running_writers(root)
    total = DrainResult()
    if running:
        for answer in control.request(cfg, "drain", None, timeout=timeout,
                                      extra={"peer": peer.to_json()}, answers=True):
            total.add(DrainResult.from_json(answer.get("drain", {})))
    idle = [w for w in _writers_on_disk(root) if w not in running]
    if idle:
        total.add(asyncio.run(_offline_drain(cfg, peer, idle)))
    return total


def drain(cfg: Config, to: str) -> int:
    """`relay queue drain --to HOST:PORT`: the number of messages handed over. Raises
    DrainIncomplete (a RuntimeError: the CLI exits 1) when any message stays behind."""
    res = drain_result(cfg, to)
    if res.held:
        log.warning("%d messages on hold stay in the queue", len(res.held))
    if res.kept or res.errors:
        why = "; ".join(dict.fromkeys(res.errors))
        raise DrainIncomplete(f"drained {len(res.sent)} messages to {to}; {len(res.kept)} "
                              f"stay queued ({why})")
    return len(res.sent)


async def enqueue_via_smtp_or_spool(cfg: Config, env: Envelope, message: bytes) -> None:
    """Put a message into the queue from the CLI; durable on return. Through a running
    worker's spool writer when a relay runs (so its scheduler delivers it at once),
    else straight into the spool (the relay delivers it when it starts)."""
    root = Path(cfg.spool.path)
    running = control.running_writers(root)
    if running:
        w = running[0]
        d = root / "control" / f"w{w}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.msg"
        tmp = d / (name + ".tmp")

        def write() -> None:
            # Durable before the request names it: the worker's add is the promise,
            # but it must find every byte.
            with open(tmp, "wb") as f:
                f.write(message)
                f.flush()
                os.fsync(f.fileno())
            tmp.rename(d / name)
        await asyncio.to_thread(write)
        try:
            await asyncio.to_thread(
                control.request, cfg, "enqueue", env.queue_id, ENQUEUE_TIMEOUT,
                {"envelope": env.to_json(), "message": name}, False, [w])
        finally:
            (d / name).unlink(missing_ok=True)
        return
    sp = Spool(cfg.spool, worker=0, workers=1)
    await sp.open(adopt=False)
    try:
        await sp.add(env, message)
        log.info("%s: queued by operator (relay not running)", env.queue_id)
    finally:
        await sp.close()
