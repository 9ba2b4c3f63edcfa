"""Release and delete against a real store on disk, with an enqueue that captures."""

from __future__ import annotations

import asyncio
import logging

import pytest
from _pop3 import envelope, make_store, message

from relay.metrics import QUARANTINE_DELETES, QUARANTINE_RELEASES
from relay.quarantine.release import ReleaseError, Releaser
from relay.quarantine.store import INBOX
from relay.queue.model import RcptState

# Junk the release must not "fix": bare LF, 8-bit bytes, dots, no final CRLF.
RAW = message("junk \xe9",
              b".dot\r\nbare\nLF and \xff\xfe 8-bit\r\n\r\n.\r\nno final newline")


class Capture:
    def __init__(self, fail: bool = False) -> None:
        self.got: list = []
        self.fail = fail

    async def __call__(self, env, data: bytes) -> None:
        if self.fail:
            raise OSError("spool full")
        self.got.append((env, data))


def setup(tmp_path, fail=False):
    store = make_store(tmp_path)
    cap = Capture(fail)
    return store, cap, Releaser(store, cap)


def put(store, *rcpts, data=RAW):
    return asyncio.run(store.put(envelope(*rcpts), data, "spam", "spamfilter", "score 12"))


def qids(store, user, folder=INBOX):
    return [m.qid for m in store.folder(user, folder).messages]


def counter(metric, via):
    return metric.labels(via=via)._value.get()


def test_admin_releases_everything_byte_exact(tmp_path, caplog):
    store, cap, rel = setup(tmp_path)
    qid = put(store, "bob@example.test", "x@carol.test", "nobody@else.test")
    assert qids(store, "bob") == [qid]
    before = counter(QUARANTINE_RELEASES, "cli")
    with caplog.at_level(logging.INFO, logger="relay.quarantine"):
        res = asyncio.run(rel.release("admin", qid))
    [(env, data)] = cap.got
    assert data == RAW
    assert [r.address for r in env.recipients] == ["bob@example.test", "x@carol.test",
                                                   "nobody@else.test"]
    assert all(r.state is RcptState.PENDING and r.notify == "SUCCESS,FAILURE"
               for r in env.recipients)
    assert env.queue_id != "ORIGQID" and env.queue_id == res.queue_id
    assert env.skip_filter == "spamfilter" and env.sender == "alice@example.test"
    assert env.size == len(RAW) and not env.held
    assert res.remaining == ()
    assert store.meta(qid) is None
    assert qids(store, "bob") == [] and qids(store, "carol") == []
    assert qids(store, "admin", "spam") == []
    assert counter(QUARANTINE_RELEASES, "cli") == before + 1
    assert any(f"qid={qid}" in r.getMessage() and "by=admin" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ReleaseError):
        asyncio.run(rel.release("admin", qid))


def test_user_releases_only_its_recipients(tmp_path):
    store, cap, rel = setup(tmp_path)
    qid = put(store, "bob@example.test", "x@carol.test")
    before = counter(QUARANTINE_RELEASES, "imap")
    asyncio.run(rel.on_release("bob", qid))
    assert counter(QUARANTINE_RELEASES, "imap") == before + 1
    [(env, data)] = cap.got
    assert [r.address for r in env.recipients] == ["bob@example.test"]
    assert data == RAW
    # bob's copy is gone; carol and the admin still hold it
    assert qids(store, "bob") == []
    assert qids(store, "carol") == [qid] and qids(store, "admin", "spam") == [qid]
    with pytest.raises(ReleaseError):
        asyncio.run(rel.release("bob", qid))       # nothing of bob's is left
    res = asyncio.run(rel.release("carol", qid))
    assert res.recipients == ("x@carol.test",) and res.remaining == ()
    assert [r.address for r in cap.got[1][0].recipients] == ["x@carol.test"]
    assert cap.got[1][0].queue_id != env.queue_id
    assert store.meta(qid) is None and qids(store, "admin", "spam") == []


def test_admin_after_partial_release_sends_only_the_rest(tmp_path):
    store, cap, rel = setup(tmp_path)
    qid = put(store, "bob@example.test", "x@carol.test", "y@carol.test")
    asyncio.run(rel.release("carol", qid, via="pop3"))
    asyncio.run(rel.release("admin", qid))
    assert [r.address for r in cap.got[0][0].recipients] == ["x@carol.test", "y@carol.test"]
    assert [r.address for r in cap.got[1][0].recipients] == ["bob@example.test"]
    assert store.meta(qid) is None


