"""Content filter (filters.headers): header and body regexes, attachment blocking in
nested multiparts and attached messages, each action, option errors naming the key,
and MIME bombs that must stay bounded."""

from __future__ import annotations

import asyncio
import base64
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from filters.headers import HeadersFilter, walk
from relay.config import ConfigError, FilterConfig
from relay.pipeline import loader
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage

ENV = FilterEnv(hostname="relay.test", resolver=Resolver())


def crlf(msg) -> bytes:
    data = msg.as_bytes() if not isinstance(msg, bytes) else msg
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def ctx(message: bytes) -> Context:
    c = Context("192.0.2.1", 4000, "mta", Resolver(), queue_id="QID1",
                mail_from="a@x.test", rcpts=["b@y.test"])

    async def load():
        return message
    c._load = load
    return c


def check(options: dict, message: bytes):
    return asyncio.run(HeadersFilter(options, ENV).on_data(ctx(message)))


def plain(subject="hello", body="just text\n", **headers) -> bytes:
    m = EmailMessage()
    m["From"] = "a@x.test"
    m["To"] = "b@y.test"
    m["Subject"] = subject
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(body)
    return crlf(m)


def with_attachment(filename: str, ctype=("application", "octet-stream"), nest=False,
                    forward=False) -> bytes:
    outer = MIMEMultipart("mixed")
    outer["From"] = "a@x.test"
    outer["Subject"] = "files"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("see attached", "plain"))
    alt.attach(MIMEText("<p>see attached</p>", "html"))
    outer.attach(alt)
    att = MIMEApplication(b"MZ\x90\x00payload", _subtype=ctype[1])
    if ctype[0] != "application":
        att.replace_header("Content-Type", f"{ctype[0]}/{ctype[1]}")
    att.add_header("Content-Disposition", "attachment", filename=filename)
    if forward:
        inner = MIMEMultipart("mixed")
        inner["Subject"] = "forwarded"
        inner.attach(MIMEText("fwd", "plain"))
        inner.attach(att)
        outer.attach(MIMEMessage(inner))
    elif nest:
        deeper = MIMEMultipart("mixed")
        deeper.attach(MIMEText("inner", "plain"))
        deeper.attach(att)
        outer.attach(deeper)
    else:
        outer.attach(att)
    return crlf(outer)


BLOCK_EXE = {"attachments": [{"name": "executables", "extensions": ["exe", ".JS", "scr"],
                              "action": "reject", "text": "Attachment type not allowed"}]}


# --- header checks ------------------------------------------------------------------

def test_header_regex_on_one_field_decodes_encoded_words():
    opts = {"header_checks": [{"header": "Subject", "regex": "(?i)viagra",
                               "action": "reject"}]}
    v = check(opts, plain(subject="Cheap VIAGRA now"))
    assert v.action is Action.REJECT and v.code == 550 and v.enhanced == "5.7.1"
    assert v.text == "Message content rejected"               # generic by default
    msg = plain().replace(b"Subject: hello", b"Subject: =?utf-8?b?"
                          + base64.b64encode("Viagra günstig".encode()) + b"?=")
    assert check(opts, msg).action is Action.REJECT
    assert check(opts, plain(subject="hello")).action is Action.CONTINUE


def test_header_regex_on_whole_lines():
    opts = {"header_checks": [{"regex": r"^X-Mailer: .*BulkBlaster", "action": "discard",
                               "name": "bulk"}]}
    v = check(opts, plain(X_Mailer="BulkBlaster 3.0"))
    assert v.action is Action.DISCARD and "bulk" in v.reason
    assert check(opts, plain(X_Other="BulkBlaster")).action is Action.CONTINUE


def test_header_check_quarantine_and_continue_exemption():
    opts = {"header_checks": [
        {"header": "From", "regex": "@trusted\\.test", "action": "continue"},
        {"header": "Subject", "regex": "invoice", "action": "quarantine",
         "mailbox": "Review"},
    ], **BLOCK_EXE}
    v = check(opts, plain(subject="invoice 42"))
    assert v.action is Action.QUARANTINE and v.mailbox == "Review"
    # The exemption ends this filter's checks: even the exe passes.
    msg = with_attachment("x.exe").replace(b"From: a@x.test", b"From: boss@trusted.test")
    assert check(opts, msg).action is Action.CONTINUE
    assert check(opts, with_attachment("x.exe")).action is Action.REJECT


def test_headers_in_body_are_not_headers():
    opts = {"header_checks": [{"header": "Subject", "regex": "evil", "action": "reject"}]}
    assert check(opts, plain(body="Subject: evil\n")).action is Action.CONTINUE


# --- attachments --------------------------------------------------------------------

