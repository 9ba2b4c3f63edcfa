"""Our IMAP answers against Dovecot's on the same Maildir: a reference implementation as
the oracle for ENVELOPE, BODYSTRUCTURE, sections and sizes of well-formed mail.

Needs Debian's dovecot-imapd (`apt-get install -y dovecot-imapd`; CI installs it); the
test is skipped where the binary is missing. Dovecot runs in the foreground on
loopback with its own config in a temporary directory, on a copy of our store."""

from __future__ import annotations

import contextlib
import imaplib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from _imap import MULTIPART, Running

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
pytestmark = pytest.mark.skipif(DOVECOT is None, reason="dovecot-imapd not installed")

ALTERNATIVE = (
    b"From: Ann <ann@example.test>\r\nSender: list@example.test\r\n"
    b"Reply-To: replies@example.test\r\nTo: alice@example.test, Bob <bob@example.test>\r\n"
    b"Cc: carol@example.test\r\nBcc: dave@example.test\r\nIn-Reply-To: <x@y>\r\n"
    b"Subject: alt\r\nDate: Wed, 3 Jan 2024 05:06:07 -0800\r\nMessage-ID: <alt@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
    b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
    b"--inner\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\nContent-Language: de, en\r\n\r\n"
    b"Gr=FC=DFe\r\nzweite Zeile\r\n\r\n"
    b"--inner\r\nContent-Type: text/html; charset=utf-8\r\nContent-ID: <h1@x>\r\n"
    b"Content-Description: the html\r\nContent-Location: http://example.test/a\r\n\r\n"
    b"<p>hi</p>\r\n\r\n--inner--\r\n\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: nested@example.test\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=n\r\n\r\n--n\r\n\r\nimplicit text\r\n"
    b"--n\r\nContent-Type: image/png; name=x.png\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: inline; filename=x.png; size=3\r\n\r\nAAAA\r\n--n--\r\n\r\n"
    b"--outer--\r\n")
PLAIN = (b"From: x@example.test\r\nTo: alice@example.test\r\nSubject: plain\r\n"
         b"Date: Thu, 4 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n")
CORPUS = [MULTIPART, ALTERNATIVE, PLAIN]
ITEMS = ("ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE BODY.PEEK[1] BODY.PEEK[1.MIME] "
         "BODY.PEEK[2] BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[1.1] BODY.PEEK[2.2] "
         "BODY.PEEK[2.2.MIME] BODY.PEEK[TEXT]<3.40> "
         "BODY.PEEK[HEADER.FIELDS (SUBJECT FROM X-QUARANTINE-REASON)]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dovecot(users_dir: Path, password: str):
    work = Path(tempfile.mkdtemp(prefix="relay-dovecot-"))
    try:
        work.chmod(0o755)      # the mail process runs as the dovecot user
        shutil.copytree(users_dir, work / "users")
        subprocess.run(["chown", "-R", "dovecot:dovecot", str(work / "users")], check=True)
        port = _free_port()
        conf = work / "dovecot.conf"
        conf.write_text(f"""
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:{work}/users/%u
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={work}/home/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
""")
        proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)])
        try:
            for _ in range(100):           # wait until it listens (bounded, not timed)
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fetch_all(port: int, n: int) -> dict[bytes, bytes]:
    """qid -> the FETCH response of that message, as one byte string."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    c.login("alice", "alicepw")
    c.select("INBOX", readonly=True)
    out = {}
    for i in range(1, n + 1):
        typ, d = c.fetch(str(i), f"(BODY.PEEK[HEADER.FIELDS (X-Quarantine-Id)] {ITEMS})")
        assert typ == "OK"
        raw = b"".join(x if isinstance(x, bytes) else x[0] + x[1] for x in d)
        qid = re.search(rb"X-Quarantine-Id: (\S+)", raw).group(1)
        out[qid] = raw
    c.logout()
    return out


def normalise(resp: bytes) -> bytes:
    """Equal meaning, equal bytes: item order and case of tokens are free (RFC 3501)."""
    resp = re.sub(rb"^\d+ \(", b"", resp.strip())[:-1]       # imaplib kept "N (...)"
    items = re.split(rb" (?=(?:ENVELOPE|BODYSTRUCTURE|BODY|RFC822\.SIZE)[ \[])", resp)
    return b"\n".join(sorted(i.strip().lower() for i in items))


def test_same_answers_as_dovecot(tmp_path):
    r = Running(tmp_path / "q")
    try:
        for m in CORPUS:
            r.put(m, "alice@example.test")
        ours = fetch_all(r.port, len(CORPUS))
    finally:
        r.stop()
    with dovecot(tmp_path / "q" / "users", "alicepw") as port:
        theirs = fetch_all(port, len(CORPUS))
    assert ours.keys() == theirs.keys()
    for qid in ours:
        a, b = normalise(ours[qid]), normalise(theirs[qid])
        assert a.split(b"\n") == b.split(b"\n"), qid
