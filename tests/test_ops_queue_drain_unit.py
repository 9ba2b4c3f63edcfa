"""relay.queue.drain in one process: a real Spool on disk, aiosmtpd peers on loopback,
and the worker side of the control ops (relay.queue.control.poll) with a quiesce
callback."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from _delivery import Sink, start_sinks

from relay.config import Config, DeliveryConfig, HostPort, ListenerConfig, Size, SpoolConfig
from relay.queue import control
from relay.queue.drain import DrainResult, Peer, drain_spool, handle
from relay.queue.model import Envelope, RcptState, Recipient, new_queue_id
from relay.queue.spool import Spool


def spool_cfg(tmp_path: Path) -> SpoolConfig:
    return SpoolConfig(path=str(tmp_path / "spool"), min_free_space=Size(0))


def envelope(*rcpts: str, **kw) -> Envelope:
    return Envelope(new_queue_id(), "s@src.test",
                    [Recipient(a, notify="FAILURE", orcpt=f"rfc822;{a}") for a in rcpts], **kw)


def body(n: int) -> bytes:
    return b"Subject: m%d\r\n\r\n.leading dot\r\nline\r\n" % n


def peer(port: int, **kw) -> Peer:
    return Peer("127.0.0.1", port, "drainer.test", "none", (3.0, 5.0, 5.0), **kw)


async def with_spool(tmp_path: Path, fn):
    sp = Spool(spool_cfg(tmp_path))
    await sp.open()
    try:
        return await fn(sp)
    finally:
        await sp.close()


def test_peer_from_config_and_json():
    cfg = Config(hostname="me.test", delivery=DeliveryConfig(tls_policy="encrypt"))
    p = Peer.from_config(cfg, "relay:25")
    assert (p.host, p.port, p.helo, p.tls_level) == ("relay", 25, "me.test", "encrypt")
    assert Peer.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ValueError, match="--to"):
        Peer.from_config(cfg, "relay")
    with pytest.raises(ValueError, match="--to"):
        Peer.from_config(cfg, ":25")


def test_drain_spool_sends_removes_keeps_and_skips_held(tmp_path):
    sink = Sink(rcpt_replies={"busy@dst.test": "452 4.2.2 mailbox full"})

    async def run(sp: Spool):
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        a, b, held = envelope("a@dst.test"), envelope("ok@dst.test", "busy@dst.test"), \
            envelope("h@dst.test", held=True)
        done = envelope("x@dst.test", "y@dst.test")
        done.recipients[0].state = RcptState.DONE       # only y@ is still pending
        for i, e in enumerate((a, b, held, done)):
            await sp.add(e, body(i))
        try:
            res = await drain_spool(sp, peer(port))
        finally:
            for s in servers:
                s.close()
        return res, a, b, held, done, sp

    res, a, b, held, done, sp = asyncio.run(with_spool(tmp_path, run))
    assert sorted(res.sent) == sorted([a.queue_id, done.queue_id])
    assert res.kept == [b.queue_id] and res.held == [held.queue_id]
    assert "452 4.2.2" in res.errors[0]
    got = {tuple(m.rcpts): m for m in sink.messages}
    assert set(got) == {("a@dst.test",), ("ok@dst.test",), ("y@dst.test",)}
    # Bytes as queued (aiosmtpd undoes the dot-stuffing).
    assert got[("a@dst.test",)].content == body(0)

    async def check(sp2: Spool):
        left = {e.queue_id: e for e in sp2.envelopes()}
        assert set(left) == {b.queue_id, held.queue_id}
        st = {r.address: r for r in left[b.queue_id].recipients}
        assert st["ok@dst.test"].state is RcptState.DONE
        assert st["busy@dst.test"].state is RcptState.PENDING
        assert "452 4.2.2" in st["busy@dst.test"].last_error
        assert left[held.queue_id].held
    asyncio.run(with_spool(tmp_path, check))


def test_drain_spool_reuses_the_session_up_to_the_limit(tmp_path):
    sink = Sink()

    async def run(sp: Spool) -> DrainResult:
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        for i in range(5):
            await sp.add(envelope("a@dst.test"), body(i))
        try:
            return await drain_spool(sp, peer(port, max_messages_per_connection=2))
        finally:
            for s in servers:
                s.close()

    res = asyncio.run(with_spool(tmp_path, run))
    assert len(res.sent) == 5 and len(sink.messages) == 5
    assert sink.sessions == 3           # 2 + 2 + 1


def test_drain_spool_stops_when_the_peer_is_unreachable(tmp_path):
    async def run(sp: Spool) -> tuple[DrainResult, int]:
        ids = []
        for i in range(3):
            e = envelope("a@dst.test")
            ids.append(e.queue_id)
            await sp.add(e, body(i))
        # A port nobody listens on.
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        res = await drain_spool(sp, peer(port))
        return res, len(sp.envelopes())

    res, left = asyncio.run(with_spool(tmp_path, run))
    assert res.sent == [] and len(res.kept) == 3 and left == 3
    assert "cannot reach 127.0.0.1:" in res.errors[0]


# --- the worker side: control.poll with the drain ops --------------------------------

def request(d: Path, req: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}"
    (d / f"{name}.tmp").write_text(json.dumps(req))
    (d / f"{name}.tmp").rename(d / f"{name}.req")
    return d / f"{name}.done"


def _read(done: Path) -> dict | None:
    return json.loads(done.read_text()) if done.exists() else None


async def answer(done: Path) -> dict:
    for _ in range(400):
        got = _read(done)
        if got is not None:
            return got
        await asyncio.sleep(0.025)
    raise AssertionError("no answer")


def test_poll_runs_enqueue_and_drain_after_quiesce(tmp_path):
    sink = Sink()
    events: list[str] = []

    async def run(sp: Spool):
        port, servers = await start_sinks(["127.0.0.1"], [sink])

        async def quiesce() -> None:
            events.append(f"quiesce with {len(sink.messages)} delivered")

        task = asyncio.create_task(control.poll(sp, None, 0.02, quiesce))
        d = sp.root / "control" / "w0"
        try:
            env = envelope("a@dst.test")
            (d / "m1.msg").write_bytes(body(1))
            ans = await answer(request(d, {"op": "enqueue", "id": env.queue_id,
                                           "envelope": env.to_json(), "message": "m1.msg"}))
            assert ans == {"ok": True, "ids": [env.queue_id]}
            assert await sp.read(env.queue_id) == body(1)
            assert not (d / "m1.msg").exists()

            ans = await answer(request(d, {"op": "drain", "id": None,
                                           "peer": peer(port).to_json(),
                                           "expires": time.time() + 60}))
            assert ans["ok"] and ans["ids"] == [env.queue_id]
            assert ans["drain"]["sent"] == [env.queue_id]
            assert sp.envelopes() == []

            # A request left behind past its deadline is refused, not carried out.
            other = envelope("b@dst.test")
            await sp.add(other, body(2))
            ans = await answer(request(d, {"op": "drain", "id": None,
                                           "peer": peer(port).to_json(),
                                           "expires": time.time() - 1}))
            assert ans["ok"] is False and "expired" in ans["error"]
            assert [e.queue_id for e in sp.envelopes()] == [other.queue_id]
        finally:
            task.cancel()
            for s in servers:
                s.close()

    asyncio.run(with_spool(tmp_path, run))
    assert events == ["quiesce with 0 delivered"]      # before the hand-over
    assert len(sink.messages) == 1


def test_handle_refuses_unknown_ops_and_keeps_message_names_inside(tmp_path):
    async def run(sp: Spool):
        d = sp.root / "control" / "w0"
        with pytest.raises(ValueError, match="unknown op"):
            await handle(sp, {"op": "explode"}, d)
        outside = tmp_path / "secret.eml"
        outside.write_bytes(b"Subject: not yours\r\n\r\n")
        env = envelope("a@dst.test")
        with pytest.raises(FileNotFoundError):
            await handle(sp, {"op": "enqueue", "envelope": env.to_json(),
                              "message": "../../../secret.eml"}, d)
        assert sp.envelopes() == []
    asyncio.run(with_spool(tmp_path, run))


def test_cli_request_notices_a_worker_that_is_gone(tmp_path):
    """A worker that stops before answering (SIGTERM in a long drain) is reported,
    not waited for until the timeout."""
    cfg = Config(spool=spool_cfg(tmp_path),
                 listeners=(ListenerConfig("mta", HostPort.parse("127.0.0.1:0")),))
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "lock.w0").touch()     # no process holds it
    with pytest.raises(RuntimeError, match="w0 stopped before answering"):
        control.request(cfg, "drain", None, timeout=30, extra={"peer": {}}, writers=[0])
