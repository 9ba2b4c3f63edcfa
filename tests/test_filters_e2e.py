"""SPF, DKIM, DMARC and Authentication-Results end to end through the real relay.

One relay process (`python -m relay serve`) with the chain spf -> dkim -> dmarc, its
DNS pointed at dnsmasq on loopback (`delivery.resolvers`: the filters use the app's
resolver), and delivery by the transport map to an aiosmtpd sink on loopback. Clients
connect from 127.0.0.1, which is outside mynetworks (so every check applies, as for
mail from the Internet, and `relay_domains` lets them reach sink.test); the trusted
client (our own users' mail, which gets signed) connects from 127.0.0.2, the only
mynetworks address. Held mail is looked for in the quarantine Maildir on disk.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import re
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relay.pipeline.authres import read_authserv_id
from relay.smtp.auth import hash_password
from tests._delivery import Sink
from tests._mailauth import Dnsmasq, ed25519_key, rsa_key
from tests._relay import RelayProcess, free_port

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq missing")

AUTHSERV = "relay.test"
RCPT = "rcpt@sink.test"


# --- keys, DNS, sink, relay -----------------------------------------------------------



@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name, make in (("rsa", rsa_key), ("ed", ed25519_key), ("third", rsa_key)):
        pem, txt = make()
        (d / f"{name}.pem").write_bytes(pem)
        out[name] = (str(d / f"{name}.pem"), pem, txt)
    # A third party's Ed25519 key, as dkimpy signs with it: the base64 private seed.
    k = ed25519.Ed25519PrivateKey.generate()
    seed = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    out["third_ed"] = ("", base64.b64encode(seed),
                       f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}")
    return out


@pytest.fixture(scope="module")
def zone(keys):
    ours = "v=spf1 ip4:127.0.0.1 -all"
    return {
        # SPF for the envelope senders.
        "spfpass.test": [ours],
        "spffail.test": ["v=spf1 ip4:192.0.2.1 -all"],
        "spfsoft.test": ["v=spf1 ~all"],
        # DMARC: the From domains.
        "dpass.test": [ours],
        "_dmarc.dpass.test": ["v=DMARC1; p=reject"],
        "_dmarc.reject.test": ["v=DMARC1; p=reject"],
        "_dmarc.quar.test": ["v=DMARC1; p=quarantine"],
        # Only the organizational domain publishes: p= for itself, sp= for subdomains.
        "_dmarc.orgfall.test": ["v=DMARC1; p=none; sp=reject"],
        "_dmarc.dkimonly.test": ["v=DMARC1; p=reject"],
        # DKIM keys: the relay signs signer.test; a third party signs dkimonly.test.
        "r1._domainkey.signer.test": [keys["rsa"][2]],
        "e1._domainkey.signer.test": [keys["ed"][2]],
        "sel._domainkey.dkimonly.test": [keys["third"][2]],
        "edsel._domainkey.dkimonly.test": [keys["third_ed"][2]],
        "_dmarc.signer.test": ["v=DMARC1; p=reject; adkim=s"],
    }


@pytest.fixture(scope="module")
def dnsd(zone):
    with Dnsmasq(zone, zones=["test"]) as d:
        yield d


@pytest.fixture(scope="module")
def sink():
    handler = Sink()
    for _ in range(10):
        ctl = Controller(handler, hostname="127.0.0.1", port=free_port())
        try:
            ctl.start()
            break
        except (OSError, RuntimeError):
            continue
    else:
        raise RuntimeError("sink did not start")
    handler.port = ctl.port
    yield handler
    ctl.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, dnsd, sink, keys):
    tmp = tmp_path_factory.mktemp("relay")
    cfg = {
        "hostname": AUTHSERV,
        "access": {"mynetworks": ["127.0.0.2/32"], "relay_domains": ["sink.test"]},
        "delivery": {"resolvers": [f"127.0.0.1:{dnsd.port}"], "dns_timeout": 3,
                     "mta_sts": False, "tls_policy": "none", "retry_schedule": [1],
                     "retry_jitter": 0.0, "helo_name": AUTHSERV,
                     "transport": [{"domain": "sink.test",
                                    "nexthop": f"[127.0.0.1]:{sink.port}"}]},
        "filters": [
            {"name": "spf"},
            {"name": "dkim", "options": {"sign": [
                {"domain": "signer.test", "selector": "r1", "key_file": keys["rsa"][0]},
                {"domain": "signer.test", "selector": "e1", "key_file": keys["ed"][0],
                 "algorithm": "ed25519-sha256"}]}},
            {"name": "dmarc"},
        ],
        # Held mail for sink.test goes to this user's INBOX (a Maildir).
        "quarantine": {"users": [{"name": "postmaster", "password_hash": hash_password("x"),
                                  "addresses": ["@sink.test"]}]},
    }
    with RelayProcess(tmp, cfg) as r:
        yield r


# --- helpers ----------------------------------------------------------------------------

_n = 0


def message(from_: str, subject: str, extra: str = "", body: str = "Hello.\r\n") -> bytes:
    global _n
    _n += 1
    return (f"From: Sender <{from_}>\r\nTo: {RCPT}\r\n{extra}Subject: {subject}\r\n"
            f"Date: Mon, 24 Nov 2025 10:00:00 +0000\r\nMessage-ID: <e2e{_n}@x.test>\r\n"
            f"\r\n{body}").encode()


def send(relay, mail_from: str, msg: bytes, trusted: bool = False) -> tuple[int, bytes]:
    """One transaction; the reply to MAIL if refused there, else the reply to DATA."""
    src = ("127.0.0.2", 0) if trusted else None
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, source_address=src, timeout=60) as s:
        s.ehlo("client.test")
        code, text = s.mail(mail_from)
        if code != 250:
            return code, text
        code, text = s.rcpt(RCPT)
        if code != 250:
            return code, text
        return s.data(msg)


def delivered(sink, subject: str, limit: float = 30.0) -> bytes:
    """The one message with this Subject at the sink (a deadline against hangs)."""
    needle = f"\r\nSubject: {subject}\r\n".encode()
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = [m.content for m in sink.messages if needle in b"\r\n" + m.content]
        if got:
            assert len(got) == 1
            return got[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing delivered with Subject {subject!r}")


def headers(msg: bytes):
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(msg)


def our_authres(msg: bytes) -> list[str]:
    """The Authentication-Results values that carry our authserv-id."""
    return [v for v in headers(msg).get_all("Authentication-Results") or []
            if (read_authserv_id(v.encode()) or "").lower().rstrip(".") == AUTHSERV]


def one_authres(msg: bytes) -> str:
    found = our_authres(msg)
    assert len(found) == 1, found
    return re.sub(r"\s+", " ", found[0])


def dnsfunc(dnsd):
    """dkimpy's key lookup, asking the same dnsmasq the relay asks."""
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        q = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        r = dns.query.udp(q, "127.0.0.1", port=dnsd.port, timeout=timeout)
        for rrset in r.answer:
            for rd in rrset:
                return b"".join(rd.strings)
        return b""
    return lookup


