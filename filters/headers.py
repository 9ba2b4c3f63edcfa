"""Content checks: regexes on header fields and body text, and attachment blocking by
file-name extension and MIME type, inside nested multiparts and attached messages too.

Takes ordered rules from its options, each with an action (reject, quarantine, discard,
continue); at end of DATA reads the message (`ctx.message()`) and hands the chain the
first matching rule's verdict. Checks run in this order: header_checks, attachments,
body_checks; within each, the first match decides. `continue` is an exemption: it ends
this filter's checks for the message and lets it pass to the next filter.

Trusts nothing in the message, and bounds the work a hostile one can cause (a MIME bomb
must not blow up): only the first `max_scan_bytes` are walked, MIME nesting deeper than
`max_depth` or more than `max_parts` entities stop the walk and give `on_limit`, at most
`max_body_text` decoded characters reach body regexes, and each header value is cut at
MAX_VALUE. The MIME walker is plain code over bytes (no I/O, no email-package tree of
the whole message): it finds boundaries with bytes.find, so its cost is linear in the
scanned bytes times the (bounded) depth.

RFCs: 5322 (header fields), 2045/2046 (MIME entities, multipart, boundaries,
base64, quoted-printable), 2047 (encoded words), 2183/2231 (Content-Disposition and
parameter encoding for file names).
"""

from __future__ import annotations

import binascii
import email.header
import email.parser
import email.policy
import fnmatch
import logging
import quopri
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.config import ConfigError, Size, parse_section
from relay.pipeline.protocol import CONTINUE, Context, Filter, FilterEnv, Stage, Verdict

log = logging.getLogger("relay.filter.headers")

KEY = "filters.headers"
MAX_VALUE = 8192              # characters of one header value given to a regex
MAX_PART_HEADER = 64 * 1024   # bytes of one MIME entity's header block parsed

ActionName = Literal["reject", "quarantine", "discard", "continue"]


@dataclass(frozen=True)
class Check:
    regex: str
    action: ActionName = "reject"
    # header_checks only: the field name whose values are searched; empty = every
    # field, searched as its whole 'Name: value' line (as Postfix header_checks).
    header: str = ""
    mailbox: str = ""           # for quarantine
    text: str = ""              # reply text for reject: generic, leaks no rule
    name: str = ""              # label for logs and the quarantine reason


@dataclass(frozen=True)
class AttachmentRule:
    # File-name extensions ('exe', '.js'); case and trailing dots/spaces ignored.
    extensions: tuple[str, ...] = ()
    # MIME types, with '*' wildcards ('application/x-msdownload', 'application/*').
    mime_types: tuple[str, ...] = ()
    action: ActionName = "reject"
    mailbox: str = ""
    text: str = ""
    name: str = ""


@dataclass(frozen=True)
class HeadersOptions:
    header_checks: tuple[Check, ...] = ()
    body_checks: tuple[Check, ...] = ()
    attachments: tuple[AttachmentRule, ...] = ()
    max_scan_bytes: Size = Size(16 * 1024 * 1024)
    max_body_text: Size = Size(1024 * 1024)
    max_depth: int = 16
    max_parts: int = 256
    # What a message gets when it exceeds max_depth or max_parts: unchecked parts
    # could hide a blocked attachment, so refuse by default.
    on_limit: ActionName = "reject"
    on_limit_mailbox: str = ""


# --- the MIME walker (sans-IO) ----------------------------------------------------------

@dataclass(frozen=True)
class Part:
    content_type: str
    filename: str
    depth: int


@dataclass
class Walk:
    parts: list[Part] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    limit: str = ""             # "" or why the walk stopped early
    text_budget: int = 0


_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def walk(message: bytes, max_depth: int = 16, max_parts: int = 256,
         max_text: int = 1024 * 1024) -> Walk:
    """Every MIME entity's type and file name, and the decoded text of text parts
    (up to `max_text` characters), of a CRLF message. Stops at the limits."""
    w = Walk(text_budget=max_text)
    _entity(message, 0, len(message), 0, w, max_depth, max_parts)
    return w


