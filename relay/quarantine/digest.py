"""Quarantine digests: a periodic mail to each owner listing what is held, and a summary
to admins, so held mail does not rot unseen.

Takes the store (users, their folders, the sidecar records) and QuarantineConfig
(`digest_from`, `digest_interval`, the IMAP/POP3 addresses to point reviewers at).
`build_digests` is plain code: it reads the store and returns (Envelope, bytes) pairs,
one per digest; `run_digests` is the loop that hands them to the lead's `enqueue`
every interval (the last run's time is kept in `<quarantine>/digest-last`, so restarts
do not postpone digests forever). Off when `digest_from` is empty or the interval 0.
A user gets a digest at its literal addresses (not '@domain' entries) when it has held
mail; admins get a summary of everything by reason.

Trusts nothing in the held messages: subjects and senders are decoded leniently,
stripped of control characters and cut to length before they go into the digest.
RFCs: 5322 (the digest), 2047 (encoded subjects read), 3834 (Auto-Submitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.header
import email.utils
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

from relay.config import QuarantineConfig
from relay.durable import write_atomic
from relay.quarantine.store import INBOX, RELEASE, QuarantineMeta, QuarantineStore, StoreError
from relay.queue.model import Envelope, Recipient, new_queue_id

log = logging.getLogger("relay.quarantine")

HEAD_READ = 32 * 1024          # enough of a message to find Subject and Date
MAX_LISTED = 500               # entries per digest; the rest is counted, not listed
_FIELD_MAX = 120


@dataclass(frozen=True)
class Held:
    """One held message as a digest lists it."""

    qid: str
    sender: str
    subject: str
    date: float                 # when it was quarantined
    reason: str
    filter: str
    folder: str


def _clean(text: str, limit: int = _FIELD_MAX) -> str:
    out = "".join(c if c.isprintable() else " " for c in text)
    out = " ".join(out.split())
    return out if len(out) <= limit else out[:limit - 3] + "..."


def subject_of(head: bytes) -> str:
    """The Subject of a raw header block, RFC 2047-decoded when it can be."""
    end = head.find(b"\r\n\r\n")
    head = head if end < 0 else head[:end]
    raw = None
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if raw is not None:
            if line[:1] in (b" ", b"\t"):
                raw += b" " + line.strip()
                continue
            break
        if line[:8].lower() == b"subject:":
            raw = line[8:].strip()
    if raw is None:
        return "(no subject)"
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(Exception):   # junk encodings: keep the raw text
        text = str(email.header.make_header(email.header.decode_header(text)))
    return _clean(text) or "(no subject)"


def _read_head(path: Path, skip: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(skip)
            return f.read(HEAD_READ)
    except OSError:
        return b""


def held_for(store: QuarantineStore, user: str) -> list[Held]:
    """Quarantined messages in the user's folders (each once; not `Release`)."""
    out: dict[str, Held] = {}
    for name, selectable in store.list_folders(user):
        if not selectable or name == RELEASE:
            continue
        try:
            folder = store.folder(user, name)
        except StoreError:
            continue
        for m in folder.messages:
            if m.qid in out or "\\Deleted" in m.flags:
                continue
            meta = store.meta(m.qid)
            if meta is None:
                continue        # not a held message (an IMAP APPEND, say)
            head = _read_head(folder.path_of(m), meta.prefix_len)
            out[m.qid] = Held(m.qid, _clean(meta.envelope.sender or "<>"), subject_of(head),
                              meta.date, _clean(meta.reason or "-"), meta.filter or "-", name)
    return sorted(out.values(), key=lambda h: h.date)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _how_to_review(cfg: QuarantineConfig) -> list[str]:
    lines = ["How to review:"]
    for label, addr in (("IMAP (STARTTLS)", cfg.imap_address),
                        ("IMAPS", cfg.imaps_address),
                        ("POP3 (STLS)", cfg.pop3_address),
                        ("POP3S", cfg.pop3s_address)):
        if addr is not None:
            lines.append(f"  {label}: server {addr.host}, port {addr.port}")
    lines += [
        "  Log in with your quarantine account. Held mail is in your INBOX.",
        "  To release a message to its recipients, move or copy it to the folder",
        "  'Release'. To discard it, delete it. Unreviewed mail is removed after",
        f"  {int(cfg.retention // 86400)} days.",
    ]
    return lines


