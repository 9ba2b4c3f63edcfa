"""Queue operations from `relay queue ...`, safe beside a running relay.

Takes an operation (delete, hold, release, flush; drain and enqueue, which
relay.queue.drain carries out) from the CLI. When a relay runs on the
spool, the request is a small JSON file dropped in `control/w<W>/` for each running
worker (each owns its writer's messages and is the only one that may change them);
the worker applies it and writes the answer next to it. When no relay runs, the CLI
opens the spool itself (taking the writer locks) and applies it directly. Listing needs
no lock: it reads the log as written (relay.queue.spool.scan).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path

from relay.queue.spool import Spool

log = logging.getLogger("relay.queue")

OPS = ("delete", "hold", "release", "flush", "drain", "enqueue")
# Ops with their own fields, carried out by relay.queue.drain.
_DRAIN_OPS = ("drain", "enqueue")


def running_writers(root: Path) -> list[int]:
    """Writers whose lock is held by a live process."""
    out = []
    for p in root.glob("lock.w*"):
        w = p.name[len("lock.w"):]
        if not w.isdigit():
            continue
        fd = os.open(p, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            out.append(int(w))
        finally:
            os.close(fd)
    return sorted(out)


async def apply(spool: Spool, op: str, queue_id: str | None, flush=None) -> list[str]:
    """Apply one operation to the messages this spool owns; returns affected ids."""
    if op == "flush":
        ids = []
        for env in spool.envelopes():
            if not env.held:
                for r in env.pending():
                    r.next_attempt = 0.0
                await spool.update(env)
                ids.append(env.queue_id)
        if flush is not None:
            flush()
        return ids
    ids = [e.queue_id for e in spool.envelopes()] if queue_id == "ALL" else [queue_id or ""]
    done = []
    for qid in ids:
        env = spool.get(qid)
        if env is None:
            continue
        if op == "delete":
            await spool.remove(qid)
            log.info("%s: removed by operator", qid)
        elif op == "hold":
            env.held = True
            await spool.update(env)
            log.info("%s: placed on hold by operator", qid)
        elif op == "release":
            env.held = False
            for r in env.pending():
                r.next_attempt = 0.0
            await spool.update(env)
            log.info("%s: released from hold by operator", qid)
        done.append(qid)
    if op == "release" and flush is not None:
        flush()
    return done


async def poll(spool: Spool, flush=None, interval: float = 0.5, quiesce=None) -> None:
    """Worker side: apply requests dropped in control/w<W>/ (runs until cancelled).
    `quiesce`: the app's `async () -> None` that stops taking mail and stops delivery,
    awaited before a drain hands the queue over."""
    d = spool.root / "control" / f"w{spool.worker}"
    while True:
        try:
            for p in sorted(d.glob("*.req")):
                try:
                    req = json.loads(p.read_text())
                    if req.get("expires", float("inf")) < time.time():
                        # Left behind by a CLI that gave up (or by a worker killed in
                        # the middle): acting now would surprise everyone, above all
                        # a stale drain after a restart.
                        raise TimeoutError("request expired before the relay got to it")
                    if req["op"] in _DRAIN_OPS:
                        from relay.queue import drain
                        answer = {"ok": True, **await drain.handle(spool, req, d, quiesce)}
                    else:
                        ids = await apply(spool, req["op"], req.get("id"), flush)
                        answer = {"ok": True, "ids": ids}
                except Exception as e:  # noqa: BLE001 - report to the CLI, keep serving
                    answer = {"ok": False, "error": str(e)}
                tmp = p.with_suffix(".tmp")
                tmp.write_text(json.dumps(answer))
                tmp.rename(p.with_suffix(".done"))
                p.unlink(missing_ok=True)
        except OSError as e:
            log.error("queue control: %s", e)
        await asyncio.sleep(interval)


def request(cfg, op: str, queue_id: str | None, timeout: float = 10.0,
            extra: dict | None = None, answers: bool = False,
            writers: list[int] | None = None) -> list:
    """CLI side: returns the ids the operation affected (across all writers), or with
    `answers` each worker's whole answer. `extra`: more fields for the request (drain,
    enqueue); `writers`: ask only these running writers."""
    assert op in OPS
    root = Path(cfg.spool.path)
    if writers is None:
        writers = running_writers(root)
    if not writers:
        assert op not in _DRAIN_OPS, "drain and enqueue work offline in relay.queue.drain"
        return asyncio.run(_offline(cfg, op, queue_id))
    pending = []
    for w in writers:
        d = root / "control" / f"w{w}"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        tmp = d / f"{name}.tmp"
        tmp.write_text(json.dumps({"op": op, "id": queue_id, **(extra or {}),
                                   "expires": time.time() + timeout}))
        tmp.rename(d / f"{name}.req")
        pending.append((w, d / f"{name}.done"))
    ids: list = []
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 1.0
    for w, done in pending:
        while not done.exists():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"the running relay did not answer within {timeout:g}s")
            if now > next_check:
                # A worker that exits (SIGTERM during a long drain) never answers.
                next_check = now + 1.0
                if w not in running_writers(root) and not done.exists():
                    raise RuntimeError(f"worker w{w} stopped before answering")
            time.sleep(0.05)
        answer = json.loads(done.read_text())
        done.unlink(missing_ok=True)
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error", "failed"))
        if answers:
            ids.append(answer)
        else:
            ids += answer["ids"]
    return ids


async def _offline(cfg, op: str, queue_id: str | None) -> list[str]:
    root = Path(cfg.spool.path)
    writers = sorted({int(p.name.split("-")[0][1:]) for p in (root / "segments").glob("w*-*.log")}
                     ) if (root / "segments").is_dir() else []
    ids: list[str] = []
    for w in writers:
        sp = Spool(cfg.spool, worker=w, workers=w + 1)
        await sp.open(adopt=False)
        try:
            ids += await apply(sp, op, queue_id)
        finally:
            await sp.close()
    return ids
