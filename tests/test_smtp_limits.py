"""Connection limits: exact in one process, and across worker processes through the
shared counts (relay.smtp.limits)."""

from __future__ import annotations

import os

from relay.smtp.limits import SLOTS, Limits, SharedCounts, slot


def test_one_process_counts_total_and_per_ip():
    lim = Limits(total=3, per_ip=2)
    assert lim.admit("192.0.2.1") and lim.admit("192.0.2.1")
    assert not lim.admit("192.0.2.1")               # per IP
    assert lim.admit("192.0.2.2")
    assert not lim.admit("192.0.2.3")               # total
    lim.release("192.0.2.1")
    assert lim.admit("192.0.2.3")
    assert lim.by_ip == {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 1}


def test_workers_share_the_limits():
    counts = SharedCounts(3)
    w = [Limits(total=5, per_ip=2, shared=counts, worker=i) for i in range(3)]
    assert w[0].admit("192.0.2.1")
    assert w[1].admit("192.0.2.1")
    assert not w[2].admit("192.0.2.1")      # two already, on other workers
    assert w[2].admit("192.0.2.2")
    assert w[2].admit("192.0.2.3")
    assert w[0].admit("192.0.2.4")
    assert not w[1].admit("192.0.2.5")      # five in all
    w[0].release("192.0.2.1")
    assert w[2].admit("192.0.2.1")          # its slot came back
    assert not w[1].admit("192.0.2.6")      # still five in all


def test_a_gone_worker_leaves_no_phantom_connections():
    counts = SharedCounts(2)
    a, b = Limits(10, 1, counts, 0), Limits(10, 1, counts, 1)
    assert a.admit("192.0.2.1")
    assert not b.admit("192.0.2.1")
    counts.clear(0)                         # the supervisor saw worker 0 exit
    assert b.admit("192.0.2.1")


def test_release_never_goes_below_zero_in_the_shared_row():
    counts = SharedCounts(2)
    a = Limits(10, 5, counts, 0)
    assert a.admit("192.0.2.1")
    counts.clear(0)                         # cleared while a connection was open
    a.release("192.0.2.1")
    assert counts.row(0)[1 + slot("192.0.2.1")] == 0


def test_counts_cross_a_real_fork():
    """The mapping is made before fork, as relay.workers does: a child's admissions are
    seen by the parent."""
    counts = SharedCounts(2)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # worker 1
        os.close(r)
        child = Limits(10, 2, counts, 1)
        ok = child.admit("192.0.2.9") and child.admit("192.0.2.9")
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        parent = Limits(10, 2, counts, 0)
        assert not parent.admit("192.0.2.9")
        assert parent.admit("192.0.2.10")
    finally:
        os.waitpid(pid, 0)
        os.close(r)


def test_slots_are_stable_and_in_range():
    assert slot("192.0.2.1") == slot("192.0.2.1")
    assert all(0 <= slot(f"198.51.100.{i}") < SLOTS for i in range(256))
    assert len({slot(f"198.51.100.{i}") for i in range(256)}) > 200
