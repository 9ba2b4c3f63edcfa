"""PROXY protocol: the client's real address from a load balancer's v1/v2 header.

Takes the first bytes of a connection from a trusted proxy (HAProxy, an AWS NLB, a
Kubernetes ingress) and hands on a ProxyResult: the original source and destination,
or "use the real peer" (v2 LOCAL health checks, v1 UNKNOWN, v2 UNSPEC/UNIX), plus the
number of header bytes to drop. Everything after the header is the client's SMTP.

Trusts nothing in the header: every field is checked (signature, version, command,
family, lengths, addresses with `ipaddress`, ports 0-65535, TLV framing, the optional
CRC32C). Whether the peer may send a header at all is the caller's check, made with
`peer_trusted(ip, proxy_protocol.trusted)` before reading; the size limit is the
caller's too (proxy_protocol.max_header), passed in.

`parse()` is sans-IO (bytes in, result or None out); `read_header()` is the thin
asyncio layer that reads exactly the header and not one byte more.

Spec: HAProxy "The PROXY protocol", versions 1 and 2 (haproxy/doc/proxy-protocol.txt).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Spec 2.1: "a receiver ... must not try to parse more than 107 characters", which is
# the worst-case TCP6 line (5+1+4+1+39+1+39+1+5+1+5+2 = 104) with some slack.
V1_MAX = 107
V2_FIXED = 16  # signature 12 + ver/cmd 1 + family 1 + length 2
DEFAULT_MAX_HEADER = 536  # spec 2.2 suggests 536 bytes of buffer is always enough

# v2 TLV types we read (spec 2.2.1-2.2.7); the rest are kept raw in `tlvs`.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20


class ProxyError(Exception):
    """A malformed, oversized, truncated or late PROXY header; the reason says which."""


class Command(enum.Enum):
    LOCAL = "LOCAL"   # v2 0x0: the proxy's own connection (health check): use the peer
    PROXY = "PROXY"   # relayed on behalf of another client: use the header's addresses


class Family(enum.Enum):
    UNSPEC = "UNSPEC"  # v1 UNKNOWN, v2 AF_UNSPEC: use the real peer
    TCP4 = "TCP4"
    TCP6 = "TCP6"
    UNIX = "UNIX"      # v2 AF_UNIX stream: no IP to report, use the real peer


@dataclass(frozen=True)
class ProxyResult:
    version: int
    command: Command
    family: Family
    src_ip: str | None
    src_port: int | None
    dst_ip: str | None
    dst_port: int | None
    consumed: int  # header length: the caller's data starts at buf[consumed:]
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def use_peer(self) -> bool:
        """True when the header carries no client address (keep the socket's peer)."""
        return self.src_ip is None

    def client(self, peer: tuple[str, int]) -> tuple[str, int]:
        """The client's (ip, port): the header's, or the socket's `peer` when it has none."""
        if self.src_ip is None or self.src_port is None:
            return peer[0], peer[1]
        return self.src_ip, self.src_port

    def tlv(self, kind: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None


def peer_trusted(ip: str, networks: Iterable[object]) -> bool:
    """May this socket peer send a PROXY header? `networks` are config Networks (`.net`)
    or anything ipaddress.ip_network accepts; an unparsable ip is never trusted."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    for n in networks:
        net = getattr(n, "net", None) or ipaddress.ip_network(str(n), strict=False)
        if addr.version == net.version and addr in net:
            return True
    return False


def parse(buf: bytes, max_size: int = DEFAULT_MAX_HEADER) -> ProxyResult | None:
    """Parse a header at the start of `buf`.

    Returns None while `buf` is a proper prefix of a header that could still be valid,
    a ProxyResult once the header is complete (bytes after it are not looked at), and
    raises ProxyError as soon as the bytes cannot start a valid header within max_size.
    """
    buf = bytes(buf)
    if not buf:
        return None
    n = min(len(buf), len(V2_SIGNATURE))
    if buf[:n] == V2_SIGNATURE[:n]:
        if len(buf) < V2_FIXED:
            return None
        return _parse_v2(buf, max_size)
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] == V1_PREFIX[:n]:
        if len(buf) < len(V1_PREFIX):
            return None
        return _parse_v1(buf, max_size)
    raise ProxyError("no PROXY protocol signature")


# --- v1: one text line ------------------------------------------------------------------

def _parse_v1(buf: bytes, max_size: int) -> ProxyResult | None:
    limit = min(V1_MAX, max_size)
    end = buf.find(b"\r\n", 0, limit)
    if end < 0:
        head = buf[:limit]
        # Fail early on bytes no header line may hold, so a client that is not a
        # proxy is dropped at once rather than at the timeout.
        cr = head.find(b"\r")
        if 0 <= cr < len(head) - 1 or not _printable(head.rstrip(b"\r")):
            raise ProxyError("v1: bad character in header line")
        if len(buf) >= limit:
            raise ProxyError(f"v1: no CRLF within {limit} bytes")
        return None
    line = buf[:end]
    consumed = end + 2
    if not _printable(line):
        raise ProxyError("v1: bad character in header line")
    parts = line.decode("ascii").split(" ")
    proto = parts[1] if len(parts) > 1 else ""
    if proto == "UNKNOWN":
        # Spec 2.1: after UNKNOWN the receiver must ignore everything up to the CRLF.
        return ProxyResult(1, Command.PROXY, Family.UNSPEC, None, None, None, None, consumed)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1: unknown protocol {proto[:8]!r}")
    if len(parts) != 6:
        raise ProxyError("v1: expected 'PROXY proto src dst sport dport'")
    version = 4 if proto == "TCP4" else 6
    src = _ip_text(parts[2], version)
    dst = _ip_text(parts[3], version)
    sport = _port_text(parts[4])
    dport = _port_text(parts[5])
    family = Family.TCP4 if version == 4 else Family.TCP6
    return ProxyResult(1, Command.PROXY, family, src, sport, dst, dport, consumed)


def _printable(b: bytes) -> bool:
    return all(0x20 <= c < 0x7F for c in b)


def _ip_text(text: str, version: int) -> str:
    try:
        # Both classes refuse leading zeros, '%scope' is refused below, and the
        # result is the canonical text form, so one client has one spelling.
        addr = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyError(f"v1: not an IPv{version} address: {text[:45]!r}") from None
    if "%" in text:
        raise ProxyError("v1: scoped IPv6 address")
    return str(addr)


def _port_text(text: str) -> int:
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()):
        raise ProxyError(f"v1: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"v1: port out of range: {port}")
    return port


# --- v2: binary ---------------------------------------------------------------------------

_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX (spec 2.2)


def _parse_v2(buf: bytes, max_size: int) -> ProxyResult | None:
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 0x2:
        raise ProxyError(f"v2: bad version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd > 0x1:
        raise ProxyError(f"v2: bad command {cmd}")
    af, transport = fam >> 4, fam & 0x0F
    if af > 0x3 or transport > 0x2:
        raise ProxyError(f"v2: bad address family/transport 0x{fam:02x}")
    total = V2_FIXED + length
    if total > max_size:
        raise ProxyError(f"v2: header of {total} bytes exceeds the limit of {max_size}")
    if len(buf) < total:
        return None
    consumed = total
    if cmd == 0x0:
        # Spec 2.2: LOCAL must be accepted and the whole address block discarded.
        return ProxyResult(2, Command.LOCAL, Family.UNSPEC, None, None, None, None, consumed)
    if af == 0x0:
        # Spec 2.2: UNSPEC under PROXY may be accepted; addresses must then be ignored.
        return ProxyResult(2, Command.PROXY, Family.UNSPEC, None, None, None, None, consumed)
    if transport != 0x1:
        raise ProxyError("v2: only STREAM connections carry SMTP")
    need = _ADDR_LEN[af]
    if length < need:
        raise ProxyError(f"v2: address block of {length} bytes, need {need}")
    block = buf[V2_FIXED:total]
    tlvs = _parse_tlvs(block, need)
    crc = next((v for t, v in tlvs if t == PP2_TYPE_CRC32C), None)
    if crc is not None:
        _check_crc(buf[:total], need, crc)
    if af == 0x1:
        src = str(ipaddress.IPv4Address(block[0:4]))
        dst = str(ipaddress.IPv4Address(block[4:8]))
        sport, dport = struct.unpack_from("!HH", block, 8)
        return ProxyResult(2, Command.PROXY, Family.TCP4, src, sport, dst, dport, consumed,
                           tlvs)
    if af == 0x2:
        src = str(ipaddress.IPv6Address(block[0:16]))
        dst = str(ipaddress.IPv6Address(block[16:32]))
        sport, dport = struct.unpack_from("!HH", block, 32)
        return ProxyResult(2, Command.PROXY, Family.TCP6, src, sport, dst, dport, consumed,
                           tlvs)
    return ProxyResult(2, Command.PROXY, Family.UNIX, None, None, None, None, consumed, tlvs)


def _parse_tlvs(block: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = start
    while i < len(block):
        if i + 3 > len(block):
            raise ProxyError("v2: truncated TLV")
        kind, size = block[i], struct.unpack_from("!H", block, i + 1)[0]
        if i + 3 + size > len(block):
            raise ProxyError(f"v2: TLV 0x{kind:02x} overruns the header")
        out.append((kind, block[i + 3:i + 3 + size]))
        i += 3 + size
    return tuple(out)


def _check_crc(header: bytes, addr_len: int, crc: bytes) -> None:
    if len(crc) != 4:
        raise ProxyError("v2: CRC32C TLV must be 4 bytes")
    # Spec 2.2.3: the checksum covers the whole header with its own field zeroed.
    i = V2_FIXED + addr_len
    zeroed = bytearray(header)
    while i < len(header):
        kind, size = header[i], struct.unpack_from("!H", header, i + 1)[0]
        if kind == PP2_TYPE_CRC32C:
            zeroed[i + 3:i + 7] = b"\x00\x00\x00\x00"
        i += 3 + size
    if crc32c(bytes(zeroed)) != struct.unpack("!I", crc)[0]:
        raise ProxyError("v2: CRC32C mismatch")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C uses; headers are small, so pure Python."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- the asyncio layer --------------------------------------------------------------------

async def read_header(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_HEADER,
                      timeout: float = 5.0) -> ProxyResult:  # noqa: ASYNC109
    """Read exactly one PROXY header from `reader`; the SMTP bytes stay unread.

    Raises ProxyError for bad input, EOF before the header ends, or `timeout` seconds
    passing (a stalled proxy must not hold a connection slot). The timeout is a
    parameter, not the caller's asyncio.timeout, because it is part of the header
    contract (proxy_protocol.timeout) and must end as ProxyError.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _read(reader, max_size)
    except TimeoutError:
        raise ProxyError(f"no complete PROXY header within {timeout:g}s") from None
    except asyncio.IncompleteReadError:
        raise ProxyError("connection closed inside the PROXY header") from None


async def _read(reader: asyncio.StreamReader, max_size: int) -> ProxyResult:
    # Six bytes tell the versions apart ("PROXY " vs "\r\n\r\n\0\r") and are shorter
    # than any complete header (the shortest, "PROXY UNKNOWN\r\n", is 15).
    buf = b""
    while len(buf) < len(V1_PREFIX):
        buf += await reader.readexactly(1)
        parse(buf, max_size)  # raises at the first byte that fits neither signature
    if buf == V1_PREFIX:
        # The line's length is unknown until CRLF, and the client may pipeline SMTP right
        # behind it, so take one byte at a time (from the reader's buffer, not a syscall);
        # parse() on each byte also drops a non-proxy at its first impossible byte.
        while True:
            buf += await reader.readexactly(1)
            result = parse(buf, max_size)
            if result is not None:
                return result
    buf += await reader.readexactly(V2_FIXED - len(buf))
    result = parse(buf, max_size)  # checks signature, version, family and the size limit
    if result is None:
        length = struct.unpack_from("!H", buf, 14)[0]
        buf += await reader.readexactly(length)
        result = parse(buf, max_size)
    if result is None or result.consumed != len(buf):  # pragma: no cover - parse's contract
        raise ProxyError("v2: header length mismatch")
    return result
