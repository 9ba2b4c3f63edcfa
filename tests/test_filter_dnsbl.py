"""DNSBL filter: query names, reply-code mapping, zone order, DNS errors, the rcpt stage;
zones served by a real dnsmasq on loopback (FakeDNS where SERVFAIL is needed)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dns import FakeDNS, dnsmasq

from filters.dnsbl import DNSBLFilter, query_name
from relay.config import ConfigError
from relay.dns import DNSResolver
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage

V6 = "2001:db8::1"
V6_REV = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DNSResolver]:
    args = [
        "--local=/test/",
        "--address=/2.0.0.127.bl.test/127.0.0.2",
        "--address=/3.0.0.127.bl.test/127.0.0.10",
        "--address=/4.0.0.127.bl.test/127.255.255.254",    # "query refused" code
        "--address=/6.0.0.127.bl.test/192.0.2.1",         # not a DNSBL answer at all
        f"--address=/{V6_REV}.bl.test/127.0.0.2",
        "--address=/5.0.0.127.wl.test/127.0.10.1",
        "--address=/2.0.0.127.wl.test/127.0.10.1",
        "--server=/timeout.test/127.0.0.1#9",
    ]
    with dnsmasq(tmp_path_factory.mktemp("dnsbl"), args) as (host, port):
        yield DNSResolver([(host, port)], timeout=1)


def make(options: dict, resolver: Resolver) -> DNSBLFilter:
    return DNSBLFilter(options, FilterEnv("mx.test", resolver))


def connect(f: DNSBLFilter, ip: str, resolver: Resolver, trusted: bool = False):
    return asyncio.run(f.on_connect(Context(ip, 1, "mta", resolver, trusted=trusted)))


def test_query_names_rfc5782() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.99"), "bl.test") == "99.2.0.192.bl.test"
    assert query_name(ipaddress.ip_address(V6), "bl.test") == f"{V6_REV}.bl.test"


def test_listed_client_is_rejected_at_connect(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "bl.test"}]}, resolver)
    assert f.stages == frozenset({Stage.CONNECT})
    v = connect(f, "127.0.0.2", resolver)
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 554, "5.7.1")
    assert v.text == "Service unavailable; client host [127.0.0.2] blocked using bl.test"
    assert connect(f, "127.0.0.9", resolver).action is Action.CONTINUE
    assert connect(f, "::ffff:127.0.0.2", resolver).action is Action.REJECT
    assert connect(f, V6, resolver).action is Action.REJECT


def test_ipv6_lookups_can_be_off(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "bl.test", "ipv6": False}]}, resolver)
    assert connect(f, V6, resolver).action is Action.CONTINUE


def test_reply_codes_map_to_actions(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "bl.test", "replies": {"127.0.0.10": "quarantine",
                                                        "127.0.0.0/30": "tempfail"}}],
              "mailbox": "Blocklisted"}, resolver)
    v = connect(f, "127.0.0.3", resolver)
    assert (v.action, v.mailbox) == (Action.QUARANTINE, "Blocklisted")
    v = connect(f, "127.0.0.2", resolver)
    assert (v.action, v.code, v.enhanced) == (Action.TEMPFAIL, 450, "4.7.1")
    f = make({"zones": [{"zone": "bl.test", "replies": {"127.0.0.2": "reject"}}]}, resolver)
    assert connect(f, "127.0.0.3", resolver).action is Action.CONTINUE   # unmapped code


def test_replies_outside_loopback_or_refusals_are_ignored(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "bl.test"}]}, resolver)
    assert connect(f, "127.0.0.4", resolver).action is Action.CONTINUE
    assert connect(f, "127.0.0.6", resolver).action is Action.CONTINUE


def test_first_deciding_zone_wins(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "wl.test", "action": "accept"}, {"zone": "bl.test"}]},
             resolver)
    assert connect(f, "127.0.0.2", resolver).action is Action.ACCEPT
    assert connect(f, "127.0.0.3", resolver).action is Action.REJECT
    f = make({"zones": [{"zone": "bl.test"}, {"zone": "wl.test", "action": "accept"}]},
             resolver)
    assert connect(f, "127.0.0.2", resolver).action is Action.REJECT
    assert connect(f, "127.0.0.5", resolver).action is Action.ACCEPT


def test_dns_errors_continue_or_tempfail(resolver: DNSResolver) -> None:
    zones = [{"zone": "timeout.test"}, {"zone": "bl.test"}]
    f = make({"zones": zones}, resolver)
    assert connect(f, "127.0.0.9", resolver).action is Action.CONTINUE
    assert connect(f, "127.0.0.2", resolver).action is Action.REJECT
    f = make({"zones": zones, "on_dns_error": "tempfail"}, resolver)
    v = connect(f, "127.0.0.2", resolver)
    assert (v.action, v.code, v.enhanced) == (Action.TEMPFAIL, 451, "4.4.3")


def test_servfail_is_a_dns_error() -> None:
    with FakeDNS(servfail=[".bl.test"]) as dns:
        res = DNSResolver([(dns.host, dns.port)], timeout=2)
        f = make({"zones": [{"zone": "bl.test"}], "on_dns_error": "tempfail"}, res)
        assert connect(f, "127.0.0.2", res).action is Action.TEMPFAIL


def test_trusted_clients_are_skipped(resolver: DNSResolver) -> None:
    f = make({"zones": [{"zone": "bl.test"}]}, resolver)
    assert connect(f, "127.0.0.2", resolver, trusted=True).action is Action.CONTINUE


def test_rcpt_stage_exempts_postmaster_and_looks_up_once() -> None:
    records = {("2.0.0.127.bl.test", "A"): ["127.0.0.2"]}
    with FakeDNS(records) as dns:
        res = DNSResolver([(dns.host, dns.port)], timeout=2)
        res._r.cache = None     # count every query the filter makes
        f = make({"zones": [{"zone": "bl.test"}], "stage": "rcpt"}, res)
        assert f.stages == frozenset({Stage.RCPT})
        ctx = Context("127.0.0.2", 1, "mta", res)

        async def go() -> list[Action]:
            out = []
            for rcpt in ("postmaster@x.test", "a@x.test", "b@x.test", "Abuse@x.test"):
                out.append((await f.on_rcpt(ctx, rcpt)).action)
            return out

        assert asyncio.run(go()) == [Action.CONTINUE, Action.REJECT, Action.REJECT,
                                     Action.CONTINUE]
        assert dns.queries == [("2.0.0.127.bl.test", "A")]


@pytest.mark.parametrize("options,key", [
    ({}, "filters.dnsbl.zones"),
    ({"zones": [{"zone": "bl..test"}]}, r"filters.dnsbl.zones\[0\].zone"),
    ({"zones": [{"zone": "bl.test", "replies": {"10.0.0.1": "reject"}}]},
     r"filters.dnsbl.zones\[0\].replies.10.0.0.1"),
    ({"zones": [{"zone": "bl.test", "replies": {"127.0.0.2": "drop"}}]},
     r"filters.dnsbl.zones\[0\].replies.127.0.0.2"),
    ({"zones": [{"zone": "bl.test", "text": "{secret}"}]}, r"filters.dnsbl.zones\[0\].text"),
    ({"zones": [{"zone": "bl.test"}], "stage": "data"}, "filters.dnsbl.stage"),
])
def test_config_errors_name_the_key(options: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        make(options, DNSResolver([("127.0.0.1", 9)], timeout=1))
