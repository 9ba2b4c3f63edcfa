"""The durable queue: an append-only segment log with group commit.

Takes complete messages from relay.smtp (streamed through a MessageWriter), DSNs and
releases (`add`), and recipient-state changes from relay.delivery (`update`, `remove`);
hands out envelopes and message bytes. Trusts nothing it reads back: every record is
framed, length-prefixed and CRC-checked, and a torn tail is discarded.

Why a log and not a file per message (Postfix's way): on this class of machine a file
create costs 0.5-0.7 ms of CPU and one writer manages ~1,100 create+fsync+rename/s,
while appends sharing one fdatasync reach ~36,000 messages/s. So every change is a
record appended to the active segment, and all records that arrive while an fdatasync
runs share the next one (group commit). A caller's await returns only after its record
is on stable storage: the SMTP 250 after DATA is sent after that.

On-disk layout (under spool.path, documented for operators in the README):
    segments/w<W>-<SEQ>.log   records of writer W (one per worker process)
    data/<QUEUEID>            bodies too big to keep in memory while DATA streams;
                              fsynced (and the directory) before their record
    control/w<W>/             requests from `relay queue ...` to a running worker
    corrupt/                  segments with unreadable records, kept for a human
    lock.w<W>                 held (flock) by the worker that owns writer W

Record: MAGIC(4) TYPE(1) LENGTH(4, big-endian) CRC32(4, of TYPE+PAYLOAD) PAYLOAD
    M  message:  u32 json-length, envelope JSON, u32 head-length, head, body
                 (JSON "external": true means the body is data/<QUEUEID>)
    S  state:    envelope JSON (recipient states, held flag), replaces the previous one
    D  done:     queue id (ASCII): the message left the queue

Records only ever refer to messages in their own or older segments of the same writer,
so the oldest segment can be deleted once none of its messages is live; a segment whose
few live messages keep it alive is compacted (its live messages re-appended with their
current state, then it is deleted). Recovery replays the segments in order.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay import metrics
from relay.config import SpoolConfig
from relay.durable import fsync_dir
from relay.queue.model import Envelope, QueueName

log = logging.getLogger("relay.queue")

MAGIC = b"\xd3RQ1"
_HDR = struct.Struct(">4scII")          # magic, type, length, crc
_U32 = struct.Struct(">I")
# Compaction moves the few long-deferred messages that pin an old segment; a segment
# with more live messages than this is left to drain by delivery.
COMPACT_MAX_LIVE = 64


class SpoolError(Exception):
    """A local storage failure: answer 451/452 4.3.x, never 5xx."""


class SpoolFull(SpoolError):
    """Not enough free space to take the message (452 4.3.1)."""


@dataclass
class _Entry:
    env: Envelope
    segment: int          # sequence number of the segment holding the M record
    offset: int           # file offset of the head
    head_len: int
    body_len: int
    external: bool


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HDR.pack(MAGIC, kind, len(payload), zlib.crc32(payload, zlib.crc32(kind))) + payload


def _frame_parts(kind: bytes, parts: list[bytes]) -> list[bytes]:
    """_frame of b"".join(parts), as pieces for writev: the (large) body is never copied
    in user space."""
    crc = zlib.crc32(kind)
    for p in parts:
        crc = zlib.crc32(p, crc)
    return [_HDR.pack(MAGIC, kind, sum(map(len, parts)), crc), *parts]


# Pieces per writev call (the kernel's limit; 1024 on Linux).
_IOV_MAX = os.sysconf("SC_IOV_MAX")


# Just-stored messages kept for their first delivery attempt: each at most RECENT_MAX,
# all together at most RECENT_BYTES per worker.
RECENT_MAX = 1 << 20
RECENT_BYTES = 16 << 20

# Envelopes as compact JSON; one encoder, not one built per json.dumps call.
_JSON = json.JSONEncoder(separators=(",", ":"))


def _settle(fut: asyncio.Future, ok: bool, result: Any) -> None:
    if not fut.done():
        if ok:
            fut.set_result(result)
        else:
            fut.set_exception(result)


def _discard(segments: list[_Segment]) -> None:
    for seg in segments:
        os.close(seg.fd)
        seg.path.unlink(missing_ok=True)


def _write_durably(fd: int, pieces: list[bytes], offset: int) -> None:
    """Write the pieces at `offset` (the end of an append-only file) and make them
    durable. Where the kernel offers RWF_DSYNC (Linux 4.7+) that is one pwritev, the
    write and its fdatasync together: one system call, and one hand-back of the GIL
    from the commit thread instead of two (each a futex wake and a context switch,
    which showed in the profile). A short or oversized write falls back to writes
    and one fdatasync, which also covers the part already written."""
    if _RWF_DSYNC and len(pieces) <= _IOV_MAX:
        total = sum(map(len, pieces))
        n = os.pwritev(fd, pieces, offset, _RWF_DSYNC)
        if n == total:
            return
        pieces = [b"".join(pieces)[n:]]
    _write_all(fd, pieces)
    os.fdatasync(fd)


_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0) if hasattr(os, "pwritev") else 0


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """Write every piece, in order, with as few system calls as the kernel allows."""
    i = 0
    while i < len(pieces):
        batch = pieces[i:i + _IOV_MAX]
        n = os.writev(fd, batch)
        for p in batch:
            if n < len(p):
                # A short write (a signal, a full disk on the way): the rest of this
                # piece first, then carry on with the next ones.
                rest = memoryview(p)[n:]
                while rest:
                    rest = rest[os.write(fd, rest):]
                i += 1
                break
            n -= len(p)
            i += 1


class _Segment:
    def __init__(self, path: Path, seq: int, fd: int):
        self.path, self.seq, self.fd = path, seq, fd
        self.size = os.fstat(fd).st_size
        self.live: set[str] = set()


class Spool:
    def __init__(self, cfg: SpoolConfig, worker: int = 0, workers: int = 1):
        self.cfg = cfg
        self.root = Path(cfg.path)
        self.worker, self.workers = worker, workers
        self._entries: dict[str, _Entry] = {}
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._pending: list[tuple[bytes | list[bytes], asyncio.Future,
                                  Callable[[int], None] | None]] = []
        self._wake: asyncio.Event | None = None
        self._committer: asyncio.Task | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # Just-stored small messages, for their first delivery attempt (_keep_recent).
        self._recent: collections.OrderedDict[str, tuple[list[bytes], int]] = \
            collections.OrderedDict()
        self._recent_bytes = 0
        self._writer_thread: threading.Thread | None = None
        self._subscribers: list[Callable[[Envelope], None]] = []
        self._lock_fd: int | None = None
        self.memory_in_use = 0          # bytes held by MessageWriters (budget)
        self._rehome: list[int] = []    # corrupt segments whose live messages move
        self._space, self._space_at = 0, -1e9   # free bytes, sampled by check_space
        self._gauges_pending = False

    # --- opening and recovery -----------------------------------------------------

    async def open(self, adopt: bool = True) -> None:
        """Recover this writer's segments. `adopt`: also take over the messages of
        writers beyond the worker count (the relay was scaled down); the CLI, which
        opens each writer in turn, does not."""
        await asyncio.to_thread(self._open_sync)
        self._wake = asyncio.Event()
        self._committer = asyncio.create_task(self._commit_loop(), name="spool-commit")
        self._writer_thread = threading.Thread(target=self._write_thread,
                                               name=f"spool-commit-w{self.worker}", daemon=True)
        self._writer_thread.start()
        await self._adopt_foreign(adopt)
        self._update_gauges()

    def _open_sync(self) -> None:
        for sub in ("segments", "data", "corrupt", f"control/w{self.worker}"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / f"lock.w{self.worker}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolError(f"{self.root}: writer w{self.worker} is locked by another "
                             "running relay (two relays must not share a spool writer)") from None
        for seq, path in self._own_segments():
            self._replay(seq, path)
        # Bodies spilled to data/ by a message that never got its record were never
        # promised (no 250): remove them.
        referenced = {self._external_path(qid).name
                      for qid, e in self._entries.items() if e.external}
        for p in (self.root / "data").iterdir():
            if p.name not in referenced and self._writer_of(p.name) == self.worker:
                p.unlink(missing_ok=True)
        next_seq = max(self._segments, default=0) + 1
        self._active = self._new_segment(next_seq)
        _discard(self._gc())
        log.info("spool %s: recovered %d messages from %d segments (writer w%d)",
                 self.root, len(self._entries), len(self._segments) - 1, self.worker)

    def _writer_of(self, qid_or_name: str) -> int:
        # Spilled bodies are named '<qid>.w<W>' so each writer cleans only its own.
        _, _, w = qid_or_name.rpartition(".w")
        return int(w) if w.isdigit() else self.worker

    def _segment_files(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in (self.root / "segments").glob("w*-*.log"):
            w, _, seq = p.stem[1:].partition("-")
            if w.isdigit() and seq.isdigit():
                out.append((int(w), int(seq), p))
        return sorted(out)

    def _own_segments(self) -> list[tuple[int, Path]]:
        return [(seq, p) for w, seq, p in self._segment_files() if w == self.worker]

    def _replay(self, seq: int, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        seg = _Segment(path, seq, fd)
        self._segments[seq] = seg
        good_end = 0
        for kind, payload, off, end in read_records(fd, seg.size, resync=True):
            if kind is None:        # corruption in the middle: skipped up to `end`
                self._quarantine_segment(seg, off)
                continue
            good_end = end
            try:
                self._apply(seg, kind, payload, off)
            except (ValueError, KeyError, TypeError, struct.error) as e:
                metrics.SPOOL_CORRUPT.inc()
                log.error("spool %s: unreadable record at %d (%s), skipped", path, off, e)
        if good_end < seg.size:
            # A torn write at the tail was never acknowledged: cut it off.
            log.warning("spool %s: discarding %d bytes of incomplete record at the tail",
                        path, seg.size - good_end)
            os.ftruncate(fd, good_end)
            os.fsync(fd)
            seg.size = good_end

    def _quarantine_segment(self, seg: _Segment, off: int) -> None:
        """Corruption in the middle (not a torn tail): keep what we read, move the file
        aside for a human, and re-home its live messages when the spool opens."""
        metrics.SPOOL_CORRUPT.inc()
        log.error("spool %s: corrupt record at offset %d; the segment is kept in corrupt/ "
                  "and its readable messages are rewritten", seg.path, off)
        if seg.seq not in self._rehome:
            self._rehome.append(seg.seq)

    def _apply(self, seg: _Segment, kind: bytes, payload: bytes, off: int) -> None:
        if kind == b"M":
            (jlen,) = _U32.unpack_from(payload, 0)
            meta = json.loads(payload[4:4 + jlen])
            (hlen,) = _U32.unpack_from(payload, 4 + jlen)
            head_off = 4 + jlen + 4
            external = bool(meta.pop("external", False))
            body_len = meta.pop("body_len", len(payload) - head_off - hlen)
            env = Envelope.from_json(meta)
            self._drop(env.queue_id)
            self._entries[env.queue_id] = _Entry(env, seg.seq, off + _HDR.size + head_off,
                                                 hlen, body_len, external)
            seg.live.add(env.queue_id)
        elif kind == b"S":
            env = Envelope.from_json(json.loads(payload))
            e = self._entries.get(env.queue_id)
            if e is not None:
                e.env = env
        elif kind == b"D":
            self._drop(payload.decode("ascii"))
        else:
            raise ValueError(f"unknown record type {kind!r}")

    def _keep_recent(self, qid: str, pieces: list[bytes], size: int) -> None:
        """Keep a just-stored small message's bytes for its first delivery attempt,
        which usually starts at once: it then costs no read back from the disk cache.
        Bounded (RECENT_BYTES, oldest out first); a message not found here is read."""
        if size > RECENT_MAX or not self.cfg.memory_budget:
            return
        self._recent[qid] = (pieces, size)
        self._recent_bytes += size
        while self._recent_bytes > RECENT_BYTES:
            _, (_, n) = self._recent.popitem(last=False)
            self._recent_bytes -= n

    def _forget_recent(self, qid: str) -> list[bytes] | None:
        kept = self._recent.pop(qid, None)
        if kept is None:
            return None
        self._recent_bytes -= kept[1]
        return kept[0]

    def _drop(self, qid: str) -> _Entry | None:
        self._forget_recent(qid)
        e = self._entries.pop(qid, None)
        if e is not None:
            seg = self._segments.get(e.segment)
            if seg is not None:
                seg.live.discard(qid)
        return e

    def _new_segment(self, seq: int) -> _Segment:
        path = self.root / "segments" / f"w{self.worker}-{seq:08d}.log"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(path.parent)
        seg = _Segment(path, seq, fd)
        self._segments[seq] = seg
        return seg

    async def _adopt_foreign(self, adopt: bool) -> None:
        """Segments of writers beyond the current worker count (the relay was scaled
        down) and corrupt segments: rewrite their live messages into our log."""
        foreign = sorted({w for w, _, _ in self._segment_files()
                          if adopt and w >= self.workers and w % self.workers == self.worker})
        for w in foreign:
            other = Spool(self.cfg, worker=w, workers=w + 1)
            try:
                await asyncio.to_thread(other._open_sync)
            except SpoolError:
                continue            # that writer is alive elsewhere: leave it alone
            for e in list(other._entries.values()):
                await self.add(e.env, other._read_sync(e))
            other._close_sync(delete=True)
        for seq in list(self._rehome):
            seg = self._segments[seq]
            for qid in list(seg.live):
                await self._rewrite(self._entries[qid])
            os.close(seg.fd)
            seg.path.rename(self.root / "corrupt" / seg.path.name)
            del self._segments[seq]
        self._rehome = []
        await self._gc_async()

    # --- writing ------------------------------------------------------------------

    def _append(self, record: bytes | list[bytes],
                on_written: Callable[[int], None] | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut, on_written))
        assert self._wake is not None
        self._wake.set()
        return fut

    async def _commit_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.cfg.commit_delay:
                await asyncio.sleep(self.cfg.commit_delay)
            batch, self._pending = self._pending, []
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                done = loop.create_future()
                self._jobs.put(([r for r, _, _ in batch], done, loop))
                offsets = await done
            except OSError as e:
                metrics.SPOOL_ERRORS.labels("write").inc()
                log.error("spool write failed: %s", e)
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(SpoolError(str(e)))
                continue
            metrics.SPOOL_COMMITS.inc()
            metrics.SPOOL_COMMIT_SECONDS.observe(time.monotonic() - t0)
            for (_, fut, cb), off in zip(batch, offsets, strict=True):
                if cb is not None:
                    cb(off)
                if not fut.done():
                    fut.set_result(off)

    def _write_batch(self, records: list[bytes | list[bytes]]) -> list[int]:
        """Append records (each bytes or a list of pieces) and fdatasync once; return
        each record's offset. On failure the segment is cut back to where it was, so no
        half record stays behind."""
        seg = self._active
        assert seg is not None
        if seg.size >= self.cfg.segment_size:
            seg = self._active = self._new_segment(seg.seq + 1)
        start = seg.size
        pieces: list[bytes] = []
        offsets: list[int] = []
        off = start
        for r in records:
            offsets.append(off)
            if isinstance(r, bytes):
                pieces.append(r)
                off += len(r)
            else:
                pieces.extend(r)
                off += sum(map(len, r))
        try:
            _write_durably(seg.fd, pieces, start)
        except OSError:
            try:
                os.ftruncate(seg.fd, start)
            except OSError:
                # Cannot even cut back: start a fresh segment so later records never
                # follow garbage. Recovery treats this tail as torn.
                self._active = self._new_segment(seg.seq + 1)
            raise
        seg.size = off
        return offsets

    def check_space(self, size: int = 0) -> None:
        """Raise SpoolFull when the filesystem cannot take `size` more bytes plus the
        configured reserve (checked at MAIL with SIZE=). The free space is sampled at
        most once a second: statvfs on every MAIL showed in the profile, and a real
        disk-full still fails the write and answers 4xx."""
        need = size + self.cfg.min_free_space
        now = time.monotonic()
        # A refusal always looks again: space freed a moment ago counts at once.
        if now - self._space_at > 1.0 or self._space < need:
            try:
                st = os.statvfs(self.root)
            except OSError as e:
                raise SpoolError(str(e)) from None
            self._space = st.f_bavail * st.f_frsize
            self._space_at = now
        if self._space < need:
            raise SpoolFull("insufficient system storage")

    def writer(self, queue_id: str) -> MessageWriter:
        return MessageWriter(self, queue_id)

    async def add(self, env: Envelope, message: bytes) -> None:
        """Queue a whole message (DSNs, releases, drains in). Durable on return."""
        w = self.writer(env.queue_id)
        w.write(message)
        await w.commit(env, b"")

    async def _commit_message(self, env: Envelope, head: bytes, body: bytes | list[bytes] | None,
                              external: bool, body_len: int, notify: bool = True) -> None:
        meta = env.to_json()
        if external:
            meta["external"] = True
            meta["body_len"] = body_len
        j = _JSON.encode(meta).encode()
        payload_prefix = _U32.pack(len(j)) + j + _U32.pack(len(head)) + head
        if body is None:
            body = []
        elif isinstance(body, bytes):
            body = [body]
        record = _frame_parts(b"M", [payload_prefix, *body])
        seg_holder: list[int] = []

        def on_written(off: int) -> None:
            assert self._active is not None
            seg_holder.append(self._active.seq)
            seg = self._active
            self._drop(env.queue_id)
            self._entries[env.queue_id] = _Entry(
                env, seg.seq, off + _HDR.size + len(payload_prefix) - len(head),
                len(head), body_len, external)
            seg.live.add(env.queue_id)
            if notify and not external:
                self._keep_recent(env.queue_id, [head, *body], len(head) + body_len)

        await self._append(record, on_written)
        self._gauges_soon()
        if notify:
            for cb in self._subscribers:
                cb(env)

    async def update(self, env: Envelope) -> None:
        """Persist recipient states / held flag. Durable on return."""
        if env.queue_id not in self._entries:
            return
        self._entries[env.queue_id].env = env
        j = _JSON.encode(env.to_json()).encode()
        await self._append(_frame(b"S", j))

    async def remove(self, queue_id: str) -> None:
        """The message left the queue (delivered, bounced, deleted). Durable on return."""
        e = self._drop(queue_id)
        if e is None:
            return
        await self._append(_frame(b"D", queue_id.encode("ascii")))
        if e.external:
            try:
                os.unlink(self._external_path(queue_id))
            except OSError:
                pass
        await self._gc_async()
        self._gauges_soon()

    def _gc(self) -> list[_Segment]:
        """Take the oldest segments out while none of their messages is live; the
        caller deletes them (_discard)."""
        assert self._active is not None
        dead = []
        for seq in sorted(self._segments):
            seg = self._segments[seq]
            # A corrupt segment stays until its messages are rewritten and it is moved
            # to corrupt/ (for a human), and pins the newer ones as a live one would.
            if seg is self._active or seg.live or seq in self._rehome:
                break
            dead.append(self._segments.pop(seq))
        return dead

    async def _gc_async(self) -> None:
        # Unlinking a full segment frees its page cache: milliseconds of kernel time
        # that would stall every session if it ran on the event loop.
        if dead := self._gc():
            await asyncio.to_thread(_discard, dead)

    async def compact(self) -> int:
        """Re-append the live messages of the oldest segment (if it is not the active
        one and only a few are live) so it can be deleted; returns how many were moved.
        Run periodically."""
        assert self._active is not None
        older = [s for s in sorted(self._segments) if self._segments[s] is not self._active]
        if not older:
            return 0
        seg = self._segments[older[0]]
        if len(seg.live) > COMPACT_MAX_LIVE:
            return 0    # still busy: it empties as deliveries finish; copying is waste
        moved = 0
        for qid in list(seg.live):
            await self._rewrite(self._entries[qid])
            moved += 1
        await self._gc_async()
        return moved

    async def _rewrite(self, e: _Entry) -> None:
        """Append a message again with its current state; a spilled body stays where
        it is (rewriting it in place could tear the only copy)."""
        seg = self._segments[e.segment]
        head = os.pread(seg.fd, e.head_len, e.offset)
        body = None if e.external else os.pread(seg.fd, e.body_len, e.offset + e.head_len)
        await self._commit_message(e.env, head, body, e.external, e.body_len, notify=False)

    # --- reading ------------------------------------------------------------------

    def envelopes(self) -> list[Envelope]:
        return [e.env for e in self._entries.values()]

    def get(self, queue_id: str) -> Envelope | None:
        e = self._entries.get(queue_id)
        return e.env if e else None

    def subscribe(self, callback: Callable[[Envelope], None]) -> None:
        self._subscribers.append(callback)

    def _external_path(self, qid: str) -> Path:
        return self.root / "data" / f"{qid}.w{self.worker}"

    def _read_sync(self, e: _Entry) -> bytes:
        seg = self._segments[e.segment]
        head = os.pread(seg.fd, e.head_len, e.offset)
        if e.external:
            with open(self._external_path(e.env.queue_id), "rb") as f:
                return head + f.read()
        return head + os.pread(seg.fd, e.body_len, e.offset + e.head_len)

    async def read(self, queue_id: str) -> bytes:
        e = self._entries.get(queue_id)
        if e is None:
            raise KeyError(queue_id)
        if e.head_len + e.body_len <= 1 << 20:
            return self._read_sync(e)       # page cache: cheaper than a thread hop
        return await asyncio.to_thread(self._read_sync, e)

    def head(self, queue_id: str) -> bytes:
        """The stored head record: the whole header section of a message received over
        SMTP (the session stores its header block there), b"" for one queued whole with
        add() (DSNs, releases), whose header section starts its body. One pread."""
        e = self._entries.get(queue_id)
        if e is None:
            raise KeyError(queue_id)
        kept = self._recent.get(queue_id)
        if kept is not None:
            return kept[0][0]
        return os.pread(self._segments[e.segment].fd, e.head_len, e.offset)

    def parts(self, queue_id: str, limit: int = 1 << 20) -> list[bytes] | None:
        """[head + body] of a message kept in its segment and at most `limit` bytes: the
        two records sit side by side, so one pread from the page cache (cheaper than a
        thread hop). None for a bigger or spilled one: stream it with chunks()."""
        e = self._entries.get(queue_id)
        if e is None:
            raise KeyError(queue_id)
        if e.external or e.head_len + e.body_len > limit:
            return None
        kept = self._forget_recent(queue_id)
        if kept is not None:
            return kept
        return [os.pread(self._segments[e.segment].fd, e.head_len + e.body_len, e.offset)]

    async def chunks(self, queue_id: str, size: int = 1 << 18) -> AsyncIterator[bytes]:
        """The stored bytes as the head, then body pieces of at most `size`: memory
        O(size) however big the message. A spilled body is read in a thread; one in the
        segment with preads (the page cache has it), looked up again for each piece,
        since compaction may move the record meanwhile (same bytes, new place)."""
        e = self._entries.get(queue_id)
        if e is None:
            raise KeyError(queue_id)
        yield os.pread(self._segments[e.segment].fd, e.head_len, e.offset)
        if e.external:
            fd = await asyncio.to_thread(os.open, self._external_path(queue_id), os.O_RDONLY)
            try:
                pos = 0
                while pos < e.body_len:
                    chunk = await asyncio.to_thread(os.pread, fd, min(size, e.body_len - pos), pos)
                    if not chunk:
                        raise SpoolError(f"{queue_id}: spilled body shorter than recorded")
                    pos += len(chunk)
                    yield chunk
            finally:
                os.close(fd)
            return
        done = 0
        while done < e.body_len:
            cur = self._entries.get(queue_id)
            if cur is None:
                raise KeyError(queue_id)        # removed meanwhile (queue delete)
            n = min(size, cur.body_len - done)
            chunk = os.pread(self._segments[cur.segment].fd, n, cur.offset + cur.head_len + done)
            if len(chunk) < n:
                raise SpoolError(f"{queue_id}: record shorter than recorded")
            done += n
            yield chunk

    # --- closing ------------------------------------------------------------------

    async def close(self) -> None:
        if self._committer is not None:
            while self._pending:
                await asyncio.sleep(0.001)
            self._committer.cancel()
            try:
                await self._committer
            except asyncio.CancelledError:
                pass
            self._committer = None
        if self._writer_thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer_thread.join)
            self._writer_thread = None
        self._close_sync()

    def _write_thread(self) -> None:
        """The commit thread: appends and fsyncs batches, so the event loop never
        blocks on the disk. A thread of its own rather than the loop's executor: it
        runs only these few lines between system calls, so it takes the GIL back from
        the loop fewer times per batch (each take a futex wake and a context switch)."""
        while (job := self._jobs.get()) is not None:
            records, done, loop = job
            try:
                result: Any = self._write_batch(records)
                ok = True
            except OSError as e:
                result, ok = e, False
            try:
                loop.call_soon_threadsafe(_settle, done, ok, result)
            except RuntimeError:
                pass                # the loop is gone (shutdown): nobody waits

    def _close_sync(self, delete: bool = False) -> None:
        for seg in self._segments.values():
            try:
                os.close(seg.fd)
            except OSError:
                pass
            if delete:
                seg.path.unlink(missing_ok=True)
        if delete:
            for qid, e in self._entries.items():
                if e.external:
                    self._external_path(qid).unlink(missing_ok=True)
            fsync_dir(self.root / "segments")
        self._segments.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _gauges_soon(self) -> None:
        """Refresh the queue gauges shortly: one walk of every entry per message would
        make the per-message cost grow with the queue (coalesced, at most twice a second)."""
        if not self._gauges_pending:
            self._gauges_pending = True
            asyncio.get_running_loop().call_later(0.5, self._gauges_now)

    def _gauges_now(self) -> None:
        self._gauges_pending = False
        self._update_gauges()

    def _update_gauges(self) -> None:
        counts = {q: 0 for q in (QueueName.ACTIVE, QueueName.DEFERRED, QueueName.HOLD)}
        oldest = {q: 0.0 for q in counts}
        now = time.time()
        total = 0
        for e in self._entries.values():
            q = e.env.queue_name(now)
            counts[q] += 1
            oldest[q] = max(oldest[q], now - e.env.arrival)
            total += e.head_len + e.body_len
        for q, n in counts.items():
            metrics.QUEUE_MESSAGES.labels(q.value).set(n)
            metrics.QUEUE_OLDEST.labels(q.value).set(oldest[q])
        metrics.QUEUE_BYTES.set(total)


class MessageWriter:
    """Receives one message's bytes as DATA streams; kept in memory up to the spill
    threshold (and while the spool's shared memory budget allows), then spilled to
    data/<qid>. Nothing here is a promise until commit() returns."""

    def __init__(self, spool: Spool, queue_id: str):
        self.spool = spool
        self.queue_id = queue_id
        self._buf: list[bytes] = []
        self._mem = 0
        self._file = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        sp = self.spool
        if (self._mem + len(chunk) > sp.cfg.spill_threshold
                or sp.memory_in_use + len(chunk) > sp.cfg.memory_budget):
            self._spill()
            self._file.write(chunk)
            return
        self._buf.append(chunk)
        self._mem += len(chunk)
        sp.memory_in_use += len(chunk)

    def _spill(self) -> None:
        path = self.spool._external_path(self.queue_id)
        self._file = open(path, "wb", buffering=1 << 16)  # noqa: SIM115 - closed in commit/abort
        for b in self._buf:
            self._file.write(b)
        self._release_memory()

    def _release_memory(self) -> None:
        self.spool.memory_in_use -= self._mem
        self._mem = 0
        self._buf = []

    async def body(self) -> bytes:
        """The bytes written so far (for filters at end of DATA)."""
        if self._file is None:
            return b"".join(self._buf)
        self._file.flush()
        path = self.spool._external_path(self.queue_id)
        return await asyncio.to_thread(path.read_bytes)

    async def commit(self, env: Envelope, head: bytes) -> None:
        """Make head + body and the envelope durable. Raises SpoolError."""
        env.size = len(head) + self.size
        try:
            if self._file is not None:
                f, self._file = self._file, None
                await asyncio.to_thread(_sync_close, f)
                await self.spool._commit_message(env, head, None, True, self.size)
            else:
                body = self._buf            # joined once, into the record
                self._release_memory()
                await self.spool._commit_message(env, head, body, False, self.size)
        except OSError as e:
            metrics.SPOOL_ERRORS.labels("commit").inc()
            self.abort()
            raise SpoolError(str(e)) from None
        except SpoolError:
            self.abort()
            raise

    def abort(self) -> None:
        self._release_memory()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self.spool._external_path(self.queue_id).unlink(missing_ok=True)


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    fsync_dir(Path(f.name).parent)


def read_records(fd: int, size: int, resync: bool = False):
    """Yield (kind, payload, offset, end) for each good record. A bad or incomplete
    record ends the walk (a torn tail), unless `resync` finds a well-formed record after
    it: then it is corruption in the middle (an append that never completed leaves
    nothing after it), reported as (None, None, bad_offset, next_good_offset)."""
    off = 0
    while off < size:
        rec = _record_at(fd, off, size)
        if rec is None:
            nxt = _next_record(fd, off, size) if resync else -1
            if nxt < 0:
                return
            yield None, None, off, nxt
            off = nxt
            continue
        kind, payload, end = rec
        yield kind, payload, off, end
        off = end


def _record_at(fd: int, off: int, size: int) -> tuple[bytes, bytes, int] | None:
    hdr = os.pread(fd, _HDR.size, off)
    if len(hdr) < _HDR.size:
        return None
    magic, kind, length, crc = _HDR.unpack(hdr)
    if magic != MAGIC or length > size - off - _HDR.size:
        return None
    payload = os.pread(fd, length, off + _HDR.size)
    if len(payload) < length or zlib.crc32(kind + payload) != crc:
        return None
    return kind, payload, off + _HDR.size + length


def _next_record(fd: int, start: int, size: int) -> int:
    data = os.pread(fd, size - start, start)
    pos = data.find(MAGIC, 1)
    while pos >= 0:
        if _record_at(fd, start + pos, size) is not None:
            return start + pos
        pos = data.find(MAGIC, pos + 1)
    return -1


def scan(root: str | Path) -> list[Envelope]:
    """Read every writer's segments without locking (for `relay queue list` beside a
    running relay): the state as of the last written record."""
    entries: dict[str, Envelope] = {}
    seg_dir = Path(root) / "segments"
    if not seg_dir.is_dir():
        return []
    files = []
    for p in seg_dir.glob("w*-*.log"):
        w, _, seq = p.stem[1:].partition("-")
        if w.isdigit() and seq.isdigit():
            files.append((int(w), int(seq), p))
    for _, _, p in sorted(files):
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue        # deleted by the running relay since we listed it
        try:
            for kind, payload, _, _ in read_records(fd, os.fstat(fd).st_size):
                if kind is None:
                    break
                try:
                    if kind == b"M":
                        (jlen,) = _U32.unpack_from(payload, 0)
                        meta = json.loads(payload[4:4 + jlen])
                        meta.pop("external", None)
                        meta.pop("body_len", None)
                        env = Envelope.from_json(meta)
                        entries[env.queue_id] = env
                    elif kind == b"S":
                        env = Envelope.from_json(json.loads(payload))
                        if env.queue_id in entries:
                            entries[env.queue_id] = env
                    elif kind == b"D":
                        entries.pop(payload.decode("ascii"), None)
                except (ValueError, KeyError, TypeError):
                    continue
        finally:
            os.close(fd)
    return list(entries.values())
