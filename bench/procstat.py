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
