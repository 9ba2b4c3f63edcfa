"""`relay quarantine list|show|release|delete`: the operator's view of held mail.

Takes the relay's Config (or just its QuarantineConfig) and opens the quarantine store
on disk; hands back the text (or JSON) the CLI prints. `release` needs the lead's
`enqueue(env, bytes)` (the durable queue's add) and releases every recipient still
held; `delete` discards the message everywhere. Both act as the operator, are logged
(by=operator, via=cli) and counted like any other release or delete. A refused action
raises ReleaseError with a message fit to print (exit status 1).

Trusts the operator (whoever can read the quarantine directory); quarantine ids are
still checked by the store, so `show ../../x` reads nothing.
"""

from __future__ import annotations

import datetime
import json as _json
from typing import Any

from relay.config import QuarantineConfig
from relay.quarantine.digest import describe, subject_of
from relay.quarantine.release import Enqueue, ReleaseError, Releaser
from relay.quarantine.store import QuarantineMeta, QuarantineStore, sanitize_header

__all__ = ["ReleaseError", "delete", "list_messages", "release", "show"]


def _store(cfg: Any) -> QuarantineStore:
    qcfg: QuarantineConfig = getattr(cfg, "quarantine", cfg)
    return QuarantineStore(qcfg)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _record(store: QuarantineStore, meta: QuarantineMeta) -> dict[str, Any]:
    held = describe(store, meta)
    env = meta.envelope
    return {"qid": meta.qid, "date": _iso(meta.date), "filter": meta.filter,
            "reason": meta.reason, "mailbox": meta.mailbox, "sender": env.sender,
            "recipients": [r.address for r in env.recipients], "subject": held.subject,
            "queue_id": env.queue_id, "size": env.size, "owners": list(meta.owners)}


def list_messages(cfg: Any, json: bool = False) -> str:
    """Every held message, oldest first: a table, or a JSON array of records."""
    store = _store(cfg)
    records = sorted((_record(store, m) for m in store.list_meta()),
                     key=lambda r: (r["date"], r["qid"]))
    if json:
        return _json.dumps(records, indent=2)
    if not records:
        return "quarantine is empty"
    lines = []
    for r in records:
        rcpts = r["recipients"]
        to = rcpts[0] + (f" +{len(rcpts) - 1}" if len(rcpts) > 1 else "") if rcpts else "-"
        lines.append(f"{r['qid']}  {r['date']}  {r['filter'] or '-':<12} "
                     f"<{sanitize_header(r['sender'], 60)}> -> {sanitize_header(to, 60)}  "
                     f"{sanitize_header(r['subject'], 60)}")
    lines.append(f"{len(records)} messages")
    return "\n".join(lines)


async def show(cfg: Any, qid: str) -> str:
    """One message: its quarantine record and the header of the original message."""
    store = _store(cfg)
    meta = store.meta(qid)
    if meta is None:
        raise ReleaseError(f"no such quarantined message: {sanitize_header(qid, 80)}")
    try:
        data = await store.original(qid)
    except KeyError:
        data = b""
    rec = _record(store, meta)
    if rec["subject"] == "(unavailable)" and data:
        rec["subject"] = subject_of(data[:65536])
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    lines = [f"Quarantine-Id: {meta.qid}",
             f"Date:          {rec['date']}",
             f"Filter:        {meta.filter or '-'}",
             f"Reason:        {sanitize_header(meta.reason or '-')}",
             f"Sender:        <{sanitize_header(meta.envelope.sender)}>",
             "Recipients:    " + ", ".join(rec["recipients"]),
             f"Owners:        {', '.join(meta.owners) or '-'}",
             f"Queue-Id:      {meta.envelope.queue_id}",
             f"Client:        {meta.envelope.client_ip or '-'} "
             f"({sanitize_header(meta.envelope.client_helo or '-')})",
             f"Size:          {len(data)} bytes",
             "", head.decode("utf-8", "replace")]
    return "\n".join(lines)


async def release(cfg: Any, qid: str, enqueue: Enqueue) -> str:
    """Release every recipient still held, as the operator."""
    res = await Releaser(_store(cfg), enqueue).release(None, qid, via="cli")
    return (f"released {res.qid} as queue id {res.queue_id} to "
            f"{len(res.recipients)} recipient(s): {', '.join(res.recipients)}")


async def delete(cfg: Any, qid: str) -> str:
    """Discard the message everywhere, as the operator."""
    store = _store(cfg)

    async def no_enqueue(env, data) -> None:      # delete never enqueues
        raise AssertionError("delete must not enqueue")
    if not await Releaser(store, no_enqueue).delete(None, qid, via="cli"):
        raise ReleaseError(f"no such quarantined message: {sanitize_header(qid, 80)}")
    return f"deleted {qid}"
