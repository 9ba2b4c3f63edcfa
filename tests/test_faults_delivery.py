"""Fault injection on the outbound side: broken next hops, broken DNS, broken TLS.

The real relay runs as a process and delivers to a scripted next hop on loopback. Each
fault hits the first connection(s) only; the test then proves the message was deferred
(not bounced, not lost), retried, and delivered exactly once. Each run prints a TALLY
line (pytest -s) that SECURITY.md's table is filled from.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests._dns import FakeDNS
from tests._relay import RelayProcess
from tests._security import RawHop, relay_config, send, tally, wait_for

FAST_TIMEOUTS = {"command_timeout": 1.5, "data_timeout": 1.5, "connect_timeout": 2}


def _ids(raw: list[bytes]) -> dict[str, int]:
    from collections import Counter

    from tests._security import TAG
    return Counter(m.group(1).decode() for d in raw if (m := TAG.search(d)))


def _until_data(conn: socket.socket, n: int, hop: RawHop, buf: bytearray) -> None:
    """Greet and answer up to the 354 of DATA."""
    conn.sendall(b"220 hop.test ESMTP\r\n")
    while True:
        line = hop.recv_line(conn, n, buf)
        if line[:4].upper() == b"EHLO":
            conn.sendall(b"250-hop.test\r\n250 8BITMIME\r\n")
        elif line[:4].upper() == b"DATA":
            conn.sendall(b"354 go ahead\r\n")
            return
        else:
            conn.sendall(b"250 ok\r\n")


def _read_message(conn: socket.socket, n: int, hop: RawHop, buf: bytearray) -> None:
    data = bytearray()
    while not data.endswith(b"\r\n.\r\n"):
        data += hop.recv_line(conn, n, buf)


def stall_mid_data(conn, n, hop):
    if n > 0:
        return hop.good_session(conn, n)
    buf = bytearray()
    _until_data(conn, n, hop, buf)
    # Take half the message, then stop reading and never answer.
    conn.recv(100)
    time.sleep(6)


def reset_mid_data(conn, n, hop):
    if n > 0:
        return hop.good_session(conn, n)
    buf = bytearray()
    _until_data(conn, n, hop, buf)
    conn.recv(50)
    # SO_LINGER 0: close sends a TCP RST, not a FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def garbage_after_data(conn, n, hop):
    if n > 0:
        return hop.good_session(conn, n)
    buf = bytearray()
    _until_data(conn, n, hop, buf)
    _read_message(conn, n, hop, buf)
    conn.sendall(b"\x00\xffHELLO? this is not SMTP\r\n")
    time.sleep(0.5)


def garbage_greeting(conn, n, hop):
    if n > 0:
        return hop.good_session(conn, n)
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n" + b"A" * 5000 + b"\r\n")
    time.sleep(0.5)


def tls_never_completes(conn, n, hop):
    """Advertises STARTTLS, says 220, then never sends a TLS byte back."""
    if n > 0:
        return hop.good_session(conn, n)
    buf = bytearray()
    conn.sendall(b"220 hop.test ESMTP\r\n")
    hop.recv_line(conn, n, buf)
    conn.sendall(b"250-hop.test\r\n250 STARTTLS\r\n")
    hop.recv_line(conn, n, buf)
    conn.sendall(b"220 go ahead\r\n")
    time.sleep(6)          # the ClientHello arrives and is never answered


@pytest.mark.parametrize("script", [stall_mid_data, reset_mid_data, garbage_after_data,
                                    garbage_greeting],
                         ids=lambda f: f.__name__)
def test_broken_next_hop_defers_then_delivers_once(tmp_path, script):
    with RawHop(script) as hop:
        conf = relay_config(hop.port, delivery=FAST_TIMEOUTS)
        with RelayProcess(tmp_path, conf) as r:
            accepted = send(r.smtp_port, ["m1"])
            assert set(accepted) == {"m1"}
            qid = accepted["m1"]
            wait_for(lambda: len(hop.delivered) >= 1, 40, "delivery after the fault")
            time.sleep(1.0)          # room for a (wrong) second delivery to show up
            log = r.log()
            assert r.stop() == 0
        # The first attempt failed and was deferred (never bounced), the retry went on a
        # new connection, and the message was delivered exactly once.
        assert hop.connections >= 2
        assert f"{qid}: to=<b@y.test>" in log and "status=deferred" in log, log[-3000:]
        assert "status=bounced" not in log
        delivered = _ids(hop.delivered)
        assert delivered == {"m1": 1}
        # The queue is empty afterwards: nothing left to deliver again.
        assert r.queued() == {}
        tally(f"next hop: {script.__name__}", 1, set(accepted), delivered)


def test_outbound_tls_handshake_that_never_completes(tmp_path):
    """Opportunistic TLS ('may') gives up after the command timeout and delivers in
    plaintext on a new connection (Postfix's way); 'encrypt' defers and never sends the
    message in the clear."""
    with RawHop(tls_never_completes) as hop:
        with RelayProcess(tmp_path, relay_config(hop.port, delivery=FAST_TIMEOUTS)) as r:
            accepted = send(r.smtp_port, ["t1"])
            wait_for(lambda: len(hop.delivered) >= 1, 30, "plaintext delivery")
            time.sleep(1.0)
            log = r.log()
            assert r.stop() == 0
        assert "failed" in log and "retrying in plaintext" in log
        delivered = _ids(hop.delivered)
        assert delivered == {"t1": 1}
        tally("next hop: TLS handshake never completes (may)", 1, set(accepted), delivered)

    def always_stall(conn, n, hop):
        tls_never_completes(conn, 0, hop)

    with RawHop(always_stall) as hop:
        conf = relay_config(hop.port, delivery={**FAST_TIMEOUTS, "tls_policy": "encrypt"})
        enc = tmp_path / "enc"
        enc.mkdir()
        with RelayProcess(enc, conf) as r:
            accepted = send(r.smtp_port, ["t2"])
            qid = accepted["t2"]
            wait_for(lambda: r.log().count(f"{qid}: to=<b@y.test>") >= 2, 30, "two deferrals")
            log = r.log()
            assert r.stop() == 0
        assert "status=deferred" in log and "status=bounced" not in log
        assert hop.delivered == [] and all(b"X-Test-Id" not in d for d in hop.received)
        # Still queued, for the day the next hop's TLS works.
        queued = r.queued()
        assert qid in queued
        tally("next hop: TLS handshake never completes (encrypt)", 1, set(accepted),
              _ids(hop.delivered), queued={"t2"})


def _dns_config(dns_port: int, hop_port: int, **delivery) -> dict:
    return {"delivery": {"resolvers": [f"127.0.0.1:{dns_port}"], "dns_timeout": 1,
                         "smtp_port": hop_port, "retry_schedule": [0.5], "retry_jitter": 0.0,
                         "mta_sts": False, "helo_name": "relay.test", **FAST_TIMEOUTS,
                         **delivery}}


@pytest.mark.parametrize("fault", ["servfail", "drop"])
def test_dns_failure_defers_not_bounces_then_delivers(tmp_path, fault):
    records = {("y.test", "MX"): ["10 mx.y.test."], ("mx.y.test", "A"): ["127.0.0.1"]}
    with RawHop(lambda c, n, h: h.good_session(c, n)) as hop, \
            FakeDNS(records, **{fault: {"y.test"}}) as dns:
        with RelayProcess(tmp_path, _dns_config(dns.port, hop.port)) as r:
            accepted = send(r.smtp_port, ["d1"])
            qid = accepted["d1"]
            # At least two attempts hit the broken DNS.
            wait_for(lambda: r.log().count(f"{qid}: to=<b@y.test>") >= 2, 30,
                     "two deferred attempts")
            assert hop.connections == 0
            log = r.log()
            assert "status=deferred" in log and "status=bounced" not in log
            # DNS recovers: the next retry delivers.
            getattr(dns, fault).clear()
            wait_for(lambda: len(hop.delivered) >= 1, 30, "delivery after DNS recovered")
            time.sleep(1.0)
            log = r.log()
            assert r.stop() == 0
        assert "status=bounced" not in log
        # No DSN was made for a temporary DNS failure.
        assert "DSN" not in log or "sender non-delivery DSN" not in log
        delivered = _ids(hop.delivered)
        assert delivered == {"d1": 1}
        assert r.queued() == {}
        tally(f"DNS {fault}", 1, set(accepted), delivered)
