"""Shared helpers of the POP3, release, digest and client tests: a real store on disk,
an event loop in a thread (so blocking clients such as poplib and fetchmail can talk to
the asyncio servers), and trustme TLS contexts."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import trustme

from relay.config import QuarantineConfig, QuarantineUser
from relay.quarantine.store import QuarantineStore
from relay.queue.model import Envelope, Recipient


def verify(pw: str, stored: str) -> bool:
    # Password hashing belongs to relay.smtp.auth (another part); the store takes the
    # check as a parameter, so these tests use a transparent scheme.
    return stored == "plain:" + pw


USERS = (
    QuarantineUser("bob", "plain:bobpw", ("bob@example.test",)),
    QuarantineUser("carol", "plain:carolpw", ("@carol.test",)),
    QuarantineUser("admin", "plain:adminpw", (), admin=True),
)


def make_store(tmp_path: Path, users=USERS, **kw: Any) -> QuarantineStore:
    cfg = QuarantineConfig(path=str(tmp_path / "q"), users=users, **kw)
    return QuarantineStore(cfg, verify_password=verify)


def envelope(*rcpts: str, sender: str = "alice@example.test", qid: str = "ORIGQID") -> Envelope:
    return Envelope(qid, sender, [Recipient(r, notify="SUCCESS,FAILURE") for r in rcpts],
                    client_ip="192.0.2.1", client_helo="mx.example.test")


def message(subject: str = "hello", body: bytes = b"body line\r\n") -> bytes:
    return (b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n"
            b"\r\n" + body)


class LoopThread:
    """An asyncio loop running in a daemon thread; `run(coro)` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class TLS:
    """A throwaway CA, a server context for 127.0.0.1/localhost and a client context."""

    def __init__(self, tmp_path: Path | None = None) -> None:
        self.ca = trustme.CA()
        # A CN as well as the SANs: fetchmail insists on a subject name.
        cert = self.ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server)
        self.client = ssl.create_default_context()
        self.ca.configure_trust(self.client)
        self.ca_file: Path | None = None
        if tmp_path is not None:
            self.ca_file = tmp_path / "ca.pem"
            self.ca.cert_pem.write_to_path(str(self.ca_file))
