"""POP3 protocol engine, sans-IO: bytes in, events and reply bytes out.

Takes the bytes a client sent (`receive_data`) and hands back events (`next_event`):
`Send` (reply bytes ready to write), `Login` (check these credentials), `Retrieve`
(stream this message), `StartTLS` (upgrade now), `Update` (apply these deletions).
The asyncio layer (relay.quarantine.pop3.server) does the I/O for each event and tells
the engine how it went (`login_succeeded`, `login_failed`, `tls_started`, ...); it never
parses a command itself. `BodyWriter` turns stored message bytes into a multi-line
response (byte-stuffing, TOP truncation) chunk by chunk, so large messages stream.

Trusts nothing from the client: lines are length-capped before they are buffered,
message numbers are range-checked, bad commands count towards a limit, and input that
arrives pipelined behind STLS is thrown away (the STARTTLS injection attack,
CVE-2011-0411 style). Trusts the maildrop listing the server hands over at login.

RFCs: 1939 (POP3), 2449 (CAPA, RESP-CODES, PIPELINING), 2595 (STLS), 5034 (SASL AUTH).
No asyncio here.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Sequence
from dataclasses import dataclass


class State(enum.Enum):
    """RFC 1939 section 3 session states (plus CLOSED: nothing more is read)."""

    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Send:
    """Write `data`; close the connection afterwards when `close` is set."""

    data: bytes
    close: bool = False


@dataclass(frozen=True)
class Login:
    """Check these credentials (off the event loop), then call `login_succeeded` with the
    maildrop listing, `login_failed` or `login_in_use`."""

    user: str
    password: str
    mechanism: str          # "USER" or "PLAIN"


@dataclass(frozen=True)
class Retrieve:
    """RETR (lines None) or TOP. Open the message, then write `retrieve_ok()` followed by
    a BodyWriter's output, or write `retrieve_failed()` if it is gone."""

    number: int
    key: str
    size: int
    lines: int | None


