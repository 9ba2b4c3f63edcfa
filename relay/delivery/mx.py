"""MX resolution: a Hop -> the ordered list of (host, address, port) targets to try.

Takes a Hop from relay.delivery.route and a Resolver (relay.dns.DNSResolver, so the
resolvers and their port come from the config and tests use dnsmasq on loopback);
hands back Targets in the order to try them, or raises MXError carrying the SMTP code,
enhanced code and whether it is temporary. Trusts DNS answers only as far as their
syntax: MX names and addresses are parsed, never used as anything but a host to dial.

RFC 5321 5.1: MX by preference, random order among equal preferences; no MX records
means the domain's own A/AAAA (implicit MX). RFC 7505: a null MX ('0 .') means the
domain takes no mail: permanent failure 556 5.1.10 at once.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from dataclasses import dataclass

from relay.delivery.route import Hop
from relay.dns import NXDomain
from relay.pipeline.protocol import DNSError, Resolver

# Postfix's smtp_mx_address_limit: more addresses than this per attempt is a waste of
# a delivery slot; the next attempt starts again from the best MX.
MAX_TARGETS = 10


@dataclass(frozen=True)
class Target:
    host: str        # the MX (or hop) name: TLS verify checks the certificate against it
    address: str
    port: int
    preference: int = 0

    def __str__(self) -> str:
        """Postfix's relay= form: host[ip]:port."""
        return f"{self.host}[{self.address}]:{self.port}"


class MXError(Exception):
    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(f"{code} {enhanced} {text}")
        self.code, self.enhanced, self.text = code, enhanced, text

    @property
    def temporary(self) -> bool:
        return self.code < 500


@functools.lru_cache(maxsize=4096)
def _literal(host: str) -> str | None:
    """The address if `host` is an IP literal. Cached: every delivery asks it of its
    hop, and ipaddress parsing (an exception for every name) showed in the profile."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def _addresses(resolver: Resolver, host: str) -> list[str]:
    """A then AAAA: IPv4 first because many hosts have no working IPv6 route."""
    out: list[str] = []
    for rdtype in ("A", "AAAA"):
        for a in await resolver.lookup(host, rdtype):
            if _literal(a):
                out.append(a)
    return out


def _parse_mx(records: list[str]) -> list[tuple[int, str]]:
    out = []
    for rec in records:
        pref, _, name = rec.partition(" ")
        if pref.isdigit() and name:
            out.append((int(pref), name.lower().rstrip(".") or "."))
    return out


def order_mx(mx: list[tuple[int, str]], rng: random.Random | None = None) -> list[tuple[int, str]]:
    """By preference; equal preferences shuffled (RFC 5321 5.1 load spreading)."""
    rng = rng or random
    keyed = [(p, rng.random(), n) for p, n in mx]
    return [(p, n) for p, _, n in sorted(keyed)]


async def resolve(hop: Hop, resolver: Resolver) -> list[Target]:
    """Targets for one hop, best first. Raises MXError (temporary or permanent)."""
    lit = _literal(hop.host)
    if lit:
        return [Target(lit, lit, hop.port)]
    if not hop.mx:
        try:
            addrs = await _addresses(resolver, hop.host)
        except DNSError as e:
            raise MXError(451, "4.4.3", f"DNS lookup failed for {hop.host}: {e}") from None
        if not addrs:
            raise MXError(550, "5.4.4", f"host {hop.host} has no address") from None
        return [Target(hop.host, a, hop.port) for a in addrs[:MAX_TARGETS]]
    try:
        records = await resolver.lookup(hop.host, "MX", nxdomain=True)
    except NXDomain:
        raise MXError(550, "5.1.2", f"domain {hop.host} does not exist") from None
    except DNSError as e:
        raise MXError(451, "4.4.3", f"MX lookup failed for {hop.host}: {e}") from None
    mx = _parse_mx(records)
    if any(n == "." for _, n in mx):
        if len(mx) == 1:
            raise MXError(556, "5.1.10", f"domain {hop.host} accepts no mail (null MX)")
        mx = [(p, n) for p, n in mx if n != "."]     # RFC 7505 3: ignore it among others
    if not mx:
        # Implicit MX: the domain itself, preference 0 (RFC 5321 5.1).
        mx = [(0, hop.host)]
    targets: list[Target] = []
    temp_error = ""
    for pref, name in order_mx(mx):
        try:
            addrs = [name] if _literal(name) else await _addresses(resolver, name)
        except DNSError as e:
            temp_error = str(e)
            continue
        targets.extend(Target(name, a, hop.port, pref) for a in addrs)
        if len(targets) >= MAX_TARGETS:
            break
    if targets:
        return targets[:MAX_TARGETS]
    if temp_error:
        raise MXError(451, "4.4.3", f"address lookup failed for MX of {hop.host}: {temp_error}")
    if mx == [(0, hop.host)]:
        raise MXError(550, "5.1.2", f"domain {hop.host} has no MX and no address")
    # MX names without addresses: often a DNS mistake being fixed; retry, do not bounce.
    raise MXError(451, "4.4.4", f"no MX host of {hop.host} has an address")
