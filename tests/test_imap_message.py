"""FETCH pieces from stored bytes: sections byte-exact, ENVELOPE, BODYSTRUCTURE, junk."""

from __future__ import annotations

import pytest
from _imap import JUNK, MULTIPART

from relay.quarantine.imap.message import MessageView
from relay.quarantine.imap.proto import Atom, render
from relay.quarantine.imap.search import MessageFacts, SearchError, compile_search, parse_seqset


def test_sections_are_exact_byte_ranges():
    v = MessageView(MULTIPART)
    head_end = MULTIPART.index(b"\r\n\r\n") + 4
    assert v.section([], "", None) == MULTIPART
    assert v.section([], "HEADER", None) == MULTIPART[:head_end]
    assert v.section([], "TEXT", None) == MULTIPART[head_end:]
    assert v.section([1], "", None) == b"first part with needle"
    assert v.section([1], "MIME", None) == b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    assert v.section([2], "HEADER", None) == b"Subject: inner\r\nFrom: in@example.test\r\n\r\n"
    assert v.section([2], "TEXT", None) == b"inner body"
    assert v.section([2, 1], "", None) == b"inner body"
    assert v.section([3], "", None) == b"AAEC"
    assert v.section([4], "", None) is None
    assert v.section([], "HEADER.FIELDS", ["subject", "message-id"]) == (
        b"Subject: =?utf-8?q?caf=C3=A9_report?=\r\nMessage-ID: <m1@example.test>\r\n\r\n")
    not_fields = v.section([], "HEADER.FIELDS.NOT", ["from", "to", "subject", "date",
                                                     "message-id", "mime-version"])
    assert not_fields == b'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'


def test_envelope_and_bodystructure():
    v = MessageView(MULTIPART)
    env = render(v.envelope())
    assert env.startswith(b'("Tue, 2 Jan 2024 03:04:05 +0100" "=?utf-8?q?caf=C3=A9_report?=" '
                          b'(("Doe, John" NIL "john" "example.test")(NIL NIL "Group" NIL)'
                          b'(NIL NIL "a" "x.test")(NIL NIL "b" "y.test")(NIL NIL NIL NIL))')
    assert env.endswith(b'NIL "<m1@example.test>")')
    bs = render(v.bodystructure())
    assert bs.startswith(b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 22 0 ')
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 51 (NIL "inner" ' in bs
    assert b'"BASE64" 4 NIL ("ATTACHMENT" ("FILENAME" "a.bin")) NIL NIL) "MIXED" ' \
           b'("BOUNDARY" "BOUND") NIL NIL NIL)' in bs
    assert render(v.bodystructure(False)).endswith(b'"BASE64" 4) "MIXED")')
    assert b"NIL)(" in bs               # body-type-mpart: no space between parts


def atoms(query: list) -> list:
    """Test queries write atoms as str; the parser gives Atom for those."""
    return [atoms(q) if isinstance(q, list) else Atom(q) if isinstance(q, str) else q
            for q in query]


def facts(data: bytes, **kw) -> MessageFacts:
    v = MessageView(data)
    base = dict(seq=1, uid=7, flags=frozenset({"\\Seen"}), recent=False, size=lambda: len(data),
                internaldate=lambda: 1704164645.0, view=lambda: v)
    base.update(kw)
    return MessageFacts(**base)


@pytest.mark.parametrize("query,hit", [
    (["ALL"], True), (["SEEN"], True), (["UNSEEN"], False), (["FROM", b"JOHN"], True),
    (["SUBJECT", b"caf\xc3\xa9"], True), (["BODY", b"needle"], True),
    (["TEXT", b"inner body"], True), (["BODY", b"absent"], False),
    (["HEADER", b"Message-ID", b"m1@"], True), (["LARGER", "100"], True),
    (["SMALLER", "100"], False), (["UID", "5:*"], True), (["1"], True), (["2:*"], True),
    (["NOT", "SEEN"], False), (["OR", "UNSEEN", "FROM", b"doe"], True),
    (["SENTON", "2-Jan-2024"], True), (["SENTBEFORE", "2-Jan-2024"], False),
    (["SINCE", "2-Jan-2024"], True), (["BEFORE", "2-Jan-2024"], False),
    (["ON", b"2-Jan-2024"], True), ([["FLAGGED", "SEEN"]], False),
    (["CHARSET", "UTF-8", "TO", b"alice"], True), (["KEYWORD", "$Junk"], False),
    (["UNKEYWORD", "$Junk"], True), (["NEW"], False), (["OLD"], True),
])
def test_search_keys(query, hit):
    _, pred = compile_search(atoms(query), 1, 7)
    assert pred(facts(MULTIPART)) is hit


@pytest.mark.parametrize("query", [[], ["BOGUS"], ["FROM"], ["SINCE", "1-Foo-2020"],
                                   ["LARGER", "x"], ["0"], ["CHARSET", "KOI8-R", "ALL"],
                                   ["OR"] * 300 + ["ALL"]])
def test_search_errors(query):
    with pytest.raises(SearchError):
        compile_search(atoms(query), 1, 1)


def test_seqset():
    assert parse_seqset("1:3,7,*", 9) == [(1, 3), (7, 7), (9, 9)]
    assert parse_seqset("5:2", 9) == [(2, 5)]
    for bad in ("", "a", "1:", "0", "1,,2"):
        with pytest.raises(SearchError):
            parse_seqset(bad, 9)


@pytest.mark.parametrize("data", JUNK, ids=range(len(JUNK)))
def test_junk_never_raises(data):
    v = MessageView(data)
    render(v.envelope())
    render(v.bodystructure(True))
    render(v.bodystructure(False))
    for path in ([], [1], [1, 1], [2], [60] * 3):
        for spec in ("", "HEADER", "TEXT", "MIME"):
            v.section(path, spec, None)
    v.section([], "HEADER.FIELDS", ["from"])
    f = facts(data)
    for q in (["FROM", b"x"], ["SUBJECT", b"8"], ["TEXT", b"x"], ["BODY", b"x"],
              ["SENTSINCE", "1-Jan-2000"], ["HEADER", b"To", b""]):
        compile_search(atoms(q), 1, 7)[1](f)
