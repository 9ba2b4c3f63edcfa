"""A message as IMAP sees it: MIME tree by byte offsets, ENVELOPE, BODYSTRUCTURE, sections.

Takes the stored bytes of one message and hands on the FETCH pieces: `envelope()`,
`bodystructure()`, `section(spec)` (exact byte ranges of the original: nothing is
re-encoded, so line ends and DKIM-signed bytes stay as stored) and decoded header text
for SEARCH. Trusts nothing: junk mail is the normal case. Malformed dates, addresses,
encodings, boundaries and 8-bit headers degrade to NIL or raw text; MIME nesting is cut
at MAX_DEPTH; no input raises out of this module.
RFCs: 3501 (7.4.2 ENVELOPE/BODYSTRUCTURE, 6.4.5 sections), 5322, 2045-2047, 2231 (names
are passed on raw), 2183 (Content-Disposition).
"""

from __future__ import annotations

import email.header
import email.utils
import re
from dataclasses import dataclass, field

from relay.quarantine.imap.proto import NIL, Atom, Raw, render

MAX_DEPTH = 20          # MIME nesting; deeper parts are served as opaque bodies
MAX_PARTS = 2000        # per message; beyond it the rest is one opaque body
_HDR_END = re.compile(rb"\r?\n\r?\n")
_CT_OK = re.compile(rb"\s*[!-~]+/[!-~]+\s*(;|$)")
_FIELD = re.compile(rb"([^\x00-\x20\x7f:]+)[ \t]*:")


def _lower(b: bytes) -> str:
    return b.decode("ascii", "replace").lower()


@dataclass
class Part:
    start: int              # offset of the part's header
    body: int               # offset of its body (after the blank line)
    end: int                # end offset (exclusive)
    headers: list[tuple[str, bytes]] = field(default_factory=list)  # (lower name, value)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None     # the embedded message of a message/rfc822 part
    ctype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


def parse_headers(raw: bytes) -> list[tuple[str, bytes]]:
    """Unfolded header fields in order; lines that are not fields are skipped."""
    out: list[tuple[str, bytes]] = []
    for line in re.split(rb"\r?\n", raw):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b" " + line.strip())
            continue
        m = _FIELD.match(line)
        if m:
            out.append((_lower(m.group(1)), line[m.end():].strip()))
    return out


def _split_head(data: bytes, start: int, end: int) -> int:
    """Offset where the body starts (after the first empty line), or `end`."""
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        return start + (2 if data.startswith(b"\r\n", start) else 1)
    m = _HDR_END.search(data, start, end)
    return m.end() if m else end


