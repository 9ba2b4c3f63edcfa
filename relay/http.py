"""Metrics and health over HTTP: /metrics, /healthz and /readyz for Prometheus and Kubernetes.

Takes GET/HEAD requests from scrapers and kubelet probes on its own listener and hands
back the Prometheus exposition (text or OpenMetrics, gzip when asked), "ok" while the
event loop runs, and readiness from a callback the app supplies (listeners bound,
spool writable, disk free, delivery alive, not draining). With PROMETHEUS_MULTIPROC_DIR
set, /metrics adds up the numbers of every worker process (MultiProcessCollector).

Trusts nothing it reads: the request head is parsed by a plain class (RequestParser,
no sockets, no asyncio) with hard limits, and any fault closes only that connection.
The endpoint is read-only and takes no bodies. It is meant for a cluster network or
loopback: it has no authentication, so bind it where only scrapers and the kubelet reach.

RFCs: 9110 (HTTP semantics), 9112 (HTTP/1.1 message syntax). Exposition format:
Prometheus text 0.0.4 and OpenMetrics 1.0 via prometheus_client.
"""

from __future__ import annotations

import asyncio
import enum
import gzip
import inspect
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

# Importing relay.metrics registers every relay_* metric (in this process or as
# multiprocess files) before the first scrape, even the ones no part has moved yet.
from relay import metrics

log = logging.getLogger("relay.http")

# --- sans-IO request parsing (RFC 9112) ---------------------------------------------

