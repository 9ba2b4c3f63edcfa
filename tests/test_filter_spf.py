"""SPF filter: record syntax and macros (RFC 7208 7.4 examples), the filter's verdicts,
headers and auth results, config errors, and end to end over dnsmasq through relay.dns.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from _dns import FakeDNS, ZoneResolver, dnsmasq

from filters.spf import (
    PermError,
    SPFChecker,
    SPFFilter,
    _Check,
    parse_macro_string,
    parse_record,
    received_spf,
    select_record,
)
from relay.config import ConfigError
from relay.dns import DNSResolver
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage

ZONE = {
    "example.org": [{"TXT": "v=spf1 ip4:192.0.2.0/24 a:mail.example.org mx include:inc.example.org"
                            " -all exp=why.example.org"},
                    {"MX": [10, "mx.example.org"]}],
    "mail.example.org": [{"A": "198.51.100.7"}],
    "mx.example.org": [{"A": "198.51.100.8"}, {"AAAA": "2001:db8::8"}],
    "inc.example.org": [{"TXT": "v=spf1 ip6:2001:db8:1::/48 -all"}],
    "why.example.org": [{"TXT": "%{i} may not send for %{d} (%{s})"}],
    "soft.example.org": [{"TXT": "v=spf1 ~all"}],
    "broken.example.org": [{"TXT": "v=spf1 ip4:1.2.3 -all"}],
    "slow.example.org": ["TIMEOUT"],
    "helo.example.org": [{"TXT": "v=spf1 a -all"}, {"A": "203.0.113.9"}],
}


def run(coro):
    return asyncio.run(coro)


def filt(options: dict | None = None, resolver: Resolver | None = None) -> SPFFilter:
    return SPFFilter(options or {}, FilterEnv("mx.receiver.test", resolver or ZoneResolver(ZONE)))


def ctx(ip: str, mail_from: str, helo: str = "client.example.net",
        resolver: Resolver | None = None, trusted: bool = False) -> Context:
    return Context(ip, 40000, "mta", resolver or ZoneResolver(ZONE), helo=helo,
                   mail_from=mail_from, trusted=trusted, queue_id="Q1")


# --- syntax --------------------------------------------------------------------------

@pytest.mark.parametrize("record", [
    "v=spf1 ip4:1.2.3.4/33", "v=spf1 a:foo", "v=spf1 include", "v=spf1 exists:",
    "v=spf1 -all.", "v=spf1 ptr/24", "v=spf1 redirect=a.com redirect=b.com",
    "v=spf1 foo=%x", "v=spf1 1x=y", "v=spf1 a:%{z}.example.com", "v=spf1 mx//129",
    "v=spf1 ip6:::1//64", "v=spf1 exp=%{r}.example.com", "v=spf1 a:%{d0}.example.com",
    "v=spf1 a:ex\u00e4mple.com",
])
def test_syntax_errors_are_permerror(record: str) -> None:
    with pytest.raises(PermError):
        parse_record(record)


def test_record_parses_every_mechanism() -> None:
    r = parse_record("v=spf1 +a -mx:%{d}/24//64 ~ptr ?ip4:10.0.0.0/8 ip6:2001:db8::/32 "
                     "include:_spf.example.com exists:%{i}.x.example.com all "
                     "redirect=example.net exp=e.example.net x-unknown=%{c}")
    assert [(m.result, m.kind) for m in r.mechanisms] == [
        ("pass", "a"), ("fail", "mx"), ("softfail", "ptr"), ("neutral", "ip4"),
        ("pass", "ip6"), ("pass", "include"), ("pass", "exists"), ("pass", "all")]
    assert r.mechanisms[1].cidr4 == 24 and r.mechanisms[1].cidr6 == 64
    assert r.redirect is not None and r.exp is not None


def test_record_selection() -> None:
    assert select_record(["hello", "v=spf1 -all", "v=spf10"]) == "v=spf1 -all"
    assert select_record(["v=spf1mx"]) is None
    with pytest.raises(PermError):
        select_record(["v=spf1 -all", "V=SPF1 +all"])


EXAMPLES_V4 = {   # RFC 7208 7.4, sender strong-bad@email.example.com, IP 192.0.2.3
    "%{s}": "strong-bad@email.example.com", "%{o}": "email.example.com",
    "%{d}": "email.example.com", "%{d4}": "email.example.com", "%{d3}": "email.example.com",
    "%{d2}": "example.com", "%{d1}": "com", "%{dr}": "com.example.email",
    "%{d2r}": "example.email", "%{l}": "strong-bad", "%{l-}": "strong.bad",
    "%{lr}": "strong-bad", "%{lr-}": "bad.strong", "%{l1r-}": "strong",
    "%{ir}.%{v}._spf.%{d2}": "3.2.0.192.in-addr._spf.example.com",
    "%{lr-}.lp._spf.%{d2}": "bad.strong.lp._spf.example.com",
    "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}": "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
    "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}": "3.2.0.192.in-addr.strong.lp._spf.example.com",
    "%{d2}.trusted-domains.example.net": "example.com.trusted-domains.example.net",
    "%%%_%-": "% %20", "%{L}": "strong-bad", "%{S}": "strong-bad%40email.example.com",
}


@pytest.mark.parametrize("macro,expected", sorted(EXAMPLES_V4.items()))
def test_macro_examples_rfc7208(macro: str, expected: str) -> None:
    chk = _Check(SPFChecker(ZoneResolver({})), ZoneResolver({}),
                 ipaddress.ip_address("192.0.2.3"), "strong-bad@email.example.com", "h.test")
    tokens = parse_macro_string(macro)
    assert run(chk.expand(tokens, "email.example.com")) == expected


def test_macro_ipv6_example() -> None:
    chk = _Check(SPFChecker(ZoneResolver({})), ZoneResolver({}),
                 ipaddress.ip_address("2001:db8::cb01"), "strong-bad@email.example.com", "h")
    out = run(chk.expand(parse_macro_string("%{ir}.%{v}._spf.%{d2}"), "email.example.com"))
    assert out == ("1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2"
                   ".ip6._spf.example.com")


def test_checker_results() -> None:
    c = SPFChecker(ZoneResolver(ZONE))
    assert run(c.check_host("192.0.2.55", "a@example.org", "h.test")).result == "pass"
    assert run(c.check_host("198.51.100.7", "a@example.org", "h.test")).result == "pass"
    assert run(c.check_host("198.51.100.8", "a@example.org", "h.test")).result == "pass"
    assert run(c.check_host("2001:db8::8", "a@example.org", "h.test")).result == "pass"
    r = run(c.check_host("2001:db8:1::9", "a@example.org", "h.test"))
    assert (r.result, r.mechanism) == ("pass", "include:inc.example.org")
    r = run(c.check_host("203.0.113.1", "a@example.org", "h.test"))
    assert (r.result, r.mechanism) == ("fail", "-all")
    assert r.explanation == "203.0.113.1 may not send for example.org (a@example.org)"
    assert run(c.check_host("203.0.113.1", "a@soft.example.org", "h")).result == "softfail"
    assert run(c.check_host("203.0.113.1", "a@none.example.org", "h")).result == "none"
    assert run(c.check_host("203.0.113.1", "a@broken.example.org", "h")).result == "permerror"
    assert run(c.check_host("203.0.113.1", "a@slow.example.org", "h")).result == "temperror"
    assert run(c.check_host("unknown", "a@example.org", "h")).result == "none"


# --- the filter ------------------------------------------------------------------------

def test_fail_is_rejected_with_rfc7372_code_and_explanation() -> None:
    f, c = filt(), ctx("203.0.113.1", "a@example.org")
    v = run(f.on_mail(c))
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 550, "5.7.23")
    assert "203.0.113.1 may not send for example.org" in v.text
    assert c.auth_results[-1].method == "spf" and c.auth_results[-1].result == "fail"
    assert c.auth_results[-1].props == (("smtp.mailfrom", "example.org"),)
    assert c.notes["spf"].result == "fail"


def test_pass_continues_with_received_spf_header() -> None:
    f, c = filt(), ctx("192.0.2.55", "a@example.org")
    v = run(f.on_mail(c))
    assert v.action is Action.CONTINUE
    (name, value), = v.headers
    assert name == "Received-SPF"
    assert value.startswith("pass (mx.receiver.test: domain of a@example.org designates "
                            "192.0.2.55 as permitted sender)")
    assert "client-ip=192.0.2.55;" in value and 'envelope-from="a@example.org";' in value
    assert "identity=mailfrom;" in value and "receiver=mx.receiver.test;" in value


def test_temperror_is_tempfailed() -> None:
    v = run(filt().on_mail(ctx("203.0.113.1", "a@slow.example.org")))
    assert (v.action, v.code, v.enhanced) == (Action.TEMPFAIL, 451, "4.7.24")


def test_other_results_continue_by_default() -> None:
    for sender in ("a@soft.example.org", "a@none.example.org", "a@broken.example.org"):
        assert run(filt().on_mail(ctx("203.0.113.1", sender))).action is Action.CONTINUE


def test_configured_actions() -> None:
    f = filt({"actions": {"softfail": "quarantine", "fail": "continue", "permerror": "reject"},
              "mailbox": "SPF-Held", "received_spf": False})
    v = run(f.on_mail(ctx("203.0.113.1", "a@soft.example.org")))
    assert (v.action, v.mailbox) == (Action.QUARANTINE, "SPF-Held")
    assert run(f.on_mail(ctx("203.0.113.1", "a@example.org"))).action is Action.CONTINUE
    v = run(f.on_mail(ctx("203.0.113.1", "a@broken.example.org")))
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 550, "5.7.24")
    assert run(f.on_mail(ctx("192.0.2.1", "a@example.org"))).headers == ()


@pytest.mark.parametrize("options,key", [
    ({"actions": {"fial": "reject"}}, "filters.spf.actions.fial"),
    ({"actions": {"fail": "bounce"}}, "filters.spf.actions.fail"),
    ({"timeout": "soon"}, "filters.spf.timeout"),
    ({"colour": 1}, "filters.spf.colour"),
])
def test_config_errors_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        filt(options)


def test_trusted_clients_are_not_checked() -> None:
    c = ctx("203.0.113.1", "a@example.org", trusted=True)
    assert run(filt().on_mail(c)).action is Action.CONTINUE
    assert c.auth_results == [] and "spf" not in c.notes
    c = ctx("203.0.113.1", "a@example.org", trusted=True)
    v = run(filt({"skip_trusted": False}).on_mail(c))
    assert v.action is Action.REJECT


def test_null_sender_checks_helo_identity() -> None:
    f = filt()
    c = ctx("203.0.113.9", "", helo="helo.example.org")
    v = run(f.on_mail(c))
    assert v.action is Action.CONTINUE
    assert c.auth_results[-1].result == "pass"
    assert c.auth_results[-1].props == (("smtp.helo", "helo.example.org"),)
    assert "identity=helo;" in v.headers[0][1]
    c = ctx("203.0.113.10", "", helo="helo.example.org")
    assert run(f.on_mail(c)).action is Action.REJECT


def test_helo_stage_check_is_optional() -> None:
    assert Stage.HELO not in filt().stages
    f = filt({"check_helo": True})
    assert Stage.HELO in f.stages
    assert run(f.on_helo(ctx("203.0.113.10", "", helo="helo.example.org"))).action is Action.REJECT
    assert run(f.on_helo(ctx("203.0.113.9", "", helo="helo.example.org"))).action is Action.CONTINUE


def test_hostile_identities_cannot_break_the_header() -> None:
    r = run(SPFChecker(ZoneResolver(ZONE)).check_host("192.0.2.1", 'x"\r\nBcc: y@example.org',
                                                       "h\r\nX: 1"))
    value = received_spf(r, "192.0.2.1", "h\r\nX: (1)", "mx.test", 'x"\r\nBcc: y@example.org')
    assert "\r" not in value and "\n" not in value
    assert 'helo="h??X: (1)";' in value


def test_overall_timeout_gives_temperror() -> None:
    with FakeDNS(drop=[".example.org"]) as dns:
        res = DNSResolver([(dns.host, dns.port)], timeout=30)
        f = filt({"timeout": 0.3}, res)
        v = run(f.on_mail(ctx("192.0.2.1", "a@example.org", resolver=res)))
    assert (v.action, v.code) == (Action.TEMPFAIL, 451)


def test_servfail_gives_temperror() -> None:
    with FakeDNS(servfail=["example.org"]) as dns:
        res = DNSResolver([(dns.host, dns.port)], timeout=2)
        c = ctx("192.0.2.1", "a@example.org", resolver=res)
        v = run(filt(resolver=res).on_mail(c))
    assert (v.action, v.enhanced) == (Action.TEMPFAIL, "4.7.24")
    assert c.notes["spf"].result == "temperror"


# --- end to end over real DNS ------------------------------------------------------------

def test_end_to_end_over_dnsmasq(tmp_path: Path) -> None:
    args = [
        "--local=/test/",
        "--txt-record=example.test,v=spf1 mx a:out.example.test include:partner.test "
        "-all exp=why.example.test",
        "--txt-record=why.example.test,%{i} is not a mail server of %{d}",
        "--mx-host=example.test,mx1.example.test,10",
        "--host-record=mx1.example.test,127.0.0.2",
        "--host-record=out.example.test,127.0.0.3,::3",
        "--txt-record=partner.test,v=spf1 ip4:127.0.1.0/24 ~all",
        "--txt-record=loop.test,v=spf1 include:loop.test",
        "--txt-record=nxvoid.test,v=spf1 a:n1.test a:n2.test a:n3.test -all",
        "--server=/timeout.test/127.0.0.1#9",
    ]
    with dnsmasq(tmp_path, args) as (host, port):
        res = DNSResolver([(host, port)], timeout=1)
        f = SPFFilter({}, FilterEnv("mx.receiver.test", res))

        def check(ip: str, sender: str) -> tuple[Action, str]:
            c = Context(ip, 1, "mta", res, helo="client.test", mail_from=sender)
            v = run(f.on_mail(c))
            return v.action, c.notes["spf"].result

        assert check("127.0.0.2", "a@example.test") == (Action.CONTINUE, "pass")
        assert check("127.0.0.3", "a@example.test") == (Action.CONTINUE, "pass")
        assert check("::3", "a@example.test") == (Action.CONTINUE, "pass")
        assert check("127.0.1.77", "a@example.test") == (Action.CONTINUE, "pass")
        assert check("127.0.9.9", "a@example.test") == (Action.REJECT, "fail")
        c = Context("127.0.9.9", 1, "mta", res, helo="client.test", mail_from="b@example.test")
        assert "127.0.9.9 is not a mail server of example.test" in run(f.on_mail(c)).text
        assert check("127.0.9.9", "a@nospf.test") == (Action.CONTINUE, "none")
        assert check("127.0.9.9", "a@loop.test") == (Action.CONTINUE, "permerror")
        assert check("127.0.9.9", "a@nxvoid.test") == (Action.CONTINUE, "permerror")
        assert check("127.0.9.9", "a@x.timeout.test") == (Action.TEMPFAIL, "temperror")
