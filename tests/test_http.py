"""relay.http: the sans-IO request parser, then /metrics, /healthz, /readyz over real sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from relay import metrics
from relay.http import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    HealthServer,
    HTTPError,
    Request,
    RequestParser,
    render_response,
    spool_problems,
)

ROOT = Path(__file__).resolve().parents[1]

# --- parser, no sockets -------------------------------------------------------------

GET = b"GET /metrics?x=1 HTTP/1.1\r\nHost: relay\r\nAccept: text/plain\r\n\r\n"


def parse_all(data: bytes) -> list[Request]:
    p = RequestParser()
    p.feed(data)
    out = []
    while (r := p.next_request()) is not None:
        out.append(r)
    return out


def test_parses_a_request() -> None:
    [r] = parse_all(GET)
    assert (r.method, r.path, r.query, r.version) == ("GET", "/metrics", "x=1", (1, 1))
    assert r.header("host") == "relay" and r.header("accept") == "text/plain"
    assert r.keep_alive


@pytest.mark.parametrize("cut", range(1, len(GET)))
def test_split_at_every_offset_gives_the_same_request(cut: int) -> None:
    p = RequestParser()
    p.feed(GET[:cut])
    assert p.next_request() is None
    p.feed(GET[cut:])
    assert p.next_request() == parse_all(GET)[0]


def test_byte_by_byte_and_pipelined() -> None:
    p = RequestParser()
    got = []
    for b in GET + b"HEAD /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n":
        p.feed(bytes([b]))
        if (r := p.next_request()) is not None:
            got.append(r)
    assert [(r.method, r.path, r.keep_alive) for r in got] == [
        ("GET", "/metrics", True), ("HEAD", "/healthz", False)]


def test_bare_lf_and_leading_empty_line_accepted() -> None:
    [r] = parse_all(b"\r\nGET /healthz HTTP/1.0\nUser-Agent: nc\n\n")
    assert r.path == "/healthz" and r.version == (1, 0) and not r.keep_alive


def test_http10_keep_alive_opt_in() -> None:
    [r] = parse_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert r.keep_alive


@pytest.mark.parametrize("raw,status", [
    (b"GET /\r\n\r\n", 400),                                       # HTTP/0.9
    (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),                  # double space
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),           # absolute-form
    (b"GET / HTTP/1.1\r\n\r\n", 400),                              # no Host
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),                  # space before colon
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),        # obs-fold
    (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),              # NUL in a value
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
])
def test_bad_requests_get_the_right_status(raw: bytes, status: int) -> None:
    p = RequestParser()
    p.feed(raw)
    with pytest.raises(HTTPError) as e:
        p.next_request()
    assert e.value.status == status
    with pytest.raises(HTTPError):  # the connection is done for
        p.next_request()


def test_content_length_zero_is_fine() -> None:
    [r] = parse_all(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert r.path == "/"


def test_endless_request_line_is_414_without_waiting_for_the_end() -> None:
    p = RequestParser()
    p.feed(b"GET /" + b"a" * MAX_REQUEST_LINE)
    with pytest.raises(HTTPError) as e:
        p.next_request()
    assert e.value.status == 414


def test_endless_head_is_431() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HTTPError) as e:
        for _ in range(MAX_HEAD // 10 + 2):
            p.feed(b"X: 123456\r\n")
            assert p.next_request() is None
    assert e.value.status == 431


def test_render_response_head_has_no_body() -> None:
    full = render_response(200, b"ok\n")
    head = render_response(200, b"ok\n", head_only=True, keep_alive=False)
    assert full.startswith(b"HTTP/1.1 200 OK\r\n") and full.endswith(b"\r\n\r\nok\n")
    assert b"Content-Length: 3\r\n" in head and head.endswith(b"Connection: close\r\n\r\n")


# --- spool_problems -----------------------------------------------------------------

def test_spool_problems_ok(tmp_path: Path) -> None:
    assert spool_problems(tmp_path, 0) == []
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_spool_problems_not_writable(tmp_path: Path) -> None:
    # Root ignores mode bits, so use a spool path that is a file (as a broken mount is).
    f = tmp_path / "file"
    f.write_text("x")
    [p] = spool_problems(f, 0)
    assert "not writable" in p
    [p] = spool_problems(tmp_path / "missing", 0)
    assert "not writable" in p


def test_spool_problems_low_disk(tmp_path: Path) -> None:
    [p] = spool_problems(tmp_path, 1 << 62)
    assert "MiB free" in p and "minimum" in p


# --- over real sockets --------------------------------------------------------------

def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


async def get(url: str, **kw) -> tuple[int, bytes, dict]:
    return await asyncio.to_thread(fetch, url, **kw)


def test_healthz_and_port_zero() -> None:
    async def body(base: str, srv: HealthServer) -> None:
        assert srv.port != 0
        status, text, headers = await get(base + "/healthz")
        assert (status, text) == (200, b"ok\n")
        assert headers["Cache-Control"] == "no-store"
        assert (await get(base + "/other"))[0] == 404

    run_with_server(lambda: ["not ready"], body)


def run_with_server(ready, body, **kw) -> None:
    async def main() -> None:
        srv = HealthServer("127.0.0.1", 0, ready, **kw)
        await srv.start()
        try:
            await body(f"http://127.0.0.1:{srv.port}", srv)
        finally:
            await srv.stop()
    asyncio.run(main())


def test_readyz_flips_with_the_callback() -> None:
    problems: list[str] = []

    async def body(base: str, srv: HealthServer) -> None:
        status, text, _ = await get(base + "/readyz")
        assert (status, text) == (200, b"ok\n")
        problems.extend(["draining", "spool /x not writable: Read-only file system"])
        status, text, _ = await get(base + "/readyz")
        assert status == 503
        assert text.decode().splitlines() == problems
        # liveness is not readiness: a draining relay is still alive
        assert (await get(base + "/healthz"))[0] == 200
        problems.clear()
        assert (await get(base + "/readyz"))[0] == 200

    run_with_server(lambda: list(problems), body)


def test_readyz_async_callback_raising_and_hanging() -> None:
    mode = {"v": "ok"}

    async def ready() -> list[str]:
        if mode["v"] == "raise":
            raise RuntimeError("boom")
        if mode["v"] == "hang":
            await asyncio.sleep(3600)
        return []

    async def body(base: str, srv: HealthServer) -> None:
        assert (await get(base + "/readyz"))[0] == 200
        mode["v"] = "raise"
        status, text, _ = await get(base + "/readyz")
        assert status == 503 and b"RuntimeError" in text
        mode["v"] = "hang"
        status, text, _ = await get(base + "/readyz")
        assert status == 503 and b"timed out" in text

    run_with_server(ready, body, ready_timeout=0.2)


def test_metrics_has_relay_metrics_and_moves() -> None:
    async def body(base: str, srv: HealthServer) -> None:
        metrics.MESSAGES_RELAYED.inc(0)
        status, text, headers = await get(base + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        before = _value(text, "relay_messages_relayed_total")
        assert b"# TYPE relay_queue_messages gauge" in text
        assert b"# TYPE relay_delivery_latency_seconds histogram" in text
        metrics.MESSAGES_RELAYED.inc(3)
        _, text, _ = await get(base + "/metrics")
        assert _value(text, "relay_messages_relayed_total") == before + 3
        # OpenMetrics when the scraper prefers it, gzip when it accepts it
        status, raw, headers = await get(base + "/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert gzip.decompress(raw).rstrip().endswith(b"# EOF")

    run_with_server(lambda: [], body)


def _value(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_raw_socket_errors_keepalive_and_other_connections_unharmed() -> None:
    async def body(base: str, srv: HealthServer) -> None:
        port = srv.port
        bad = await asyncio.to_thread(_raw_exchange, port, b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in bad
        post = await asyncio.to_thread(
            _raw_exchange, port, b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
        # two pipelined requests on one connection, then a 404, then close
        two = await asyncio.to_thread(
            _raw_exchange, port,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert two.count(b"HTTP/1.1 200 OK") == 2 and two.count(b"ok\n") == 1
        assert b"HTTP/1.1 404 Not Found" in two
        # a half-sent request on one connection does not block another one
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost")
        await w.drain()
        assert (await get(base + "/healthz"))[0] == 200
        w.close()

    run_with_server(lambda: [], body)


def test_stop_closes_idle_keepalive_connections() -> None:
    async def main() -> None:
        srv = HealthServer("127.0.0.1", 0, lambda: [])
        await srv.start()
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        assert (await r.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(srv.stop(), 10)
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", srv.port)

    asyncio.run(main())


# --- several worker processes add up -------------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    from relay import metrics
    n = int(sys.argv[1])
    metrics.MESSAGES_RELAYED.inc(n)
    metrics.DELIVERY_LATENCY.observe(0.2 * n)
    metrics.QUEUE_MESSAGES.labels(queue="active").set(10 * n)
    metrics.MESSAGES_BOUNCED.labels(reason="rejected").inc()
""")