# Request line: probes send "GET /readyz HTTP/1.1"; 8 KiB is the usual server default
# (RFC 9112 3: "at a minimum, request-line lengths of 8000 octets" are recommended).
MAX_REQUEST_LINE = 8192
# Whole head (request line + fields). Scrapers send well under 1 KiB.
MAX_HEAD = 16384
MAX_FIELDS = 64

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class HTTPError(Exception):
    """The request cannot be served; `status` is the reply, the connection then closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order received
    keep_alive: bool

    def header(self, name: str, default: str = "") -> str:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else default


class ParserState(enum.Enum):
    HEAD = "head"      # waiting for (the rest of) a request head
    ERROR = "error"    # a request was refused; the connection must close


class RequestParser:
    """Feed bytes, pull Request events. Several pipelined requests may sit in the buffer.

    Only heads are parsed: this server takes no bodies, so a request announcing one is
    refused (and the connection closed) rather than reading bytes we would not use.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        # How far we already looked for the end of the head: a slow sender dribbling a
        # byte at a time must cost O(bytes), not O(bytes^2) rescans.
        self._scanned = 0
        self.state = ParserState.HEAD

    def feed(self, data: bytes) -> None:
        if self.state is ParserState.ERROR:
            raise HTTPError(400, "connection already failed")
        self._buf += data

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed."""
        if self.state is ParserState.ERROR:
            raise HTTPError(400, "connection already failed")
        try:
            return self._next()
        except HTTPError:
            self.state = ParserState.ERROR
            raise

    def _next(self) -> Request | None:
        # RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request.
        while self._buf[:2] == b"\r\n" or self._buf[:1] == b"\n":
            del self._buf[: 2 if self._buf[:1] == b"\r" else 1]
            self._scanned = 0
        end, sep = self._find_end()
        if end < 0:
            first = self._buf.find(b"\n")
            if (first < 0 and len(self._buf) > MAX_REQUEST_LINE) or first > MAX_REQUEST_LINE:
                raise HTTPError(414, "request line too long")
            if len(self._buf) > MAX_HEAD:
                raise HTTPError(431, "request header fields too large")
            return None
        if end > MAX_HEAD:
            raise HTTPError(431, "request header fields too large")
        head = bytes(self._buf[:end])
        del self._buf[: end + sep]
        self._scanned = 0
        return _parse_head(head)

    def _find_end(self) -> tuple[int, int]:
        """Where the head ends (the line feed before the blank line) and how many bytes
        the blank line takes, or (-1, 0). RFC 9112 2.2 lets a recipient take a bare LF
        as a line end, so both "\\n\\r\\n" and "\\n\\n" close a head."""
        start = max(0, self._scanned - 2)
        found = [(i, len(sep)) for sep in (b"\n\r\n", b"\n\n")
                 if (i := self._buf.find(sep, start)) >= 0]
        if not found:
            self._scanned = len(self._buf)
            return -1, 0
        return min(found)


def _parse_head(head: bytes) -> Request:
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in head.split(b"\n")]
    line = lines[0]
    if len(line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed method")
    v = _VERSION.fullmatch(version)
    if not v:
        raise HTTPError(400, "malformed HTTP version")
    ver = (int(v.group(1)), int(v.group(2)))
    if ver[0] != 1:
        raise HTTPError(505, "HTTP version not supported")
    if not target.startswith(b"/") or any(c < 0x21 or c > 0x7e for c in target):
        raise HTTPError(400, "only origin-form targets are served")
    path, _, query = target.decode("ascii").partition("?")

    fields: list[tuple[str, str]] = []
    for raw in lines[1:]:
        if raw[:1] in (b" ", b"\t"):
            # RFC 9112 5.2: obs-fold; a server MUST either reject it or unfold. Reject.
            raise HTTPError(400, "obsolete line folding")
        name, colon, value = raw.partition(b":")
        # RFC 9112 5.1: no whitespace between name and colon; MUST reject with 400.
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HTTPError(400, "invalid character in header field")
        fields.append((name.decode("ascii").lower(), value.decode("latin-1")))
        if len(fields) > MAX_FIELDS:
            raise HTTPError(431, "too many header fields")

    names = [n for n, _ in fields]
    if "transfer-encoding" in names:
        raise HTTPError(400, "request bodies are not accepted")
    lengths = {v.strip() for n, v in fields if n == "content-length"}
    if lengths - {"0"}:
        raise HTTPError(400, "request bodies are not accepted")
    if ver >= (1, 1) and "host" not in names:
        # RFC 9112 3.2: a server MUST respond 400 to an HTTP/1.1 request without Host.
        raise HTTPError(400, "missing Host header")

    tokens = {t.strip().lower() for n, v in fields if n == "connection" for t in v.split(",")}
    keep_alive = "keep-alive" in tokens if ver == (1, 0) else "close" not in tokens
    return Request(method.decode("ascii"), path, query, ver, tuple(fields), keep_alive)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            414: "URI Too Long", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}


def render_response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
                    keep_alive: bool = True, head_only: bool = False,
                    extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Status line, fields and (unless HEAD) the body, as bytes for the wire."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
             f"Date: {formatdate(usegmt=True)}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             # Probes and scrapes must see the state now, never a proxy's copy.
             "Cache-Control: no-store"]
    lines += [f"{k}: {v}" for k, v in extra]
    if not keep_alive:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + body


# --- readiness helpers ------------------------------------------------------------------

def spool_problems(path: str | os.PathLike, min_free_bytes: int) -> list[str]:
    """Why the spool at `path` cannot take mail now, or [] when it can.

    Writable means a file can really be created, made durable and removed: a read-only
    remount or a full inode table shows up here, where a mode check would not. Blocking
    (an fsync): call it in a thread from async code.
    """
    problems: list[str] = []
    # Unique per call: several workers may probe the same spool at once.
    probe = os.path.join(os.fspath(path), f".readyz-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        problems.append(f"spool {os.fspath(path)} not writable: {e.strerror or e}")
        return problems
    try:
        st = os.statvfs(path)
    except OSError as e:
        problems.append(f"spool {os.fspath(path)}: cannot read free space: {e.strerror or e}")
        return problems
    free = st.f_bavail * st.f_frsize
    metrics.SPOOL_FREE.set(free)
    if free < min_free_bytes:
        problems.append(f"spool {os.fspath(path)}: {free // 2**20} MiB free, "
                        f"below the {min_free_bytes // 2**20} MiB minimum")
    return problems


def worker_exited(pid: int) -> None:
    """Tell the multiprocess collector a worker is gone, so its live gauges stop counting.

    Counters and histograms of the dead worker keep adding up (they never go back).
    A no-op when the relay runs as a single process.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, directory)


# --- the asyncio layer -------------------------------------------------------------------

ReadyCallback = Callable[[], "list[str] | Awaitable[list[str]]"]


