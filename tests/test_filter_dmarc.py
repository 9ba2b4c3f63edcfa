"""DMARC filter over a real DNS server (dnsmasq): pass, fail per policy, the
organizational-domain fallback, alignment modes, pct, broken From fields; plus the
record parser and organizational domains from the installed Public Suffix List."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
from _mailauth import Dnsmasq, context, crlf

from filters.dmarc import DMARCFilter, Record, aligned, org_domain, parse_record
from relay.config import ConfigError
from relay.pipeline.protocol import Action, AuthResult, FilterEnv

RECORDS = {
    "_dmarc.reject.test": ["v=DMARC1; p=reject"],
    "_dmarc.quar.test": ["v=DMARC1; p=quarantine"],
    "_dmarc.none.test": ["v=DMARC1; p=none"],
    "_dmarc.org.test": ["v=DMARC1; p=none; sp=reject"],
    "_dmarc.strict.test": ["v=DMARC1; p=reject; aspf=s; adkim=s"],
    "_dmarc.multi.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    "_dmarc.pct.test": ["v=DMARC1; p=reject; pct=0"],
    "_dmarc.own.test": ["v=DMARC1; p=reject"],
    "_dmarc.sub.own.test": ["v=DMARC1; p=none"],
    "_dmarc.rua.test": ["v=DMARC1; rua=mailto:a@rua.test,mailto:b@rua.test"],
    "_dmarc.other.test": ["v=spf1 -all", "v=DMARC1;p=quarantine"],
}

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq missing")


@pytest.fixture(scope="module")
def dnsd():
    with Dnsmasq(RECORDS, zones=["test"], timeout_zone="slow.test") as d:
        yield d


def message(from_: str | list[str]) -> bytes:
    froms = [from_] if isinstance(from_, str) else from_
    head = "".join(f"From: {f}\n" for f in froms)
    return crlf(f"{head}To: b@example.test\nSubject: s\n\nbody\n")


def spf(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("spf", result, (("smtp.mailfrom", domain),))


def dkim(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("dkim", result, (("header.d", domain), ("header.s", "s"),
                                       ("header.b", "AAAAAAAA")))


def check(dnsd, from_, results=(), options=None, trusted=False, timeout=2.0,
          mail_from="a@example.test"):
    res = dnsd.resolver(timeout=timeout)
    f = DMARCFilter(options or {}, FilterEnv(hostname="mx.relay.test", resolver=res))
    f.random = random.Random(1)
    ctx = context(res, message(from_), trusted=trusted, auth_results=list(results))
    ctx.mail_from = mail_from
    verdict = asyncio.run(f.on_data(ctx))
    dmarc = [r for r in ctx.auth_results if r.method == "dmarc"]
    return verdict, dmarc


def test_pass_by_aligned_spf_or_dkim(dnsd):
    for results in ([spf("bounces.reject.test")], [dkim("reject.test")],
                    [dkim("mail.reject.test"), spf("elsewhere.test")],
                    [dkim("other.test", "pass"), dkim("reject.test")]):
        v, (d,) = check(dnsd, "Alice <alice@reject.test>", results)
        assert v.action is Action.CONTINUE
        assert (d.result, d.props) == ("pass", (("header.from", "reject.test"),))
        assert d.comment == "p=reject sp=reject dis=none"


def test_fail_p_reject(dnsd):
    results = [spf("elsewhere.test"), dkim("elsewhere.test"), dkim("reject.test", "fail"),
               dkim("reject.test", "neutral"), spf("reject.test", "softfail")]
    v, (d,) = check(dnsd, "alice@reject.test", results)
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert "reject.test" not in v.text     # generic text, details only in the reason
    assert d.result == "fail" and d.comment == "p=reject sp=reject dis=reject"


def test_fail_p_quarantine_and_none(dnsd):
    v, (d,) = check(dnsd, "alice@quar.test", [spf("elsewhere.test")])
    assert (v.action, v.mailbox) == (Action.QUARANTINE, "dmarc")
    assert "dmarc fail quar.test" in v.reason
    v, (d,) = check(dnsd, "alice@none.test")
    assert v.action is Action.CONTINUE and d.result == "fail"


def test_org_domain_fallback_uses_sp(dnsd):
    v, (d,) = check(dnsd, "alice@deep.sub.org.test", [dkim("elsewhere.test")])
    assert v.action is Action.REJECT
    assert d.props == (("header.from", "deep.sub.org.test"),)
    assert d.comment == "p=none sp=reject dis=reject"
    # The organizational domain itself gets p=.
    v, (d,) = check(dnsd, "alice@org.test")
    assert v.action is Action.CONTINUE and d.comment == "p=none sp=reject dis=none"
    # Relaxed alignment across the organization passes.
    v, (d,) = check(dnsd, "alice@deep.sub.org.test", [dkim("org.test")])
    assert d.result == "pass"


def test_subdomain_record_wins_over_org(dnsd):
    v, (d,) = check(dnsd, "alice@sub.own.test")
    assert v.action is Action.CONTINUE and d.comment.startswith("p=none")
    v, _ = check(dnsd, "alice@other.own.test")
    assert v.action is Action.REJECT


def test_strict_alignment(dnsd):
    v, (d,) = check(dnsd, "a@strict.test", [spf("bounce.strict.test"), dkim("mail.strict.test")])
    assert (v.action, d.result) == (Action.REJECT, "fail")
    v, (d,) = check(dnsd, "a@strict.test", [spf("STRICT.test.")])
    assert d.result == "pass"
    v, (d,) = check(dnsd, "a@strict.test", [spf("bounce@strict.test")])
    assert d.result == "pass"


def test_spf_helo_identity_counts_only_for_null_sender(dnsd):
    helo = AuthResult("spf", "pass", (("smtp.helo", "mx.reject.test"),))
    v, (d,) = check(dnsd, "a@reject.test", [helo], mail_from="")
    assert d.result == "pass"
    v, (d,) = check(dnsd, "a@reject.test", [helo], mail_from="x@elsewhere.test")
    assert d.result == "fail"


def test_idn_from_domain_is_looked_up_in_a_labels(dnsd):
    v, (d,) = check(dnsd, "a@bücher.test", [dkim("xn--bcher-kva.test")])
    assert d.props == (("header.from", "xn--bcher-kva.test"),) and d.result == "none"


@pytest.mark.parametrize("froms,why", [
    (["a@reject.test", "b@reject.test"], "2 From fields"),
    (["a@reject.test, b@evil.test"], "2 From addresses"),
    ([], "0 From fields"),
    (["undisclosed-recipients:;"], "0 From addresses"),
    (["no-domain"], "From address without a domain"),
])
def test_broken_from_fails_with_reject(dnsd, froms, why):
    v, (d,) = check(dnsd, froms, [spf("reject.test"), dkim("reject.test")])
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 550, "5.7.1")
    assert d.result == "permerror" and d.comment == f"p=reject: {why}"


def test_no_record_and_unusable_records(dnsd):
    for dom in ("norecord.test", "multi.test", "x.multi.test"):
        v, (d,) = check(dnsd, f"a@{dom}")
        assert (v.action, d.result) == (Action.CONTINUE, "none"), dom
    # A TXT record that is not DMARC beside one that is: only the DMARC one counts.
    v, (d,) = check(dnsd, "a@other.test")
    assert v.action is Action.QUARANTINE
    # No p= but a valid rua=: treated as p=none (RFC 7489 6.6.3); commas survive DNS.
    v, (d,) = check(dnsd, "a@rua.test")
    assert (v.action, d.result, d.comment) == (Action.CONTINUE, "fail",
                                               "p=none sp=none dis=none")


def test_pct_zero_downgrades_reject_to_quarantine(dnsd):
    v, (d,) = check(dnsd, "a@pct.test")
    assert v.action is Action.QUARANTINE
    assert d.comment == "p=reject sp=reject dis=quarantine"


def test_pct_sampling_is_a_sample(dnsd):
    res = dnsd.resolver()
    f = DMARCFilter({}, FilterEnv(hostname="mx.relay.test", resolver=res))

    class Fixed:
        def __init__(self, x):
            self.x = x

        def random(self):
            return self.x

    rec_half = {"_dmarc.half.test": ["v=DMARC1; p=reject; pct=50"]}
    with Dnsmasq(rec_half, zones=["test"]) as d2:
        res2 = d2.resolver()
        for x, expected in ((0.49, Action.REJECT), (0.5, Action.QUARANTINE)):
            f.random = Fixed(x)
            v = asyncio.run(f.on_data(context(res2, message("a@half.test"))))
            assert v.action is expected, x


def test_temperror(dnsd):
    v, (d,) = check(dnsd, "a@x.slow.test", timeout=0.5)
    assert (v.action, d.result) == (Action.CONTINUE, "temperror")
    v, _ = check(dnsd, "a@x.slow.test", options={"on_temperror": "tempfail"}, timeout=0.5)
    assert (v.action, v.code, v.enhanced) == (Action.TEMPFAIL, 451, "4.4.3")


def test_policy_mapping_options(dnsd):
    v, _ = check(dnsd, "a@reject.test", options={"reject": "quarantine",
                                                 "quarantine_mailbox": "spoofed"})
    assert (v.action, v.mailbox) == (Action.QUARANTINE, "spoofed")
    v, (d,) = check(dnsd, "a@quar.test", options={"quarantine": "continue"})
    assert v.action is Action.CONTINUE and d.result == "fail"
    with pytest.raises(ConfigError, match=r"filters\.dmarc\.reject"):
        DMARCFilter({"reject": "bounce"}, FilterEnv(hostname="h", resolver=None))


def test_trusted_clients_skipped_unless_asked(dnsd):
    v, results = check(dnsd, "a@reject.test", trusted=True)
    assert v.action is Action.CONTINUE and results == []
    v, (d,) = check(dnsd, "a@reject.test", trusted=True, options={"check_trusted": True})
    assert v.action is Action.REJECT


# --- pure parts ---------------------------------------------------------------------

@pytest.mark.parametrize("text,rec", [
    ("v=DMARC1; p=reject", Record("reject", "reject")),
    ("v=DMARC1;p=quarantine;sp=none;pct=20;adkim=s;aspf=s",
     Record("quarantine", "none", 20, "s", "s")),
    (" v = DMARC1 ; p = None ; SP=Reject", Record("none", "reject")),
    ("v=DMARC1; p=reject; pct=101; adkim=x; sp=maybe", Record("reject", "reject")),
    ("v=DMARC1; p=reject; p=none", Record("reject", "reject")),
    ("v=DMARC1; p=reject; fo=1; rf=afrf; ri=86400; future=tag", Record("reject", "reject")),
    ("v=DMARC1; p=bogus; rua=mailto:r@x.test", Record("none", "none")),
    ("v=DMARC1; p=bogus", None),
    ("v=DMARC1", None),
    ("p=reject; v=DMARC1", None),
    ("v=dmarc1; p=reject", None),
    ("v=DMARC10; p=reject", None),
    ("", None),
])
def test_parse_record(text, rec):
    assert parse_record(text) == rec


@pytest.mark.parametrize("domain,org", [
    ("example.com", "example.com"),
    ("a.b.example.com", "example.com"),
    ("mail.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),
    ("com", "com"),
    ("a.b.c.example.test", "example.test"),
    ("Mail.Example.COM.", "example.com"),
])
def test_org_domain(domain, org):
    assert org_domain(domain) == org


def test_alignment_modes():
    assert aligned("bounce.example.com", "example.com", "r")
    assert not aligned("bounce.example.com", "example.com", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")
    assert not aligned("", "example.com", "r")


def test_loader_finds_both_filters_and_names_option_errors():
    from filters.dkim import DKIMFilter
    from relay.config import FilterConfig
    from relay.pipeline.loader import find, load

    assert find("dkim") is DKIMFilter and find("dmarc") is DMARCFilter
    env = FilterEnv(hostname="mx.relay.test", resolver=None)
    load((FilterConfig(name="dkim"), FilterConfig(name="dmarc")), env)
    with pytest.raises(ConfigError, match=r"filters\[1\]\.options: pct"):
        load((FilterConfig(name="dkim"), FilterConfig(name="dmarc", options={"pct": 5})), env)
