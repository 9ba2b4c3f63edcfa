"""Outbound delivery streams: the wire form built piece by piece equals to_wire of the
whole message however it is cut, and the spool hands a message out in pieces."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import time

import pytest
from _delivery import Sink, make_config, start_sinks, until
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Domain, Size, SpoolConfig, TransportRoute
from relay.delivery.client import Connection, Message, Timeouts
from relay.delivery.mx import Target
from relay.delivery.scheduler import Scheduler
from relay.delivery.wire import WireEncoder, is_crlf_clean, to_wire
from relay.dns import DNSResolver
from relay.queue.model import Envelope, Recipient, new_queue_id
from relay.queue.spool import Spool
from tests._relay import RawClient, RelayProcess, free_port, strip_trace

ALPHABET = b"\r\n.aX\x80"
contents = st.lists(st.sampled_from(list(ALPHABET)), max_size=200).map(bytes)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({min(p, len(data)) for p in points})
    out, last = [], 0
    for m in marks + [len(data)]:
        out.append(data[last:m])
        last = m
    return out


def encode(pieces: list[bytes], ready: bool) -> bytes:
    enc = WireEncoder(ready)
    out = []
    for p in pieces:
        out.extend(enc.feed(p))
    out.extend(enc.finish())
    return b"".join(bytes(p) for p in out)


@settings(max_examples=400)
@given(contents, st.lists(st.integers(0, 200), max_size=12), st.booleans())
def test_streamed_equals_whole_for_any_cut(data, points, ready):
    assert encode(cut(data, points), ready) == to_wire(data, ready)


@settings(max_examples=200)
@given(contents, st.lists(st.integers(0, 200), max_size=12))
def test_byte_by_byte(data, points):
    pieces = [data[i:i + 1] for i in range(len(data))]
    assert encode(pieces, False) == to_wire(data)
    assert encode(pieces, True) == to_wire(data, True)


# What the inbound side marks wire_ready: CRLF-only lines, none starting with '.'.
ready_lines = st.lists(st.lists(st.sampled_from(list(b"aX.\x80 ")), max_size=20).map(bytes)
                       .filter(lambda s: not s.startswith(b".")), max_size=20)


@given(ready_lines, st.lists(st.integers(0, 500), max_size=8))
def test_ready_pieces_pass_through_untouched(lines, points):
    data = b"".join(ln + b"\r\n" for ln in lines)
    assert to_wire(data, True) == to_wire(data) == data + b".\r\n"
    enc = WireEncoder(True)
    for p in cut(data, points):
        for out in enc.feed(p):
            # Nothing big copied: a stored piece, a view of one, or a held line end.
            assert isinstance(out, memoryview) or out is p or len(out) <= 22
    assert encode(cut(data, points), True) == to_wire(data)


@pytest.mark.parametrize("data", [b".x\r\n", b"x\r\n.", b"x\r\n.\r", b"a\r\nb\n", b"a\r",
                                  b"\r\n.\r\n", b"a\r\n\r\n.\n.", b""])
def test_ready_flag_that_lies_at_the_edges_is_still_safe(data):
    for n in range(1, len(data) + 2):
        pieces = [data[i:i + n] for i in range(0, len(data), n)]
        assert encode(pieces, True) == to_wire(data, True)
    wire = to_wire(data, True)
    assert is_crlf_clean(wire) and wire.endswith(b".\r\n")
    assert wire.count(b"\r\n.\r\n") <= 1


def test_ready_line_beyond_the_carry_limit_falls_back_to_the_full_conversion():
    # A flag that lies about a huge line cannot make the encoder hold it: past the
    # limit the rest is converted (still CRLF-only and dot-stuffed).
    line = b"a\rb\n" * (WireEncoder.MAX_CARRY // 2)
    data = b"ok\r\n" + line + b"\r\n.evil\r\n"
    wire = encode([data[i:i + 4096] for i in range(0, len(data), 4096)], True)
    assert wire == to_wire(data)
    assert is_crlf_clean(wire) and b"\r\n..evil\r\n" in wire


def test_truthful_long_message_in_chunks_matches():
    line = b"x" * 998 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * 3000
    for size in (1, 7, 1000, 65536, 256 * 1024):
        pieces = [data[i:i + size] for i in range(0, len(data), size)] if size > 100 else \
            [data[:5000][i:i + size] for i in range(0, 5000, size)]
        whole = data if size > 100 else data[:5000]
        assert encode(pieces, True) == to_wire(whole, True)
        assert encode(pieces, False) == to_wire(whole)


# --- the spool's read side ----------------------------------------------------------

def _env(*rcpts: str, **kw) -> Envelope:
    return Envelope(new_queue_id(), "s@x.test", [Recipient(r) for r in rcpts or ("b@y.test",)],
                    **kw)


async def _store(sp: Spool, head: bytes, body: bytes, **kw) -> Envelope:
    e = _env(**kw)
    w = sp.writer(e.queue_id)
    w.write(body)
    await w.commit(e, head)
    return e


def test_spool_hands_out_head_parts_and_chunks(tmp_path):
    async def go():
        sp = Spool(SpoolConfig(path=str(tmp_path / "spool"), min_free_space=Size(0)))
        await sp.open()
        head, small, big = b"Received: x\r\nSubject: s\r\n", b"\r\nbody\r\n", b"y" * (700 << 10)
        e1 = await _store(sp, head, small)
        e2 = await _store(sp, head, big)            # past spill_threshold: data/<qid>
        e3 = _env()
        await sp.add(e3, head + small)              # queued whole: empty head
        assert sp.head(e1.queue_id) == head and sp.head(e2.queue_id) == head
        assert sp.head(e3.queue_id) == b""
        assert b"".join(sp.parts(e1.queue_id)) == head + small
        assert sp.parts(e1.queue_id, limit=4) is None
        assert sp.parts(e2.queue_id) is None        # spilled: streamed, never read whole
        for e in (e1, e2, e3):
            pieces = [c async for c in sp.chunks(e.queue_id, 64 << 10)]
            assert all(len(c) <= 64 << 10 for c in pieces[1:])
            assert b"".join(pieces) == await sp.read(e.queue_id)
        assert len([c async for c in sp.chunks(e2.queue_id, 64 << 10)]) == 1 + 11
        await sp.close()
    asyncio.run(go())


def test_chunks_follow_a_record_that_compaction_moves_and_stop_when_removed(tmp_path):
    async def go():
        # segment_size 1: every append opens a new segment, so a rewrite moves the
        # record and the old segment (file and descriptor) goes away mid-read.
        sp = Spool(SpoolConfig(path=str(tmp_path / "spool"), min_free_space=Size(0),
                               segment_size=Size(1)))
        await sp.open()
        body = bytes(range(256)) * 512              # 128 KiB, kept in the segment
        e = await _store(sp, b"H: 1\r\n", body)
        await _store(sp, b"H: 2\r\n", b"\r\nother\r\n")
        it = sp.chunks(e.queue_id, 16 << 10)
        got = [await anext(it), await anext(it)]
        first_seg = sp._entries[e.queue_id].segment
        assert await sp.compact() == 1
        assert sp._entries[e.queue_id].segment != first_seg
        assert first_seg not in sp._segments       # closed and deleted
        got += [c async for c in it]
        assert b"".join(got) == b"H: 1\r\n" + body
        it = sp.chunks(e.queue_id, 16 << 10)
        await anext(it)
        await anext(it)
        await sp.remove(e.queue_id)
        with pytest.raises(KeyError):
            await anext(it)
        await sp.close()
    asyncio.run(go())


def test_eight_bit_is_persisted_and_absent_in_old_records_means_unknown():
    e = _env(eight_bit=True)
    assert Envelope.from_json(e.to_json()).eight_bit is True
    old = e.to_json()
    del old["eight_bit"]
    assert Envelope.from_json(old).eight_bit is None


# --- the client: a stream that fails mid-way ------------------------------------------

class _Failing:
    size = 100

    def whole(self):
        return None                     # too big to read at once: streamed

    async def pieces(self):
        yield b"Subject: t\r\n\r\npart one\r\n"
        raise OSError(5, "Input/output error")


def _send_unreadable(source):
    """Send a message whose stored bytes cannot be read to a real next hop."""
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        conn = await Connection.open(Target("sink.test", "127.0.0.1", port),
                                     helo_name="relay.test",
                                     timeouts=Timeouts(connect=3, command=3, data=3),
                                     tls_level="none")
        r = await conn.send(Message("s@x.test", (("a@x.test", None, None),), source))
        usable = conn.usable
        await conn.close()
        await asyncio.sleep(0.2)
        for s in servers:
            s.close()
        return r, usable, sink
    return asyncio.run(go())


def test_a_read_failure_mid_data_ends_the_session_without_the_final_dot():
    r, usable, sink = _send_unreadable(_Failing())
    assert [(x.code, x.enhanced) for x in r] == [(451, "4.3.0")]
    assert not usable
    assert sink.messages == []          # the partial message never became mail


class _Unreadable:
    size = 100

    def whole(self):
        raise OSError(5, "Input/output error")


def test_a_small_message_that_cannot_be_read_is_a_local_tempfail():
    r, usable, sink = _send_unreadable(_Unreadable())
    assert [(x.code, x.enhanced) for x in r] == [(451, "4.3.0")] and not usable
    assert sink.messages == []


# --- the scheduler: 8BITMIME, loops and DSNs without the whole message -----------------

class _Delivery:
    """Spool + Scheduler delivering y.test and x.test (DSNs) to an aiosmtpd sink (no
    DNS needed)."""

    def __init__(self, tmp_path, port, **delivery):
        transport = tuple(TransportRoute(Domain.parse(d), f"[127.0.0.1]:{port}")
                          for d in ("y.test", "x.test"))
        self.cfg = make_config(tmp_path / "spool", 1, port, transport=transport, **delivery)

    async def __aenter__(self):
        self.spool = Spool(self.cfg.spool)
        await self.spool.open()
        self.sched = Scheduler(self.cfg, self.spool, DNSResolver([("127.0.0.1", 1)], 1.0))
        self.sched.start()
        return self

    async def __aexit__(self, *exc):
        await self.sched.stop()
        await self.spool.close()


def test_8bitmime_known_before_mail_from(tmp_path):
    async def go():
        sink = Sink()
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        async with _Delivery(tmp_path, port) as d:
            plain = await _store(d.spool, b"Subject: a\r\n", b"\r\nascii\r\n")
            found = await _store(d.spool, b"Subject: b\r\n", b"\r\ncaf\xc3\xa9\r\n")
            await _store(d.spool, b"Subject: c\r\n", b"\r\nascii\r\n", eight_bit=True)
            await _store(d.spool, b"Subject: d\r\n",
                         b"\r\n" + (b"z" * 998 + b"\r\n") * 600 + b"\xff\r\n")
            await until(lambda: len(sink.messages) == 4)
            assert found.eight_bit is True and plain.eight_bit is False  # scanned once, kept
        for s in servers:
            s.close()
        return {m.content.split(b"\r\n")[0]: m.mail_options for m in sink.messages}
    opts = asyncio.run(go())
    assert "BODY=8BITMIME" not in opts[b"Subject: a"]
    assert "BODY=8BITMIME" in opts[b"Subject: b"]
    assert "BODY=8BITMIME" in opts[b"Subject: c"]
    assert "BODY=8BITMIME" in opts[b"Subject: d"]


def test_loop_found_in_the_stored_head_and_big_ret_full_returns_headers_only(tmp_path):
    async def go():
        sink = Sink(rcpt_replies={"gone@y.test": "550 5.1.1 no such user"})
        port, servers = await start_sinks(["127.0.0.1"], [sink])
        async with _Delivery(tmp_path, port) as d:
            received = b"".join(b"Received: from h%d by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                                % i for i in range(60))
            loop = await _store(d.spool, received + b"Subject: loop\r\n", b"\r\nbody\r\n")
            e = _env("gone@y.test", ret="FULL")
            w = d.spool.writer(e.queue_id)
            w.write(b"\r\n" + b"big body line\r\n" * 100_000)       # 1.4 MB > MAX_FULL
            await w.commit(e, b"Subject: big\r\n")
            await until(lambda: len(sink.to("s@x.test")) == 2)
            assert d.spool.get(loop.queue_id) is None and d.spool.get(e.queue_id) is None
        for s in servers:
            s.close()
        return sink.to("s@x.test")
    dsns = [email.message_from_bytes(m.content, policy=email.policy.default)
            for m in asyncio.run(go())]
    by_status = {}
    for m in dsns:
        status = "\n".join(str(p) for part in m.walk()
                           if part.get_content_type() == "message/delivery-status"
                           for p in part.get_payload())
        by_status["5.4.6" if "5.4.6" in status else "5.1.1"] = m
    assert set(by_status) == {"5.4.6", "5.1.1"}
    big = by_status["5.1.1"]
    returned = [p for p in big.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert returned and b"Subject: big" in returned[0].get_payload(decode=True)
    assert b"big body line" not in big.as_bytes()
    assert "only its header is returned" in big.as_string()


# --- end to end: a big message through the real relay to a real aiosmtpd -------------

MIB = 1 << 20


def _tree_hwm_kib(pid: int) -> int:
    """Sum of VmHWM over the relay process and its children (the workers)."""
    total = 0
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    return total


def _big_message(n: int, size: int, dots: bool) -> bytes:
    line = b"x" * 990 + b"\xc3\xa9 line\r\n"       # 1000 bytes, 8-bit
    dot = b".starts with a dot " + b"y" * 979 + b"\r\n"
    block = (line * 99 + (dot if dots else line))
    head = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: big %d\r\n\r\n" % n
    return head + block * (size // len(block))


def _send_raw(port: int, data: bytes) -> None:
    c = RawClient(port, timeout=60)
    assert c.reply()[0] == 220
    c.send(b"EHLO big\r\nMAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
           % len(data))
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    for i in range(0, len(stuffed), MIB):
        c.send(stuffed[i:i + MIB])
    c.send(b".\r\n")
    code, line = c.reply()
    assert code == 250, line
    c.close()


def test_big_messages_relay_byte_exact_with_bounded_memory(tmp_path):
    sink = Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port, data_size_limit=64 * MIB)
    ctl.start()
    conf = {"delivery": {"transport": [{"domain": "y.test", "nexthop": f"[127.0.0.1]:{port}"}],
                         "retry_schedule": [1], "mta_sts": False},
            "smtp": {"max_message_size": "60MiB"}}
    try:
        with RelayProcess(tmp_path, conf) as r:
            # Lines starting with '.' make the relay convert on the way out (the general
            # encoder); without them the stored bytes pass through (wire_ready).
            msgs = [_big_message(0, 24 * MIB, dots=True), _big_message(1, 24 * MIB, dots=False)]
            base = _tree_hwm_kib(r.proc.pid)
            for m in msgs:
                _send_raw(r.smtp_port, m)
            deadline = time.monotonic() + 60
            while len(sink.messages) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            grown = (_tree_hwm_kib(r.proc.pid) - base) / 1024
            assert r.stop() == 0
    finally:
        ctl.stop()
    got = sorted(sink.messages, key=lambda g: b"Subject: big 1" in g.content)
    assert len(got) == 2
    for g, m in zip(got, msgs, strict=True):
        assert strip_trace(g.content) == m         # byte-exact, dots and 8-bit intact
        assert "BODY=8BITMIME" in g.mail_options   # known before MAIL FROM
    # Before streaming, delivery held the message and its wire form (2 x 24 MiB).
    assert grown < 8, f"relay peak RSS grew {grown:.1f} MiB for 24 MiB messages"


def test_just_stored_messages_are_handed_to_their_first_attempt_from_memory(tmp_path, monkeypatch):
    """The first parts() of a just-stored message comes from memory (kept bounded, oldest
    out first, dropped with the message); later ones read the same bytes back."""
    from relay.queue import spool as spool_mod
    monkeypatch.setattr(spool_mod, "RECENT_BYTES", 300)

    async def go():
        sp = Spool(SpoolConfig(path=str(tmp_path / "spool"), min_free_space=Size(0)))
        await sp.open()
        head = b"Subject: s\r\n"
        es = [await _store(sp, head, b"\r\n" + bytes([65 + i]) * 100 + b"\r\n") for i in range(3)]
        # Three of ~116 bytes against a 300-byte budget: the first is out already.
        assert list(sp._recent) == [es[1].queue_id, es[2].queue_id]
        for e in es:
            assert sp.head(e.queue_id) == head
            first = sp.parts(e.queue_id)
            assert e.queue_id not in sp._recent          # handed out once
            again = sp.parts(e.queue_id)                 # from the segment this time
            assert b"".join(first) == b"".join(again) == await sp.read(e.queue_id)
        e4 = await _store(sp, head, b"\r\nlast\r\n")
        await sp.remove(e4.queue_id)
        assert sp._recent_bytes == 0 and not sp._recent
        await sp.close()
    asyncio.run(go())