def quarantined(relay, subject: str) -> list[Path]:
    inbox = Path(relay.config["quarantine"]["path"]) / "users" / "postmaster" / "new"
    needle = f"\r\nSubject: {subject}\r\n".encode()
    return [p for p in sorted(inbox.glob("*")) if needle in p.read_bytes()] \
        if inbox.is_dir() else []


def third_party_signed(keys, from_: str, subject: str, alg: str = "rsa-sha256") -> bytes:
    msg = message(from_, subject)
    selector, key = (b"sel", keys["third"][1]) if alg == "rsa-sha256" else \
        (b"edsel", keys["third_ed"][1])
    sig = dkim.sign(msg, selector, b"dkimonly.test", key, signature_algorithm=alg.encode(),
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + msg


# --- SPF ----------------------------------------------------------------------------------

def test_spf_pass_is_delivered_with_received_spf_and_results(relay, sink):
    code, text = send(relay, "alice@spfpass.test", message("alice@spfpass.test", "spf pass"))
    assert code == 250, text
    got = delivered(sink, "spf pass")
    h = headers(got)
    assert h["Received-SPF"].startswith("pass (")
    assert "client-ip=127.0.0.1;" in h["Received-SPF"]
    ar = one_authres(got)
    assert ar.startswith(f"{AUTHSERV}; ") and "spf=pass smtp.mailfrom=spfpass.test" in ar


def test_spf_fail_is_refused_at_mail(relay, sink):
    code, text = send(relay, "mallory@spffail.test", message("mallory@spffail.test", "spf fail"))
    assert code == 550
    assert text.startswith(b"5.7.23 SPF validation failed"), text
    assert b"127.0.0.1 is not allowed to send mail for spffail.test" in text


def test_spf_softfail_passes_and_says_so(relay, sink):
    code, text = send(relay, "bob@spfsoft.test", message("bob@spfsoft.test", "spf softfail"))
    assert code == 250, text
    got = delivered(sink, "spf softfail")
    assert headers(got)["Received-SPF"].startswith("softfail (")
    assert "spf=softfail smtp.mailfrom=spfsoft.test" in one_authres(got)


# --- DKIM -----------------------------------------------------------------------------------

def test_relay_signs_trusted_mail_and_the_sink_verifies_it(relay, sink, dnsd, tmp_path, keys):
    msg = message("boss@signer.test", "signed by the relay", body="Numbers attached.\r\n")
    code, text = send(relay, "boss@signer.test", msg, trusted=True)
    assert code == 250, text
    got = delivered(sink, "signed by the relay")
    sigs = headers(got).get_all("DKIM-Signature")
    assert len(sigs) == 2
    tags = [dict(t.strip().split("=", 1) for t in re.sub(r"\s+", "", s).split(";") if t)
            for s in sigs]
    assert [(t["d"], t["s"], t["a"]) for t in tags] == [
        ("signer.test", "r1", "rsa-sha256"), ("signer.test", "e1", "ed25519-sha256")]
    assert all("l" not in t for t in tags)              # never a partial-body signature
    assert all(t["h"].lower().split(":").count("from") == 2 for t in tags)   # From oversigned
    lookup = dnsfunc(dnsd)

    def verifies(msg: bytes, idx: int) -> bool:
        try:
            return dkim.DKIM(msg).verify(idx=idx, dnsfunc=lookup)
        except dkim.DKIMException:      # dkimpy raises for some failures
            return False

    assert verifies(got, 0) and verifies(got, 1)
    # The signatures cover what they should: a changed body or Subject fails both.
    for bad in (got.replace(b"Numbers attached.", b"Numbers changed."),
                got.replace(b"Subject: signed by the relay", b"Subject: signed by someone")):
        assert not verifies(bad, 0) and not verifies(bad, 1)
    if shutil.which("opendkim"):
        # An independent verifier (OpenDKIM) agrees, with the keys as published.
        keysf = tmp_path / "keys.txt"
        keysf.write_text(f"r1._domainkey.signer.test {keys['rsa'][2]}\n"
                         f"e1._domainkey.signer.test {keys['ed'][2]}\n")
        conf = tmp_path / "v.conf"
        conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keysf}\n")
        eml = tmp_path / "m.eml"
        eml.write_bytes(got)
        out = subprocess.run(["opendkim", "-x", str(conf), "-vvv", "-t", str(eml)],
                             capture_output=True, timeout=60)
        assert re.findall(r"dkim=(\w+)", (out.stdout + out.stderr).decode()) == ["pass", "pass"]


