"""A counting SMTP sink for the benchmark: accepts everything, keeps nothing.

Run as its own process (`python bench/sink.py --listen 127.0.0.1:PORT --record FILE`):
it answers any SMTP client (PIPELINING, 8BITMIME, SIZE), throws message bytes away
while looking for the end of DATA, and notes each message's arrival time
(time.monotonic(), which on Linux is one clock for every process on the box) under the
Message-ID found in its first 8 KiB. Prints `mesg=N` on stdout like Postfix's
`smtp-sink -c`, and on SIGTERM writes {"count": N, "arrivals": {id: t}} to FILE.

Lean on purpose (one bytes search per chunk, never a line loop over the body): it
shares the CPUs with the peer being measured. Memory stays flat whatever the message
size: only the first 8 KiB and the last 4 bytes of a message are kept. Trusts nothing
but needs nothing either: it is a test peer on loopback, not a server for the world.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path

HEAD_KEEP = 8192
_MSGID = re.compile(rb"(?im)^message-id:\s*<([^>\r\n]+)>")
_EHLO = (b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
         b"250 SIZE\r\n")


class Stats:
    def __init__(self) -> None:
        self.count = 0
        self.arrivals: dict[str, float] = {}


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats):
        self.stats = stats
        self.buf = b""
        self.in_data = False
        self.head = b""
        self.tail = b""

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        while data:
            if self.in_data:
                data = self._data(data, out)
            else:
                data = self._commands(data, out)
        if out:
            self.t.write(b"".join(out))

    def _data(self, data: bytes, out: list[bytes]) -> bytes:
        if len(self.head) < HEAD_KEEP:
            self.head += data[:HEAD_KEEP]
        buf = self.tail + data
        i = buf.find(b"\r\n.\r\n")
        if i < 0:
            self.tail = buf[-4:]
            return b""
        now = time.monotonic()
        st = self.stats
        st.count += 1
        m = _MSGID.search(self.head)
        if m:
            st.arrivals[m.group(1).decode("ascii", "replace")] = now
        self.in_data, self.head, self.tail = False, b"", b""
        out.append(b"250 2.0.0 Ok: kept nothing\r\n")
        return buf[i + 5:]

    def _commands(self, data: bytes, out: list[bytes]) -> bytes:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        start = 0
        while True:
            j = buf.find(b"\n", start)
            if j < 0:
                self.buf = buf[start:]
                return b""
            verb = buf[start:start + 4].upper()
            start = j + 1
            if verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.tail = b"\r\n"     # the first line may be the terminating dot
                return buf[start:]
            if verb == b"EHLO":
                out.append(_EHLO)
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.t.write(b"".join(out))
                out.clear()
                self.t.close()
                return b""
            else:
                out.append(b"250 2.0.0 Ok\r\n")


async def serve(host: str, port: int) -> Stats:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(lambda: SinkProtocol(stats), host, port,
                                      reuse_address=True, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"listening={bound}\n")
    sys.stdout.flush()
    shown = -1
    while not stop.is_set():
        if stats.count != shown:
            shown = stats.count
            sys.stdout.write(f"mesg={shown}\n")
            sys.stdout.flush()
        try:
            await asyncio.wait_for(stop.wait(), 0.02)
        except TimeoutError:
            pass
    server.close()
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--record", default=None)
    a = ap.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    stats = run(serve(host, int(port)))
    if a.record:
        Path(a.record).write_text(json.dumps({"count": stats.count, "arrivals": stats.arrivals}))


if __name__ == "__main__":
    main()
