"""Shared peers of the security and fault tests (tests/test_security_*, test_faults_*).

- `NextHop`: an aiosmtpd SMTP server on 127.0.0.1 in its own thread (the relay runs as a
  separate process, so the next hop must not share the test's event loop). It records
  every message with its raw bytes and can be scripted to fail the first N DATA replies.
- `RawHop`: a raw TCP server in a thread whose `script(sock, n)` plays a broken next hop
  (stall mid-DATA, reset, garbage replies, a TLS handshake that never finishes); after
  `bad` connections it hands over to a good NextHop-like dialogue so a retry succeeds.
- `send(port, n, tag)`: submit numbered messages with smtplib and return the ids that
  got a 250, so fault tests can count sent / accepted / delivered / lost / duplicated.
- `tally(...)`: the counts SECURITY.md's table is filled from (printed with -s).
"""

from __future__ import annotations

import asyncio
import collections
import re
import smtplib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP

from tests._relay import wait_for  # noqa: F401 - re-exported for the fault tests

TAG = re.compile(rb"X-Test-Id: (\S+)")


@dataclass
class Recorder:
    """aiosmtpd handler: keeps (rcpts, raw content) and can tempfail the first DATAs."""

    messages: list[tuple[list[str], bytes]] = field(default_factory=list)
    fail_first: int = 0
    data_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.data_calls += 1
            if self.data_calls <= self.fail_first:
                return "451 4.3.0 try later"
            self.messages.append((list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return "250 2.0.0 queued"

    def ids(self) -> collections.Counter:
        with self.lock:
            out: collections.Counter = collections.Counter()
            for _, content in self.messages:
                m = TAG.search(content)
                if m:
                    out[m.group(1).decode()] += 1
            return out


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class NextHop:
    """aiosmtpd as the next hop, in a thread. `.port`, `.handler.messages`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **smtp_kw: Any) -> None:
        self.handler = Recorder()
        self._lt = _LoopThread()
        self.host = host

        async def start() -> asyncio.AbstractServer:
            return await asyncio.get_running_loop().create_server(
                lambda: SMTP(self.handler, hostname="hop.test", **smtp_kw), host, port)
        self.server = self._lt.call(start())
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
        self._lt.call(stop())
        self._lt.close()

    def __enter__(self) -> NextHop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawHop:
    """A scripted raw next hop. `script(conn, n)` runs for connection number n (0-based)
    in its own thread; `.data` collects every byte received, per connection."""

    def __init__(self, script: Callable[[socket.socket, int, RawHop], None],
                 host: str = "127.0.0.1") -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received: list[bytearray] = []
        self.delivered: list[bytes] = []
        self.commands: list[bytes] = []       # command verbs good_session parsed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            n = self.connections
            self.connections += 1
            self.received.append(bytearray())
            t = threading.Thread(target=self._one, args=(conn, n), daemon=True)
            t.start()
            self._threads.append(t)

    def _one(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(20)
        try:
            self.script(conn, n, self)
        except OSError:
            pass
        finally:
            conn.close()

    def recv_line(self, conn: socket.socket, n: int, buf: bytearray) -> bytes:
        """One CRLF line (buffered in `buf`); records what came in."""
        while b"\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("peer closed")
            self.received[n] += chunk
            buf += chunk
        i = buf.index(b"\r\n") + 2
        line = bytes(buf[:i])
        del buf[:i]
        return line

    def good_session(self, conn: socket.socket, n: int) -> None:
        """A correct minimal SMTP dialogue that records each message it accepts."""
        buf = bytearray()
        conn.sendall(b"220 raw.test ESMTP\r\n")
        while True:
            line = self.recv_line(conn, n, buf)
            verb = line[:4].upper()
            self.commands.append(verb)
            if verb == b"EHLO":
                conn.sendall(b"250-raw.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                data = bytearray()
                while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                    data += self.recv_line(conn, n, buf)
                self.delivered.append(bytes(data))
                conn.sendall(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self._stop.set()
        self._accept.join(5)
        self.sock.close()

    def __enter__(self) -> RawHop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_message(tag: str, size: int = 200, extra_head: bytes = b"") -> bytes:
    return (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: fault " + tag.encode() + b"\r\n"
            b"X-Test-Id: " + tag.encode() + b"\r\n" + extra_head + b"\r\n" +
            (b"z" * 70 + b"\r\n") * max(1, size // 72))


def send(port: int, tags: list[str], rcpt: str = "b@y.test", size: int = 200,
         timeout: float = 10) -> dict[str, str]:
    """Send one message per tag over one connection; {tag: queue id} of those that got
    a 250. Stops quietly at the first connection error (the relay may be killed)."""
    got: dict[str, str] = {}
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
            s.ehlo("fault.test")
            for tag in tags:
                s.mail("a@x.test")
                s.rcpt(rcpt)
                code, msg = s.data(make_message(tag, size))
                if code == 250:
                    got[tag] = msg.split()[-1].decode()
    except (OSError, smtplib.SMTPException):
        pass
    return got


def tally(name: str, sent: int, accepted: set[str] | dict, delivered: collections.Counter,
          queued: set[str] = frozenset()) -> dict:
    """The row of SECURITY.md's table for one run (printed; visible with pytest -s).
    `queued`: accepted messages still (rightly) waiting in the queue: not lost."""
    lost = sorted(t for t in accepted if delivered[t] == 0 and t not in queued)
    dup = sum(c - 1 for c in delivered.values() if c > 1)
    row = {"test": name, "sent": sent, "accepted": len(accepted),
           "delivered": sum(1 for t in accepted if delivered[t]), "queued": len(queued),
           "lost": len(lost), "duplicated": dup}
    print(f"\nTALLY {row}")
    return row


def relay_config(hop_port: int, **extra: Any) -> dict[str, Any]:
    """A relay that delivers everything to [127.0.0.1]:hop_port, retrying fast."""
    out: dict[str, Any] = {
        "delivery": {"relayhost": [f"[127.0.0.1]:{hop_port}"], "retry_schedule": [0.5],
                     "retry_jitter": 0.0, "connect_timeout": 3, "command_timeout": 3,
                     "data_timeout": 3, "mta_sts": False, "tls_policy": "may",
                     "helo_name": "relay.test"},
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out
