"""SIGHUP reloads the maps: a domain added to relay_domains is accepted at once, and
the running sessions' process keeps its spool and listeners."""

from __future__ import annotations

import signal
import smtplib
import time

import yaml

from tests._relay import RelayProcess


def test_sighup_reloads_relay_domains(tmp_path):
    conf = {"delivery": {"enabled": False}, "access": {"mynetworks": ["127.0.0.2/32"]}}
    with RelayProcess(tmp_path, conf) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("t")
            s.mail("a@x.test")
            assert s.rcpt("u@new.test")[0] == 554
        r.config["access"]["relay_domains"] = ["new.test"]
        r.config_path.write_text(yaml.safe_dump(r.config))
        r.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in r.log():
            assert time.monotonic() < deadline, r.log()
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("t")
            s.mail("a@x.test")
            assert s.rcpt("u@new.test")[0] == 250
            assert s.rcpt("u@other.test")[0] == 554
        assert r.stop() == 0
