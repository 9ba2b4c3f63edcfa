"""Helpers for the operations tests (tests/test_ops_*.py): the relay as a process with
`relay queue drain` wired, SMTP peers in a background loop, /metrics and /readyz reads.

- `OpsRelay(tmp_path, cfg)`: RelayProcess started through this file (`python
  tests/_ops.py serve -c FILE`), which passes the app's quiesce callback to
  relay.queue.control.poll as long as relay.app does not do it itself (see
  `install_quiesce`; it retires itself once App has a `quiesce` method).
- `Peers`: aiosmtpd sinks (tests/_delivery.Sink) in a daemon thread's loop.
- `scrape(port)` -> {(name, labels): value}; `value(samples, name, **labels)`.
- `get(port, path)` -> (status, body) over HTTP/1.1 on loopback.
- `send(port, sender, rcpts, body, **opts)`: one smtplib transaction, returns the
  queue id from the 250 (or the error reply).
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import os
import smtplib
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _delivery import Sink, start_sinks  # noqa: E402

from tests._relay import ROOT, RelayProcess  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --- the relay with `relay queue drain` wired ---------------------------------------

async def quiesce(app: Any) -> None:
    """What relay.app's App.quiesce should do (proposed to the lead): readiness off
    (listeners closed), no new mail (sessions inside DATA finish), own delivery
    stopped. The process runs on until SIGTERM, which then stops it as usual."""
    from relay import metrics
    metrics.DRAINING.set(1)
    await asyncio.gather(*(s.drain(30.0) for s in app.smtp))
    if app.scheduler is not None:
        await app.scheduler.stop()


def install_quiesce() -> None:
    from relay import app as app_mod
    from relay.queue import control
    if hasattr(app_mod.App, "quiesce"):
        return      # relay.app wires it itself
    orig = control.poll

    def poll(spool, flush=None, interval: float = 0.5, quiesce_cb=None):
        owner = getattr(flush, "__self__", None)       # App._flush -> the App
        if quiesce_cb is None and owner is not None:
            quiesce_cb = functools.partial(quiesce, owner)
        return orig(spool, flush, interval, quiesce_cb)
    control.poll = poll


class OpsRelay(RelayProcess):
    def command(self) -> list[str]:
        # This module as the entry point: it installs the test shims, then runs the CLI.
        return [sys.executable, str(Path(__file__).resolve()), "serve", "-c",
                str(self.config_path)]

    def cli(self, *args: str, timeout: float = 120,
            config: Path | None = None) -> subprocess.CompletedProcess:
        """`relay ARGS -c <this config>` as the operator runs it."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("RELAY_CONFIG", None)
        return subprocess.run([sys.executable, "-m", "relay", *args, "-c",
                               str(config or self.config_path)], cwd=self.dir, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- SMTP peers in a thread ------------------------------------------------------------

class Peers:
    """aiosmtpd sinks on 127.0.0.1 in a daemon thread; `add(sink) -> port`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []

    def run(self, coro: Coroutine, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, sink: Sink) -> int:
        port, servers = self.run(start_sinks(["127.0.0.1"], [sink]))
        self.servers += servers
        return port

    def close(self) -> None:
        async def shut() -> None:
            for s in self.servers:
                s.close()
        self.run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- HTTP: /metrics and /readyz --------------------------------------------------------

def get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200, body
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value (0 when absent: a labelled counter not yet moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    """Sum over every label combination of `name`."""
    return sum(v for (n, _), v in samples.items() if n == name)


# --- SMTP client -----------------------------------------------------------------------

def send(port: int, sender: str, rcpts: list[str], body: bytes,
         mail_options: tuple[str, ...] = (), rcpt_options: tuple[str, ...] = ()) -> str:
    """One transaction with smtplib; the queue id from the 250 after DATA. Raises
    smtplib's exceptions for refusals."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, msg = s.mail(sender, list(mail_options))
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, msg, sender)
        ok = []
        for r in rcpts:
            code, msg = s.rcpt(r, list(rcpt_options))
            if code in (250, 251):
                ok.append(r)
        if not ok:
            raise smtplib.SMTPRecipientsRefused({r: (code, msg) for r in rcpts})
        code, msg = s.data(body)
        if code != 250:
            raise smtplib.SMTPDataError(code, msg)
        return msg.split()[-1].decode()


def message(subject: str, size: int = 0) -> bytes:
    return (b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: " + subject.encode() +
            b"\r\nMessage-ID: <" + subject.replace(" ", ".").encode() + b"@src.test>\r\n\r\n"
            b"body\r\n.dot line\r\n" + b"x" * size + b"\r\n")


if __name__ == "__main__":
    install_quiesce()
    from relay.cli import main
    sys.exit(main(sys.argv[1:]))
