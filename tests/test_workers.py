"""Several worker processes: shared listening sockets, separate spool writers, metrics
that add up, clean stop, and scaling down without stranding mail."""

from __future__ import annotations

import smtplib
import urllib.request

from tests._relay import RelayProcess


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_workers_share_listener_spool_and_metrics(tmp_path):
    conf = {"workers": 2, "delivery": {"enabled": False}}
    r = RelayProcess(tmp_path, conf)
    try:
        sent = 0
        for _ in range(30):     # new connections: the kernel spreads them over workers
            with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
                s.sendmail("a@x.test", ["b@y.test"], b"Subject: w\r\n\r\nhi\r\n")
                sent += 1
        assert _metric(r.http_port, "relay_messages_received_total") == sent
        assert r.stop() == 0
    finally:
        r.kill()
    writers = {p.name.split("-")[0] for p in (r.spool_path / "segments").glob("w*-*.log")}
    assert writers == {"w0", "w1"}
    assert len(r.queued()) == sent
    # Scale down to one worker: worker 0 adopts writer 1's messages.
    r.config["workers"] = 1
    import yaml
    r.config_path.write_text(yaml.safe_dump(r.config))
    r.start()
    assert r.stop() == 0
    writers = {p.name.split("-")[0] for p in (r.spool_path / "segments").glob("w*-*.log")}
    assert writers == {"w0"}
    assert len(r.queued()) == sent


def _readyz(port: int) -> tuple[int, str]:
    import urllib.error
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _until(pred, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_readiness_covers_every_worker(tmp_path):
    """Worker 0 answers /readyz for the pod: a worker that stops responding (SIGSTOP)
    makes it 503 within the heartbeat's staleness window, and ready again after."""
    import json
    import os
    import signal
    r = RelayProcess(tmp_path, {"workers": 2, "delivery": {"enabled": False}})
    try:
        _until(lambda: _readyz(r.http_port)[0] == 200)
        status = r.spool_path / "status" / "w1.json"
        pid = json.loads(status.read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            _until(lambda: _readyz(r.http_port)[0] == 503)
            assert "worker 1" in _readyz(r.http_port)[1]
        finally:
            os.kill(pid, signal.SIGCONT)
        _until(lambda: _readyz(r.http_port)[0] == 200)
        assert r.stop() == 0
    finally:
        r.kill()


def test_connection_limits_hold_across_workers(tmp_path):
    """max_connections_per_ip is for the box: the kernel spreads one client's
    connections over the workers, and each worker counts the others' too."""
    import time

    from tests._relay import RawClient
    conf = {"workers": 2, "delivery": {"enabled": False},
            "smtp": {"max_connections_per_ip": 4}}
    with RelayProcess(tmp_path, conf) as r:
        held: list[RawClient] = []
        for _ in range(4):
            c = RawClient(r.smtp_port, source="127.0.0.5")
            assert c.reply()[0] == 220
            held.append(c)
        # Per worker, 4 more would fit; for the box, none does.
        for _ in range(8):
            c = RawClient(r.smtp_port, source="127.0.0.5")
            code, line = c.reply()
            assert (code, line[4:9]) == (421, b"4.7.0"), line
            c.close()
        other = RawClient(r.smtp_port, source="127.0.0.6")
        assert other.reply()[0] == 220
        other.close()
        for c in held:
            c.send(b"QUIT\r\n")
            c.close()
        # The slots come back, whichever worker held them.
        deadline = time.monotonic() + 10
        admitted = 0
        while admitted < 4 and time.monotonic() < deadline:
            c = RawClient(r.smtp_port, source="127.0.0.5")
            admitted += c.reply()[0] == 220
            c.close()
            time.sleep(0.05)
        assert admitted == 4
        refused = [ln for ln in r.log().splitlines() if "too many connections" in ln]
        assert len(refused) >= 8
        assert r.stop() == 0


def test_imap_idle_sees_mail_quarantined_by_any_worker(tmp_path):
    """Worker 0 serves IMAP; mail the other worker quarantines reaches an IDLE client
    without it asking (the store watches the Maildir, not only its own process)."""
    import time

    from imapclient import IMAPClient

    from relay.smtp.auth import hash_password
    from tests._relay import free_port
    imap_port = free_port()
    conf = {"workers": 2, "delivery": {"enabled": False},
            "filters": [{"name": "routing", "options": {"rules": [
                {"name": "held", "recipient": ["bob@y.test"], "quarantine": "review",
                 "reason": "review"}]}}],
            "quarantine": {"imap_address": f"127.0.0.1:{imap_port}", "users": [
                {"name": "bob", "password_hash": hash_password("pw-bob"),
                 "addresses": ["bob@y.test"]}]}}
    n = 16          # all on one worker: 1 time in 2**15
    with RelayProcess(tmp_path, conf) as r:
        with IMAPClient("127.0.0.1", port=imap_port, ssl=False, timeout=30) as c:
            c.login("bob", "pw-bob")
            c.select_folder("INBOX")
            c.idle()
            for i in range(n):      # a connection each: the kernel spreads them
                with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
                    s.sendmail("a@x.test", ["bob@y.test"], f"Subject: {i}\r\n\r\nx\r\n".encode())
            exists, deadline = 0, time.monotonic() + 20
            while exists < n and time.monotonic() < deadline:
                for resp in c.idle_check(timeout=1):
                    if len(resp) > 1 and resp[1] == b"EXISTS":
                        exists = max(exists, resp[0])
            c.idle_done()
        assert exists == n
        pids = {ln.split("[")[1].split("]")[0] for ln in r.log().splitlines()
                if "quarantined qid=" in ln}
        assert len(pids) == 2, "every message went to one worker: nothing was proved"
        assert r.stop() == 0


def test_rate_limits_hold_across_workers(tmp_path):
    """ratelimit: 3 messages per client for the box, however the kernel spreads the
    client's connections over the workers."""
    conf = {"workers": 2, "delivery": {"enabled": False},
            "filters": [{"name": "ratelimit", "options": {"limits": [
                {"key": "client_ip", "limit": 3, "window": "1h"}]}}]}
    with RelayProcess(tmp_path, conf) as r:
        codes = []
        for _ in range(16):         # a connection each; all on one worker: 1 in 2**15
            with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=10) as s:
                s.ehlo("t")
                codes.append(s.mail("a@x.test")[0])
        assert codes.count(250) == 3 and codes.count(450) == 13, codes
        pids = {ln.split("[")[1].split("]")[0] for ln in r.log().splitlines()
                if "client=" in ln or "ratelimit" in ln}
        assert len(pids) == 2, "one worker took every connection: nothing was proved"
        assert r.stop() == 0
