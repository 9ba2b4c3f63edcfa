"""SMTP listeners: sockets, connection limits, and the parts a session needs.

Takes a ListenerConfig per listener plus the shared parts built by relay.app (spool,
filter chain, resolver, TLS context, authenticator, quarantine); hands each accepted
connection to a relay.smtp.session.Session. Enforces the overall and per-client-IP
connection limits (421 4.7.0; counted across workers, relay.smtp.limits), and knows the
relay-access facts (mynetworks, relay_domains, trusted proxies). With several worker
processes every worker binds the same address with SO_REUSEPORT and the kernel spreads
connections among them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from relay import metrics
from relay.config import Config, ListenerConfig
from relay.pipeline.chain import Chain
from relay.pipeline.protocol import Resolver, Verdict, parse_ip
from relay.queue.model import Envelope
from relay.queue.spool import Spool
from relay.smtp.connection import Connection
from relay.smtp.limits import Limits
from relay.smtp.proto import R_SHUTDOWN
from relay.smtp.session import Session

log = logging.getLogger("relay.smtp")


def _networks(cidrs) -> list:
    return [c.net for c in cidrs]


class SMTPServer:
    def __init__(self, cfg: Config, listener: ListenerConfig, *, spool: Spool, chain: Chain,
                 resolver: Resolver, limits: Limits, ssl_context: ssl.SSLContext | None,
                 authenticator: Any = None, authres: Any = None,
                 quarantine: Callable[[Envelope, bytes, Verdict], Awaitable[None]] | None = None,
                 reuse_port: bool = False):
        self.cfg = cfg
        self.listener = listener
        self.spool = spool
        self.chain = chain
        self.resolver = resolver
        self.limits = limits
        self.ssl_context = ssl_context
        self.authenticator = authenticator
        self.authres = authres
        self._quarantine = quarantine
        self.reuse_port = reuse_port
        self.hostname = cfg.fqdn
        self.draining = False
        self.sessions: set[Session] = set()
        self._server: asyncio.AbstractServer | None = None
        self.update(cfg)

    def update(self, cfg: Config) -> None:
        """Take a reloaded config: limits and access maps apply to new sessions (the
        listener's address and role need a restart)."""
        self.cfg = cfg
        self.limits.total = cfg.smtp.max_connections
        self.limits.per_ip = cfg.smtp.max_connections_per_ip
        self._mynetworks = _networks(cfg.access.mynetworks)
        self._proxies = _networks(cfg.proxy_protocol.trusted)
        self._domains = [d.lower() for d in cfg.access.relay_domains]

    # --- facts for sessions ----------------------------------------------------------

    @staticmethod
    def _in(ip: str, nets: list) -> bool:
        addr = parse_ip(ip)
        return addr is not None and any(addr in n for n in nets)

    def in_mynetworks(self, ip: str) -> bool:
        return self._in(ip, self._mynetworks)

    def trusted_proxy(self, ip: str) -> bool:
        return self._in(ip, self._proxies)

    def relay_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        for d in self._domains:
            if d.startswith("*."):
                d = d[1:]
            if d.startswith("."):
                if domain.endswith(d):
                    return True
            elif domain == d:
                return True
        return False

    def admit(self, ip: str) -> bool:
        return self.limits.admit(ip)

    def release(self, ip: str) -> None:
        self.limits.release(ip)

    async def quarantine(self, env: Envelope, message: bytes, verdict: Verdict) -> None:
        if self._quarantine is None:
            raise OSError("no quarantine store configured")
        await self._quarantine(env, message, verdict)

    # --- running ---------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        addr = self.listener.address
        if sock is not None:
            self._server = await loop.create_server(lambda: Connection(self._handle), sock=sock)
        else:
            self._server = await loop.create_server(
                lambda: Connection(self._handle), host=addr.host or None, port=addr.port,
                reuse_address=True, reuse_port=self.reuse_port or None, backlog=1024)
        log.info("listening on %s (%s, %s)", self.bound, self.listener.name, self.listener.role)

    @property
    def bound(self) -> str:
        if self._server is None or not self._server.sockets:
            return ""
        h, p = self._server.sockets[0].getsockname()[:2]
        return f"{h}:{p}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def _handle(self, conn: Connection) -> None:
        s = Session(self, conn)
        self.sessions.add(s)
        metrics.SESSIONS_ACTIVE.labels(self.listener.name).inc()
        try:
            await s.run()
        finally:
            self.sessions.discard(s)
            metrics.SESSIONS_ACTIVE.labels(self.listener.name).dec()

    def stop_accepting(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting; idle sessions get 421 now, sessions inside DATA may finish
        their message (up to `timeout`), then everything is closed."""
        self.stop_accepting()
        for s in list(self.sessions):
            if not s.in_data:
                s.reply(R_SHUTDOWN, "shutdown")
                s.conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