def _listing(items: list[Held], with_folder: bool) -> list[str]:
    lines = []
    for h in items[:MAX_LISTED]:
        lines += [f"- {_when(h.date)}  from {h.sender}",
                  f"  Subject: {h.subject}",
                  f"  Reason: {h.reason} (filter {h.filter})"
                  + (f", folder {h.folder}" if with_folder else ""),
                  f"  Id: {h.qid}"]
    if len(items) > MAX_LISTED:
        lines.append(f"... and {len(items) - MAX_LISTED} more.")
    return lines


def _mail(cfg: QuarantineConfig, to: list[str], subject: str, lines: list[str],
          now: float) -> tuple[Envelope, bytes]:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = cfg.digest_from
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(now, datetime.UTC))
    domain = cfg.digest_from.rpartition("@")[2] or "localhost"
    msg["Message-ID"] = email.utils.make_msgid("digest", domain=domain)
    # RFC 3834: machine-made; vacation responders and list software stay quiet.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines) + "\n", charset="utf-8")
    data = msg.as_bytes()
    env = Envelope(new_queue_id(), cfg.digest_from, [Recipient(a) for a in to],
                   arrival=now, size=len(data), listener="quarantine-digest")
    return env, data


def build_digests(store: QuarantineStore, cfg: QuarantineConfig,
                  now: float) -> list[tuple[Envelope, bytes]]:
    """One digest per user with held mail and a literal address, and a summary per
    admin with an address. Empty when digests are off."""
    if not cfg.digest_from or not cfg.digest_interval:
        return []
    out = []
    everything: dict[str, Held] | None = None
    for user in sorted(store.users().values(), key=lambda u: u.name):
        to = sorted(a for a in user.addresses if "@" in a and not a.startswith("@"))
        if not to:
            continue
        if user.admin:
            if everything is None:
                everything = {m.qid: describe(store, m) for m in store.list_meta()}
            items = sorted(everything.values(), key=lambda h: h.date)
            if not items:
                continue
            by_reason = Counter(h.filter for h in items)
            lines = [f"The quarantine holds {len(items)} messages.", "", "By filter:"]
            lines += [f"  {f}: {n}" for f, n in sorted(by_reason.items())]
            lines += ["", *_how_to_review(cfg), "", "Held messages, oldest first:", ""]
            lines += _listing(items, with_folder=False)
            out.append(_mail(cfg, to, f"Quarantine summary: {len(items)} messages held",
                             lines, now))
            continue
        items = held_for(store, user.name)
        if not items:
            continue
        lines = [f"{len(items)} messages addressed to you are held in quarantine.", "",
                 *_how_to_review(cfg), "", "Held messages, oldest first:", ""]
        lines += _listing(items, with_folder=True)
        out.append(_mail(cfg, to, f"Quarantine digest: {len(items)} messages held for you",
                         lines, now))
    return out


def describe(store: QuarantineStore, meta: QuarantineMeta) -> Held:
    """A sidecar record with its subject read from any copy of the message."""
    subject = "(unavailable)"
    for user, name in meta.folders:
        try:
            folder = store.folder(user, name)
        except StoreError:
            continue
        m = next((m for m in folder.messages if m.qid == meta.qid), None)
        if m is not None:
            subject = subject_of(_read_head(folder.path_of(m), meta.prefix_len))
            break
    return Held(meta.qid, _clean(meta.envelope.sender or "<>"), subject, meta.date,
                _clean(meta.reason or "-"), meta.filter or "-", INBOX)


async def run_digests(store: QuarantineStore, cfg: QuarantineConfig,
                      enqueue: Callable[[Envelope, bytes], Awaitable[None]]) -> None:
    """Send digests every `digest_interval` until cancelled. Returns at once when off."""
    if not cfg.digest_from or not cfg.digest_interval:
        return
    stamp = Path(cfg.path) / "digest-last"
    interval = float(cfg.digest_interval)
    while True:
        try:
            last = float(stamp.read_text().strip())
        except (OSError, ValueError):
            last = 0.0
        if last == 0.0:
            # First start: one interval from now, not a burst of digests at install.
            last = time.time()
            _write_stamp(stamp, last)
        wait = last + interval - time.time()
        if wait > 0:
            await asyncio.sleep(min(wait, interval))
            continue
        now = time.time()
        try:
            digests = build_digests(store, cfg, now)
            for env, data in digests:
                await enqueue(env, data)
            log.info("quarantine digests sent=%d", len(digests))
        except Exception:   # a bad run must not end the loop; next interval retries
            log.exception("quarantine digest run failed")
        _write_stamp(stamp, now)


def _write_stamp(path: Path, ts: float) -> None:
    # Losing a stamp only means an early digest: no fsync, just the atomic rename.
    with contextlib.suppress(OSError):
        write_atomic(path, repr(ts).encode(), sync=False)
