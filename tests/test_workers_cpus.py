"""`workers: 0` means one worker per CPU this process may use: its affinity mask and
its cgroup's CPU quota (as a container sees them), not the host's core count."""

from __future__ import annotations

import os

from relay.workers import available_cpus, cgroup_cpu_quota


def _tree(tmp_path, proc: str, files: dict[str, str]):
    (tmp_path / "proc").write_text(proc)
    root = tmp_path / "cg"
    root.mkdir()
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "proc"), str(root)


def test_v2_container_quota(tmp_path):
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert available_cpus(proc, root) == min(len(os.sched_getaffinity(0)), 2)


def test_v2_tightest_limit_on_the_way_up_counts(tmp_path):
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/c1\n", {
        "kubepods/pod1/c1/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "300000 100000\n",
        "kubepods/cpu.max": "800000 100000\n",
    })
    assert cgroup_cpu_quota(proc, root) == 3.0


def test_v2_path_not_mounted_here_reads_the_mount_itself(tmp_path):
    # A container without its own cgroup namespace sees the host's path in
    # /proc/self/cgroup, but its own cgroup mounted at the root.
    proc, root = _tree(tmp_path, "0::/system.slice/docker-abc.scope\n",
                       {"cpu.max": "200000 100000\n"})
    assert cgroup_cpu_quota(proc, root) == 2.0


def test_v1_quota_and_unlimited(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_quota(proc, root) == 0.5
    assert available_cpus(proc, root) == 1          # never below one worker


def test_no_limit_anywhere(tmp_path):
    proc, root = _tree(tmp_path, "1:cpu:/\n0::/\n", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
        "cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_quota(proc, root) is None
    assert available_cpus(proc, root) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_quota(str(tmp_path / "missing"), root) is None


def test_garbage_is_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "0::/\n", {"cpu.max": "lots\n"})
    assert cgroup_cpu_quota(proc, root) is None


def test_affinity_mask_counts(tmp_path):
    """taskset/cpuset: a process allowed one CPU runs one worker."""
    import subprocess
    import sys
    proc, root = _tree(tmp_path, "0::/\n", {})
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            f"from relay.workers import available_cpus; print(available_cpus({proc!r}, {root!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"
