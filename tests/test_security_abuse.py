"""Resource abuse against the real relay: idle and dripping connections (slowloris),
half-open TLS handshakes, huge header blocks and MIME bombs, password guessing.

Each attack comes from one loopback address while a normal client on another
(127.0.0.2: the whole of 127.0.0.0/8 is loopback) must still get through; limits are
per client IP. Memory is read from /proc/<pid>/status (VmHWM: the peak resident set).
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import pytest

from tests._relay import RawClient, RelayProcess
from tests._security import make_message, wait_for

NO_DELIVERY = {"delivery": {"enabled": False}}


def smtp_from(src: str, port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(src, 0))


def normal_client_gets_through(src: str, port: int, tls: bool = False) -> None:
    with smtp_from(src, port) as s:
        s.ehlo("normal.test")
        if tls:
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("normal.test")
        s.mail("a@x.test")
        s.rcpt("b@y.test")
        code, _ = s.data(make_message("normal"))
        assert code == 250


def closed_with_421(c: RawClient) -> bool:
    try:
        code, _ = c.reply()
    except (ConnectionError, OSError):
        return True
    return code == 421 and c.closed()


def test_slowloris_idle_and_dripping_clients_hit_limits_and_timeouts(tmp_path):
    conf = {**NO_DELIVERY, "smtp": {"max_connections_per_ip": 3, "command_timeout": 1.5}}
    with RelayProcess(tmp_path, conf) as r:
        idle = [RawClient(r.smtp_port, source="127.0.0.1") for _ in range(3)]
        for c in idle:
            assert c.reply()[0] == 220
        # The attacker's fourth connection is refused at once ...
        extra = RawClient(r.smtp_port, source="127.0.0.1")
        code, line = extra.reply()
        assert code == 421 and b"too many connections" in line
        # ... while a normal client elsewhere is served.
        normal_client_gets_through("127.0.0.2", r.smtp_port)
        # A client that drips a command one byte at a time does not reset the clock:
        # the command timeout covers the whole line.
        drip = RawClient(r.smtp_port, source="127.0.0.3")
        assert drip.reply()[0] == 220
        sent = 0
        try:
            for b in b"NOOP NOOP NOOP NOOP NOOP":
                drip.send(bytes([b]))
                sent += 1
                time.sleep(0.3)
        except OSError:
            pass
        code, line = drip.reply() if not drip.closed() or drip.buf else (421, drip.buf)
        assert code == 421 and b"4.4.2" in line
        assert sent < 24, "the dripping client was never cut off"
        # The idle ones are timed out too, and their slots come back.
        for c in idle:
            assert closed_with_421(c)
        again = RawClient(r.smtp_port, source="127.0.0.1")
        assert again.reply()[0] == 220
        assert r.stop() == 0
        assert "timeout after CONNECT" in r.log()


def test_half_open_tls_handshakes_hold_slots_only_until_the_handshake_timeout(tmp_path):
    """STARTTLS answered 220, then not one TLS byte: the slot is held until the
    handshake timeout (smtp.tls_handshake_timeout), then freed; others are served
    meanwhile."""
    conf = {**NO_DELIVERY, "smtp": {"max_connections_per_ip": 3, "command_timeout": 2,
                                    "tls_handshake_timeout": 3}}
    with RelayProcess(tmp_path, conf) as r:
        half = []
        for _ in range(3):
            c = RawClient(r.smtp_port, timeout=60, source="127.0.0.1")
            assert c.reply()[0] == 220
            c.send(b"EHLO h\r\n")
            assert c.reply()[0] == 250
            c.send(b"STARTTLS\r\n")
            assert c.reply()[0] == 220
            half.append(c)
        # A ClientHello's first bytes and then silence, on another address.
        partial = RawClient(r.smtp_port, timeout=60, source="127.0.0.4")
        partial.reply()
        partial.send(b"EHLO p\r\nSTARTTLS\r\n")
        partial.reply(), partial.reply()
        partial.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert RawClient(r.smtp_port, source="127.0.0.1").reply()[0] == 421
        normal_client_gets_through("127.0.0.2", r.smtp_port, tls=True)
        start = time.monotonic()
        wait_for(lambda: all(c.closed() for c in half + [partial]), 20,
                 "half-open handshakes to be dropped")
        waited = time.monotonic() - start
        again = RawClient(r.smtp_port, source="127.0.0.1")
        assert again.reply()[0] == 220
        print(f"\nhalf-open TLS slots freed after {waited:.1f}s")
        assert r.stop() == 0
        assert r.log().count("TLS handshake with [127.0.0.") >= 4


def _hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _stream(port: int, chunks, expect: int | tuple[int, ...] = 250) -> int:
    """Send one message whose content is produced chunk by chunk (never whole in
    this process either); returns the reply code."""
    c = RawClient(port, timeout=60)
    c.reply()
    c.send(b"EHLO big\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    for chunk in chunks:
        c.send(chunk)
    c.send(b"\r\n.\r\n")
    code, line = c.reply()
    c.send(b"QUIT\r\n")
    c.close()
    if isinstance(expect, int):
        expect = (expect,)
    assert code in expect, line
    return code


def _huge_header_block(total: int):
    line = b"X-Filler: " + b"h" * 980 + b"\r\n"
    n = total // len(line)
    for _ in range(n // 256):
        yield line * 256
    yield b"Subject: header bomb\r\n\r\nbody"


def _many_tiny_headers(total: int):
    block = b"X: y\r\n" * 10000
    for _ in range(total // len(block)):
        yield block
    yield b"\r\nbody"


def _mime_bomb(depth: int, fanout: int):
    """A nested multipart `depth` deep; each level repeats a `fanout`-part leaf."""
    yield b"Subject: mime bomb\r\nMIME-Version: 1.0\r\n"
    yield b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    for i in range(depth):
        yield b"--b%d\r\nContent-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n" % (i, i + 1)
    leaf = b"".join(b"--b%d\r\nContent-Type: text/plain\r\n\r\n" % depth + b"x" * 200 + b"\r\n"
                    for _ in range(fanout))
    for _ in range(50):
        yield leaf
    for i in range(depth, -1, -1):
        yield b"--b%d--\r\n" % i


@pytest.mark.parametrize("filters", [["size"], ["size", "headers"]], ids=["size", "headers"])
def test_huge_headers_and_mime_bombs_with_bounded_memory(tmp_path, filters):
    conf = {**NO_DELIVERY, "smtp": {"max_message_size": "40MiB"},
            "filters": [{"name": f} for f in filters]}
    with RelayProcess(tmp_path, conf) as r:
        pid = r.proc.pid
        normal_client_gets_through("127.0.0.2", r.smtp_port)
        base = _hwm_kib(pid)
        codes = [_stream(r.smtp_port, _huge_header_block(24 * 1024 * 1024), (250, 552, 554)),
                 _stream(r.smtp_port, _many_tiny_headers(8 * 1024 * 1024), (250, 552, 554)),
                 _stream(r.smtp_port, _mime_bomb(20000, 200), (250, 552, 554))]
        # Over the size limit: refused, after reading to the end, with bounded memory.
        code = _stream(r.smtp_port, _huge_header_block(48 * 1024 * 1024), expect=552)
        assert code == 552
        normal_client_gets_through("127.0.0.2", r.smtp_port)
        peak = _hwm_kib(pid)
        grown_mib = (peak - base) / 1024
        print(f"\nrelay peak RSS {peak / 1024:.0f} MiB, grew {grown_mib:.0f} MiB "
              f"over ~90 MiB of hostile input (filters {filters}); replies {codes} + 552")
        # Bounded: the DATA buffers (spill threshold 256 KiB per message), the 1 MiB
        # header block filters may edit, and slack; never the message sizes (24-48 MiB).
        assert grown_mib < 24, f"relay grew {grown_mib:.0f} MiB"
        assert r.stop() == 0


# --- password guessing ------------------------------------------------------------------

def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _smtp_auth_attempt(s: smtplib.SMTP, user: str, pw: str) -> tuple[int, float]:
    t = time.monotonic()
    code, _ = s.docmd("AUTH", "PLAIN " + _b64(f"\0{user}\0{pw}"))
    return code, time.monotonic() - t


def test_smtp_auth_brute_force_is_throttled_per_client(tmp_path):
    from relay.smtp.auth import hash_password
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret')}\n")
    conf = {**NO_DELIVERY, "auth": {"users_file": str(users)},
            "access": {"mynetworks": ["127.0.0.9/32"]}}
    ctx = ssl._create_unverified_context()
    with RelayProcess(tmp_path, conf) as r:
        with smtp_from("127.0.0.1", r.smtp_port) as s:
            s.ehlo("guess")
            s.starttls(context=ctx)
            s.ehlo("guess")
            times = []
            for pw in ("a", "b", "c"):
                code, took = _smtp_auth_attempt(s, "alice", pw)
                assert code == 535
                times.append(took)
        # Each failure doubles the wait before the next answer (1 s, 2 s, ...).
        assert times[2] >= 1.9, times
        # Another client is not punished for it, and the right password still works.
        with smtp_from("127.0.0.2", r.smtp_port) as s:
            s.ehlo("user")
            s.starttls(context=ctx)
            s.ehlo("user")
            code, took = _smtp_auth_attempt(s, "alice", "wrong")
            assert code == 535 and took < times[2]
            code, _ = _smtp_auth_attempt(s, "alice", "s3cret")
            assert code == 235
        assert r.stop() == 0
        assert r.log().count("authentication failed") == 4


def _pop3_relay(tmp_path):
    from relay.smtp.auth import hash_password
    from tests._relay import free_port
    port = free_port()
    conf = {**NO_DELIVERY, "quarantine": {
        "pop3_address": f"127.0.0.1:{port}",
        "users": [{"name": "bob", "password_hash": hash_password("bobpw"),
                   "addresses": ["bob@example.test"]},
                  {"name": "eve", "password_hash": hash_password("evepw"),
                   "addresses": ["eve@example.test"]}]}}
    return RelayProcess(tmp_path, conf), port


def test_pop3_brute_force_is_throttled_per_client(tmp_path):
    import poplib
    r, port = _pop3_relay(tmp_path)
    with r:
        from tests._relay import wait_port
        wait_port("127.0.0.1", port)
        times = []
        for tries in (3, 1):          # three on one connection, the fourth on a new one
            p = poplib.POP3("127.0.0.1", port, timeout=30)
            for _i in range(tries):
                p.user("bob")
                t = time.monotonic()
                with pytest.raises(poplib.error_proto):
                    p.pass_(f"guess{len(times)}")
                times.append(time.monotonic() - t)
            try:
                p.quit()
            except (poplib.error_proto, OSError):
                pass          # closed after too many failures: fine
        # The delay doubles with each failure (0.5 s, 1 s, 2 s ...), across connections.
        assert times[3] >= 1.9, times
        # Another address logs in at once with the right password.
        s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        f = s.makefile("rb")
        assert f.readline().startswith(b"+OK")
        s.sendall(b"USER bob\r\nPASS bobpw\r\n")
        assert f.readline().startswith(b"+OK")
        assert f.readline().startswith(b"+OK")
        s.close()
        assert r.stop() == 0
