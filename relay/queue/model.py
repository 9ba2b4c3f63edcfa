"""Queue records: a queued message's envelope and per-recipient state, as values.

Takes nothing from the network directly: relay.smtp fills these from validated envelope
data, relay.queue.spool stores them (JSON, length-prefixed, never lines built from client
strings), relay.delivery updates recipient states. Queue names are Postfix's, so an
operator's vocabulary carries over.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any


class QueueName(enum.Enum):
    """Where a message is, as Postfix names it. `incoming` is not yet a promise (no 250
    was sent); a message exists for delivery only once its record is complete and synced."""

    INCOMING = "incoming"
    ACTIVE = "active"       # due now or being delivered
    DEFERRED = "deferred"   # waiting for its next attempt
    HOLD = "hold"           # kept by an operator (`relay queue hold`), never delivered
    CORRUPT = "corrupt"     # unreadable record, moved aside for a human


class RcptState(enum.Enum):
    PENDING = "pending"     # not yet accepted by a next hop (maybe deferred)
    DONE = "done"           # a next hop said 2xx: never sent again
    BOUNCED = "bounced"     # 5xx, or expired: a DSN was (or will be) made


@dataclass
class Recipient:
    address: str
    # DSN (RFC 3461) parameters exactly as sent: NOTIFY, ORCPT.
    notify: str | None = None
    orcpt: str | None = None
    state: RcptState = RcptState.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    # Next hop chosen by a filter (routing), overriding transport map / MX.
    route: str | None = None
    # Set once the sender was told: bounce sent, or delay warning sent.
    dsn_sent: bool = False
    delay_warned: bool = False


@dataclass
class Envelope:
    queue_id: str
    sender: str                           # "" is the null reverse-path (bounces)
    recipients: list[Recipient]
    arrival: float = field(default_factory=time.time)
    # MAIL parameters (RFC 3461, 6152, 6531), values exactly as sent.
    ret: str | None = None                # FULL | HDRS
    envid: str | None = None
    body: str | None = None               # 7BIT | 8BITMIME
    smtputf8: bool = False
    size: int = 0                         # bytes of head + body as stored
    client_ip: str = ""
    client_helo: str = ""
    auth_user: str = ""
    listener: str = ""
    held: bool = False
    # The filter that quarantined or released this message, if any: release skips it.
    skip_filter: str = ""
    # Set on messages we generated (DSNs): never bounce a bounce.
    is_bounce: bool = False
    # The stored bytes are CRLF-only and no line starts with '.': their wire form is
    # themselves plus ".CRLF" (set by the inbound session, which scanned every byte).
    wire_ready: bool = False
    # Does the stored message have bytes above 127 (BODY=8BITMIME, RFC 6152)? Set at
    # receipt; None (older spools) makes delivery scan the stored bytes once to find out.
    eight_bit: bool | None = None

    def to_json(self) -> dict[str, Any]:
        # Shallow copies, not dataclasses.asdict (a deep, recursive copy): this runs for
        # every message and every state change. Every field is a plain value.
        d = dict(self.__dict__)
        d["recipients"] = [{**r.__dict__, "state": r.state.value} for r in self.recipients]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Envelope:
        d = dict(d)
        d["recipients"] = [Recipient(**{**r, "state": RcptState(r["state"])})
                           for r in d["recipients"]]
        return cls(**d)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is RcptState.PENDING]

    @property
    def finished(self) -> bool:
        return not self.pending()

    def queue_name(self, now: float | None = None) -> QueueName:
        if self.held:
            return QueueName.HOLD
        now = time.time() if now is None else now
        due = [r for r in self.pending() if r.next_attempt <= now]
        return QueueName.ACTIVE if due or not self.pending() else QueueName.DEFERRED

    def next_attempt(self) -> float:
        return min((r.next_attempt for r in self.pending()), default=0.0)


_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ"


def new_queue_id() -> str:
    """Postfix-style long queue id: time-ordered, unique across processes, grep-able.
    12 chars of microsecond time in base 30 + 6 random chars; no vowels, so it never
    spells words."""
    n = time.time_ns() // 1000
    out = []
    for _ in range(12):
        n, r = divmod(n, 30)
        out.append(_ALPHABET[r])
    # Uniqueness, not secrecy: the random module (reseeded in each forked worker)
    # costs no system call, unlike os.urandom.
    rnd = random.getrandbits(30)
    for _ in range(6):
        rnd, r = divmod(rnd, 30)
        out.append(_ALPHABET[r])
    return "".join(reversed(out[:12])) + "".join(out[12:])
