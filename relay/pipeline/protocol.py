"""The filter protocol: stages, verdicts, the per-message context, the Filter base.

Filters (built-in in `filters/`, third-party by the `relay.filters` entry point) import
this module and libraries only, never relay.smtp, relay.queue or each other. A filter is
configured once (shared, `__init__(options, env)`) and called per stage with the
transaction's Context; it returns a frozen Verdict value and never raises on purpose
(the chain turns an exception or a timeout into the configured tempfail/continue).

Stages follow the SMTP dialogue (Haraka's hook names): connect, helo, mail, rcpt (once
per recipient), data (after the final dot, before the 250). Verdicts map onto Haraka's:
continue = CONT, accept = OK (skip the rest of this stage), reject = DENY (5xx),
tempfail = DENYSOFT (4xx), plus quarantine (hold in a mailbox) and discard (250, dropped).
"""

from __future__ import annotations

import email.parser
import email.policy
import enum
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.header import Header, decode_header
from email.message import Message
from typing import Any


class Stage(enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    QUARANTINE = "quarantine"
    DISCARD = "discard"


@dataclass(frozen=True)
class Verdict:
    """What a filter decided. Build with the class methods, not by hand."""

    action: Action = Action.CONTINUE
    code: int = 0                 # SMTP reply code for reject/tempfail
    enhanced: str = ""            # RFC 3463 code, e.g. "5.7.1"
    text: str = ""                # reply text: generic, leaks no configuration
    mailbox: str = ""             # quarantine: the mailbox (folder) to hold it in
    reason: str = ""              # for logs, quarantine header, metrics (bounded text)
    headers: tuple[tuple[str, str], ...] = ()   # prepended to the message
    route: str | None = None      # next hop to use ('[host]:port' or 'host:port')
    filter: str = ""              # set by the chain: who decided

    @classmethod
    def cont(cls, headers: tuple[tuple[str, str], ...] = (), route: str | None = None) -> Verdict:
        return cls(headers=tuple(headers), route=route)

    @classmethod
    def accept(cls, headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        return cls(Action.ACCEPT, headers=tuple(headers))

    @classmethod
    def reject(cls, text: str = "Message rejected", code: int = 550, enhanced: str = "5.7.1",
               reason: str = "") -> Verdict:
        assert 500 <= code <= 599 and enhanced.startswith("5.")
        return cls(Action.REJECT, code, enhanced, text, reason=reason or text)

    @classmethod
    def tempfail(cls, text: str = "Try again later", code: int = 451, enhanced: str = "4.7.1",
                 reason: str = "") -> Verdict:
        assert 400 <= code <= 499 and enhanced.startswith("4.")
        return cls(Action.TEMPFAIL, code, enhanced, text, reason=reason or text)

    @classmethod
    def quarantine(cls, mailbox: str, reason: str,
                   headers: tuple[tuple[str, str], ...] = ()) -> Verdict:
        return cls(Action.QUARANTINE, mailbox=mailbox, reason=reason, headers=tuple(headers))

    @classmethod
    def discard(cls, reason: str) -> Verdict:
        return cls(Action.DISCARD, reason=reason)


CONTINUE = Verdict()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(ip: str) -> IPAddress | None:
    """A client address as ipaddress; an IPv4-mapped IPv6 address (a dual-stack
    socket's view of an IPv4 client) as the IPv4 address it is. None if unparsable."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def header_text(value: Any) -> str:
    """A header value from ctx.headers() as text. The compat32 parser wraps 8-bit values
    (SMTPUTF8 mail, RFC 6532) in a Header whose str() loses them; take the raw octets as
    UTF-8. Encoded words are left alone: they never make an address."""
    if isinstance(value, Header):
        return "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p
                       for p, _ in decode_header(value))
    return str(value)


@dataclass(frozen=True)
class AuthResult:
    """One Authentication-Results entry (RFC 8601 2.2): method=result (comment) props."""

    method: str                   # spf, dkim, dmarc
    result: str                   # pass, fail, softfail, neutral, none, temperror, permerror
    props: tuple[tuple[str, str], ...] = ()   # e.g. (("smtp.mailfrom", "example.com"),)
    comment: str = ""


class DNSError(Exception):
    """A temporary DNS failure (timeout, SERVFAIL): callers answer temperror/4xx."""


class Resolver:
    """What filters may ask of DNS. relay.dns implements it with dnspython's async
    resolver; tests may pass another. Answers are lists of text (TXT strings joined,
    MX as 'pref host'); NXDOMAIN and NODATA both give [] unless `nxdomain` is asked for."""

    async def query(self, name: str, rdtype: str) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    async def exists(self, name: str) -> bool:  # pragma: no cover
        """True unless the name is NXDOMAIN (RFC 7208 'exists' and DMARC need this)."""
        raise NotImplementedError


@dataclass
class Context:
    """One SMTP transaction as a filter sees it. Connection facts persist over RSET;
    envelope facts are per transaction. Filters keep their own per-message state in
    `notes[their name]`, and publish authentication outcomes in `auth_results`."""

    client_ip: str
    client_port: int
    listener: str
    resolver: Resolver
    helo: str = ""
    tls: bool = False
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""
    trusted: bool = False         # from mynetworks or authenticated: may relay anywhere
    queue_id: str = ""
    mail_from: str = ""
    mail_params: Mapping[str, str | None] = field(default_factory=dict)
    rcpts: list[str] = field(default_factory=list)
    size: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    auth_results: list[AuthResult] = field(default_factory=list)
    # Installed by the session at end of DATA: returns the message as received
    # (header + body, CRLF line ends, no trace headers of ours).
    _load: Callable[[], Awaitable[bytes]] | None = None
    _message: bytes | None = None
    _headers: Message | None = None

    async def message(self) -> bytes:
        """The whole message (read once, shared by all filters). Mind its size."""
        if self._message is None:
            assert self._load is not None, "message() is only available at the data stage"
            self._message = await self._load()
        return self._message

    async def headers(self) -> Message:
        """The header block parsed once (lazily, headers only: bodies stay unparsed)."""
        if self._headers is None:
            raw = await self.message()
            end = raw.find(b"\r\n\r\n")
            head = raw if end < 0 else raw[: end + 2]
            self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        return self._headers

    def new_transaction(self) -> None:
        self.queue_id = ""
        self.mail_from = ""
        self.mail_params = {}
        self.rcpts = []
        self.size = 0
        self.notes = {}
        self.auth_results = []
        self._load = None
        self._message = None
        self._headers = None


@dataclass(frozen=True)
class FilterEnv:
    """What a filter gets at configuration time besides its own options."""

    hostname: str                 # our FQDN: authserv-id, Received-SPF
    resolver: Resolver
    # This process among the relay's workers, and a directory for state they share
    # (empty: none). A filter that counts (ratelimit) adds up all workers' counts there.
    worker: int = 0
    workers: int = 1
    shared_dir: str = ""


class Filter:
    """Base class. Override `on_<stage>` for the stages you handle and list them in
    `stages`; every hook is async and returns a Verdict (CONTINUE to pass)."""

    name: str = ""
    stages: frozenset[Stage] = frozenset()

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        self.options = options
        self.env = env

    async def on_connect(self, ctx: Context) -> Verdict:
        return CONTINUE

    async def on_helo(self, ctx: Context) -> Verdict:
        return CONTINUE

    async def on_mail(self, ctx: Context) -> Verdict:
        return CONTINUE

    async def on_rcpt(self, ctx: Context, rcpt: str) -> Verdict:
        return CONTINUE

    async def on_data(self, ctx: Context) -> Verdict:
        return CONTINUE

    async def close(self) -> None:
        """Release what __init__ took (sockets, files)."""
