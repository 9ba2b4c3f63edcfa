"""SMTP AUTH primitives: password hashes, the users file, SASL PLAIN/LOGIN, throttling.

Takes the users file (`user:$scrypt$...` lines made by `relay passwd`) and the base64
lines a client sends after `AUTH PLAIN` / `AUTH LOGIN`; hands on decoded credentials,
a yes/no from `Authenticator.check`, how long to stall a client that keeps guessing,
and a user name made safe for a Received header comment.

Trusts nothing from the client: base64 is strict, fields are length-limited and a name
with CR, LF or NUL is refused (it would end up in headers and logs). The users file is
trusted as configuration but still parsed strictly, and hash parameters read from it
are capped so a bad line cannot make one login eat the machine's memory.

Sans-IO except `Authenticator.check`, which runs scrypt in a thread: it costs tens of
milliseconds of CPU by design and must not stall the event loop.

RFCs: 4954 (SMTP AUTH; '*' cancels, '=' is an empty response), 4616 (PLAIN),
4648 (base64); LOGIN is the de facto draft-murchison-sasl-login mechanism.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import enum
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

# --- password hashes --------------------------------------------------------------------

# scrypt with n=2**14, r=8, p=1 (the RFC 7914 interactive-login example): ~16 MiB and
# tens of ms per check, which makes a stolen users file slow to brute-force.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
# Stored parameters are honoured only up to this memory (128 * n * r * p bytes).
_MAX_SCRYPT_MEM = 64 * 1024 * 1024


def hash_password(pw: str) -> str:
    """'$scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>' with a fresh 16-byte salt."""
    salt = os.urandom(SALT_BYTES)
    dk = _scrypt(pw.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return (f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}$"
            f"{_b64e(salt)}${_b64e(dk)}")


def verify_password(pw: str, stored: str) -> bool:
    """True if `pw` matches `stored`; any unknown or malformed format is False."""
    parsed = _parse_hash(stored)
    if parsed is None:
        return False
    n, r, p, salt, want = parsed
    try:
        got = _scrypt(pw.encode("utf-8"), salt, n, r, p, len(want))
    except (ValueError, MemoryError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(got, want)  # constant time: no early exit on a mismatch


def is_valid_hash(stored: str) -> bool:
    """True if `stored` is a hash this module can check (for config validation)."""
    return _parse_hash(stored) is not None


def _scrypt(pw: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=128 * n * r * p + 1024 * 1024)


def _b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _b64d_lenient_padding(s: str) -> bytes:
    # Other tools (PHC strings, passlib) drop the '=' padding; accept both spellings.
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    if not isinstance(stored, str):
        return None
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "scrypt":
        return None
    params: dict[str, int] = {}
    for item in parts[2].split(","):
        key, eq, val = item.partition("=")
        if not eq or key in params or key not in ("n", "r", "p"):
            return None
        if not (val.isascii() and val.isdigit() and len(val) <= 8):
            return None
        params[key] = int(val)
    if len(params) != 3:
        return None
    n, r, p = params["n"], params["r"], params["p"]
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > _MAX_SCRYPT_MEM:
        return None
    try:
        salt = _b64d_lenient_padding(parts[3])
        want = _b64d_lenient_padding(parts[4])
    except (binascii.Error, ValueError):
        return None
    if len(salt) < 8 or not 16 <= len(want) <= 64:
        return None
    return n, r, p, salt, want


# --- the users file -------------------------------------------------------------------

def load_users(path: str | os.PathLike) -> dict[str, str]:
    """Read 'user:hash' lines ('#' comments and blank lines allowed).

    Raises ValueError('<path>:<line>: ...') for a malformed line, a bad hash or a
    duplicate user, so a typo stops startup instead of locking someone out silently.
    """
    users: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        user = user.strip()
        stored = stored.strip()
        where = f"{path}:{no}"
        if not sep or not user:
            raise ValueError(f"{where}: expected 'user:hash'")
        if not _name_ok(user) or any(c.isspace() for c in user):
            raise ValueError(f"{where}: user name has a space or control character")
        if not is_valid_hash(stored):
            raise ValueError(f"{where}: not a '$scrypt$...' hash (make one with 'relay passwd')")
        if user in users:
            raise ValueError(f"{where}: duplicate user {user!r}")
        users[user] = stored
    return users


# --- checking and throttling --------------------------------------------------------------

_dummy_hash: str | None = None


def dummy_hash() -> str:
    """A real scrypt hash of a random secret, made once: check unknown users against it
    so they cost the same time as known ones (timing must not tell which names exist)."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(os.urandom(16).hex())
    return _dummy_hash


