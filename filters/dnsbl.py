"""DNS blocklists: look the client's address up in DNSBL/DNSWL zones, act on the reply.

Takes the client IP at connect (or at rcpt, so postmaster@ and abuse@ can still be
reached, RFC 5321 4.5.1) and asks every configured zone at once for the reversed
address (IPv4 octets, IPv6 nibbles: RFC 5782 2.1, 2.4) through the pipeline's
Resolver. Hands on the action of the first zone, in configured order, whose reply
code maps to something other than continue: put a DNSWL first with `accept` to let
its clients skip the rest of the stage.

Trusts only replies inside 127.0.0.0/8 (RFC 5782 2.3); anything else, and the
127.255.255.0/24 codes some lists send to refuse a query (e.g. via a public resolver),
are logged and ignored, so a broken or hijacked zone cannot block all mail. A DNS
failure is `on_dns_error` (continue by default: a list outage must not stop mail).
RFCs: 5782 (DNSBL), 3463 (enhanced codes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.config import ConfigError, Domain, parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    Context,
    DNSError,
    Filter,
    FilterEnv,
    Resolver,
    Stage,
    Verdict,
    parse_ip,
)

log = logging.getLogger("relay.filters.dnsbl")

_ACTIONS = ("continue", "accept", "reject", "tempfail", "quarantine")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")   # list-side errors, not listings
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ZoneOptions:
    zone: Domain
    # Reply code ('127.0.0.2') or range ('127.0.0.8/29') -> action. Empty: every
    # 127.0.0.0/8 reply means listed, with `action`.
    replies: Mapping[str, Any] = field(default_factory=dict)
    action: Literal["continue", "accept", "reject", "tempfail", "quarantine"] = "reject"
    # Also look up IPv6 clients (not every list carries IPv6).
    ipv6: bool = True
    # Reply text; '{ip}' and '{zone}' are filled in. Public lists want to be named,
    # so the sender can find the delisting page.
    text: str = "Service unavailable; client host [{ip}] blocked using {zone}"


@dataclass(frozen=True)
class DNSBLOptions:
    zones: tuple[ZoneOptions, ...] = ()
    stage: Literal["connect", "rcpt"] = "connect"
    on_dns_error: Literal["continue", "tempfail"] = "continue"
    skip_trusted: bool = True
    # At the rcpt stage these local-parts are never refused (RFC 5321 4.5.1).
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")
    mailbox: str = "dnsbl"


@dataclass(frozen=True)
class Zone:
    name: str
    replies: tuple[tuple[IPNet, str], ...]   # most specific first
    action: str
    ipv6: bool
    text: str


@dataclass(frozen=True)
class Listing:
    """What a zone said about the client: the decided action and the reply codes."""

    zone: str
    action: str
    codes: tuple[str, ...]


def query_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """RFC 5782 2.1/2.4: reversed octets or reversed nibbles, then the zone."""
    rev = ip.reverse_pointer
    return rev[: rev.rindex(".in-addr.arpa" if ip.version == 4 else ".ip6.arpa")] + "." + zone



class DNSBLFilter(Filter):
    name = "dnsbl"

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        key = f"filters.{self.name}"
        self.opts: DNSBLOptions = parse_section(DNSBLOptions, options, key)
        if not self.opts.zones:
            raise ConfigError(f"{key}.zones: list at least one zone")
        self.zones = tuple(self._zone(z, f"{key}.zones[{i}]")
                           for i, z in enumerate(self.opts.zones))
        self.stages = frozenset({Stage.CONNECT if self.opts.stage == "connect" else Stage.RCPT})
        self.exempt = {r.lower() for r in self.opts.exempt_recipients}

    @staticmethod
    def _zone(z: ZoneOptions, key: str) -> Zone:
        replies = []
        for code, action in z.replies.items():
            try:
                net = ipaddress.ip_network(str(code), strict=False)
            except ValueError:
                raise ConfigError(f"{key}.replies.{code}: not an address or range") from None
            if not (net.version == 4 and net.subnet_of(_LOOPBACK)):
                raise ConfigError(f"{key}.replies.{code}: DNSBL replies are in 127.0.0.0/8")
            if action not in _ACTIONS:
                raise ConfigError(f"{key}.replies.{code}: must be one of "
                                  f"{', '.join(_ACTIONS)}, got {action!r}")
            replies.append((net, action))
        replies.sort(key=lambda r: -r[0].prefixlen)
        try:
            z.text.format(ip="", zone="")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"{key}.text: only {{ip}} and {{zone}} may be filled in") from None
        return Zone(str(z.zone), tuple(replies), z.action, z.ipv6, z.text)

    def _decide(self, zone: Zone, answers: list[str]) -> Listing | None:
        codes, actions = [], []
        for a in answers:
            try:
                addr = ipaddress.ip_address(a)
            except ValueError:
                continue
            if addr.version != 4 or addr not in _LOOPBACK or addr in _REFUSED:
                log.warning("dnsbl zone=%s unexpected reply %s ignored", zone.name, a)
                continue
            codes.append(a)
            if zone.replies:
                actions.append(next((act for net, act in zone.replies if addr in net),
                                    "continue"))
            else:
                actions.append(zone.action)
        if not codes:
            return None
        # Several codes (multi-list zones): the strongest configured answer counts.
        order = ("reject", "tempfail", "quarantine", "accept", "continue")
        return Listing(zone.name, min(actions, key=order.index), tuple(codes))

    async def lookup(self, ip: str, resolver: Resolver) -> tuple[Listing | None, str | None]:
        """(the deciding listing or None, the zone whose DNS failed first or None)."""
        addr = parse_ip(ip)
        if addr is None:
            return None, None
        zones = [z for z in self.zones if addr.version == 4 or z.ipv6]
        results = await asyncio.gather(
            *(resolver.query(query_name(addr, z.name), "A") for z in zones),
            return_exceptions=True)
        for zone, res in zip(zones, results, strict=True):
            if isinstance(res, DNSError):
                log.warning("dnsbl zone=%s client=%s DNS error: %s", zone.name, ip, res)
                if self.opts.on_dns_error == "tempfail":
                    return None, zone.name
                continue
            if isinstance(res, BaseException):
                raise res
            listing = self._decide(zone, res)
            if listing is not None and listing.action != "continue":
                return listing, None
        return None, None

    def _verdict(self, ctx: Context, listing: Listing | None, failed: str | None) -> Verdict:
        if failed is not None:
            return Verdict.tempfail("Temporary DNS lookup failure", 451, "4.4.3",
                                    reason=f"dnsbl {failed} DNS error")
        if listing is None:
            return CONTINUE
        log.info("dnsbl %s client=%s zone=%s codes=%s action=%s", ctx.queue_id or "-",
                 ctx.client_ip, listing.zone, ",".join(listing.codes), listing.action)
        zone = next(z for z in self.zones if z.name == listing.zone)
        reason = f"dnsbl {listing.zone}"
        if listing.action == "accept":
            return Verdict.accept()
        if listing.action == "reject":
            return Verdict.reject(zone.text.format(ip=ctx.client_ip, zone=zone.name), 554,
                                  "5.7.1", reason=reason)
        if listing.action == "tempfail":
            return Verdict.tempfail(zone.text.format(ip=ctx.client_ip, zone=zone.name), 450,
                                    "4.7.1", reason=reason)
        return Verdict.quarantine(self.opts.mailbox, reason)

    async def on_connect(self, ctx: Context) -> Verdict:
        if ctx.trusted and self.opts.skip_trusted:
            return CONTINUE
        return self._verdict(ctx, *await self.lookup(ctx.client_ip, ctx.resolver))

    async def on_rcpt(self, ctx: Context, rcpt: str) -> Verdict:
        if ctx.trusted and self.opts.skip_trusted:
            return CONTINUE
        if rcpt.strip("<>").rpartition("@")[0].lower() in self.exempt:
            return CONTINUE
        # One lookup per transaction, whatever the number of recipients.
        if "dnsbl" not in ctx.notes:
            ctx.notes["dnsbl"] = await self.lookup(ctx.client_ip, ctx.resolver)
        return self._verdict(ctx, *ctx.notes["dnsbl"])
