"""Delivery end to end through the real relay process: SIGKILL while delivering, then
restart: every accepted message arrives at least once, and a recipient the next hop
had already accepted is sent again only if the kill fell between that 250 and the
spool update (so duplicates stay few)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import smtplib
import threading
import time

from aiosmtpd.controller import Controller

from tests._relay import RelayProcess, free_port


class CountingSink:
    def __init__(self, delay: float):
        self.delay = delay
        self.seen: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        subject = next((ln for ln in envelope.content.split(b"\r\n")
                        if ln.startswith(b"Subject: ")), b"")
        with self.lock:
            self.seen[subject.decode()] += 1
        return "250 2.0.0 Ok"


def test_sigkill_during_delivery_then_restart_delivers_everything(tmp_path):
    sink = CountingSink(delay=0.03)
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    conf = {"delivery": {"transport": [{"domain": "y.test", "nexthop": f"[127.0.0.1]:{port}"}],
                         "retry_schedule": [1], "max_connections_per_destination": 5,
                         "mta_sts": False}}
    r = RelayProcess(tmp_path, conf)
    try:
        accepted: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=20) as s:
                for i in range(40):
                    subject = f"Subject: m{n}-{i}"
                    s.sendmail("a@x.test", ["b@y.test"], f"{subject}\r\n\r\nbody\r\n".encode())
                    with lock:
                        accepted.append(subject)

        with concurrent.futures.ThreadPoolExecutor(5) as ex:
            list(ex.map(client, range(5)))
        deadline = time.monotonic() + 30
        while sum(sink.seen.values()) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        delivered_before = sum(sink.seen.values())
        r.proc.kill()
        r.proc.wait()
        r._log.close()
        assert 0 < delivered_before < len(accepted), "the kill must fall during delivery"
        r.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(sink.seen[s] for s in accepted):
            time.sleep(0.1)
        missing = [s for s in accepted if not sink.seen[s]]
        assert not missing, f"{len(missing)} accepted messages never delivered"
        dupes = sum(n - 1 for n in sink.seen.values() if n > 1)
        # At most the messages in flight at the kill (5 connections) can repeat.
        assert dupes <= 5, f"{dupes} duplicates"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            from relay.queue.spool import scan
            if not scan(r.spool_path):
                break
            time.sleep(0.1)
        assert scan(r.spool_path) == []
        assert r.stop() == 0
    finally:
        r.kill()
        ctl.stop()


class Recording:
    def __init__(self):
        self.got = []

    async def handle_DATA(self, server, session, envelope):
        self.got.append((envelope.mail_from, envelope.rcpt_tos, envelope.content))
        return "250 2.0.0 Ok"


def test_notify_success_to_a_next_hop_without_dsn_gets_a_relayed_dsn(tmp_path):
    """RFC 3461 5.2.2: aiosmtpd offers no DSN, so our duty to report ends at its 250:
    NOTIFY=SUCCESS gets a 'relayed' report; a recipient without NOTIFY gets none."""
    import email
    sink = Recording()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    conf = {"delivery": {"transport": [{"domain": "y.test", "nexthop": f"[127.0.0.1]:{port}"},
                                       {"domain": "x.test", "nexthop": f"[127.0.0.1]:{port}"}],
                         "mta_sts": False}}
    r = RelayProcess(tmp_path, conf)
    try:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("t")
            s.mail("a@x.test", ["ENVID=env-1"])
            s.rcpt("told@y.test", ["NOTIFY=SUCCESS"])
            s.rcpt("quiet@y.test")
            assert s.data(b"Subject: report me\r\n\r\nhi\r\n")[0] == 250
        deadline = time.monotonic() + 20
        while len(sink.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sink.got) == 2, r.log()[-2000:]
        sender, rcpts, content = sink.got[1]
        assert sender in ("", "<>") and rcpts == ["a@x.test"]     # the null sender
        dsn = email.message_from_bytes(content)
        assert dsn.get_content_type() == "multipart/report"
        status = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"][0]
        text = status.as_string()
        assert "Action: relayed" in text and "told@y.test" in text
        assert "quiet@y.test" not in text and "Original-Envelope-Id: env-1" in text
        assert r.stop() == 0
    finally:
        r.kill()
        ctl.stop()
