"""POP3 server over real loopback sockets with Python's poplib (and a raw socket for
what poplib will not send)."""

from __future__ import annotations

import poplib
import socket
import ssl
import time

import pytest
from _pop3 import TLS, LoopThread, envelope, make_store, message

from relay.metrics import MAILBOX_LOGINS, QUARANTINE_DELETES
from relay.quarantine.pop3.server import HIDDEN, start_pop3
from relay.quarantine.store import INBOX

BODY = b".leading dot\r\nline two\r\n..two dots\r\n.\r\nlast\r\n"


class Harness:
    def __init__(self, tmp_path, **cfg):
        self.lt = LoopThread()
        self.store = make_store(tmp_path, **cfg)
        self.tls = TLS()
        self.servers = []
        self.qids = []

    def put(self, *rcpts, subject="hello", body=BODY, mailbox="spam"):
        qid = self.lt.run(self.store.put(envelope(*rcpts), message(subject, body), mailbox,
                                         "spamfilter", "score 12"))
        self.qids.append(qid)
        return qid

    def serve(self, implicit_tls=False, starttls=True, **kw) -> int:
        ctx = self.tls.server if (implicit_tls or starttls) else None

        async def go():
            return await start_pop3(self.store.cfg, self.store, ctx, "127.0.0.1", 0,
                                    implicit_tls=implicit_tls, **kw)
        srv = self.lt.run(go())
        self.servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    def stored(self, user, n=0, folder=INBOX) -> bytes:
        f = self.store.folder(user, folder)
        return f.read(f.messages[n])

    def close_server(self, srv) -> None:
        async def shut():
            srv.close()     # on the server's own loop: asyncio servers are not thread-safe
        self.lt.run(shut())

    def close(self):
        for s in self.servers:
            self.close_server(s)
        self.lt.stop()


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def login(port, user="bob", pw="bobpw") -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user(user)
    p.pass_(pw)
    return p


def login_when_free(port, user="bob", pw="bobpw") -> poplib.POP3:
    # The server notices a dropped connection a moment later; until then the maildrop
    # is still locked (RFC 1939 section 8), which is right.
    for _ in range(200):
        try:
            return login(port, user, pw)
        except poplib.error_proto as e:
            if b"IN-USE" not in e.args[0]:
                raise
        time.sleep(0.05)
    raise AssertionError("maildrop stayed locked")


def test_stat_list_uidl_retr_top_byte_exact(h):
    h.put("bob@example.test", subject="one")
    h.put("bob@example.test", "x@carol.test", subject="two")
    port = h.serve()
    p = login(port)
    count, size = p.stat()
    assert count == 2
    stored = [h.stored("bob", 0), h.stored("bob", 1)]
    assert size == sum(len(s) for s in stored)
    resp, lines, _ = p.list()
    assert lines == [f"{i + 1} {len(s)}".encode() for i, s in enumerate(stored)]
    resp, uids, _ = p.uidl()
    uid_values = [u.split()[1] for u in uids]
    f = h.store.folder("bob", INBOX)
    assert uid_values == [m.base.encode() for m in f.messages]
    # RETR: poplib unstuffs the dots; the lines joined with CRLF are the stored bytes
    for i, s in enumerate(stored):
        resp, lines, octets = p.retr(i + 1)
        assert resp == f"+OK {len(s)} octets".encode()
        assert b"\r\n".join(lines) + b"\r\n" == s
        assert b"Subject: " + (b"one" if i == 0 else b"two") in s
        assert s.endswith(message("x", BODY)[-len(BODY):])
    resp, lines, _ = p.top(1, 0)
    head = stored[0].split(b"\r\n\r\n", 1)[0]
    assert b"\r\n".join(lines) == head + b"\r\n"
    resp, lines, _ = p.top(1, 2)
    assert lines[-2:] == [b".leading dot", b"line two"]
    assert p.noop().startswith(b"+OK")
    p.quit()


