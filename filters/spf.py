"""SPF: RFC 7208 check_host() over async DNS, and the filter that applies it at MAIL.

Takes the client IP, the MAIL FROM address (or, when it is null, the HELO identity
postmaster@<helo>, RFC 7208 2.4) and asks DNS through the pipeline's Resolver only.
Hands on a Verdict per the configured action for the result (defaults: fail -> 550
5.7.23, temperror -> 451 4.7.24, RFC 7372), a Received-SPF header (RFC 7208 9.1), an
AuthResult("spf", ...) for Authentication-Results (RFC 8601) and the SPFResult in
ctx.notes["spf"] for later filters (DMARC).

Trusts nothing it reads from DNS or the client: records are parsed completely before
evaluation (4.6: a syntax error anywhere is permerror), DNS-querying terms are limited
to 10, void lookups to 2, MX and PTR names to 10 (4.6.4), names over DNS limits are
treated as non-existent rather than sent, and text that reaches a header or a reply is
reduced to printable ASCII. Trusted clients (mynetworks, authenticated) are skipped.
RFCs: 7208 (SPF), 7372 (enhanced codes), 8601 (Authentication-Results).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from relay.config import ConfigError, Duration, parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    AuthResult,
    Context,
    DNSError,
    Filter,
    FilterEnv,
    Resolver,
    Stage,
    Verdict,
)

log = logging.getLogger("relay.filters.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class SPFError(Exception):
    result = "permerror"


class PermError(SPFError):
    """The domain's policy is broken (syntax, limits): RFC 7208 2.6.7."""


class TempError(SPFError):
    """A DNS failure while evaluating: RFC 7208 2.6.6."""
    result = "temperror"


@dataclass(frozen=True)
class SPFResult:
    result: str                   # one of RESULTS
    domain: str                   # the <domain> check_host() began with
    sender: str                   # the <sender> (postmaster@helo for the HELO identity)
    identity: str = "mailfrom"    # mailfrom or helo
    mechanism: str = ""           # the term that decided ("default" when none matched)
    explanation: str = ""         # fail only: exp= text or the default explanation
    problem: str = ""             # permerror/temperror: what went wrong


# --- record syntax (RFC 7208 4.6, 5, 6, 7, 12) -------------------------------------

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_NAME = r"[A-Za-z][A-Za-z0-9\-_.]*"
_MODIFIER_RE = re.compile(rf"({_NAME})=(.*)", re.S)
_DIRECTIVE_RE = re.compile(rf"([+\-~?]?)({_NAME})(.*)", re.S)
_CIDR = r"(0|[1-9][0-9]*)"       # leading zeros refused, as in ip4-network
_DUAL_RE = re.compile(rf"(?::(.*?))?(?:/{_CIDR})?(?://{_CIDR})?", re.S)
_IP4_RE = re.compile(rf":([0-9.]+)(?:/{_CIDR})?")
_IP6_RE = re.compile(rf":([0-9A-Fa-f:.]+)(?:/{_CIDR})?")
_MACRO_RE = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
_TOPLABEL_RE = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")
_DNS_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = _DNS_LETTERS | frozenset("crt")   # 7.3: c, r, t only in explanation text


@dataclass(frozen=True)
class Macro:
    letter: str                   # lower-case macro letter
    digits: int                   # 0 = all parts
    reverse: bool
    delimiters: str
    escape: bool                  # upper-case letter: URL-escape the value (7.3)


Tokens = tuple[str | Macro, ...]


@dataclass(frozen=True)
class Mechanism:
    result: str                   # qualifier as a result name
    kind: str                     # all include a mx ptr ip4 ip6 exists
    text: str                     # the term as written, for Received-SPF
    domain: Tokens | None = None  # parsed domain-spec; None = the current <domain>
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class Record:
    mechanisms: tuple[Mechanism, ...]
    redirect: Tokens | None = None
    exp: Tokens | None = None


