"""Next-hop choice (relay.delivery.route), MX resolution against dnsmasq on loopback
(relay.delivery.mx) and the TLS policy decision (relay.delivery.tls_policy)."""

from __future__ import annotations

import asyncio
import random

import pytest
from _delivery import ZONE
from _dns import dnsmasq

from relay.config import DeliveryConfig, Domain, DomainTLSPolicy, TransportRoute
from relay.delivery import mx
from relay.delivery.route import Hop, RouteError, Router, parse_nexthop
from relay.delivery.tls_policy import TLSPolicies
from relay.dns import DNSResolver
from relay.queue.model import Recipient


@pytest.fixture(scope="module")
def resolver_port(tmp_path_factory):
    with dnsmasq(tmp_path_factory.mktemp("dns"), ZONE) as (_, port):
        yield port


def resolve(port, hop):
    return asyncio.run(mx.resolve(hop, DNSResolver([("127.0.0.1", port)], 3.0)))


def test_parse_nexthop():
    assert parse_nexthop("mx.example.com", 25) == Hop("mx.example.com", 25, True)
    assert parse_nexthop("mx.example.com:2525", 25) == Hop("mx.example.com", 2525, True)
    assert parse_nexthop("[smart.example.com]:587", 25) == Hop("smart.example.com", 587, False)
    assert parse_nexthop("[10.0.0.1]", 25) == Hop("10.0.0.1", 25, False)
    assert parse_nexthop("[::1]:26", 25) == Hop("::1", 26, False)
    for bad in ("", "[x", "a:b:c", "host:99999", "[a]]"):
        with pytest.raises(RouteError):
            parse_nexthop(bad, 25)


def test_route_order():
    cfg = DeliveryConfig(
        smtp_port=2525,
        transport=(TransportRoute(Domain.parse("corp.test"), "[10.0.0.1]:26"),
                   TransportRoute(Domain.parse(".corp.test"), "relay.corp.test"),
                   TransportRoute(Domain.parse("*.eu.corp.test"), "[10.0.0.2]")),
        relayhost=("[s1.test]:587", "[s2.test]:587"))
    r = Router(cfg)
    assert r.route(Recipient("a@x.test", route="[10.9.9.9]:25")).hops == (Hop("10.9.9.9", 25, False),)
    assert r.route(Recipient("a@corp.test")).hops == (Hop("10.0.0.1", 26, False),)
    assert r.route(Recipient("a@hq.corp.test")).hops == (Hop("relay.corp.test", 2525, True),)
    assert r.route(Recipient("a@x.eu.corp.test")).hops == (Hop("10.0.0.2", 2525, False),)
    smart = r.route(Recipient("a@Other.TEST"))
    assert smart.kind == "relayhost" and [h.host for h in smart.hops] == ["s1.test", "s2.test"]
    assert smart.domain == ""
    nosmart = Router(DeliveryConfig(smtp_port=25))
    mxr = nosmart.route(Recipient("a@Other.TEST"))
    assert mxr.kind == "mx" and mxr.hops == (Hop("other.test", 25, True),) and mxr.domain == "other.test"
    lit = nosmart.route(Recipient("a@[127.0.0.5]"))
    assert lit.hops == (Hop("127.0.0.5", 25, False),)
    groups = nosmart.group([Recipient("a@x.test"), Recipient("b@y.test"), Recipient("c@X.test")])
    assert [[g.address for g in v] for v in groups.values()] == [["a@x.test", "c@X.test"], ["b@y.test"]]
    with pytest.raises(RouteError):
        nosmart.route(Recipient("a@x.test", route="[bad"))


def test_mx_by_preference(resolver_port):
    t = resolve(resolver_port, Hop("example.test", 2525, True))
    assert [(x.host, x.address, x.port) for x in t] == [
        ("mx1.example.test", "127.0.0.2", 2525), ("mx2.example.test", "127.0.0.3", 2525)]
    assert str(t[0]) == "mx1.example.test[127.0.0.2]:2525"


