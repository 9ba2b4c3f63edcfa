"""A real Prometheus server (Debian's `prometheus`) scrapes the relay on loopback; its
queries return what the relay did, and the shipped alert rules evaluate against the
real series without errors (issue 6, "done when")."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from _delivery import Sink
from _ops import OpsRelay, Peers, message, send

from tests._relay import ROOT, free_port, wait_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(),
    reason="the prometheus binary is missing (Debian package `prometheus`)")


class Prometheus:
    """prometheus on 127.0.0.1, a temp data dir, one scrape job `relay` every second."""

    def __init__(self, tmp: Path, target: str):
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
               "scrape_configs": [{"job_name": "relay", "scrape_interval": "1s",
                                   "static_configs": [{"targets": [target]}]}]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT)
        self.tmp = tmp
        wait_port("127.0.0.1", self.port, timeout=60)
        self.until(lambda: self._get("/-/ready", raw=True) == "ready", "prometheus ready")

    def _get(self, path: str, raw: bool = False):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                body = r.read().decode()
        except OSError:
            return None
        if raw:
            return "ready" if "Ready" in body else body
        return json.loads(body)

    def query(self, expr: str) -> list[dict]:
        out = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert out is not None and out["status"] == "success", out
        return out["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if len(res) == 1 else None

    def until(self, cond, what: str, limit: float = 60.0) -> None:
        """A deadline against hangs, not a speed assertion."""
        end = time.monotonic() + limit
        while not cond():
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError(f"timed out waiting for {what}:\n" +
                                     (self.tmp / "prometheus.log").read_text()[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_prometheus_scrapes_the_relay_and_queries_return_what_happened(tmp_path):
    (tmp_path / "relay").mkdir()
    (tmp_path / "prom").mkdir()
    with Peers() as peers:
        sink = Sink()
        port = peers.add(sink)
        cfg = {"delivery": {"transport": [{"domain": "ok.test",
                                           "nexthop": f"[127.0.0.1]:{port}"}],
                            "mta_sts": False, "tls_policy": "none"}}
        with OpsRelay(tmp_path / "relay", cfg) as r:
            prom = Prometheus(tmp_path / "prom", f"127.0.0.1:{r.http_port}")
            try:
                prom.until(lambda: prom.scalar('up{job="relay"}') == 1.0, "first scrape")
                for i in range(3):
                    send(r.smtp_port, "s@src.test", ["a@ok.test"], message(f"prom {i}"))
                received = 'relay_messages_received_total{job="relay",listener="mta"}'
                prom.until(lambda: prom.scalar(received) == 3.0, "received == 3")
                prom.until(lambda: prom.scalar('relay_messages_relayed_total{job="relay"}')
                           == 3.0, "relayed == 3")
                assert len(sink.messages) == 3
                assert prom.scalar('sum(relay_delivery_attempts_total{job="relay",'
                                   'result="sent"})') == 3.0
                assert prom.scalar('relay_ready{job="relay"}') == 1.0
                assert prom.scalar('sum(relay_queue_messages{job="relay"})') == 0.0
                # The instance label is the target we gave; the relay adds no other.
                [series] = prom.query(received)
                assert series["metric"]["instance"] == f"127.0.0.1:{r.http_port}"

                # The shipped alert rules evaluate against these series without errors.
                def rules_ok() -> bool:
                    out = prom._get("/api/v1/rules")
                    rules = [x for g in out["data"]["groups"] for x in g["rules"]] if out else []
                    return bool(rules) and all(x["health"] == "ok" for x in rules)
                prom.until(rules_ok, "alert rules evaluated")
                firing = prom.query('ALERTS{alertstate="firing"}')
                assert firing == [], firing
            finally:
                prom.stop()
            assert r.stop() == 0
