"""Unit tests of the sans-IO POP3 engine: bytes in, events out, no sockets."""

from __future__ import annotations

import base64

import pytest

from relay.quarantine.pop3.proto import (
    NEED_DATA,
    BodyWriter,
    Connection,
    Login,
    MessageInfo,
    Policy,
    Retrieve,
    Send,
    StartTLS,
    State,
    Update,
    render_message,
)

MSGS = [MessageInfo("k1", "uid-1", 100), MessageInfo("k2", "uid-2", 250),
        MessageInfo("k3", "uid-3", 7)]


def drain(conn: Connection) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if not isinstance(ev, Send):
            return out


def logged_in(**kw) -> Connection:
    conn = Connection(Policy(cleartext_login=True, **kw))
    conn.receive_data(b"USER alice\r\nPASS s3cret word\r\n")
    evs = drain(conn)
    assert evs[0] == Send(b"+OK send PASS\r\n")
    assert evs[1] == Login("alice", "s3cret word", "USER")
    assert conn.login_succeeded(MSGS) == b"+OK maildrop has 3 messages (357 octets)\r\n"
    return conn


def one(conn: Connection, line: bytes):
    conn.receive_data(line)
    evs = drain(conn)
    assert len(evs) == 1, evs
    return evs[0]


def test_stat_list_uidl():
    c = logged_in()
    assert one(c, b"STAT\r\n") == Send(b"+OK 3 357\r\n")
    assert one(c, b"LIST\r\n") == Send(b"+OK\r\n1 100\r\n2 250\r\n3 7\r\n.\r\n")
    assert one(c, b"LIST 2\r\n") == Send(b"+OK 2 250\r\n")
    assert one(c, b"uidl\r\n") == Send(b"+OK\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n")
    assert one(c, b"UIDL 3\r\n") == Send(b"+OK 3 uid-3\r\n")


def test_dele_rset_and_update():
    c = logged_in()
    assert one(c, b"DELE 2\r\n") == Send(b"+OK message 2 deleted\r\n")
    assert one(c, b"STAT\r\n") == Send(b"+OK 2 107\r\n")
    assert one(c, b"LIST\r\n") == Send(b"+OK\r\n1 100\r\n3 7\r\n.\r\n")
    assert one(c, b"RETR 2\r\n").data.startswith(b"-ERR")
    assert one(c, b"DELE 2\r\n").data.startswith(b"-ERR")
    assert one(c, b"RSET\r\n") == Send(b"+OK maildrop has 3 messages (357 octets)\r\n")
    one(c, b"DELE 1\r\n")
    one(c, b"DELE 3\r\n")
    assert one(c, b"QUIT\r\n") == Update(("k1", "k3"))
    assert c.state is State.UPDATE
    assert c.update_done(True) == b"+OK bye\r\n"
    assert c.closed


def test_quit_in_authorization_does_not_update():
    c = Connection(Policy())
    assert one(c, b"QUIT\r\n") == Send(b"+OK bye\r\n", close=True)


def test_retr_and_top_events():
    c = logged_in()
    assert one(c, b"RETR 1\r\n") == Retrieve(1, "k1", 100, None)
    assert c.retrieve_ok(100) == b"+OK 100 octets\r\n"
    assert one(c, b"TOP 2 0\r\n") == Retrieve(2, "k2", 250, 0)
    assert c.retrieve_failed().startswith(b"-ERR [SYS/TEMP]")
    for bad in (b"RETR 0\r\n", b"RETR 4\r\n", b"RETR x\r\n", b"RETR\r\n", b"TOP 1\r\n",
                b"TOP 1 -1\r\n", b"RETR 99999999999999999999\r\n", b"RETR \xd9\xa3\r\n"):
        assert one(c, bad).data.startswith(b"-ERR"), bad


def test_state_rules():
    c = Connection(Policy(cleartext_login=True))
    for cmd in (b"STAT\r\n", b"LIST\r\n", b"RETR 1\r\n", b"NOOP\r\n", b"PASS x\r\n"):
        assert one(c, cmd).data.startswith(b"-ERR"), cmd
    c = logged_in()
    assert one(c, b"USER bob\r\n").data.startswith(b"-ERR")
    assert one(c, b"NOOP\r\n") == Send(b"+OK\r\n")


def test_bad_commands_limit_closes():
    c = Connection(Policy(max_errors=3))
    assert one(c, b"FOO\r\n") == Send(b"-ERR unknown command\r\n")
    assert one(c, b"\x00\x01\r\n").data.startswith(b"-ERR")
    ev = one(c, b"BAR\r\n")
    assert ev.close and c.closed


def test_long_line_is_dropped_and_session_stays_sane():
    c = logged_in(max_line=64)
    c.receive_data(b"X" * 100)
    ev = drain(c)
    assert ev == [Send(b"-ERR line too long\r\n")]
    c.receive_data(b"Y" * 1000)                        # still the same line: no new error
    assert drain(c) == []
    c.receive_data(b"Z\r\nSTAT\r\n")
    assert drain(c) == [Send(b"+OK 3 357\r\n")]
    assert len(c._buf) == 0