def _verify_or_dummy(password: str, stored: str | None) -> bool:
    # In the worker thread: even making the dummy hash once must not touch the loop.
    return verify_password(password, stored if stored is not None else dummy_hash())


class Throttle:
    """Slows password guessing per client: an IPv4 address or an IPv6 /64 (one host
    usually owns a whole /64). Each failure within `window` seconds doubles the delay
    from `base_delay` up to `max_delay`; a success or a quiet `window` clears it. At most
    `max_tracked` clients are remembered (least recently failed are forgotten), so a
    spray from many addresses cannot grow memory without bound. SMTP AUTH, IMAP and
    POP3 each keep one."""

    def __init__(self, *, base_delay: float = 1.0, max_delay: float = 30.0,
                 window: float = 900.0, max_tracked: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.max_tracked = max_tracked
        self._clock = clock
        # key -> (failures, time of the last one); order = least recent first.
        self._failures: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict())

    def delay_for(self, ip: str) -> float:
        """Seconds to wait before answering this client's next attempt."""
        entry = self._entry(throttle_key(ip))
        if entry is None:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** min(entry[0] - 1, 32))

    async def wait(self, ip: str) -> None:
        if d := self.delay_for(ip):
            await asyncio.sleep(d)

    def record_failure(self, ip: str) -> None:
        key = throttle_key(ip)
        entry = self._entry(key)
        self._failures[key] = ((entry[0] if entry else 0) + 1, self._clock())
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def record_success(self, ip: str) -> None:
        self._failures.pop(throttle_key(ip), None)

    def _entry(self, key: str) -> tuple[int, float] | None:
        entry = self._failures.get(key)
        if entry is not None and self._clock() - entry[1] > self.window:
            del self._failures[key]
            return None
        return entry