@dataclass(frozen=True)
class StartTLS:
    """Write `data` (the +OK), then do the TLS handshake and call `tls_started`."""

    data: bytes


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: remove these messages (keys), then write `update_done(ok)`
    and close."""

    keys: tuple[str, ...]


Event = Send | Login | Retrieve | StartTLS | Update


@dataclass(frozen=True)
class MessageInfo:
    """One message of the maildrop as the server lists it at login."""

    key: str        # the store's handle for the message (opaque here)
    uid: str        # UIDL: 1-70 chars in 0x21-0x7E, stable across sessions
    size: int       # exact octets RETR sends before byte-stuffing


@dataclass(frozen=True)
class Policy:
    # RFC 2449 section 4: a command line is at most 255 octets with CRLF. SASL
    # responses (RFC 5034 section 4) may be longer: a PLAIN response of a long name and
    # password in base64 fits in 1024 with room to spare.
    max_line: int = 1024
    max_errors: int = 10
    max_auth_failures: int = 3
    # Allow USER/PASS and AUTH PLAIN before TLS (implicit TLS, loopback, or configured).
    cleartext_login: bool = False
    tls_available: bool = False
    tls_active: bool = False
    greeting: str = "POP3 quarantine ready"
    implementation: str = "relay"


def _ok(text: str = "") -> bytes:
    return b"+OK" + (b" " + text.encode("ascii", "replace") if text else b"") + b"\r\n"


def _err(text: str) -> bytes:
    return b"-ERR " + text.encode("ascii", "replace") + b"\r\n"


class Connection:
    """One POP3 session's protocol state. Feed bytes, pull events."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = State.AUTHORIZATION
        self.tls_active = policy.tls_active
        self.user: str | None = None
        self._buf = bytearray()
        # Where the search for LF resumes: the buffer is scanned once, so a client
        # trickling a long line costs O(bytes), not O(bytes^2).
        self._scanned = 0
        self._discarding = False
        self._errors = 0
        self._auth_failures = 0
        self._sasl_pending = False
        self._busy = False                # an event awaits the server's answer
        self._messages: list[MessageInfo] = []
        self._deleted: set[int] = set()   # 0-based indexes marked by DELE

    # --- input ------------------------------------------------------------------------

    def greeting(self) -> bytes:
        return _ok(self.policy.greeting)

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self._buf += data

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def next_event(self) -> Event | _NeedData:
        """The next thing to do, or NEED_DATA. Not to be called while a Login, Retrieve,
        StartTLS or Update is unanswered (commands are answered strictly in order)."""
        if self._busy:
            raise RuntimeError("previous event not answered yet")
        while self.state is not State.CLOSED:
            line, too_long = self._next_line()
            if line is None:
                if too_long:
                    return self._error("line too long")
                return NEED_DATA
            event = self._dispatch(line)
            if event is not None:
                return event
        return NEED_DATA

    def _next_line(self) -> tuple[bytes | None, bool]:
        """(line without CRLF, False), (None, True) for a line over the limit, or
        (None, False) when more data is needed."""
        buf = self._buf
        while True:
            i = buf.find(b"\n", self._scanned)
            if i < 0:
                if len(buf) > self.policy.max_line:
                    # Drop what we have and keep dropping up to the next LF: an endless
                    # line never costs more memory than max_line.
                    started = not self._discarding
                    self._discarding = True
                    del buf[:]
                    self._scanned = 0
                    return None, started
                self._scanned = len(buf)
                return None, False
            line = bytes(buf[:i + 1])
            del buf[:i + 1]
            self._scanned = 0
            if self._discarding:
                self._discarding = False     # the tail of an over-long line: gone
                continue
            if len(line) > self.policy.max_line:
                return None, True
            return line.rstrip(b"\r\n"), False

    # --- dispatch ---------------------------------------------------------------------

    def _error(self, text: str) -> Send:
        self._errors += 1
        if self._errors >= self.policy.max_errors:
            self.state = State.CLOSED
            return Send(_err("too many errors, closing"), close=True)
        return Send(_err(text))

    def _dispatch(self, raw: bytes) -> Event | None:
        if self._sasl_pending:
            self._sasl_pending = False
            return self._sasl_response(raw)
        try:
            # UTF-8 only so that PASS may carry a non-ASCII password; verbs are ASCII.
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error("command is not valid UTF-8")
        if not line.isprintable():
            return self._error("control characters in command")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, f"_cmd_{verb}", None) if verb in _ALLOWED else None
        if handler is None:
            return self._error("unknown command")
        allowed = _ALLOWED.get(verb, ())
        if self.state not in allowed:
            return self._error(f"{verb} not allowed now")
        return handler(arg)

    # --- AUTHORIZATION ----------------------------------------------------------------

    def _login_allowed(self) -> bool:
        return self.tls_active or self.policy.cleartext_login

    def _cmd_CAPA(self, arg: str) -> Event:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._login_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.policy.tls_available and not self.tls_active:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {self.policy.implementation}")
        body = "".join(c + "\r\n" for c in caps)
        return Send(_ok("Capability list follows") + body.encode("ascii") + b".\r\n")

    def _cmd_STLS(self, arg: str) -> Event:
        if arg:
            return self._error("STLS takes no argument")
        if self.tls_active or not self.policy.tls_available:
            return self._error("TLS not available" if not self.tls_active
                               else "TLS already active")
        # RFC 2595 section 4 / CVE-2011-0411: anything pipelined after STLS was sent in
        # clear text and must not be run as if it came over TLS.
        del self._buf[:]
        self._scanned = 0
        self._busy = True
        return StartTLS(_ok("Begin TLS negotiation"))

    def tls_started(self) -> None:
        self._busy = False
        self.tls_active = True
        del self._buf[:]
        self._scanned = 0

    def _cmd_USER(self, arg: str) -> Event:
        if not self._login_allowed():
            return self._error("[AUTH] use STLS before logging in")
        if not arg or len(arg) > 255:
            return self._error("USER needs a name")
        self.user = arg
        return Send(_ok("send PASS"))

    def _cmd_PASS(self, arg: str) -> Event:
        if not self._login_allowed():
            return self._error("[AUTH] use STLS before logging in")
        if self.user is None:
            return self._error("USER first")
        user, self.user = self.user, None
        self._busy = True
        # RFC 1939 section 7: the password may contain spaces: it is the rest of the line.
        return Login(user, arg, "USER")

    def _cmd_APOP(self, arg: str) -> Event:
        return self._error("APOP not supported")

    def _cmd_AUTH(self, arg: str) -> Event:
        if not arg:
            # Pre-RFC 5034 clients probe with a bare AUTH: list the mechanisms.
            return Send(_ok("mechanisms follow") + b"PLAIN\r\n.\r\n")
        if not self._login_allowed():
            return self._error("[AUTH] use STLS before logging in")
        mech, _, initial = arg.partition(" ")
        if mech.upper() != "PLAIN":
            return self._error("unsupported mechanism")
        if initial:
            return self._sasl_response(initial.encode("utf-8"))
        self._sasl_pending = True
        return Send(b"+ \r\n")

    def _sasl_response(self, raw: bytes) -> Event:
        if raw == b"*":
            return self._error("authentication cancelled")
        if raw == b"=":
            raw = b""   # RFC 5034 section 4: '=' is an empty initial response
        try:
            decoded = base64.b64decode(raw, validate=True)
            parts = decoded.split(b"\0")
            if len(parts) != 3:
                raise ValueError
            authz, authc, password = (p.decode("utf-8") for p in parts)
        except (binascii.Error, ValueError):
            return self._error("malformed PLAIN response")
        if authz and authz != authc:
            return self._error("[AUTH] authorization identity not allowed")
        self._busy = True
        return Login(authc, password, "PLAIN")

    def login_succeeded(self, messages: Sequence[MessageInfo]) -> bytes:
        self._busy = False
        self._messages = list(messages)
        self._deleted.clear()
        self.state = State.TRANSACTION
        count, size = self._stat()
        return _ok(f"maildrop has {count} messages ({size} octets)")

    def login_failed(self) -> bytes:
        """Wrong name or password. Closes after policy.max_auth_failures."""
        self._busy = False
        self._auth_failures += 1
        if self._auth_failures >= self.policy.max_auth_failures:
            self.state = State.CLOSED
        return _err("[AUTH] invalid user name or password")

    def login_in_use(self) -> bytes:
        self._busy = False
        return _err("[IN-USE] maildrop already locked by another session")

    def login_unavailable(self) -> bytes:
        self._busy = False
        return _err("[SYS/TEMP] maildrop unavailable, try again later")

    # --- TRANSACTION ------------------------------------------------------------------

    def _stat(self) -> tuple[int, int]:
        live = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        return len(live), sum(m.size for m in live)

    def _number(self, text: str) -> int | str:
        """A message number as a 0-based index, or an error text."""
        if not text.isdigit() or not text.isascii() or len(text) > 9:
            return "invalid message number"
        n = int(text)
        if not 1 <= n <= len(self._messages):
            return "no such message"
        if n - 1 in self._deleted:
            return "message already deleted"
        return n - 1

    def _cmd_STAT(self, arg: str) -> Event:
        if arg:
            return self._error("STAT takes no argument")
        count, size = self._stat()
        return Send(_ok(f"{count} {size}"))

    def _scan(self, arg: str, render: str) -> Event:
        if arg:
            idx = self._number(arg)
            if isinstance(idx, str):
                return self._error(idx)
            return Send(_ok(render.format(n=idx + 1, m=self._messages[idx])))
        lines = [render.format(n=i + 1, m=m) + "\r\n" for i, m in enumerate(self._messages)
                 if i not in self._deleted]
        return Send(_ok() + "".join(lines).encode("ascii") + b".\r\n")

    def _cmd_LIST(self, arg: str) -> Event:
        return self._scan(arg, "{n} {m.size}")

    def _cmd_UIDL(self, arg: str) -> Event:
        return self._scan(arg, "{n} {m.uid}")

    def _cmd_RETR(self, arg: str) -> Event:
        idx = self._number(arg)
        if isinstance(idx, str):
            return self._error(idx)
        m = self._messages[idx]
        self._busy = True
        return Retrieve(idx + 1, m.key, m.size, None)

    def _cmd_TOP(self, arg: str) -> Event:
        num, _, lines = arg.partition(" ")
        idx = self._number(num)
        if isinstance(idx, str):
            return self._error(idx)
        if not lines.isdigit() or not lines.isascii() or len(lines) > 9:
            return self._error("TOP needs a non-negative line count")
        m = self._messages[idx]
        self._busy = True
        return Retrieve(idx + 1, m.key, m.size, int(lines))

    def retrieve_ok(self, size: int) -> bytes:
        """The status line before a message body; `size` is the stored size."""
        self._busy = False
        return _ok(f"{size} octets")

    def retrieve_failed(self) -> bytes:
        self._busy = False
        return _err("[SYS/TEMP] message no longer available")

    def _cmd_DELE(self, arg: str) -> Event:
        idx = self._number(arg)
        if isinstance(idx, str):
            return self._error(idx)
        self._deleted.add(idx)
        return Send(_ok(f"message {idx + 1} deleted"))

    def _cmd_RSET(self, arg: str) -> Event:
        self._deleted.clear()
        count, size = self._stat()
        return Send(_ok(f"maildrop has {count} messages ({size} octets)"))

    def _cmd_NOOP(self, arg: str) -> Event:
        return Send(_ok())

    def _cmd_QUIT(self, arg: str) -> Event:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            self._busy = True
            keys = tuple(self._messages[i].key for i in sorted(self._deleted))
            return Update(keys)
        self.state = State.CLOSED
        return Send(_ok("bye"), close=True)

    def update_done(self, ok: bool) -> bytes:
        self._busy = False
        self.state = State.CLOSED
        if ok:
            return _ok("bye")
        # RFC 1939 QUIT: "-ERR some deleted messages not removed".
        return _err("[SYS/TEMP] some deleted messages not removed")


