"""A load generator for the benchmark: N SMTP sessions sending M messages, timed.

Run as its own process:
    python bench/load.py send --target 127.0.0.1:PORT --sessions 20 --count 5000
        --size 10240 [--rate MSGS_PER_S] [--reconnect] --out FILE
    python bench/load.py idle --target 127.0.0.1:PORT --connections 5000
Each message carries a unique Message-ID (`<RUN-N@bench.test>`) so the sink can note
its arrival. For every message it records when the final dot was written and when the
250 came back (time.monotonic(), one clock for all processes on Linux) and writes
{"start", "end", "sent": [[id, t_dot, t_reply, code]], "errors"} to FILE.
With --rate, message i is not started before start + i/rate (spread over the
sessions), for latency at a given load. `idle` opens connections, reads the banner,
says EHLO, prints `ready` and holds them until stdin closes or SIGTERM.

Uses MAIL/RCPT/DATA in one write when the server offers PIPELINING (RFC 2920), as
smtp-source does not; each session keeps its connection unless --reconnect. Loopback
test tool: it trusts the server it is pointed at.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

FROM, TO = "bench@source.bench.test", "sink@dest.bench.test"
CHUNK = 1 << 20


def make_body(size: int) -> bytes:
    """~`size` bytes of text lines (no leading dots), ending in CRLF."""
    line = (b"The quick brown fox jumps over the lazy dog; 0123456789 "
            b"abcdefghijklmnopqrstuv\r\n")
    n = max(1, size // len(line))
    return line * n


def make_head(msgid: str) -> bytes:
    return (f"From: <{FROM}>\r\nTo: <{TO}>\r\nSubject: bench {msgid}\r\n"
            f"Message-ID: <{msgid}@bench.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode()


async def _reply(r: asyncio.StreamReader) -> int:
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


class Plan:
    """Hands out message numbers to sessions, paced when a rate is given."""

    def __init__(self, count: int, rate: float | None):
        self.count, self.rate = count, rate
        self.next = 0
        self.start = time.monotonic()

    async def take(self) -> int | None:
        if self.next >= self.count:
            return None
        i = self.next
        self.next += 1
        if self.rate:
            delay = self.start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return i


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    r, w = await asyncio.open_connection(host, port, limit=1 << 20)
    if await _reply(r) != 220:
        raise ConnectionError("no 220 greeting")
    w.write(b"EHLO load.bench.test\r\n")
    pipelining = False
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("closed after EHLO")
        if line[4:14].upper() == b"PIPELINING":
            pipelining = True
        if line[3:4] != b"-":
            break
    return r, w, pipelining


async def _session(host: str, port: int, plan: Plan, run: str, body: bytes, reconnect: bool,
                   sent: list, errors: list) -> None:
    conn = None
    envelope = f"MAIL FROM:<{FROM}>\r\nRCPT TO:<{TO}>\r\n".encode()
    view = memoryview(body)
    while (i := await plan.take()) is not None:
        msgid = f"{run}-{i}"
        try:
            if conn is None:
                conn = await _open(host, port)
            r, w, pipelining = conn
            if pipelining:
                w.write(envelope + b"DATA\r\n")
                codes = [await _reply(r), await _reply(r), await _reply(r)]
            else:
                codes = []
                for cmd in (f"MAIL FROM:<{FROM}>\r\n", f"RCPT TO:<{TO}>\r\n", "DATA\r\n"):
                    w.write(cmd.encode())
                    codes.append(await _reply(r))
            if codes[2] != 354:
                errors.append([msgid, codes])
                w.write(b"RSET\r\n")
                await _reply(r)
                continue
            w.write(make_head(msgid))
            # Big bodies go in slices with flow control, so the generator's memory
            # stays flat (20 sessions x 50 MiB must not be buffered at once).
            for k in range(0, len(body), CHUNK):
                w.write(view[k:k + CHUNK] if len(body) > CHUNK else body)
                await w.drain()
            w.write(b".\r\n")
            await w.drain()
            t_dot = time.monotonic()
            code = await _reply(r)
            sent.append([msgid, t_dot, time.monotonic(), code])
            if reconnect:
                w.write(b"QUIT\r\n")
                await _reply(r)
                w.close()
                conn = None
        except (OSError, ConnectionError, ValueError) as e:
            errors.append([msgid, str(e)])
            if conn is not None:
                conn[1].close()
            conn = None
    if conn is not None:
        r, w, _ = conn
        try:
            w.write(b"QUIT\r\n")
            await _reply(r)
        except (OSError, ConnectionError):
            pass
        w.close()


async def send(a: argparse.Namespace) -> dict:
    host, _, port = a.target.rpartition(":")
    body = make_body(a.size)
    plan = Plan(a.count, a.rate)
    sent: list = []
    errors: list = []
    start = plan.start
    await asyncio.gather(*(_session(host, int(port), plan, a.run, body, a.reconnect, sent, errors)
                           for _ in range(a.sessions)))
    return {"start": start, "end": time.monotonic(), "sent": sent, "errors": errors}


async def idle(a: argparse.Namespace) -> None:
    host, _, port = a.target.rpartition(":")
    conns: list = []
    failed = 0
    gate = asyncio.Semaphore(200)     # do not overflow the listen backlog

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                r, w, _ = await _open(host, int(port))
                conns.append(w)
            except (OSError, ConnectionError, ValueError):
                failed += 1
    await asyncio.gather(*(one() for _ in range(a.connections)))
    sys.stdout.write(f"ready open={len(conns)} failed={failed}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 1) or done.set())
    await done.wait()
    for w in conns:
        w.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--target", required=True)
    s.add_argument("--sessions", type=int, default=20)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--size", type=int, default=10240)
    s.add_argument("--rate", type=float, default=None)
    s.add_argument("--reconnect", action="store_true")
    s.add_argument("--run", default="m")
    s.add_argument("--out", required=True)
    i = sub.add_parser("idle")
    i.add_argument("--target", required=True)
    i.add_argument("--connections", type=int, default=5000)
    a = ap.parse_args(argv)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if a.cmd == "send":
        res = run(send(a))
        with open(a.out, "w") as f:
            json.dump(res, f)
    else:
        run(idle(a))


if __name__ == "__main__":
    main()
