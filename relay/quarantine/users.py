"""Quarantine accounts: users from config and a users file, password checks, throttling.

Takes QuarantineConfig.users and the lines of QuarantineConfig.users_file
(`name:hash[:admin][:addr,addr]`) and hands on User values (which recipient addresses
each owns; admins see everything) to the store and the IMAP/POP3 servers, plus a
per-IP LoginThrottle both servers share. Trusts nothing in the users file: bad lines
are skipped with a warning, names are restricted to a safe set (they become directory
names). Password hashes are checked by relay.smtp.auth.verify_password (imported
lazily; another part owns hashing).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from relay.config import QuarantineUser

log = logging.getLogger("relay.quarantine")

USER_RE = re.compile(r"[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]{0,63}")

@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    addresses: frozenset[str] = frozenset()   # lower-case; '@domain' = the whole domain
    admin: bool = False

    def owns(self, address: str) -> bool:
        a = address.lower()
        return a in self.addresses or ("@" in a and "@" + a.rsplit("@", 1)[1] in self.addresses)


def parse_users_file(text: str) -> list[User]:
    """Lines 'name:hash[:admin][:addr,addr]'; '#' comments and blank lines skipped."""
    users = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 2 or not USER_RE.fullmatch(parts[0]) or not parts[1]:
            log.warning("users file line %d: expected name:hash[:admin][:addresses]", n)
            continue
        admin, addrs = False, frozenset()
        for extra in parts[2:]:
            if extra.strip().lower() == "admin":
                admin = True
            elif extra.strip():
                addrs = frozenset(a.strip().lower() for a in extra.split(",") if a.strip())
        users.append(User(parts[0], parts[1], addrs, admin))
    return users


def default_verify(password: str, stored: str) -> bool:
    from relay.smtp.auth import verify_password  # another part owns hashing; lazy import
    return bool(verify_password(password, stored))


class LoginThrottle:
    """Slows down password guessing per client IP: each recent failure adds a delay
    (doubling, capped), forgotten after `window` seconds. Shared by IMAP and POP3."""

    def __init__(self, base: float = 0.5, cap: float = 8.0, window: float = 600.0) -> None:
        self.base, self.cap, self.window = base, cap, window
        self._fails: dict[str, tuple[int, float]] = {}

    def delay(self, ip: str) -> float:
        n, last = self._fails.get(ip, (0, 0.0))
        if not n or time.monotonic() - last > self.window:
            return 0.0
        return min(self.cap, self.base * (2 ** (n - 1)))

    async def wait(self, ip: str) -> None:
        d = self.delay(ip)
        if d:
            await asyncio.sleep(d)

    def failure(self, ip: str) -> None:
        n, last = self._fails.get(ip, (0, 0.0))
        if time.monotonic() - last > self.window:
            n = 0
        self._fails[ip] = (n + 1, time.monotonic())
        if len(self._fails) > 10000:      # bounded memory under a distributed attack
            self._fails.pop(next(iter(self._fails)))

    def success(self, ip: str) -> None:
        self._fails.pop(ip, None)


def from_config(u: QuarantineUser) -> User:
    return User(u.name, u.password_hash, frozenset(a.lower() for a in u.addresses), u.admin)
