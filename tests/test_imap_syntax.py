"""FETCH items, sections, date-time and LIST patterns, without sockets."""

from __future__ import annotations

import pytest

from relay.quarantine.imap.proto import Atom
from relay.quarantine.imap.syntax import (
    Bad,
    fetch_items,
    imap_date,
    parse_datetime,
    seq_text,
    wildcard_match,
)


def test_fetch_macros_and_sections():
    assert [n for n, _ in fetch_items(Atom("FAST"))] == ["FLAGS", "INTERNALDATE",
                                                         "RFC822.SIZE"]
    items = fetch_items([Atom("UID"), Atom("body.peek[1.2.MIME]<10.20>"),
                         Atom("BODY[HEADER.FIELDS.NOT (From \"To\")]"), Atom("BODY[]")])
    assert items[0] == ("UID", None)
    assert items[1] == ("BODY[]", ([1, 2], "MIME", None, (10, 20), "1.2.MIME", True))
    assert items[2] == ("BODY[]", ([], "HEADER.FIELDS.NOT", ["from", "to"], None,
                                   "HEADER.FIELDS.NOT (FROM TO)", False))
    assert items[3] == ("BODY[]", ([], "", None, None, "", False))


@pytest.mark.parametrize("bad", ["BODY[MIME]", "BODY[0]", "BODY[1..2]", "BODY[.TEXT]",
                                 "BODY[HEADER.FIELDS ()]", "BODY[]<1.0>", "FOO",
                                 "BODY[1.TEXTX]", "BODY[" + ".".join(["1"] * 60) + "]"])
def test_bad_items(bad):
    with pytest.raises(Bad):
        fetch_items([Atom(bad)])


def test_dates():
    assert parse_datetime("01-Feb-2024 10:11:12 +0100") == 1706778672.0
    assert parse_datetime(" 1-Feb-2024 09:11:12 +0000") == 1706778672.0
    assert imap_date(1706778672.0) == "01-Feb-2024 09:11:12 +0000"
    for bad in ("2024-02-01", "01-Foo-2024 10:11:12 +0100", "31-Feb-2024 10:11:12 +0000"):
        with pytest.raises(Bad):
            parse_datetime(bad)


@pytest.mark.parametrize("pattern,name,hit", [
    ("*", "a.b.c", True), ("%", "a.b", False), ("%", "a", True), ("a.%", "a.b", True),
    ("a.%", "a.b.c", False), ("a*", "a.b.c", True), ("*c", "a.b.c", True),
    ("INBOX", "INBOX", True), ("x", "xy", False), ("", "", True), ("*a*a*a*b", "a" * 50,
                                                                     False),
])
def test_wildcards(pattern, name, hit):
    assert wildcard_match(pattern, name) is hit


def test_seq_text():
    assert seq_text([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
