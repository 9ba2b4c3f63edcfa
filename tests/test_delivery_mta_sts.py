"""MTA-STS (relay.delivery.mta_sts): parsing, matching, disk cache, never-downgrade, and
fetches from a real HTTPS server on loopback (trustme CA), with DNS from dnsmasq."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
import trustme

from relay.delivery import mta_sts
from relay.delivery.mta_sts import (
    MTASTS,
    Policy,
    PolicyError,
    parse_policy,
    parse_response,
    parse_txt,
    response_complete,
)
from relay.pipeline.protocol import DNSError, Resolver

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\n"
          "mx: *.mail.example.test\r\nmax_age: 86400\r\n")


def run(coro):
    return asyncio.run(coro)


class TXTResolver(Resolver):
    """Answers TXT for _mta-sts names from a dict; a value of DNSError raises it."""

    def __init__(self, records: dict[str, list[str] | type[DNSError]]):
        self.records = records
        self.queries = 0

    async def query(self, name, rdtype):
        assert rdtype == "TXT"
        self.queries += 1
        r = self.records.get(name, [])
        if r is DNSError:
            raise DNSError("timeout")
        return list(r)

    async def exists(self, name):
        return True


class Fetcher:
    def __init__(self, text: str | Exception):
        self.text = text
        self.calls = 0

    async def __call__(self, domain):
        self.calls += 1
        if isinstance(self.text, Exception):
            raise self.text
        return self.text


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


# --- parsing -----------------------------------------------------------------------------

def test_parse_txt():
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1;id=abc", "v=spf1 -all"]) == "abc"
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None      # two: invalid
    assert parse_txt(["v=STSv1; id=bad-id"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=STSv1;"]) is None
    assert parse_txt(["v=STSv10; id=a"]) is None
    assert parse_txt(["v=STSv1; id=a; ext=1"]) == "a"


def test_parse_policy():
    p = parse_policy(POLICY, "example.test", "id1", 100.0)
    assert p.mode == "enforce" and p.max_age == 86400 and p.id == "id1"
    assert p.mx == ("mx1.example.test", "*.mail.example.test")
    assert p.expires == 100.0 + 86400
    lf = parse_policy("version: STSv1\nmode: testing\nmx: a.b.test\nmax_age:5\nfoo: bar\n",
                      "b.test", "x", 0)
    assert lf.mode == "testing" and lf.max_age == 5
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", "d.test", "x", 0).mx == ()


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.test\nmax_age: 1\n",                       # no version
    "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",                     # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\n",                     # no max_age
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\njunk line\n",
    "version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: bad_host!.test\nmax_age: 1\n",
    "<html>not a policy</html>",
])
def test_parse_policy_rejects(text):
    with pytest.raises(PolicyError):
        parse_policy(text, "a.test", "x", 0)


def test_matches():
    p = parse_policy(POLICY, "example.test", "id1", 0)
    assert p.matches("mx1.example.test")
    assert p.matches("MX1.Example.Test.")
    assert p.matches("a.mail.example.test")
    assert not p.matches("mail.example.test")           # wildcard needs one label
    assert not p.matches("a.b.mail.example.test")       # and only one
    assert not p.matches("mx2.example.test")
    assert not p.matches("xmx1.example.test")
    assert not p.matches("mx1.example.test.evil.test")


def test_parse_response():
    ok = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"Content-Length: 5\r\n\r\nhello trailing")
    assert parse_response(ok) == "hello"
    assert response_complete(ok)
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n")
    assert parse_response(chunked) == "abcde"
    assert response_complete(chunked) and not response_complete(chunked[:-7])
    close = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"
    assert parse_response(close) == "all of it"
    assert not response_complete(close)
    with pytest.raises(PolicyError):
        parse_response(close, complete=False)      # EOF-delimited but EOF not clean
    for bad in [
        b"HTTP/1.1 301 Moved\r\nLocation: https://evil.test/\r\nContent-Type: text/plain"
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n5\r\nab",
        b"SMTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 70000,
    ]:
        with pytest.raises(PolicyError):
            parse_response(bad)


# --- lookup, cache, never-downgrade --------------------------------------------------------

def test_no_txt_no_policy(tmp_path):
    f = Fetcher(POLICY)
    m = MTASTS(str(tmp_path), TXTResolver({}), fetch=f)
    assert run(m.policy("example.test")) is None
    assert f.calls == 0


def test_fetch_cache_and_reuse_across_instances(tmp_path):
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    clock = Clock()
    f = Fetcher(POLICY)
    m = MTASTS(str(tmp_path), res, fetch=f, clock=clock)
    p = run(m.policy("Example.Test."))
    assert p is not None and p.mode == "enforce" and p.id == "one"
    assert run(m.policy("example.test")) == p
    assert f.calls == 1                                  # same id: no refetch
    stored = json.loads((tmp_path / "example.test.json").read_text())
    assert stored["mode"] == "enforce" and stored["id"] == "one"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    # A new instance (a restart) uses the disk cache, even when HTTPS now fails.
    f2 = Fetcher(OSError("connection refused"))
    m2 = MTASTS(str(tmp_path), res, fetch=f2, clock=clock)
    assert run(m2.policy("example.test")) == p
    assert f2.calls == 0


def test_new_id_refetches(tmp_path):
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    f = Fetcher(POLICY)
    m = MTASTS(str(tmp_path), res, fetch=f, clock=Clock())
    run(m.policy("example.test"))
    res.records["_mta-sts.example.test"] = ["v=STSv1; id=two"]
    f.text = POLICY.replace("enforce", "testing")
    p = run(m.policy("example.test"))
    assert f.calls == 2 and p.id == "two" and p.mode == "testing"
    assert json.loads((tmp_path / "example.test.json").read_text())["id"] == "two"


@pytest.mark.parametrize("failure", [
    OSError("refused"), PolicyError("HTTP status 404"), TimeoutError(),
    ssl.SSLCertVerificationError("bad cert"), "garbage policy text",
])
def test_enforce_never_downgraded_by_failed_fetch(tmp_path, failure):
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    clock = Clock()
    f = Fetcher(POLICY)
    m = MTASTS(str(tmp_path), res, fetch=f, clock=clock)
    first = run(m.policy("example.test"))
    # The attacker changes the TXT id (forcing a refetch) and breaks the HTTPS fetch.
    res.records["_mta-sts.example.test"] = ["v=STSv1; id=two"]
    f.text = failure
    clock.t += 3600
    assert run(m.policy("example.test")) == first
    assert f.calls == 2
    # DNS stripped or failing: still the cached enforce policy.
    res.records["_mta-sts.example.test"] = []
    assert run(m.policy("example.test")) == first
    res.records["_mta-sts.example.test"] = DNSError
    assert run(m.policy("example.test")) == first
    # ... until it expires.
    clock.t = first.expires + 1
    assert run(m.policy("example.test")) is None


def test_expired_policy_is_refetched(tmp_path):
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    clock = Clock()
    f = Fetcher(POLICY.replace("86400", "60"))
    m = MTASTS(str(tmp_path), res, fetch=f, clock=clock)
    run(m.policy("example.test"))
    clock.t += 61
    p = run(m.policy("example.test"))
    assert f.calls == 2 and p.fetched == clock.t


WEEK = POLICY.replace("86400", "604800")


def _weekly(tmp_path):
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    clock = Clock()
    f = Fetcher(WEEK)
    return res, clock, f, MTASTS(str(tmp_path), res, fetch=f, clock=clock)


def _stored(tmp_path) -> dict:
    return json.loads((tmp_path / "example.test.json").read_text())


async def _settled(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "background refresh did not finish"
        await asyncio.sleep(0.01)


def test_policy_in_use_is_refreshed_before_it_expires(tmp_path):
    """A day after its fetch, a policy in use is fetched again in the background: the
    delivery gets the cached one at once, and the max_age runs from the new fetch, so
    DNS blocked after the original expiry still finds a policy."""
    async def body():
        res, clock, f, m = _weekly(tmp_path)
        first = await m.policy("example.test")
        clock.t += 3600
        assert await m.policy("example.test") == first
        assert f.calls == 1                             # young: no refresh
        clock.t += 2 * 86400
        assert await m.policy("example.test") == first  # not held up by the refresh
        await _settled(lambda: _stored(tmp_path)["fetched"] == clock.t)
        assert f.calls == 2
        clock.t = first.expires + 3600                  # past the first fetch's lifetime
        res.records["_mta-sts.example.test"] = DNSError
        p = await m.policy("example.test")
        assert p is not None and p.mode == "enforce" and p.id == "one"
    run(body())


def test_failed_refresh_keeps_the_policy_and_waits_before_trying_again(tmp_path, caplog):
    async def body():
        res, clock, f, m = _weekly(tmp_path)
        first = await m.policy("example.test")
        f.text = OSError("connection refused")
        clock.t += 2 * 86400
        assert await m.policy("example.test") == first
        await _settled(lambda: "refresh of policy id=one failed" in caplog.text)
        assert f.calls == 2
        assert await m.policy("example.test") == first
        await asyncio.sleep(0.05)
        assert f.calls == 2                             # not again within the hour
        clock.t += mta_sts.RETRY_REFRESH + 1
        f.text = WEEK
        assert await m.policy("example.test") == first
        await _settled(lambda: f.calls == 3)
        await _settled(lambda: _stored(tmp_path)["fetched"] == clock.t)
    run(body())


def test_corrupt_cache_file_is_ignored(tmp_path):
    (tmp_path / "example.test.json").write_text("{not json")
    res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
    m = MTASTS(str(tmp_path), res, fetch=Fetcher(POLICY))
    assert run(m.policy("example.test")).id == "one"


def test_bad_domain_names(tmp_path):
    f = Fetcher(POLICY)
    m = MTASTS(str(tmp_path), TXTResolver({}), fetch=f)
    for d in ["../../etc/passwd", "", "a b.test", "x/y.test"]:
        assert run(m.policy(d)) is None
    assert os.listdir(tmp_path) == []


# --- a real HTTPS server on loopback ---------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class PolicyServer:
    """An HTTPS server on 127.0.0.1 for mta-sts.example.test with a scripted reply."""

    def __init__(self, ca: trustme.CA, hostname: str = "mta-sts.example.test"):
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(hostname).configure_cert(self.ctx)
        self.reply = b""
        self.requests: list[bytes] = []

    async def handle(self, reader, writer):
        req = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(req)
        writer.write(self.reply)
        await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *a):
        self.server.close()
        await self.server.wait_closed()


def client_ctx(ca):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def http_ok(body: str, extra: str = "") -> bytes:
    b = body.encode()
    return (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(b)}\r\n"
            f"{extra}\r\n").encode() + b


def test_https_fetch_from_loopback(tmp_path, ca):
    async def go():
        async with PolicyServer(ca) as srv:
            srv.reply = http_ok(POLICY)
            res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
            m = MTASTS(str(tmp_path), res, ssl_context=client_ctx(ca),
                       connect_to=lambda host: ("127.0.0.1", srv.port))
            p = await m.policy("example.test")
            return srv, p
    srv, p = run(go())
    assert p is not None and p.mode == "enforce" and p.matches("mx1.example.test")
    req = srv.requests[0]
    assert req.startswith(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n")
    assert b"\r\nHost: mta-sts.example.test\r\n" in req


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 302 Found\r\nLocation: https://mta-sts.example.test/other\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"mx: a.test\r\n" * 7000,
])
def test_https_bad_replies_give_no_policy(tmp_path, ca, reply):
    async def go():
        async with PolicyServer(ca) as srv:
            srv.reply = reply
            res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
            m = MTASTS(str(tmp_path), res, ssl_context=client_ctx(ca),
                       connect_to=lambda host: ("127.0.0.1", srv.port))
            return await m.policy("example.test")
    assert run(go()) is None


def test_https_certificate_for_wrong_name_is_refused(tmp_path, ca):
    async def go():
        async with PolicyServer(ca, hostname="mta-sts.other.test") as srv:
            srv.reply = http_ok(POLICY)
            res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
            m = MTASTS(str(tmp_path), res, ssl_context=client_ctx(ca),
                       connect_to=lambda host: ("127.0.0.1", srv.port))
            return await m.policy("example.test")
    assert run(go()) is None


def test_https_untrusted_ca_is_refused(tmp_path, ca):
    async def go():
        async with PolicyServer(trustme.CA()) as srv:   # a CA the client does not trust
            srv.reply = http_ok(POLICY)
            res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
            m = MTASTS(str(tmp_path), res, ssl_context=client_ctx(ca),
                       connect_to=lambda host: ("127.0.0.1", srv.port))
            return await m.policy("example.test")
    assert run(go()) is None


def test_slow_server_times_out(tmp_path, ca):
    async def go():
        stall = asyncio.Event()

        async def handle(reader, writer):
            await stall.wait()
            writer.close()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("mta-sts.example.test").configure_cert(ctx)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        res = TXTResolver({"_mta-sts.example.test": ["v=STSv1; id=one"]})
        m = MTASTS(str(tmp_path), res, ssl_context=client_ctx(ca), timeout=0.5,
                   connect_to=lambda host: ("127.0.0.1", port))
        try:
            return await m.policy("example.test")
        finally:
            stall.set()
            server.close()
            await server.wait_closed()
    assert run(go()) is None


# --- end to end with dnsmasq serving the TXT record ---------------------------------------------

def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dnsmasq(tmp_path):
    exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(exe):
        pytest.skip("dnsmasq not installed")
    port = _free_udp_port()
    proc = subprocess.Popen(
        [exe, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
         "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
         "--no-poll", "--user=nobody", f"--pid-file={tmp_path / 'dnsmasq.pid'}",
         "--local=/test/",
         "--txt-record=_mta-sts.example.test,v=STSv1; id=20240101T000000",
         "--txt-record=_mta-sts.example.test,v=spf1 -all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Wait until it answers (dig would need another process; a DNS query is enough).
    from relay.dns import DNSResolver
    r = DNSResolver([("127.0.0.1", port)], timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if asyncio.run(r.query("_mta-sts.example.test", "TXT")):
                break
        except DNSError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"dnsmasq exited: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    yield port
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def test_end_to_end_dnsmasq_and_https(tmp_path, ca, dnsmasq):
    from relay.dns import DNSResolver

    async def go():
        async with PolicyServer(ca) as srv:
            srv.reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         + f"{len(POLICY):x}\r\n{POLICY}\r\n0\r\n\r\n".encode())
            res = DNSResolver([("127.0.0.1", dnsmasq)], timeout=2.0)
            m = MTASTS(str(tmp_path / "cache"), res, ssl_context=client_ctx(ca),
                       connect_to=lambda host: ("127.0.0.1", srv.port))
            p = await m.policy("example.test")
            none = await m.policy("nosts.test")
            return p, none
    p, none = run(go())
    assert p is not None and p.id == "20240101T000000" and p.mode == "enforce"
    assert none is None
    assert (tmp_path / "cache" / "example.test.json").exists()


def test_policy_json_roundtrip():
    p = Policy("example.test", "x", "testing", ("a.test",), 10, 5.0)
    assert Policy.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(PolicyError):
        Policy.from_json({**p.to_json(), "mode": "bogus"})
    assert mta_sts.MAX_AGE_LIMIT == 31557600
