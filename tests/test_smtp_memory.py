"""DATA streams to the spool: 20 concurrent 50 MiB messages keep the relay's memory far
below their total (1000 MiB), and every one of them is stored intact."""

from __future__ import annotations

import concurrent.futures
import hashlib

from tests._relay import RawClient, RelayProcess

MIB = 1 << 20
LINE = b"x" * 998 + b"\r\n"          # 1000 bytes, the longest legal line
CHUNK = LINE * 1048                  # ~1 MiB of whole lines


def _peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _send(port: int, n: int, chunks: int) -> tuple[str, str]:
    c = RawClient(port, timeout=120)
    assert c.reply()[0] == 220
    c.send(b"EHLO big\r\nMAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
           % (chunks * len(CHUNK)))
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    head = b"Subject: big %d\r\n\r\n" % n
    digest = hashlib.sha256(head)
    c.send(head)
    for _ in range(chunks):
        c.send(CHUNK)
        digest.update(CHUNK)
    c.send(b".\r\n")
    code, line = c.reply()
    assert code == 250, line
    c.close()
    return line.split()[-1].decode(), digest.hexdigest()


def test_twenty_concurrent_50mib_messages_bounded_memory(tmp_path):
    chunks = 50
    conf = {"delivery": {"enabled": False}, "smtp": {"max_message_size": "60MiB"}}
    with RelayProcess(tmp_path, conf) as r:
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            results = list(ex.map(lambda n: _send(r.smtp_port, n, chunks), range(20)))
        peak = _peak_rss_mib(r.proc.pid)
        total = 20 * chunks * len(CHUNK) / MIB
        assert peak < 300, f"peak RSS {peak:.0f} MiB for {total:.0f} MiB of mail"
        assert r.stop() == 0
    queued = r.queued()
    for qid, digest in results:
        stored = queued[qid][1]
        body = stored[stored.index(b"Subject: big"):]
        assert hashlib.sha256(body).hexdigest() == digest