def test_equal_preference_is_shuffled(resolver_port):
    firsts = set()
    for _ in range(30):
        t = resolve(resolver_port, Hop("equal.test", 25, True))
        assert t[0].host == "c.equal.test"          # preference 5 always first
        firsts.add(t[1].host)
    assert firsts == {"a.equal.test", "b.equal.test"}
    # order_mx itself: same preference, both orders appear; lower preference first.
    rng = random.Random(1)
    orders = {tuple(n for _, n in mx.order_mx([(10, "a"), (10, "b"), (0, "z")], rng))
              for _ in range(20)}
    assert orders == {("z", "a", "b"), ("z", "b", "a")}


def test_implicit_mx_null_mx_and_errors(resolver_port):
    (t,) = resolve(resolver_port, Hop("amx.test", 25, True))
    assert (t.host, t.address) == ("amx.test", "127.0.0.6")
    with pytest.raises(mx.MXError) as e:
        resolve(resolver_port, Hop("nullmx.test", 25, True))
    assert (e.value.code, e.value.enhanced, e.value.temporary) == (556, "5.1.10", False)
    with pytest.raises(mx.MXError) as e:
        resolve(resolver_port, Hop("nosuch.test", 25, True))
    assert e.value.enhanced == "5.1.2" and not e.value.temporary
    with pytest.raises(mx.MXError) as e:
        resolve(resolver_port, Hop("noaddr.test", 25, True))
    assert e.value.temporary
    (t,) = resolve(resolver_port, Hop("smart.test", 587, False))
    assert (t.host, t.address, t.port) == ("smart.test", "127.0.0.7", 587)
    (t,) = resolve(resolver_port, Hop("127.0.0.9", 25, False))
    assert t.address == "127.0.0.9"


def test_dns_timeout_is_temporary():
    # Nothing answers on this port (a closed UDP socket): a timeout, so defer.
    with pytest.raises(mx.MXError) as e:
        asyncio.run(mx.resolve(Hop("example.test", 25, True),
                               DNSResolver([("127.0.0.1", 9)], 0.5)))
    assert e.value.temporary and e.value.enhanced == "4.4.3"


class _Policy:
    def __init__(self, mode, mx):
        self.mode, self._mx = mode, mx

    def matches(self, host):
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self._mx)


class _STS:
    def __init__(self, policies):
        self.policies = policies

    async def policy(self, domain):
        return self.policies.get(domain)


def test_tls_policy_decisions():
    cfg = DeliveryConfig(tls_policy="may", mta_sts=True,
                         tls_policies=(DomainTLSPolicy(Domain.parse("secure.test"), "verify"),
                                       DomainTLSPolicy(Domain.parse(".plain.test"), "none")))
    sts = _STS({"sts.test": _Policy("enforce", ["*.sts.test"]),
                "try.test": _Policy("testing", ["mx.try.test"]),
                "plain.test": _Policy("testing", ["x"])})
    p = TLSPolicies(cfg, sts)
    r = Router(DeliveryConfig())
    d = asyncio.run(p.decide(r.route(Recipient("a@sts.test"))))
    assert d.level == "verify" and d.allows("mx1.sts.test") and not d.allows("evil.test")
    assert asyncio.run(p.decide(r.route(Recipient("a@try.test")))).level == "may"
    assert asyncio.run(p.decide(r.route(Recipient("a@secure.test")))).level == "verify"
    assert asyncio.run(p.decide(r.route(Recipient("a@x.plain.test")))).level == "none"
    assert asyncio.run(p.decide(r.route(Recipient("a@other.test")))).level == "may"
    # Enforce is never downgraded by a per-domain 'none'.
    low = TLSPolicies(DeliveryConfig(tls_policies=(DomainTLSPolicy(Domain.parse("sts.test"), "none"),)), sts)
    assert asyncio.run(low.decide(r.route(Recipient("a@sts.test")))).level == "verify"
    assert p.context("none") is None and p.context("verify").check_hostname
