"""Next-hop choice: which host(s) a recipient's mail goes to, and grouping per next hop.

Takes the delivery config (transport map, relayhost list, smtp_port) and a message's
recipients; hands back Routes (an ordered tuple of Hops tried in turn, a destination name
for limits and logs, a kind for metrics). Order, first match wins: Recipient.route (set
by a routing filter), the transport map (exact domain, then the longest '.domain' /
'*.domain' for subdomains), the relayhost list (failover in order), else the MX of the
recipient's domain. Trusts the config (validated at load); recipient domains come from
the queue and are only compared, never interpreted as a host unless the MX path is used.

Next-hop syntax (Postfix's): 'host:port' or 'host' = MX lookup on host, '[host]:port' or
'[host]' = that host's addresses only (no MX lookup). RFC 5321 5.1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.config import DeliveryConfig
from relay.queue.model import Recipient

_NEXTHOP = re.compile(r"\[([^\[\]]+)\](?::(\d{1,5}))?|([^\[\]:]+)(?::(\d{1,5}))?")


class RouteError(ValueError):
    """A next-hop string that cannot be parsed (from a filter or the config)."""


@dataclass(frozen=True)
class Hop:
    host: str           # a domain (MX lookup), a host name or an address literal
    port: int
    mx: bool            # look up MX records for `host` first

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.mx else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]           # tried in order (relayhost failover)
    kind: str                       # mx | transport | relayhost | route (metrics label)
    # The recipient domain when the hop is the domain's own MX: TLS policy and MTA-STS
    # apply to it. Empty for smarthosts and transport-map next hops.
    domain: str = ""

    @property
    def name(self) -> str:
        """Destination name: the key for concurrency, rate, pause and reuse."""
        return ",".join(str(h) for h in self.hops)


def parse_nexthop(text: str, default_port: int) -> Hop:
    """'host', 'host:port', '[host]', '[host]:port' -> Hop."""
    m = _NEXTHOP.fullmatch(text.strip())
    if not m:
        raise RouteError(f"bad next hop {text!r}")
    if m.group(1) is not None:
        host, port, mx = m.group(1), m.group(2), False
    else:
        host, port, mx = m.group(3), m.group(4), True
    port_n = int(port) if port else default_port
    if not host or not 0 < port_n < 65536:
        raise RouteError(f"bad next hop {text!r}")
    return Hop(host.lower().rstrip("."), port_n, mx)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class Router:
    """Built once from the config; `route(rcpt)` is a few dict lookups."""

    def __init__(self, cfg: DeliveryConfig):
        self._port = cfg.smtp_port
        self._exact: dict[str, Route] = {}
        self._sub: list[tuple[str, Route]] = []
        for t in cfg.transport:
            d = str(t.domain)
            route = Route((parse_nexthop(t.nexthop, cfg.smtp_port),), "transport")
            if d.startswith("*.") or d.startswith("."):
                self._sub.append(("." + d.lstrip("*."), route))
            else:
                self._exact.setdefault(d, route)
        # Longest suffix first, so 'mail.example.com' beats 'example.com'.
        self._sub.sort(key=lambda x: -len(x[0]))
        self._relayhost = (Route(tuple(parse_nexthop(h, cfg.smtp_port) for h in cfg.relayhost),
                                 "relayhost") if cfg.relayhost else None)

    def route(self, rcpt: Recipient) -> Route:
        if rcpt.route:
            return Route((parse_nexthop(rcpt.route, self._port),), "route")
        domain = domain_of(rcpt.address)
        hit = self._exact.get(domain)
        if hit is not None:
            return hit
        for suffix, r in self._sub:
            if domain.endswith(suffix):
                return r
        if self._relayhost is not None:
            return self._relayhost
        if domain.startswith("[") and domain.endswith("]"):
            # Address literal (RFC 5321 4.1.3): deliver to that address, no DNS.
            lit = domain[1:-1]
            lit = lit[5:] if lit.lower().startswith("ipv6:") else lit
            return Route((Hop(lit, self._port, False),), "mx", domain)
        return Route((Hop(domain, self._port, True),), "mx", domain)

    def group(self, rcpts: Iterable[Recipient]) -> dict[Route, list[Recipient]]:
        """Recipients per next hop, in the message's order. Raises RouteError for a
        recipient whose filter-set route cannot be parsed (callers route one by one
        when they need to tell recipients apart)."""
        out: dict[Route, list[Recipient]] = {}
        for r in rcpts:
            out.setdefault(self.route(r), []).append(r)
        return out
