"""IMAP argument syntax above the token level, sans I/O: FETCH items and body sections,
date-time, LIST patterns, UID set text.

Takes tokens from proto.Parser (atoms, strings) and hands on plain values to the
session: `fetch_items` -> [(name, spec)], `parse_datetime` -> timestamp,
`wildcard_match` for LIST/LSUB, `seq_text` for UIDPLUS response codes. Trusts nothing:
every malformed item raises Bad (the session answers BAD); section paths are capped;
LIST patterns are matched without regular expressions, so no crafted pattern can make
matching slow.
RFCs: 3501 (6.4.5 FETCH, 6.3.8 LIST, 9 date-time), 4315 (uid-set).
"""

from __future__ import annotations

import calendar
import datetime
import re
import time

from relay.quarantine.imap.proto import Atom

DELIMITER = "."
MONTHS = [m for m in calendar.month_abbr]


class Bad(Exception):
    """Answer BAD with this text."""


def imap_date(ts: float) -> str:
    t = time.gmtime(ts)
    return f"{t.tm_mday:02d}-{MONTHS[t.tm_mon]}-{t.tm_year:04d} " \
           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def parse_datetime(s: str) -> float:
    """APPEND's date-time ('01-Feb-2024 10:11:12 +0100', RFC 3501 9) -> timestamp."""
    m = re.fullmatch(r" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)",
                     s)
    months = {x.lower(): i for i, x in enumerate(MONTHS) if x}
    if not m or m.group(2).lower() not in months:
        raise Bad("Invalid date-time")
    try:
        dt = datetime.datetime(int(m.group(3)), months[m.group(2).lower()], int(m.group(1)),
                               int(m.group(4)), int(m.group(5)), int(m.group(6)),
                               tzinfo=datetime.UTC)
    except ValueError:      # 31-Feb, hour 25, ...
        raise Bad("Invalid date-time") from None
    off = (int(m.group(8)) * 60 + int(m.group(9))) * 60
    return dt.timestamp() - off if m.group(7) == "+" else dt.timestamp() + off


def wildcard_match(pattern: str, name: str) -> bool:
    """LIST pattern match ('*' anything, '%' anything but the delimiter), by dynamic
    programming: O(len(pattern) * len(name)), no regex backtracking to exploit."""
    prev = [True] + [False] * len(name)
    for pc in pattern:
        cur = [False] * (len(name) + 1)
        if pc in "*%":
            cur[0] = prev[0]
            for j in range(1, len(name) + 1):
                cur[j] = prev[j] or (cur[j - 1] and (pc == "*" or name[j - 1] != DELIMITER))
        else:
            for j in range(1, len(name) + 1):
                cur[j] = prev[j - 1] and name[j - 1] == pc
        prev = cur
    return prev[-1]


def seq_text(nums: list[int]) -> str:
    """[1,2,3,7] -> '1:3,7' (UIDPLUS response sets)."""
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)


_SECTION_RE = re.compile(
    r"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z", re.IGNORECASE)


def fetch_items(tok) -> list[tuple[str, object]]:
    """FETCH attributes -> [(name, spec)]; macros expanded (RFC 3501 6.4.5)."""
    if isinstance(tok, Atom):
        up = tok.upper()
        macros = {"ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
                  "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
                  "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]}
        if up in macros:
            return [(n, None) for n in macros[up]]
        toks = [tok]
    elif isinstance(tok, list) and tok:
        toks = tok
    else:
        raise Bad("Invalid FETCH items")
    out: list[tuple[str, object]] = []
    simple = {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
              "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
    for t in toks:
        if not isinstance(t, Atom):
            raise Bad("Invalid FETCH item")
        up = t.upper()
        if up in simple:
            out.append((up, None))
            continue
        m = _SECTION_RE.match(str(t))
        if not m:
            raise Bad(f"Unknown FETCH item {str(t)[:40]}")
        out.append(("BODY[]", _section(m)))
    return out


def _section(m: re.Match) -> tuple:
    peek = m.group(1).upper() == "BODY.PEEK"
    raw = m.group(2)
    fields = None
    mm = re.fullmatch(r"([0-9.]*?)\.?(HEADER\.FIELDS(?:\.NOT)?)\s*\((.*)\)\s*", raw,
                      re.IGNORECASE)
    if mm:
        nums, spec = mm.group(1), mm.group(2).upper()
        fields = [x.strip('"').lower() for x in mm.group(3).split()]
        if not fields:
            raise Bad("Empty header field list")
        echo = (nums + "." if nums else "") + spec + " (" + " ".join(
            x.upper() for x in fields) + ")"
    else:
        mm = re.fullmatch(r"((?:[1-9]\d{0,5})(?:\.[1-9]\d{0,5})*)?(?:\.?(HEADER|TEXT|MIME))?",
                          raw, re.IGNORECASE)
        if not mm or (mm.group(1) is None and (mm.group(2) or "").upper() == "MIME"):
            raise Bad("Invalid section")
        if mm.group(1) and mm.group(2) and not raw[len(mm.group(1)):].startswith("."):
            raise Bad("Invalid section")
        if not mm.group(1) and raw[:1] == ".":
            raise Bad("Invalid section")
        nums, spec = mm.group(1) or "", (mm.group(2) or "").upper()
        echo = nums + ("." if nums and spec else "") + spec
    path = [int(x) for x in nums.split(".") if x] if nums else []
    if len(path) > 50:
        raise Bad("Section too deep")
    partial = None
    if m.group(3) is not None:
        length = int(m.group(4))
        if length == 0:
            raise Bad("Partial length must be positive")
        partial = (int(m.group(3)), length)
    return (path, spec, fields, partial, echo, peek)