def test_multiprocess_workers_add_up(tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    pids = []
    for n in (2, 3):
        p = subprocess.run([sys.executable, "-c", WORKER, str(n)], env=env, check=True,
                           capture_output=True, timeout=60)
        assert p.returncode == 0
    pids = sorted({int(f.stem.rsplit("_", 1)[1]) for f in mp.glob("gauge_livesum_*.db")})
    assert len(pids) == 2

    async def body(base: str, srv: HealthServer) -> None:
        _, text, _ = await get(base + "/metrics")
        assert _value(text, "relay_messages_relayed_total") == 5
        assert _value(text, "relay_delivery_latency_seconds_count") == 2
        assert _value(text, 'relay_messages_bounced_total{reason="rejected"}') == 2
        assert _value(text, 'relay_queue_messages{queue="active"}') == 50
        # a worker that exits stops counting in live gauges; its counters stay
        from relay.http import worker_exited
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
        try:
            worker_exited(pids[0])
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        _, text, _ = await get(base + "/metrics")
        assert _value(text, 'relay_queue_messages{queue="active"}') in (20, 30)
        assert _value(text, "relay_messages_relayed_total") == 5

    run_with_server(lambda: [], body, multiprocess_dir=str(mp))


def test_metrics_scrape_reports_readiness_and_spool_space(tmp_path: Path) -> None:
    # Where no kubelet probes /readyz, Prometheus still sees readiness (for alerts).
    flags = {"draining": False}

    def ready() -> list[str]:
        return spool_problems(tmp_path, 0) + (["draining"] if flags["draining"] else [])

    async def body(base: str, srv: HealthServer) -> None:
        _, text, _ = await get(base + "/metrics")
        assert _value(text, "relay_ready") == 1
        free = _value(text, "relay_spool_free_bytes")
        st = os.statvfs(tmp_path)
        assert 0 < free and abs(free - st.f_bavail * st.f_frsize) < 2**30
        flags["draining"] = True
        _, text, _ = await get(base + "/metrics")
        assert _value(text, "relay_ready") == 0

    run_with_server(ready, body)


# --- a real Prometheus scrapes us ------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prom_query(base: str, q: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


def _wait_for(pred, what: str, deadline: float = 90.0):
    # Bounded wait for Prometheus to start and scrape; not a speed assertion.
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last:
                return last
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what} (last: {last!r})")


