"""IMAP sequence sets and SEARCH criteria: tokens -> a matcher, evaluated per message.

Takes the tokens of a SEARCH (or UID SEARCH) command from proto.Parser and hands on a
predicate the session evaluates against each message (`MessageFacts`). Trusts nothing:
unknown keys, bad dates and bad sets raise SearchError (the session answers BAD); the
number of keys is capped so a crafted OR chain cannot recurse without bound. Matching
is case-insensitive substring on decoded text (RFC 3501 6.4.4); junk headers match as
raw text and never raise.
RFCs: 3501 (6.4.4 SEARCH, 9 sequence-set).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass

from relay.quarantine.imap.proto import Atom

MAX_KEYS = 200
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}


class SearchError(Exception):
    pass


# --- sequence sets (RFC 3501 9: sequence-set) ------------------------------------------

def parse_seqset(text: str, largest: int) -> list[tuple[int, int]]:
    """'1:3,7,9:*' -> [(1, 3), (7, 7), (9, largest)]; '*' = largest (0 when empty)."""
    if not text or len(text) > 10000:
        raise SearchError("Invalid sequence set")
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+|\*)(?::(\d+|\*))?", item)
        if not m:
            raise SearchError("Invalid sequence set")
        a = largest if m.group(1) == "*" else int(m.group(1))
        b = a if m.group(2) is None else largest if m.group(2) == "*" else int(m.group(2))
        if (m.group(1) != "*" and a == 0) or (m.group(2) not in (None, "*") and b == 0):
            raise SearchError("Invalid sequence set: 0 is not a message number")
        out.append((min(a, b), max(a, b)))
    return out


def in_set(n: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= n <= b for a, b in ranges)


def parse_date(tok) -> float:
    """RFC 3501 date ('1-Feb-1994', quoted or not) -> UTC midnight timestamp."""
    s = tok.decode("ascii", "replace") if isinstance(tok, bytes) else str(tok)
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", s)
    if not m or m.group(2).lower() not in _MONTHS:
        raise SearchError("Invalid date")
    try:
        return float(calendar.timegm((int(m.group(3)), _MONTHS[m.group(2).lower()],
                                      int(m.group(1)), 0, 0, 0)))
    except (ValueError, OverflowError):
        raise SearchError("Invalid date") from None


# --- criteria ---------------------------------------------------------------------------

@dataclass
class MessageFacts:
    """What a criterion may ask of one message; the costly parts are callables so that
    flag-only searches never read a file."""

    seq: int
    uid: int
    flags: frozenset[str]
    recent: bool
    size: Callable[[], int]
    internaldate: Callable[[], float]
    view: Callable[[], object]      # -> message.MessageView


Pred = Callable[[MessageFacts], bool]


def _text(tok) -> str:
    if isinstance(tok, bytes):
        return tok.decode("utf-8", "replace")
    if isinstance(tok, Atom):
        return str(tok)
    raise SearchError("Expected a string")


def _day(ts: float) -> float:
    return ts - ts % 86400


class _Compiler:
    def __init__(self, tokens: list, max_seq: int, max_uid: int) -> None:
        self.tokens = tokens
        self.i = 0
        self.max_seq, self.max_uid = max_seq, max_uid
        self.count = 0

    def take(self):
        if self.i >= len(self.tokens):
            raise SearchError("Missing search argument")
        t = self.tokens[self.i]
        self.i += 1
        return t

    def all(self) -> Pred:
        preds = []
        while self.i < len(self.tokens):
            preds.append(self.key())
        if not preds:
            raise SearchError("Missing search criteria")
        return _and(preds)

    def key(self) -> Pred:
        self.count += 1
        if self.count > MAX_KEYS:
            raise SearchError("Too many search keys")
        t = self.take()
        if isinstance(t, list):
            if not t:
                raise SearchError("Empty search list")
            sub = _Compiler(t, self.max_seq, self.max_uid)
            sub.count = self.count
            p = sub.all()
            self.count = sub.count
            return p
        if not isinstance(t, Atom):
            raise SearchError("Unexpected string in search criteria")
        k = t.upper()
        flag_keys = {"ANSWERED": "\\Answered", "DELETED": "\\Deleted", "DRAFT": "\\Draft",
                     "FLAGGED": "\\Flagged", "SEEN": "\\Seen"}
        if k == "ALL":
            return lambda m: True
        if k in flag_keys:
            f = flag_keys[k]
            return lambda m: f in m.flags
        if k.startswith("UN") and k[2:] in flag_keys:
            f = flag_keys[k[2:]]
            return lambda m: f not in m.flags
        if k == "NEW":
            return lambda m: m.recent and "\\Seen" not in m.flags
        if k == "OLD":
            return lambda m: not m.recent
        if k == "RECENT":
            return lambda m: m.recent
        if k in ("KEYWORD", "UNKEYWORD"):
            kw = _text(self.take()).lower()
            neg = k == "UNKEYWORD"
            return lambda m: (kw in {f.lower() for f in m.flags}) != neg
        if k in ("BCC", "CC", "FROM", "SUBJECT", "TO"):
            name, needle = k.lower(), _text(self.take()).lower()
            return lambda m: needle in m.view().header_text(name).lower()
        if k == "HEADER":
            name, needle = _text(self.take()).lower(), _text(self.take()).lower()
            if not needle:
                return lambda m: m.view().root.header(name) is not None
            return lambda m: needle in m.view().header_text(name).lower()
        if k == "BODY":
            needle = _text(self.take()).lower()
            return lambda m: needle in m.view().body_text().lower()
        if k == "TEXT":
            needle = _text(self.take()).lower()
            return lambda m: (needle in m.view().all_headers_text().lower()
                              or needle in m.view().body_text().lower())
        if k in ("BEFORE", "ON", "SINCE"):
            d = parse_date(self.take())
            return _date_pred(k, d, lambda m: _day(m.internaldate()))
        if k in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            d = parse_date(self.take())

            def sent(m: MessageFacts) -> float | None:
                ts = m.view().date()
                return None if ts is None else _day(ts)
            return _date_pred(k[4:], d, sent)
        if k in ("LARGER", "SMALLER"):
            t2 = self.take()
            if not isinstance(t2, Atom) or not t2.isdigit():
                raise SearchError("Expected a number")
            n = int(t2)
            if k == "LARGER":
                return lambda m: m.size() > n
            return lambda m: m.size() < n
        if k == "NOT":
            p = self.key()
            return lambda m: not p(m)
        if k == "OR":
            a, b = self.key(), self.key()
            return lambda m: a(m) or b(m)
        if k == "UID":
            t2 = self.take()
            ranges = parse_seqset(_text(t2), self.max_uid)
            return lambda m: in_set(m.uid, ranges)
        if re.fullmatch(r"[\d*:,]+", k):
            ranges = parse_seqset(k, self.max_seq)
            return lambda m: in_set(m.seq, ranges)
        raise SearchError(f"Unknown search key {k[:30]}")


def _date_pred(k: str, d: float, get: Callable[[MessageFacts], float | None]) -> Pred:
    def pred(m: MessageFacts) -> bool:
        v = get(m)
        if v is None:
            return False
        return v < d if k == "BEFORE" else v == d if k == "ON" else v >= d
    return pred


def _and(preds: list[Pred]) -> Pred:
    if len(preds) == 1:
        return preds[0]
    return lambda m: all(p(m) for p in preds)


def compile_search(tokens: list, max_seq: int, max_uid: int) -> tuple[str, Pred]:
    """SEARCH arguments -> (charset, predicate). Only UTF-8 and US-ASCII are known;
    anything else is SearchError('[BADCHARSET ...]') per RFC 3501 6.4.4."""
    charset = "UTF-8"
    if len(tokens) >= 2 and isinstance(tokens[0], Atom) and tokens[0].upper() == "CHARSET":
        charset = _text(tokens[1]).upper()
        tokens = tokens[2:]
        if charset not in ("UTF-8", "US-ASCII"):
            raise SearchError("[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
    return charset, _Compiler(tokens, max_seq, max_uid).all()
