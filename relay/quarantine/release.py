"""Release and delete: held mail back into the queue, or gone for good.

Takes a reviewer's decision (IMAP move/copy into `Release`, the CLI, a POP3 DELE is
handled by the POP3 server) and the quarantine id. Release hands the lead's `enqueue`
an Envelope with a fresh queue id, the ORIGINAL recipients only (a non-admin user
releases just the recipients it owns; an admin or the CLI releases all that are left),
`skip_filter` = the filter that held it, and the exact bytes that were quarantined (the
store strips its X-Quarantine-* prefix by the length in the sidecar). Outbound policy
(routing, TLS, recipient checks) still applies: the queue delivers it like any message.
Once every recipient is released the message leaves quarantine (all owners' copies);
after a partial release only the releasing user's copies go. Which recipients were
released is kept in `<quarantine>/released/<qid>.json`, written after the durable
enqueue: a crash in between may release a recipient twice (a repeat, never a loss).

Trusts the store's sidecar for the envelope and the store's user table for ownership.
Logs who did what on `relay.quarantine`; counts QUARANTINE_RELEASES (via) and, through
the store, QUARANTINE_DELETES.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from relay.durable import write_atomic
from relay.metrics import QUARANTINE_RELEASES
from relay.quarantine.store import RELEASE, QuarantineStore, StoreError
from relay.queue.model import Envelope, RcptState, Recipient, new_queue_id

log = logging.getLogger("relay.quarantine")

Enqueue = Callable[[Envelope, bytes], Awaitable[None]]


class ReleaseError(Exception):
    """A refused release or delete; str() is fit for a user (no paths)."""


@dataclass(frozen=True)
class Released:
    qid: str
    queue_id: str                   # the new queue id
    recipients: tuple[str, ...]     # released now
    remaining: tuple[str, ...]      # still held (other owners' recipients)


def _fresh(r: Recipient) -> Recipient:
    # Keep what the sender asked for (DSN NOTIFY/ORCPT) and a filter's route; forget
    # any delivery history.
    return Recipient(r.address, notify=r.notify, orcpt=r.orcpt, route=r.route)


class Releaser:
    """`await release(user, qid)`, `await delete(user, qid)`; `on_release` is the IMAP
    server's callback. `user` None means the operator (CLI): everything allowed."""

    def __init__(self, store: QuarantineStore, enqueue: Enqueue) -> None:
        self.store = store
        self.enqueue = enqueue
        # One release/delete per message at a time (two IMAP sessions moving the same
        # message); a lock lives only while someone holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())
        self._dir = Path(store.root) / "released"

    async def on_release(self, user_name: str, qid: str) -> None:
        """IMAP: a message was moved or copied into `Release`. Call it before the
        source copy is expunged, so the sidecar is still there."""
        await self.release(user_name, qid, via="imap")

    def _lock(self, qid: str) -> asyncio.Lock:
        lock = self._locks.get(qid)
        if lock is None:
            lock = self._locks[qid] = asyncio.Lock()
        return lock

    def _allowed(self, user_name: str | None, addresses: list[str]) -> list[str]:
        if user_name is None:
            return addresses
        user = self.store.user(user_name)
        if user is None:
            raise ReleaseError("unknown user")
        if user.admin:
            return addresses
        return [a for a in addresses if user.owns(a)]

    # --- the released-recipients record ------------------------------------------------

    def _record(self, qid: str) -> Path:
        return self._dir / f"{qid}.json"

    def _load_released(self, qid: str) -> set[str]:
        try:
            return set(json.loads(self._record(qid).read_bytes())["released"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return set()

    def _save_released(self, qid: str, released: set[str]) -> None:
        self._dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self._record(qid), json.dumps({"released": sorted(released)}).encode())

    def _drop_record(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._record(qid).unlink()

    # --- release ------------------------------------------------------------------------

    async def release(self, user_name: str | None, qid: str, via: str = "cli") -> Released:
        async with self._lock(qid):
            return await self._release(user_name, qid, via)

    async def _release(self, user_name: str | None, qid: str, via: str) -> Released:
        meta = self.store.meta(qid)
        if meta is None:
            self._drop_record(qid)
            raise ReleaseError("no such quarantined message")
        done = self._load_released(qid)
        held = [r for r in meta.envelope.recipients if r.address not in done]
        allowed = set(self._allowed(user_name, [r.address for r in held]))
        mine = [r for r in held if r.address in allowed]
        if not mine:
            raise ReleaseError("none of its recipients is yours to release"
                               if held else "already released")
        try:
            data = await self.store.original(qid)
        except KeyError:
            raise ReleaseError("no such quarantined message") from None
        old = meta.envelope
        env = replace(old, queue_id=new_queue_id(), recipients=[_fresh(r) for r in mine],
                      arrival=time.time(), size=len(data), held=False,
                      skip_filter=meta.filter)
        assert all(r.state is RcptState.PENDING for r in env.recipients)
        await self.enqueue(env, data)        # durable on return (the queue's promise)
        done |= {r.address for r in mine}
        remaining = tuple(r.address for r in meta.envelope.recipients if r.address not in done)
        who = user_name or "operator"
        if remaining:
            await asyncio.to_thread(self._save_released, qid, done)
            self._remove_copies(user_name, qid, via="release")
            if self.store.meta(qid) is None:
                # That was the last copy: nobody else could review the rest.
                self._drop_record(qid)
                log.warning("quarantine qid=%s: %d recipients had no other reviewer and "
                            "were dropped with the last copy", qid, len(remaining))
        else:
            await self.store.discard(qid, via="release", who=who)
            self._drop_record(qid)
        QUARANTINE_RELEASES.labels(via=via).inc()
        log.info("quarantine released qid=%s queue_id=%s by=%s via=%s recipients=%d "
                 "remaining=%d filter=%s", qid, env.queue_id, who, via, len(mine),
                 len(remaining), meta.filter or "-")
        return Released(qid, env.queue_id, tuple(r.address for r in mine), remaining)

    def _remove_copies(self, user_name: str | None, qid: str, via: str) -> int:
        """Expunge every copy of `qid` in this user's folders (not `Release`)."""
        if user_name is None:
            return 0
        n = 0
        for name, selectable in self.store.list_folders(user_name):
            if not selectable or name == RELEASE:
                continue
            try:
                folder = self.store.folder(user_name, name)
            except StoreError:
                continue
            uids = [m.uid for m in folder.messages if m.qid == qid]
            if uids:
                n += len(folder.expunge(uids, via=via, who=user_name))
        return n

    # --- delete -------------------------------------------------------------------------

    async def delete(self, user_name: str | None, qid: str, via: str = "cli") -> bool:
        """Discard. The operator or an admin discards the message everywhere; a user
        removes its own copies (the message is discarded with its last copy)."""
        async with self._lock(qid):
            meta = self.store.meta(qid)
            user = self.store.user(user_name) if user_name is not None else None
            if user_name is not None and user is None:
                raise ReleaseError("unknown user")
            who = user_name or "operator"
            if user_name is None or (user is not None and user.admin):
                ok = await self.store.discard(qid, via=via, who=who)
            else:
                ok = self._remove_copies(user_name, qid, via=via) > 0
            if not ok:
                return False
            if self.store.meta(qid) is None:
                self._drop_record(qid)
            log.info("quarantine delete qid=%s by=%s via=%s scope=%s", qid, who, via,
                     "all" if meta is not None and self.store.meta(qid) is None
                     else "own copies")
            return True
