"""POP3 server for the quarantine: the asyncio layer over the sans-IO engine.

Takes TCP connections (plain with STLS, or implicit TLS), feeds the bytes to
relay.quarantine.pop3.proto.Connection and does what its events ask: password checks
in a thread (QuarantineStore.authenticate), the maildrop listing at login, streaming a
message (RETR/TOP) in chunks read in a thread, the TLS upgrade, and at QUIT the
deletions. A user's maildrop is its INBOX; an admin's is every folder it has (merged,
each message once). DELE either discards the user's copy (`pop3_delete: discard`,
QUARANTINE_DELETES via=pop3 when the last copy goes) or marks it with the keyword
`$Pop3Hidden`, which hides it from POP3 only (`hide`).

Trusts the store for what a user may see; trusts nothing from the client (limits:
line length and bad commands in the engine; connections per IP, idle timeout, TLS
handshake timeout, failed-login throttle here). USER/PASS and AUTH PLAIN are refused
before TLS unless the listener is implicit TLS or the peer is on loopback.

RFCs: 1939, 2449, 2595, 5034 (see proto.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import QuarantineConfig
from relay.metrics import MAILBOX_LOGINS
from relay.quarantine.pop3 import proto
from relay.quarantine.store import INBOX, QuarantineStore, StoreError

log = logging.getLogger("relay.pop3")

HIDDEN = "$Pop3Hidden"      # IMAP keyword marking a message DELEted over POP3 in 'hide' mode
CHUNK = 64 * 1024
# RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes' duration".
IDLE_TIMEOUT = 600.0
HANDSHAKE_TIMEOUT = 30.0


def uidl_of(base: str) -> str:
    """RFC 1939 7: 1-70 characters 0x21-0x7E, unique and stable per message. The
    Maildir base name is all three unless a long host name makes it too long."""
    if 0 < len(base) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in base):
        return base
    return hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:64]


@dataclass
class _Shared:
    cfg: QuarantineConfig
    store: QuarantineStore
    ssl_context: ssl.SSLContext | None
    implicit_tls: bool
    cleartext_login: bool | None
    idle_timeout: float
    per_ip: dict[str, int] = field(default_factory=dict)
    in_use: set[str] = field(default_factory=set)


class _Session:
    def __init__(self, shared: _Shared, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, ip: str) -> None:
        self.s = shared
        self.reader, self.writer, self.ip = reader, writer, ip
        self.user: str | None = None
        self.locked = False
        # key -> (folder, base); keys are what the engine hands back in events.
        self.index: dict[str, tuple[str, str]] = {}
        cleartext = shared.cleartext_login
        if cleartext is None:
            cleartext = _is_loopback(ip)
        self.conn = proto.Connection(proto.Policy(
            cleartext_login=cleartext or shared.implicit_tls,
            tls_available=shared.ssl_context is not None and not shared.implicit_tls,
            tls_active=shared.implicit_tls))

    async def run(self) -> None:
        conn = self.conn
        try:
            await self._write(conn.greeting())
            while not conn.closed:
                ev = conn.next_event()
                if ev is proto.NEED_DATA:
                    data = await asyncio.wait_for(self.reader.read(CHUNK), self.s.idle_timeout)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(ev, proto.Send):
                    await self._write(ev.data)
                    if ev.close:
                        return
                elif isinstance(ev, proto.Login):
                    await self._login(ev)
                elif isinstance(ev, proto.Retrieve):
                    await self._retrieve(ev)
                elif isinstance(ev, proto.StartTLS):
                    await self._write(ev.data)
                    assert self.s.ssl_context is not None
                    await self.writer.start_tls(self.s.ssl_context,
                                                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
                    conn.tls_started()
                elif isinstance(ev, proto.Update):
                    ok = await self._update(ev.keys)
                    await self._write(conn.update_done(ok))
                    return
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self._write(b"-ERR autologout timer expired\r\n")
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as e:
            log.debug("pop3 connection from %s ended: %s", self.ip, e)

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    # --- login ----------------------------------------------------------------------

    async def _login(self, ev: proto.Login) -> None:
        store = self.s.store
        await store.throttle.wait(self.ip)
        user = await asyncio.to_thread(store.authenticate, ev.user, ev.password)
        if user is None:
            store.throttle.record_failure(self.ip)
            MAILBOX_LOGINS.labels(protocol="pop3", result="failure").inc()
            log.warning("pop3 login failed user=%r ip=%s mechanism=%s", ev.user[:64], self.ip,
                        ev.mechanism)
            await self._write(self.conn.login_failed())
            return
        if user.name in self.s.in_use:
            # RFC 1939 section 8: one session holds the maildrop's exclusive lock.
            MAILBOX_LOGINS.labels(protocol="pop3", result="in_use").inc()
            await self._write(self.conn.login_in_use())
            return
        store.throttle.record_success(self.ip)
        self.s.in_use.add(user.name)
        self.locked, self.user = True, user.name
        try:
            listing = await self._listing(user.name, user.admin)
        except (OSError, StoreError) as e:
            log.error("pop3 maildrop of %s unavailable: %s", user.name, e)
            self._unlock()
            await self._write(self.conn.login_unavailable())
            return
        MAILBOX_LOGINS.labels(protocol="pop3", result="success").inc()
        log.info("pop3 login user=%s ip=%s messages=%d", user.name, self.ip, len(listing))
        await self._write(self.conn.login_succeeded(listing))

    def _unlock(self) -> None:
        if self.locked and self.user:
            self.s.in_use.discard(self.user)
        self.locked = False

    async def _listing(self, user: str, admin: bool) -> list[proto.MessageInfo]:
        store = self.s.store
        names = [INBOX]
        if admin:
            names += [n for n, selectable in store.list_folders(user)
                      if selectable and n != INBOX]
        seen: set[str] = set()
        picked: list[tuple[str, str, object]] = []
        for name in names:
            folder = store.folder(user, name)      # refreshes from disk, on the loop
            for m in folder.messages:
                if HIDDEN in m.flags or m.base in seen:
                    continue
                seen.add(m.base)
                picked.append((name, m.base, folder.path_of(m)))

        def sizes() -> list[int]:
            out = []
            for _, _, path in picked:
                try:
                    out.append(path.stat().st_size)
                except FileNotFoundError:
                    out.append(-1)
            return out

        out = []
        for (name, base, _), size in zip(picked, await asyncio.to_thread(sizes), strict=True):
            if size < 0:
                continue            # expunged meanwhile over IMAP
            key = f"{len(self.index)}"
            self.index[key] = (name, base)
            out.append(proto.MessageInfo(key, uidl_of(base), size))
        return out

    # --- RETR / TOP -----------------------------------------------------------------

    def _find(self, key: str):
        name, base = self.index[key]
        folder = self.s.store.folder(self.user or "", name)
        for m in folder.messages:
            if m.base == base:
                return folder, m
        raise FileNotFoundError(base)

    def _path(self, key: str) -> Path | None:
        try:
            folder, m = self._find(key)
        except (FileNotFoundError, StoreError):
            return None
        return folder.path_of(m)

    async def _retrieve(self, ev: proto.Retrieve) -> None:
        fh = None
        # A flag change over IMAP renames the file between lookup and open: look it up
        # again (the folder rescans when its directory changed) and retry once.
        for _ in range(2):
            path = self._path(ev.key)
            if path is None:
                break
            try:
                fh = await asyncio.to_thread(open, path, "rb")
                break
            except FileNotFoundError:
                continue
        if fh is None:
            await self._write(self.conn.retrieve_failed())
            return
        try:
            size = os.fstat(fh.fileno()).st_size
            await self._write(self.conn.retrieve_ok(size))
            body = proto.BodyWriter(ev.lines)
            while True:
                chunk = await asyncio.to_thread(fh.read, CHUNK)
                if not chunk:
                    break
                out = body.feed(chunk)
                if out:
                    await self._write(out)
                if ev.lines is not None and body.done:
                    break
            await self._write(body.finish())
        finally:
            fh.close()

    # --- UPDATE ---------------------------------------------------------------------

    async def _update(self, keys: tuple[str, ...]) -> bool:
        if not keys:
            return True
        user = self.user or ""
        hide = self.s.cfg.pop3_delete == "hide"
        ok = True
        by_folder: dict[str, list[str]] = {}
        for key in keys:
            name, base = self.index[key]
            by_folder.setdefault(name, []).append(base)
        for name, bases in by_folder.items():
            try:
                folder = self.s.store.folder(user, name)
            except StoreError:
                ok = False
                continue
            wanted = set(bases)
            found = [m for m in folder.messages if m.base in wanted]
            ok = ok and len(found) == len(wanted)
            for m in found:
                log.info("pop3 %s qid=%s user=%s folder=%s",
                         "hid" if hide else "deleted", m.qid, user, name)
            if hide:
                for m in found:
                    if folder.set_flags(m.uid, m.flags | {HIDDEN}) is None:
                        ok = False
            else:
                folder.expunge([m.uid for m in found], via="pop3", who=user)
        return ok

    def close(self) -> None:
        self._unlock()


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


async def start_pop3(cfg: QuarantineConfig, store: QuarantineStore,
                     ssl_context: ssl.SSLContext | None, host: str, port: int,
                     implicit_tls: bool = False, *, cleartext_login: bool | None = None,
                     idle_timeout: float = IDLE_TIMEOUT) -> asyncio.Server:
    """Listen for POP3 on host:port (port 0: the OS picks; see server.sockets).

    `implicit_tls` (POP3S, RFC 8314) needs `ssl_context`; without it, STLS is offered when
    `ssl_context` is given. `cleartext_login`: None allows USER/PASS before TLS only
    from loopback peers; True/False force it.
    """
    if implicit_tls and ssl_context is None:
        raise ValueError("implicit TLS needs an ssl_context")
    shared = _Shared(cfg, store, ssl_context, implicit_tls, cleartext_login, idle_timeout)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "unknown"
        count = shared.per_ip.get(ip, 0)
        session = None
        try:
            if count >= cfg.max_connections_per_ip:
                log.warning("pop3 too many connections from %s", ip)
                writer.write(b"-ERR [SYS/TEMP] too many connections from your address\r\n")
                await writer.drain()
                return
            shared.per_ip[ip] = count + 1
            session = _Session(shared, reader, writer, ip)
            await session.run()
        except asyncio.CancelledError:
            # Shutdown: this task is the connection's top level, nobody awaits it (and
            # Python 3.11's stream callback would log a cancelled handler as an error).
            pass
        except Exception:
            log.exception("pop3 session from %s failed", ip)
        finally:
            if session is not None:
                session.close()
                left = shared.per_ip.get(ip, 1) - 1
                if left > 0:
                    shared.per_ip[ip] = left
                else:
                    shared.per_ip.pop(ip, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(
        handle, host, port, ssl=ssl_context if implicit_tls else None,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT if implicit_tls else None,
        limit=CHUNK)
