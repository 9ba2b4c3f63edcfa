"""Test helper for the DKIM, DMARC and Authentication-Results tests: a real DNS server
(dnsmasq on loopback, a free port) serving TXT records, and small builders.

Used by tests/test_filter_dkim.py and tests/test_filter_dmarc.py only.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from relay.dns import DNSResolver
from relay.pipeline.protocol import Context

CONFORMANCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "conformance")
DKIM_VECTORS = os.path.join(CONFORMANCE, "dkim")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _txt_arg(name: str, value: str) -> str:
    # One TXT record; strings of at most 255 octets (RFC 1035 3.3.14), as a long
    # DKIM key is published.
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    # A config-file line: there dnsmasq honours quotes, so values may hold commas.
    return f"txt-record={name}," + ",".join(f'"{c}"' for c in chunks)


class Dnsmasq:
    """dnsmasq answering `txt` ({name: [record, ...]}) and NXDOMAIN for anything else
    under `zones`. Use as a context manager; `.resolver()` gives a relay DNSResolver."""

    def __init__(self, txt: Mapping[str, Iterable[str]], zones: Iterable[str],
                 timeout_zone: str | None = None):
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="h3dns")
        conf = os.path.join(self.tmp, "records.conf")
        with open(conf, "w", encoding="utf-8") as f:
            for name, values in txt.items():
                for v in values:
                    f.write(_txt_arg(name, v) + "\n")
        args = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
                f"--conf-file={conf}", f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--no-poll",
                "--user=nobody", f"--pid-file={self.tmp}/pid"]
        args += [f"--local=/{z}/" for z in sorted(set(zones))]
        if timeout_zone:
            # Forward to a port nobody answers on: a resolver timeout.
            args.append(f"--server=/{timeout_zone}/127.0.0.1#9")
        self.args = args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Dnsmasq:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        q = dns.message.make_query("ready.invalid.", dns.rdatatype.TXT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read().decode()}")
            try:
                dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
                return self
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def resolver(self, timeout: float = 2.0) -> DNSResolver:
        return DNSResolver([("127.0.0.1", self.port)], timeout=timeout)


def read_testkeys(path: str) -> dict[str, list[str]]:
    """OpenDKIM TestPublicKeys format: `name<space>TXT-value` per line."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, value = line.split(None, 1)
                out.setdefault(name.lower().rstrip("."), []).append(value)
    return out


def context(resolver, message: bytes, *, trusted: bool = False,
            auth_results=None) -> Context:
    """A data-stage Context as the session builds it."""
    async def load() -> bytes:
        return message

    ctx = Context(client_ip="127.0.0.1", client_port=40000, listener="mta",
                  resolver=resolver, helo="client.test", trusted=trusted,
                  queue_id="TESTQID", mail_from="a@example.test", rcpts=["b@example.test"])
    ctx._load = load
    if auth_results:
        ctx.auth_results.extend(auth_results)
    return ctx


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def rsa_key(bits: int = 2048, fmt=None) -> tuple[bytes, str]:
    """A fresh RSA signing key (PEM) and its DKIM TXT record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = k.private_bytes(serialization.Encoding.PEM, fmt or serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}"


def ed25519_key() -> tuple[bytes, str]:
    """A fresh Ed25519 signing key (PKCS#8 PEM) and its DKIM TXT record (RFC 8463)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    k = ed25519.Ed25519PrivateKey.generate()
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
