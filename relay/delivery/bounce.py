"""DSN builder: a message's delivery outcome for some recipients as an RFC 3464 report.

Takes the queued message's Envelope, the recipients to report on (their `last_error`
holds the last SMTP reply or local error text), the action (failed, delayed, delivered,
relayed), the original message bytes as stored (or only its header section, with the
whole message's size, when it will not be returned in full) and our host name. Hands
back a new Envelope (null sender, one recipient = the original sender,
`is_bounce=True`) and the report's bytes, ready for `spool.add`. The caller queues
it; nothing here does I/O.

Trusts nothing in the reply texts, ENVID, ORCPT or the original: remote reply text is
reduced to printable ASCII and folded, xtext is decoded only when the result is
printable, and the returned original is re-framed with CRLF line ends under a MIME
boundary that does not occur in it.

RFCs: 3464 (multipart/report, message/delivery-status), 3461 (RET, ENVID, NOTIFY,
ORCPT, xtext), 3462/6522 (multipart/report), 3463 (status codes), 3834
(Auto-Submitted), 6533 (utf-8 address type, message/global-headers), 5322 (dates).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from email.utils import formatdate

from relay.queue.model import Envelope, Recipient, new_queue_id

ACTIONS = ("failed", "delayed", "delivered", "relayed")

# RFC 3461 4.3: the full message goes back only with RET=FULL, and then only for
# failures; past this size a full copy would bounce on size limits itself (and doubles
# the load of a mail loop), so we send headers only, as Postfix does.
MAX_FULL = 1024 * 1024
# A header block larger than this is cut at a line boundary: the report stays small.
MAX_HEADERS = 64 * 1024
# Reply text shown per recipient: enough for any sane multi-line reply.
MAX_DIAG = 900

_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Mail Relayed Report",
}
_INTRO = {
    "failed": "Your message could not be delivered to one or more recipients.\r\n"
              "This is a permanent error; the message will not be retried.",
    "delayed": "Your message has not yet been delivered to one or more recipients.\r\n"
               "Delivery is still being retried; you do not need to resend it.",
    "delivered": "Your message was delivered to the recipients below.",
    "relayed": "Your message was relayed to a system that does not send delivery\r\n"
               "reports; no further notice will come for the recipients below.",
}
_NOTIFY_KEY = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS",
               "relayed": "SUCCESS"}

_REPLY = re.compile(r"\s*([245])(\d\d)(?:[ -]+(?:([245])\.(\d{1,3})\.(\d{1,3}))\b)?")
# 'host[addr]:port said: 550 ...' or 'host[addr]: 550 ...' (Postfix style) names the
# remote MTA inside last_error; the delivery code may record errors this way.
_REMOTE = re.compile(r"\s*([A-Za-z0-9._-]+)\[[^\]\s]*\](?::\d+)?(?:\s+said)?:\s*(?=\d{3}\b)")


def wants_dsn(rcpt: Recipient, action: str) -> bool:
    """RFC 3461 4.1: does this recipient's NOTIFY ask for a report of this action?
    Absent NOTIFY means failures and delays (our choice, as Postfix), never success."""
    if not rcpt.notify:
        return action in ("failed", "delayed")
    words = {w.strip().upper() for w in rcpt.notify.split(",")}
    return "NEVER" not in words and _NOTIFY_KEY[action] in words


def status_of(last_error: str, action: str) -> str:
    """RFC 3463 status for a recipient: the reply's enhanced code when it is present
    and agrees with the reply class, else class.0.0 of the reply, else by action."""
    fallback = {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")
    m = _REPLY.match(_REMOTE.sub("", last_error, count=1))
    if not m:
        return fallback
    cls = m.group(1)
    if m.group(3) == cls:
        status = f"{cls}.{int(m.group(4))}.{int(m.group(5))}"
    else:
        status = f"{cls}.0.0"
    # A delay report must carry a transient status (RFC 3464 2.3.3); a failure keeps a
    # 4.x.y when the recipient expired after transient errors (as Postfix does): the
    # status says what the next hop last said, the Action says what we decided.
    if action == "delayed" and cls != "4":
        return fallback
    if action in ("delivered", "relayed") and cls != "2":
        return fallback
    if action == "failed" and cls == "2":
        return fallback
    return status


def build_dsn(env: Envelope, rcpts: list[Recipient], action: str, original: bytes,
              reporting_mta: str, now: float | None = None, *,
              lifetime: float = 5 * 86400,
              remote_mtas: Mapping[str, str] | None = None,
              max_full: int = MAX_FULL,
              original_size: int | None = None) -> tuple[Envelope, bytes]:
    """Build one DSN for `rcpts` of `env` with `action`.

    Recipients whose NOTIFY does not ask for this action are left out (wants_dsn).
    Raises ValueError for a null sender, a bounce (never bounce a bounce), an unknown
    action, or when no recipient is left to report on. `lifetime` gives the
    Will-Retry-Until of a delay report (arrival + lifetime); `remote_mtas` maps a
    recipient address to the host that gave its reply, when known. `original_size`:
    `original` is only the message's header section (or a first piece that starts with
    it) and the whole message has this many bytes, so it is never returned in full."""
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    if env.is_bounce:
        raise ValueError(f"{env.queue_id}: no DSN for a DSN (bounce loop)")
    if not env.sender:
        raise ValueError(f"{env.queue_id}: no DSN to the null sender")
    report = [r for r in rcpts if wants_dsn(r, action)]
    if not report:
        raise ValueError(f"{env.queue_id}: no recipient asks for a {action} DSN")
    now = time.time() if now is None else now
    mta = _ascii(reporting_mta) or "localhost"
    remote_mtas = remote_mtas or {}

    original = _crlf(original)
    head = _header_block(original)
    full = (action == "failed" and (env.ret or "").upper() == "FULL"
            and original_size is None and len(original) <= max_full)
    returned = original if full else head
    eight_bit = not returned.isascii()
    boundary = _boundary(returned, mta)

    sender_ascii = env.sender.isascii()
    lines: list[str] = []
    add = lines.append

    # --- top-level header (RFC 5322, 3834, 6522) ---
    add(f"Date: {formatdate(now, usegmt=True)}")
    add(f"From: Mail Delivery System <MAILER-DAEMON@{mta}>")
    add(f"To: <{_addr_header(env.sender)}>")
    add(f"Subject: {_SUBJECT[action]}")
    add(f"Message-ID: <{new_queue_id()}.{int(now)}@{mta}>")
    add("Auto-Submitted: auto-replied")
    add("MIME-Version: 1.0")
    add(f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"')
    add(f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}")
    add("")
    add("This is a MIME-encapsulated message.")
    add("")

    # --- 1: the human-readable part ---
    add(f"--{boundary}")
    add("Content-Type: text/plain; charset=us-ascii")
    add("Content-Description: Notification")
    add("Content-Transfer-Encoding: 7bit")
    add("")
    add(f"This is the mail system at host {mta}.")
    add("")
    add(_INTRO[action])
    add("")
    for r in report:
        add(f"<{_printable(r.address)}>")
        if r.last_error and action in ("failed", "delayed"):
            for chunk in _fold_text(_printable(r.last_error)[:MAX_DIAG], 72):
                add(f"    {chunk}")
    if action == "failed" and (env.ret or "").upper() == "FULL" and not full:
        add("")
        add(f"The message was larger than {max_full} bytes: only its header is returned.")
    add("")

    # --- 2: message/delivery-status (RFC 3464 2.1) ---
    add(f"--{boundary}")
    add("Content-Type: message/delivery-status")
    add("Content-Description: Delivery report")
    add("Content-Transfer-Encoding: 7bit")
    add("")
    add(f"Reporting-MTA: dns; {mta}")
    add(f"X-Relay-Queue-ID: {_ascii(env.queue_id)}")
    if env.envid:
        add(f"Original-Envelope-Id: {_xtext_decoded(env.envid)}")
    add(f"Arrival-Date: {formatdate(env.arrival, usegmt=True)}")
    for r in report:
        add("")
        add(f"Final-Recipient: {_typed_address(r.address)}")
        if r.orcpt:
            add(f"Original-Recipient: {_orcpt(r.orcpt)}")
        add(f"Action: {action}")
        add(f"Status: {status_of(r.last_error, action)}")
        remote = remote_mtas.get(r.address) or _remote_of(r.last_error)
        if remote:
            add(f"Remote-MTA: dns; {_ascii(remote)}")
        diag = _reply_of(r.last_error)
        if diag:
            add(_fold_field("Diagnostic-Code", f"smtp; {diag}"))
        elif r.last_error:
            add(_fold_field("X-Relay-Diagnostic", _printable(r.last_error)[:MAX_DIAG]))
        add(f"Last-Attempt-Date: {formatdate(now, usegmt=True)}")
        if action == "delayed":
            add(f"Will-Retry-Until: {formatdate(env.arrival + lifetime, usegmt=True)}")
    add("")

    # --- 3: the original, headers only unless RET=FULL (RFC 3462 / 6533) ---
    add(f"--{boundary}")
    if full:
        ctype = "message/global" if (eight_bit and env.smtputf8) else "message/rfc822"
        desc = "Undelivered Message" if action == "failed" else "Message"
    else:
        ctype = ("message/global-headers" if (eight_bit and env.smtputf8)
                 else "text/rfc822-headers")
        desc = "Message Headers"
    add(f"Content-Type: {ctype}")
    add(f"Content-Description: {desc}")
    add(f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}")
    add("")
    # Only the To: line can be non-ASCII (an SMTPUTF8 sender); all else is ASCII.
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    data = text + returned + f"\r\n--{boundary}--\r\n".encode("ascii")

    dsn_env = Envelope(
        queue_id=new_queue_id(),
        sender="",
        recipients=[Recipient(address=env.sender)],
        arrival=now,
        body="8BITMIME" if eight_bit else None,
        smtputf8=not sender_ascii,
        size=len(data),
        is_bounce=True,
    )
    return dsn_env, data


# --- helpers ------------------------------------------------------------------------

def _crlf(data: bytes) -> bytes:
    """CRLF line ends only: bare CR and bare LF become CRLF (a returned original must
    not smuggle an end of data or a header break past a next hop)."""
    if b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b""):
        return data
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    if len(head) > MAX_HEADERS:
        cut = head.rfind(b"\r\n", 0, MAX_HEADERS)
        head = head[: cut + 2] if cut > 0 else b""
        # A cut may leave a dangling folded line: harmless, it is still a header block.
    return head


def _boundary(returned: bytes, mta: str) -> str:
    while True:
        b = f"{new_queue_id()}.{os.urandom(6).hex()}/{mta}"
        if b.encode() not in returned:
            return b


def _printable(s: str) -> str:
    """Remote text as one line of printable ASCII: controls (CR, LF: header injection)
    become spaces, other non-ASCII becomes '?'."""
    out = []
    for ch in s:
        o = ord(ch)
        if 0x20 <= o < 0x7F:
            out.append(ch)
        elif ch in "\r\n\t" or o < 0x20 or o == 0x7F:
            out.append(" ")
        else:
            out.append("?")
    return re.sub(r" {2,}", " ", "".join(out)).strip()


def _ascii(s: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "", s)


def _fold_text(s: str, width: int) -> list[str]:
    words, lines, cur = s.split(" "), [], ""
    for w in words:
        while len(w) > width:           # a token with no spaces: hard split
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(w[:width])
            w = w[width:]
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines


def _fold_field(name: str, value: str) -> str:
    """A header-style field folded at spaces (RFC 5322 2.2.3), every line < 998."""
    chunks = _fold_text(value, 76 - len(name))
    return f"{name}: " + "\r\n\t".join(chunks)


def _remote_of(last_error: str) -> str:
    m = _REMOTE.match(last_error)
    return m.group(1) if m else ""


def _reply_of(last_error: str) -> str:
    """The SMTP reply inside last_error ('550 5.1.1 ...'), printable and bounded."""
    rest = _REMOTE.sub("", last_error, count=1)
    if not _REPLY.match(rest):
        return ""
    return _printable(rest)[:MAX_DIAG]


def _addr_header(addr: str) -> str:
    """The sender as a header addr-spec: UTF-8 (RFC 6532) only when it is non-ASCII,
    which also makes the DSN an SMTPUTF8 message; controls never pass."""
    return re.sub(r"[\x00-\x20\x7f<>]", "", addr)


_QCHAR = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")


def _typed_address(addr: str) -> str:
    """RFC 3464 2.3.2 'rfc822; addr', or RFC 6533 3 'utf-8; utf-8-addr-xtext' when the
    address is not ASCII (the report part stays 7bit)."""
    if addr.isascii():
        return f"rfc822; {_ascii(addr)}"
    enc = "".join(ch if _QCHAR.fullmatch(ch) else f"\\x{{{ord(ch):X}}}" for ch in addr)
    return f"utf-8; {enc}"


_XTEXT = re.compile(r"\+([0-9A-F]{2})")


def _xtext_decoded(value: str) -> str:
    """RFC 3461 4: xtext '+HH' decoded when the result is printable ASCII; otherwise
    the value as sent (still xtext, still ASCII)."""
    dec = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)
    return dec if re.fullmatch(r"[\x20-\x7e]*", dec) else _ascii(value)


def _orcpt(orcpt: str) -> str:
    """ORCPT 'addr-type;xtext' as 'addr-type; address', the type as sent."""
    kind, sep, addr = orcpt.partition(";")
    if not sep:
        return f"rfc822; {_xtext_decoded(orcpt)}"
    kind = _ascii(kind)
    if kind.lower() == "utf-8":
        return f"{kind}; {_ascii(addr)}"    # already utf-8-addr-xtext (RFC 6533)
    return f"{kind}; {_xtext_decoded(addr)}"
