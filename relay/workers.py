"""Several worker processes on one box: a small supervisor that forks them.

Takes the config and N; forks N workers before any event loop exists. Each worker binds
the SMTP listeners itself with SO_REUSEPORT (the kernel spreads connections), owns its
own spool writer (segments w<N>-*.log: no locks shared on the per-message path) and
delivers the messages it accepted. The SMTP connection limits count all workers'
connections through a shared mapping made here before the fork (relay.smtp.limits).
Worker 0 also serves HTTP (metrics, probes) and the quarantine over IMAP/POP3 (changes
the other workers make reach its IDLE clients through the store's disk watch). Metrics of all
workers add up through prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR is
set by the CLI before prometheus_client is first imported).

The supervisor forwards SIGTERM/SIGINT/SIGHUP to the workers, restarts a worker that
dies unexpectedly (with a pause, so a crash loop does not spin), and exits once all
workers have exited after a stop.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

from relay.config import Config

log = logging.getLogger("relay.workers")


def available_cpus(proc_cgroup: str = "/proc/self/cgroup",
                   cgroup_root: str = "/sys/fs/cgroup") -> int:
    """How many CPUs this process may really use, for `workers: 0`: its affinity mask
    (cpusets, taskset) and, in a container, its cgroup CPU quota rounded up (a pod's
    limits.cpu, docker --cpus). os.cpu_count() is the host's: on a 64-core node a pod
    limited to 2 CPUs would fork 64 workers that the quota then throttles."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def cgroup_cpu_quota(proc_cgroup: str, cgroup_root: str) -> float | None:
    """The CPU time this process's cgroup may use, in CPUs (quota / period), or None
    when nothing limits it. The tightest limit from its cgroup up to the root counts;
    cgroup v2 (cpu.max) and v1 (cpu.cfs_quota_us / cpu.cfs_period_us)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(cgroup_root)
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, read = root, _cpu_max
        elif "cpu" in controllers.split(","):
            mount, read = next((m for m in (root / controllers, root / "cpu")
                                if m.is_dir()), root / "cpu"), _cfs_quota
        else:
            continue
        d = mount / path.lstrip("/")
        if not d.is_dir():
            d = mount       # a container without its own cgroup namespace
        while True:
            q = read(d)
            if q is not None:
                limits.append(q)
            if d == mount or mount not in d.parents:
                break
            d = d.parent
    return min(limits, default=None)


def _cpu_max(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def run_workers(cfg: Config, config_path: str | None, n: int) -> None:
    from relay.app import _run_one
    from relay.http import worker_exited
    from relay.smtp.limits import SharedCounts

    children: dict[int, int] = {}      # pid -> worker index
    counts = SharedCounts(n)           # connection limits hold across workers
    stopping = False

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            code = 0
            try:
                _run_one(cfg, config_path, i, n, counts)
            except BaseException:  # noqa: BLE001 - report and leave the child
                log.exception("worker %d failed", i)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = i
        log.info("worker %d started (pid %d)", i, pid)

    def forward(sig, _frame) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    for i in range(n):
        if not stopping:
            spawn(i)
    failures = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        i = children.pop(pid, None)
        if i is None:
            continue
        worker_exited(pid)
        counts.clear(i)             # its connections died with it
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            log.info("worker %d (pid %d) exited (%d)", i, pid, code)
            continue
        failures += 1
        log.error("worker %d (pid %d) died (%d); restarting", i, pid, code)
        time.sleep(min(30, 0.5 * failures))
        if not stopping:
            spawn(i)