def test_uidl_stable_across_sessions_and_server_restart(h, tmp_path):
    h.put("bob@example.test")
    h.put("bob@example.test")
    p = login(h.serve())
    first = p.uidl()[1]
    p.quit()
    h.close_server(h.servers[0])
    h2 = Harness(tmp_path)          # a new store object on the same directory
    try:
        p = login(h2.serve())
        assert p.uidl()[1] == first
        p.quit()
    finally:
        h2.close()


def test_dele_rset_quit_discards(h):
    q1 = h.put("bob@example.test")
    q2 = h.put("bob@example.test")
    port = h.serve()
    before = QUARANTINE_DELETES.labels(via="pop3")._value.get()
    p = login(port)
    p.dele(1)
    assert p.stat()[0] == 1
    with pytest.raises(poplib.error_proto):
        p.retr(1)
    p.rset()
    assert p.stat()[0] == 2
    p.dele(1)
    p.quit()
    # bob's copy is gone; the admin's copy still holds the message
    assert [m.qid for m in h.store.folder("bob", INBOX).messages] == [q2]
    assert h.store.meta(q1) is not None
    p = login(port, "admin", "adminpw")
    assert p.stat()[0] == 2
    p.dele(1)
    p.quit()
    assert h.store.meta(q1) is None        # last copy gone: discarded
    assert QUARANTINE_DELETES.labels(via="pop3")._value.get() == before + 1
    # a connection dropped without QUIT deletes nothing (RFC 1939 section 6)
    p = login(port)
    p.dele(1)
    p.close()                              # no QUIT
    p = login_when_free(port)
    assert p.stat()[0] == 1
    p.quit()


def test_hide_mode_only_hides_from_pop3(tmp_path):
    h = Harness(tmp_path, pop3_delete="hide")
    try:
        qid = h.put("bob@example.test")
        port = h.serve()
        p = login(port)
        p.dele(1)
        p.quit()
        f = h.store.folder("bob", INBOX)
        assert [m.qid for m in f.messages] == [qid]       # still there for IMAP
        assert HIDDEN in f.messages[0].flags
        p = login(port)
        assert p.stat() == (0, 0)
        p.quit()
    finally:
        h.close()


def test_users_see_only_their_own_mail(h):
    h.put("bob@example.test", subject="for-bob")
    h.put("x@carol.test", subject="for-carol")
    port = h.serve()
    p = login(port, "carol", "carolpw")
    assert p.stat()[0] == 1
    text = b"\r\n".join(p.retr(1)[1])
    assert b"for-carol" in text and b"for-bob" not in text
    for bad in (b"RETR 2", b"RETR 0", b"TOP 2 0", b"LIST 2", b"UIDL 2", b"DELE 2",
                b"RETR ../bob/1", b"RETR -1"):
        with pytest.raises(poplib.error_proto):
            p._shortcmd(bad.decode())
    p.quit()
    # admin sees both (from its per-reason folder), each once
    p = login(port, "admin", "adminpw")
    assert p.stat()[0] == 2
    p.quit()


def test_bad_commands_get_err_and_session_stays_sane(h):
    h.put("bob@example.test")
    port = h.serve()
    before = MAILBOX_LOGINS.labels(protocol="pop3", result="failure")._value.get()
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.user("bob")
    with pytest.raises(poplib.error_proto, match="AUTH"):
        p.pass_("wrong")
    assert MAILBOX_LOGINS.labels(protocol="pop3", result="failure")._value.get() == before + 1
    for bad in ("FOO", "STAT", "LIST", "RETR 1", "NOOP"):
        with pytest.raises(poplib.error_proto):
            p._shortcmd(bad)
    p.user("bob")
    p.pass_("bobpw")
    assert p.stat()[0] == 1
    for bad in ("RETR x", "TOP 1", "USER bob", "XYZZY " + "a" * 300):
        with pytest.raises(poplib.error_proto):
            p._shortcmd(bad)
    assert p.stat()[0] == 1
    p.quit()


