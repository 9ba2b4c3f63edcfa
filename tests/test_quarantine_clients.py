"""Real Debian mail clients fetch the quarantine over POP3: fetchmail and curl.

Needs `apt-get install -y fetchmail` (curl is in the base image). Each test is skipped
with a message naming the missing binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from _pop3 import TLS, LoopThread, envelope, make_store, message

from relay.quarantine.pop3.server import start_pop3
from relay.quarantine.store import INBOX

BODY = b"first\r\n.dotted line\r\n..double\r\nlast\r\n"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (apt-get install -y {binary})")
    return path


@pytest.fixture
def quarantine(tmp_path):
    lt = LoopThread()
    store = make_store(tmp_path)
    tls = TLS(tmp_path)
    for subject in ("one", "two"):
        lt.run(store.put(envelope("bob@example.test"), message(subject, BODY), "spam",
                         "spamfilter", "score 12"))
    servers = []

    def serve(**kw) -> int:
        async def go():
            return await start_pop3(store.cfg, store, tls.server, "127.0.0.1", 0, **kw)
        srv = lt.run(go())
        servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    yield store, tls, serve
    for s in servers:
        s.close()
    lt.stop()


def stored(store, n: int) -> bytes:
    f = store.folder("bob", INBOX)
    return f.read(f.messages[n])


def run_fetchmail(tmp_path, port: int, tls_lines: str, keep: bool = True):
    out = tmp_path / "out.mbox"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 service {port} protocol pop3 auth password\n'
        f'  timeout 30\n'
        f'  user "bob" password "bobpw" is "root" here\n'
        f'  {"keep" if keep else "nokeep"} fetchall {tls_lines}\n'
        f'  mda "/usr/bin/tee -a {out} > /dev/null"\n')
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    proc = subprocess.run([need("fetchmail"), "-f", str(rc), "--nodetach", "-v",
                           "--idfile", str(tmp_path / "ids"), "--nosyslog"],
                          capture_output=True, env=env, timeout=120)
    return proc, out


def fetched(path) -> list[bytes]:
    """The messages the MDA got, without the Received field fetchmail puts on top
    (fetchmail hands its MDA LF line ends)."""
    out = []
    for part in path.read_bytes().split(b"Received: from ")[1:]:
        lines = part.split(b"\n")[1:]
        while lines and lines[0][:1] in (b"\t", b" "):
            lines.pop(0)
        out.append(b"\n".join(lines))
    return out


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_fetchmail_fetches_the_quarantine(tmp_path, quarantine):
    store, tls, serve = quarantine
    port = serve()
    proc, out = run_fetchmail(tmp_path, port, "sslproto ''")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    # every byte as stored (line ends aside), the dots unstuffed again
    assert fetched(out) == [lf(stored(store, 0)), lf(stored(store, 1))]
    assert len(store.folder("bob", INBOX).messages) == 2       # keep: nothing deleted


def test_fetchmail_over_stls_with_certificate_check_and_delete(tmp_path, quarantine):
    store, tls, serve = quarantine
    port = serve(cleartext_login=False)
    proc, out = run_fetchmail(
        tmp_path, port, f"sslproto tls1.2+ sslcertck sslcertfile {tls.ca_file}"
        # fetchmail matches the certificate's DNS names only, never an IP address
        " sslcommonname localhost", keep=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"STLS" in proc.stderr or b"STLS" in proc.stdout
    assert [b"Subject: one" in m and b"Subject: two" not in m for m in fetched(out)] == [
        True, False]
    assert len(fetched(out)) == 2
    # nokeep: fetchmail sent DELE + QUIT, the default pop3_delete=discard removed them
    assert store.folder("bob", INBOX).messages == []
    assert [m.qid for m in store.folder("admin", "spam").messages] != []


def test_curl_list_retr_uidl(tmp_path, quarantine):
    store, tls, serve = quarantine
    port = serve()
    curl = need("curl")
    base = f"pop3://127.0.0.1:{port}"
    listing = subprocess.run([curl, "-sS", base + "/", "-u", "bob:bobpw"],
                             capture_output=True, timeout=60, check=True).stdout
    assert listing == (f"1 {len(stored(store, 0))}\r\n2 {len(stored(store, 1))}\r\n"
                       .encode())
    body = subprocess.run([curl, "-sS", base + "/2", "-u", "bob:bobpw"],
                          capture_output=True, timeout=60, check=True).stdout
    assert body == stored(store, 1)                             # byte-exact, unstuffed
    uidl = subprocess.run([curl, "-sS", base + "/", "-X", "UIDL", "-u", "bob:bobpw"],
                          capture_output=True, timeout=60, check=True).stdout
    bases = [m.base for m in store.folder("bob", INBOX).messages]
    assert uidl == "".join(f"{i + 1} {b}\r\n" for i, b in enumerate(bases)).encode()
    bad = subprocess.run([curl, "-sS", base + "/1", "-u", "bob:wrong"],
                         capture_output=True, timeout=60)
    assert bad.returncode != 0 and bad.stdout == b""


def test_curl_stls_and_pop3s(tmp_path, quarantine):
    store, tls, serve = quarantine
    curl = need("curl")
    port = serve(cleartext_login=False)
    body = subprocess.run([curl, "-sS", "--ssl-reqd", "--cacert", str(tls.ca_file),
                           f"pop3://127.0.0.1:{port}/1", "-u", "bob:bobpw"],
                          capture_output=True, timeout=60)
    assert body.returncode == 0, body.stderr
    assert body.stdout == stored(store, 0)
    port = serve(implicit_tls=True)
    body = subprocess.run([curl, "-sS", "--cacert", str(tls.ca_file),
                           f"pop3s://127.0.0.1:{port}/2", "-u", "bob:bobpw"],
                          capture_output=True, timeout=60)
    assert body.returncode == 0, body.stderr
    assert body.stdout == stored(store, 1)
