"""One IMAP4rev1 session: the RFC 3501 state machine and every command's semantics.

Takes parsed `proto.Command`s (and raw lines for AUTHENTICATE and IDLE) from the server
layer and hands back reply bytes through `send`; reads and changes mail only through
relay.quarantine.store (one user's folders), and hands releases on to `on_release(user,
qid)` when a message is copied or moved into the `Release` folder. Trusts nothing from
the client: mailbox names go through store.check_folder_name, sequence sets and search
keys are checked, a session only ever sees the folders of the user it logged in as.
Untagged updates (EXISTS, EXPUNGE, FETCH FLAGS) from other sessions arrive through the
store's watcher hook and are sent when RFC 3501 7.4.1 allows (never an EXPUNGE during
FETCH, STORE or SEARCH), or at once during IDLE.
RFCs: 3501, 2177 (IDLE), 4315 (UIDPLUS), 6851 (MOVE), 2342 (NAMESPACE), 7888
(LITERAL+), 3691 (UNSELECT), 4959 (SASL-IR), 4616 (PLAIN), 2971 (ID), 3348 (CHILDREN).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Awaitable, Callable

from relay.metrics import MAILBOX_LOGINS
from relay.quarantine.imap.message import MessageView
from relay.quarantine.imap.proto import Atom, Command, Literal, ParseError, mutf7_valid, render
from relay.quarantine.imap.proto import astring_value as _astr
from relay.quarantine.imap.search import (
    MessageFacts,
    SearchError,
    compile_search,
    in_set,
    parse_seqset,
)
from relay.quarantine.imap.syntax import (
    Bad,
    fetch_items,
    imap_date,
    parse_datetime,
    seq_text,
    wildcard_match,
)
from relay.quarantine.store import (
    DELIMITER,
    INBOX,
    RELEASE,
    SYSTEM_FLAGS,
    Folder,
    MessageInfo,
    QuarantineStore,
    StoreError,
    User,
    check_folder_name,
)
from relay.smtp.auth import AuthCancelled, AuthSyntaxError, decode_plain

log = logging.getLogger("relay.quarantine.imap")

OnRelease = Callable[[str, str], Awaitable[None]]
MAX_KEYWORDS = 50           # per message; keeps the uid list lines short
MAX_APPEND = 50 * 1024 * 1024
MAX_ERRORS = 100            # BAD replies before we hang up on a confused client
_PERM_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Outcome(enum.Enum):
    """What the server layer must do after a command."""

    NONE = 0
    STARTTLS = 1      # upgrade the stream now (the OK was already sent)
    CLOSE = 2         # hang up (LOGOUT, too many errors)


class No(Exception):
    """Answer NO with this text."""


# Commands allowed per state (RFC 3501 6); UID sub-commands checked separately.
_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_NOTAUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
_AUTH = {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
         "LIST", "LSUB", "STATUS", "APPEND", "NAMESPACE", "IDLE"}
_SELECTED = {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY",
             "MOVE", "UID"}


class Session:
    def __init__(self, store: QuarantineStore, send: Callable[[bytes], None], peer: str,
                 tls: bool, starttls_ok: bool, on_release: OnRelease | None = None,
                 cleartext_login: bool = False) -> None:
        self.store = store
        # RFC 3501 6.2.3 / RFC 2595: no passwords in clear text unless the peer is on
        # loopback (or there is no TLS to offer at all).
        self.cleartext_login = cleartext_login or not starttls_ok
        self.send = send
        self.peer = peer
        self.tls = tls
        self.starttls_ok = starttls_ok
        self.on_release = on_release
        self.state = State.NOT_AUTHENTICATED
        self.user: User | None = None
        self.folder: Folder | None = None
        self.readonly = False
        self.uids: list[int] = []
        self.versions: dict[int, int] = {}
        self.recent: set[int] = set()
        self.want_line = False          # the server must hand the next line raw
        self.errors = 0
        self._auth_tag: str | None = None
        self._idle_tag: str | None = None
        self._dirty = False
        self._push_scheduled = False

    # -- plumbing --
    def greeting(self) -> bytes:
        return b"* OK [CAPABILITY " + self.capabilities().encode() + b"] IMAP4rev1 ready\r\n"

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.starttls_ok and not self.tls:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.login_allowed else "LOGINDISABLED")
        return " ".join(caps)

    @property
    def login_allowed(self) -> bool:
        return self.tls or self.cleartext_login

    def _privacy(self, tag: str) -> bool:
        if self.login_allowed:
            return False
        self._tagged(tag, "NO", "[PRIVACYREQUIRED] Use STARTTLS first")
        return True

    @property
    def idling(self) -> bool:
        return self._idle_tag is not None

    def untagged(self, text: str | bytes) -> None:
        self.send(b"* " + (text.encode() if isinstance(text, str) else text) + b"\r\n")

    def _tagged(self, tag: str, status: str, text: str) -> None:
        self.send(f"{tag} {status} {text}\r\n".encode("utf-8", "replace"))

    def bad(self, tag: str | None, text: str) -> Outcome:
        """A syntax error: BAD (tagged if we know the tag). Too many: BYE."""
        self.errors += 1
        self._tagged(tag or "*", "BAD", text)
        if self.errors > MAX_ERRORS:
            self.untagged("BYE Too many errors")
            return Outcome.CLOSE
        return Outcome.NONE

    def close(self) -> None:
        self._deselect()
        self.state = State.LOGOUT

    # -- entry points from the server layer --
    async def handle(self, cmd: Command) -> Outcome:
        name = cmd.name
        allowed = _ANY | (_NOTAUTH if self.state is State.NOT_AUTHENTICATED else set()) | (
            _AUTH if self.state in (State.AUTHENTICATED, State.SELECTED) else set()) | (
            _SELECTED if self.state is State.SELECTED else set())
        if name == "ENABLE" and self.state is not State.NOT_AUTHENTICATED:
            self.untagged("ENABLED")
            self._tagged(cmd.tag, "OK", "ENABLE completed")
            return Outcome.NONE
        handler = getattr(self, "cmd_" + name, None) if re.fullmatch(r"[A-Z]+", name) else None
        if handler is None:
            return self.bad(cmd.tag, "Unknown command")
        if name not in allowed:
            return self.bad(cmd.tag, f"{name} not allowed now")
        try:
            out = await handler(cmd)
        except Bad as e:
            return self.bad(cmd.tag, str(e))
        except (ParseError, SearchError) as e:
            return self.bad(cmd.tag, str(e))
        except No as e:
            self.sync(expunge=name not in ("FETCH", "STORE", "SEARCH"))
            self._tagged(cmd.tag, "NO", str(e))
            return Outcome.NONE
        except StoreError as e:
            self._tagged(cmd.tag, "NO", str(e))
            return Outcome.NONE
        except OSError as e:
            # A file vanished under us (another session, expiry) or the disk failed:
            # this command fails, the session and the others go on.
            log.warning("imap %s failed user=%s: %s", name, self.user and self.user.name, e)
            self._tagged(cmd.tag, "NO", "[SERVERBUG] Mailbox access failed")
            return Outcome.NONE
        return out or Outcome.NONE

    async def raw_line(self, line: bytes) -> Outcome:
        if self._idle_tag is not None:
            tag, self._idle_tag = self._idle_tag, None
            if line.strip().upper() != b"DONE":
                return self.bad(tag, "Expected DONE")
            self.sync()
            self._tagged(tag, "OK", "IDLE terminated")
            return Outcome.NONE
        if self._auth_tag is not None:
            tag, self._auth_tag = self._auth_tag, None
            return await self._auth_plain(tag, line.strip())
        return self.bad(None, "Unexpected line")

    # -- untagged updates --
    def _changed(self, user: str, folder: str) -> None:
        """Store watcher: another session (or the pipeline) changed our folder."""
        self._dirty = True
        if self.idling and not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._idle_push)

    def _idle_push(self) -> None:
        self._push_scheduled = False
        if self.idling and self.folder is not None:
            try:
                self.sync()
            except StoreError:      # folder deleted under us: BYE at next command
                pass

    def sync(self, expunge: bool = True) -> None:
        """Tell the client what changed: EXPUNGE (when allowed), EXISTS, RECENT, FLAGS."""
        f = self.folder
        if f is None:
            return
        self._dirty = False
        try:
            new_recent = f.refresh(claim_recent=not self.readonly)
        except StoreError:
            return
        self.recent.update(new_recent)
        present = f.by_uid
        gone = [i for i, u in enumerate(self.uids) if u not in present]
        if gone and not expunge:
            self._flag_updates()
            return
        for i in reversed(gone):
            uid = self.uids.pop(i)
            self.versions.pop(uid, None)
            self.recent.discard(uid)
            self.untagged(f"{i + 1} EXPUNGE")
        last = self.uids[-1] if self.uids else 0
        new = [m.uid for m in f.messages if m.uid > last]
        if new:
            self.uids.extend(new)
            for u in new:
                self.versions[u] = present[u].version
            self.untagged(f"{len(self.uids)} EXISTS")
            self.untagged(f"{len(self.recent)} RECENT")
        self._flag_updates()

    def _flag_updates(self) -> None:
        f = self.folder
        for i, uid in enumerate(self.uids):
            m = f.by_uid.get(uid)
            if m is not None and self.versions.get(uid) != m.version:
                self.versions[uid] = m.version
                self.untagged(f"{i + 1} FETCH (UID {uid} FLAGS {self._flags(m)})")

    def _flags(self, m: MessageInfo) -> str:
        fl = sorted(m.flags)
        if m.uid in self.recent:
            fl.append("\\Recent")
        return "(" + " ".join(fl) + ")"

    # -- any state --
    async def cmd_CAPABILITY(self, cmd: Command) -> None:
        self._no_args(cmd)
        self.untagged("CAPABILITY " + self.capabilities())
        self._tagged(cmd.tag, "OK", "CAPABILITY completed")

    async def cmd_NOOP(self, cmd: Command) -> None:
        self._no_args(cmd)
        self.sync()
        self._tagged(cmd.tag, "OK", "NOOP completed")

    async def cmd_LOGOUT(self, cmd: Command) -> Outcome:
        self._no_args(cmd)
        self.untagged("BYE Logging out")
        self._tagged(cmd.tag, "OK", "LOGOUT completed")
        self.close()
        return Outcome.CLOSE

    async def cmd_ID(self, cmd: Command) -> None:
        self.untagged('ID ("name" "relay")')
        self._tagged(cmd.tag, "OK", "ID completed")

    def _no_args(self, cmd: Command) -> None:
        if cmd.args:
            raise Bad("Unexpected arguments")

    # -- not authenticated --
    async def cmd_STARTTLS(self, cmd: Command) -> Outcome:
        self._no_args(cmd)
        if self.tls or not self.starttls_ok:
            raise Bad("TLS already active" if self.tls else "STARTTLS not available")
        self._tagged(cmd.tag, "OK", "Begin TLS negotiation now")
        return Outcome.STARTTLS

    async def cmd_LOGIN(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            raise Bad("LOGIN needs a user name and a password")
        if self._privacy(cmd.tag):
            return
        await self._login(cmd.tag, _astr(cmd.args[0]), _astr(cmd.args[1]))

    async def cmd_AUTHENTICATE(self, cmd: Command) -> None:
        if not cmd.args or len(cmd.args) > 2 or not isinstance(cmd.args[0], Atom):
            raise Bad("AUTHENTICATE needs a mechanism")
        if cmd.args[0].upper() != "PLAIN":
            raise No("Unsupported authentication mechanism")
        if self._privacy(cmd.tag):
            return
        if len(cmd.args) == 2:          # SASL-IR (RFC 4959)
            await self._auth_plain(cmd.tag, _astr(cmd.args[1]).encode())
            return
        self._auth_tag = cmd.tag
        self.want_line = True
        self.send(b"+ \r\n")

    async def _auth_plain(self, tag: str, line: bytes) -> Outcome:
        try:
            authz_s, user, password = decode_plain(line.decode("ascii"))
        except AuthCancelled:
            return self.bad(tag, "Authentication cancelled")
        except (AuthSyntaxError, UnicodeDecodeError):
            return self.bad(tag, "Invalid PLAIN response")
        if authz_s and authz_s != user:
            self._tagged(tag, "NO", "[AUTHORIZATIONFAILED] Cannot act as another user")
            return Outcome.NONE
        await self._login(tag, user, password)
        return Outcome.NONE

    async def _login(self, tag: str, name: str, password: str) -> None:
        throttle = self.store.throttle
        await throttle.wait(self.peer)
        # scrypt/bcrypt cost runs in a thread: one login never stalls other clients.
        user = await asyncio.to_thread(self.store.authenticate, name, password)
        if user is None:
            throttle.record_failure(self.peer)
            MAILBOX_LOGINS.labels(protocol="imap", result="failure").inc()
            log.warning("imap login failed user=%r ip=%s", name[:64], self.peer)
            self._tagged(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
            return
        throttle.record_success(self.peer)
        MAILBOX_LOGINS.labels(protocol="imap", result="success").inc()
        log.info("imap login user=%s ip=%s", user.name, self.peer)
        self.user = user
        self.state = State.AUTHENTICATED
        # The Release folder always exists so clients can drag mail onto it.
        self.store.ensure_folder(user.name, RELEASE)
        self._tagged(tag, "OK", f"[CAPABILITY {self.capabilities()}] Logged in")

    # -- authenticated --
    def _mailbox_arg(self, tok) -> str:
        try:
            return check_folder_name(_astr(tok))
        except StoreError as e:
            raise No(str(e)) from None

    async def cmd_SELECT(self, cmd: Command, readonly: bool = False) -> None:
        if len(cmd.args) != 1:
            raise Bad("SELECT needs a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        self._deselect()
        self.state = State.AUTHENTICATED
        f = self.store.folder(self.user.name, name)
        self.folder, self.readonly = f, readonly
        self.store.watch(self.user.name, f.name, self._changed)
        self.recent = set(f.refresh(claim_recent=not readonly))
        self.uids = [m.uid for m in f.messages]
        self.versions = {m.uid: m.version for m in f.messages}
        self.state = State.SELECTED
        self.untagged(f"FLAGS {_FLAGS}")
        self.untagged(f"{len(self.uids)} EXISTS")
        self.untagged(f"{len(self.recent)} RECENT")
        unseen = next((i + 1 for i, m in enumerate(f.messages) if "\\Seen" not in m.flags),
                      None)
        if unseen:
            self.untagged(f"OK [UNSEEN {unseen}] First unseen")
        perm = "()" if readonly else _PERM_FLAGS
        self.untagged(f"OK [PERMANENTFLAGS {perm}] Flags permitted")
        self.untagged(f"OK [UIDVALIDITY {f.uidvalidity}] UIDs valid")
        self.untagged(f"OK [UIDNEXT {f.uidnext}] Predicted next UID")
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        self._tagged(cmd.tag, "OK", f"[{mode}] {'EXAMINE' if readonly else 'SELECT'} completed")

    async def cmd_EXAMINE(self, cmd: Command) -> None:
        await self.cmd_SELECT(cmd, readonly=True)

    def _deselect(self) -> None:
        if self.folder is not None and self.user is not None:
            self.store.unwatch(self.user.name, self.folder.name, self._changed)
        self.folder = None
        self.uids, self.versions, self.recent = [], {}, set()
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    async def cmd_CREATE(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise Bad("CREATE needs a mailbox name")
        raw = _astr(cmd.args[0])
        name = self._mailbox_arg(raw.rstrip(DELIMITER) or raw)
        if not mutf7_valid(name):
            raise No("Mailbox names must be modified UTF-7 (RFC 3501 5.1.3)")
        if name.upper() == RELEASE.upper():
            raise No("[ALREADYEXISTS] Mailbox already exists")
        self.store.create_folder(self.user.name, name)
        self._tagged(cmd.tag, "OK", "CREATE completed")

    async def cmd_DELETE(self, cmd: Command) -> None:
        if len(cmd.args) != 1:
            raise Bad("DELETE needs a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        if name == RELEASE:
            raise No("[CANNOT] The Release folder cannot be deleted")
        if self.folder is not None and self.folder.name == name:
            self._deselect()
        self.store.delete_folder(self.user.name, name)
        self._tagged(cmd.tag, "OK", "DELETE completed")

    async def cmd_RENAME(self, cmd: Command) -> None:
        if len(cmd.args) != 2:
            raise Bad("RENAME needs two mailbox names")
        old, new = self._mailbox_arg(cmd.args[0]), self._mailbox_arg(cmd.args[1])
        if RELEASE in (old, new):
            raise No("[CANNOT] The Release folder cannot be renamed")
        if not mutf7_valid(new):
            raise No("Mailbox names must be modified UTF-7 (RFC 3501 5.1.3)")
        if not self.store.exists(self.user.name, old) and not self.store.folder_path(
                self.user.name, old).is_dir():
            raise No("[NONEXISTENT] Mailbox does not exist")
        if self.folder is not None and (self.folder.name == old or self.folder.name.startswith(
                old + DELIMITER)) and old != INBOX:
            self._deselect()
        self.store.rename_folder(self.user.name, old, new)
        self.sync()
        self._tagged(cmd.tag, "OK", "RENAME completed")

    async def cmd_SUBSCRIBE(self, cmd: Command, on: bool = True) -> None:
        if len(cmd.args) != 1:
            raise Bad("Needs a mailbox name")
        name = self._mailbox_arg(cmd.args[0])
        if on and not self.store.exists(self.user.name, name):
            raise No("[NONEXISTENT] Mailbox does not exist")
        self.store.set_subscribed(self.user.name, name, on)
        self._tagged(cmd.tag, "OK", f"{'UN' if not on else ''}SUBSCRIBE completed")

    async def cmd_UNSUBSCRIBE(self, cmd: Command) -> None:
        await self.cmd_SUBSCRIBE(cmd, on=False)

    async def cmd_LIST(self, cmd: Command, lsub: bool = False) -> None:
        if len(cmd.args) != 2:
            raise Bad("LIST needs a reference and a pattern")
        ref, pat = _astr(cmd.args[0]), _astr(cmd.args[1])
        verb = "LSUB" if lsub else "LIST"
        if len(pat) > 255 or len(ref) > 255:
            raise Bad("Pattern too long")
        if pat == "" and not lsub:
            self.untagged(f'LIST (\\Noselect) "{DELIMITER}" ""')
            self._tagged(cmd.tag, "OK", "LIST completed")
            return
        pattern = ref + pat if not pat.startswith(DELIMITER) or not ref else ref + pat[1:]
        # A run of wildcards holding a '*' matches what one '*' matches; '%%' is '%'.
        pattern = re.sub(r"[*%]*\*[*%]*", "*", re.sub(r"%+", "%", pattern))
        folders = self.store.list_folders(self.user.name)
        parents = set()
        for name, _ in folders:
            parts = name.split(DELIMITER)
            parents.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
        subs = set(self.store.subscriptions(self.user.name)) if lsub else None
        candidates = [(n, sel) for n, sel in folders if subs is None or n in subs]
        inbox_pattern = re.sub(r"(?i)^inbox", INBOX, pattern)     # INBOX in any case

        def select() -> list[tuple[str, bool]]:
            return [(n, sel) for n, sel in candidates
                    if wildcard_match(inbox_pattern if n == INBOX else pattern, n)]
        # Matching is O(pattern x name) per folder: many folders go to a thread, so a
        # crafted pattern never stalls other sessions.
        matched = await asyncio.to_thread(select) if len(candidates) > 20 else select()
        for name, selectable in matched:
            attrs = [] if selectable else ["\\Noselect"]
            attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
            self.untagged(f"{verb} ({' '.join(attrs)}) \"{DELIMITER}\" ".encode()
                          + render(name))
        self._tagged(cmd.tag, "OK", f"{verb} completed")

    async def cmd_LSUB(self, cmd: Command) -> None:
        await self.cmd_LIST(cmd, lsub=True)

    async def cmd_NAMESPACE(self, cmd: Command) -> None:
        self._no_args(cmd)
        self.untagged(f'NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        self._tagged(cmd.tag, "OK", "NAMESPACE completed")

    async def cmd_STATUS(self, cmd: Command) -> None:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list) or not cmd.args[1]:
            raise Bad("STATUS needs a mailbox and a list of items")
        name = self._mailbox_arg(cmd.args[0])
        f = self.store.folder(self.user.name, name)
        items = []
        for it in cmd.args[1]:
            k = str(it).upper() if isinstance(it, Atom) else ""
            if k == "MESSAGES":
                items.append(f"MESSAGES {len(f.messages)}")
            elif k == "RECENT":
                n = sum(1 for m in f.messages if m.sub == "new")
                if self.folder is f:
                    n += len(self.recent)
                items.append(f"RECENT {n}")
            elif k == "UIDNEXT":
                items.append(f"UIDNEXT {f.uidnext}")
            elif k == "UIDVALIDITY":
                items.append(f"UIDVALIDITY {f.uidvalidity}")
            elif k == "UNSEEN":
                unseen = sum(1 for m in f.messages if "\\Seen" not in m.flags)
                items.append(f"UNSEEN {unseen}")
            else:
                raise Bad("Unknown STATUS item")
        self.untagged(b"STATUS " + render(name) + b" (" + " ".join(items).encode() + b")")
        self.sync()
        self._tagged(cmd.tag, "OK", "STATUS completed")

    async def cmd_APPEND(self, cmd: Command) -> None:
        args = list(cmd.args)
        if len(args) < 2 or not isinstance(args[-1], bytes):
            raise Bad("APPEND needs a mailbox and a message literal")
        name_tok, data = args[0], args[-1]
        flags: list = []
        date = None
        for extra in args[1:-1]:
            if isinstance(extra, list) and not flags:
                flags = extra
            elif isinstance(extra, bytes) and date is None:
                date = parse_datetime(extra.decode("ascii", "replace"))
            else:
                raise Bad("Unexpected APPEND argument")
        name = self._mailbox_arg(name_tok)
        if name == RELEASE:
            raise No("[CANNOT] Only quarantined messages can be released")
        if len(data) > MAX_APPEND:
            raise No("[TOOBIG] Message too big")
        if not self.store.exists(self.user.name, name):
            raise No("[TRYCREATE] Mailbox does not exist")
        fl = self._flag_list(flags)
        f = self.store.folder(self.user.name, name)
        # The write and fsync run in a thread; the folder's state changes only here on
        # the loop thread, where every session reads it.
        tmp, base = await asyncio.to_thread(f.write_tmp, data)
        try:
            uid = f.add_link(tmp, base, fl, date)
        finally:
            tmp.unlink(missing_ok=True)
        if self.folder is f:
            self.sync()
        self._tagged(cmd.tag, "OK", f"[APPENDUID {f.uidvalidity} {uid}] APPEND completed")

    async def cmd_IDLE(self, cmd: Command) -> None:
        self._no_args(cmd)
        self._idle_tag = cmd.tag
        self.want_line = True
        self.send(b"+ idling\r\n")
        self.sync()

    # -- selected --
    async def cmd_CHECK(self, cmd: Command) -> None:
        self._no_args(cmd)
        self.sync()
        self._tagged(cmd.tag, "OK", "CHECK completed")

    async def cmd_CLOSE(self, cmd: Command) -> None:
        self._no_args(cmd)
        if not self.readonly:
            f = self.folder
            f.refresh(claim_recent=False)
            f.expunge([m.uid for m in f.messages if "\\Deleted" in m.flags], "imap",
                      self.user.name)
        self._deselect()
        self._tagged(cmd.tag, "OK", "CLOSE completed")

    async def cmd_UNSELECT(self, cmd: Command) -> None:
        self._no_args(cmd)
        self._deselect()
        self._tagged(cmd.tag, "OK", "UNSELECT completed")

    async def cmd_EXPUNGE(self, cmd: Command, uid_set: list | None = None) -> None:
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        if uid_set is None:
            self._no_args(cmd)
        f = self.folder
        self.sync()
        victims = [u for u in self.uids if "\\Deleted" in f.by_uid[u].flags
                   and (uid_set is None or in_set(u, uid_set))]
        f.expunge(victims, "imap", self.user.name)
        self.sync()
        self._tagged(cmd.tag, "OK", "EXPUNGE completed")

    async def cmd_UID(self, cmd: Command) -> None:
        if not cmd.args or not isinstance(cmd.args[0], Atom):
            raise Bad("UID needs a command")
        sub = cmd.args[0].upper()
        inner = Command(cmd.tag, sub, cmd.args[1:])
        if sub == "FETCH":
            await self.cmd_FETCH(inner, uid=True)
        elif sub == "SEARCH":
            await self.cmd_SEARCH(inner, uid=True)
        elif sub == "STORE":
            await self.cmd_STORE(inner, uid=True)
        elif sub == "COPY":
            await self.cmd_COPY(inner, uid=True)
        elif sub == "MOVE":
            await self.cmd_COPY(inner, uid=True, move=True)
        elif sub == "EXPUNGE":
            if len(inner.args) != 1 or not isinstance(inner.args[0], Atom):
                raise Bad("UID EXPUNGE needs a UID set")
            await self.cmd_EXPUNGE(inner, uid_set=parse_seqset(
                inner.args[0], self.uids[-1] if self.uids else 0))
        else:
            raise Bad("Unknown UID command")

    def _resolve(self, tok, uid: bool) -> list[int]:
        """A sequence set (or UID set) -> the session's uids it names, in order."""
        if not isinstance(tok, Atom):
            raise Bad("Expected a sequence set")
        if uid:
            ranges = parse_seqset(tok, self.uids[-1] if self.uids else 0)
            return [u for u in self.uids if in_set(u, ranges)]
        ranges = parse_seqset(tok, len(self.uids))
        # An explicit number past the end is an error; '*' in an empty mailbox is not.
        if any(int(n) > len(self.uids) for item in tok.split(",") if "*" not in item
               for n in item.split(":")):
            raise Bad("Invalid message sequence number")
        return [u for i, u in enumerate(self.uids) if in_set(i + 1, ranges)]

    # SEARCH
    async def cmd_SEARCH(self, cmd: Command, uid: bool = False) -> None:
        f = self.folder
        self.sync(expunge=uid)
        try:
            _, pred = compile_search(cmd.args, len(self.uids),
                                     self.uids[-1] if self.uids else 0)
        except SearchError as e:
            if str(e).startswith("[BADCHARSET"):
                raise No(str(e)) from None
            raise
        hits = []
        for i, u in enumerate(self.uids):
            m = f.by_uid.get(u)
            if m is None:
                continue
            facts = MessageFacts(i + 1, u, m.flags, u in self.recent,
                                 size=lambda m=m: f.size(m),
                                 internaldate=lambda m=m: f.internaldate(m),
                                 view=_lazy_view(f, m))
            try:
                if pred(facts):
                    hits.append(u if uid else i + 1)
            except FileNotFoundError:
                continue
        self.untagged(("SEARCH " + " ".join(map(str, hits))).rstrip())
        self._tagged(cmd.tag, "OK", "SEARCH completed")

    # FETCH
    async def cmd_FETCH(self, cmd: Command, uid: bool = False) -> None:
        if len(cmd.args) != 2:
            raise Bad("FETCH needs a sequence set and items")
        self.sync(expunge=uid)
        targets = self._resolve(cmd.args[0], uid)
        items = fetch_items(cmd.args[1])
        if uid and "UID" not in [i[0] for i in items]:
            items.insert(0, ("UID", None))
        f = self.folder
        seqs = {u: i + 1 for i, u in enumerate(self.uids)}
        for u in targets:
            m = f.by_uid.get(u)
            if m is None:
                continue
            try:
                self._fetch_one(f, m, seqs[u], items)
            except FileNotFoundError:
                continue
        self._tagged(cmd.tag, "OK", "FETCH completed")

    def _fetch_one(self, f: Folder, m: MessageInfo, seq: int, items: list) -> None:
        out: list[bytes] = []
        data: bytes | None = None
        view: MessageView | None = None
        set_seen = False

        def need_data() -> bytes:
            nonlocal data
            if data is None:
                data = f.read(m)
            return data

        def need_view() -> MessageView:
            nonlocal view
            if view is None:
                view = MessageView(need_data())
            return view

        flags_asked = False
        for name, spec in items:
            if name == "UID":
                out.append(b"UID %d" % m.uid)
            elif name == "FLAGS":
                flags_asked = True
            elif name == "INTERNALDATE":
                out.append(b'INTERNALDATE "' + imap_date(f.internaldate(m)).encode() + b'"')
            elif name == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % f.size(m))
            elif name == "ENVELOPE":
                out.append(b"ENVELOPE " + render(need_view().envelope()))
            elif name == "BODYSTRUCTURE":
                out.append(b"BODYSTRUCTURE " + render(need_view().bodystructure(True)))
            elif name == "BODY" and spec is None:
                out.append(b"BODY " + render(need_view().bodystructure(False)))
            elif name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
                d = need_data()
                if name == "RFC822":
                    piece = d
                else:
                    piece = need_view().section([], "HEADER" if name == "RFC822.HEADER"
                                                else "TEXT", None) or b""
                out.append(name.encode() + b" " + render(Literal(piece)))
                set_seen = set_seen or name != "RFC822.HEADER"
            else:       # BODY[...] / BODY.PEEK[...]
                path, sect, fields, partial, echo, peek = spec
                piece = need_data() if not path and sect == "" else need_view().section(
                    path, sect, fields)
                if piece is None:
                    piece = b""
                key = b"BODY[" + echo.encode() + b"]"
                if partial is not None:
                    start, length = partial
                    piece = piece[start:start + length]
                    key += b"<%d>" % start
                out.append(key + b" " + render(Literal(piece)))
                set_seen = set_seen or not peek
        if set_seen and not self.readonly and "\\Seen" not in m.flags:
            new = f.set_flags(m.uid, m.flags | {"\\Seen"})
            if new is not None:
                m = new
                flags_asked = True
        if flags_asked:
            self.versions[m.uid] = m.version
            out.insert(0, b"FLAGS " + self._flags(m).encode())
        self.send(b"* %d FETCH (" % seq + b" ".join(out) + b")\r\n")

    # STORE
    def _flag_list(self, toks) -> set[str]:
        toks = toks if isinstance(toks, list) else [toks]
        out = set()
        for t in toks:
            if not isinstance(t, Atom):
                raise Bad("Flags must be atoms")
            s = str(t)
            if s.startswith("\\"):
                canon = next((f for f in SYSTEM_FLAGS if f.lower() == s.lower()), None)
                if canon is None:
                    if s.lower() == "\\recent":
                        continue
                    raise Bad(f"Unknown system flag {s[:30]}")
                out.add(canon)
            else:
                if not re.fullmatch(r"[!#$&'+-Z^-z|~]{1,64}", s) or any(
                        c in s for c in "()\"{%*]\\"):
                    raise Bad("Invalid keyword")
                out.add(s)
        return out

    async def cmd_STORE(self, cmd: Command, uid: bool = False) -> None:
        if len(cmd.args) < 3:
            raise Bad("STORE needs a set, an item and flags")
        self.sync(expunge=uid)
        targets = self._resolve(cmd.args[0], uid)
        item = str(cmd.args[1]).upper() if isinstance(cmd.args[1], Atom) else ""
        m = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
        if not m:
            raise Bad("Unknown STORE item")
        flags = self._flag_list(cmd.args[2] if len(cmd.args) == 3 else list(cmd.args[2:]))
        if self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        f = self.folder
        seqs = {u: i + 1 for i, u in enumerate(self.uids)}
        for u in targets:
            msg = f.by_uid.get(u)
            if msg is None:
                continue
            kws = {x for x in msg.flags if x not in SYSTEM_FLAGS}
            # Keywords are case-insensitive (RFC 3501 2.3.2): keep the spelling stored.
            have = {x.lower(): x for x in msg.flags}
            given = {have.get(x.lower(), x) for x in flags}
            if m.group(1) == "+":
                new = msg.flags | given
            elif m.group(1) == "-":
                new = msg.flags - given
            else:
                new = frozenset(given)
            if len({x for x in new if x not in SYSTEM_FLAGS} - kws) and len(
                    [x for x in new if x not in SYSTEM_FLAGS]) > MAX_KEYWORDS:
                raise No("[LIMIT] Too many keywords")
            updated = f.set_flags(u, new) or msg
            self.versions[u] = updated.version
            if not m.group(2):
                uid_part = f"UID {u} " if uid else ""
                self.untagged(f"{seqs[u]} FETCH ({uid_part}FLAGS "
                              f"{self._flags(updated)})")
        self._tagged(cmd.tag, "OK", "STORE completed")

    # COPY / MOVE
    async def cmd_COPY(self, cmd: Command, uid: bool = False, move: bool = False) -> None:
        if len(cmd.args) != 2:
            raise Bad("Needs a sequence set and a mailbox")
        verb = "MOVE" if move else "COPY"
        if move and self.readonly:
            raise No("[READ-ONLY] Mailbox is read-only")
        targets = self._resolve(cmd.args[0], uid)
        dest_name = self._mailbox_arg(cmd.args[1])
        f = self.folder
        if dest_name == RELEASE:
            await self._release(targets)
            if move:
                f.expunge(targets, "release", self.user.name)
            self.sync()
            self._tagged(cmd.tag, "OK", f"{verb} completed: released")
            return
        if not self.store.exists(self.user.name, dest_name):
            raise No("[TRYCREATE] Mailbox does not exist")
        dest = self.store.folder(self.user.name, dest_name)
        pairs = f.copy_to(targets, dest)
        code = ""
        if pairs:
            code = (f"[COPYUID {dest.uidvalidity} {seq_text([a for a, _ in pairs])} "
                    f"{seq_text([b for _, b in pairs])}] ")
        if move:
            if code:
                self.untagged(f"OK {code}Moved")
            f.expunge([a for a, _ in pairs], "move", self.user.name)
            self.sync()
            self._tagged(cmd.tag, "OK", f"{verb} completed")
        else:
            if dest is f:
                self.sync()
            self._tagged(cmd.tag, "OK", f"{code}{verb} completed")

    async def _release(self, uids: list[int]) -> None:
        f = self.folder
        qids = []
        for u in uids:
            m = f.by_uid.get(u)
            if m is None:
                continue
            if self.store.meta(m.qid) is None:
                raise No("[CANNOT] Only quarantined messages can be released")
            qids.append(m.qid)
        if self.on_release is None:
            raise No("[CANNOT] Release is not available")
        for qid in dict.fromkeys(qids):
            try:
                await self.on_release(self.user.name, qid)
            except Exception as e:
                log.warning("imap release failed qid=%s user=%s: %s", qid, self.user.name, e)
                raise No("Release failed") from None
            log.info("imap release qid=%s user=%s ip=%s", qid, self.user.name, self.peer)


def _lazy_view(f: Folder, m: MessageInfo) -> Callable[[], MessageView]:
    cache: list[MessageView] = []

    def get() -> MessageView:
        if not cache:
            cache.append(MessageView(f.read(m)))
        return cache[0]
    return get