def _entity(data: bytes, start: int, end: int, depth: int, w: Walk,
            max_depth: int, max_parts: int) -> None:
    if w.limit:
        return
    if len(w.parts) >= max_parts:
        w.limit = f"more than {max_parts} MIME parts"
        return
    if data.startswith(b"\r\n", start):
        head, body = b"", start + 2
    else:
        idx = data.find(b"\r\n\r\n", start, end)
        head, body = (data[start:end], end) if idx < 0 else (data[start:idx + 2], idx + 4)
    msg = _HEADER_PARSER.parsebytes(head[:MAX_PART_HEADER])
    ctype = msg.get_content_type()
    w.parts.append(Part(ctype, _filename(msg), depth))

    if ctype.startswith("multipart/") or ctype in ("message/rfc822", "message/global"):
        if depth >= max_depth:
            w.limit = f"MIME nesting deeper than {max_depth}"
            return
        if ctype.startswith("message/"):
            _entity(data, body, end, depth + 1, w, max_depth, max_parts)
            return
        boundary = msg.get_boundary()
        if boundary and 0 < len(boundary) <= 200:
            _multipart(data, body, end, boundary.encode("latin-1", "replace"), depth, w,
                       max_depth, max_parts)
            return
    if ctype.startswith("text/") and w.text_budget > 0 and body < end:
        _text(data[body: min(end, body + 4 * w.text_budget)], msg, w)


def _multipart(data: bytes, body: int, end: int, boundary: bytes, depth: int, w: Walk,
               max_depth: int, max_parts: int) -> None:
    # RFC 2046 5.1.1: a delimiter is CRLF "--" boundary at a line start, then
    # optional padding and CRLF; "--" after it closes. The CRLF before the body
    # (end of the header block) counts, so the search starts 2 bytes early.
    delim = b"\r\n--" + boundary
    pos = _delimiter(data, delim, body - 2, end)
    while pos >= 0 and not w.limit:
        after = pos + len(delim)
        if data.startswith(b"--", after):
            return                                   # close delimiter
        eol = data.find(b"\r\n", after, end)
        if eol < 0:
            return
        nxt = _delimiter(data, delim, eol, end)
        _entity(data, eol + 2, end if nxt < 0 else nxt, depth + 1, w, max_depth, max_parts)
        pos = nxt


def _delimiter(data: bytes, delim: bytes, start: int, end: int) -> int:
    pos = data.find(delim, max(start, 0), end)
    while pos >= 0:
        tail = data[pos + len(delim): pos + len(delim) + 2]
        if tail in (b"--", b"\r\n", b"") or tail[:1] in (b" ", b"\t"):
            return pos
        pos = data.find(delim, pos + 1, end)
    return -1


