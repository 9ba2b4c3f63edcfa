"""Run the real relay (`python -m relay serve -c FILE`) as a process for end-to-end tests.

`RelayProcess(tmp_path, config_dict)` writes the YAML, picks free loopback ports for
every listener it does not get one for, starts the relay, waits until SMTP answers, and
offers stop() (SIGTERM), kill() (SIGKILL), restart(), and the spool's contents.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def wait_for(cond, limit: float = 30.0, what: str = "condition", poll: float = 0.05) -> None:
    """Wait until cond() is true: a deadline against hangs, never a speed assertion."""
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


def wait_http(host: str, port: int, proc: subprocess.Popen | None = None,
              timeout: float = 20.0) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise TimeoutError(f"no /healthz on {host}:{port}")
        time.sleep(0.05)


class RelayProcess:
    def __init__(self, tmp_path: Path, config: dict[str, Any] | None = None,
                 start: bool = True):
        self.dir = tmp_path
        cfg = dict(config or {})
        self.smtp_port = free_port()
        cfg.setdefault("hostname", "relay.test")
        cfg.setdefault("listeners", [{"name": "mta", "address": f"127.0.0.1:{self.smtp_port}"}])
        cfg.setdefault("spool", {})
        cfg["spool"].setdefault("path", str(tmp_path / "spool"))
        cfg["spool"].setdefault("min_free_space", 0)
        cfg.setdefault("http", {})
        self.http_port = free_port()
        cfg["http"].setdefault("address", f"127.0.0.1:{self.http_port}")
        cfg["http"].setdefault("min_free_space", 0)
        q = cfg.setdefault("quarantine", {})
        q.setdefault("path", str(tmp_path / "quarantine"))
        q.setdefault("imap_address", None)
        q.setdefault("pop3_address", None)
        cfg.setdefault("log", {"level": "info"})
        self.config = cfg
        self.config_path = tmp_path / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp_path / "relay.log"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    @property
    def spool_path(self) -> Path:
        return Path(self.config["spool"]["path"])

    def command(self) -> list[str]:
        return [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path)]

    def python_path(self) -> list[str]:
        return [str(ROOT)]

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(self.python_path())}
        env.pop("RELAY_CONFIG", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop/kill
        self.proc = subprocess.Popen(self.command(), cwd=self.dir, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        # Ready when /healthz answers (the SMTP listeners are bound before HTTP starts).
        # Probing the SMTP port instead would hold a session slot for a moment, and
        # tests of per-client limits would count it.
        host, _, port = self.config["http"]["address"].rpartition(":")
        try:
            wait_http(host.strip("[]"), int(port), self.proc)
        except TimeoutError:
            self.kill()
            raise RuntimeError("relay did not start:\n" + self.log()) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def restart(self) -> None:
        self.start()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    # --- looking into the spool (relay stopped) --------------------------------------

    def queued(self) -> dict[str, tuple[Any, bytes]]:
        """{queue_id: (Envelope, message bytes)} read from the spool offline."""
        from relay.config import Size, SpoolConfig
        from relay.queue.spool import Spool

        async def read():
            out = {}
            writers = sorted({p.name.split("-")[0] for p in
                              (self.spool_path / "segments").glob("w*-*.log")})
            for w in writers:
                n = int(w[1:])
                sp = Spool(SpoolConfig(path=str(self.spool_path), min_free_space=Size(0)),
                           worker=n, workers=n + 1)
                await sp.open(adopt=False)
                for env in sp.envelopes():
                    out[env.queue_id] = (env, await sp.read(env.queue_id))
                await sp.close()
            return out
        return asyncio.run(read())


def strip_trace(message: bytes) -> bytes:
    """Remove the header lines the relay prepends (Received and its continuation lines,
    Authentication-Results) from the top of a stored message."""
    lines = message.split(b"\r\n")
    i = 0
    ours = (b"received:", b"authentication-results:")
    while i < len(lines) and lines[i].lower().startswith(ours):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


class RawClient:
    """A byte-level SMTP client for what smtplib will not send."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10,
                 source: str | None = None):
        """source: the loopback address the connection comes from."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        """One full (possibly multi-line) reply: (code, text of the last line)."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed: " + repr(self.buf))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line

    def closed(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return True
        if data:
            self.buf += data
            return False
        return True

    def close(self) -> None:
        self.sock.close()
