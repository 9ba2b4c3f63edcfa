"""SMTP connection limits, overall and per client IP, that hold across worker processes.

Each process counts its own connections exactly. With several workers (relay.workers)
each one also publishes its counts in a mapping the supervisor shares with all of them
before it forks (SharedCounts): a row per worker holding its total and its connections
per slot, a slot being a hash of the client IP. Admission adds the other workers' rows
to its own exact counts, so `max_connections_per_ip: 20` means 20 for the box, not 20
per worker (the kernel spreads one client's connections over all the workers).

A worker writes only its own row, so there are no locks: another worker's count may be
a connection behind, and two IPs that share a slot count together in the other
workers' rows (stricter, never looser, and only while both are connected). The
supervisor zeroes the row of a worker that exits, so a crash leaves no phantom
connections behind.
"""

from __future__ import annotations

import mmap
import zlib

SLOTS = 4096                    # per-IP counters per worker: 16 KiB per worker


class SharedCounts:
    """The rows of all workers, in anonymous shared memory (inherited across fork)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._width = 1 + SLOTS             # [total, slot 0, slot 1, ...] as uint32
        self._mem = mmap.mmap(-1, 4 * self._width * workers)
        self._view = memoryview(self._mem).cast("I")

    def row(self, worker: int) -> memoryview:
        return self._view[worker * self._width:(worker + 1) * self._width]

    def others(self, worker: int) -> list[memoryview]:
        return [self.row(w) for w in range(self.workers) if w != worker]

    def clear(self, worker: int) -> None:
        """The worker is gone (or starting afresh): none of its connections remain."""
        row = self.row(worker)
        row[:] = memoryview(bytes(4 * self._width)).cast("I")


def slot(ip: str) -> int:
    # Stable across processes (str hashes are salted per interpreter).
    return zlib.crc32(ip.encode()) % SLOTS


class Limits:
    """Connection counts shared by all listeners of one process, and with `shared`,
    those of the other workers too."""

    def __init__(self, total: int, per_ip: int, shared: SharedCounts | None = None,
                 worker: int = 0):
        self.total, self.per_ip = total, per_ip
        self.count = 0
        self.by_ip: dict[str, int] = {}
        self._mine: memoryview | None = None
        self._others: list[memoryview] | None = None
        if shared is not None and shared.workers > 1:
            shared.clear(worker)
            self._mine, self._others = shared.row(worker), shared.others(worker)

    def admit(self, ip: str) -> bool:
        count, here = self.count, self.by_ip.get(ip, 0)
        if self._mine is not None and self._others is not None:
            s = 1 + slot(ip)
            for row in self._others:
                count += row[0]
                here += row[s]
        if count >= self.total or here >= self.per_ip:
            return False
        self.count += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        if self._mine is not None:
            self._mine[0] = self.count
            self._mine[s] += 1
        return True

    def release(self, ip: str) -> None:
        self.count -= 1
        n = self.by_ip.get(ip, 0) - 1
        if n <= 0:
            self.by_ip.pop(ip, None)
        else:
            self.by_ip[ip] = n
        if self._mine is not None:
            self._mine[0] = self.count
            s = 1 + slot(ip)
            self._mine[s] = max(0, self._mine[s] - 1)
