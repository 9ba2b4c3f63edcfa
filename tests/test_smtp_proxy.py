"""PROXY protocol v1/v2: the sans-IO parser and the asyncio reader over real sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Network
from relay.smtp import proxy
from relay.smtp.proxy import Command, Family, ProxyError, ProxyResult, parse, read_header

SIG = proxy.V2_SIGNATURE


def v2(cmd: int = 1, fam: int = 0x11, addr: bytes = b"", tlvs: bytes = b"",
       crc: bool = False, ver: int = 2) -> bytes:
    """Build a v2 header by hand, optionally with a correct CRC32C TLV at the end."""
    body = addr + tlvs
    if crc:
        body += b"\x03\x00\x04\x00\x00\x00\x00"
    head = SIG + bytes([(ver << 4) | cmd, fam]) + struct.pack("!H", len(body)) + body
    if crc:
        head = head[:-4] + struct.pack("!I", proxy.crc32c(head))
    return head


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# --- v1 --------------------------------------------------------------------------------

def test_v1_tcp4_leaves_following_bytes():
    head = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    r = parse(head + b"EHLO x\r\n")
    assert r == ProxyResult(1, Command.PROXY, Family.TCP4, "192.0.2.1", 56324,
                            "198.51.100.2", 25, len(head))
    assert not r.use_peer


def test_v1_tcp6_canonical_form():
    r = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.1 65535 0\r\n")
    assert r is not None
    assert (r.family, r.src_ip, r.dst_ip, r.src_port, r.dst_port) == (
        Family.TCP6, "2001:db8::1", "::ffff:c000:201", 65535, 0)


@pytest.mark.parametrize("head", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_means_real_peer(head):
    r = parse(head + b"QUIT\r\n")
    assert r is not None and r.use_peer and r.family is Family.UNSPEC
    assert r.consumed == len(head)


def test_v1_longest_header_fits():
    addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    head = f"PROXY TCP6 {addr} {addr} 65535 65535\r\n".encode()
    assert len(head) == 104
    assert parse(head).src_ip == addr


@pytest.mark.parametrize("head", [
    b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
    b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 123456 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
    b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xd9\xa1\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\x00\r\n",
    b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"EHLO client.example\r\n",
])
def test_v1_malformed(head):
    with pytest.raises(ProxyError):
        parse(head)


def test_v1_no_crlf_within_107_bytes():
    head = b"PROXY UNKNOWN " + b"x" * 93
    assert len(head) == 107
    with pytest.raises(ProxyError, match="107"):
        parse(head)
    assert parse(head[:-1]) is None  # could still end in CRLF


def test_v1_caller_limit_is_smaller():
    head = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    with pytest.raises(ProxyError):
        parse(head, max_size=20)


# --- v2 --------------------------------------------------------------------------------

def test_v2_tcp4_with_tlvs_and_crc():
    tlvs = tlv(proxy.PP2_TYPE_AUTHORITY, b"mx.example") + tlv(proxy.PP2_TYPE_NOOP, b"\0" * 3)
    head = v2(addr=inet4("203.0.113.7", "10.0.0.1", 40000, 587), tlvs=tlvs, crc=True)
    r = parse(head + b"EHLO x\r\n")
    assert r is not None
    assert (r.version, r.command, r.family) == (2, Command.PROXY, Family.TCP4)
    assert (r.src_ip, r.src_port, r.dst_ip, r.dst_port) == ("203.0.113.7", 40000,
                                                             "10.0.0.1", 587)
    assert r.consumed == len(head)
    assert r.tlv(proxy.PP2_TYPE_AUTHORITY) == b"mx.example"
    assert r.tlv(proxy.PP2_TYPE_SSL) is None
    assert [t for t, _ in r.tlvs] == [0x02, 0x04, 0x03]


def test_v2_tcp6():
    head = v2(fam=0x21, addr=inet6("2001:db8::7", "2001:db8::1", 1, 25))
    r = parse(head)
    assert (r.family, r.src_ip, r.dst_ip) == (Family.TCP6, "2001:db8::7", "2001:db8::1")


def test_v2_local_ignores_block():
    # A health check: whatever the block holds, the real peer is used.
    head = v2(cmd=0, fam=0x11, addr=b"\xff" * 5)
    r = parse(head + b"junk")
    assert r == ProxyResult(2, Command.LOCAL, Family.UNSPEC, None, None, None, None,
                            len(head))
    assert r.use_peer


def test_v2_unspec_and_unix_use_peer():
    assert parse(v2(fam=0x00, addr=b"")).use_peer
    r = parse(v2(fam=0x31, addr=b"/a".ljust(216, b"\0"), tlvs=tlv(0x05, b"id")))
    assert r.family is Family.UNIX and r.use_peer and r.tlv(0x05) == b"id"


def test_crc32c_check_value():
    assert proxy.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("head", [
    v2(ver=1, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),
    v2(cmd=2, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),
    v2(fam=0x41, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),
    v2(fam=0x13, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),
    v2(fam=0x12, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),   # DGRAM
    v2(fam=0x10, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),   # UNSPEC transport
    v2(fam=0x11, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)[:11]),
    v2(fam=0x21, addr=inet4("1.2.3.4", "1.2.3.4", 1, 2)),   # INET6 with a v4 block
    v2(addr=inet4("1.2.3.4", "1.2.3.4", 1, 2), tlvs=b"\x02\x00"),
    v2(addr=inet4("1.2.3.4", "1.2.3.4", 1, 2), tlvs=b"\x02\x00\x05abc"),
    v2(addr=inet4("1.2.3.4", "1.2.3.4", 1, 2), tlvs=tlv(0x03, b"\0\0\0")),
    SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + inet4("1.2.3.4", "1.2.3.4", 1, 2),
])
def test_v2_malformed(head):
    with pytest.raises(ProxyError):
        parse(head)


def test_v2_crc_mismatch():
    head = bytearray(v2(addr=inet4("1.2.3.4", "5.6.7.8", 1, 2), crc=True))
    head[16] ^= 1  # forge the source address after the proxy signed it
    with pytest.raises(ProxyError, match="CRC"):
        parse(bytes(head))


def test_v2_oversized_fails_before_body_arrives():
    head = v2(addr=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x04, b"\0" * 600))
    with pytest.raises(ProxyError, match="exceeds"):
        parse(head[:16])
    assert parse(head, max_size=len(head)).consumed == len(head)
    with pytest.raises(ProxyError):
        parse(head, max_size=len(head) - 1)


def test_truncated_is_need_more():
    head = v2(addr=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(0x02, b"x"))
    assert parse(head[:-1]) is None
    assert parse(b"") is None
    assert parse(b"PROX") is None
    assert parse(SIG[:5]) is None


def test_client_address_falls_back_to_peer():
    peer = ("10.1.2.3", 4444)
    assert parse(b"PROXY UNKNOWN\r\n").client(peer) == peer
    assert parse(v2(cmd=0, fam=0)).client(peer) == peer
    r = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n")
    assert r.client(peer) == ("192.0.2.1", 56324)


def test_peer_trusted():
    nets = (Network.parse("10.0.0.0/8"), Network.parse("2001:db8::/32"))
    assert proxy.peer_trusted("10.9.8.7", nets)
    assert proxy.peer_trusted("::ffff:10.9.8.7", nets)
    assert proxy.peer_trusted("2001:db8::1", nets)
    assert not proxy.peer_trusted("11.0.0.1", nets)
    assert not proxy.peer_trusted("2001:db9::1", nets)
    assert not proxy.peer_trusted("not-an-ip", nets)
    assert not proxy.peer_trusted("10.0.0.1", ())
    assert proxy.peer_trusted("127.0.0.1", ["127.0.0.0/8"])


# --- properties ----------------------------------------------------------------------

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@st.composite
def headers(draw) -> tuple[bytes, ProxyResult]:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "v1-unknown":
        head = b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" whatever here"])) + b"\r\n"
        return head, ProxyResult(1, Command.PROXY, Family.UNSPEC, None, None, None, None,
                                 len(head))
    if kind.startswith("v1"):
        four = kind == "v1-4"
        src, dst = draw(ipv4 if four else ipv6), draw(ipv4 if four else ipv6)
        head = f"PROXY TCP{4 if four else 6} {src} {dst} {sport} {dport}\r\n".encode()
        return head, ProxyResult(1, Command.PROXY, Family.TCP4 if four else Family.TCP6,
                                 src, sport, dst, dport, len(head))
    if kind == "v2-local":
        head = v2(cmd=0, fam=0x00, addr=draw(st.binary(max_size=40)))
        return head, ProxyResult(2, Command.LOCAL, Family.UNSPEC, None, None, None, None,
                                 len(head))
    four = kind == "v2-4"
    src, dst = draw(ipv4 if four else ipv6), draw(ipv4 if four else ipv6)
    addr = (inet4 if four else inet6)(src, dst, sport, dport)
    pairs = draw(st.lists(st.tuples(st.sampled_from([1, 2, 4, 5, 0x20, 0xE0]),
                                    st.binary(max_size=30)), max_size=4))
    crc = draw(st.booleans())
    head = v2(fam=0x11 if four else 0x21, addr=addr,
              tlvs=b"".join(tlv(t, v) for t, v in pairs), crc=crc)
    got_tlvs = tuple(pairs) + (((3, head[-4:]),) if crc else ())
    return head, ProxyResult(2, Command.PROXY, Family.TCP4 if four else Family.TCP6,
                             src, sport, dst, dport, len(head), got_tlvs)


@given(headers(), st.binary(max_size=20))
@settings(max_examples=300)
def test_every_split_point(case, tail):
    head, expected = case
    for cut in range(len(head)):
        assert parse(head[:cut]) is None, cut
    assert parse(head) == expected
    assert parse(head + tail) == expected


@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=120).map(lambda b: b"PROXY TCP4 " + b),
                 st.binary(min_size=4, max_size=120).map(lambda b: SIG + b"\x21" + b),
                 st.binary(min_size=2, max_size=120).map(lambda b: SIG + b)))
@settings(max_examples=1000)
def test_junk_raises_only_proxy_error(data):
    """Any bytes: None, a result, or ProxyError; and once a prefix fails, longer fail."""
    failed_at = None
    for cut in range(len(data) + 1):
        try:
            r = parse(data[:cut])
        except ProxyError:
            failed_at = cut if failed_at is None else failed_at
            continue
        assert failed_at is None, f"prefix {failed_at} failed but {cut} did not"
        if r is not None:
            assert 0 < r.consumed <= cut
            assert parse(data[:r.consumed]) == r
            break


@given(headers())
@settings(max_examples=100)
def test_corrupting_one_byte_never_crashes(case):
    head, _ = case
    for i in range(len(head)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(head)
            bad[i] ^= flip
            try:
                parse(bytes(bad))
            except ProxyError:
                pass


# --- the asyncio reader over real loopback sockets -------------------------------------

async def _serve_once(send: list[bytes], max_size: int = 536, timeout: float = 5.0,
                      close: bool = False):
    """Run a loopback server that reads a header then the rest; a client sends `send`."""
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def handle(reader, writer):
        try:
            r = await read_header(reader, max_size, timeout)
            release.set()
            rest = await reader.read()
            outcome.set_result((r, rest))
        except ProxyError as e:
            release.set()
            outcome.set_result(e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        for chunk in send:
            w.write(chunk)
            await w.drain()
            await asyncio.sleep(0)
        if close:
            w.write_eof()
        else:
            await release.wait()
            w.write_eof()
        result = await outcome
        w.close()
    return result


def test_read_header_v1_leaves_smtp_bytes():
    head = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
    r, rest = asyncio.run(_serve_once([head + b"EHLO a\r\nMAIL FROM:<>\r\n"]))
    assert r.src_ip == "192.0.2.1" and rest == b"EHLO a\r\nMAIL FROM:<>\r\n"


def test_read_header_shortest_v1_then_pipelined_smtp():
    r, rest = asyncio.run(_serve_once([b"PROXY UNKNOWN\r\nEHLO a\r\n"]))
    assert r.use_peer and rest == b"EHLO a\r\n"


def test_read_header_v2_in_pieces():
    head = v2(fam=0x21, addr=inet6("2001:db8::7", "::1", 5, 25), tlvs=tlv(2, b"a"), crc=True)
    pieces = [head[:3], head[3:14], head[14:20], head[20:] + b"QUIT\r\n"]
    r, rest = asyncio.run(_serve_once(pieces))
    assert r.src_ip == "2001:db8::7" and r.tlv(2) == b"a" and rest == b"QUIT\r\n"


def test_read_header_v2_local():
    r, rest = asyncio.run(_serve_once([v2(cmd=0, fam=0) + b"EHLO a\r\n"]))
    assert r.command is Command.LOCAL and rest == b"EHLO a\r\n"


@pytest.mark.parametrize("data", [
    b"EHLO client.example\r\n",                       # not a proxy at all
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 99999\r\nEHLO\r\n",  # bad port
    v2(addr=inet4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=tlv(4, b"\0" * 600)),  # too big
])
def test_read_header_rejects(data):
    assert isinstance(asyncio.run(_serve_once([data])), ProxyError)


def test_read_header_drops_a_non_proxy_at_its_first_byte():
    e = asyncio.run(_serve_once([b"E"], timeout=30))
    assert isinstance(e, ProxyError) and "signature" in str(e)


def test_read_header_eof_inside_header():
    e = asyncio.run(_serve_once([b"PROXY TCP4 1.2.3.4"], close=True))
    assert isinstance(e, ProxyError) and "closed" in str(e)


def test_read_header_timeout():
    e = asyncio.run(_serve_once([b"PROXY TCP4 1.2.3.4"], timeout=0.2))
    assert isinstance(e, ProxyError) and "within" in str(e)


def test_v1_fails_at_first_impossible_byte():
    # Not waiting for a CRLF that may never come: a bare LF or control byte ends it now.
    for partial in (b"PROXY TCP4 1.2\n", b"PROXY TCP4 1.2\r ", b"PROXY \x00"):
        with pytest.raises(ProxyError, match="bad character"):
            parse(partial)
    assert parse(b"PROXY TCP4 1.2.3.4\r") is None


def test_read_header_drops_junk_without_waiting_for_timeout():
    e = asyncio.run(_serve_once([b"PROXY TCP4 1.2.3.4\n"], timeout=30))
    assert isinstance(e, ProxyError) and "bad character" in str(e)