def test_line_too_long_and_error_limit(h):
    port = h.serve()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"+OK")
        s.sendall(b"X" * 5000 + b"\r\nCAPA\r\n")
        assert f.readline() == b"-ERR line too long\r\n"
        assert f.readline().startswith(b"+OK")
        caps = []
        while (line := f.readline()) != b".\r\n":
            caps.append(line)
        assert b"UIDL\r\n" in caps and b"TOP\r\n" in caps and b"STLS\r\n" in caps
        for _ in range(20):
            s.sendall(b"BOGUS\r\n")
            line = f.readline()
            if not line or b"too many errors" in line:
                break
            assert line.startswith(b"-ERR")
        assert b"too many errors" in line
        assert f.readline() == b""            # closed


def test_cleartext_login_refused_off_loopback_until_stls(h):
    h.put("bob@example.test")
    port = h.serve(cleartext_login=False)
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    assert "STLS" in p.capa()
    assert "USER" not in p.capa()
    with pytest.raises(poplib.error_proto, match="STLS"):
        p.user("bob")
    p.stls(h.tls.client)
    assert isinstance(p.sock, ssl.SSLSocket)
    assert "USER" in p.capa() and "STLS" not in p.capa()
    p.user("bob")
    p.pass_("bobpw")
    assert p.stat()[0] == 1
    assert b"\r\n".join(p.retr(1)[1]) + b"\r\n" == h.stored("bob")
    p.quit()


def test_stls_discards_pipelined_cleartext(h):
    port = h.serve(cleartext_login=False)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"STLS\r\nUSER bob\r\n")        # the injected command rides in clear
    assert f.readline().startswith(b"+OK")
    tls = h.tls.client.wrap_socket(raw, server_hostname="127.0.0.1")
    tf = tls.makefile("rb")
    tls.sendall(b"PASS bobpw\r\n")
    assert tf.readline() == b"-ERR USER first\r\n"
    tls.close()


def test_implicit_tls(h):
    h.put("bob@example.test")
    port = h.serve(implicit_tls=True, cleartext_login=False)
    p = poplib.POP3_SSL("127.0.0.1", port, context=h.tls.client, timeout=10)
    assert "STLS" not in p.capa()
    p.user("bob")
    p.pass_("bobpw")
    assert p.stat()[0] == 1
    p.quit()


def test_auth_plain_and_in_use(h):
    import base64
    port = h.serve()
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    token = base64.b64encode(b"\0bob\0bobpw").decode()
    assert p._shortcmd("AUTH PLAIN " + token).startswith(b"+OK")
    q = poplib.POP3("127.0.0.1", port, timeout=10)
    q.user("bob")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        q.pass_("bobpw")
    p.quit()
    q.user("bob")
    q.pass_("bobpw")
    q.quit()


def test_connections_per_ip_limit(tmp_path):
    h = Harness(tmp_path, max_connections_per_ip=2)
    try:
        port = h.serve()
        a = poplib.POP3("127.0.0.1", port, timeout=10)
        b = poplib.POP3("127.0.0.1", port, timeout=10)
        with pytest.raises(poplib.error_proto, match="too many connections"):
            poplib.POP3("127.0.0.1", port, timeout=10)
        a.quit()
        c = poplib.POP3("127.0.0.1", port, timeout=10)
        c.quit()
        b.quit()
    finally:
        h.close()


def test_idle_timeout_logs_out(h):
    port = h.serve(idle_timeout=0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"+OK")
        # say nothing: the server ends the session on its own
        assert f.readline() == b"-ERR autologout timer expired\r\n"
        assert f.readline() == b""


def test_failed_logins_are_throttled_and_end_the_session(h, caplog):
    port = h.serve()
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    with caplog.at_level("WARNING", logger="relay.pop3"):
        for _ in range(3):
            p.user("bob")
            try:
                p.pass_("guess")
            except poplib.error_proto as e:
                assert b"[AUTH]" in e.args[0]
    assert h.store.throttle.delay_for("127.0.0.1") > 0
    assert sum("pop3 login failed user='bob' ip=127.0.0.1" in r.getMessage()
               for r in caplog.records) == 3
    # max_auth_failures (3) reached: the server hung up
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.user("bob")
    h.store.throttle.record_success("127.0.0.1")
    login(port).quit()