def test_user_cannot_release_or_delete_others_mail(tmp_path):
    store, cap, rel = setup(tmp_path)
    qid = put(store, "bob@example.test")
    with pytest.raises(ReleaseError):
        asyncio.run(rel.release("carol", qid))
    assert not asyncio.run(rel.delete("carol", qid))
    with pytest.raises(ReleaseError):
        asyncio.run(rel.release("mallory", qid))
    for bad in ("../../meta/x", "*", "", qid + "/../x"):
        with pytest.raises(ReleaseError):
            asyncio.run(rel.release("admin", bad))
    assert cap.got == [] and qids(store, "bob") == [qid]


def test_failed_enqueue_keeps_the_message(tmp_path):
    store, cap, rel = setup(tmp_path, fail=True)
    qid = put(store, "bob@example.test")
    with pytest.raises(OSError):
        asyncio.run(rel.release("bob", qid))
    assert qids(store, "bob") == [qid] and store.meta(qid) is not None


def test_delete(tmp_path, caplog):
    store, cap, rel = setup(tmp_path)
    q1 = put(store, "bob@example.test", "x@carol.test")
    q2 = put(store, "bob@example.test")
    # a user removes its own copy; the message stays for the others
    assert asyncio.run(rel.delete("bob", q1, via="imap"))
    assert qids(store, "bob") == [q2] and qids(store, "carol") == [q1]
    before = counter(QUARANTINE_DELETES, "cli")
    with caplog.at_level(logging.INFO, logger="relay.quarantine"):
        assert asyncio.run(rel.delete(None, q1))
    assert counter(QUARANTINE_DELETES, "cli") == before + 1
    assert store.meta(q1) is None and qids(store, "carol") == []
    assert any("by=operator" in r.getMessage() and q1 in r.getMessage()
               for r in caplog.records)
    assert not asyncio.run(rel.delete(None, q1))
    assert cap.got == []


def test_concurrent_releases_send_once(tmp_path):
    store, cap, rel = setup(tmp_path)
    qid = put(store, "bob@example.test")

    async def both():
        return await asyncio.gather(rel.release("bob", qid), rel.release("admin", qid),
                                    return_exceptions=True)
    results = asyncio.run(both())
    assert len(cap.got) == 1
    assert sum(isinstance(r, ReleaseError) for r in results) == 1


# --- the CLI functions ----------------------------------------------------------------

def test_cli_list_show_release_delete(tmp_path):
    import json

    from relay.config import Config
    from relay.quarantine import cli

    store, cap, _ = setup(tmp_path)
    q1 = put(store, "bob@example.test", "x@carol.test")
    q2 = put(store, "nobody@else.test", data=message("second"))
    cfg = Config(quarantine=store.cfg)
    text = cli.list_messages(cfg)
    assert q1 in text and q2 in text and "2 messages" in text and "second" in text
    records = json.loads(cli.list_messages(cfg, json=True))
    assert [r["qid"] for r in records] == [q1, q2]
    assert records[0]["recipients"] == ["bob@example.test", "x@carol.test"]
    assert records[0]["filter"] == "spamfilter" and records[1]["subject"] == "second"
    shown = asyncio.run(cli.show(cfg, q1))
    assert f"Quarantine-Id: {q1}" in shown and "Subject: junk" in shown
    assert f"Size:          {len(RAW)} bytes" in shown
    with pytest.raises(ReleaseError):
        asyncio.run(cli.show(cfg, "../../etc/passwd"))
    before = counter(QUARANTINE_RELEASES, "cli")
    out = asyncio.run(cli.release(cfg, q1, cap))
    assert "2 recipient(s)" in out and cap.got[0][1] == RAW
    assert counter(QUARANTINE_RELEASES, "cli") == before + 1
    assert asyncio.run(cli.delete(cfg.quarantine, q2)) == f"deleted {q2}"
    with pytest.raises(ReleaseError):
        asyncio.run(cli.delete(cfg, q2))
    assert cli.list_messages(cfg) == "quarantine is empty"
    assert json.loads(cli.list_messages(cfg, json=True)) == []
