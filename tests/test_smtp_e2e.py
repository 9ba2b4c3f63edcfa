"""Inbound SMTP end to end: the real relay process, real sockets, real clients.

Delivery is off in these tests, so what was accepted stays in the queue to be looked at.
"""

from __future__ import annotations

import concurrent.futures
import smtplib
import ssl
import subprocess
import sys
import time

import pytest

from tests._relay import ROOT, RawClient, RelayProcess, strip_trace

NO_DELIVERY = {"delivery": {"enabled": False}}


def cfg(**extra):
    out = {**NO_DELIVERY}
    out.update(extra)
    return out


@pytest.fixture
def relay(tmp_path):
    with RelayProcess(tmp_path, cfg()) as r:
        yield r


MESSAGE = (b"From: Alice <a@x.test>\r\nTo: b@y.test\r\nSubject: byte exact\r\n"
           b"Message-ID: <1@x.test>\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n"
           b"\r\ntrailing spaces   \r\n\xc3\xa9 8bit\r\n")


def test_accepted_message_lands_in_spool_byte_exact_with_envelope(relay):
    with smtplib.SMTP("127.0.0.1", relay.smtp_port) as s:
        code, caps = s.ehlo("client.test")
        for ext in (b"PIPELINING", b"SIZE", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES",
                    b"DSN"):
            assert ext in caps
        s.mail("a@x.test", ["BODY=8BITMIME", "RET=HDRS", "ENVID=Q+2Bx1"])
        s.rcpt("b@y.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@Y.test"])
        s.rcpt("c@y.test")
        code, msg = s.data(MESSAGE)
        assert code == 250 and msg.startswith(b"2.0.0 Ok: queued as ")
        qid = msg.split()[-1].decode()
    assert relay.stop() == 0
    queued = relay.queued()
    env, data = queued[qid]
    assert strip_trace(data) == MESSAGE
    assert data.startswith(b"Received: from client.test ([127.0.0.1])")
    assert f"id {qid}".encode() in data.split(b"\r\n\r\n")[0]
    assert env.sender == "a@x.test"
    assert [r.address for r in env.recipients] == ["b@y.test", "c@y.test"]
    # DSN parameters kept exactly as sent (case included).
    assert env.envid == "Q+2Bx1" and env.ret == "HDRS" and env.body == "8BITMIME"
    assert env.recipients[0].notify == "SUCCESS,FAILURE"
    assert env.recipients[0].orcpt == "rfc822;B@Y.test"
    assert env.client_ip == "127.0.0.1" and env.client_helo == "client.test"


def test_outside_client_cannot_relay_but_relay_domains_accepted(tmp_path):
    # mynetworks does not contain 127.0.0.1: this client is "outside".
    conf = cfg(access={"mynetworks": ["127.0.0.2/32"], "relay_domains": ["ours.test"]})
    with RelayProcess(tmp_path, conf) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("outside.test")
            s.mail("spammer@outside.test")
            code, msg = s.rcpt("victim@elsewhere.test")
            assert (code, msg) == (554, b"5.7.1 Relay access denied")
            assert s.rcpt("user@ours.test")[0] == 250
            assert s.rcpt("user@sub.ours.test")[0] == 554
        assert "Relay access denied" in r.log()


def test_default_config_is_not_an_open_relay():
    from relay.config import load
    cfg_ = load(None, environ={})
    assert [str(n) for n in cfg_.access.mynetworks] == ["127.0.0.0/8", "::1/128"]
    assert cfg_.access.relay_domains == ()
    for lst in cfg_.listeners:
        assert lst.address.host == "127.0.0.1"


