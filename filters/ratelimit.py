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

With several workers a limit is for the box, not per worker (the kernel spreads one
client's connections over all of them): each worker also publishes its counts as a
count-min sketch (WorkerSketches) in a file per worker under the spool's shared/
directory, which all workers map. A check adds the other workers' sketch estimate to
this worker's exact count. A sketch can only overcount (two keys sharing a cell in all
of its rows), by about e * (the other workers' events in the window) / WIDTH at most,
with high probability: a few at a million messages an hour.
RFCs: 5321 (4.2.5: 450 leaves the client free to retry), 3463 (4.7.1).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
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


# Count-min sketch shape: DEPTH rows of WIDTH cells, one 16-bit slice of a 64-bit hash
# per row. A worker's file is 2 * DEPTH * WIDTH counters (current and previous window)
# after its window index: 2 MiB, sparse until used.
DEPTH, WIDTH = 4, 1 << 16
_CELLS = DEPTH * WIDTH
_ZEROS = memoryview(bytes(4 * _CELLS)).cast("I")


def _index(now: float, window: float) -> int:
    return int(now // window) & 0xFFFFFFFF      # the files keep it in 32 bits


class WorkerSketches:
    """One limit's counts of every worker: a file each, mapped by all, written only by
    its own worker: [window index, current window's cells, previous window's cells]."""

    def __init__(self, directory: str, name: str, worker: int, workers: int) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        size = 4 * (1 + 2 * _CELLS)
        rows = []
        for w in range(workers):
            fd = os.open(Path(directory) / f"{name}.w{w}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                rows.append(memoryview(mmap.mmap(fd, size)).cast("I"))
            finally:
                os.close(fd)
        self.mine = rows[worker]
        self.others = [r for w, r in enumerate(rows) if w != worker]

    @staticmethod
    def cells(key: str) -> list[int]:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        return [d * WIDTH + (h >> (16 * d)) % WIDTH for d in range(DEPTH)]

    def add(self, cells: list[int], idx: int, n: int) -> None:
        m = self.mine
        if m[0] != idx:
            # Our window moved on: current becomes previous, or both go stale.
            if m[0] + 1 == idx:
                m[1 + _CELLS:] = m[1:1 + _CELLS]
            else:
                m[1 + _CELLS:] = _ZEROS
            m[1:1 + _CELLS] = _ZEROS
            m[0] = idx
        for c in cells:
            m[1 + c] += n

    def others_rate(self, cells: list[int], idx: int, elapsed: float) -> float:
        """The other workers' sliding count for a key: the least over the rows."""
        best = None
        for c in cells:
            total = 0.0
            for r in self.others:
                if r[0] == idx:
                    total += r[1 + _CELLS + c] * (1.0 - elapsed) + r[1 + c]
                elif r[0] + 1 == idx:       # that worker has not counted this window yet
                    total += r[1 + c] * (1.0 - elapsed)
            best = total if best is None else min(best, total)
        return best or 0.0


class SlidingWindow:
    """Counts per key over `window` seconds, at most `max_keys` keys (and, with
    `shared`, the other workers' counts too)."""

    def __init__(self, limit: int, window: float, max_keys: int,
                 clock: Callable[[], float] = time.monotonic,
                 shared: WorkerSketches | None = None) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self.shared = shared
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
        own = slot[2] * (1.0 - elapsed) + slot[1]
        if self.shared is None:
            return own
        return own + self.shared.others_rate(WorkerSketches.cells(key),
                                             _index(now, self.window), elapsed)

    def allows(self, key: str, n: int = 1) -> bool:
        return self.rate(key) + n <= self.limit

    def add(self, key: str, n: int = 1) -> None:
        now = self.clock()
        self._slot(key, now)[1] += n
        if self.shared is not None:
            self.shared.add(WorkerSketches.cells(key), _index(now, self.window), n)

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
            shared = None
            if env.workers > 1 and env.shared_dir:
                shared = WorkerSketches(str(Path(env.shared_dir) / "ratelimit"),
                                        f"{i}-{lo.key}-{lo.count}-{int(lo.window)}",
                                        env.worker, env.workers)
            self.limits.append(Limit(lo, SlidingWindow(lo.limit, float(lo.window),
                                                       self.opts.max_keys, clock, shared)))
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
