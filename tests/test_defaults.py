"""`relay serve` with no file runs safely on loopback on the documented default ports,
takes mail from loopback, exposes probes, lists its queue, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests._relay import ROOT, wait_port

DEFAULT_PORTS = (2525, 2587, 9325, 1143, 1110)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_on_embedded_defaults(tmp_path):
    if not all(_free(p) for p in DEFAULT_PORTS):
        pytest.skip("a default port is taken on this machine (another relay running?)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(ROOT)
    log = open(tmp_path / "relay.log", "wb")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "relay", "serve"], cwd=tmp_path, env=env,
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        for port in DEFAULT_PORTS:
            wait_port("127.0.0.1", port)
        # Nothing listens beyond loopback.
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout \
            if os.path.exists("/usr/bin/ss") or os.path.exists("/bin/ss") else ""
        for line in out.splitlines():
            if f"pid={p.pid}," in line:
                assert "127.0.0.1:" in line, line
        with smtplib.SMTP("127.0.0.1", 2525) as s:
            assert s.ehlo()[0] == 250
            assert s.has_extn("starttls")
            s.sendmail("a@example.invalid", ["b@example.invalid"], b"Subject: hi\r\n\r\nhi\r\n")
        with smtplib.SMTP("127.0.0.1", 2587) as s:
            s.ehlo()
            assert s.mail("a@example.invalid")[0] == 530     # submission needs AUTH
        assert urllib.request.urlopen("http://127.0.0.1:9325/healthz").status == 200
        deadline = time.monotonic() + 20
        while True:
            try:
                if urllib.request.urlopen("http://127.0.0.1:9325/readyz").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        assert (tmp_path / "var" / "spool" / "segments").is_dir()
        q = subprocess.run([sys.executable, "-m", "relay", "queue", "list", "--json"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert q.returncode == 0, q.stderr
        assert isinstance(json.loads(q.stdout), list)
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "relay.log").read_text()