@pytest.mark.parametrize("filename", [
    "invoice.exe", "INVOICE.EXE", "report.pdf.exe", "x.js", "x.exe.", "x.exe . ",
    "setup.scr", "dir\\x.exe", "naïve.exe",
])
def test_blocked_extensions(filename):
    v = check(BLOCK_EXE, with_attachment(filename))
    assert v.action is Action.REJECT and v.text == "Attachment type not allowed"


@pytest.mark.parametrize("filename", ["report.pdf", "exe", "x.exe.pdf", "notes.txt",
                                      "x.executable"])
def test_allowed_extensions(filename):
    assert check(BLOCK_EXE, with_attachment(filename)).action is Action.CONTINUE


def test_blocked_inside_nested_multipart_and_forwarded_message():
    assert check(BLOCK_EXE, with_attachment("a.exe", nest=True)).action is Action.REJECT
    assert check(BLOCK_EXE, with_attachment("a.exe", forward=True)).action is Action.REJECT
    assert check(BLOCK_EXE, with_attachment("a.pdf", forward=True)).action is Action.CONTINUE


def test_filename_in_content_type_name_and_rfc2231_and_encoded_word():
    base = with_attachment("placeholder.bin")
    # Only a Content-Type name= parameter, no disposition file name.
    only_name = base.replace(b'Content-Disposition: attachment; filename="placeholder.bin"\r\n',
                             b"").replace(b"Content-Type: application/octet-stream",
                                          b'Content-Type: application/octet-stream; name="a.exe"')
    assert b"a.exe" in only_name
    assert check(BLOCK_EXE, only_name).action is Action.REJECT
    rfc2231 = base.replace(b'filename="placeholder.bin"',
                           b"filename*=utf-8''r%C3%A9sum%C3%A9.exe")
    assert check(BLOCK_EXE, rfc2231).action is Action.REJECT
    split = base.replace(b'filename="placeholder.bin"',
                         b'filename*0="inv"; filename*1="oice.e"; filename*2="xe"')
    assert check(BLOCK_EXE, split).action is Action.REJECT
    encoded = base.replace(b'filename="placeholder.bin"',
                           b'filename="=?utf-8?q?r=C3=A9sum=C3=A9=2Eexe?="')
    assert check(BLOCK_EXE, encoded).action is Action.REJECT


def test_mime_type_rules_with_wildcards():
    opts = {"attachments": [{"mime_types": ["application/x-msdownload", "audio/*"],
                             "action": "quarantine", "mailbox": "Media"}]}
    v = check(opts, with_attachment("a.bin", ("application", "x-msdownload"), nest=True))
    assert v.action is Action.QUARANTINE and v.mailbox == "Media"
    assert check(opts, with_attachment("a.mp3", ("audio", "mpeg"))).action is Action.QUARANTINE
    assert check(opts, with_attachment("a.bin")).action is Action.CONTINUE


# --- body checks --------------------------------------------------------------------

def test_body_regex_in_decoded_text_parts():
    opts = {"body_checks": [{"regex": "(?i)wire transfer", "action": "quarantine",
                             "mailbox": "Fraud"}]}
    for cte in ("base64", "quoted-printable", "7bit"):
        m = MIMEMultipart("mixed")
        t = MIMEText("Please make a WIRE TRANSFER\ntoday", "plain", "utf-8")
        if cte != "base64":
            del t["Content-Transfer-Encoding"]
            if cte == "quoted-printable":
                t.set_payload("Please make a WIRE=20TRANS=\nFER today")
                t["Content-Transfer-Encoding"] = "quoted-printable"
            else:
                t.set_payload("Please make a WIRE TRANSFER today")
                t["Content-Transfer-Encoding"] = "7bit"
        m.attach(t)
        v = check(opts, crlf(m))
        assert v.action is Action.QUARANTINE, cte
    assert check(opts, plain(body="nothing here\n")).action is Action.CONTINUE


def test_body_regex_does_not_scan_binary_attachments():
    opts = {"body_checks": [{"regex": "payload", "action": "reject"}]}
    assert check(opts, with_attachment("a.bin")).action is Action.CONTINUE
    assert check(opts, plain(body="payload\n")).action is Action.REJECT


def test_body_text_budget():
    opts = {"body_checks": [{"regex": "NEEDLE", "action": "reject"}],
            "max_body_text": 1000}
    assert check(opts, plain(body="x" * 500 + "NEEDLE\n")).action is Action.REJECT
    assert check(opts, plain(body="x" * 5000 + "NEEDLE\n")).action is Action.CONTINUE


# --- bounds: MIME bombs ----------------------------------------------------------------

