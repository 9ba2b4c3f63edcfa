"""Digests built from a real store and parsed back with the email package."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time

from _pop3 import envelope, make_store, message

from relay.config import Duration, HostPort, QuarantineUser
from relay.quarantine.digest import build_digests, run_digests

USERS = (
    QuarantineUser("bob", "plain:bobpw", ("bob@example.test",)),
    QuarantineUser("carol", "plain:carolpw", ("@carol.test",)),       # no literal address
    QuarantineUser("dave", "plain:davepw", ("dave@example.test",)),   # nothing held
    QuarantineUser("admin", "plain:adminpw", ("postmaster@example.test",), admin=True),
)
ON = dict(digest_from="quarantine@example.test", digest_interval=Duration(86400),
          pop3s_address=HostPort.parse("127.0.0.1:1995"))


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def filled(tmp_path, **kw):
    store = make_store(tmp_path, users=USERS, **{**ON, **kw})
    asyncio.run(store.put(envelope("bob@example.test", "x@carol.test"),
                          message("Cheap watches"), "spam", "spamfilter", "score 12"))
    # RFC 2047 subject, 8-bit junk and a header-injection attempt in the reason
    junk = (b"From: x@bad.test\r\nSubject: =?utf-8?q?Caf=C3=A9_=E2=82=AC?=\r\n"
            b"X-Junk: \xff\xfe\r\n\r\nbody\r\n")
    asyncio.run(store.put(envelope("bob@example.test", sender="x@bad.test"), junk,
                          "dmarc", "dmarc", "p=reject\r\nBcc: victim@example.test"))
    asyncio.run(store.put(envelope("bob@example.test", sender=""), b"no header block",
                          "spam", "size", "too big"))
    return store


def test_owner_digest_and_admin_summary(tmp_path):
    store = filled(tmp_path)
    now = time.time()
    out = build_digests(store, store.cfg, now)
    by_to = {tuple(r.address for r in env.recipients): (env, data) for env, data in out}
    assert set(by_to) == {("bob@example.test",), ("postmaster@example.test",)}
    env, data = by_to[("bob@example.test",)]
    assert env.sender == "quarantine@example.test" and env.size == len(data)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg["To"] == "bob@example.test"
    assert msg["From"] == "quarantine@example.test"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "Quarantine digest: 3 messages held for you"
    assert msg["Bcc"] is None
    body = msg.get_content()
    assert "Cheap watches" in body and "Café €" in body and "(no subject)" in body
    assert "from alice@example.test" in body and "from <>" in body
    assert "Reason: score 12 (filter spamfilter)" in body
    assert "Reason: p=reject Bcc: victim@example.test (filter dmarc)" in body
    assert "POP3S: server 127.0.0.1, port 1995" in body
    assert "IMAP (STARTTLS): server 127.0.0.1, port 1143" in body
    assert "'Release'" in body
    for m in store.list_meta():
        assert f"Id: {m.qid}" in body
    admin = parse(by_to[("postmaster@example.test",)][1])
    assert admin["Subject"] == "Quarantine summary: 3 messages held"
    text = admin.get_content()
    assert "spamfilter: 1" in text and "dmarc: 1" in text and "size: 1" in text
    assert "Cheap watches" in text and "Café €" in text


def test_off_without_sender_or_interval(tmp_path):
    store = filled(tmp_path / "a", digest_from="")
    assert build_digests(store, store.cfg, time.time()) == []
    store = filled(tmp_path / "b", digest_interval=Duration(0))
    assert build_digests(store, store.cfg, time.time()) == []

    async def never(env, data):
        raise AssertionError("enqueued while off")
    asyncio.run(asyncio.wait_for(run_digests(store, store.cfg, never), 5))


def test_nothing_held_nothing_sent(tmp_path):
    store = make_store(tmp_path, users=USERS, **ON)
    assert build_digests(store, store.cfg, time.time()) == []


def test_run_digests_sends_when_due(tmp_path):
    store = filled(tmp_path, digest_interval=Duration(3600))
    (tmp_path / "q" / "digest-last").write_text(repr(time.time() - 7200))  # overdue
    got = []

    async def enqueue(env, data):
        got.append((env, data))

    async def main():
        task = asyncio.create_task(run_digests(store, store.cfg, enqueue))
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()
    asyncio.run(main())
    assert sorted(env.recipients[0].address for env, _ in got) == [
        "bob@example.test", "postmaster@example.test"]
    last = float((tmp_path / "q" / "digest-last").read_text())
    assert last > time.time() - 60         # the run was recorded: next one in an hour
