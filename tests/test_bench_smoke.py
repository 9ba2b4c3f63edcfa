"""The benchmark script works: a tiny run end to end, and its sink's framing.

No speed assertions: only that every message went through the real relay to the sink,
that the numbers the script promises are there, and that the sink counts exactly the
messages a client sent however the bytes are split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.load import make_body, make_head
from bench.sink import SinkProtocol, Stats

ROOT = Path(__file__).resolve().parents[1]


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


def _dialogue(n: int) -> bytes:
    msgs = b""
    for i in range(n):
        msgs += (b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" + make_head(f"t-{i}")
                 + b"..leading dot stuffed\r\n" + make_body(300) + b".\r\n")
    return b"EHLO c.test\r\n" + msgs + b"QUIT\r\n"


def test_sink_counts_messages_at_every_split():
    data = _dialogue(3)
    for cut in range(0, len(data), 7):
        stats = Stats()
        p = SinkProtocol(stats)
        t = _Transport()
        p.connection_made(t)
        p.data_received(data[:cut])
        p.data_received(data[cut:])
        assert stats.count == 3, cut
        assert set(stats.arrivals) == {"t-0@bench.test", "t-1@bench.test", "t-2@bench.test"}
        assert t.out.count(b"354 ") == 3 and t.out.endswith(b"221 2.0.0 Bye\r\n")
        assert t.closed


def test_sink_does_not_end_data_early():
    stats = Stats()
    p = SinkProtocol(stats)
    p.connection_made(_Transport())
    p.data_received(b"DATA\r\n" + make_head("x") + b"a\n.\nb\r\n.\rc\r\n")
    assert stats.count == 0
    p.data_received(b".\r\n")
    assert stats.count == 1


def test_bench_quick_run(tmp_path):
    out = tmp_path / "results"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--builtin", "--workers",
         "1", "--sizes", "10240", "--sessions", "3", "--count", "12", "--workdir",
         str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    files = list(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists()
    res = json.loads(files[0].read_text())
    (r,) = res["throughput"]
    assert (r["peer"], r["size"], r["sessions"]) == ("relay", 10240, 3)
    assert r["accepted"] == 12 and r["delivered"] == 12 and r["errors"] == 0
    assert r["e2e_per_s"] and r["accepted_per_s"] and r["cpu_s_per_1000"] > 0
    assert r["peak_rss_mib"] > 0
    for k in ("r250_p50_ms", "r250_p99_ms", "r2d_p50_ms", "r2d_p99_ms"):
        assert r[k] is not None and r[k] >= 0, k
    (h,) = res["half_peak"]
    assert h["delivered"] == h["count"] and h["r250_p99_ms"] is not None
    assert "| relay | 10 KiB | 3 |" in files[0].with_suffix(".md").read_text()