def _params(value: bytes) -> tuple[str, list[tuple[str, str]]]:
    """'type/sub; a=b; c="d"' -> ('type/sub', [(a, b), (c, d)]); tolerant of junk."""
    text = value.decode("utf-8", "replace")
    head, _, rest = text.partition(";")
    params = []
    for m in re.finditer(r'\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        v = m.group(2).strip()
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.append((m.group(1).lower(), v))
    return head.strip(), params


class MessageView:
    """Parsed lazily once per FETCH; cheap when only flags or sizes are asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._count = 0
        self.root = self._parse(0, len(data), 0, "text/plain")

    def _parse(self, start: int, end: int, depth: int, default: str) -> Part:
        data = self.data
        body = _split_head(data, start, end)
        headers = parse_headers(data[start:body])
        p = Part(start, min(body, end), end, headers)
        self._count += 1
        ct = p.header("content-type")
        full, params = _params(ct) if ct is not None else (default, [])
        t, _, s = full.partition("/")
        if not t or not s or not re.fullmatch(r"[!-~]+", full):
            t, s, params = ("text", "plain", params) if ct is not None else (
                default.split("/") + [params])
        p.ctype, p.subtype, p.params = t.lower(), s.lower(), params
        if depth >= MAX_DEPTH or self._count >= MAX_PARTS:
            return p
        if p.ctype == "multipart":
            boundary = dict(params).get("boundary", "")
            if boundary:
                p.children = self._multipart(p, boundary.encode("utf-8", "replace"), depth)
            if not p.children:
                # Broken multipart (no boundary or none found): one empty text part, as
                # RFC 3501 asks for an unparseable body; bytes still served by BODY[].
                p.children = [Part(p.body, p.body, p.body, [], ctype="text",
                                   subtype="plain")]
        elif p.ctype == "message" and p.subtype in ("rfc822", "global"):
            p.message = self._parse(p.body, end, depth + 1, "text/plain")
        return p

    def _multipart(self, p: Part, boundary: bytes, depth: int) -> list[Part]:
        data = self.data
        delim = b"--" + boundary
        child_default = "message/rfc822" if p.subtype == "digest" else "text/plain"
        # Delimiter lines: at the body start or after a line end (RFC 2046 5.1.1).
        starts = []
        pos = p.body
        while True:
            i = data.find(delim, pos, p.end)
            if i < 0:
                break
            pos = i + len(delim)
            if i != p.body and data[i - 1:i] != b"\n":
                continue
            closing = data.startswith(b"--", pos)
            eol = data.find(b"\n", pos, p.end)
            line_end = p.end if eol < 0 else eol + 1
            prev_end = i - 2 if data[i - 2:i] == b"\r\n" else i - 1 if i > p.body else i
            starts.append((max(prev_end, p.body), line_end, closing))
            if closing:
                break
            pos = line_end
        parts = []
        for k, (_, content_start, closing) in enumerate(starts):
            if closing:
                break
            content_end = starts[k + 1][0] if k + 1 < len(starts) else p.end
            if content_end < content_start:
                content_end = content_start
            if self._count >= MAX_PARTS:
                break
            parts.append(self._parse(content_start, content_end, depth + 1, child_default))
        return parts

    # -- sections (RFC 3501 6.4.5) --
    def part(self, path: list[int]) -> Part | None:
        """Part by number (1-based path). A part that is not multipart has one part
        below it, itself, numbered 1, once (Dovecot's reading of RFC 3501 6.4.5: [1]
        of a plain message is its body, [1.1] of a multipart's leaf is that leaf)."""
        p, may_one = self.root, True
        for n in path:
            if p.message is not None and p.ctype == "message":
                p, may_one = p.message, True
            if p.children:
                if not 1 <= n <= len(p.children):
                    return None
                p, may_one = p.children[n - 1], True
            elif may_one and n == 1:
                may_one = False
            else:
                return None
        return p

    def section(self, path: list[int], spec: str, fields: list[str] | None) -> bytes | None:
        """Bytes of a section; None when the part does not exist (served as empty)."""
        data = self.data
        if not path:
            p = self.root
        else:
            p = self.part(path)
            if p is None:
                return None
        if spec == "MIME":
            return data[p.start:p.body] if path else None
        if path and spec in ("HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            if p.message is None:
                return None if spec != "TEXT" else b""
            p = p.message
        if spec == "":
            return data[p.body:p.end] if path else data
        if spec == "HEADER":
            return data[p.start:p.body]
        if spec == "TEXT":
            return data[p.body:p.end]
        if spec in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return _select_fields(data[p.start:p.body], set(fields or ()),
                                  spec == "HEADER.FIELDS.NOT")
        return None

    # -- ENVELOPE (RFC 3501 7.4.2) --
    def envelope(self, p: Part | None = None) -> list:
        p = p or self.root

        def h(name: str):
            v = p.header(name)
            return None if v is None else v

        frm = _addresses(h("from"))
        sender = _addresses(h("sender")) or frm
        reply_to = _addresses(h("reply-to")) or frm
        return [h("date"), h("subject"), frm, sender, reply_to, _addresses(h("to")),
                _addresses(h("cc")), _addresses(h("bcc")), h("in-reply-to"),
                h("message-id")]

    # -- BODYSTRUCTURE / BODY (RFC 3501 7.4.2) --
    def bodystructure(self, extended: bool = True, p: Part | None = None) -> list | Raw:
        p = p or self.root
        if p.ctype == "multipart":
            # body-type-mpart = 1*body SP media-subtype: the parts follow each other with
            # no space between them (RFC 3501 9), unlike other lists.
            rest: list = [p.subtype.upper().encode()]
            if extended:
                rest += [_param_list(p.params), _disposition(p), _language(p),
                         _nstr(p.header("content-location"))]
            return Raw(b"(" + b"".join(render(self.bodystructure(extended, c))
                                       for c in p.children)
                       + b" " + b" ".join(render(x) for x in rest) + b")")
        params = _param_list(p.params)
        ct = p.header("content-type")
        if p.ctype == "text" and p.subtype == "plain" and "charset" not in dict(p.params) and (
                ct is None or _CT_OK.match(ct)):
            # RFC 2045 5.2: plain text without a charset is US-ASCII (as Dovecot says it).
            params = (params or []) + [b"CHARSET", b"US-ASCII"]
        body = self.data[p.body:p.end]
        enc = p.header("content-transfer-encoding")
        enc_s = enc.decode("ascii", "replace").strip().upper().encode() if enc else b"7BIT"
        out = [p.ctype.upper().encode(), p.subtype.upper().encode(), params,
               _nstr(p.header("content-id")), _nstr(p.header("content-description")),
               enc_s or b"7BIT", len(body)]
        if p.ctype == "message" and p.message is not None and p.subtype in ("rfc822",
                                                                            "global"):
            out += [self.envelope(p.message), self.bodystructure(extended, p.message),
                    _lines(body)]
        elif p.ctype == "text":
            out.append(_lines(body))
        if extended:
            out += [_nstr(p.header("content-md5")), _disposition(p), _language(p),
                    _nstr(p.header("content-location"))]
        return out

    # -- SEARCH helpers --
    def header_text(self, name: str) -> str:
        """All values of a header field, RFC 2047-decoded, joined; '' if none."""
        vals = [v for n, v in self.root.headers if n == name]
        return " ".join(decode_words(v) for v in vals)

    def all_headers_text(self) -> str:
        return decode_words(self.data[self.root.start:self.root.body])

    def body_text(self) -> str:
        """Body text for SEARCH BODY/TEXT: raw bytes read as UTF-8 (lenient); a
        quoted-printable or base64 text part is decoded so words match."""
        out = []
        self._texts(self.root, out, 0)
        return "\n".join(out)

    def _texts(self, p: Part, out: list[str], depth: int) -> None:
        if depth > MAX_DEPTH or len(out) > 200:
            return
        if p.children:
            for c in p.children:
                self._texts(c, out, depth + 1)
            return
        if p.message is not None:
            out.append(decode_words(self.data[p.message.start:p.message.body]))
            self._texts(p.message, out, depth + 1)
            return
        raw = self.data[p.body:p.end]
        enc = (p.header("content-transfer-encoding") or b"").strip().lower()
        try:
            if enc == b"base64" and p.ctype == "text":
                import base64
                raw = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", raw) + b"==")
            elif enc == b"quoted-printable":
                import quopri
                raw = quopri.decodestring(raw)
        except Exception:  # undecodable: search the raw bytes
            pass
        charset = dict(p.params).get("charset", "utf-8")
        try:
            out.append(raw.decode(charset, "replace"))
        except LookupError:
            out.append(raw.decode("utf-8", "replace"))

    def date(self) -> float | None:
        """The Date: header as a timestamp (SENTBEFORE etc.), None if unparseable."""
        v = self.root.header("date")
        if v is None:
            return None
        try:
            dt = email.utils.parsedate_to_datetime(v.decode("ascii", "replace"))
            return dt.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None


def _select_fields(head: bytes, names: set[str], negate: bool) -> bytes:
    """Header lines (with their continuation lines, bytes exact) whose field name is
    (or, negated, is not) in `names`, plus the blank line RFC 3501 asks for."""
    out = []
    keep = False
    for line in re.split(rb"(?<=\n)", head):
        if not line or line in (b"\r\n", b"\n"):
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        m = _FIELD.match(line)
        keep = bool(m) and ((_lower(m.group(1)) in names) != negate)
        if keep:
            out.append(line if line.endswith(b"\n") else line + b"\r\n")
    return b"".join(out) + b"\r\n"


def _lines(body: bytes) -> int:
    # Line ends counted, as Dovecot and Cyrus do: a last line without one is not counted.
    return body.count(b"\n")


def _nstr(v: bytes | None):
    return None if v is None else v


def _param_list(params: list[tuple[str, str]]):
    if not params:
        return None
    out = []
    for k, v in params[:64]:
        out += [k.upper().encode("utf-8", "replace"), v.encode("utf-8", "replace")]
    return out


def _disposition(p: Part):
    v = p.header("content-disposition")
    if v is None:
        return None
    kind, params = _params(v)
    if not kind or not re.fullmatch(r"[!-~]+", kind):
        return None
    return [kind.upper().encode(), _param_list(params)]


def _language(p: Part):
    v = p.header("content-language")
    if v is None:
        return None
    langs = [x.strip().encode("ascii", "replace") for x in v.decode("ascii", "replace")
             .split(",") if x.strip()]
    return langs or None


def decode_words(v: bytes) -> str:
    """RFC 2047 encoded words decoded; raw 8-bit read as UTF-8 (else Latin-1)."""
    try:
        text = v.decode("utf-8")
    except UnicodeDecodeError:
        text = v.decode("latin-1")
    if "=?" not in text:
        return text
    try:
        parts = email.header.decode_header(text)
        out = []
        for chunk, cs in parts:
            if isinstance(chunk, str):
                out.append(chunk)
            else:
                try:
                    out.append(chunk.decode(cs or "utf-8", "replace"))
                except LookupError:
                    out.append(chunk.decode("utf-8", "replace"))
        return "".join(out)
    except Exception:  # junk encoded words: search the raw text
        return text


def _addresses(v: bytes | None):
    """An address header as RFC 3501's list of (name adl mailbox host), with groups as
    start/end markers; None when absent or nothing parses."""
    if v is None:
        return None
    text = v.decode("utf-8", "surrogateescape")
    try:
        out = []
        for group, members in _split_groups(text):
            if group is not None:
                out.append([None, None, group.encode("utf-8", "surrogateescape"), None])
            for name, addr in email.utils.getaddresses([members]):
                if not name and not addr:
                    continue
                local, at, domain = addr.rpartition("@")
                if not at:
                    local, domain = addr, ""
                # A NIL host marks group syntax (RFC 3501 7.4.2): a broken address gets
                # placeholders instead, the words Dovecot uses.
                nm = name.encode("utf-8", "surrogateescape") if name else None
                out.append([nm, None,
                            local.encode("utf-8", "surrogateescape") or b"MISSING_MAILBOX",
                            domain.encode("utf-8", "surrogateescape") or b"MISSING_DOMAIN"])
            if group is not None:
                out.append([None, None, None, None])
        # env-from etc. = "(" 1*address ")": addresses follow each other with no space.
        return Raw(b"(" + b"".join(render(a) for a in out) + b")") if out else None
    except Exception:  # unparseable junk: NIL rather than a dropped connection
        return None


def _split_groups(text: str) -> list[tuple[str | None, str]]:
    """'x@y, Group: a, b; c' -> [(None, 'x@y,'), ('Group', 'a, b'), (None, 'c')], looking
    only at top-level ':' ';' ',' (outside quotes, comments and angle brackets)."""
    out: list[tuple[str | None, str]] = []
    depth, angle, quote = 0, False, False
    start = seg = 0             # start of pending text; start of the current address
    group: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if quote:
            quote = c != '"'
        elif c == '"':
            quote = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth:
            pass
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif angle:
            pass
        elif c == ",":
            seg = i + 1
        elif c == ":" and group is None and "@" not in text[seg:i]:
            if text[start:seg].strip(" ,"):
                out.append((None, text[start:seg]))
            group = text[seg:i].strip()
            start = seg = i + 1
        elif c == ";" and group is not None:
            out.append((group, text[start:i]))
            group, start, seg = None, i + 1, i + 1
        i += 1
    rest = text[start:]
    if group is not None:
        out.append((group, rest))
    elif rest.strip(" ,") or not out:
        out.append((None, rest))
    return out


__all__ = ["MessageView", "Part", "parse_headers", "decode_words", "NIL", "Atom"]
