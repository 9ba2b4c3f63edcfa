"""A byte stream for one server connection: buffered reads, batched writes, STARTTLS.

The thin asyncio layer under relay.smtp.session: an asyncio.Protocol that buffers what
arrives (pausing the socket when a client sends faster than we consume, so memory stays
bounded), answers `readline`/`read` awaits, lets the session push back bytes it read
too far (the commands pipelined after a message's final dot), tells whether anything is
buffered (STARTTLS injection check; flushing replies only when no pipelined command is
waiting, RFC 2920), and upgrades itself to TLS in place. We own this instead of using
asyncio.StreamReader because those three needs would otherwise reach into its privates.
"""

from __future__ import annotations

import asyncio
import ssl

from relay.deadline import Deadline

HIGH_WATER = 256 * 1024


class LineTooLong(Exception):
    pass


class Connection(asyncio.Protocol):
    def __init__(self, on_connect):
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._out: list[bytes] = []
        self._loop = asyncio.get_event_loop()
        self._deadline = Deadline(self._loop, self._expire)
        self.closed = self._loop.create_future()
        self.task: asyncio.Task | None = None

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport) -> None:
        if self.transport is None:
            self.transport = transport
            self.task = asyncio.get_running_loop().create_task(self._on_connect(self))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > HIGH_WATER and not self._paused and self.transport is not None:
            try:
                self.transport.pause_reading()
                self._paused = True
            except (AttributeError, RuntimeError):
                pass
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self._deadline.close()
        self._eof = True
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- reading --------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    async def _wait(self, deadline: float | None = None) -> None:
        """Wait for more input (flushing replies first). With a deadline (loop time),
        raise TimeoutError when it passes. Only a wait that really waits has a deadline
        (cheaper than an asyncio.timeout() around every pipelined command), and the
        connection's one Deadline timer serves them all."""
        if self._eof:
            raise ConnectionResetError("connection closed by peer")
        if deadline is not None:
            self._deadline.start(deadline)
        try:
            await self.flush()
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        finally:
            if deadline is not None:
                self._deadline.stop()

    def _expire(self) -> None:
        for fut in (self._waiter, self._drain_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError())

    async def readline(self, limit: int, timeout: float | None = None) -> bytes:
        """One line including its LF. Raises LineTooLong after discarding the rest of
        an over-long line (so the next command is read cleanly); TimeoutError when the
        whole line has not arrived within `timeout` seconds."""
        start = 0
        too_long = False
        deadline = None
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                if too_long or len(line) > limit:
                    raise LineTooLong()
                return line
            if len(self._buf) > limit:
                too_long = True
                del self._buf[:]
            start = len(self._buf)
            if timeout is not None and deadline is None:
                deadline = self._loop.time() + timeout
            await self._wait(deadline)

    async def read(self, n: int = 65536, timeout: float | None = None) -> bytes | bytearray:
        """Whatever is buffered (up to n), waiting for at least one byte (at most
        `timeout` seconds, then TimeoutError); b'' at EOF. When all of the buffer is
        taken, it is handed over as it is (a bytearray, no copy) and a new one starts:
        DATA is most of what a relay reads."""
        deadline = None
        while not self._buf:
            if self._eof:
                return b""
            if timeout is not None and deadline is None:
                deadline = self._loop.time() + timeout
            await self._wait(deadline)
        if len(self._buf) <= n:
            data: bytes | bytearray = self._buf
            self._buf = bytearray()
        else:
            data = bytes(self._buf[:n])
            del self._buf[:n]
        if self._paused and len(self._buf) < HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._wait()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def peek(self, seen: int = 0) -> bytes:
        """Everything buffered once there is more than `seen` bytes; consumes nothing."""
        while len(self._buf) <= seen:
            await self._wait()
        return bytes(self._buf)

    def consume(self, n: int) -> None:
        del self._buf[:n]

    def unread(self, data: bytes) -> None:
        self._buf[0:0] = data

    # --- writing --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out at the next flush (before we wait for input)."""
        self._out.append(data)

    async def flush(self) -> None:
        if not self._out or self.transport is None or self.transport.is_closing():
            self._out.clear()
            return
        data = b"".join(self._out)
        self._out.clear()
        self.transport.write(data)
        if self._write_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def start_tls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        await self.flush()
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        self.transport = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                              ssl_handshake_timeout=timeout)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._out:
                self.transport.write(b"".join(self._out))
                self._out.clear()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def extra(self, name: str):
        return self.transport.get_extra_info(name) if self.transport is not None else None
