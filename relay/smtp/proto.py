"""SMTP server grammar: command lines, paths, parameters, replies. Sans-IO.

Takes one command line (without its CRLF) from relay.smtp.session and hands back typed
values or a Reply; renders replies with their RFC 3463 enhanced status code (every reply
carries one: we advertise ENHANCEDSTATUSCODES, RFC 2034). Trusts nothing: an address
with CR, LF, NUL or other controls, over-long parts (RFC 5321 4.5.3.1), or bad syntax is
refused here, before any other part sees it. MAIL/RCPT parameter values are kept exactly
as sent (DSN, RFC 3461, requires ENVID and ORCPT to travel unchanged); only the keywords
are case-folded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 4.5.3.1: local-part 64, domain 255, path 256 octets; command line 512,
# which SMTP extensions enlarge (RFC 1869 4.1.2, SIZE/DSN/SMTPUTF8 params).
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_COMMAND_LINE = 2048


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def render(self) -> bytes:
        # Most replies are module constants (R_OK, ...): rendered once, kept on the
        # instance (outside the dataclass fields, so equality and hashing ignore it).
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self._render()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _render(self) -> bytes:
        lines = self.text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            prefix = f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"
            out.append(prefix + line + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def positive(self) -> bool:
        return self.code < 400


class SyntaxErr(Exception):
    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


def parse_command(line: bytes) -> tuple[str, str]:
    """'MAIL FROM:<a@b> SIZE=10' -> ('MAIL', 'FROM:<a@b> SIZE=10'). The verb is ASCII,
    upper-cased; the argument is UTF-8 (SMTPUTF8) or raises SyntaxErr."""
    verb, _, arg = line.partition(b" ")
    if not verb or not verb.isalpha() or len(verb) > 12:
        raise SyntaxErr(Reply(500, "5.5.2", "Error: command not recognized"))
    try:
        text = arg.decode("utf-8")
    except UnicodeDecodeError:
        raise SyntaxErr(Reply(500, "5.5.2", "Error: invalid UTF-8 in command")) from None
    if _CTL.search(text):
        raise SyntaxErr(Reply(501, "5.5.2", "Error: control characters in command"))
    return verb.decode("ascii").upper(), text.strip(" ")


_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")     # TAB is tolerated in arguments
# RFC 5321 4.1.2, with RFC 6531 allowing UTF-8 (non-ASCII) in atoms and labels.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LABEL = r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*[A-Za-z0-9\u0080-\U0010ffff])?)"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]"
_MAILBOX = re.compile(rf"({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})")
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?")


def parse_path(arg: str, keyword: str, allow_null: bool) -> tuple[str, dict[str, str | None]]:
    """Parse 'FROM:<addr> PARAMS' (or 'TO:'); returns (address, {KEYWORD: value})."""
    if not arg[: len(keyword) + 1].upper() == keyword + ":":
        raise SyntaxErr(Reply(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"))
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise SyntaxErr(Reply(501, "5.1.7" if keyword == "FROM" else "5.1.3",
                              "Bad address syntax: angle brackets required"))
    end = rest.find(">")
    if end < 0:
        raise SyntaxErr(Reply(501, "5.5.4", "Bad address syntax: missing '>'"))
    path, params_text = rest[1:end], rest[end + 1:]
    if params_text and not params_text.startswith(" "):
        raise SyntaxErr(Reply(501, "5.5.4", "Bad syntax after address"))
    address = validate_address(path, keyword, allow_null)
    params: dict[str, str | None] = {}
    for token in params_text.split():
        m = _PARAM.fullmatch(token)
        if not m:
            raise SyntaxErr(Reply(501, "5.5.4", "Bad parameter syntax"))
        key = m.group(1).upper()
        if key in params:
            raise SyntaxErr(Reply(501, "5.5.4", f"Duplicate parameter {key}"))
        params[key] = m.group(2)
    return address, params


def validate_address(path: str, keyword: str = "TO", allow_null: bool = False) -> str:
    bad = "5.1.7" if keyword == "FROM" else "5.1.3"
    if path == "":
        if allow_null:
            return ""
        raise SyntaxErr(Reply(501, bad, "Null address not allowed here"))
    if len(path.encode("utf-8")) > MAX_PATH:
        raise SyntaxErr(Reply(501, bad, "Address too long"))
    m = _SOURCE_ROUTE.match(path)
    if m:
        # RFC 5321 4.1.1.3 / C: accept and ignore source routes.
        path = path[m.end():]
    mm = _MAILBOX.fullmatch(path)
    if not mm:
        raise SyntaxErr(Reply(501, bad, "Bad address syntax"))
    local, domain = mm.group(1), mm.group(2)
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise SyntaxErr(Reply(501, bad, "Local part too long"))
    if len(domain.encode("utf-8")) > MAX_DOMAIN or any(
            len(lbl.encode("utf-8")) > 63 for lbl in domain.split(".")):
        raise SyntaxErr(Reply(501, bad, "Domain too long"))
    return path


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def is_ascii(s: str) -> bool:
    return s.isascii()


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


def valid_xtext(value: str) -> bool:
    """RFC 3461 4: ENVID and ORCPT values are xtext."""
    return bool(_XTEXT.fullmatch(value))


def check_mail_params(params: dict[str, str | None], max_size: int, utf8_ok: bool) -> None:
    """RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 RET/ENVID, RFC 4954 AUTH."""
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise SyntaxErr(Reply(501, "5.5.4", "Bad SIZE parameter"))
            if max_size and int(value) > max_size:
                raise SyntaxErr(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise SyntaxErr(Reply(501, "5.5.4", "Bad BODY parameter"))
        elif key == "SMTPUTF8":
            if value is not None or not utf8_ok:
                raise SyntaxErr(Reply(555, "5.5.4", "Bad SMTPUTF8 parameter"))
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise SyntaxErr(Reply(501, "5.5.4", "Bad RET parameter"))
        elif key == "ENVID":
            if value is None or len(value) > 100 or not valid_xtext(value):
                raise SyntaxErr(Reply(501, "5.5.4", "Bad ENVID parameter"))
        elif key == "AUTH":
            pass        # RFC 4954 5: accepted and not trusted
        else:
            raise SyntaxErr(Reply(555, "5.5.4", f"Unsupported parameter {key}"))


_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def check_rcpt_params(params: dict[str, str | None]) -> None:
    for key, value in params.items():
        if key == "NOTIFY":
            items = (value or "").upper().split(",")
            if not value or not set(items) <= _NOTIFY or ("NEVER" in items and len(items) > 1):
                raise SyntaxErr(Reply(501, "5.5.4", "Bad NOTIFY parameter"))
        elif key == "ORCPT":
            addr_type, _, addr = (value or "").partition(";")
            if not addr_type or not addr or len(value or "") > 500 or not (
                    addr_type.isascii() and addr_type.replace("-", "").isalnum()):
                raise SyntaxErr(Reply(501, "5.5.4", "Bad ORCPT parameter"))
            if addr_type.lower() == "rfc822" and not valid_xtext(addr) and not addr.isascii():
                pass    # utf-8-addr-xtext (RFC 6533) is allowed too
        else:
            raise SyntaxErr(Reply(555, "5.5.4", f"Unsupported parameter {key}"))


def sanitize(text: str, max_len: int = 128) -> str:
    """Printable ASCII only, for trace headers and logs (HELO names, auth ids)."""
    out = "".join(c if 0x21 <= ord(c) < 0x7f and c not in "()\\\"" else "?"
                  for c in text[:max_len])
    return out or "unknown"


# Replies used in more than one place.
R_OK = Reply(250, "2.0.0", "Ok")
R_BAD_SEQUENCE_MAIL = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
R_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
R_STORAGE = Reply(451, "4.3.0", "Error: queue file write error, try again later")
R_STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage")
R_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
R_TOO_BIG = Reply(552, "5.3.4", "Error: message too big for system")
R_HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header section too large")
R_BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received (see RFC 5321 2.3.8)")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long (see RFC 5321 4.5.3.1.6)")
R_CMD_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
R_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
R_FILTER_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