def test_cleartext_login_refused_without_tls():
    c = Connection(Policy(tls_available=True))
    caps = one(c, b"CAPA\r\n").data
    assert b"STLS\r\n" in caps and b"USER\r\n" not in caps
    assert one(c, b"USER alice\r\n").data.startswith(b"-ERR [AUTH]")
    c.receive_data(b"STLS\r\nUSER injected\r\n")
    ev = drain(c)
    assert ev == [StartTLS(b"+OK Begin TLS negotiation\r\n")]
    c.tls_started()
    # the pipelined clear-text USER was discarded (STARTTLS injection)
    assert drain(c) == []
    caps = one(c, b"CAPA\r\n").data
    assert b"STLS" not in caps and b"USER\r\n" in caps and b"SASL PLAIN\r\n" in caps
    assert one(c, b"PASS x\r\n").data == b"-ERR USER first\r\n"


def test_auth_plain():
    c = Connection(Policy(cleartext_login=True))
    token = base64.b64encode(b"\0alice\0pw").decode()
    assert one(c, f"AUTH PLAIN {token}\r\n".encode()) == Login("alice", "pw", "PLAIN")
    assert c.login_failed() == b"-ERR [AUTH] invalid user name or password\r\n"
    assert one(c, b"AUTH PLAIN\r\n") == Send(b"+ \r\n")
    assert one(c, token.encode() + b"\r\n") == Login("alice", "pw", "PLAIN")
    c.login_failed()
    assert one(c, b"AUTH PLAIN\r\n") == Send(b"+ \r\n")
    assert one(c, b"*\r\n").data.startswith(b"-ERR")
    assert one(c, b"AUTH PLAIN !!!\r\n").data.startswith(b"-ERR")
    assert one(c, b"AUTH CRAM-MD5\r\n").data.startswith(b"-ERR")


def test_login_failures_close():
    c = Connection(Policy(cleartext_login=True, max_auth_failures=2))
    one(c, b"USER a\r\n")
    one(c, b"PASS b\r\n")
    c.login_failed()
    assert not c.closed
    one(c, b"USER a\r\n")
    one(c, b"PASS b\r\n")
    c.login_failed()
    assert c.closed


def test_pipelined_input_split_at_every_offset():
    script = b"USER alice\r\nPASS pw\r\n"
    after = b"STAT\r\nLIST 1\r\nDELE 1\r\nUIDL\r\nNOOP\r\nQUIT\r\n"
    expected = None
    for cut in range(len(script + after) + 1):
        data = script + after
        c = Connection(Policy(cleartext_login=True))
        events = []
        for piece in (data[:cut], data[cut:]):
            c.receive_data(piece)
            while True:
                ev = c.next_event()
                if ev is NEED_DATA:
                    break
                events.append(ev)
                if isinstance(ev, Login):
                    c.login_succeeded(MSGS)
                if isinstance(ev, Update):
                    c.update_done(True)
        if expected is None:
            expected = events
            assert isinstance(events[-1], Update) and events[-1].keys == ("k1",)
        assert events == expected, cut


# --- the body writer -----------------------------------------------------------------

MESSAGE = (b"From: a@example.test\r\nSubject: dots\r\n\r\n.first line\r\nline 2\r\n"
           b"..two\r\n.\r\nline 5\r\n")


def test_retr_byte_stuffing():
    out = render_message(MESSAGE)
    assert out == (b"From: a@example.test\r\nSubject: dots\r\n\r\n..first line\r\nline 2\r\n"
                   b"...two\r\n..\r\nline 5\r\n.\r\n")


def unstuff(body: bytes) -> bytes:
    assert body.endswith(b".\r\n")
    lines = body[:-3].split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_stuffing_is_the_same_in_any_chunking(chunk):
    w = BodyWriter()
    out = b"".join(w.feed(MESSAGE[i:i + chunk]) for i in range(0, len(MESSAGE), chunk))
    out += w.finish()
    assert out == render_message(MESSAGE)
    assert unstuff(out) == MESSAGE


def test_no_trailing_crlf_and_empty():
    assert render_message(b"Subject: x\r\n\r\nbody") == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    assert render_message(b"") == b".\r\n"
    assert render_message(b".") == b"..\r\n.\r\n"


def test_bare_lf_dot_is_stuffed():
    # A bare LF followed by '.CRLF' must not end the response for an LF-splitting client.
    assert render_message(b"a\n.\r\nb\r\n") == b"a\n..\r\nb\r\n.\r\n"


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_top(chunk):
    def top(n):
        w = BodyWriter(n)
        out = b"".join(w.feed(MESSAGE[i:i + chunk]) for i in range(0, len(MESSAGE), chunk))
        return out + w.finish()
    assert top(0) == b"From: a@example.test\r\nSubject: dots\r\n\r\n.\r\n"
    assert top(2) == b"From: a@example.test\r\nSubject: dots\r\n\r\n..first line\r\nline 2\r\n.\r\n"
    assert top(100) == render_message(MESSAGE)
    # no blank line: everything is header
    w = BodyWriter(0)
    assert w.feed(b"Subject: x\r\nFrom: y") + w.finish() == b"Subject: x\r\nFrom: y\r\n.\r\n"
