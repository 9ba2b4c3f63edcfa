"""`relay queue ...` beside a running relay: list shows next attempt and last error,
hold keeps a message from delivery, release and flush retry now, delete removes."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time

from aiosmtpd.controller import Controller

from tests._relay import ROOT, RelayProcess, free_port


class Flaky:
    """Defers every message until told to accept."""

    def __init__(self):
        self.accept = False
        self.got = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        if not self.accept:
            return "451 4.3.2 try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.got.append(envelope.content)
        return "250 2.0.0 Ok"


def cli(r: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "relay", "queue", *args, "-c",
                           str(r.config_path)], capture_output=True, text=True, env=env,
                          cwd=r.dir, timeout=60)


def wait(pred, timeout=20):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_commands_on_a_running_relay(tmp_path):
    sink = Flaky()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    conf = {"delivery": {"transport": [{"domain": "y.test", "nexthop": f"[127.0.0.1]:{port}"}],
                         "retry_schedule": [3600], "mta_sts": False}}
    r = RelayProcess(tmp_path, conf)
    try:
        ids = []
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            for i in range(3):
                s.sendmail("a@x.test", ["b@y.test"], f"Subject: q{i}\r\n\r\nx\r\n".encode())
        wait(lambda: "status=deferred" in r.log() and r.log().count("status=deferred") >= 3)
        out = cli(r, "list", "--json")
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert len(listed) == 3
        for m in listed:
            ids.append(m["queue_id"])
            rc = m["recipients"][0]
            assert m["queue"] == "deferred"
            assert rc["attempts"] == 1 and rc["next_attempt"] > time.time() + 3000
            assert rc["last_error"].startswith("451 4.3.2") or "451 4.3.2" in rc["last_error"]
        text = cli(r, "list").stdout
        assert "last error:" in text and "attempts=1" in text

        assert cli(r, "hold", ids[0]).returncode == 0
        assert cli(r, "delete", ids[1]).returncode == 0
        sink.accept = True
        assert cli(r, "flush").returncode == 0
        wait(lambda: len(sink.got) == 1)             # only the one neither held nor deleted
        time.sleep(0.5)
        assert len(sink.got) == 1
        held = json.loads(cli(r, "show", ids[0], "--json").stdout)
        assert held[0]["queue"] == "hold"
        assert cli(r, "show", ids[1]).returncode == 1
        assert cli(r, "release", ids[0]).returncode == 0
        wait(lambda: len(sink.got) == 2)
        wait(lambda: json.loads(cli(r, "list", "--json").stdout) == [])
        assert r.stop() == 0
    finally:
        r.kill()
        ctl.stop()
