"""MTA-STS: a recipient domain's published TLS policy for its MX hosts (RFC 8461).

Takes a recipient domain; asks DNS (relay.pipeline.protocol.Resolver) for the TXT
record `_mta-sts.<domain>` ("v=STSv1; id=..."), fetches the policy over HTTPS from
`https://mta-sts.<domain>/.well-known/mta-sts.txt` (certificate verified for that
name, no redirects, bounded size and time), parses it and caches it on disk (one JSON
file per domain, written atomically) so policies survive restarts. Hands the delivery
code a Policy (mode enforce/testing/none, MX patterns, `matches(mx_host)`) or None.

Trusts nothing fetched: the TXT id, the HTTP response and the policy text are parsed
strictly; anything malformed counts as no new policy. A cached, unexpired policy is
kept when DNS or HTTPS fails (an attacker who can block them must not downgrade an
`enforce` domain), and is replaced only by a newer valid policy (RFC 8461 5.1, 10.2).
A policy in use is refreshed in the background once a day (REFRESH_AFTER), so its
max_age keeps running from a recent fetch instead of lapsing.

The HTTP parts (request rendering, response parsing) are plain functions without I/O;
the fetch is a thin asyncio + ssl layer over them, so no HTTP library is needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from relay.durable import write_atomic
from relay.pipeline.protocol import DNSError, Resolver

log = logging.getLogger("relay.delivery.mta_sts")

MODES = ("enforce", "testing", "none")
# RFC 8461 3.2: max_age is at most 31557600 (about a year).
MAX_AGE_LIMIT = 31557600
# RFC 8461 3.3: senders may cap the policy size; 64 KiB is what the RFC suggests.
MAX_POLICY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024
WELL_KNOWN = "/.well-known/mta-sts.txt"
MAX_MEMORY_DOMAINS = 10000
# A policy in use is fetched again, in the background, once it is this old (or half its
# max_age, if that is less): its lifetime then runs from the new fetch, so a domain
# with ongoing traffic never has its policy lapse into a window an attacker who blocks
# DNS or HTTPS could use (RFC 8461 10.2). A failed refresh waits RETRY_REFRESH.
REFRESH_AFTER = 86400.0
RETRY_REFRESH = 3600.0

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOST = re.compile(rf"{_LABEL}(\.{_LABEL})+")


class PolicyError(ValueError):
    """A TXT record, HTTP response or policy text that is not valid MTA-STS."""


@dataclass(frozen=True)
class Policy:
    """One domain's policy as fetched (RFC 8461 3.2), with the TXT id it came under."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def matches(self, mx_host: str) -> bool:
        """RFC 8461 4.1: an MX host matches a pattern exactly, or a '*.' pattern whose
        wildcard stands for exactly one leftmost label (as in RFC 6125 6.4.3)."""
        host = mx_host.strip().rstrip(".").lower()
        for pat in self.mx:
            if pat.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pat[2:]:
                    return True
            elif host == pat:
                return True
        return False

    def to_json(self) -> dict:
        return {**asdict(self), "mx": list(self.mx)}

    @classmethod
    def from_json(cls, d: dict) -> Policy:
        p = cls(domain=str(d["domain"]), id=str(d["id"]), mode=str(d["mode"]),
                mx=tuple(str(m) for m in d["mx"]), max_age=int(d["max_age"]),
                fetched=float(d["fetched"]))
        if p.mode not in MODES or not 0 <= p.max_age <= MAX_AGE_LIMIT:
            raise PolicyError("bad cached policy")
        return p


# --- sans-IO parsing ---------------------------------------------------------------------

def parse_txt(records: list[str]) -> str | None:
    """The policy id from the `_mta-sts` TXT records, or None (RFC 8461 3.1): only
    records starting with 'v=STSv1' count; more than one such record, or a bad one,
    means no policy is announced."""
    sts = [r for r in records if re.match(r"v=STSv1\s*(;|$)", r)]
    if len(sts) != 1:
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            return None
        fields.setdefault(key.strip(), value.strip())
    pid = fields.get("id", "")
    return pid if _ID.fullmatch(pid) else None


