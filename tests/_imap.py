"""Shared helpers for the IMAP tests: a quarantine store with three users and an IMAP
server running on its own event loop in a thread, so blocking clients (imaplib,
IMAPClient) talk to it over real loopback sockets."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from relay.config import QuarantineConfig, QuarantineUser
from relay.quarantine.imap.server import IMAPServer
from relay.quarantine.store import QuarantineStore
from relay.queue.model import Envelope, Recipient

USERS = (
    QuarantineUser("alice", "plain:alicepw", ("alice@example.test",)),
    QuarantineUser("bob", "plain:bobpw", ("bob@example.test",)),
    QuarantineUser("admin", "plain:adminpw", (), admin=True),
)


def fake_verify(pw: str, stored: str) -> bool:
    # relay.smtp.auth (scrypt) belongs to another part; the IMAP tests need only a check.
    return stored == "plain:" + pw


class Running:
    """An IMAP server on a background loop. `call(coro)` runs a coroutine there."""

    def __init__(self, root: Path, ssl_context=None, implicit_tls=False, verify=fake_verify,
                 server_kw: dict | None = None, **cfg_kw) -> None:
        self.root = root
        self.verify = verify
        self.server_kw = server_kw or {}
        self.ssl_context = ssl_context
        self.implicit_tls = implicit_tls
        self.cfg = QuarantineConfig(path=str(root), users=USERS, **cfg_kw)
        self.released: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store: QuarantineStore = self.call(self._make_store())
        self.server: IMAPServer | None = None
        self.start()

    async def _make_store(self) -> QuarantineStore:
        return QuarantineStore(self.cfg, verify_password=self.verify)

    async def on_release(self, user: str, qid: str) -> None:
        self.released.append((user, qid))
        await self.store.discard(qid, via="release", who=user)

    def start(self, port: int = 0) -> None:
        async def go() -> IMAPServer:
            s = IMAPServer(self.cfg, self.store, self.ssl_context, "127.0.0.1", port,
                           self.implicit_tls, self.on_release, **self.server_kw)
            await s.start()
            return s
        self.server = self.call(go())

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def put(self, message: bytes, *rcpts: str, mailbox: str = "spam", filter: str = "spamf",
            reason: str = "score 9") -> str:
        env = Envelope("Q" + str(len(message)), "sender@example.test",
                       [Recipient(r) for r in rcpts])
        return self.call(self.store.put(env, message, mailbox, filter, reason))

    def restart(self) -> None:
        """A new store and server on the same directory (as after a process restart)."""
        self.call(self.server.stop())
        self.store = self.call(self._make_store())
        self.start()

    def stop(self) -> None:
        if self.server:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


MULTIPART = (
    b"From: \"Doe, John\" <john@example.test>, Group: a@x.test, b@y.test;\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9_report?=\r\n"
    b"Date: Tue, 2 Jan 2024 03:04:05 +0100\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"BOUND\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--BOUND\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"first part with needle\r\n"
    b"--BOUND\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"Subject: inner\r\n"
    b"From: in@example.test\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--BOUND\r\n"
    b"Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=\"a.bin\"\r\n"
    b"\r\n"
    b"AAEC\r\n"
    b"--BOUND--\r\n"
    b"epilogue\r\n"
)

# Junk mail is the normal case: none of these may crash ENVELOPE, BODYSTRUCTURE, SEARCH.
JUNK = [
    b"",
    b"\r\n",
    b"no header at all",
    b"Date: not a date\r\nSender: <<<>>>\r\nFrom: @@@, \"unterminated\r\n\r\nx",
    b"From: =?bogus?x?zzz?=\r\nSubject: =?utf-8?b?!!!?=\r\n\r\n",
    b"Subject: \xff\xfe 8-bit \x80\r\nFrom: J\xf6rg <j@x.test>\r\n\r\n\xff",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nnever closed",
    b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n",
    b"Content-Type: ;;;==\r\nContent-Disposition: ;\r\n\r\nx",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: text/plain; charset=no-such-charset\r\nContent-Transfer-Encoding: "
    b"base64\r\n\r\n!!!!",
    b"Content-Type: multipart/alternative; boundary=a\r\n\r\n" + b"--a\r\nContent-Type: "
    b"multipart/mixed; boundary=a\r\n\r\n" * 60,
    b"To: group: ;\r\nCc: undisclosed-recipients:;\r\nBcc: (comment only)\r\n\r\n",
    b"From: a\x00b <c\x00d@e>\r\nDate: Mon, 99 Foo 99999 99:99:99 +9999\r\n\r\n",
    b"Date: Mon, 1 Jan 10000 00:00:00 +0000\r\nIn-Reply-To: \r\n\r\n",
    b"\n\nbare LF only\n",
    b"Subject: folded\r\n\tcontinued\r\n  more\r\n\r\nbody",
    b" leading continuation\r\nX: y\r\n\r\n",
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n",
]
