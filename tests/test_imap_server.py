"""IMAP server end to end: imaplib and IMAPClient over real loopback sockets."""

from __future__ import annotations

import imaplib
import os
import socket
import ssl
import threading
import time

import pytest
import trustme
from _imap import JUNK, MULTIPART, Running
from imapclient import IMAPClient

MSG = (b"From: Mallory <m@evil.test>\r\nTo: alice@example.test\r\nSubject: win money\r\n"
       b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nDKIM-Signature: v=1; a=rsa-sha256; b=abc\r\n"
       b"\r\nline one\r\nline two with trailing space \r\n\r\n")


@pytest.fixture
def srv(tmp_path):
    r = Running(tmp_path / "q")
    yield r
    r.stop()


def login(srv, user="alice", pw=None) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", srv.port, timeout=30)
    c.login(user, pw or user + "pw")
    return c


class Raw:
    """A bare socket client for exact wire checks."""

    def __init__(self, port: int, sock: socket.socket | None = None) -> None:
        self.s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.s.makefile("rb")
        self.greeting = self.f.readline()

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.f.readline()
            assert line, "connection closed"
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def cmd(self, line: bytes) -> list[bytes]:
        tag = line.split(b" ", 1)[0]
        self.send(line + b"\r\n")
        return self.until(tag)

    def close(self) -> None:
        self.s.close()


def test_login_list_fetch_exact_and_headers_only(srv):
    qid = srv.put(MSG, "alice@example.test")
    meta = srv.store.meta(qid)
    c = login(srv)
    typ, boxes = c.list()
    assert typ == "OK" and b'"INBOX"' in b" ".join(boxes) and b'"Release"' in b" ".join(boxes)
    typ, data = c.select("INBOX")
    assert data == [b"1"]
    typ, data = c.fetch("1", "(BODY.PEEK[])")
    stored = data[0][1]
    assert stored[meta.prefix_len:] == MSG              # byte-exact, CRLF kept
    assert stored.startswith(b"X-Quarantine-Id: " + qid.encode() + b"\r\n")
    assert b"X-Quarantine-Reason: score 9\r\n" in stored
    typ, data = c.fetch("1", "(BODY.PEEK[HEADER])")
    assert data[0][1] == stored[:stored.index(b"\r\n\r\n") + 4]
    typ, data = c.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT X-QUARANTINE-REASON)])")
    assert data[0][1] == b"X-Quarantine-Reason: score 9\r\nSubject: win money\r\n\r\n"
    typ, data = c.fetch("1", "(FLAGS)")
    assert b"\\Seen" not in data[0]                      # PEEK did not set \Seen
    typ, data = c.fetch("1", "(RFC822.SIZE BODY[TEXT]<5.8>)")
    assert b"RFC822.SIZE %d" % len(stored) in data[0][0] and data[0][1] == b"one\r\nlin"
    typ, data = c.fetch("1", "(FLAGS)")
    assert b"\\Seen" in data[0]
    c.logout()


def test_imapclient_search_flags_envelope(srv):
    srv.put(MSG, "alice@example.test")
    srv.put(MULTIPART, "alice@example.test")
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        assert c.has_capability("MOVE") and c.has_capability("UIDPLUS")
        c.select_folder("INBOX")
        assert c.search(["FROM", "mallory"]) == [1]
        assert c.search(["SUBJECT", "café"], charset="UTF-8") == [2]
        assert c.search(["BODY", "needle"]) == [2]
        assert c.search(["HEADER", "X-Quarantine-Filter", "spamf"]) == [1, 2]
        assert c.search(["UNSEEN"]) == [1, 2]
        c.add_flags([2], [b"\\Flagged", b"$Junk"])
        assert c.search(["FLAGGED"]) == [2] and c.search(["KEYWORD", "$Junk"]) == [2]
        assert set(c.get_flags([2])[2]) >= {b"\\Flagged", b"$Junk"}
        c.remove_flags([2], [b"$junk"])            # keywords are case-insensitive
        assert c.search(["KEYWORD", "$Junk"]) == []
        res = c.fetch([2], ["ENVELOPE", "BODYSTRUCTURE", "INTERNALDATE"])[2]
        env = res[b"ENVELOPE"]
        assert env.subject == b"=?utf-8?q?caf=C3=A9_report?="
        assert env.from_[0].mailbox == b"john"
        assert res[b"BODYSTRUCTURE"].is_multipart
        assert c.fetch([2], ["BODY.PEEK[2.HEADER]"])[2][b"BODY[2.HEADER]"] == (
            b"Subject: inner\r\nFrom: in@example.test\r\n\r\n")
        assert c.fetch([2], ["BODY.PEEK[1.MIME]"])[2][b"BODY[1.MIME]"].startswith(
            b"Content-Type: text/plain")