def parse_policy(text: str, domain: str, policy_id: str, fetched: float) -> Policy:
    """The policy body (RFC 8461 3.2): 'key: value' lines, CRLF or LF; version, mode
    and max_age required, mx required (one or more) unless mode is none; unknown keys
    ignored; a repeated key other than mx keeps its first value."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a 'key: value' line: {line[:60]!r}")
        # ABNF literals are case-insensitive (RFC 5234 2.3).
        key, value = key.strip().lower(), value.strip(" \t")
        if key == "mx":
            pat = value.lower().rstrip(".")
            bare = pat[2:] if pat.startswith("*.") else pat
            if not _HOST.fullmatch(bare):
                raise PolicyError(f"bad mx pattern {value[:60]!r}")
            mx.append(pat)
        else:
            fields.setdefault(key, value)
    if fields.get("version", "").lower() != "stsv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "").lower()
    if mode not in MODES:
        raise PolicyError(f"bad mode {fields.get('mode', '')[:20]!r}")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"\d{1,10}", age) or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"bad max_age {age[:20]!r}")
    if not mx and mode != "none":
        raise PolicyError("no mx patterns")
    return Policy(domain=domain, id=policy_id, mode=mode, mx=tuple(mx), max_age=int(age),
                  fetched=fetched)


def render_request(host: str) -> bytes:
    """The GET for the policy. 'Connection: close' lets the body end at EOF too."""
    return (f"GET {WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n"
            "User-Agent: relay-mta-sts\r\nConnection: close\r\n\r\n").encode("ascii")


def parse_response(data: bytes, complete: bool = True) -> str:
    """The policy text from a whole HTTP/1.x response (read to EOF, bounded by the
    caller). Only 200 counts: RFC 8461 3.3 forbids following redirects. The media
    type must be text/plain. Content-Length, chunked and close-delimited bodies."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEADER_BYTES:
        raise PolicyError("no complete HTTP header")
    head = data[:end].decode("latin-1").split("\r\n")
    body = data[end + 4:]
    m = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", head[0])
    if not m:
        raise PolicyError(f"bad status line {head[0][:60]!r}")
    if m.group(1) != "200":
        raise PolicyError(f"HTTP status {m.group(1)}")
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise PolicyError("bad HTTP header line")
        headers[name.lower()] = value.strip()
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "text/plain":
        raise PolicyError(f"content type {ctype[:40]!r} is not text/plain")
    te = headers.get("transfer-encoding", "").lower()
    if te:
        if te != "chunked":
            raise PolicyError(f"transfer encoding {te[:20]!r}")
        body = _dechunk(body)
    elif "content-length" in headers:
        cl = headers["content-length"]
        if not cl.isdigit() or int(cl) > MAX_POLICY_BYTES:
            raise PolicyError("bad or too large Content-Length")
        if len(body) < int(cl):
            raise PolicyError("body shorter than Content-Length")
        body = body[: int(cl)]
    elif not complete:
        raise PolicyError("body not delimited")
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError("policy too large")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None