_ALLOWED: dict[str, tuple[State, ...]] = {
    "CAPA": (State.AUTHORIZATION, State.TRANSACTION),
    "QUIT": (State.AUTHORIZATION, State.TRANSACTION),
    "STLS": (State.AUTHORIZATION,),
    "USER": (State.AUTHORIZATION,),
    "PASS": (State.AUTHORIZATION,),
    "APOP": (State.AUTHORIZATION,),
    "AUTH": (State.AUTHORIZATION,),
    "STAT": (State.TRANSACTION,),
    "LIST": (State.TRANSACTION,),
    "UIDL": (State.TRANSACTION,),
    "RETR": (State.TRANSACTION,),
    "TOP": (State.TRANSACTION,),
    "DELE": (State.TRANSACTION,),
    "RSET": (State.TRANSACTION,),
    "NOOP": (State.TRANSACTION,),
}


class BodyWriter:
    """Stored message bytes -> a multi-line response body, chunk by chunk.

    RFC 1939 section 3: a line starting with '.' gets one more '.', and the response
    ends with CRLF '.' CRLF. Lines are taken to end at LF (bare or after CR) so a bare
    LF followed by '.' can never look like the terminator to a client that splits on LF;
    every other byte passes through unchanged. With `lines` set (TOP), only the header,
    the blank line and that many body lines are sent.
    """

    def __init__(self, lines: int | None = None) -> None:
        self._at_line_start = True
        self._top = lines
        self._in_head = True
        self._partial = bytearray()     # TOP only: the current incomplete line
        self._done = False

    @property
    def done(self) -> bool:
        """TOP has sent all it will: the caller may stop reading."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        if self._done or not chunk:
            return b""
        if self._top is not None:
            return self._feed_top(chunk)
        return self._stuff(chunk)

    def _stuff(self, chunk: bytes) -> bytes:
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def _feed_top(self, chunk: bytes) -> bytes:
        out = bytearray()
        self._partial += chunk
        start = 0
        buf = self._partial
        while not self._done:
            i = buf.find(b"\n", start)
            if i < 0:
                break
            line = bytes(buf[start:i + 1])
            start = i + 1
            out += self._stuff(line)
            if self._in_head:
                if line in (b"\r\n", b"\n"):
                    self._in_head = False
                    if self._top == 0:
                        self._done = True
            else:
                self._top -= 1
                if self._top == 0:
                    self._done = True
        del buf[:start]
        if self._done:
            del buf[:]
        return bytes(out)

    def finish(self) -> bytes:
        """The rest (a last line without LF) and the terminator."""
        out = b""
        if self._top is not None and not self._done and self._partial:
            out = self._stuff(bytes(self._partial))
            self._partial.clear()
        self._done = True
        if not self._at_line_start:
            out += b"\r\n"
        return out + b".\r\n"


def render_message(data: bytes, lines: int | None = None) -> bytes:
    """The whole multi-line body of RETR (lines None) or TOP for `data` at once."""
    w = BodyWriter(lines)
    return w.feed(data) + w.finish()