def _filename(msg) -> str:
    name = msg.get_filename() or ""
    if not isinstance(name, str):
        name = str(name)
    if "=?" in name:
        try:
            name = str(email.header.make_header(email.header.decode_header(name)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return name[:1024]


def _text(raw: bytes, msg, w: Walk) -> None:
    cte = str(msg.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            b64 = re.sub(rb"[^A-Za-z0-9+/=]", b"", raw)
            raw = binascii.a2b_base64(b64[: len(b64) // 4 * 4])
        elif cte == "quoted-printable":
            raw = quopri.decodestring(raw)
    except (binascii.Error, ValueError):
        pass                                          # scan it as it came
    charset = msg.get_content_charset() or "utf-8"
    try:
        text = raw.decode(charset, "replace")
    except LookupError:
        text = raw.decode("latin-1")
    text = text[: w.text_budget]
    w.text_budget -= len(text)
    w.texts.append(text)


# --- the filter ------------------------------------------------------------------------

class _Rule:
    def __init__(self, action: str, mailbox: str, text: str, label: str, key: str):
        if action == "quarantine" and not mailbox:
            raise ConfigError(f"{key}.mailbox: a quarantine rule needs a mailbox")
        self.action, self.mailbox, self.label = action, mailbox, label
        self.text = text or "Message content rejected"

    def verdict(self, what: str) -> Verdict:
        reason = f"{what} (rule {self.label})"
        if self.action == "reject":
            return Verdict.reject(self.text, 550, "5.7.1", reason=reason)
        if self.action == "quarantine":
            return Verdict.quarantine(self.mailbox, reason)
        if self.action == "discard":
            return Verdict.discard(reason)
        return CONTINUE


def _compile(regex: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as e:
        raise ConfigError(f"{key}.regex: bad regular expression ({e})") from None


class _RegexRule(_Rule):
    def __init__(self, c: Check, key: str, headers: bool):
        super().__init__(c.action, c.mailbox, c.text, c.name or key.rpartition(".")[2], key)
        if not c.regex:
            raise ConfigError(f"{key}.regex: required")
        self.regex = _compile(c.regex, key)
        if c.header and not headers:
            raise ConfigError(f"{key}.header: only header_checks look at one header")
        if c.header and not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", c.header):
            raise ConfigError(f"{key}.header: not a header field name: {c.header!r}")
        self.header = c.header


class _AttachmentRule(_Rule):
    def __init__(self, a: AttachmentRule, key: str):
        super().__init__(a.action, a.mailbox, a.text, a.name or key.rpartition(".")[2], key)
        if not a.extensions and not a.mime_types:
            raise ConfigError(f"{key}.extensions: give extensions, mime_types or both")
        self.extensions = frozenset(_norm_name("." + e.lstrip(".")).rpartition(".")[2]
                                    for e in a.extensions)
        for i, e in enumerate(self.extensions):
            if not e or not re.fullmatch(r"[^\s/\\]+", e):
                raise ConfigError(f"{key}.extensions[{i}]: not a file-name extension")
        self.mime_types = tuple(m.strip().lower() for m in a.mime_types)
        for i, m in enumerate(self.mime_types):
            if not re.fullmatch(r"[a-z0-9*.+-]+/[a-z0-9*.+-]+", m):
                raise ConfigError(f"{key}.mime_types[{i}]: not a MIME type: {m!r}")

    def match(self, part: Part) -> bool:
        if self.extensions and part.filename:
            name = _norm_name(part.filename)
            if "." in name and name.rpartition(".")[2] in self.extensions:
                return True
        return any(fnmatch.fnmatchcase(part.content_type, m) for m in self.mime_types)


def _norm_name(name: str) -> str:
    # Windows drops trailing dots and spaces ('invoice.exe. ' runs as .exe); NULs and
    # path parts are junk a mail client may strip too.
    name = name.replace("\x00", "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    return name.rstrip(". \t").lower()


def _decoded(value: str) -> str:
    value = value[:MAX_VALUE]
    if "=?" in value:
        try:
            value = str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return re.sub(r"\r?\n[ \t]", " ", value)


class HeadersFilter(Filter):
    name = "headers"
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        o = parse_section(HeadersOptions, options, KEY)
        self.opts = o
        self.header_rules = [_RegexRule(c, f"{KEY}.header_checks[{i}]", True)
                             for i, c in enumerate(o.header_checks)]
        self.body_rules = [_RegexRule(c, f"{KEY}.body_checks[{i}]", False)
                           for i, c in enumerate(o.body_checks)]
        self.attachment_rules = [_AttachmentRule(a, f"{KEY}.attachments[{i}]")
                                 for i, a in enumerate(o.attachments)]
        if o.on_limit == "quarantine" and not o.on_limit_mailbox:
            raise ConfigError(f"{KEY}.on_limit_mailbox: on_limit: quarantine needs a mailbox")
        self.on_limit = _Rule(o.on_limit, o.on_limit_mailbox,
                              "Message structure too complex", "on_limit",
                              f"{KEY}.on_limit")
        if o.max_depth < 1:
            raise ConfigError(f"{KEY}.max_depth: must be at least 1")
        if o.max_parts < 1:
            raise ConfigError(f"{KEY}.max_parts: must be at least 1")

    async def on_data(self, ctx: Context) -> Verdict:
        qid = ctx.queue_id or "NOQUEUE"
        if self.header_rules:
            headers = await ctx.headers()
            for rule in self.header_rules:
                if rule.header:
                    values = [_decoded(str(v)) for v in headers.get_all(rule.header) or []]
                else:
                    values = [f"{k}: {_decoded(str(v))}" for k, v in headers.items()]
                if any(rule.regex.search(v) for v in values):
                    return self._decided(qid, rule, f"header matched {rule.header or 'a field'}")
        if not (self.attachment_rules or self.body_rules):
            return CONTINUE
        message = await ctx.message()
        o = self.opts
        w = walk(message[: o.max_scan_bytes], o.max_depth, o.max_parts,
                 o.max_body_text if self.body_rules else 0)
        for rule in self.attachment_rules:
            for part in w.parts:
                if rule.match(part):
                    return self._decided(qid, rule, f"attachment {part.content_type}"
                                         + (" with a blocked file name" if part.filename else ""))
        if w.limit:
            log.info("%s: content checks stopped: %s", qid, w.limit)
            return self._decided(qid, self.on_limit, w.limit)
        for rule in self.body_rules:
            if any(rule.regex.search(t) for t in w.texts):
                return self._decided(qid, rule, "body matched")
        return CONTINUE

    @staticmethod
    def _decided(qid: str, rule: _Rule, what: str) -> Verdict:
        if rule.action == "continue":
            log.info("%s: %s (rule %s): exempt from further content checks", qid, what,
                     rule.label)
        return rule.verdict(what)