def parse_macro_string(text: str, *, letters: frozenset[str] = _DNS_LETTERS,
                       space: bool = False, domain_end: bool = False) -> Tokens:
    """Tokens of a macro-string (7.1); with domain_end it must be a domain-spec."""
    out: list[str | Macro] = []
    lit: list[str] = []
    tail_start = 0          # where the literal run after the last %-sequence begins
    ends_with_expand = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%":
            nxt = text[i + 1:i + 2]
            if nxt in ("%", "_", "-"):
                lit.append({"%": "%", "_": " ", "-": "%20"}[nxt])
                i += 2
            elif nxt == "{":
                m = _MACRO_RE.match(text, i)
                if not m or m.group(1).lower() not in letters:
                    raise PermError(f"bad macro at {text[i:i + 8]!r}")
                digits = int(m.group(2)) if m.group(2) else 0
                if m.group(2) and digits == 0:
                    raise PermError("macro transformer digit must be nonzero")
                if lit:
                    out.append("".join(lit))
                    lit = []
                letter = m.group(1)
                out.append(Macro(letter.lower(), digits, bool(m.group(3)), m.group(4),
                                 letter.isupper()))
                i = m.end()
            else:
                raise PermError(f"bare '%' in {text!r}")
            ends_with_expand = True
            tail_start = i
        elif "\x21" <= c <= "\x7e" or (space and c == " "):
            lit.append(c)
            ends_with_expand = False
            i += 1
        else:
            raise PermError(f"invalid character {c!r}")
    if lit:
        out.append("".join(lit))
    if domain_end:
        if not text:
            raise PermError("empty domain-spec")
        if not ends_with_expand:
            # domain-end = ( "." toplabel [ "." ] ) / macro-expand, checked before
            # expansion (7.1): the toplabel must be literal text.
            tail = text[tail_start:]
            if tail.endswith("."):
                tail = tail[:-1]
            dot = tail.rfind(".")
            if dot < 0 or not _TOPLABEL_RE.fullmatch(tail[dot + 1:]):
                raise PermError(f"invalid domain-spec {text!r}")
    return tuple(out)


def _cidr(value: str | None, limit: int, default: int) -> int:
    if value is None:
        return default
    v = int(value)
    if v > limit:
        raise PermError(f"CIDR length {v} over {limit}")
    return v


def _parse_directive(term: str) -> Mechanism:
    m = _DIRECTIVE_RE.fullmatch(term)
    if not m:
        raise PermError(f"unknown term {term!r}")
    qual, name, rest = m.group(1), m.group(2).lower(), m.group(3)
    result = _QUALIFIERS[qual or "+"]
    if rest and rest[0] not in ":/":
        raise PermError(f"unknown mechanism {term!r}")
    if name == "all":
        if rest:
            raise PermError(f"'all' takes no argument: {term!r}")
        return Mechanism(result, name, term)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise PermError(f"{name} needs ':domain': {term!r}")
        return Mechanism(result, name, term, parse_macro_string(rest[1:], domain_end=True))
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise PermError(f"ptr takes no CIDR: {term!r}")
        dom = parse_macro_string(rest[1:], domain_end=True) if rest else None
        return Mechanism(result, name, term, dom)
    if name in ("a", "mx"):
        d = _DUAL_RE.fullmatch(rest)
        if not d:
            raise PermError(f"bad {name} arguments: {term!r}")
        dom = parse_macro_string(d.group(1), domain_end=True) if d.group(1) is not None else None
        return Mechanism(result, name, term, dom, cidr4=_cidr(d.group(2), 32, 32),
                         cidr6=_cidr(d.group(3), 128, 128))
    if name in ("ip4", "ip6"):
        d = (_IP4_RE if name == "ip4" else _IP6_RE).fullmatch(rest)
        if not d:
            raise PermError(f"bad {name} network: {term!r}")
        try:
            addr = (ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address)(d.group(1))
        except ValueError:
            raise PermError(f"bad {name} address: {term!r}") from None
        bits = _cidr(d.group(2), addr.max_prefixlen, addr.max_prefixlen)
        return Mechanism(result, name, term,
                         net=ipaddress.ip_network(f"{addr}/{bits}", strict=False))
    raise PermError(f"unknown mechanism {name!r}")


def parse_record(text: str) -> Record:
    """A selected 'v=spf1' record -> Record; any syntax error raises PermError (4.6).
    Parsed records are cached; long ones are not, so a few hostile 64 KiB TXT answers
    cannot fill memory through the cache."""
    return _parse_cached(text) if len(text) <= 1024 else _parse_record(text)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Record:
    return _parse_record(text)