def response_complete(data: bytes) -> bool:
    """True once a response with a Content-Length or chunked body is all here, so
    the reader need not wait for the server to close."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = data[:end].lower()
    body = data[end + 4:]
    m = re.search(rb"\r\ncontent-length:[ \t]*(\d{1,10})[ \t]*(\r\n|$)", head)
    if b"\r\ntransfer-encoding:" in head:
        try:
            _dechunk(body)
        except PolicyError:
            return False
        return True
    return bool(m) and len(body) >= int(m.group(1))


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise PolicyError("truncated chunk size")
        size_s = data[pos:eol].split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_s):
            raise PolicyError("bad chunk size")
        size = int(size_s, 16)
        if size == 0:
            return bytes(out)
        if len(out) + size > MAX_POLICY_BYTES:
            raise PolicyError("policy too large")
        chunk = data[eol + 2: eol + 2 + size]
        if len(chunk) != size or data[eol + 2 + size: eol + 4 + size] != b"\r\n":
            raise PolicyError("truncated chunk")
        out += chunk
        pos = eol + 4 + size


# --- the policy source -------------------------------------------------------------------

Fetch = Callable[[str], Awaitable[str]]


class MTASTS:
    """Policies by recipient domain: DNS, HTTPS, a memory cache and a disk cache.

    `fetch(domain) -> policy text` replaces the HTTPS fetch (tests); `connect_to(host)
    -> (address, port)` changes only where the HTTPS connection goes, while the
    certificate is still checked for mta-sts.<domain> (tests point it at loopback)."""

    def __init__(self, cache_dir: str, resolver: Resolver, fetch: Fetch | None = None, *,
                 ssl_context: ssl.SSLContext | None = None, ca_file: str = "",
                 timeout: float = 20.0,
                 connect_to: Callable[[str], tuple[str, int]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(cache_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._resolver = resolver
        self._fetch = fetch or self._https_fetch
        if ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=ca_file or None)
            ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl = ssl_context
        self._timeout = timeout
        self._connect_to = connect_to or (lambda host: (host, 443))
        self._clock = clock
        self._mem: dict[str, Policy | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refreshes: dict[str, asyncio.Task] = {}
        self._refresh_tried: dict[str, float] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy to apply to mail for `domain` now, or None (no MTA-STS)."""
        domain = domain.strip().rstrip(".").lower()
        if not _HOST.fullmatch(domain):
            return None
        if len(self._locks) > MAX_MEMORY_DOMAINS:
            # Bounded memory over many recipient domains: the disk cache stays.
            self._locks = {d: k for d, k in self._locks.items() if k.locked()}
            self._mem.clear()
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:   # one DNS check and fetch per domain at a time
            return await self._policy(domain)

    async def _policy(self, domain: str) -> Policy | None:
        now = self._clock()
        cached = await self._cached(domain)
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            pid = parse_txt(await self._resolver.query(f"_mta-sts.{domain}", "TXT"))
        except DNSError as e:
            log.info("mta-sts %s: TXT lookup failed (%s); %s", domain, e,
                     "using cached policy" if cached else "no policy")
            return cached
        if pid is None:
            # RFC 8461 5.1: a missing TXT record does not remove a cached policy
            # (stripping DNS must not downgrade); without one there is no policy.
            return cached
        if cached is not None and cached.id == pid:
            if now - cached.fetched >= min(REFRESH_AFTER, cached.max_age / 2):
                self._refresh_soon(cached, now)
            return cached
        try:
            text = await asyncio.wait_for(self._fetch(domain), self._timeout)
            new = parse_policy(text, domain, pid, self._clock())
        except (OSError, ValueError) as e:   # PolicyError, SSLError, TimeoutError too
            log.warning("mta-sts %s: policy id=%s not fetched (%s); %s", domain, pid,
                        str(e) or e.__class__.__name__,
                        f"keeping cached {cached.mode} policy" if cached else "no policy")
            return cached
        await self._store(new)
        log.info("mta-sts %s: policy id=%s mode=%s max_age=%d mx=%s", domain, new.id,
                 new.mode, new.max_age, ",".join(new.mx))
        return new

    def _refresh_soon(self, cached: Policy, now: float) -> None:
        """Fetch the unchanged policy again without holding up the delivery that asked."""
        domain = cached.domain
        if domain in self._refreshes or \
                now - self._refresh_tried.get(domain, 0.0) < RETRY_REFRESH:
            return
        self._refresh_tried[domain] = now
        if len(self._refresh_tried) > MAX_MEMORY_DOMAINS:
            self._refresh_tried = {domain: now}
        task = asyncio.get_running_loop().create_task(self._refresh(cached))
        self._refreshes[domain] = task
        task.add_done_callback(lambda _t: self._refreshes.pop(domain, None))

    async def _refresh(self, cached: Policy) -> None:
        domain = cached.domain
        try:
            text = await asyncio.wait_for(self._fetch(domain), self._timeout)
            new = parse_policy(text, domain, cached.id, self._clock())
        except (OSError, ValueError) as e:
            log.warning("mta-sts %s: refresh of policy id=%s failed (%s); keeping it "
                        "until %s", domain, cached.id, str(e) or e.__class__.__name__,
                        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(cached.expires)))
            return
        if self._mem.get(domain) not in (cached, None):
            return          # a newer policy arrived meanwhile (a new TXT id): keep it
        await self._store(new)
        log.info("mta-sts %s: policy id=%s refreshed, mode=%s max_age=%d", domain, new.id,
                 new.mode, new.max_age)

    # --- cache ---

    def _path(self, domain: str) -> Path:
        return self._dir / f"{domain}.json"

    async def _cached(self, domain: str) -> Policy | None:
        if domain not in self._mem:
            self._mem[domain] = await asyncio.to_thread(self._read, domain)
        return self._mem[domain]

    def _read(self, domain: str) -> Policy | None:
        try:
            p = Policy.from_json(json.loads(self._path(domain).read_text("utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("mta-sts %s: cache file unreadable (%s), ignored", domain, e)
            return None
        return p if p.domain == domain else None

    async def _store(self, p: Policy) -> None:
        self._mem[p.domain] = p
        try:
            await asyncio.to_thread(self._write, p)
        except OSError as e:
            # The policy still applies from memory; only restart-survival is lost.
            log.error("mta-sts %s: cannot write cache (%s)", p.domain, e)

    def _write(self, p: Policy) -> None:
        # A crash leaves the old cache file or the new one, never a torn one.
        write_atomic(self._path(p.domain), json.dumps(p.to_json()).encode(), 0o644)

    # --- HTTPS ---

    async def _https_fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        addr, port = self._connect_to(host)
        reader, writer = await asyncio.open_connection(
            addr, port, ssl=self._ssl, server_hostname=host,
            ssl_handshake_timeout=self._timeout)
        try:
            writer.write(render_request(host))
            await writer.drain()
            data = bytearray()
            limit = MAX_HEADER_BYTES + 4 + MAX_POLICY_BYTES + 4096  # + chunk framing
            eof = True
            while not response_complete(data):
                try:
                    chunk = await reader.read(16384)
                except (ssl.SSLError, ConnectionResetError):
                    # Servers often drop the TLS session without close_notify: a
                    # length-delimited body is still good (checked below), an
                    # EOF-delimited one is not (it could be truncated).
                    eof = False
                    break
                if not chunk:
                    break
                data += chunk
                if len(data) > limit:
                    raise PolicyError("response too large")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        return parse_response(bytes(data), complete=eof)