def nested(depth: int, leaf: bytes = b"Content-Type: text/plain\r\n\r\nhi\r\n") -> bytes:
    body = leaf
    for i in range(depth):
        b = f"b{i}".encode()
        body = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b
                + b"\r\n" + body + b"\r\n--" + b + b"--\r\n")
    return b"From: a@x.test\r\nMIME-Version: 1.0\r\n" + body


def test_deep_nesting_stops_at_the_limit():
    bomb = nested(5000, b'Content-Type: application/octet-stream; name="x.exe"\r\n\r\nMZ\r\n')
    w = walk(bomb, max_depth=16)
    assert "nesting" in w.limit and len(w.parts) == 17
    v = check({**BLOCK_EXE, "max_depth": 16}, bomb)
    assert v.action is Action.REJECT and "nesting" in v.reason
    shallow = nested(3, b'Content-Type: application/octet-stream; name="x.exe"\r\n\r\nMZ\r\n')
    assert check(BLOCK_EXE, shallow).action is Action.REJECT
    assert "executables" in check(BLOCK_EXE, shallow).reason


def test_many_parts_stop_at_the_limit():
    parts = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(100_000))
    bomb = (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n" + parts + b"--B--\r\n")
    w = walk(bomb, max_parts=256)
    assert len(w.parts) == 256 and "parts" in w.limit
    opts = {**BLOCK_EXE, "on_limit": "quarantine", "on_limit_mailbox": "Odd"}
    v = check(opts, bomb)
    assert v.action is Action.QUARANTINE and v.mailbox == "Odd"
    assert check({**BLOCK_EXE, "on_limit": "continue"}, bomb).action is Action.CONTINUE


def test_scan_cap_bounds_a_huge_message():
    huge = plain(body="a" * 10 + "\n") + b"A" * (40 * 1024 * 1024)
    w = walk(huge[: 1024 * 1024], max_text=1000)
    assert sum(len(t) for t in w.texts) <= 1000
    opts = {"body_checks": [{"regex": "Z", "action": "reject"}],
            "max_scan_bytes": "1MiB", "max_body_text": 1000}
    assert check(opts, huge).action is Action.CONTINUE


def test_walker_on_garbage_does_not_raise():
    for junk in [b"", b"\r\n", b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
                 b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\nx",
                 b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
                 b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--xx\r\n--x",
                 b"Content-Type: message/rfc822\r\n\r\n",
                 b"Content-Type: text/plain; charset=bogus-9\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64",
                 bytes(range(256)) * 10]:
        walk(junk)


def test_walker_sees_every_part_once():
    w = walk(with_attachment("a.pdf", forward=True))
    types = [p.content_type for p in w.parts]
    assert types == ["multipart/mixed", "multipart/alternative", "text/plain", "text/html",
                     "message/rfc822", "multipart/mixed", "text/plain",
                     "application/octet-stream"]
    assert [p.filename for p in w.parts if p.filename] == ["a.pdf"]
    assert w.parts[-1].depth == 3


# --- options ------------------------------------------------------------------------

@pytest.mark.parametrize("opts,key", [
    ({"header_checks": [{"regex": "("}]}, "filters.headers.header_checks[0].regex"),
    ({"header_checks": [{"header": "Subject"}]}, "filters.headers.header_checks[0].regex"),
    ({"header_checks": [{"regex": "x", "action": "bounce"}]},
     "filters.headers.header_checks[0].action"),
    ({"body_checks": [{"regex": "x", "action": "quarantine"}]},
     "filters.headers.body_checks[0].mailbox"),
    ({"body_checks": [{"regex": "x", "header": "Subject"}]},
     "filters.headers.body_checks[0].header"),
    ({"attachments": [{"action": "reject"}]}, "filters.headers.attachments[0].extensions"),
    ({"attachments": [{"mime_types": ["exe"]}]}, "filters.headers.attachments[0].mime_types[0]"),
    ({"attachments": [{"extensions": ["."]}]}, "filters.headers.attachments[0].extensions[0]"),
    ({"max_scan_bytes": "lots"}, "filters.headers.max_scan_bytes"),
    ({"max_depth": 0}, "filters.headers.max_depth"),
    ({"on_limit": "quarantine"}, "filters.headers.on_limit_mailbox"),
    ({"header_check": []}, "filters.headers.header_check"),
])
def test_config_errors_name_the_key(opts, key):
    with pytest.raises(ConfigError) as e:
        HeadersFilter(opts, ENV)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_through_the_loader_and_chain():
    chain = loader.load((FilterConfig(name="headers", options=BLOCK_EXE),), ENV)
    v = asyncio.run(chain.run(Stage.DATA, ctx(with_attachment("a.exe", nest=True))))
    assert v.action is Action.REJECT and v.filter == "headers"
    v = asyncio.run(chain.run(Stage.DATA, ctx(with_attachment("a.pdf"))))
    assert v.action is Action.CONTINUE