def test_folders_create_rename_delete_subscribe(srv):
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        c.create_folder("Work.Todo")
        names = {f[2] for f in c.list_folders()}
        assert {"INBOX", "Release", "Work", "Work.Todo"} <= names
        c.rename_folder("Work", "Job")
        names = {f[2] for f in c.list_folders()}
        assert "Job.Todo" in names and "Work" not in names
        assert [f[2] for f in c.list_folders("", "Job.%")] == ["Job.Todo"]
        c.subscribe_folder("Job")
        assert [f[2] for f in c.list_sub_folders()] == ["Job"]
        c.unsubscribe_folder("Job")
        c.delete_folder("Job.Todo")
        c.delete_folder("Job")
        assert {f[2] for f in c.list_folders()} == {"INBOX", "Release"}
        uid = c.append("INBOX", b"Subject: mine\r\n\r\nx\r\n", flags=[b"\\Seen"])
        assert b"APPENDUID" in uid
        for bad in ("..", "a/b", "../bob", "x*", "%", "/etc"):
            with pytest.raises(IMAPClient.Error):
                c.create_folder(bad)
        with pytest.raises(IMAPClient.Error):
            c.delete_folder("INBOX")
        with pytest.raises(IMAPClient.Error):
            c.delete_folder("Release")


def test_copy_move_uidplus_and_release(srv):
    q1 = srv.put(MSG, "alice@example.test")
    q2 = srv.put(MULTIPART, "alice@example.test")
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        c.create_folder("Keep")
        c.select_folder("INBOX")
        c.copy([1], "Keep")
        assert c.folder_status("Keep", ["MESSAGES"])[b"MESSAGES"] == 1
        c.move([2], "Keep")
        assert c.search(["ALL"]) == [1]
        c.select_folder("Keep")
        assert c.search(["ALL"]) == [1, 2]
        uids = c.search(["SUBJECT", "win"])
        c.move(uids, "Release")
        assert srv.released == [("alice", q1)]
        assert c.search(["ALL"]) == [2]
        assert srv.store.meta(q1) is None        # released: gone from quarantine
        c.select_folder("INBOX")
        assert c.search(["ALL"]) == []           # every copy of it left
        c.select_folder("Keep")
        c.copy([2], "Release")                   # COPY releases too
        assert srv.released[-1] == ("alice", q2)
        c.append("Keep", b"Subject: own\r\n\r\nx\r\n")
        c.noop()
        own = c.search(["SUBJECT", "own"])
        with pytest.raises(IMAPClient.Error):    # not a quarantined message
            c.move(own, "Release")