def test_outsider_using_our_signed_domain_is_refused(relay, sink):
    # From signer.test but from outside mynetworks: not signed by us, and signer.test's
    # DMARC (adkim=s, nothing aligned) refuses it.
    code, text = send(relay, "x@spfpass.test", message("boss@signer.test", "not ours to sign"))
    assert (code, text) == (550, b"5.7.1 Rejected by the sender domain's DMARC policy")
    assert not [m for m in sink.messages if b"not ours to sign" in m.content]


# --- DMARC --------------------------------------------------------------------------------

def test_dmarc_pass_by_aligned_spf(relay, sink):
    code, text = send(relay, "alice@dpass.test", message("alice@dpass.test", "dmarc spf pass"))
    assert code == 250, text
    ar = one_authres(delivered(sink, "dmarc spf pass"))
    assert "spf=pass smtp.mailfrom=dpass.test" in ar
    assert "dmarc=pass (p=reject sp=reject dis=none) header.from=dpass.test" in ar


@pytest.mark.parametrize("alg", ["rsa-sha256", "ed25519-sha256"])
def test_dmarc_pass_by_aligned_dkim_verified_over_dns(relay, sink, keys, alg):
    # The envelope sender's SPF passes but is not aligned; the third party's DKIM
    # signature (checked by the relay against the key in DNS) carries DMARC.
    msg = third_party_signed(keys, "news@dkimonly.test", f"dmarc dkim pass {alg}", alg)
    code, text = send(relay, "bounces@spfpass.test", msg)
    assert code == 250, text
    ar = one_authres(delivered(sink, f"dmarc dkim pass {alg}"))
    selector = "sel" if alg == "rsa-sha256" else "edsel"
    assert f"dkim=pass header.d=dkimonly.test header.s={selector}" in ar
    assert "dmarc=pass" in ar and "header.from=dkimonly.test" in ar


