"""Test DNS peers: dnsmasq on loopback, a tiny scriptable DNS server, a zonedata Resolver.

- `start_dnsmasq(tmp_path, args) -> (host, port, stop)` / `with dnsmasq(tmp_path, args)
  as (host, port)`: a real dnsmasq on 127.0.0.1 on a free port, authoritative for what
  `args` gives (`--txt-record=...`, `--host-record=...`, `--local=/test/` ...), nothing
  forwarded off the box. Waits until it answers. Args go to dnsmasq without a shell,
  so write `--txt-record=x.test,v=spf1 -all` (no quotes: they would be kept; a comma
  starts a new character-string).
- `FakeDNS(records, servfail=..., drop=...)`: a UDP DNS server in a thread (dnspython's
  message API) for what dnsmasq cannot do: SERVFAIL, never answering. Use as a context
  manager; `.host`, `.port`, `.queries` (names asked, in order).
- `ZoneResolver(zonedata)`: a relay.pipeline Resolver over the openspf test-suite
  zonedata format (no network), see /work/shared/conformance/spf/README.md.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from relay.pipeline.protocol import DNSError, Resolver

HOST = "127.0.0.1"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS serves both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((HOST, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _answers(host: str, port: int) -> bool:
    q = dns.message.make_query("ready.invalid.", "A")
    try:
        dns.query.udp(q, host, port=port, timeout=0.2)
    except (dns.exception.Timeout, OSError):
        return False
    return True


def start_dnsmasq(tmp_path: Path, args: Iterable[str]) -> tuple[str, int, Callable[[], None]]:
    """Start dnsmasq serving `args`; returns (host, port, stop). Retries on a port race."""
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    args = list(args)
    for _ in range(5):
        port = free_port()
        cmd = [exe, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
               f"--listen-address={HOST}", "--bind-interfaces", "--no-resolv", "--no-hosts",
               "--no-poll", f"--pid-file={tmp_path / f'dnsmasq-{port}.pid'}", *args]
        if os.geteuid() == 0:
            cmd.append("--user=nobody")
        log = open(tmp_path / f"dnsmasq-{port}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

        def stop(proc: subprocess.Popen = proc, log: Any = log) -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(HOST, port):
                return HOST, port, stop
            time.sleep(0.05)
        stop()
        text = (tmp_path / f"dnsmasq-{port}.log").read_text(errors="replace")
        if "in use" not in text:
            raise RuntimeError(f"dnsmasq did not start: {text.strip()}")
    raise RuntimeError("dnsmasq: no free port after 5 tries")


@contextlib.contextmanager
def dnsmasq(tmp_path: Path, args: Iterable[str]) -> Iterator[tuple[str, int]]:
    host, port, stop = start_dnsmasq(tmp_path, args)
    try:
        yield host, port
    finally:
        stop()


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class FakeDNS:
    """A scriptable UDP DNS server on 127.0.0.1 (a thread, so sync and async tests can
    share it). `records` maps (name, TYPE) to rdata texts ('127.0.0.2', '"txt"',
    '10 mx.example.'); a name with no record of any type is NXDOMAIN, of another type
    NODATA. Names in `servfail` get SERVFAIL, names in `drop` get no answer at all; a
    leading '.' in those sets matches every name below it."""

    def __init__(self, records: Mapping[tuple[str, str], Iterable[str]] | None = None,
                 servfail: Iterable[str] = (), drop: Iterable[str] = ()) -> None:
        self.records = {(_norm(n), t.upper()): list(v) for (n, t), v in (records or {}).items()}
        self.names = {n for n, _ in self.records}
        self.servfail = {s.lower() for s in servfail}
        self.drop = {s.lower() for s in drop}
        self.queries: list[tuple[str, str]] = []
        self.host = HOST
        self.port = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _hit(name: str, names: set[str]) -> bool:
        return name in names or any(n.startswith(".") and (name.endswith(n) or name == n[1:])
                                    for n in names)

    def __enter__(self) -> FakeDNS:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="fakedns", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self._sock:
            self._sock.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                continue
            try:
                data, addr = self._sock.recvfrom(4096)
                msg = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - a test server ignores junk
                continue
            reply = self._answer(msg)
            if reply is not None:
                self._sock.sendto(reply.to_wire(), addr)

    def _answer(self, msg: dns.message.Message) -> dns.message.Message | None:
        q = msg.question[0]
        name = _norm(q.name.to_text())
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        if self._hit(name, self.drop):
            return None
        resp = dns.message.make_response(msg)
        resp.flags |= dns.flags.AA
        if self._hit(name, self.servfail):
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in self.records:
            resp.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN,
                                                        q.rdtype, self.records[name, rdtype]))
        elif name not in self.names:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        return resp


class ZoneResolver(Resolver):
    """The openspf suite's zonedata as a Resolver: absent names are NXDOMAIN, TIMEOUT
    makes a type with no records raise DNSError, SPF records double as TXT unless the
    name has TXT entries of its own (`TXT: NONE` = none at all), CNAMEs are followed."""

    def __init__(self, zonedata: Mapping[str, Any]) -> None:
        self.zone = {_norm(k): v for k, v in zonedata.items()}
        self.queries: list[tuple[str, str]] = []

    @staticmethod
    def _text(value: Any) -> str:
        if isinstance(value, list):
            return "".join(value)
        return str(value)

    def _values(self, entries: list[Any], rdtype: str) -> list[str]:
        def of(t: str) -> list[Any]:
            return [e[t] for e in entries if isinstance(e, dict) and t in e]
        if rdtype == "TXT":
            txt = of("TXT")
            vals = txt if txt else of("SPF")
            return [self._text(v) for v in vals if v != "NONE"]
        if rdtype == "MX":
            return [f"{p} {_norm(h) or '.'}" for p, h in of("MX")]
        if rdtype in ("PTR", "CNAME"):
            return [_norm(v) for v in of(rdtype)]
        return [str(v) for v in of(rdtype)]

    async def query(self, name: str, rdtype: str) -> list[str]:
        self.queries.append((name, rdtype))
        n = _norm(name)
        for _ in range(10):
            entries = self.zone.get(n)
            if entries is None:
                return []
            cname = self._values(entries, "CNAME")
            if cname and rdtype != "CNAME":
                n = cname[0]
                continue
            vals = self._values(entries, rdtype)
            if not vals and "TIMEOUT" in entries:
                raise DNSError(f"{rdtype} {name}: timeout")
            return vals
        raise DNSError(f"{rdtype} {name}: CNAME loop")

    async def exists(self, name: str) -> bool:
        return _norm(name) in self.zone
