"""Named security regressions, each through the real relay process over real sockets.

Inbound smuggling variants, STARTTLS injection on SMTP, the basic open-relay checks and
an untrusted PROXY peer are in test_smtp_e2e.py; this file adds what crosses parts:
outbound smuggling (what the next hop really receives), STARTTLS command injection on
POP3, STARTTLS response injection against our SMTP client, open relay through forged
PROXY headers, header/envelope injection into stored headers, forged
Authentication-Results, the DKIM l= append attack, and quarantine cross-user access.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import pytest

from tests._relay import RawClient, RelayProcess, free_port, strip_trace, wait_port
from tests._security import RawHop, relay_config, wait_for

NO_DELIVERY = {"delivery": {"enabled": False}}


def _raw_session(port: int, body: bytes, helo: bytes = b"t") -> tuple[int, bytes]:
    c = RawClient(port)
    c.reply()
    c.send(b"EHLO " + helo + b"\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    codes = [c.reply()[0] for _ in range(4)]
    assert codes == [250, 250, 250, 354], codes
    c.send(body)
    out = c.reply()
    c.send(b"QUIT\r\n")
    c.close()
    return out


# --- SMTP smuggling, outbound -------------------------------------------------------------

SMUGGLE = (b"Subject: smuggle\r\n\r\nbefore\r\n.\rMAIL FROM:<evil@x.test>\r\n"
           b"RCPT TO:<victim@y.test>\r\nDATA\r\nSubject: smuggled-1\r\n\r\nx\n.\n"
           b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
           b"Subject: smuggled-2\r\n\r\ny\r\n.\rRSET\r\nSubject: smuggled-3\r\n\n.\r\n"
           b"after\r\n.\r\n")


def test_outbound_smuggling_cannot_split_at_the_next_hop(tmp_path):
    """bare_newline: normalize takes a message full of `\\r.\\r`, `\\n.\\n`, `\\r\\n.\\r`
    and `\\n.\\r\\n`; what the next hop receives is CRLF-clean, dot-stuffed, and one
    message: no line of it is a lone '.' before the real end."""
    with RawHop(lambda c, n, h: h.good_session(c, n)) as hop:
        conf = relay_config(hop.port, smtp={"bare_newline": "normalize"})
        with RelayProcess(tmp_path, conf) as r:
            code, line = _raw_session(r.smtp_port, SMUGGLE)
            assert code == 250, line
            wait_for(lambda: len(hop.delivered) >= 1, 20, "delivery")
            time.sleep(0.5)
            assert r.stop() == 0
        # A strict next hop parsed one transaction: the would-be commands stayed text.
        assert len(hop.delivered) == 1
        assert hop.commands == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
        data = hop.delivered[0]
        # CRLF only; the only lone-dot line is the final one.
        assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
        lines = data.split(b"\r\n")
        assert lines[-2:] == [b".", b""]
        assert b"." not in lines[:-2]
        # The would-be commands are message text (dot-stuffed where they start with '.').
        assert b"RCPT TO:<victim@y.test>" in data and b"Subject: smuggled-3" in data


# --- STARTTLS command injection, POP3 ------------------------------------------------------

def _pop3_relay(tmp_path, users):
    port = free_port()
    conf = {**NO_DELIVERY, "quarantine": {"pop3_address": f"127.0.0.1:{port}",
                                          "users": users}}
    r = RelayProcess(tmp_path, conf)
    wait_port("127.0.0.1", port)
    return r, port


def _users():
    from relay.smtp.auth import hash_password
    return [{"name": "bob", "password_hash": hash_password("bobpw"),
             "addresses": ["bob@example.test"]},
            {"name": "eve", "password_hash": hash_password("evepw"),
             "addresses": ["eve@example.test"]}]


def test_pop3_starttls_command_injection_is_discarded(tmp_path):
    r, port = _pop3_relay(tmp_path, _users())
    with r:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert s.recv(1024).startswith(b"+OK")
        # The injected USER/PASS ride in clear text behind STLS: a MITM could add them.
        s.sendall(b"STLS\r\nUSER eve\r\nPASS evepw\r\n")
        buf = b""
        while b"\r\n" not in buf:
            buf += s.recv(1024)
        assert buf.startswith(b"+OK")
        tls = ssl._create_unverified_context().wrap_socket(s)
        tls.sendall(b"STAT\r\n")
        reply = tls.recv(1024)
        # Not logged in: the injected commands were never executed over TLS.
        assert reply.startswith(b"-ERR"), reply
        tls.sendall(b"QUIT\r\n")
        tls.close()
        assert r.stop() == 0
        assert "user=eve" not in r.log().replace("user='eve'", "")


# --- STARTTLS response injection, outbound ---------------------------------------------

def injecting_hop(conn, n, hop):
    """Answers STARTTLS with 220 plus injected plaintext replies in the same packet."""
    if n > 0:
        return hop.good_session(conn, n)
    buf = bytearray()
    conn.sendall(b"220 evil.test ESMTP\r\n")
    hop.recv_line(conn, n, buf)
    conn.sendall(b"250-evil.test\r\n250 STARTTLS\r\n")
    hop.recv_line(conn, n, buf)
    conn.sendall(b"220 go ahead\r\n250-evil.test\r\n250 AUTH PLAIN\r\n")
    time.sleep(1)


def test_starttls_response_injection_against_our_client(tmp_path):
    with RawHop(injecting_hop) as hop:
        conf = relay_config(hop.port, delivery={"command_timeout": 2, "data_timeout": 2})
        with RelayProcess(tmp_path, conf) as r:
            with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
                s.sendmail("a@x.test", ["b@y.test"], b"Subject: inj\r\nX-Test-Id: inj\r\n\r\nx\r\n")
            wait_for(lambda: len(hop.delivered) >= 1, 30, "delivery on a clean session")
            time.sleep(0.5)
            log = r.log()
            assert r.stop() == 0
        # The first session was abandoned (the injected lines were never read as replies:
        # no MAIL went out on it), the message went out once on a fresh connection.
        assert b"MAIL FROM" not in bytes(hop.received[0])
        assert "response injection" in log
        assert len(hop.delivered) == 1


# --- open relay -----------------------------------------------------------------------

def test_untrusted_address_cannot_relay_even_with_a_forged_proxy_header(tmp_path):
    port = free_port()
    conf = {**NO_DELIVERY, "access": {"mynetworks": ["127.0.0.1/32"]},
            "proxy_protocol": {"trusted": ["127.0.0.3/32"]},
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{port}"}]}
    with RelayProcess(tmp_path, conf) as r:
        # 127.0.0.2 is outside mynetworks; on a listener without PROXY protocol the
        # header is just a bad command, and it changes nothing.
        s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        c = RawClient.__new__(RawClient)
        c.sock, c.buf = s, b""
        assert c.reply()[0] == 220
        c.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 4000 25\r\nEHLO x\r\nMAIL FROM:<a@x.test>\r\n"
               b"RCPT TO:<victim@elsewhere.test>\r\n")
        codes = [c.reply()[0] for _ in range(4)]
        assert codes[0] >= 500 and codes[1:3] == [250, 250] and codes[3] == 554, codes
        c.close()
        assert r.stop() == 0
    # A trusted proxy's client cannot smuggle a second header claiming to be local.
    port2 = free_port()
    conf2 = {**NO_DELIVERY, "access": {"mynetworks": ["127.0.0.1/32"]},
             "proxy_protocol": {"trusted": ["127.0.0.3/32"]},
             "listeners": [{"name": "lb", "address": f"127.0.0.1:{port2}",
                            "proxy_protocol": True}]}
    sub = tmp_path / "lb"
    sub.mkdir()
    with RelayProcess(sub, conf2) as r:
        s = socket.create_connection(("127.0.0.1", port2), source_address=("127.0.0.3", 0))
        c = RawClient.__new__(RawClient)
        c.sock, c.buf = s, b""
        c.send(b"PROXY TCP4 198.51.100.9 127.0.0.1 4000 25\r\n")
        assert c.reply()[0] == 220
        c.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 4000 25\r\nEHLO x\r\nMAIL FROM:<a@x.test>\r\n"
               b"RCPT TO:<victim@elsewhere.test>\r\n")
        codes = [c.reply()[0] for _ in range(4)]
        assert codes[0] >= 500 and codes[3] == 554, codes
        c.close()
        assert r.stop() == 0
        assert "client [198.51.100.9]" in r.log()


# --- header and envelope injection ------------------------------------------------------

def _header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def test_cr_lf_nul_from_the_client_never_reach_a_stored_header(tmp_path):
    from relay.smtp.auth import hash_password
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('pw')}\n")
    conf = {**NO_DELIVERY, "auth": {"users_file": str(users)}}
    with RelayProcess(tmp_path, conf) as r:
        c = RawClient(r.smtp_port)
        c.reply()
        for helo in (b"evil\x00X-Injected: nul", b"evil\rX-Injected: cr", b"a\x0bb"):
            c.send(b"EHLO " + helo + b"\r\n")
            assert c.reply()[0] == 501
        # TAB is tolerated in arguments but never makes it into the header as is.
        c.send(b"EHLO evil\tX-Injected:(tab)\"q\"\\\r\n")
        assert c.reply()[0] == 250
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.send(b"Subject: inj\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert c.reply()[0] == 250
        c.close()
        # AUTH names with CR/LF/NUL are refused before they reach a log or header.
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("t")
            # smtplib sends its host name as SNI: make it one we can look for later.
            s._host = "sni-probe.evil.test"
            s.starttls(context=_sni_context())
            s.ehlo("t")
            for name in ("alice\r\nX-Injected: 1", "alice\x00", "al\nice"):
                raw = base64.b64encode(f"\0{name}\0pw".encode()).decode()
                code, _ = s.docmd("AUTH", "PLAIN " + raw)
                assert code == 501, name
            login = base64.b64encode(b"alice\r\nX-Injected: 2").decode()
            code, _ = s.docmd("AUTH", "LOGIN " + login)
            assert code in (334, 501)
            if code == 334:
                code, _ = s.docmd(base64.b64encode(b"pw").decode())
                assert code == 501
            s.login("alice", "pw")
            s.sendmail("alice@x.test", ["b@y.test"], b"Subject: tls\r\n\r\nbody\r\n")
        assert r.stop() == 0
        log = r.log()
    queued = r.queued()
    assert len(queued) == 2
    for _, msg in queued.values():
        head = _header_block(msg)
        for line in head.split(b"\r\n"):
            # Every header line: printable ASCII, folded lines start with a TAB.
            assert all(0x20 <= b < 0x7f or b == 0x09 for b in line), line
            assert not line.lower().startswith(b"x-injected")
        received = head.split(b"\r\n")[0]
        assert b"\t" not in received and b"\x00" not in received
        # SNI is never trusted into a header.
        assert b"sni-probe" not in msg
    assert "\x00" not in log and "X-Injected: 1" not in log


def _sni_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


FORGED = [
    b"Authentication-Results: relay.test; dkim=pass header.d=bank.test",
    b"authentication-results:relay.test;spf=pass",
    b"Authentication-Results: RELAY.TEST.; dmarc=pass",
    b"Authentication-Results: (looks legit) relay.test 1; dkim=pass",
    b'Authentication-Results: "relay.test"; dkim=pass',
    b"Authentication-Results : relay.test;\r\n\tdkim=pass header.d=bank.test",
]


def test_forged_authentication_results_are_removed(tmp_path):
    with RelayProcess(tmp_path, NO_DELIVERY) as r:
        head = b"\r\n".join(FORGED) + b"\r\n"
        other = b"Authentication-Results: mx.other.test; spf=fail\r\n"
        msg = b"From: a@x.test\r\n" + head + other + b"Subject: ar\r\n\r\nbody\r\n"
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.sendmail("a@x.test", ["b@y.test"], msg)
        assert r.stop() == 0
    (env, stored), = r.queued().values()
    kept = _header_block(strip_trace(stored))
    assert b"relay.test" not in kept.lower().replace(b"relay.test (relay)", b"")
    # Another server's results are not ours to judge: they stay.
    assert other.rstrip() in kept


def test_forged_authentication_results_after_a_huge_header_block(tmp_path):
    with RelayProcess(tmp_path, NO_DELIVERY) as r:
        filler = (b"X-Filler: " + b"f" * 900 + b"\r\n") * 1200      # ~1.1 MiB
        msg = (b"From: a@x.test\r\n" + filler + FORGED[0] + b"\r\nSubject: big\r\n\r\nbody\r\n")
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            # A header section beyond what filters may read is refused, so a forged
            # header can never hide behind it.
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("a@x.test", ["b@y.test"], msg)
            assert e.value.smtp_code == 552
        assert r.stop() == 0
    assert r.queued() == {}


# --- DKIM l= append, through the relay with the dkim filter ----------------------------

def test_dkim_l_tag_append_is_not_a_pass_through_the_relay(tmp_path):
    dkim = pytest.importorskip("dkim")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests._mailauth import Dnsmasq
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    txt = {"s1._domainkey.bank.test": [f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}"]}
    original = (b"From: Bank <alerts@bank.test>\r\nTo: b@y.test\r\nSubject: statement\r\n"
                b"Message-ID: <s@bank.test>\r\n\r\nYour statement is ready.\r\n")
    signed = dkim.sign(original, b"s1", b"bank.test", pem, length=True,
                       canonicalize=(b"relaxed", b"relaxed")) + original
    evil = signed + b"Click http://phish.example/ and confirm your password.\r\n"
    with Dnsmasq(txt, zones=["test"]) as d:
        conf = {**NO_DELIVERY, "access": {"mynetworks": ["127.0.0.9/32"],
                                          "relay_domains": ["y.test"]},
                "delivery": {"enabled": False, "resolvers": [f"127.0.0.1:{d.port}"],
                             "dns_timeout": 2},
                "filters": [{"name": "size"}, {"name": "dkim"}]}
        with RelayProcess(tmp_path, conf) as r:
            with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
                s.sendmail("alerts@bank.test", ["b@y.test"], signed)
                s.sendmail("alerts@bank.test", ["b@y.test"], evil)
            assert r.stop() == 0
    results = {}
    for _, msg in r.queued().values():
        head = _header_block(msg)
        ar = [ln for ln in _unfold(head) if ln.lower().startswith(b"authentication-results")]
        results[b"phish.example" in msg] = b" ".join(ar)
    assert b"dkim=pass" in results[False]            # the honest message verifies
    assert b"dkim=pass" not in results[True]          # the appended one never does
    assert b"dkim=" in results[True]


def _unfold(head: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b" " + line.strip()
        else:
            out.append(line)
    return out
