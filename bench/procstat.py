"""CPU time and memory of a process tree, read from /proc (Linux only).

Takes a root pid (the relay's supervisor, or Postfix's master); hands back the CPU
seconds the tree has used (utime+stime of every live process plus cutime+cstime, so
children that already exited and were reaped count too) and its peak and current RSS
(the sum of VmHWM / VmRSS over live processes: for several workers an upper bound of
the simultaneous peak). Trusts /proc; a process that vanishes mid-read is skipped.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return data[data.rindex(")") + 2:].split()


def tree(root: int) -> list[int]:
    """The root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    total = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            # fields 14-17 of stat(5): utime stime cutime cstime (0-based 11..14 here)
            total += sum(int(x) for x in st[11:15])
    return total / _TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib(root: int) -> float:
    return sum(_status_kib(p, "VmHWM:") for p in tree(root)) / 1024


def rss_mib(root: int) -> float:
    return sum(_status_kib(p, "VmRSS:") for p in tree(root)) / 1024


def pss_mib(root: int) -> float:
    """Proportional set size of the tree: shared pages split among their users, so
    forked workers (and Postfix's many daemons) are not counted once per process."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


class PeakSampler:
    """Samples the tree's PSS in a thread every `interval` seconds; `.peak` in MiB."""

    def __init__(self, root: int, interval: float = 0.5):
        import threading
        self.root, self.interval, self.peak = root, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_mib(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, pss_mib(self.root))


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)    # idle + iowait
    return sum(fields) - idle, sum(fields)