class Authenticator:
    """The configured SMTP AUTH users plus a per-client failure Throttle."""

    def __init__(self, users: Mapping[str, str], *, base_delay: float = 1.0,
                 max_delay: float = 30.0, window: float = 900.0, max_tracked: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users = dict(users)
        self.throttle = Throttle(base_delay=base_delay, max_delay=max_delay, window=window,
                                 max_tracked=max_tracked, clock=clock)
        self.delay_for = self.throttle.delay_for
        self.record_failure = self.throttle.record_failure
        self.record_success = self.throttle.record_success

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> Authenticator:
        return cls(load_users(path), **kwargs)

    def __bool__(self) -> bool:
        return bool(self._users)

    async def check(self, user: str, password: str) -> bool:
        stored = self._users.get(user)
        ok = await asyncio.to_thread(_verify_or_dummy, password, stored)
        return ok and stored is not None

    async def attempt(self, ip: str, user: str, password: str) -> bool:
        """check() plus the throttle: a failure is answered only after delay_for(ip)."""
        if await self.check(user, password):
            self.record_success(ip)
            return True
        self.record_failure(ip)
        await asyncio.sleep(self.delay_for(ip))
        return False


def throttle_key(ip: str) -> str:
    """The unit a throttle counts: an IPv4 address, or an IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


# --- SASL decoders (sans-IO) -------------------------------------------------------------

class AuthSyntaxError(ValueError):
    """Malformed SASL data: the caller replies 501 5.5.2 and the exchange ends."""


class AuthCancelled(AuthSyntaxError):
    """The client sent '*' (RFC 4954 4): reply 501 5.0.0 and end the exchange."""


# RFC 4954 4: servers must take an AUTH line of at least 12288 octets; beyond that
# a 'response' is noise, not credentials.
MAX_RESPONSE = 12288
MAX_FIELD = 255  # RFC 4616 2: authcid and passwd are at most 255 octets


def _decode_response(text: str) -> bytes:
    text = text.strip()
    if text == "*":
        raise AuthCancelled("authentication cancelled")
    if text == "=":
        return b""  # RFC 4954 4: '=' is an empty initial response
    if len(text) > MAX_RESPONSE:
        raise AuthSyntaxError("response too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AuthSyntaxError("invalid base64") from None


def _utf8(b: bytes, what: str) -> str:
    if len(b) > MAX_FIELD:
        raise AuthSyntaxError(f"{what} too long")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthSyntaxError(f"{what} is not UTF-8") from None


def _name_ok(name: str) -> bool:
    return not any(c in name for c in "\r\n\0")


def decode_plain(b64: str) -> tuple[str, str, str]:
    """RFC 4616: base64('[authzid] NUL authcid NUL passwd') -> (authzid, user, password).

    An authzid other than '' or the user is the caller's to refuse (acting as someone
    else is not something this relay grants).
    """
    return parse_plain(_decode_response(b64))


def parse_plain(raw: bytes) -> tuple[str, str, str]:
    """decode_plain() for a response already base64-decoded (aiosmtpd's challenge_auth)."""
    fields = raw.split(b"\0")
    if len(fields) != 3:
        raise AuthSyntaxError("PLAIN needs exactly 'authzid NUL user NUL password'")
    authzid, user, password = (_utf8(f, w) for f, w in zip(
        fields, ("authzid", "user name", "password"), strict=True))
    if not user or not password:
        raise AuthSyntaxError("empty user name or password")
    if not _name_ok(user) or not _name_ok(authzid):
        raise AuthSyntaxError("user name has CR, LF or NUL")
    return authzid, user, password


def parse_login_user(raw: bytes) -> str:
    """A LOGIN user name, base64-decoded: UTF-8, 1-255 octets, no CR, LF or NUL."""
    user = _utf8(raw, "user name")
    if not user:
        raise AuthSyntaxError("empty user name")
    if not _name_ok(user):
        raise AuthSyntaxError("user name has CR, LF or NUL")
    return user


def parse_login_password(raw: bytes) -> str:
    """A LOGIN password, base64-decoded: UTF-8, at most 255 octets."""
    return _utf8(raw, "password")


class LoginState(enum.Enum):
    USER = "user"
    PASSWORD = "password"
    DONE = "done"


class LoginSASL:
    """AUTH LOGIN as a tiny state machine: USER -> PASSWORD -> DONE.

        sasl = LoginSASL(initial_response)      # the text after 'AUTH LOGIN', or None
        challenge = sasl.challenge
        while challenge is not None:
            reply f"334 {challenge}"; challenge = sasl.feed(next client line)
        user, password = sasl.credentials

    feed() raises AuthSyntaxError (AuthCancelled for '*') and the exchange is over.
    """

    USER_CHALLENGE = "VXNlcm5hbWU6"      # base64("Username:")
    PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64("Password:")

    def __init__(self, initial_response: str | None = None) -> None:
        self.state = LoginState.USER
        self._user = ""
        self._password = ""
        if initial_response is not None:
            self.feed(initial_response)

    @property
    def challenge(self) -> str | None:
        """The base64 text for the next 334 reply, or None when both answers are in."""
        if self.state is LoginState.USER:
            return self.USER_CHALLENGE
        if self.state is LoginState.PASSWORD:
            return self.PASSWORD_CHALLENGE
        return None

    def feed(self, line: str) -> str | None:
        if self.state is LoginState.DONE:
            raise AuthSyntaxError("LOGIN exchange is already complete")
        value = _decode_response(line)
        if self.state is LoginState.USER:
            self._user = parse_login_user(value)
            self.state = LoginState.PASSWORD
        else:
            self._password = parse_login_password(value)
            self.state = LoginState.DONE
        return self.challenge

    @property
    def credentials(self) -> tuple[str, str]:
        if self.state is not LoginState.DONE:
            raise RuntimeError("LOGIN exchange not complete")
        return self._user, self._password


# --- headers ------------------------------------------------------------------------------

_HEADER_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - set("()\\")


def sanitize_for_header(s: str, max_len: int = 64) -> str:
    """Keep only printable ASCII that cannot end or nest a Received comment (RFC 5322
    3.2.2: no parentheses, backslashes, CR, LF, NUL or spaces), cut to max_len."""
    return "".join(c for c in s if c in _HEADER_SAFE)[:max_len]
