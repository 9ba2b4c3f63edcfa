"""Rate limits: messages or recipients per client, sender, sender domain or AUTH user
over a sliding window; over the limit the command gets 450 4.7.1.

Takes MAIL (a message is counted when MAIL FROM is let through) and RCPT (one per
recipient let through). Hands on CONTINUE or a tempfail; refused attempts are not
counted, so a client that keeps retrying gets through once its rate falls under the
limit. A null sender is never a 'sender' key: bounces from everywhere share it.

Memory is bounded: each limit keeps at most `max_keys` keys (least recently used
evicted first) and a key is two counters, the current and the previous fixed window;
the sliding count is `previous * (1 - elapsed/window) + current` (the usual two-bucket
estimate: exact when traffic is even, never off by more than the previous window's
share). IPv6 clients are counted per /64 by default, as one host usually owns one.
Counts live in this process: with several workers each enforces its own share.
RFCs: 5321 (4.2.5: 450 leaves the client free to retry), 3463 (4.7.1).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay.config import ConfigError, Duration, Network, parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    Context,
    Filter,
    FilterEnv,
    Stage,
    Verdict,
    parse_ip,
)

log = logging.getLogger("relay.filters.ratelimit")


@dataclass(frozen=True)
class LimitOptions:
    key: Literal["client_ip", "sender", "sender_domain", "auth_user"]
    limit: int
    count: Literal["messages", "recipients"] = "messages"
    window: Duration = Duration(3600)


@dataclass(frozen=True)
class RateLimitOptions:
    limits: tuple[LimitOptions, ...] = ()
    # Keys remembered per limit; the least recently seen is forgotten first.
    max_keys: int = 100_000
    # IPv6 clients are counted per network of this length.
    ipv6_prefix: int = 64
    skip_trusted: bool = False
    # Clients never limited.
    exempt: tuple[Network, ...] = ()


class SlidingWindow:
    """Counts per key over `window` seconds, at most `max_keys` keys."""

    def __init__(self, limit: int, window: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window index, count in it, count in the one before]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def _slot(self, key: str, now: float) -> list[float]:
        idx = int(now // self.window)
        slot = self._keys.get(key)
        if slot is None:
            slot = [idx, 0, 0]
            self._keys[key] = slot
            if len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
            if slot[0] != idx:
                # Moved on one window: current becomes previous; more: both are stale.
                slot[2] = slot[1] if idx - slot[0] == 1 else 0
                slot[1] = 0
                slot[0] = idx
        return slot

    def rate(self, key: str) -> float:
        now = self.clock()
        slot = self._slot(key, now)
        elapsed = (now % self.window) / self.window
        return slot[2] * (1.0 - elapsed) + slot[1]

    def allows(self, key: str, n: int = 1) -> bool:
        return self.rate(key) + n <= self.limit

    def add(self, key: str, n: int = 1) -> None:
        self._slot(key, self.clock())[1] += n

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Limit:
    options: LimitOptions
    counter: SlidingWindow


class RateLimitFilter(Filter):
    name = "ratelimit"

    def __init__(self, options: Mapping[str, Any], env: FilterEnv,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(options, env)
        key = f"filters.{self.name}"
        self.opts: RateLimitOptions = parse_section(RateLimitOptions, options, key)
        if not self.opts.limits:
            raise ConfigError(f"{key}.limits: list at least one limit")
        if self.opts.max_keys < 1:
            raise ConfigError(f"{key}.max_keys: must be at least 1")
        if not 1 <= self.opts.ipv6_prefix <= 128:
            raise ConfigError(f"{key}.ipv6_prefix: must be 1 to 128")
        self.limits = []
        for i, lo in enumerate(self.opts.limits):
            if lo.limit < 1:
                raise ConfigError(f"{key}.limits[{i}].limit: must be at least 1")
            if lo.window <= 0:
                raise ConfigError(f"{key}.limits[{i}].window: must be more than 0")
            self.limits.append(Limit(lo, SlidingWindow(lo.limit, float(lo.window),
                                                       self.opts.max_keys, clock)))
        self.stages = frozenset(Stage.MAIL if lim.options.count == "messages" else Stage.RCPT
                                for lim in self.limits)

    def _exempt(self, ctx: Context) -> bool:
        if ctx.trusted and self.opts.skip_trusted:
            return True
        if not self.opts.exempt:
            return False
        addr = parse_ip(ctx.client_ip)
        return addr is not None and any(addr in n.net for n in self.opts.exempt
                                        if n.net.version == addr.version)


    def _key(self, ctx: Context, kind: str) -> str | None:
        if kind == "client_ip":
            addr = parse_ip(ctx.client_ip)
            if addr is None:
                return ctx.client_ip
            if addr.version == 6:
                net = ipaddress.ip_network(f"{addr}/{self.opts.ipv6_prefix}", strict=False)
                return str(net)
            return str(addr)
        if kind == "auth_user":
            return ctx.auth_user or None
        sender = ctx.mail_from.strip().strip("<>").lower()
        if not sender:
            return None
        return sender if kind == "sender" else sender.rpartition("@")[2]

    def _apply(self, ctx: Context, count: str) -> Verdict:
        if self._exempt(ctx):
            return CONTINUE
        hits = []
        for lim in self.limits:
            if lim.options.count != count:
                continue
            k = self._key(ctx, lim.options.key)
            if k is None:
                continue
            if not lim.counter.allows(k):
                log.info("ratelimit %s %s=%s over %d %s per %ss", ctx.queue_id or "-",
                         lim.options.key, k, lim.options.limit, count,
                         int(lim.options.window))
                return Verdict.tempfail("Rate limit exceeded, try again later", 450, "4.7.1",
                                        reason=f"ratelimit {lim.options.key} {count}")
            hits.append((lim, k))
        # Count only what is let through, in every limit that applies.
        for lim, k in hits:
            lim.counter.add(k)
        return CONTINUE

    async def on_mail(self, ctx: Context) -> Verdict:
        return self._apply(ctx, "messages")

    async def on_rcpt(self, ctx: Context, rcpt: str) -> Verdict:
        return self._apply(ctx, "recipients")