def test_admin_sees_reason_folders_and_user_isolation(srv):
    srv.put(MSG, "alice@example.test", mailbox="dmarc", filter="dmarc")
    srv.put(MSG, "bob@example.test", mailbox="spam")
    a = login(srv, "alice")
    a.select("INBOX")
    assert a.search(None, "ALL")[1] == [b"1"]
    # alice cannot reach bob's mail by any name
    for name in ("../bob", "..", "/users/bob", "bob", "../../users/bob/INBOX", "~bob",
                 "INBOX/../../bob"):
        typ, _ = a.select(name)
        assert typ == "NO"
        typ, _ = a.status(name, "(MESSAGES)") if name else ("NO", None)
        assert typ == "NO"
    assert all(b"bob" not in x for x in a.list()[1])
    typ, data = a.list("../bob", "*")
    assert data == [None]
    a.logout()
    adm = login(srv, "admin")
    names = b" ".join(adm.list()[1])
    assert b'"dmarc"' in names and b'"spam"' in names
    adm.select("dmarc")
    assert adm.search(None, "ALL")[1] == [b"1"]
    adm.logout()
    # wrong passwords are refused and throttled per IP
    c = imaplib.IMAP4("127.0.0.1", srv.port, timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        c.login("alice", "wrong")
    with pytest.raises(imaplib.IMAP4.error):
        c.login("nosuchuser", "x")
    assert srv.store.throttle.delay_for("127.0.0.1") > 0
    c.logout()


def test_bad_commands_and_oversized_literals_keep_connection_sane(srv):
    r = Raw(srv.port)
    assert r.greeting.startswith(b"* OK")
    assert r.cmd(b"a1 FROB")[-1].startswith(b"a1 BAD")
    assert r.cmd(b"a2 SELECT INBOX")[-1].startswith(b"a2 BAD")        # not logged in
    r.send(b"a3 LOGIN {99999999}\r\n")                                  # before login
    assert r.until(b"a3")[-1].startswith(b"a3 BAD [TOOBIG]")
    assert r.cmd(b"a4 LOGIN alice alicepw")[-1].startswith(b"a4 OK")
    r.send(b"a5 APPEND INBOX {999999999}\r\n")
    assert r.until(b"a5")[-1].startswith(b"a5 BAD [TOOBIG]")
    r.send(b"a8 NOOP " + b"x" * 100_000 + b"\r\n")
    assert r.until(b"a8")[-1].startswith(b"a8 BAD")
    assert r.cmd(b"a9 FETCH 1 (FLAGS)")[-1].startswith(b"a9 BAD")     # nothing selected
    assert r.cmd(b"b1 SELECT INBOX")[-1].startswith(b"b1 OK")
    assert r.cmd(b"b2 FETCH 99 (FLAGS)")[-1].startswith(b"b2 BAD")
    assert r.cmd(b"b3 FETCH 1:* (BODY[9.9.9.HEADER] FOO)")[-1].startswith(b"b3 BAD")
    assert r.cmd(b"b4 SEARCH " + b"(" * 50 + b"ALL" + b")" * 50)[-1].startswith(b"b4 BAD")
    assert r.cmd(b"b5 SEARCH CHARSET KOI8-R ALL")[-1].startswith(b"b5 NO [BADCHARSET")
    assert r.cmd(b'b6 LIST "" "' + b"*a%" * 80 + b'"')[-1].startswith(b"b6 OK")
    assert r.cmd(b'b6 LIST "" "' + b"*%" * 150 + b'"')[-1].startswith(b"b6 BAD")
    assert r.cmd(b"b7 STORE 1 +FLAGS (\\Bogus)")[-1].startswith(b"b7 BAD")
    out = r.cmd(b"b8 NOOP")
    assert out[-1].startswith(b"b8 OK")
    r.close()


def test_oversized_nonsync_literal_then_next_command(srv):
    r = Raw(srv.port)
    r.cmd(b"a LOGIN alice alicepw")
    r.send(b"b APPEND INBOX {60000000+}\r\n")
    chunk = b"y" * 1_000_000
    for _ in range(60):
        r.send(chunk)
    r.send(b"\r\nc NOOP\r\n")
    assert r.until(b"b")[-1].startswith(b"b BAD [TOOBIG]")   # after the skipped bytes
    assert r.until(b"c")[-1].startswith(b"c OK")
    r.close()


def test_idle_sees_new_mail_and_other_sessions_updates(srv):
    srv.put(MSG, "alice@example.test")
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as watcher, \
            IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as actor:
        for c in (watcher, actor):
            c.login("alice", "alicepw")
            c.select_folder("INBOX")
        watcher.idle()
        srv.put(MULTIPART, "alice@example.test")
        got = watcher.idle_check(timeout=10)
        assert (2, b"EXISTS") in got
        actor.noop()
        actor.add_flags([1], [b"\\Flagged"])
        got = watcher.idle_check(timeout=10)
        assert any(r[1] == b"FETCH" for r in got)
        actor.delete_messages([1])
        actor.expunge()
        # The \Deleted flag's FETCH may come in a read of its own, before the EXPUNGE.
        got, deadline = [], time.monotonic() + 10
        while (1, b"EXPUNGE") not in got and time.monotonic() < deadline:
            got += watcher.idle_check(timeout=deadline - time.monotonic())
        assert (1, b"EXPUNGE") in got
        watcher.idle_done()
        assert watcher.search(["ALL"]) == [2]      # IMAPClient searches by UID


def test_uids_stable_across_restart(srv):
    for _ in range(3):
        srv.put(MSG, "alice@example.test")
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        info = c.select_folder("INBOX")
        c.delete_messages([1])
        c.expunge()
        before = (info[b"UIDVALIDITY"], c.search(["ALL"]))
        c.add_flags([3], [b"$Label1"])
    srv.restart()
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        info = c.select_folder("INBOX")
        assert (info[b"UIDVALIDITY"], c.search(["ALL"])) == before == (before[0], [2, 3])
        assert b"$Label1" in c.get_flags([3])[3]
        assert info[b"UIDNEXT"] == 4


@pytest.fixture
def tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_starttls_and_implicit_tls(tmp_path, tls):
    server_ctx, client_ctx = tls
    r = Running(tmp_path / "q", ssl_context=server_ctx)
    try:
        r.put(MSG, "alice@example.test")
        c = imaplib.IMAP4("127.0.0.1", r.port, timeout=30)
        assert "STARTTLS" in c.capabilities
        c.starttls(ssl_context=client_ctx)
        assert "STARTTLS" not in c.capabilities
        c.login("alice", "alicepw")
        c.select("INBOX")
        assert c.fetch("1", "(BODY.PEEK[TEXT])")[1][0][1] == (
            b"line one\r\nline two with trailing space \r\n\r\n")
        c.logout()
        # a command pipelined behind STARTTLS in plaintext is never run
        raw = Raw(r.port)
        raw.send(b"a STARTTLS\r\nb LOGIN alice alicepw\r\n")
        assert raw.f.readline().startswith(b"a OK")
        assert raw.f.readline() == b""            # hung up
        raw.close()
    finally:
        r.stop()
    r = Running(tmp_path / "q2", ssl_context=server_ctx, implicit_tls=True)
    try:
        c = imaplib.IMAP4_SSL("127.0.0.1", r.port, ssl_context=client_ctx)
        assert "STARTTLS" not in c.capabilities
        c.login("alice", "alicepw")
        c.logout()
    finally:
        r.stop()


def test_authenticate_plain_with_and_without_initial_response(srv):
    c = imaplib.IMAP4("127.0.0.1", srv.port, timeout=30)
    typ, _ = c.authenticate("PLAIN", lambda _: b"\0bob\0bobpw")
    assert typ == "OK"
    c.logout()
    r = Raw(srv.port)
    import base64
    ir = base64.b64encode(b"\0alice\0alicepw")
    assert r.cmd(b"a AUTHENTICATE PLAIN " + ir)[-1].startswith(b"a OK")
    r.close()
    r = Raw(srv.port)
    assert r.cmd(b"a AUTHENTICATE PLAIN " + base64.b64encode(b"bob\0alice\0alicepw")
                 )[-1].startswith(b"a NO")
    r.close()


def test_connections_per_ip_limit(tmp_path):
    r = Running(tmp_path / "q", max_connections_per_ip=2)
    try:
        a, b = Raw(r.port), Raw(r.port)
        c = Raw(r.port)
        assert a.greeting.startswith(b"* OK") and b.greeting.startswith(b"* OK")
        assert c.greeting.startswith(b"* BYE")
        a.cmd(b"x LOGOUT")
        assert a.f.read() == b""     # closed: the server has already counted it out
        d = Raw(r.port)
        assert d.greeting.startswith(b"* OK")
        for x in (b, c, d):
            x.close()
    finally:
        r.stop()


def test_junk_corpus_over_the_wire(srv):
    for data in JUNK:
        srv.put(data, "alice@example.test")
    r = Raw(srv.port)
    r.cmd(b"a LOGIN alice alicepw")
    r.cmd(b"b SELECT INBOX")
    out = r.cmd(b"c FETCH 1:* (ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE)")
    assert out[-1].startswith(b"c OK")
    out = r.cmd(b"d FETCH 1:* (BODY.PEEK[1.MIME] BODY.PEEK[2.TEXT] BODY.PEEK[HEADER.FIELDS "
                b"(FROM DATE)])")
    assert out[-1].startswith(b"d OK")
    for q in (b"FROM x", b"SUBJECT 8", b"TEXT x", b"BODY x", b"SENTSINCE 1-Jan-2000",
              b"OR HEADER Sender <<< NOT SENTON 1-Jan-2024", b"CHARSET UTF-8 FROM \"J\xc3\xb6\""):
        out = r.cmd(b"e SEARCH " + q)
        assert out[-1].startswith(b"e OK"), (q, out[-1])
    with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
        c.login("alice", "alicepw")
        c.select_folder("INBOX")
        got = c.fetch(c.search(["ALL"]), ["ENVELOPE", "BODYSTRUCTURE"])
        assert len(got) == len(JUNK)
    r.close()


def test_200_idle_clients_all_notified_and_a_new_login_works(tmp_path):
    srv = Running(tmp_path / "q", max_connections_per_ip=250)
    clients = []
    try:
        for _ in range(200):
            r = Raw(srv.port)
            r.cmd(b"a LOGIN alice alicepw")
            r.cmd(b"b SELECT INBOX")
            r.send(b"c IDLE\r\n")
            assert r.f.readline().startswith(b"+")
            clients.append(r)
        srv.put(MSG, "alice@example.test")
        for r in clients:
            assert r.f.readline() == b"* 1 EXISTS\r\n"
        fresh = login(srv)
        assert fresh.select("INBOX")[1] == [b"1"]
        fresh.logout()
        for r in clients:
            r.send(b"DONE\r\n")
            assert r.until(b"c")[-1].startswith(b"c OK")
    finally:
        for r in clients:
            r.close()
        srv.stop()


def test_concurrent_sessions_threads(srv):
    """Several real clients at once, each doing a full cycle."""
    for _ in range(5):
        srv.put(MSG, "alice@example.test")
    errors = []

    def worker():
        try:
            with IMAPClient("127.0.0.1", port=srv.port, ssl=False, timeout=30) as c:
                c.login("alice", "alicepw")
                c.select_folder("INBOX", readonly=True)
                uids = c.search(["ALL"])
                assert len(uids) == 5
                got = c.fetch(uids, ["BODY.PEEK[]"])
                assert all(v[b"BODY[]"].endswith(MSG) for v in got.values())
        except Exception as e:  # collected for the assert below
            errors.append(e)
    ts = [threading.Thread(target=worker) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert errors == []


def test_maildir_is_readable_by_standard_tools(srv):
    srv.put(MSG, "alice@example.test")
    path = srv.root / "users" / "alice" / "new"
    names = os.listdir(path)
    assert len(names) == 1
    assert (path / names[0]).read_bytes().endswith(MSG)


def test_wire_edge_cases(srv):
    r = Raw(srv.port)
    r.cmd(b"a LOGIN alice alicepw")
    assert r.cmd(b"b SELECT INBOX")[-1].startswith(b"b OK [READ-WRITE]")
    assert r.cmd(b"c FETCH 1:* (FLAGS)")[-1].startswith(b"c OK")      # '*' of an empty box
    assert r.cmd(b"d UID FETCH 1:* (FLAGS)")[-1].startswith(b"d OK")
    assert r.cmd(b"e SEARCH ALL") == [b"* SEARCH\r\n", b"e OK SEARCH completed\r\n"]
    r.send(b"f APPEND INBOX (\\Seen) \"01-Feb-2024 10:11:12 +0100\" {0}\r\n")
    assert r.f.readline().startswith(b"+")
    r.send(b"\r\n")
    out = r.until(b"f")
    assert out[-1].startswith(b"f OK [APPENDUID ") and b"* 1 EXISTS\r\n" in out
    r.send(b"g APPEND INBOX {12+}\r\nSubject: x\r\n\r\n")
    assert r.until(b"g")[-1].startswith(b"g OK [APPENDUID ")
    out = r.cmd(b"h FETCH 1:2 (INTERNALDATE RFC822.SIZE BODY.PEEK[])")
    assert out[0] == b'* 1 FETCH (INTERNALDATE "01-Feb-2024 09:11:12 +0000" RFC822.SIZE 0 ' \
                     b"BODY[] {0}\r\n"
    assert b"BODY[] {12}\r\n" in out[2]
    assert r.cmd(b"i EXAMINE INBOX")[-1].startswith(b"i OK [READ-ONLY]")
    assert r.cmd(b"j STORE 1 +FLAGS (\\Flagged)")[-1].startswith(b"j NO")
    assert r.cmd(b'k LIST "" ""') == [b'* LIST (\\Noselect) "." ""\r\n',
                                      b"k OK LIST completed\r\n"]
    assert r.cmd(b"l NAMESPACE")[0] == b'* NAMESPACE (("" ".")) NIL NIL\r\n'
    assert r.cmd(b"m CLOSE")[-1].startswith(b"m OK")
    assert r.cmd(b"n FETCH 1 FLAGS")[-1].startswith(b"n BAD")           # no longer selected
    assert r.cmd(b"o LOGOUT")[0] == b"* BYE Logging out\r\n"
    r.close()


def test_password_check_runs_off_the_event_loop(tmp_path):
    gate = threading.Event()
    entered = threading.Event()

    def slow_verify(pw: str, stored: str) -> bool:
        entered.set()
        assert gate.wait(30)       # held until the other client was served
        return stored == "plain:" + pw

    r = Running(tmp_path / "q", verify=slow_verify)
    try:
        slow = Raw(r.port)
        slow.send(b"a LOGIN alice alicepw\r\n")
        assert entered.wait(30)
        other = Raw(r.port)         # greeted and answered while the check is pending
        assert other.greeting.startswith(b"* OK")
        assert other.cmd(b"x CAPABILITY")[-1].startswith(b"x OK")
        gate.set()
        assert slow.until(b"a")[-1].startswith(b"a OK")
        slow.close()
        other.close()
    finally:
        gate.set()
        r.stop()


def test_autologout_before_login(tmp_path):
    r = Running(tmp_path / "q", server_kw={"login_timeout": 0.5})
    try:
        c = Raw(r.port)
        assert c.f.readline().startswith(b"* BYE Autologout")
        assert c.f.readline() == b""
        c.close()
    finally:
        r.stop()
