"""Maildir folders on disk: unique names, durable writes, uids, flags, links.

Takes one folder directory (Maildir: cur/ new/ tmp/) and hands on its messages as
MessageInfo values with stable IMAP uids (a `relay-uidlist` file: UIDVALIDITY, UIDNEXT,
uid -> base name and keywords, rewritten atomically), system flags in the file name's
Maildir info (`:2,FRS`), hard links for copies, and change notification through its
store. Used by relay.quarantine.store (which owns users, names and meta) and, through
it, by the IMAP and POP3 servers. Trusts its caller for the directory (store checks
every name); other processes on the same Maildir are fenced off by flock on a lock
file; a file that vanishes (another process expunged it) is simply gone.
Spec: Maildir (cr.yp.to/proto/maildir.html), Maildir++ (Courier); RFC 3501 2.3.1.1
(UIDVALIDITY), 2.3.2 (flags).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relay.durable import fsync_dir, write_atomic  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from relay.quarantine.store import QuarantineStore

UIDLIST = "relay-uidlist"
LOCK = "relay-lock"
NOSELECT = "relay-noselect"
# Maildir info letters (ASCII order, as the spec requires) <-> IMAP system flags.
_FLAG_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                 "T": "\\Deleted"}
_LETTER_OF = {v: k for k, v in _FLAG_LETTERS.items()}
SYSTEM_FLAGS = frozenset(_LETTER_OF)

class StoreError(Exception):
    """A refused mailbox operation; str() is a short text fit for a client (no paths)."""


def _host_part() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname().split(".")[0]) or "localhost"


def new_base() -> str:
    """Maildir unique name: time, microseconds, pid, 64 random bits, host (NFS-safe)."""
    now = time.time()
    return (f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}R{secrets.token_hex(8)}"
            f".{_host_part()}")


def qid_of(filename: str) -> str:
    """The quarantine id of a Maildir file name ('<qid>[,<n>][:2,FLAGS]')."""
    return filename.split(":", 1)[0].split(",", 1)[0]


def valid_qid(qid: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+\.M[0-9]+P[0-9]+R[0-9a-f]+\.[A-Za-z0-9_-]+", qid))


def make_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


# --- messages and folders ---------------------------------------------------------

@dataclass
class MessageInfo:
    """One message as a folder sees it. `flags` are IMAP flags (system + keywords),
    without \\Recent (a session property). `version` grows on every flag change."""

    uid: int
    base: str
    name: str                 # current file name (with the :2, info)
    sub: str                  # "cur" or "new"
    flags: frozenset[str] = frozenset()
    version: int = 0

    @property
    def qid(self) -> str:
        return qid_of(self.base)


def _info_flags(name: str) -> set[str]:
    if ":2," not in name:
        return set()
    return {_FLAG_LETTERS[c] for c in name.rsplit(":2,", 1)[1] if c in _FLAG_LETTERS}


def _info_suffix(flags: Iterable[str]) -> str:
    return ":2," + "".join(sorted(_LETTER_OF[f] for f in flags if f in _LETTER_OF))


@dataclass
class Folder:
    """One Maildir folder of one user. All methods run on the event loop thread (they
    touch only small directories); other processes are fenced off by flock."""

    store: QuarantineStore     # for UIDVALIDITY, notify and discarding meta
    user: str
    name: str
    path: Path
    uidvalidity: int = 0
    uidnext: int = 1
    messages: list[MessageInfo] = field(default_factory=list)
    by_uid: dict[int, MessageInfo] = field(default_factory=dict)
    _stamp: tuple = ()
    _version: int = 0

    # -- reading state --
    def _file(self, m: MessageInfo) -> Path:
        return self.path / m.sub / m.name

    def path_of(self, m: MessageInfo) -> Path:
        return self._file(m)

    def size(self, m: MessageInfo) -> int:
        try:
            return self._file(m).stat().st_size
        except FileNotFoundError:
            return 0

    def internaldate(self, m: MessageInfo) -> float:
        try:
            return self._file(m).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def read(self, m: MessageInfo) -> bytes:
        """The stored bytes, exactly. Raises FileNotFoundError if expunged meanwhile."""
        return self._file(m).read_bytes()

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_uidlist(self) -> tuple[int, int, dict[str, tuple[int, frozenset[str]]]]:
        try:
            text = (self.path / UIDLIST).read_text("utf-8", "replace")
        except FileNotFoundError:
            return 0, 1, {}
        lines = text.splitlines()
        m = re.fullmatch(r"V(\d+) N(\d+)", lines[0].strip()) if lines else None
        if not m:
            return 0, 1, {}
        entries = {}
        for line in lines[1:]:
            parts = line.split(" ")
            if len(parts) >= 2 and parts[0].isdigit():
                entries[parts[1]] = (int(parts[0]), frozenset(p for p in parts[2:] if p))
        return int(m.group(1)), int(m.group(2)), entries

    def _write_uidlist(self) -> None:
        lines = [f"V{self.uidvalidity} N{self.uidnext}"]
        for m in self.messages:
            kws = sorted(f for f in m.flags if f not in SYSTEM_FLAGS)
            lines.append(" ".join([str(m.uid), m.base, *kws]))
        write_atomic(self.path / UIDLIST, ("\n".join(lines) + "\n").encode())

    def _dir_stamp(self) -> tuple:
        out = []
        for p in (self.path / "cur", self.path / "new", self.path / UIDLIST):
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def refresh(self, claim_recent: bool = True) -> list[int]:
        """Bring the in-memory view up to date with the directory (cheap when nothing
        changed). Messages still in new/ move to cur/; their uids are returned so the
        calling session can mark them \\Recent (RFC 3501 2.3.2: one session only)."""
        if not (self.path / "cur").is_dir():
            raise StoreError("Mailbox does not exist")
        if self._stamp and self._stamp == self._dir_stamp() and not (
                claim_recent and any(m.sub == "new" for m in self.messages)):
            return []
        with self._locked():
            return self._rescan(claim_recent)

    def _rescan(self, claim_recent: bool) -> list[int]:
        uv, nxt, entries = self._read_uidlist()
        changed = False
        if not uv:
            uv, changed = self.store._next_uidvalidity(self.user), True
        found: dict[str, tuple[str, str]] = {}
        recent_bases = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self.path / sub)
            except FileNotFoundError:
                names = []
            for name in names:
                if name.startswith("."):
                    continue
                base = name.split(":", 1)[0]
                if sub == "new" and claim_recent:
                    new_name = base + (name[len(base):] if ":2," in name else ":2,")
                    try:
                        os.rename(self.path / "new" / name, self.path / "cur" / new_name)
                    except FileNotFoundError:
                        continue
                    recent_bases.append(base)
                    found[base] = ("cur", new_name)
                else:
                    found[base] = (sub, name)
        old = {m.base: m for m in self.messages}
        msgs = []
        for base, (uid, kws) in sorted(entries.items(), key=lambda e: e[1][0]):
            if base not in found:
                changed = True
                continue
            sub, name = found.pop(base)
            flags = frozenset(_info_flags(name)) | kws
            prev = old.get(base)
            version = prev.version if prev and prev.flags == flags else self._bump()
            msgs.append(MessageInfo(uid, base, name, sub, flags, version))
        # Unknown files get uids in arrival order (the time at the front of the name).
        for base in sorted(found, key=lambda b: (_base_time(b), b)):
            sub, name = found[base]
            msgs.append(MessageInfo(nxt, base, name, sub, frozenset(_info_flags(name)),
                                    self._bump()))
            nxt += 1
            changed = True
        self.uidvalidity, self.uidnext = uv, nxt
        self.messages = msgs
        self.by_uid = {m.uid: m for m in msgs}
        if changed:
            self._write_uidlist()
        self._stamp = self._dir_stamp()
        base_uid = {m.base: m.uid for m in msgs}
        return sorted(base_uid[b] for b in recent_bases if b in base_uid)

    def _bump(self) -> int:
        self._version += 1
        return self._version

    # -- changing state --
    def set_flags(self, uid: int, flags: Iterable[str]) -> MessageInfo | None:
        """Replace a message's flags (system flags in the file name, keywords in the uid
        list). Returns the updated info, or None if it is gone."""
        m = self.by_uid.get(uid)
        if m is None:
            return None
        flags = frozenset(f for f in flags if f != "\\Recent")
        if flags == m.flags:
            return m
        with self._locked():
            new_name = m.base + _info_suffix(flags)
            if new_name != m.name or m.sub != "cur":
                try:
                    os.rename(self._file(m), self.path / "cur" / new_name)
                except FileNotFoundError:
                    return None
                m.name, m.sub = new_name, "cur"
            kw_changed = {f for f in flags if f not in SYSTEM_FLAGS} != {
                f for f in m.flags if f not in SYSTEM_FLAGS}
            m.flags, m.version = flags, self._bump()
            if kw_changed:
                self._write_uidlist()
            self._stamp = self._dir_stamp()
        self.store.notify(self.user, self.name)
        return m

    def expunge(self, uids: Iterable[int], via: str = "imap", who: str = "") -> list[int]:
        """Remove messages from this folder. The last link of a quarantined message takes
        its meta record with it (the message is discarded, counted by `via`)."""
        gone = []
        with self._locked():
            for uid in sorted(set(uids)):
                m = self.by_uid.get(uid)
                if m is None:
                    continue
                try:
                    last = self._file(m).stat().st_nlink <= 1
                    os.unlink(self._file(m))
                except FileNotFoundError:
                    last = False
                if last:
                    self.store._forget(m.qid, via, who)
                gone.append(uid)
            if gone:
                drop = set(gone)
                self.messages = [m for m in self.messages if m.uid not in drop]
                self.by_uid = {m.uid: m for m in self.messages}
                self._write_uidlist()
                self._stamp = self._dir_stamp()
        if gone:
            self.store.notify(self.user, self.name)
        return gone

    def add_link(self, src: Path, base: str, flags: Iterable[str] = (),
                 mtime: float | None = None) -> int:
        """Hard-link (or for a new file, rename) `src` into this folder's cur/ and give it
        a uid at once (UIDPLUS needs it). Returns the uid."""
        self.refresh(claim_recent=False)
        with self._locked():
            existing = {m.base for m in self.messages}
            if base in existing:
                n = 1
                while f"{qid_of(base)},{n}" in existing:
                    n += 1
                base = f"{qid_of(base)},{n}"
            flags = frozenset(flags)
            name = base + _info_suffix(flags)
            os.link(src, self.path / "cur" / name)
            if mtime is not None:
                os.utime(self.path / "cur" / name, (mtime, mtime))
            fsync_dir(self.path / "cur")
            uid = self.uidnext
            self.uidnext += 1
            m = MessageInfo(uid, base, name, "cur", flags, self._bump())
            self.messages.append(m)
            self.by_uid[uid] = m
            self._write_uidlist()
            self._stamp = self._dir_stamp()
        self.store.notify(self.user, self.name)
        return uid

    def write_tmp(self, data: bytes) -> tuple[Path, str]:
        """Write and fsync a new file in tmp/ (blocking: run it in a thread); returns the
        path and its unique base name for `add_link`."""
        base = new_base()
        tmp = self.path / "tmp" / base
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp, base

    def append(self, data: bytes, flags: Iterable[str] = (), date: float | None = None) -> int:
        """IMAP APPEND: a new file (not a quarantined message: no meta). Returns the uid.
        Call on the event loop thread (folder state is not shared with threads); the
        async servers use write_tmp in a thread and then add_link."""
        tmp, base = self.write_tmp(data)
        try:
            return self.add_link(tmp, base, flags, date)
        finally:
            tmp.unlink(missing_ok=True)

    def copy_to(self, uids: Iterable[int], dest: Folder) -> list[tuple[int, int]]:
        """Link messages into `dest` keeping their flags; returns (source uid, new uid)."""
        out = []
        for uid in uids:
            m = self.by_uid.get(uid)
            if m is None:
                continue
            try:
                new = dest.add_link(self._file(m), m.base, m.flags)
            except FileNotFoundError:
                continue
            out.append((uid, new))
        return out


def _base_time(base: str) -> tuple[int, int]:
    """(seconds, microseconds) from a '<sec>.M<usec>...' name; (0, 0) for other names."""
    m = re.match(r"(\d+)\.M(\d+)", base)
    if m:
        return int(m.group(1)), int(m.group(2))
    head = base.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0), 0
