"""Quarantine end to end through the real relay: a filter holds a message; its owner
reads it over IMAP (byte-exact), moves it to Release, and a real SMTP next hop receives
it — for its original recipients only, with the bytes that were quarantined."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import time

from aiosmtpd.controller import Controller

from relay.smtp.auth import hash_password
from tests._relay import RelayProcess, free_port, strip_trace


class Sink:
    def __init__(self):
        self.got = []

    async def handle_DATA(self, server, session, envelope):
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok"


MESSAGE = (b"From: <spam@x.test>\r\nTo: <bob@y.test>, <carol@y.test>\r\nSubject: hold-me please\r\n"
           b"Message-ID: <q1@x.test>\r\n\r\n.dot line\r\nbody\r\n")


def test_quarantine_read_over_imap_release_delivers(tmp_path):
    sink = Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    imap_port, pop_port = free_port(), free_port()
    conf = {
        "delivery": {"transport": [{"domain": "y.test", "nexthop": f"[127.0.0.1]:{port}"}],
                     "mta_sts": False, "retry_schedule": [1]},
        "filters": [{"name": "routing", "options": {"rules": [
            {"name": "held", "header": "Subject", "regex": "hold-me", "quarantine": "spam",
             "reason": "subject matched"}]}}],
        "quarantine": {
            "imap_address": f"127.0.0.1:{imap_port}", "pop3_address": f"127.0.0.1:{pop_port}",
            "users": [{"name": "bob", "password_hash": hash_password("pw-bob"),
                       "addresses": ["bob@y.test"]},
                      {"name": "carol", "password_hash": hash_password("pw-carol"),
                       "addresses": ["carol@y.test"]}]},
    }
    r = RelayProcess(tmp_path, conf)
    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.sendmail("spam@x.test", ["bob@y.test", "carol@y.test"], MESSAGE)
            s.sendmail("ok@x.test", ["bob@y.test"], b"Subject: fine\r\n\r\nfine\r\n")
        deadline = time.monotonic() + 20
        while len(sink.got) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [g[0] for g in sink.got] == ["ok@x.test"]     # only the clean one went out
        assert "quarantine: mailbox=spam filter=routing" in r.log()

        m = imaplib.IMAP4("127.0.0.1", imap_port)
        m.login("bob", "pw-bob")
        typ, data = m.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"hold-me please" in data[0][1]
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        stored = data[0][1]
        assert stored.startswith(b"X-Quarantine")
        assert stored.endswith(MESSAGE)                       # byte-exact, CRLF kept
        typ, data = m.search(None, "SUBJECT", "hold-me")
        assert data == [b"1"]
        m.store("1", "+FLAGS", "(\\Flagged)")
        # Bob cannot see Carol's mail.
        assert m.select("../carol/INBOX")[0] == "NO"
        m.select("INBOX")                        # a failed SELECT leaves none selected
        typ, _ = m.uid("MOVE", m.uid("SEARCH", None, "ALL")[1][0], "Release")
        assert typ == "OK"
        m.logout()

        deadline = time.monotonic() + 20
        while len(sink.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sink.got) == 2, r.log()[-3000:]
        sender, rcpts, content = sink.got[1]
        assert sender == "spam@x.test"
        assert rcpts == ["bob@y.test"]           # bob released only his own copy
        assert strip_trace(content) == MESSAGE   # what was quarantined is what went out
        assert b"X-Quarantine" not in content
        assert "released" in r.log().lower()

        # Carol still has hers, over POP3.
        p = poplib.POP3("127.0.0.1", pop_port)
        p.user("carol")
        p.pass_("pw-carol")
        assert p.stat()[0] == 1
        lines = p.retr(1)[1]
        assert b"Subject: hold-me please" in lines
        p.quit()
        assert r.stop() == 0
    finally:
        r.kill()
        ctl.stop()