@pytest.mark.parametrize("where", ["body", "header"])
def test_dmarc_fail_with_broken_signature_is_rejected(relay, sink, keys, where):
    subject = f"dmarc dkim tampered {where}"
    msg = third_party_signed(keys, "news@dkimonly.test", subject)
    msg = msg.replace(b"Hello.", b"Hello!") if where == "body" else \
        msg.replace(b"Subject: dmarc", b"Subject: DMARC")
    code, text = send(relay, "bounces@spfpass.test", msg)
    assert (code, text) == (550, b"5.7.1 Rejected by the sender domain's DMARC policy")
    assert "dkim fail:dkimonly.test" in relay.log()


def test_dmarc_p_reject_is_refused_at_data(relay, sink):
    code, text = send(relay, "x@spfpass.test", message("ceo@reject.test", "dmarc reject"))
    assert (code, text) == (550, b"5.7.1 Rejected by the sender domain's DMARC policy")
    assert "dmarc=fail header.from=reject.test p=reject sp=reject dis=reject" in relay.log()


def test_dmarc_p_quarantine_lands_in_the_quarantine_maildir(relay, sink):
    code, text = send(relay, "x@spfpass.test", message("hr@quar.test", "dmarc quarantine"))
    assert code == 250, text          # accepted, held, not delivered
    qid = text.split()[-1].decode()
    held = quarantined(relay, "dmarc quarantine")
    assert len(held) == 1
    data = held[0].read_bytes()
    h = headers(data)
    assert h["X-Quarantine-Filter"] == "dmarc"
    assert h["X-Quarantine-Queue-Id"] == qid
    assert h["X-Quarantine-Recipients"] == RCPT
    assert h["X-Quarantine-Reason"].startswith("dmarc fail quar.test p=quarantine")
    assert "dmarc=fail (p=quarantine sp=quarantine dis=quarantine) header.from=quar.test" \
        in one_authres(data)
    assert data.endswith(b"\r\n\r\nHello.\r\n")
    # Held instead of queued: never committed to the spool, so never delivered.
    log = relay.log()
    assert f"{qid}: quarantine: mailbox=dmarc filter=dmarc" in log
    assert f"{qid}: from=<" not in log


def test_dmarc_organizational_domain_fallback(relay, sink):
    # No _dmarc.mail.orgfall.test: the record at the organizational domain applies,
    # and for a subdomain its sp= (reject), not its p= (none).
    code, text = send(relay, "x@spfpass.test", message("a@mail.orgfall.test", "org sub"))
    assert (code, text) == (550, b"5.7.1 Rejected by the sender domain's DMARC policy")
    # The organizational domain itself gets p=none: delivered, marked as failing.
    code, text = send(relay, "x@spfpass.test", message("a@orgfall.test", "org itself"))
    assert code == 250, text
    assert "dmarc=fail (p=none sp=reject dis=none) header.from=orgfall.test" in \
        one_authres(delivered(sink, "org itself"))
    # Relaxed alignment across the organizational domain: SPF for dpass.test aligns
    # with From news.dpass.test, whose policy also comes from dpass.test.
    code, text = send(relay, "alice@dpass.test", message("n@news.dpass.test", "org aligned"))
    assert code == 250, text
    assert "dmarc=pass" in one_authres(delivered(sink, "org aligned"))


# --- Authentication-Results ----------------------------------------------------------------

def test_one_authentication_results_of_ours_forged_ones_removed(relay, sink):
    forged = ("Authentication-Results: relay.test; dmarc=pass header.from=evil.test\r\n"
              "Authentication-Results: (looks harmless) RELAY.TEST.;\r\n"
              "\tspf=pass smtp.mailfrom=evil.test\r\n"
              "Authentication-Results: \"relay.test\"; dkim=pass header.d=evil.test\r\n"
              "Authentication-Results: elsewhere.test; spf=fail smtp.mailfrom=evil.test\r\n")
    msg = message("alice@dpass.test", "forged results", extra=forged)
    code, text = send(relay, "alice@dpass.test", msg)
    assert code == 250, text
    got = delivered(sink, "forged results")
    ar = one_authres(got)
    assert "evil.test" not in ar
    assert "spf=pass smtp.mailfrom=dpass.test" in ar and "dmarc=pass" in ar
    # Another receiver's results are not ours to remove.
    assert [v for v in headers(got).get_all("Authentication-Results")
            if v.startswith("elsewhere.test;")] == ["elsewhere.test; spf=fail smtp.mailfrom=evil.test"]
    assert got.count(b"evil.test") == 1
    # Ours sits above the Received header we add: the newest trace on top.
    head = got.split(b"\r\n\r\n", 1)[0]
    assert head.index(b"Authentication-Results: relay.test;") < head.index(b"Received: from")
