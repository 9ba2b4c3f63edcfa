"""Access lists: client networks, HELO sanity, sender and recipient lists, and
recipient verification for the domains we know the users of.

Takes the client address (connect), the HELO name (helo), MAIL FROM (mail) and each
RCPT TO (rcpt). Hands on: accept for an allow-listed client, sender or recipient (the
rest of that stage's filters are skipped; the relay-access decision of relay.smtp is
not a filter and is not bypassed), reject for a deny-listed one, 501/504/550 for a bad
HELO, 550 5.1.1 for an unknown user of a verified domain.

When allow and deny both match, the more specific entry wins (longest CIDR prefix;
an address over '@domain' over '.suffix', a longer suffix over a shorter one) and a tie
is denied. Trusts its own configuration and the user list file (re-read when its mtime
changes, at most once a second, off the event loop); names from the client are
compared case-insensitively and never echoed beyond the reply codes.
RFCs: 5321 (4.1.3 address literals, 4.1.4 HELO, 4.5.1 postmaster), 3463.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import ConfigError, Domain, Network, parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    Context,
    Filter,
    FilterEnv,
    Stage,
    Verdict,
    parse_ip,
)

log = logging.getLogger("relay.filters.access")

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ClientRules:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()


@dataclass(frozen=True)
class HeloRules:
    # HELO naming this relay (its hostname or `own_names`): a forgery.
    reject_own_name: bool = True
    # [address literal] that is not the client's address.
    reject_literal_mismatch: bool = True
    # An address without brackets (RFC 5321 4.1.3 requires them).
    reject_bare_ip: bool = True
    # Not a host name nor an address literal.
    reject_invalid: bool = True
    # A host name without a dot (off by default: many internal hosts send one).
    require_fqdn: bool = False
    own_names: tuple[str, ...] = ()
    # Clients from mynetworks or authenticated are not checked.
    skip_trusted: bool = True


@dataclass(frozen=True)
class AddressRules:
    # 'user@example.com', '@example.com' or 'example.com' (that domain),
    # '.example.com' (its subdomains), '<>' (the null sender).
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyRules:
    # Domains whose every valid address is listed; empty: the domains of the list.
    domains: tuple[Domain, ...] = ()
    # Valid addresses; '@example.com' accepts every user of that domain.
    addresses: tuple[str, ...] = ()
    # One address per line, '#' comments; re-read when it changes.
    file: str = ""
    # 'user+tag@example.com' is checked as 'user@example.com' with '+'.
    recipient_delimiter: str = ""


@dataclass(frozen=True)
class AccessOptions:
    client: ClientRules = ClientRules()
    helo: HeloRules = HeloRules()
    senders: AddressRules = AddressRules()
    recipients: AddressRules = AddressRules()
    verify: VerifyRules = VerifyRules()


# --- matching ------------------------------------------------------------------------


def _best_prefix(addr: IPAddr, nets: Iterable[Network]) -> int:
    return max((n.net.prefixlen for n in nets if n.net.version == addr.version
                and addr in n.net), default=-1)


def network_decision(addr: IPAddr, rules: ClientRules) -> str | None:
    """'allow', 'deny' or None: the longest matching prefix wins, a tie denies."""
    a, d = _best_prefix(addr, rules.allow), _best_prefix(addr, rules.deny)
    if a < 0 and d < 0:
        return None
    return "allow" if a > d else "deny"


class AddressList:
    """Patterns of AddressRules, indexed so a lookup is a few dict probes."""

    def __init__(self, patterns: Iterable[str], key: str) -> None:
        self.exact: set[str] = set()
        self.domains: set[str] = set()
        self.suffixes: set[str] = set()
        for i, raw in enumerate(patterns):
            p = raw.strip().lower()
            if p == "<>":
                self.exact.add("")
            elif p.startswith("."):
                self.suffixes.add(_domain(p[1:], f"{key}[{i}]"))
            elif p.startswith("@"):
                self.domains.add(_domain(p[1:], f"{key}[{i}]"))
            elif "@" in p:
                local, _, dom = p.rpartition("@")
                if not local:
                    raise ConfigError(f"{key}[{i}]: empty local part in {raw!r}")
                self.exact.add(f"{local}@{_domain(dom, f'{key}[{i}]')}")
            else:
                self.domains.add(_domain(p, f"{key}[{i}]"))

    def __bool__(self) -> bool:
        return bool(self.exact or self.domains or self.suffixes)

    def specificity(self, address: str) -> int:
        """How specifically `address` is matched: 0 not at all; an address beats a
        domain, which beats any suffix; a longer suffix beats a shorter one."""
        address = address.lower()
        if address in self.exact:
            return 1000
        dom = address.rpartition("@")[2]
        if not address:
            return 0
        if dom in self.domains:
            return 999
        best = 0
        labels = dom.split(".")
        for i in range(1, len(labels)):
            if ".".join(labels[i:]) in self.suffixes:
                best = max(best, len(labels) - i)
        return best


def _domain(value: str, key: str) -> str:
    try:
        return str(Domain.parse(value))
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def address_decision(address: str, allow: AddressList, deny: AddressList) -> str | None:
    a, d = allow.specificity(address), deny.specificity(address)
    if not a and not d:
        return None
    return "allow" if a > d else "deny"


# --- HELO ---------------------------------------------------------------------------

_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def helo_problem(helo: str, client: IPAddr | None, rules: HeloRules,
                 own: set[str]) -> Verdict | None:
    """The reply refusing `helo`, or None if it passes the enabled checks."""
    if helo.startswith("[") and helo.endswith("]"):
        inner = helo[1:-1]
        v6 = inner[:5].lower() == "ipv6:"
        try:
            lit = ipaddress.ip_address(inner[5:] if v6 else inner)
        except ValueError:
            lit = None
        if lit is None or (lit.version == 6) != v6:
            if rules.reject_invalid:
                return Verdict.reject("Helo command rejected: invalid address literal",
                                      501, "5.5.2")
            return None
        if isinstance(lit, ipaddress.IPv6Address) and lit.ipv4_mapped:
            lit = lit.ipv4_mapped
        if rules.reject_literal_mismatch and client is not None and lit != client:
            return Verdict.reject("Helo command rejected: address literal is not yours",
                                  550, "5.7.1")
        return None
    try:
        ipaddress.ip_address(helo)
        bare_ip = True
    except ValueError:
        bare_ip = False
    if bare_ip:
        if rules.reject_bare_ip:
            return Verdict.reject("Helo command rejected: put an address literal in "
                                  "brackets", 501, "5.5.2")
        return None
    name = helo
    if not name.isascii():
        try:    # RFC 6531 3.7.1: U-labels are allowed with SMTPUTF8
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
    if not _HOSTNAME_RE.fullmatch(name) or len(name.rstrip(".")) > 253:
        if rules.reject_invalid:
            return Verdict.reject("Helo command rejected: invalid host name", 501, "5.5.2")
        return None
    if rules.require_fqdn and "." not in name.rstrip("."):
        return Verdict.reject("Helo command rejected: need a fully-qualified host name",
                              504, "5.5.2")
    if rules.reject_own_name and name.lower().rstrip(".") in own:
        return Verdict.reject("Helo command rejected: that host name is ours", 550, "5.7.1")
    return None


# --- the user list for verification ----------------------------------------------------

class UserList:
    """Valid recipients from config and a file; the file is re-read when it changes."""

    RECHECK = 1.0   # seconds between stat() calls of the file

    def __init__(self, rules: VerifyRules, key: str) -> None:
        self.static = {self._norm(a, f"{key}.addresses[{i}]")
                       for i, a in enumerate(rules.addresses)}
        self.path = Path(rules.file) if rules.file else None
        self.loaded: set[str] = set()
        self._mtime: float | None = None
        self._checked = 0.0
        if self.path is not None:
            try:
                self._reload()
            except OSError as e:
                raise ConfigError(f"{key}.file: cannot read {self.path} ({e.strerror})") from None
        listed = {a.rpartition("@")[2] for a in self.static | self.loaded}
        self.domains = ({str(d) for d in rules.domains} if rules.domains else listed)
        self.delimiter = rules.recipient_delimiter

    @staticmethod
    def _norm(address: str, key: str) -> str:
        a = address.strip().lower()
        local, at, dom = a.rpartition("@")
        if not at or not dom:
            raise ConfigError(f"{key}: expected 'user@domain' or '@domain', got {address!r}")
        return f"{local}@{_domain(dom, key)}"

    def _reload(self) -> None:
        assert self.path is not None
        st = os.stat(self.path)
        if st.st_mtime == self._mtime:
            return
        out = set()
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                out.add(self._norm(line, f"{self.path}:{n}"))
            except ConfigError as e:
                log.warning("access user list: %s (line ignored)", e)
        self.loaded, self._mtime = out, st.st_mtime
        log.info("access user list %s: %d addresses", self.path, len(out))

    async def refresh(self) -> None:
        if self.path is None or time.monotonic() - self._checked < self.RECHECK:
            return
        self._checked = time.monotonic()
        try:
            await asyncio.to_thread(self._reload)
        except OSError as e:
            log.warning("access user list %s unreadable, keeping the old one: %s",
                        self.path, e.strerror)

    def covers(self, domain: str) -> bool:
        return any(domain == d or (d.startswith(".") and domain.endswith(d))
                   or (d.startswith("*.") and domain.endswith(d[1:])) for d in self.domains)

    def valid(self, address: str) -> bool:
        local, _, dom = address.lower().rpartition("@")
        if self.delimiter:
            local = local.split(self.delimiter, 1)[0] or local
        for key in (f"{local}@{dom}", f"@{dom}"):
            if key in self.static or key in self.loaded:
                return True
        return False


# --- the filter ------------------------------------------------------------------------

class AccessFilter(Filter):
    name = "access"

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        key = f"filters.{self.name}"
        o: AccessOptions = parse_section(AccessOptions, options, key)
        self.opts = o
        self.sender_allow = AddressList(o.senders.allow, f"{key}.senders.allow")
        self.sender_deny = AddressList(o.senders.deny, f"{key}.senders.deny")
        self.rcpt_allow = AddressList(o.recipients.allow, f"{key}.recipients.allow")
        self.rcpt_deny = AddressList(o.recipients.deny, f"{key}.recipients.deny")
        v = o.verify
        self.users = UserList(v, f"{key}.verify") if (v.addresses or v.file) else None
        if v.domains and self.users is None:
            raise ConfigError(f"{key}.verify.domains: give the valid addresses "
                              "(verify.addresses or verify.file)")
        self.own = {n.lower().rstrip(".") for n in (env.hostname, *o.helo.own_names) if n}
        h = o.helo
        stages = set()
        if o.client.allow or o.client.deny:
            stages.add(Stage.CONNECT)
        if (h.reject_own_name or h.reject_literal_mismatch or h.reject_bare_ip
                or h.reject_invalid or h.require_fqdn):
            stages.add(Stage.HELO)
        if self.sender_allow or self.sender_deny:
            stages.add(Stage.MAIL)
        if self.rcpt_allow or self.rcpt_deny or self.users is not None:
            stages.add(Stage.RCPT)
        self.stages = frozenset(stages)

    async def on_connect(self, ctx: Context) -> Verdict:
        addr = parse_ip(ctx.client_ip)
        decision = network_decision(addr, self.opts.client) if addr else None
        if decision == "allow":
            return Verdict.accept()
        if decision == "deny":
            log.info("access client=%s denied", ctx.client_ip)
            return Verdict.reject("Access denied", 554, "5.7.1", reason="access client")
        return CONTINUE

    async def on_helo(self, ctx: Context) -> Verdict:
        if ctx.trusted and self.opts.helo.skip_trusted:
            return CONTINUE
        v = helo_problem(ctx.helo.strip(), parse_ip(ctx.client_ip), self.opts.helo,
                         self.own)
        if v is None:
            return CONTINUE
        log.info("access client=%s helo refused: %s", ctx.client_ip, v.text)
        return Verdict.reject(v.text, v.code, v.enhanced, reason="access helo")

    async def on_mail(self, ctx: Context) -> Verdict:
        sender = ctx.mail_from.strip().strip("<>")
        decision = address_decision(sender, self.sender_allow, self.sender_deny)
        if decision == "allow":
            return Verdict.accept()
        if decision == "deny":
            log.info("access %s sender denied", ctx.queue_id or "-")
            return Verdict.reject("Sender address rejected: Access denied", 550, "5.7.1",
                                  reason="access sender")
        return CONTINUE

    async def on_rcpt(self, ctx: Context, rcpt: str) -> Verdict:
        address = rcpt.strip().strip("<>")
        decision = address_decision(address, self.rcpt_allow, self.rcpt_deny)
        if decision == "deny":
            log.info("access %s recipient denied", ctx.queue_id or "-")
            return Verdict.reject("Recipient address rejected: Access denied", 550, "5.7.1",
                                  reason="access recipient")
        if self.users is not None:
            domain = address.rpartition("@")[2].lower().rstrip(".")
            if self.users.covers(domain):
                await self.users.refresh()
                if not self.users.valid(address):
                    log.info("access %s unknown user at %s", ctx.queue_id or "-", domain)
                    return Verdict.reject("Recipient address rejected: User unknown", 550,
                                          "5.1.1", reason="access unknown user")
        if decision == "allow":
            return Verdict.accept()
        return CONTINUE
