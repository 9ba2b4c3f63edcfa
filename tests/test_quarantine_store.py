"""Quarantine store: filing, ownership, exact bytes, uids, flags, folders, retention."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from relay.config import QuarantineConfig, QuarantineUser
from relay.metrics import QUARANTINE_EXPIRED
from relay.quarantine.store import (
    INBOX,
    QuarantineStore,
    StoreError,
    check_folder_name,
    parse_users_file,
    sanitize_header,
)
from relay.queue.model import Envelope, Recipient

MSG = (b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\n"
       b"Subject: hello\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody line\r\n"
       b"second line with bare \n LF kept and \xff 8-bit\r\n")


def fake_verify(pw: str, stored: str) -> bool:
    return stored == "plain:" + pw


def make_store(tmp_path: Path, **kw) -> QuarantineStore:
    users = (
        QuarantineUser("bob", "plain:bobpw", ("bob@example.test",)),
        QuarantineUser("carol", "plain:carolpw", ("@carol.test",)),
        QuarantineUser("admin", "plain:adminpw", (), admin=True),
    )
    cfg = QuarantineConfig(path=str(tmp_path / "q"), users=users, **kw)
    return QuarantineStore(cfg, verify_password=fake_verify)


def env(*rcpts: str, sender: str = "alice@example.test") -> Envelope:
    return Envelope("QID123", sender, [Recipient(r) for r in rcpts])


def test_put_files_into_owner_inbox_and_admin_folder_with_exact_bytes(tmp_path):
    st = make_store(tmp_path)
    qid = asyncio.run(st.put(env("bob@example.test", "x@carol.test", "nobody@else.test"), MSG,
                             "spam", "spamfilter", "score 12\r\nInjected: yes"))
    bob = st.folder("bob", INBOX)
    carol = st.folder("carol", INBOX)
    admin = st.folder("admin", "spam")
    assert [m.qid for m in bob.messages] == [qid]
    assert [m.qid for m in carol.messages] == [qid]
    assert [m.qid for m in admin.messages] == [qid]
    data = bob.read(bob.messages[0])
    meta = st.meta(qid)
    assert data[meta.prefix_len:] == MSG
    head = data[:meta.prefix_len]
    assert b"X-Quarantine-Reason: score 12 Injected: yes\r\n" in head
    assert b"X-Quarantine-Sender: <alice@example.test>\r\n" in head
    assert head.count(b"\r\n") == 7 and b"\n\n" not in head
    assert asyncio.run(st.original(qid)) == MSG
    assert meta.envelope.queue_id == "QID123" and meta.owners == ("bob", "carol")
    # one message, one file: every copy is a hard link
    assert os.stat(bob.path_of(bob.messages[0])).st_nlink == 3
    assert not st.folder("admin", INBOX).messages


def test_unowned_without_admin_is_kept(tmp_path):
    cfg = QuarantineConfig(path=str(tmp_path / "q"))
    st = QuarantineStore(cfg, verify_password=fake_verify)
    qid = asyncio.run(st.put(env("z@z.test"), MSG, "", "f", "r"))
    assert asyncio.run(st.original(qid)) == MSG


def test_uids_stable_across_instances_and_flags_in_maildir_info(tmp_path):
    st = make_store(tmp_path)
    qids = [asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
            for _ in range(3)]
    f = st.folder("bob", INBOX)
    assert all(m.sub == "new" for m in f.messages)   # folder() does not claim \Recent
    assert f.refresh() == [1, 2, 3]                   # the first claimer gets them
    assert f.refresh() == []
    uids = [m.uid for m in f.messages]
    assert uids == [1, 2, 3] and [m.qid for m in f.messages] == qids
    f.set_flags(2, {"\\Seen", "\\Flagged", "$Junk"})
    uv = f.uidvalidity
    st2 = make_store(tmp_path)
    f2 = st2.folder("bob", INBOX)
    assert f2.uidvalidity == uv
    assert [(m.uid, m.qid) for m in f2.messages] == list(zip(uids, qids, strict=True))
    assert f2.by_uid[2].flags == {"\\Seen", "\\Flagged", "$Junk"}
    assert f2.path_of(f2.by_uid[2]).name.endswith(":2,FS")
    f2.expunge([1])
    asyncio.run(st2.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    f3 = make_store(tmp_path).folder("bob", INBOX)
    assert [m.uid for m in f3.messages] == [2, 3, 4]


def test_claim_recent_moves_new_to_cur(tmp_path):
    st = make_store(tmp_path)
    asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    f = st.folder("bob", INBOX)
    assert f.refresh(claim_recent=True) == [1]
    assert f.messages[0].sub == "cur"
    assert f.refresh(claim_recent=True) == []


def test_expunge_last_link_discards(tmp_path):
    st = make_store(tmp_path)
    qid = asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    st.folder("bob", INBOX).expunge([1])
    assert st.meta(qid) is not None          # admin still holds it
    st.folder("admin", "spam").expunge([1])
    assert st.meta(qid) is None


def test_discard_removes_every_link_and_notifies(tmp_path):
    st = make_store(tmp_path)
    qid = asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    st.create_folder("bob", "Keep")
    src = st.folder("bob", INBOX)
    src.copy_to([1], st.folder("bob", "Keep"))
    src.copy_to([1], src)                       # a second link in the same folder
    seen = []
    st.watch("bob", INBOX, lambda u, f: seen.append((u, f)))
    assert asyncio.run(st.discard(qid, via="cli", who="test"))
    assert ("bob", INBOX) in seen
    for u, f in (("bob", INBOX), ("bob", "Keep"), ("admin", "spam")):
        assert st.folder(u, f).messages == []
    assert st.meta(qid) is None
    assert not asyncio.run(st.discard(qid))
    assert not asyncio.run(st.discard("../../etc/passwd"))


def test_expire(tmp_path):
    st = make_store(tmp_path, retention=100)
    old = asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    before = QUARANTINE_EXPIRED._value.get()
    assert asyncio.run(st.expire(time.time() + 50)) == 0
    assert asyncio.run(st.expire(time.time() + 101)) == 1
    assert QUARANTINE_EXPIRED._value.get() == before + 1
    assert st.meta(old) is None and st.folder("bob", INBOX).messages == []


@pytest.mark.parametrize("bad", ["..", "a/b", "/etc", "a*", "b%", "x\x00", "x\r\ny", "",
                                 "a..b", ".hidden", "x" * 300, "INBOX.sub", "~root",
                                 "a\\b", "end."])
def test_bad_folder_names_refused(tmp_path, bad):
    st = make_store(tmp_path)
    with pytest.raises(StoreError):
        st.create_folder("bob", bad)
    with pytest.raises(StoreError):
        st.folder("bob", bad)


def test_folder_lifecycle(tmp_path):
    st = make_store(tmp_path)
    assert check_folder_name("inbox") == INBOX
    st.create_folder("bob", "a.b.c")
    names = dict(st.list_folders("bob"))
    assert names == {INBOX: True, "a": True, "a.b": True, "a.b.c": True}
    with pytest.raises(StoreError):
        st.create_folder("bob", "a.b")
    st.rename_folder("bob", "a", "z")
    assert sorted(dict(st.list_folders("bob"))) == [INBOX, "z", "z.b", "z.b.c"]
    st.delete_folder("bob", "z.b")              # has inferiors: becomes \Noselect
    assert dict(st.list_folders("bob"))["z.b"] is False
    with pytest.raises(StoreError):
        st.folder("bob", "z.b")
    st.delete_folder("bob", "z.b.c")
    with pytest.raises(StoreError):
        st.delete_folder("bob", INBOX)
    # user directories stay apart
    assert "z" not in dict(st.list_folders("carol"))
    st.set_subscribed("bob", "z", True)
    assert st.subscriptions("bob") == ["z"]


def test_rename_inbox_moves_messages(tmp_path):
    st = make_store(tmp_path)
    asyncio.run(st.put(env("bob@example.test"), MSG, "spam", "f", "r"))
    st.rename_folder("bob", "INBOX", "old")
    assert st.folder("bob", INBOX).messages == []
    assert len(st.folder("bob", "old").messages) == 1


def test_append_and_readable_by_standard_tools(tmp_path):
    st = make_store(tmp_path)
    f = st.folder("bob", INBOX)
    uid = f.append(b"Subject: x\r\n\r\nhi\r\n", {"\\Seen"}, date=1_000_000_000)
    m = f.by_uid[uid]
    assert f.read(m) == b"Subject: x\r\n\r\nhi\r\n"
    assert f.internaldate(m) == 1_000_000_000
    # Python's own mailbox module (a standard Maildir reader) sees it
    import mailbox
    md = mailbox.Maildir(str(f.path), create=False)
    assert [msg["Subject"] for msg in md] == ["x"]
    assert next(iter(md)).get_flags() == "S"
    assert subprocess.run(["ls", str(f.path / "cur")], capture_output=True).returncode == 0


def test_users_file_and_authenticate(tmp_path):
    uf = tmp_path / "users"
    uf.write_text("# comment\ndave:plain:x:admin\nerin:plain2:E@x.test,f@x.test\nbad line\n")
    users = parse_users_file(uf.read_text())
    assert [u.name for u in users] == ["dave", "erin"]
    cfg = QuarantineConfig(path=str(tmp_path / "q"), users_file=str(uf))
    st = QuarantineStore(cfg, verify_password=lambda pw, h: h == "plain2" and pw == "ok")
    assert st.user("dave").admin is False or st.user("dave").password_hash == "plain"
    assert st.authenticate("erin", "ok").owns("e@X.test")
    assert st.authenticate("erin", "no") is None
    assert st.authenticate("nobody", "ok") is None


def test_sanitize_header():
    assert sanitize_header("a\r\nb\x00c\td") == "a b?c d"
    assert len(sanitize_header("x" * 1000)) == 200


def test_changes_by_another_process_reach_watchers(tmp_path):
    """watch_disk: mail filed by another store on the same directory (another worker,
    another pod) notifies this one's watchers; a folder that stays the same stops
    being notified."""
    async def body():
        mine, other = make_store(tmp_path), make_store(tmp_path)
        await mine.put(env("bob@example.test"), MSG, "spam", "f", "r")   # folders exist
        calls: list[tuple[str, str]] = []
        mine.watch("bob", INBOX, lambda u, f: calls.append((u, f)))
        task = asyncio.create_task(mine.watch_disk(interval=0.05))
        try:
            await asyncio.sleep(0.3)
            settled = len(calls)
            await asyncio.sleep(0.3)
            assert len(calls) == settled                # nothing changed: quiet
            await other.put(env("bob@example.test"), MSG, "spam", "f", "r")
            deadline = time.monotonic() + 5
            while len(calls) == settled and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert calls[settled:] and set(calls) == {("bob", INBOX)}
        finally:
            task.cancel()
    asyncio.run(body())