def test_limits_give_the_right_codes(tmp_path):
    conf = cfg(smtp={"max_message_size": 2000, "max_recipients": 2})
    with RelayProcess(tmp_path, conf) as r:
        c = RawClient(r.smtp_port)
        assert c.reply()[0] == 220
        c.send(b"EHLO t\r\n")
        assert c.reply()[0] == 250
        c.send(b"MAIL FROM:<a@x.test> SIZE=5000\r\n")
        assert c.reply() == (552, b"552 5.3.4 Message size exceeds fixed maximum message size")
        c.send(b"MAIL FROM:<a@x.test> SIZE=100\r\n")
        assert c.reply()[0] == 250
        for i in range(2):
            c.send(b"RCPT TO:<r%d@y.test>\r\n" % i)
            assert c.reply()[0] == 250
        c.send(b"RCPT TO:<r9@y.test>\r\n")
        assert c.reply() == (452, b"452 4.5.3 Error: too many recipients")
        c.send(b"DATA\r\n")
        assert c.reply()[0] == 354
        c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 40 + b".\r\n")
        assert c.reply() == (552, b"552 5.3.4 Error: message too big for system")
        # A long command line and a long DATA line.
        c.send(b"NOOP " + b"x" * 5000 + b"\r\n")
        assert c.reply()[1].startswith(b"500 5.5.2")
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<r@y.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.send(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")
        assert c.reply()[1].startswith(b"500 5.5.2")
        c.send(b"QUIT\r\n")
        assert c.reply()[0] == 221


@pytest.mark.parametrize("address", [b"<a\rb@x.test>", b"<a\x00b@x.test>", b"<a@x.test\r>",
                                     b"<a@@x.test>", b"<" + b"l" * 65 + b"@x.test>",
                                     b"<a@" + b"d" * 64 + b".test>"])
def test_bad_envelope_addresses_refused(relay, address):
    c = RawClient(relay.smtp_port)
    c.reply()
    c.send(b"EHLO t\r\n")
    c.reply()
    c.send(b"MAIL FROM:" + address + b"\r\n")
    code, line = c.reply()
    assert code == 501, line
    c.send(b"MAIL FROM:<ok@x.test>\r\nRCPT TO:" + address + b"\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 501
    c.close()


def test_bare_lf_in_address_cannot_inject_a_command(relay):
    c = RawClient(relay.smtp_port)
    c.reply()
    c.send(b"EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test\nRSET>\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 250
    # The LF ends a (bad) command line; what follows is not a valid command either.
    codes = [c.reply()[0], c.reply()[0]]
    assert all(code >= 500 for code in codes)
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 554     # no valid recipient was taken


def test_pipelined_bytes_after_starttls_close_the_connection(relay):
    c = RawClient(relay.smtp_port)
    c.reply()
    c.send(b"EHLO x\r\n")
    code, _ = c.reply()
    assert code == 250
    c.send(b"EHLO x\r\nSTARTTLS\r\nRSET\r\n")
    assert c.reply()[0] == 250
    # No 220 for STARTTLS and never a 250 for the RSET: the connection just ends.
    time.sleep(0.3)
    assert c.closed()
    assert b"250" not in c.buf
    assert "pipelined after STARTTLS" in relay.log()


def _auth_setup(tmp_path):
    from relay.smtp.auth import hash_password
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret')}\n")
    return cfg(auth={"users_file": str(users)}, access={"mynetworks": ["127.0.0.2/32"]})


def test_auth_only_over_starttls_and_then_relaying_allowed(tmp_path):
    conf = _auth_setup(tmp_path)
    with RelayProcess(tmp_path, conf) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("t")
            assert s.has_extn("starttls")
            assert not s.has_extn("auth")
            code, msg = s.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==")
            assert (code, msg[:6]) == (538, b"5.7.11")
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("t")
            assert "PLAIN" in s.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login("alice", "wrong")
            assert e.value.smtp_code == 535
            s.login("alice", "s3cret")
            s.mail("alice@x.test")
            assert s.rcpt("anyone@elsewhere.test")[0] == 250
        log = r.log()
        assert "sasl_username=alice" in log


def test_submission_listener_requires_auth(tmp_path):
    conf = _auth_setup(tmp_path)
    port = __import__("tests._relay", fromlist=["free_port"]).free_port()
    conf["listeners"] = [{"name": "sub", "address": f"127.0.0.1:{port}", "role": "submission"}]
    with RelayProcess(tmp_path, conf) as r:
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.ehlo("t")
            code, msg = s.mail("a@x.test")
            assert (code, msg) == (530, b"5.7.0 Authentication required")
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("t")
            s.login("alice", "s3cret")
            assert s.mail("alice@x.test")[0] == 250
        assert r.stop() == 0


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n"]


@pytest.mark.parametrize("marker", SMUGGLING + [b"\n"])
def test_smuggling_variants_refused_without_extra_message(tmp_path, marker):
    with RelayProcess(tmp_path, cfg()) as r:
        c = RawClient(r.smtp_port)
        c.reply()
        c.send(b"EHLO t\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        c.send(b"Subject: one\r\n\r\nbody" + marker +
               b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\nNOOP\r\n")
        code, line = c.reply()
        assert line.startswith(b"550 5.5.2"), line
        assert c.reply()[0] == 250          # the NOOP: one message, then commands again
        c.send(b"QUIT\r\n")
        c.reply()
        assert r.stop() == 0
        assert r.queued() == {}


def test_proxy_protocol_sets_client_address(tmp_path):
    from tests._relay import free_port
    port = free_port()
    conf = cfg(proxy_protocol={"trusted": ["127.0.0.0/8"]},
               listeners=[{"name": "lb", "address": f"127.0.0.1:{port}", "proxy_protocol": True}])
    with RelayProcess(tmp_path, conf) as r:
        c = RawClient(port)
        c.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n")
        assert c.reply()[0] == 220
        c.send(b"EHLO far.test\r\nMAIL FROM:<a@far.test>\r\nRCPT TO:<b@elsewhere.test>\r\n")
        assert c.reply()[0] == 250 and c.reply()[0] == 250
        # 198.51.100.7 is not in mynetworks: no relaying for it, though the TCP peer
        # (the proxy) is loopback.
        assert c.reply()[0] == 554
        c.close()
        log = r.log()
        assert "client [198.51.100.7]" in log


def test_proxy_header_from_untrusted_peer_is_refused(tmp_path):
    from tests._relay import free_port
    port = free_port()
    conf = cfg(proxy_protocol={"trusted": ["127.0.0.9/32"]},
               listeners=[{"name": "lb", "address": f"127.0.0.1:{port}", "proxy_protocol": True}])
    with RelayProcess(tmp_path, conf) as r:
        c = RawClient(port)
        c.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
        time.sleep(0.3)
        assert c.closed() and b"220" not in c.buf
        assert "not a trusted proxy" in r.log()


def test_check_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    cases = {
        "listeners:\n  - name: a\n    address: 127.0.0.1:99999\n": "listeners[0].address",
        "access:\n  mynetworks: [10.0.0.0/33]\n": "access.mynetworks[0]",
        "access:\n  mynetworks: [0.0.0.0/0]\n": "open relay",
        "smtp:\n  max_recipients: many\n": "smtp.max_recipients",
        "smtpd:\n  x: 1\n": "smtpd: unknown key",
        "filters:\n  - name: nosuch\n": "filters[0].name",
    }
    for text, expected in cases.items():
        bad.write_text(text)
        p = subprocess.run([sys.executable, "-m", "relay", "check-config", str(bad)],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2, (text, p.stdout, p.stderr)
        assert expected in p.stderr, (text, p.stderr)
    good = tmp_path / "good.yaml"
    good.write_text((ROOT / "deploy" / "relay.example.yaml").read_text())
    p = subprocess.run([sys.executable, "-m", "relay", "check-config", str(good)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_serve_with_a_broken_config_starts_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - name: a\n    address: nonsense\n")
    p = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(bad)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert p.returncode == 2 and "listeners[0].address" in p.stderr
    assert not (tmp_path / "var").exists()


def test_env_override(tmp_path):
    from relay.config import ConfigError, load
    c = load(None, environ={"RELAY_SMTP__MAX_RECIPIENTS": "7", "RELAY_SPOOL__PATH": "/x"})
    assert c.smtp.max_recipients == 7 and c.spool.path == "/x"
    with pytest.raises(ConfigError, match="smtp.max_recipients"):
        load(None, environ={"RELAY_SMTP__MAX_RECIPIENTS": "lots"})


def test_sigkill_under_load_loses_no_accepted_message(tmp_path):
    """Many concurrent clients; SIGKILL mid-stream; restart: every message that got a
    250 is in the queue, intact."""
    r = RelayProcess(tmp_path, cfg())
    accepted: dict[str, bytes] = {}
    stop_at = time.monotonic() + 1.5

    def client(n: int) -> list[tuple[str, bytes]]:
        got = []
        i = 0
        try:
            with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
                s.ehlo("load")
                while True:
                    body = (b"Subject: load %d-%d\r\n\r\n" % (n, i)) + b"z" * (500 * (i % 7 + 1)) + b"\r\n"
                    s.mail("a@x.test")
                    s.rcpt("b@y.test")
                    code, msg = s.data(body)
                    if code == 250:
                        got.append((msg.split()[-1].decode(), body))
                    i += 1
        except Exception:  # noqa: BLE001 - killed under us
            pass
        return got

    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        futures = [ex.submit(client, n) for n in range(20)]
        while time.monotonic() < stop_at:
            time.sleep(0.05)
        r.proc.kill()
        r.proc.wait()
        for f in futures:
            for qid, body in f.result():
                accepted[qid] = body
    r._log.close()
    assert len(accepted) > 50, "too little load to prove anything"
    queued = r.queued()
    missing = [q for q in accepted if q not in queued]
    assert not missing, f"{len(missing)} of {len(accepted)} accepted messages lost"
    for qid, body in accepted.items():
        assert strip_trace(queued[qid][1]) == body
    # And the relay starts again on that spool and keeps it.
    r.start()
    assert r.stop() == 0
    assert set(accepted) <= set(r.queued())


def test_client_talking_before_the_greeting_is_refused(tmp_path):
    """As Postfix's postscreen pregreet test. A DNSBL lookup at connect that takes a
    while (its DNS never answers) gives the early talker time to show itself."""
    import socket

    from _dns import FakeDNS
    with FakeDNS(drop=["1.0.0.127.bl.test"]) as dns:
        conf = cfg(filters=[{"name": "dnsbl", "options": {
                       "zones": [{"zone": "bl.test"}], "skip_trusted": False}}],
                   delivery={"enabled": False, "resolvers": [f"{dns.host}:{dns.port}"],
                             "dns_timeout": 1})
        with RelayProcess(tmp_path, conf) as r:
            s = socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10)
            s.sendall(b"EHLO bot\r\nMAIL FROM:<a@x.test>\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            assert data.startswith(b"554 5.5.1"), data
            assert b"250" not in data
            # A client that waits for the greeting is served normally.
            with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as c:
                assert c.ehlo()[0] == 250


def test_check_config_refuses_a_malformed_password_hash(tmp_path):
    from relay.config import ConfigError, load
    bad = tmp_path / "bad.yaml"
    bad.write_text("quarantine:\n  users:\n    - {name: bob, password_hash: secret}\n")
    with pytest.raises(ConfigError, match=r"quarantine.users\[0\].password_hash"):
        load(bad, environ={})
