"""Quarantine accounts: users from config and a users file, password checks, throttling.

Takes QuarantineConfig.users and the lines of QuarantineConfig.users_file
(`name:hash[:admin][:addr,addr]`) and hands on User values (which recipient addresses
each owns; admins see everything) to the store and the IMAP/POP3 servers, plus a
per-client login Throttle (relay.smtp.auth) both servers share. Trusts nothing in the users file: bad lines
are skipped with a warning, names are restricted to a safe set (they become directory
names). Password hashes are checked by relay.smtp.auth.verify_password (imported
lazily; another part owns hashing).
"""

from __future__ import annotations

import logging
import re
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


def from_config(u: QuarantineUser) -> User:
    return User(u.name, u.password_hash, frozenset(a.lower() for a in u.addresses), u.admin)
