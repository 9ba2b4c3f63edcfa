"""Quarantine store: held messages in Maildir++ mailboxes, one per owner, durable on return.

Takes a quarantined message (envelope + exact bytes + the filter's verdict) from the
pipeline and files it, behind a few sanitised `X-Quarantine-*` headers the reviewer
sees, into the INBOX of every user owning one of its recipients and, for admins, into a
folder named after the verdict's mailbox. Hands the mailboxes on to the IMAP and POP3
servers (Folder: uids, flags, copy, expunge, change notification) and the original
bytes + envelope on to release (`original(qid)`, `meta(qid)`, `discard(qid)`).

Layout under QuarantineConfig.path (readable with any Maildir tool; Dovecot can serve
`users/<name>/` as its mail_location=maildir:...):
    users/<name>/{cur,new,tmp}/            INBOX
    users/<name>/.<Folder>[.<Sub>]/        other folders, Maildir++ ('.' separates)
    users/<name>/.<F>/relay-uidlist        UIDVALIDITY, UIDNEXT, uid -> base name, keywords
    users/<name>/subscriptions             IMAP subscriptions, one name a line
    unowned/{cur,new,tmp}/                 held mail nobody owns when no admin exists
    meta/<qid>.json                        envelope, prefix length, filter, reason, owners
One message is one file: every owner's copy is a hard link, so flags (the Maildir info
`:2,FRS`) are per link and the bytes are stored once. File base names are the NFS-safe
`<sec>.M<usec>P<pid>R<random>.<host>`; the quarantine id (qid) is the base name, and a
second link of the same message in one folder is `<qid>,<n>`.

Folders themselves (uids, flags, links) live in relay.quarantine.maildir, accounts and
login throttling in relay.quarantine.users; both are re-exported here, so the store is
the one import for the servers, release, digests and the CLI.

Trusts: nothing from clients. User names come from config; folder names from clients
pass `check_folder_name` (no '..', '/', wildcards, control characters, over-long
names), so a path never leaves its user's directory. Header values are cut to printable
ASCII. Durability: file fsynced, linked, directories fsynced before `put` returns.
RFCs: 5322 (the prepended header fields), Maildir / Maildir++ (cr.yp.to, Courier).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.config import QuarantineConfig
from relay.metrics import QUARANTINE_DELETES, QUARANTINE_EXPIRED, QUARANTINE_MESSAGES
from relay.quarantine.maildir import (  # noqa: F401 - re-exported: the store's API
    LOCK,
    NOSELECT,
    SYSTEM_FLAGS,
    UIDLIST,
    Folder,
    MessageInfo,
    StoreError,
    fsync_dir,
    make_maildir,
    new_base,
    qid_of,
    valid_qid,
    write_atomic,
)
from relay.quarantine.users import (  # noqa: F401 - re-exported: the store's API
    USER_RE,
    User,
    default_verify,
    from_config,
    parse_users_file,
)
from relay.queue.model import Envelope

log = logging.getLogger("relay.quarantine")

INBOX = "INBOX"
RELEASE = "Release"            # virtual folder: moving/copying a message here releases it
DELIMITER = "."                # Maildir++ hierarchy separator, also IMAP's
MAX_FOLDER_NAME = 200          # bytes; deep enough for people, short enough for NAME_MAX
MAX_FOLDERS = 1000             # per user: CREATE beyond this gets NO
_HEADER_VALUE_MAX = 200
_RECIPIENTS_MAX = 900          # one header line stays under RFC 5322's 998

# --- names and sanitising ---------------------------------------------------------------

def check_folder_name(name: str) -> str:
    """Return the canonical folder name or raise StoreError. INBOX is case-insensitive."""
    if name.upper() == INBOX:
        return INBOX
    if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_FOLDER_NAME:
        raise StoreError("Invalid mailbox name length")
    if any(c in name for c in "/\\*%") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise StoreError("Invalid characters in mailbox name")
    parts = name.split(DELIMITER)
    if any(p in ("", "..") or p.startswith("~") for p in parts):
        raise StoreError("Invalid mailbox name")
    if parts[0].upper() == INBOX:
        # "INBOX.x" would sit beside INBOX in Maildir++; keep one spelling of INBOX.
        raise StoreError("Folders under INBOX are not supported")
    return name


_WS = str.maketrans("\t\r\n", "   ")


def sanitize_header(value: str, limit: int = _HEADER_VALUE_MAX) -> str:
    """Printable ASCII only (no CR/LF/NUL: no header injection), whitespace squeezed."""
    out = "".join(c if " " <= c <= "~" else "?" for c in value.translate(_WS))
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _admin_folder(mailbox: str, filter: str) -> str:
    name = sanitize_header(mailbox or filter or "quarantine", 64).lower()
    name = re.sub(r"[^a-z0-9_+-]", "_", name) or "quarantine"
    return "Quarantine" if name.upper() == INBOX else name


# --- the store ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuarantineMeta:
    """The sidecar record of a quarantined message (meta/<qid>.json)."""

    qid: str
    envelope: Envelope
    prefix_len: int          # bytes of X-Quarantine-* header prepended to the original
    filter: str
    reason: str
    mailbox: str
    date: float
    owners: tuple[str, ...]  # user names that got it in INBOX
    folders: tuple[tuple[str, str], ...]   # (user, folder) where it was filed

    def to_json(self) -> dict:
        return {"qid": self.qid, "envelope": self.envelope.to_json(),
                "prefix_len": self.prefix_len, "filter": self.filter, "reason": self.reason,
                "mailbox": self.mailbox, "date": self.date, "owners": list(self.owners),
                "folders": [list(f) for f in self.folders]}

    @classmethod
    def from_json(cls, d: dict) -> QuarantineMeta:
        return cls(d["qid"], Envelope.from_json(d["envelope"]), int(d["prefix_len"]),
                   d["filter"], d["reason"], d["mailbox"], float(d["date"]),
                   tuple(d["owners"]), tuple(tuple(f) for f in d["folders"]))


Watcher = Callable[[str, str], None]


class QuarantineStore:
    """The quarantine: users, their Maildir folders, held messages and their meta.

    Pipeline:   `await put(env, message, mailbox, filter, reason) -> qid`
    Release/CLI: `meta(qid)`, `list_meta()`, `await original(qid)`, `await discard(qid,
                 via, who)`, `await expire(now) -> int`
    IMAP/POP3:  `authenticate(name, password) -> User | None` (blocking: run it in a
                 thread), `folder(user, name) -> Folder`, `list_folders(user)`,
                 `create/delete/rename_folder`, subscriptions, `watch/unwatch/notify`.
    """

    def __init__(self, cfg: QuarantineConfig,
                 verify_password: Callable[[str, str], bool] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(cfg.path)
        self.verify_password = verify_password or default_verify
        self._watchers: dict[tuple[str, str], set[Watcher]] = {}
        self._folders: dict[tuple[str, str], Folder] = {}
        self._users_file_stamp: float | None = None
        self._file_users: list[User] = []
        for d in (self.root / "users", self.root / "meta"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_maildir(self.root / "unowned")
        from relay.smtp.auth import Throttle
        # Shared by IMAP and POP3 logins.
        self.throttle = Throttle(base_delay=0.5, max_delay=8.0, window=600.0)
        self._load_users_file()
        self._set_gauge()

    # -- users --
    def _load_users_file(self) -> None:
        if not self.cfg.users_file:
            return
        try:
            st = os.stat(self.cfg.users_file)
        except OSError as e:
            log.warning("quarantine users_file %s: %s", self.cfg.users_file, e.strerror)
            return
        if st.st_mtime != self._users_file_stamp:
            text = Path(self.cfg.users_file).read_text("utf-8", "replace")
            self._file_users = parse_users_file(text)
            self._users_file_stamp = st.st_mtime

    def users(self) -> dict[str, User]:
        self._load_users_file()
        out: dict[str, User] = {}
        for u in self.cfg.users:
            out[u.name] = from_config(u)
        for u in self._file_users:
            out.setdefault(u.name, u)
        return {n: u for n, u in out.items() if USER_RE.fullmatch(n)}

    def user(self, name: str) -> User | None:
        return self.users().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """Check a password (slow on purpose: call it via asyncio.to_thread)."""
        u = self.user(name)
        if u is None:
            # Same work for unknown users, so timing does not tell which names exist.
            with contextlib.suppress(Exception):
                # A real hash (relay.smtp.auth.dummy_hash): a malformed one would be
                # refused at once and give the timing away.
                from relay.smtp.auth import dummy_hash
                self.verify_password(password, dummy_hash())
            return None
        try:
            ok = self.verify_password(password, u.password_hash)
        except Exception as e:  # a malformed hash must not crash the session
            log.warning("quarantine user %s: password check failed: %s", name, e)
            return None
        return u if ok else None

    def user_dir(self, user: str) -> Path:
        if not USER_RE.fullmatch(user):
            raise StoreError("Invalid user")
        return self.root / "users" / user

    def _next_uidvalidity(self, user: str) -> int:
        # Strictly increasing per user, so a folder deleted and created again (or a
        # renamed one) never shows an old UIDVALIDITY (RFC 3501 2.3.1.1).
        p = self.user_dir(user) / "relay-uidvalidity"
        try:
            last = int(p.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            last = 0
        uv = max(int(time.time()), last + 1)
        write_atomic(p, str(uv).encode())
        return uv

    # -- folders --
    def folder_path(self, user: str, name: str) -> Path:
        name = check_folder_name(name)
        base = self.user_dir(user)
        return base if name == INBOX else base / (DELIMITER + name)

    def folder(self, user: str, name: str) -> Folder:
        """An existing folder (StoreError if it does not exist or cannot be selected)."""
        name = check_folder_name(name)
        key = (user, name)
        f = self._folders.get(key)
        path = self.folder_path(user, name)
        if name == INBOX and not (path / "cur").is_dir():
            make_maildir(path)
        if not (path / "cur").is_dir():
            self._folders.pop(key, None)
            raise StoreError("Mailbox does not exist")
        if f is None:
            f = Folder(self, user, name, path)
            self._folders[key] = f
        f.refresh(claim_recent=False)
        return f

    def list_folders(self, user: str) -> list[tuple[str, bool]]:
        """(name, selectable) for every folder of the user, INBOX first."""
        base = self.user_dir(user)
        out = [(INBOX, True)]
        try:
            entries = sorted(os.listdir(base))
        except FileNotFoundError:
            entries = []
        for e in entries:
            if e.startswith(DELIMITER) and len(e) > 1 and (base / e).is_dir():
                name = e[1:]
                try:
                    check_folder_name(name)
                except StoreError:
                    continue
                out.append((name, (base / e / "cur").is_dir()))
        return out

    def exists(self, user: str, name: str) -> bool:
        try:
            return (self.folder_path(user, name) / "cur").is_dir() or check_folder_name(
                name) == INBOX
        except StoreError:
            return False

    def ensure_folder(self, user: str, name: str) -> None:
        """Make a folder if missing, reserved names included (the IMAP server keeps the
        virtual `Release` folder as an always-empty real one, so clients can drop mail
        on it)."""
        path = self.folder_path(user, name)
        if not (path / "cur").is_dir():
            make_maildir(path)

    def create_folder(self, user: str, name: str) -> None:
        name = check_folder_name(name)
        if name == INBOX or name == RELEASE:
            raise StoreError("Mailbox already exists")
        if self.exists(user, name):
            raise StoreError("Mailbox already exists")
        if len(self.list_folders(user)) >= MAX_FOLDERS:
            raise StoreError("Too many mailboxes")
        parts = name.split(DELIMITER)
        # RFC 3501 6.3.3: create the superior names too, so the hierarchy is listable.
        for i in range(1, len(parts) + 1):
            p = self.folder_path(user, DELIMITER.join(parts[:i]))
            if not (p / "cur").is_dir():
                (p / NOSELECT).unlink(missing_ok=True)
                make_maildir(p)
        fsync_dir(self.user_dir(user))

    def _children(self, user: str, name: str) -> list[str]:
        prefix = name + DELIMITER
        return [n for n, _ in self.list_folders(user) if n.startswith(prefix)]

    def delete_folder(self, user: str, name: str) -> None:
        name = check_folder_name(name)
        if name == INBOX:
            raise StoreError("Cannot delete INBOX")
        path = self.folder_path(user, name)
        if not path.is_dir():
            raise StoreError("Mailbox does not exist")
        selectable = (path / "cur").is_dir()
        children = self._children(user, name)
        if children and not selectable:
            raise StoreError("Mailbox has inferior hierarchical names")
        if selectable:
            f = self.folder(user, name)
            f.expunge([m.uid for m in f.messages], via="imap", who=user)
        for sub in ("cur", "new", "tmp"):
            d = path / sub
            if d.is_dir():
                for fn in os.listdir(d):
                    (d / fn).unlink(missing_ok=True)
                d.rmdir()
        for fn in (UIDLIST, LOCK):
            (path / fn).unlink(missing_ok=True)
        self._folders.pop((user, name), None)
        if children:
            # RFC 3501 6.3.4: the name stays, as \Noselect, while inferiors exist.
            (path / NOSELECT).touch()
        else:
            for fn in os.listdir(path):
                (path / fn).unlink(missing_ok=True)
            path.rmdir()
        self.notify(user, name)

    def rename_folder(self, user: str, old: str, new: str) -> None:
        old, new = check_folder_name(old), check_folder_name(new)
        if new in (INBOX, RELEASE) or self.exists(user, new) or (
                self.folder_path(user, new).is_dir()):
            raise StoreError("Mailbox already exists")
        if old == RELEASE:
            raise StoreError("Cannot rename Release")
        if old == INBOX:
            # RFC 3501 6.3.5: renaming INBOX moves its messages; INBOX stays, empty.
            self.create_folder(user, new)
            src, dst = self.folder(user, INBOX), self.folder(user, new)
            src.copy_to([m.uid for m in src.messages], dst)
            with src._locked():
                for m in list(src.messages):
                    src.path_of(m).unlink(missing_ok=True)
            src._stamp = ()
            src.refresh(claim_recent=False)
            self.notify(user, INBOX)
            return
        if not self.folder_path(user, old).is_dir():
            raise StoreError("Mailbox does not exist")
        parts = new.split(DELIMITER)
        for i in range(1, len(parts)):
            parent = DELIMITER.join(parts[:i])
            if not self.folder_path(user, parent).is_dir():
                self.create_folder(user, parent)
        moves = [old] + self._children(user, old)
        for name in moves:
            target = new + name[len(old):]
            check_folder_name(target)
            os.rename(self.folder_path(user, name), self.folder_path(user, target))
            self._folders.pop((user, name), None)
            self.notify(user, name)
        fsync_dir(self.user_dir(user))

    def subscriptions(self, user: str) -> list[str]:
        try:
            text = (self.user_dir(user) / "subscriptions").read_text("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [n for n in text.splitlines() if n]

    def set_subscribed(self, user: str, name: str, on: bool) -> None:
        name = check_folder_name(name)
        subs = [s for s in self.subscriptions(user) if s != name]
        if on:
            subs.append(name)
        self.user_dir(user).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.user_dir(user) / "subscriptions",
                      "".join(s + "\n" for s in subs).encode(), sync=False)

    # -- change notification --
    def watch(self, user: str, name: str, callback: Watcher) -> None:
        """callback(user, folder) after any change to that folder (in this process)."""
        self._watchers.setdefault((user, name), set()).add(callback)

    def unwatch(self, user: str, name: str, callback: Watcher) -> None:
        s = self._watchers.get((user, name))
        if s:
            s.discard(callback)
            if not s:
                del self._watchers[(user, name)]

    def notify(self, user: str, name: str) -> None:
        for cb in list(self._watchers.get((user, name), ())):
            try:
                cb(user, name)
            except Exception:  # one broken session must not stop the others
                log.exception("quarantine watcher failed")

    async def watch_disk(self, interval: float = 2.0) -> None:
        """Changes made by other processes (the other workers, other pods on a shared
        volume) reach the watchers too: every `interval` seconds the new/ and cur/
        directories of each watched folder are stat'ed, and a folder whose directories
        changed is notified. A delivery or flag change renames a file in one of them,
        which moves its mtime. Notifying a change this process made itself as well
        costs a watcher one idempotent resync."""
        seen: dict[tuple[str, str], tuple[int, ...] | None] = {}
        changed: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(interval)
            keys = list(self._watchers)
            if not keys:
                seen.clear()
                continue
            # In a thread: on a network filesystem a stat can take a while.
            now = await asyncio.to_thread(self._signatures, keys)
            # A folder watched since the last look may have changed before it was first
            # seen here; and a change in the same clock tick as the one just seen leaves
            # the mtime as it was: a changed folder is notified on the next look too.
            again, changed = changed, {k for k, sig in now.items()
                                       if k not in seen or seen[k] != sig}
            for key in changed | (again & now.keys()):
                self.notify(*key)
            seen = now

    def _signatures(self, keys: list[tuple[str, str]]
                    ) -> dict[tuple[str, str], tuple[int, ...] | None]:
        return {k: self._signature(*k) for k in keys}

    def _signature(self, user: str, name: str) -> tuple[int, ...] | None:
        try:
            path = self.folder_path(user, name)
            return tuple(x for sub in ("new", "cur")
                         for st in (os.stat(path / sub),)
                         for x in (st.st_mtime_ns, st.st_ino))
        except (OSError, StoreError):
            return None

    # -- putting messages in --
    def _destinations(self, env: Envelope, mailbox: str, filter: str
                      ) -> tuple[list[tuple[str, str]], list[str]]:
        users = self.users().values()
        owners = sorted(u.name for u in users
                        if any(u.owns(r.address) for r in env.recipients))
        dests = [(name, INBOX) for name in owners]
        admin_folder = _admin_folder(mailbox, filter)
        dests += [(u.name, admin_folder) for u in sorted(users, key=lambda u: u.name)
                  if u.admin]
        return dests, owners

    def _prefix(self, qid: str, env: Envelope, filter: str, reason: str, now: float) -> bytes:
        rcpts = ", ".join(r.address for r in env.recipients)
        fields = [
            ("X-Quarantine-Id", qid),
            ("X-Quarantine-Filter", filter or "-"),
            ("X-Quarantine-Reason", reason or "-"),
            ("X-Quarantine-Sender", f"<{env.sender}>"),
            ("X-Quarantine-Recipients", rcpts),
            ("X-Quarantine-Queue-Id", env.queue_id),
            ("X-Quarantine-Date", email.utils.format_datetime(
                datetime.datetime.fromtimestamp(now, datetime.UTC))),
        ]
        out = []
        for name, value in fields:
            limit = _RECIPIENTS_MAX if name == "X-Quarantine-Recipients" else _HEADER_VALUE_MAX
            out.append(f"{name}: {sanitize_header(value, limit)}\r\n")
        return "".join(out).encode("ascii")

    async def put(self, env: Envelope, message: bytes, mailbox: str, filter: str,
                  reason: str) -> str:
        """File a held message; durable (file, links, meta, directories fsynced) on
        return. Returns the quarantine id. The original bytes are kept exactly."""
        qid = new_base()
        now = time.time()
        dests, owners = self._destinations(env, mailbox, filter)
        prefix = self._prefix(qid, env, filter, reason, now)
        meta = QuarantineMeta(qid, env, len(prefix), filter, reason, mailbox, now,
                              tuple(owners), tuple(dests))
        await asyncio.to_thread(self._put_sync, qid, prefix, message, meta, dests)
        for user, folder in set(dests):
            self.notify(user, folder)
        QUARANTINE_MESSAGES.inc()
        log.info("quarantined qid=%s queue_id=%s filter=%s owners=%s reason=%s", qid,
                 env.queue_id, filter, ",".join(owners) or "-", sanitize_header(reason, 120))
        return qid

    def _put_sync(self, qid: str, prefix: bytes, message: bytes, meta: QuarantineMeta,
                  dests: list[tuple[str, str]]) -> None:
        # The meta record first: a message file never exists without it. A crash after
        # this leaves a meta with no links, which expire() cleans up.
        write_atomic(self.root / "meta" / f"{qid}.json",
                      json.dumps(meta.to_json()).encode())
        tmp = self.root / "unowned" / "tmp" / qid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, prefix)
            view = memoryview(message)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        targets = []
        for user, name in dests:
            path = self.folder_path(user, name)
            if not (path / "cur").is_dir():
                make_maildir(path)
                fsync_dir(path.parent)
            targets.append(path)
        if not targets:
            targets.append(self.root / "unowned")   # kept for the CLI, never lost
        try:
            for path in targets:
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path / "new" / qid)
                fsync_dir(path / "new")
        finally:
            tmp.unlink(missing_ok=True)

    # -- release, CLI, retention --
    def meta(self, qid: str) -> QuarantineMeta | None:
        if not valid_qid(qid):
            return None
        try:
            return QuarantineMeta.from_json(
                json.loads((self.root / "meta" / f"{qid}.json").read_bytes()))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def list_meta(self) -> list[QuarantineMeta]:
        out = []
        for fn in sorted(os.listdir(self.root / "meta")):
            if fn.endswith(".json") and not fn.startswith("."):
                m = self.meta(fn[:-5])
                if m:
                    out.append(m)
        return out

    def _links(self, qid: str) -> list[Path]:
        """Every file of this message, in every user's folders and in unowned/."""
        roots = [self.root / "unowned"]
        users = self.root / "users"
        for u in sorted(os.listdir(users)) if users.is_dir() else []:
            roots.append(users / u)
            roots += [users / u / e for e in sorted(os.listdir(users / u))
                      if e.startswith(DELIMITER) and (users / u / e).is_dir()]
        out = []
        for r in roots:
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(r / sub)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                out += [r / sub / n for n in names if qid_of(n) == qid]
        return out

    def _open_any(self, qid: str) -> Path:
        links = self._links(qid)
        if not links:
            raise KeyError(qid)
        return links[0]

    async def original(self, qid: str) -> bytes:
        """The message exactly as it was quarantined (the X-Quarantine-* prefix removed).
        Raises KeyError if unknown."""
        meta = self.meta(qid)
        if meta is None:
            raise KeyError(qid)

        def read() -> bytes:
            for p in self._links(qid):
                with contextlib.suppress(FileNotFoundError):
                    return p.read_bytes()[meta.prefix_len:]
            raise KeyError(qid)
        return await asyncio.to_thread(read)

    async def discard(self, qid: str, via: str = "cli", who: str = "") -> bool:
        """Remove a message from every mailbox and drop its meta. Returns False if
        unknown. `via` labels QUARANTINE_DELETES ('imap', 'pop3', 'cli', 'release'...);
        release calls this with via='release' (not counted as a delete)."""
        if not valid_qid(qid):
            return False
        links = await asyncio.to_thread(self._links, qid)
        known = (self.root / "meta" / f"{qid}.json").exists()
        if not links and not known:
            return False
        touched = set()
        for p in links:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            touched.add(p.parent.parent)
        self._forget(qid, via, who)
        users = self.root / "users"
        for d in touched:
            if d.parent == users:
                self.notify(d.name, INBOX)
            elif d.parent.parent == users:
                self.notify(d.parent.name, d.name[1:])
        return True

    def _forget(self, qid: str, via: str, who: str) -> None:
        p = self.root / "meta" / f"{qid}.json"
        try:
            p.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        QUARANTINE_MESSAGES.dec()
        if via not in ("release", "expire"):   # both are counted by their own metric
            QUARANTINE_DELETES.labels(via=via).inc()
            log.info("quarantine deleted qid=%s via=%s by=%s", qid, via, who or "-")

    async def expire(self, now: float | None = None) -> int:
        """Remove quarantined messages older than the retention; returns how many."""
        now = time.time() if now is None else now
        cutoff = now - float(self.cfg.retention)
        n = 0
        for meta in self.list_meta():
            if meta.date < cutoff:
                if await self.discard(meta.qid, via="expire"):
                    n += 1
        if n:
            QUARANTINE_EXPIRED.inc(n)
            log.info("quarantine expired %d messages older than %ss", n,
                     int(self.cfg.retention))
        return n

    def _set_gauge(self) -> None:
        with contextlib.suppress(OSError):
            QUARANTINE_MESSAGES.set(sum(1 for fn in os.listdir(self.root / "meta")
                                        if fn.endswith(".json") and not fn.startswith(".")))
