"""The relay's benchmark, one command: sink, relay (and Postfix), load, numbers.

    .venv/bin/python bench/run.py [--vs-postfix] [--quick] [--rss] [--workers N]

For 10 KiB and 100 KiB messages at 20 and 200 sessions it starts a sink SMTP server
(Postfix's smtp-sink when installed, else bench/sink.py), a fresh relay with a bench
config (durable spool, default filters, delivery to the sink), drives load (Postfix's
smtp-source when installed, else bench/load.py) and reports accepted msgs/s, end-to-end
msgs/s (all delivered at the sink), CPU-seconds per 1000 messages (the relay's process
tree, /proc utime+stime with children) and peak RSS (VmHWM). Receipt-to-delivery and
receipt-to-250 latency (p50/p99) come from a second pass with the built-in tools, whose
messages carry an id the sink notes on arrival. Then the p99 receipt-to-250 latency at
half the peak rate. `--vs-postfix` runs a Postfix instance of its own (config and queue
under the same work directory as the relay's spool, loopback only, relayhost = the
sink) through the same passes in the same run and prints the ratios. `--rss` adds 20
concurrent 50 MiB messages and 5,000 idle connections (relay only).

Everything listens on 127.0.0.1 only, every count is bounded and every wait has a
deadline; the script stops what it started. Results: bench/results/<date>-<host>.json
and .md. Numbers are only comparable within one run (same machine, same noise).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench import procstat  # noqa: E402
from bench.load import FROM, TO  # noqa: E402
from bench.postfix import Postfix  # noqa: E402
from bench.postfix import available as postfix_available  # noqa: E402
from relay.workers import available_cpus  # noqa: E402

PY = sys.executable
BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(512)        # the banner: the server is really answering
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def _py_spy() -> str:
    beside = Path(PY).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


# --- the sink ---------------------------------------------------------------------------

class Sink:
    """smtp-sink (Postfix's) or bench/sink.py; both print a running `mesg=N`."""

    def __init__(self, builtin: bool, workdir: Path):
        self.builtin = builtin
        self.port = free_port()
        self.record = workdir / f"sink-{self.port}.json"
        self.count = 0
        self._reached: dict[int, float] = {}
        self._cond = threading.Condition()

    def start(self) -> None:
        if self.builtin:
            cmd = [PY, str(BENCH / "sink.py"), "--listen", f"127.0.0.1:{self.port}",
                   "--record", str(self.record)]
        else:
            cmd = ["smtp-sink", "-c", f"127.0.0.1:{self.port}", "1000"]
            if os.geteuid() == 0:
                cmd[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(65536):
            now = time.monotonic()
            buf += chunk
            counts = re.findall(rb"mesg=(\d+)", buf)
            buf = buf[-64:]
            if counts:
                with self._cond:
                    self.count = max(self.count, int(counts[-1]))
                    self._reached.setdefault(self.count, now)
                    self._cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> float | None:
        """monotonic time at which the sink had n messages (None: not in time)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return min(t for c, t in self._reached.items() if c >= n)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.builtin and self.record.exists():
            return json.loads(self.record.read_text())
        return {"count": self.count, "arrivals": {}}


# --- the peers --------------------------------------------------------------------------

class RelayPeer:
    name = "relay"

    def __init__(self, workdir: Path, sink_port: int, workers: int, max_conn: int = 1000):
        self.dir = workdir / f"relay-{sink_port}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.cfg = {
            "hostname": "relay.bench.test",
            "workers": workers,
            "listeners": [{"name": "mta", "address": f"127.0.0.1:{self.port}",
                           "role": "mta", "starttls": False}],
            "smtp": {"max_message_size": "60MiB", "max_connections": max_conn,
                     "max_connections_per_ip": max_conn},
            "spool": {"path": str(self.dir / "spool"), "min_free_space": 0},
            "delivery": {"relayhost": [f"[127.0.0.1]:{sink_port}"], "tls_policy": "none",
                         "mta_sts": False},
            "http": {"address": f"127.0.0.1:{free_port()}", "min_free_space": 0},
            "quarantine": {"path": str(self.dir / "quarantine"), "imap_address": None,
                           "pop3_address": None},
            "log": {"level": "info"},
        }

    def start(self) -> None:
        path = self.dir / "relay.yaml"
        path.write_text(yaml.safe_dump(self.cfg))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("RELAY_CONFIG", None)
        self._log = open(self.dir / "relay.log", "wb")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen([PY, "-m", "relay", "serve", "-c", str(path)],
                                     cwd=self.dir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("relay did not start:\n" +
                               (self.dir / "relay.log").read_text()[-3000:]) from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class PostfixPeer:
    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, workers: int, max_conn: int = 1000):
        self.port = free_port()
        self.pf = Postfix(workdir / f"pf-{sink_port}", self.port, sink_port)

    def start(self) -> None:
        self.pf.start()
        self._pid = self.pf.master_pid()
        wait_port(self.port)

    @property
    def pid(self) -> int:
        return self._pid

    def stop(self) -> None:
        self.pf.stop()


# --- one pass ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.a = args
        self.workdir = workdir
        self.postfix_tools = (not args.builtin and shutil.which("smtp-source") is not None
                              and shutil.which("smtp-sink") is not None)
        self.runs = 0

    def peer(self, kind: str, sink_port: int, max_conn: int = 1000):
        cls = RelayPeer if kind == "relay" else PostfixPeer
        return cls(self.workdir, sink_port, self.a.workers, max_conn)

    def one_pass(self, kind: str, size: int, sessions: int, count: int, builtin: bool,
                 rate: float | None = None, profile: str | None = None) -> dict:
        """Fresh sink and peer, `count` messages through them; the measurements."""
        self.runs += 1
        sink = Sink(builtin, self.workdir)
        sink.start()
        peer = self.peer(kind, sink.port)
        spy = None
        try:
            peer.start()
            time.sleep(0.3)
            if profile:
                spy = subprocess.Popen([_py_spy(), "record", "--pid", str(peer.pid),
                                        "--subprocesses", "--format", "raw", "--rate", "250",
                                        "-o", profile], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            cpu0 = procstat.cpu_seconds(peer.pid)
            box0 = procstat.machine_jiffies()
            limit = max(120.0, count * size / 2e6, count / 20)
            t0 = time.monotonic()
            with procstat.PeakSampler(peer.pid) as pss:
                load = self._load(peer.port, size, sessions, count, builtin, rate, limit)
                t_acc = time.monotonic()
                reached = sink.wait_count(count, limit)
            cpu1 = procstat.cpu_seconds(peer.pid)
            box1 = procstat.machine_jiffies()
            hwm = procstat.peak_rss_mib(peer.pid)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            peer.stop()
            rec = sink.stop()
        start = load.get("start", t0)
        end_acc = load.get("end", t_acc)
        ok = load.get("ok", count)
        res = {
            "peer": kind, "size": size, "sessions": sessions, "count": count,
            "tools": "built-in" if builtin else "postfix smtp-source/smtp-sink",
            "accepted": ok, "errors": load.get("errors", 0),
            "delivered": rec.get("count", sink.count),
            "accepted_per_s": round(ok / (end_acc - start), 1),
            "e2e_per_s": round(count / (reached - start), 1) if reached else None,
            "cpu_s_per_1000": round((cpu1 - cpu0) * 1000 / max(1, ok), 3),
            "peak_rss_mib": round(hwm, 1),
            "peak_pss_mib": round(pss.peak, 1),
            # How busy the whole box was (peer + sink + load + kernel), in CPUs: near
            # nproc means the run was CPU-bound, not limited by the peer's design.
            "box_cpus_busy": round((box1[0] - box0[0]) / max(1, box1[1] - box0[1])
                                   * (os.cpu_count() or 1), 2),
        }
        if builtin:
            arr = rec.get("arrivals", {})
            sent = load.get("sent", [])
            r250 = [(t2 - t1) * 1000 for _, t1, t2, c in sent if c == 250]
            r2d = [(arr[i] - t2) * 1000 for i, _, t2, c in
                   ((s[0] + "@bench.test", *s[1:]) for s in sent) if c == 250 and i in arr]
            if arr and sent:
                res["e2e_per_s"] = round(count / (max(arr.values()) - start), 1) \
                    if len(arr) >= count else res["e2e_per_s"]
            for name, vals in (("r250", r250), ("r2d", r2d)):
                for p in (50, 99):
                    v = pct(vals, p)
                    res[f"{name}_p{p}_ms"] = None if v is None else round(v, 2)
        if rate:
            res["rate"] = rate
        return res

    def _load(self, port: int, size: int, sessions: int, count: int, builtin: bool,
              rate: float | None, limit: float) -> dict:
        if builtin:
            out = self.workdir / f"load-{self.runs}.json"
            cmd = [PY, str(BENCH / "load.py"), "send", "--target", f"127.0.0.1:{port}",
                   "--sessions", str(sessions), "--count", str(count), "--size", str(size),
                   "--run", f"r{self.runs}", "--out", str(out)]
            if rate:
                cmd += ["--rate", str(rate)]
            subprocess.run(cmd, check=True, timeout=limit)
            data = json.loads(out.read_text())
            data["ok"] = sum(1 for s in data["sent"] if s[3] == 250)
            data["errors"] = len(data["errors"]) + sum(1 for s in data["sent"] if s[3] != 250)
            return data
        start = time.monotonic()
        p = subprocess.run(["smtp-source", "-d", "-s", str(sessions), "-m", str(count),
                            "-l", str(size), "-f", FROM, "-t", TO, f"127.0.0.1:{port}"],
                           timeout=limit, capture_output=True)
        return {"start": start, "end": time.monotonic(), "ok": count,
                "errors": 0 if p.returncode == 0 else f"smtp-source exit {p.returncode}"}

    # --- the scenarios ------------------------------------------------------------------

    def throughput(self, kind: str, size: int, sessions: int, count: int) -> dict:
        """Median of --repeat passes with the fast tools, plus one latency pass."""
        runs = [self.one_pass(kind, size, sessions, count, not self.postfix_tools,
                              profile=self._profile_path(kind, size, sessions, i))
                for i in range(self.a.repeat)]
        res = _median(runs)
        if self.postfix_tools:
            lat = self.one_pass(kind, size, sessions, max(sessions * 5, count // 2), True)
            for k, v in lat.items():
                if k.startswith(("r250", "r2d")):
                    res[k] = v
            res["latency_pass_e2e_per_s"] = lat["e2e_per_s"]
        self._show(res)
        return res

    def _profile_path(self, kind: str, size: int, sessions: int, i: int) -> str | None:
        if not self.a.profile or kind != "relay" or i:
            return None
        Path(self.a.profile).mkdir(parents=True, exist_ok=True)
        return str(Path(self.a.profile) / f"{kind}-{size // 1024}k-{sessions}s.txt")

    def half_peak(self, kind: str, peak: float, duration: float) -> dict:
        rate = max(1.0, peak / 2)
        count = int(min(max(rate * duration, 50), 20000))
        res = self.one_pass(kind, 10240, 20, count, True, rate=round(rate, 1))
        self._show(res, "half-peak")
        return res

    def big(self) -> dict:
        res = self.one_pass("relay", 50 << 20, 20, 20, True)
        self._show(res, "50MiB x20")
        return res

    def idle(self, n: int) -> dict:
        sink = Sink(True, self.workdir)
        sink.start()
        peer = self.peer("relay", sink.port, max_conn=n + 1000)
        try:
            peer.start()
            time.sleep(0.5)
            before = procstat.rss_mib(peer.pid)
            gen = subprocess.Popen([PY, str(BENCH / "load.py"), "idle", "--target",
                                    f"127.0.0.1:{peer.port}", "--connections", str(n)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert gen.stdout is not None
                line = gen.stdout.readline().strip()
                time.sleep(1.0)
                rss, hwm = procstat.rss_mib(peer.pid), procstat.peak_rss_mib(peer.pid)
                pss = procstat.pss_mib(peer.pid)
            finally:
                assert gen.stdin is not None
                gen.stdin.close()
                try:
                    gen.wait(60)
                except subprocess.TimeoutExpired:
                    gen.kill()
        finally:
            peer.stop()
            sink.stop()
        res = {"peer": "relay", "idle_connections": n, "generator": line,
               "rss_before_mib": round(before, 1), "rss_mib": round(rss, 1),
               "peak_rss_mib": round(hwm, 1), "pss_mib": round(pss, 1)}
        print(f"  idle x{n}: {line}; relay RSS {before:.0f} -> {rss:.0f} MiB "
              f"(peak {hwm:.0f} MiB, PSS {pss:.0f} MiB)", flush=True)
        return res

    @staticmethod
    def _show(r: dict, label: str = "") -> None:
        label = label or f"{r['size'] // 1024} KiB x{r['sessions']}"
        lat = ""
        if r.get("r250_p99_ms") is not None:
            lat = (f" | r250 p50/p99 {r['r250_p50_ms']}/{r['r250_p99_ms']} ms"
                   f" | r2d p50/p99 {r.get('r2d_p50_ms')}/{r.get('r2d_p99_ms')} ms")
        print(f"  {r['peer']:7s} {label:12s} accepted {r['accepted_per_s']}/s | e2e "
              f"{r['e2e_per_s']}/s | {r['cpu_s_per_1000']} CPU-s/1000 | peak RSS "
              f"{r['peak_rss_mib']} MiB, PSS {r['peak_pss_mib']} MiB{lat} | box busy "
              f"{r.get('box_cpus_busy')} CPUs | errors {r['errors']}", flush=True)


def _median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    if len(runs) > 1:
        for k, v in runs[0].items():
            vals = [r[k] for r in runs if isinstance(r.get(k), int | float)]
            if isinstance(v, int | float) and len(vals) == len(runs):
                out[k] = statistics.median(vals)
        out["runs"] = len(runs)
    return out


# --- reporting ----------------------------------------------------------------------------

def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {"host": platform.node(), "nproc": os.cpu_count(),
            "cpu": model.group(1).strip() if model else "", "kernel": platform.release(),
            "python": platform.python_version(), "event_loop": loop}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Benchmark {result['date']} on {m['host']}", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
             f"Python {m['python']} ({m['event_loop']}).", "",
             f"Command: `{result['command']}`", "",
             "| peer | size | sessions | accepted/s | e2e/s | CPU-s/1000 | peak RSS / PSS MiB "
             "| r250 p50/p99 ms | r2d p50/p99 ms | box CPUs busy | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['peer']} | {r['size'] // 1024} KiB | {r['sessions']} | "
                     f"{r['accepted_per_s']} | {r['e2e_per_s']} | {r['cpu_s_per_1000']} | "
                     f"{r['peak_rss_mib']} / {r['peak_pss_mib']} | {r.get('r250_p50_ms')}/{r.get('r250_p99_ms')} | "
                     f"{r.get('r2d_p50_ms')}/{r.get('r2d_p99_ms')} | {r.get('box_cpus_busy')} | "
                     f"{r['errors']} |")
    if result.get("ratios"):
        lines += ["", "Relay / Postfix (same run):", "",
                  "| size | sessions | e2e throughput | CPU per message |", "|---|---|---|---|"]
        for r in result["ratios"]:
            lines.append(f"| {r['size'] // 1024} KiB | {r['sessions']} | "
                         f"{r['e2e_ratio']}x | {r['cpu_ratio']}x |")
    if result.get("half_peak"):
        lines += ["", "Receipt-to-250 latency at half the peak rate (10 KiB, 20 sessions):", ""]
        for r in result["half_peak"]:
            lines.append(f"- {r['peer']}: {r['rate']} msgs/s offered, p50 {r['r250_p50_ms']} ms, "
                         f"p99 {r['r250_p99_ms']} ms")
    if result.get("rss"):
        lines += ["", "Memory:", ""]
        for r in result["rss"]:
            if "idle_connections" in r:
                lines.append(f"- {r['idle_connections']} idle connections ({r['generator']}): "
                             f"RSS {r['rss_before_mib']} -> {r['rss_mib']} MiB, peak "
                             f"{r['peak_rss_mib']} MiB, PSS {r['pss_mib']} MiB")
            else:
                lines.append(f"- 20 concurrent 50 MiB messages: peak RSS {r['peak_rss_mib']} "
                             f"MiB (sum of VmHWM), peak PSS {r['peak_pss_mib']} MiB, e2e {r['e2e_per_s']} msgs/s, errors {r['errors']}")
    lines += ["", f"Tools: {result['tools']}. Workers: {result['workers']}. "
              "CPU and RSS are the peer's process tree only (sink and load excluded)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vs-postfix", action="store_true", help="run Postfix through the same load")
    ap.add_argument("--quick", action="store_true", help="few messages (a smoke run)")
    ap.add_argument("--rss", action="store_true", help="also 50 MiB x20 and 5,000 idle")
    ap.add_argument("--builtin", action="store_true",
                    help="use bench/sink.py and bench/load.py even if Postfix's tools exist")
    ap.add_argument("--workers", type=int, default=0, help="relay workers (0 = one per core)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="throughput passes per scenario, median (default 3; 1 with --quick)")
    ap.add_argument("--count", type=int, default=0, help="messages per pass (default by size)")
    ap.add_argument("--sizes", default="10240,102400")
    ap.add_argument("--sessions", default="20,200")
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--profile", default="", help="py-spy raw profiles of relay passes here")
    ap.add_argument("--workdir", default="", help="spools go here (default: a temp dir)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3     # one pass can move 10% on a shared box
    if a.vs_postfix and not postfix_available():
        ap.error("--vs-postfix needs root and the Debian postfix package")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    base = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="relay-bench-",
                                                                   dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    b = Bench(a, base)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    sessions = [int(s) for s in a.sessions.split(",") if s]
    peers = ["relay"] + (["postfix"] if a.vs_postfix else [])
    result: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": machine(), "command": " ".join([os.path.relpath(PY, ROOT) if PY.startswith(str(ROOT)) else PY, *sys.argv]),
                    "workers": a.workers or available_cpus(),
                    "tools": "smtp-source/smtp-sink (throughput), bench/load.py + bench/sink.py"
                             " (latency)" if b.postfix_tools else "bench/load.py + bench/sink.py",
                    "throughput": [], "ratios": [], "half_peak": [], "rss": []}
    print(f"bench: work dir {base}; tools: {result['tools']}", flush=True)
    try:
        for size in sizes:
            for s in sessions:
                count = a.count or (max(2 * s, 60) if a.quick else
                                    (6000 if size <= 16384 else 3000))
                for kind in peers:
                    result["throughput"].append(b.throughput(kind, size, s, count))
        by = {(r["peer"], r["size"], r["sessions"]): r for r in result["throughput"]}
        for (kind, size, s), r in by.items():
            pf = by.get(("postfix", size, s))
            if kind == "relay" and pf and r["e2e_per_s"] and pf["e2e_per_s"]:
                result["ratios"].append({
                    "size": size, "sessions": s,
                    "e2e_ratio": round(r["e2e_per_s"] / pf["e2e_per_s"], 2),
                    "cpu_ratio": round(r["cpu_s_per_1000"] / pf["cpu_s_per_1000"], 2)})
        for r in result["ratios"]:
            print(f"  relay/postfix {r['size'] // 1024} KiB x{r['sessions']}: e2e "
                  f"{r['e2e_ratio']}x, CPU per message {r['cpu_ratio']}x", flush=True)
        for kind in peers:
            peak = by.get((kind, 10240, 20)) or by.get((kind, sizes[0], sessions[0]))
            if peak and peak["e2e_per_s"]:
                result["half_peak"].append(b.half_peak(kind, peak["e2e_per_s"],
                                                       3.0 if a.quick else 10.0))
        if a.rss:
            result["rss"].append(b.big())
            result["rss"].append(b.idle(a.idle))
    finally:
        if not a.workdir:
            shutil.rmtree(base, ignore_errors=True)
    md = markdown(result)
    if not a.no_save:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.date.today().isoformat()}-{platform.node()}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(md)
        print(f"bench: results in {out / stem}.json and .md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
