"""Authentication-Results: render ours, strip forged ones (RFC 8601).

Takes the AuthResult values the filters collected (relay.pipeline.protocol) and our
authserv-id (the relay's hostname) and hands back the value of one
Authentication-Results header, folded for a 78-column line after the field name.
`strip_forged` takes the raw header section of a received message and returns it with
every Authentication-Results field that claims our authserv-id removed (RFC 8601 5:
a border MTA MUST delete such fields, or downstream readers would trust a sender's
forgery); all other bytes are kept exactly, including obsolete syntax and odd folding.

Trusts nothing in the header block: comments, quoted strings and folding in front of
the authserv-id are parsed, not pattern-matched. Pure code, no I/O.
RFCs: 8601 (Authentication-Results), 5322 (folding, CFWS), 2045 (token).
"""

from __future__ import annotations

import re

from relay.pipeline.protocol import AuthResult

FIELD = "Authentication-Results"
_FIELD_B = FIELD.lower().encode()
_FOLD = "\r\n\t"
_WIDTH = 78   # RFC 5322 2.1.1: lines SHOULD stay within 78 characters

# RFC 2045 token: printable ASCII except SPACE and tspecials.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# RFC 8601 pvalue may also be [local-part] "@" domain-name, written bare.
_ADDR = re.compile(r"(?:[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z.]*@)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _value(text: str) -> str:
    """A property or authserv-id value: bare where the grammar allows, else quoted."""
    if _TOKEN.fullmatch(text) or _ADDR.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    # ctext excludes the parentheses and backslash: quote them (RFC 5322 3.2.2), and
    # flatten line breaks so a comment cannot inject a header line.
    text = re.sub(r"[\r\n\t]+", " ", text)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def _resinfo_words(res: AuthResult) -> list[str]:
    words = [f"{res.method}={res.result}"]
    if res.comment:
        words.append(_comment(res.comment))
    words.extend(f"{k}={_value(v)}" for k, v in res.props)
    return words


def render(authserv_id: str, results: list[AuthResult]) -> str:
    """The value of one Authentication-Results field: `id; spf=pass smtp.mailfrom=...`.

    Each result starts on its own line (the way the big receivers write it, easy to
    read and to grep); a long result is folded between words. Write the field as
    `Authentication-Results: ` + value: folds are CRLF + TAB inside the value.
    """
    head = _value(authserv_id)
    if not results:
        return f"{head}; none"
    out = head + ";"
    for i, res in enumerate(results):
        line = ""
        for word in _resinfo_words(res):
            if line and len(line) + 1 + len(word) > _WIDTH - 8:   # 8: a TAB's width
                out += _FOLD + line
                line = word
            else:
                line = f"{line} {word}" if line else word
        out += _FOLD + line + (";" if i < len(results) - 1 else "")
    return out


# --- stripping ----------------------------------------------------------------------

def _skip_cfws(s: str, i: int) -> int:
    """Index after comments and white space (nested comments, quoted-pairs)."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if depth:
            if c == "\\":
                i += 2
                continue
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def read_authserv_id(value: bytes) -> str | None:
    """The authserv-id at the start of a field value (after CFWS), or None."""
    s = value.decode("latin-1")
    i = _skip_cfws(s, 0)
    if i < len(s) and s[i] == '"':
        out = []
        i += 1
        while i < len(s) and s[i] != '"':
            if s[i] == "\\" and i + 1 < len(s):
                i += 1
            if s[i] not in "\r\n":
                out.append(s[i])
            i += 1
        return "".join(out)
    m = _TOKEN.match(s, i)
    return m.group(0) if m else None


def _same_id(found: str, ours: str) -> bool:
    # Case-insensitive (RFC 8601 2.5); a trailing dot is the same host to any reader,
    # so "mx.example.com." is stripped too.
    return found.lower().rstrip(".") == ours.lower().rstrip(".")


def strip_forged(header_block: bytes, authserv_id: str) -> bytes:
    """Remove every Authentication-Results field carrying our authserv-id.

    `header_block` is the raw header section (up to, not including, the empty line).
    A field is its first line plus every following line that begins with SP or HT;
    other bytes are returned untouched, whatever their line endings.
    """
    if _FIELD_B not in header_block.lower():
        return header_block         # the usual case, at the cost of one scan
    lines = header_block.splitlines(keepends=True)
    out: list[bytes] = []
    i = 0
    n = len(lines)
    while i < n:
        j = i + 1
        while j < n and lines[j][:1] in (b" ", b"\t"):
            j += 1
        first = lines[i]
        colon = first.find(b":")
        # RFC 5322 4.5 (obs-optional) allows white space before the colon.
        if colon > 0 and first[:colon].rstrip(b" \t").lower() == _FIELD_B:
            value = first[colon + 1:] + b"".join(lines[i + 1:j])
            found = read_authserv_id(value)
            if found is not None and _same_id(found, authserv_id):
                i = j
                continue
        out.extend(lines[i:j])
        i = j
    return b"".join(out)