def _parse_record(text: str) -> Record:
    if not text.isascii():
        raise PermError("non-ASCII characters in record")   # 3.1: 7-bit policies only
    mechanisms: list[Mechanism] = []
    mods: dict[str, Tokens] = {}
    for term in text.split(" ")[1:]:      # 4.6.1: terms are separated by SP only
        if not term:
            continue
        m = _MODIFIER_RE.fullmatch(term)
        if m:
            name = m.group(1).lower()
            if name in ("redirect", "exp"):
                if name in mods:
                    raise PermError(f"{name}= given twice")   # 6: at most once each
                mods[name] = parse_macro_string(m.group(2), domain_end=True)
            else:
                # Unknown modifiers are ignored but must be valid macro-strings (A).
                parse_macro_string(m.group(2), letters=_EXP_LETTERS)
            continue
        mechanisms.append(_parse_directive(term))
    return Record(tuple(mechanisms), mods.get("redirect"), mods.get("exp"))


def select_record(texts: list[str]) -> str | None:
    """The one SPF record among a name's TXT strings (4.5); None if there is none."""
    found = [t for t in texts if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
    if len(found) > 1:
        raise PermError("more than one SPF record")
    return found[0] if found else None


def valid_name(name: str) -> bool:
    """Can this be asked of DNS? Longer labels or empty ones are 'non-existent' (4.3)."""
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if not all(0 < len(lb) <= 63 for lb in labels):
        return False
    if not name.isascii():
        try:
            name.encode("idna")
        except UnicodeError:
            return False
    return True


def _strip_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


# --- check_host() (RFC 7208 4) -------------------------------------------------------

@dataclass
class _Pending:
    """A fail's exp= to expand once the final result is known (6.2: the exp of the
    record whose mechanism failed; include's inner records never supply one)."""

    exp: Tokens | None
    domain: str


class _Check:
    """State of one check_host() evaluation: the counters of 4.6.4 span the whole
    evaluation, including every include and redirect."""

    def __init__(self, checker: SPFChecker, resolver: Resolver, ip: IP, sender: str,
                 helo: str) -> None:
        self.c = checker
        self.r = resolver
        self.ip = ip
        self.sender = sender
        self.local, _, self.sender_domain = sender.rpartition("@")
        self.helo = helo
        self.lookups = 0
        self.voids = 0
        self._ptr_names: list[str] | None = None

    # DNS, with the limits and error mapping in one place.
    def _count(self) -> None:
        self.lookups += 1
        if self.lookups > self.c.max_lookups:
            raise PermError(f"more than {self.c.max_lookups} DNS-querying terms")

    def _void(self, answers: list[Any]) -> None:
        if not answers:
            self.voids += 1
            if self.voids > self.c.max_void:
                raise PermError(f"more than {self.c.max_void} void lookups")

    async def _query(self, name: str, rdtype: str) -> list[str]:
        if not valid_name(name):
            return []
        try:
            return await self.r.query(name, rdtype)
        except DNSError as e:
            raise TempError(f"DNS {rdtype} {name}: {e}") from None

    async def _addresses(self, name: str) -> list[IP]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        out = []
        for a in await self._query(name, rdtype):
            try:
                out.append(ipaddress.ip_address(a))
            except ValueError:
                continue
        return out

    def _in(self, addrs: list[IP], m: Mechanism) -> bool:
        bits = m.cidr4 if self.ip.version == 4 else m.cidr6
        net = ipaddress.ip_network(f"{self.ip}/{bits}", strict=False)
        return any(a.version == self.ip.version and a in net for a in addrs)

    async def validated_names(self, suffix: str | None = None) -> list[str]:
        """PTR names of the client that resolve back to it (5.5), at most 10 names
        looked at (4.6.4); with `suffix`, only names equal to or under it."""
        try:
            names = await self.r.query(self.ip.reverse_pointer, "PTR")
        except DNSError:
            return []       # 5.5: a PTR lookup error means no match
        out = []
        for name in names[:10]:
            name = _strip_dot(name)
            low = name.lower()
            if suffix is not None and not (low == suffix or low.endswith("." + suffix)):
                continue
            try:
                addrs = await self._addresses(name)
            except TempError:
                continue    # 5.5: a failed address lookup skips that name
            if self.ip in addrs:
                out.append(name)
        return out

    async def _p(self, domain: str) -> str:
        """The 'p' macro (7.3): a validated name, preferring <domain> or below it."""
        if self._ptr_names is None:
            self._ptr_names = await self.validated_names()
        d = domain.lower()
        for name in self._ptr_names:
            if name.lower() == d or name.lower().endswith("." + d):
                return name
        return self._ptr_names[0] if self._ptr_names else "unknown"

    # Macros (7).
    async def expand(self, tokens: Tokens, domain: str) -> str:
        parts = []
        for t in tokens:
            if isinstance(t, str):
                parts.append(t)
                continue
            value = await self._macro_value(t.letter, domain)
            if t.digits or t.reverse or t.delimiters:
                split = re.split("[" + re.escape(t.delimiters or ".") + "]", value)
                if t.reverse:
                    split.reverse()
                if t.digits:
                    split = split[-t.digits:]
                value = ".".join(split)
            if t.escape:
                value = urllib.parse.quote(value, safe="")
            parts.append(value)
        return "".join(parts)

    async def _macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(self.ip.exploded.replace(":", "").upper())
        if letter == "p":
            return await self._p(domain)
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.c.hostname
        if letter == "t":
            return str(int(time.time()))
        raise PermError(f"unknown macro {letter!r}")  # pragma: no cover (parser refuses)

    async def target(self, spec: Tokens | None, domain: str) -> str:
        """A domain-spec expanded for a query: 253-octet truncation from the left (7.3)."""
        if spec is None:
            return domain
        name = await self.expand(spec, domain)
        name = _strip_dot(name)
        while len(name) > 253:
            _, _, name = name.partition(".")
        return name

    # The evaluation.
    async def check(self, domain: str) -> tuple[str, str, _Pending | None]:
        """check_host() for <domain>: (result, deciding term, pending explanation)."""
        if not valid_name(domain) or "." not in domain:
            return "none", "", None
        try:
            texts = await self.r.query(domain, "TXT")
        except DNSError as e:
            raise TempError(f"DNS TXT {domain}: {e}") from None
        text = select_record(texts)
        if text is None:
            return "none", "", None
        record = parse_record(text)
        for m in record.mechanisms:
            if await self._match(m, domain):
                pending = _Pending(record.exp, domain) if m.result == "fail" else None
                return m.result, m.text, pending
        if record.redirect is not None:
            # 6.1: only when no mechanism matched; the target replaces <domain>.
            self._count()
            target = await self.target(record.redirect, domain)
            if not valid_name(target):
                raise PermError(f"redirect target {target!r} is not a domain")
            result, mech, pending = await self.check(target)
            if result == "none":
                raise PermError(f"redirect target {target} has no SPF record")
            return result, mech, pending
        return "neutral", "default", None    # 4.7

    async def _match(self, m: Mechanism, domain: str) -> bool:
        k = m.kind
        if k == "all":
            return True
        if k in ("ip4", "ip6"):
            assert m.net is not None
            # 5.6: ip4 never matches an IPv6 client and vice versa (mapped -> v4).
            return self.ip.version == m.net.version and self.ip in m.net
        self._count()
        target = await self.target(m.domain, domain)
        if k == "include":
            result, _, _ = await self.check(target)
            if result == "none":
                raise PermError(f"include:{target} has no SPF record")   # 5.2
            return result == "pass"
        if k == "a":
            addrs = await self._addresses(target)
            self._void(addrs)
            return self._in(addrs, m)
        if k == "mx":
            mxs = await self._query(target, "MX")
            self._void(mxs)
            hosts = [h for h in (_strip_dot(x.split(None, 1)[-1]) for x in mxs)
                     if h and h not in (".", "@")]     # null MX (RFC 7505) matches nothing
            if len(hosts) > 10:
                raise PermError(f"more than 10 MX names for {target}")  # 4.6.4
            for host in hosts:
                if self._in(await self._addresses(host), m):
                    return True
            return False
        if k == "ptr":
            names = await self.validated_names(target.lower())
            return bool(names)
        if k == "exists":
            # 5.7: an A query whatever the client's address family.
            answers = await self._query(target, "A")
            self._void(answers)
            return bool(answers)
        raise PermError(f"unknown mechanism {k}")  # pragma: no cover (parser refuses)

    async def explain(self, pending: _Pending | None) -> str:
        """6.2: the exp= text, or the default when anything about it goes wrong."""
        if pending is not None and pending.exp is not None:
            try:
                target = await self.target(pending.exp, pending.domain)
                texts = await self._query(target, "TXT")
                if len(texts) == 1 and texts[0].isascii():
                    tokens = parse_macro_string(texts[0], letters=_EXP_LETTERS, space=True)
                    return await self.expand(tokens, pending.domain)
            except SPFError:
                pass
        try:
            tokens = parse_macro_string(self.c.default_explanation, letters=_EXP_LETTERS,
                                        space=True)
            return await self.expand(tokens, pending.domain if pending else "")
        except SPFError:
            return self.c.default_explanation


class SPFChecker:
    """check_host() with its limits. Shared; each call keeps its own counters."""

    def __init__(self, resolver: Resolver, *, hostname: str = "localhost",
                 default_explanation: str = "DEFAULT", max_lookups: int = 10,
                 max_void: int = 2) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self.default_explanation = default_explanation
        self.max_lookups = max_lookups
        self.max_void = max_void

    async def check_host(self, ip: str, sender: str, helo: str,
                         resolver: Resolver | None = None) -> SPFResult:
        """Check `sender` (MAIL FROM; empty = the HELO identity) for client `ip`,
        asking `resolver` (the transaction's) or the one given at construction."""
        identity = "mailfrom"
        if not sender:
            identity, sender = "helo", f"postmaster@{helo}"
        local, at, domain = sender.rpartition("@")
        if not at:
            local, domain = "", sender
        if not local:
            local = "postmaster"            # 4.3: no local-part -> postmaster
        sender = f"{local}@{domain}"
        domain = _strip_dot(domain)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:      # e.g. a unix-socket or unknown PROXY peer: nothing to check
            return SPFResult("none", domain, sender, identity, problem="no client IP")
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped         # 5: an IPv4-mapped client is IPv4
        chk = _Check(self, resolver or self.resolver, addr, sender, helo)
        try:
            result, mech, pending = await chk.check(domain)
        except SPFError as e:
            return SPFResult(e.result, domain, sender, identity, problem=str(e))
        explanation = await chk.explain(pending) if result == "fail" else ""
        return SPFResult(result, domain, sender, identity, mech, explanation)


# --- the filter ------------------------------------------------------------------------

_ACTIONS = ("continue", "reject", "tempfail", "quarantine")
_DEFAULT_ACTIONS = {"fail": "reject", "temperror": "tempfail"}


@dataclass(frozen=True)
class SPFOptions:
    # Result -> continue | reject | tempfail | quarantine. Unlisted results use the
    # defaults: fail -> reject (550 5.7.23), temperror -> tempfail (451 4.7.24).
    actions: Mapping[str, Any] = field(default_factory=dict)
    # Also check the HELO identity at the helo stage (RFC 7208 2.3), same actions.
    check_helo: bool = False
    # Clients from mynetworks or authenticated are not checked.
    skip_trusted: bool = True
    received_spf: bool = True
    # Shown when a failing domain has no usable exp= (macros of RFC 7208 7 allowed).
    default_explanation: str = "%{i} is not allowed to send mail for %{d}"
    # Put the domain's own exp= text in the 550 (RFC 7208 8.4 suggests it).
    use_explanation: bool = True
    mailbox: str = "spf"
    # RFC 7208 4.6.4: at least 20 seconds; over it the result is temperror.
    timeout: Duration = Duration(20)
    max_lookups: int = 10
    max_void_lookups: int = 2


def _printable(text: str, limit: int = 200) -> str:
    """Text from DNS or the client, safe for a reply line or a header."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


def _kv(value: str) -> str:
    """A Received-SPF key-value value (9.1): dot-atom bare, else a quoted-string."""
    value = _printable(value)
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*",
                    value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def received_spf(r: SPFResult, ip: str, helo: str, receiver: str, mail_from: str) -> str:
    """The Received-SPF field value (RFC 7208 9.1), one line."""
    what = {"pass": "designates {ip} as permitted sender",
            "fail": "does not designate {ip} as permitted sender",
            "softfail": "does not designate {ip} as permitted sender (softfail)",
            "neutral": "neither permits nor denies {ip}",
            "none": "does not publish SPF",
            "temperror": "could not be checked (DNS error)",
            "permerror": "has a broken SPF record"}[r.result].format(ip=ip)
    subject = f"domain of {r.sender}" if r.identity == "mailfrom" else f"HELO {helo}"
    comment = _printable(f"{receiver}: {subject} {what}").replace("(", "").replace(")", "")
    pairs = [("client-ip", ip), ("envelope-from", mail_from), ("helo", helo),
             ("receiver", receiver), ("identity", r.identity)]
    if r.mechanism and r.mechanism != "default":
        pairs.append(("mechanism", r.mechanism))
    if r.problem:
        pairs.append(("problem", r.problem))
    return f"{r.result} ({comment}) " + " ".join(f"{k}={_kv(v)};" for k, v in pairs)


class SPFFilter(Filter):
    name = "spf"
    stages = frozenset({Stage.HELO, Stage.MAIL})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        key = f"filters.{self.name}"
        self.opts: SPFOptions = parse_section(SPFOptions, options, key)
        actions = dict(_DEFAULT_ACTIONS)
        for res, act in self.opts.actions.items():
            if res not in RESULTS:
                raise ConfigError(f"{key}.actions.{res}: unknown SPF result "
                                  f"(known: {', '.join(RESULTS)})")
            if act not in _ACTIONS:
                raise ConfigError(f"{key}.actions.{res}: must be one of "
                                  f"{', '.join(_ACTIONS)}, got {act!r}")
            actions[res] = act
        self.actions = actions
        if not self.opts.check_helo:
            self.stages = frozenset({Stage.MAIL})
        self.checker = SPFChecker(env.resolver, hostname=env.hostname,
                                  default_explanation=self.opts.default_explanation,
                                  max_lookups=self.opts.max_lookups,
                                  max_void=self.opts.max_void_lookups)

    async def check(self, ctx: Context, sender: str) -> SPFResult:
        try:
            async with asyncio.timeout(self.opts.timeout):
                return await self.checker.check_host(ctx.client_ip, sender, ctx.helo,
                                                     resolver=ctx.resolver)
        except TimeoutError:
            identity = "mailfrom" if sender else "helo"
            dom = sender.rpartition("@")[2] if sender else ctx.helo
            return SPFResult("temperror", dom, sender or f"postmaster@{ctx.helo}", identity,
                             problem="SPF evaluation timed out")

    async def on_helo(self, ctx: Context) -> Verdict:
        if (ctx.trusted and self.opts.skip_trusted) or not ctx.helo:
            return CONTINUE
        r = await self.check(ctx, "")
        ctx.notes["spf.helo"] = r
        log.info("spf helo=%s client=%s result=%s", _printable(ctx.helo, 100),
                 ctx.client_ip, r.result)
        return self._verdict(r, ())

    async def on_mail(self, ctx: Context) -> Verdict:
        if ctx.trusted and self.opts.skip_trusted:
            return CONTINUE
        mail_from = ctx.mail_from.strip("<>")
        if not mail_from and not ctx.helo:
            return CONTINUE
        r = await self.check(ctx, mail_from)
        ctx.notes["spf"] = r
        prop = ("smtp.mailfrom", r.domain) if r.identity == "mailfrom" else ("smtp.helo", ctx.helo)
        ctx.auth_results.append(AuthResult("spf", r.result, (prop,)))
        log.info("spf %s client=%s from=%s result=%s%s", ctx.queue_id or "-", ctx.client_ip,
                 _printable(r.sender, 100), r.result,
                 f" problem={_printable(r.problem, 100)!r}" if r.problem else "")
        headers: tuple[tuple[str, str], ...] = ()
        if self.opts.received_spf:
            headers = (("Received-SPF", received_spf(r, ctx.client_ip, ctx.helo,
                                                     self.env.hostname, mail_from)),)
        return self._verdict(r, headers)

    def _verdict(self, r: SPFResult, headers: tuple[tuple[str, str], ...]) -> Verdict:
        action = self.actions.get(r.result, "continue")
        error = r.result in ("temperror", "permerror")
        if action == "reject":
            text = "SPF validation error" if error else "SPF validation failed"
            if r.result == "fail" and self.opts.use_explanation and r.explanation:
                text = f"{text}: {_printable(r.explanation)}"
            return Verdict.reject(text, 550, "5.7.24" if error else "5.7.23",
                                  reason=f"spf {r.result}")
        if action == "tempfail":
            return Verdict.tempfail("SPF check could not be completed, try again later"
                                    if error else "SPF validation failed, try again later",
                                    451, "4.7.24" if error else "4.7.23",
                                    reason=f"spf {r.result}")
        if action == "quarantine":
            return Verdict.quarantine(self.opts.mailbox, f"spf {r.result}", headers)
        return Verdict.cont(headers)