class HealthServer:
    """Serves /metrics, /healthz and /readyz on (host, port); port 0 lets the OS pick.

    `ready` returns the list of reasons the relay cannot take mail ([] = ready). It may
    be a plain function or return an awaitable (to run blocking checks such as
    spool_problems in a thread). If it raises or takes longer than `ready_timeout`,
    that is itself a problem: a stuck check must not look like a ready relay.
    """

    IDLE_TIMEOUT = 30.0      # seconds to send each whole request head (idle keep-alive too)
    MAX_CONNECTIONS = 64     # the kubelet and a few scrapers; more is abuse

    def __init__(self, host: str, port: int, ready: ReadyCallback, *,
                 multiprocess_dir: str | None = None, ready_timeout: float = 5.0) -> None:
        self.host = host
        self._port = port
        self._ready = ready
        self._ready_timeout = ready_timeout
        directory = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            from prometheus_client import multiprocess
            self._registry: CollectorRegistry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._registry, path=directory)
        else:
            self._registry = REGISTRY
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port,
                                                  reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("http listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.MAX_CONNECTIONS:
            writer.close()
            return
        self._conns.add(task)
        parser = RequestParser()
        loop = asyncio.get_running_loop()
        # One deadline per request, not per read: a client dribbling a byte at a time
        # (slowloris) cannot hold one of the few connection slots for long.
        deadline = loop.time() + self.IDLE_TIMEOUT
        try:
            while True:
                try:
                    req = parser.next_request()
                except HTTPError as e:
                    log.info("http bad request from %s: %s",
                             writer.get_extra_info("peername"), e)
                    writer.write(render_response(e.status, f"{e.reason}\n".encode(),
                                                 keep_alive=False))
                    await writer.drain()
                    return
                if req is None:
                    data = await asyncio.wait_for(reader.read(65536),
                                                  max(0.0, deadline - loop.time()))
                    if not data:
                        return
                    parser.feed(data)
                    continue
                writer.write(await self.respond(req))
                await writer.drain()
                if not req.keep_alive:
                    return
                deadline = loop.time() + self.IDLE_TIMEOUT
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def respond(self, req: Request) -> bytes:
        """The whole response to one request (also usable without a socket)."""
        head_only = req.method == "HEAD"
        ka = req.keep_alive
        if req.method not in ("GET", "HEAD"):
            return render_response(405, b"method not allowed\n", keep_alive=False,
                                   extra=(("Allow", "GET, HEAD"),))
        if req.path == "/healthz":
            # Answering at all proves the event loop turns; that is what liveness means.
            return render_response(200, b"ok\n", keep_alive=ka, head_only=head_only)
        if req.path == "/readyz":
            problems = await self._problems()
            if problems:
                body = "".join(f"{p}\n" for p in problems).encode()
                return render_response(503, body, keep_alive=ka, head_only=head_only)
            return render_response(200, b"ok\n", keep_alive=ka, head_only=head_only)
        if req.path == "/metrics":
            return await self._metrics(req, head_only)
        return render_response(404, b"not found\n", keep_alive=ka, head_only=head_only)

    async def _problems(self) -> list[str]:
        try:
            result = self._ready()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self._ready_timeout)
            problems = [str(p) for p in result]
        except TimeoutError:
            log.warning("readiness check timed out after %.1fs", self._ready_timeout)
            problems = ["readiness check timed out"]
        except Exception as e:
            log.exception("readiness check failed")
            problems = [f"readiness check failed: {type(e).__name__}"]
        metrics.READY.set(0 if problems else 1)
        return problems

    async def _metrics(self, req: Request, head_only: bool) -> bytes:
        # Fresh relay_ready (and spool free space) in every scrape, probed or not.
        await self._problems()
        encoder, content_type = choose_encoder(req.header("accept"))
        # Collecting reads every worker's files in multiprocess mode: keep it off the loop.
        body = await asyncio.to_thread(encoder, self._registry)
        extra: tuple[tuple[str, str], ...] = ()
        if "gzip" in req.header("accept-encoding").lower():
            body = gzip.compress(body, compresslevel=1)
            extra = (("Content-Encoding", "gzip"),)
        return render_response(200, body, content_type=content_type, keep_alive=req.keep_alive,
                               head_only=head_only, extra=extra)