def _start_prometheus(tmp_path: Path, target_port: int) -> tuple[subprocess.Popen, str]:
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        rule_files: [{ROOT / "deploy" / "prometheus" / "alerts.yml"}]
        scrape_configs:
          - job_name: relay
            static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]
    """))
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=log)
    return proc, f"http://127.0.0.1:{prom_port}"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed: `apt-get install -y prometheus` (Debian)")
def test_real_prometheus_scrapes_metrics_and_loads_the_alert_rules(tmp_path: Path) -> None:
    problems: list[str] = []

    async def body(base: str, srv: HealthServer) -> None:
        metrics.MESSAGES_RELAYED.inc(7)
        _, text, _ = await get(base + "/metrics")
        relayed = _value(text, "relay_messages_relayed_total")
        proc, prom = await asyncio.to_thread(_start_prometheus, tmp_path, srv.port)
        try:
            def value(q: str) -> float | None:
                res = _prom_query(prom, q)
                return float(res[0]["value"][1]) if res else None

            got = await asyncio.to_thread(
                _wait_for, lambda: value('relay_messages_relayed_total{job="relay"}'),
                "the first scrape")
            assert got == relayed
            assert await asyncio.to_thread(value, 'up{job="relay"}') == 1
            assert await asyncio.to_thread(value, 'relay_ready{job="relay"}') == 1
            # readiness turns false: Prometheus sees it on the next scrape (alert input)
            problems.append("draining")
            await asyncio.to_thread(
                _wait_for, lambda: value('relay_ready{job="relay"}') == 0, "relay_ready 0")

            def rules() -> list[str]:
                with urllib.request.urlopen(prom + "/api/v1/rules", timeout=10) as r:
                    groups = json.load(r)["data"]["groups"]
                return [ru["name"] for g in groups for ru in g["rules"]]
            names = await asyncio.to_thread(_wait_for, rules, "the alert rules")
            assert {"RelayDown", "RelayNotReady", "RelayQueueGrowing"} <= set(names)
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)

    run_with_server(lambda: list(problems), body)


def test_a_dribbling_client_is_cut_off_at_the_request_deadline(monkeypatch) -> None:
    monkeypatch.setattr(HealthServer, "IDLE_TIMEOUT", 1.0)

    async def body(base: str, srv: HealthServer) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        closed = False
        # each byte comes well inside the per-read time, the whole head never does
        for ch in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            w.write(bytes([ch]))
            try:
                await w.drain()
            except ConnectionError:
                closed = True
                break
            await asyncio.sleep(0.05)
            if r.at_eof() or w.is_closing():
                closed = True
                break
        # cut off while still dribbling (the whole head would take about 11 s)
        assert closed
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()

    run_with_server(lambda: [], body)
