"""Routing filter (filters.routing): option validation that names the key, per-recipient
routes at RCPT, header/sender/recipient rules at DATA, quarantine, and the filter loaded
by name and run through the real chain."""

from __future__ import annotations

import asyncio

import pytest

from filters.routing import RoutingFilter
from relay.config import ConfigError, FilterConfig
from relay.pipeline import loader
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage

ENV = FilterEnv(hostname="relay.test", resolver=Resolver())

MESSAGE = (b"From: Billing <billing@vendor.test>\r\n"
           b"To: ap@corp.test\r\n"
           b"Subject: =?utf-8?q?Rechnung_f=C3=BCr_M=C3=A4rz?=\r\n"
           b"X-Priority: 1\r\n"
           b"\r\n"
           b"Subject: invoice in the body does not count\r\n")


def ctx(sender="a@sender.test", rcpts=("b@corp.test",), message=MESSAGE) -> Context:
    c = Context("192.0.2.1", 4000, "mta", Resolver(), queue_id="QID1", mail_from=sender,
                rcpts=list(rcpts))

    async def load():
        return message
    c._load = load
    return c


def make(rules) -> RoutingFilter:
    return RoutingFilter({"rules": rules}, ENV)


def run(coro):
    return asyncio.run(coro)


RULES = [
    {"name": "eu", "recipient": [".eu.corp.test"], "route": "[10.0.0.5]:2525"},
    {"name": "partner", "recipient": ["partner.test", "boss@corp.test"],
     "route": "smtp.partner.test:587"},
    {"name": "from-vendor", "sender": ["@vendor.test"], "recipient": ["corp.test"],
     "route": "[192.0.2.9]"},
    {"name": "invoices", "header": "Subject", "regex": "(?i)rechnung|invoice",
     "quarantine": "Invoices", "reason": "invoice to review"},
    {"name": "bounces", "sender": ["<>"], "quarantine": "Bounces"},
    {"name": "urgent", "header": "X-Priority", "regex": "^1$", "route": "[10.9.9.9]:25"},
]


def test_stages_follow_the_rules():
    assert make(RULES).stages == {Stage.RCPT, Stage.DATA}
    assert make(RULES[:1]).stages == {Stage.RCPT}
    assert make(RULES[3:4]).stages == {Stage.DATA}
    assert make([]).stages == frozenset()


@pytest.mark.parametrize("sender,rcpt,route", [
    ("a@x.test", "u@eu.corp.test", None),               # '.dom': subdomains only
    ("a@x.test", "u@deep.eu.corp.test", "[10.0.0.5]:2525"),
    ("a@x.test", "u@a.b.EU.Corp.Test", "[10.0.0.5]:2525"),
    ("a@x.test", "u@partner.test", "smtp.partner.test:587"),
    ("a@x.test", "boss@corp.test", "smtp.partner.test:587"),
    ("a@x.test", "u@sub.partner.test", None),          # bare domain: not subdomains
    ("a@x.test", "eu.corp.test@other.test", None),
    ("a@x.test", "u@corp.test", None),
    ("x@vendor.test", "u@corp.test", "[192.0.2.9]"),
    ("x@vendor.test", "u@other.test", None),           # both conditions must hold
    ("x@evilvendor.test", "u@corp.test", None),
])
def test_rcpt_routes(sender, rcpt, route):
    f = make(RULES)
    v = run(f.on_rcpt(ctx(sender=sender), rcpt))
    assert v.action is Action.CONTINUE
    assert v.route == route


def test_data_header_quarantine_decodes_encoded_words():
    v = run(make(RULES).on_data(ctx()))
    assert v.action is Action.QUARANTINE
    assert v.mailbox == "Invoices" and v.reason == "invoice to review"


def test_data_body_lines_are_not_headers():
    msg = MESSAGE.replace(b"Rechnung", b"Hello").replace(b"X-Priority: 1\r\n", b"")
    assert run(make(RULES).on_data(ctx(message=msg))).action is Action.CONTINUE
    assert run(make(RULES).on_data(ctx(message=msg))).route is None


def test_data_header_route_and_first_match_wins():
    msg = MESSAGE.replace(b"Rechnung", b"Hello")
    v = run(make(RULES).on_data(ctx(message=msg)))
    assert v.action is Action.CONTINUE and v.route == "[10.9.9.9]:25"
    # Rule order decides: put 'urgent' first and it wins over 'invoices'.
    v = run(make([RULES[5], RULES[3]]).on_data(ctx()))
    assert v.route == "[10.9.9.9]:25"


def test_null_sender_quarantine():
    msg = b"Subject: hi\r\n\r\n"
    v = run(make(RULES).on_data(ctx(sender="", message=msg)))
    assert v.action is Action.QUARANTINE and v.mailbox == "Bounces"
    assert run(make(RULES).on_data(ctx(sender="a@b.test", message=msg))).action \
        is Action.CONTINUE


def test_recipient_condition_at_data_matches_any_recipient():
    f = make([{"recipient": ["legal.test"], "quarantine": "Legal"}])
    assert run(f.on_data(ctx(rcpts=["a@x.test", "b@legal.test"]))).action is Action.QUARANTINE
    assert run(f.on_data(ctx(rcpts=["a@x.test"]))).action is Action.CONTINUE


def test_rewrites_nothing():
    c = ctx(sender="x@vendor.test", rcpts=["u@x.eu.corp.test"])
    f = make(RULES)
    assert run(f.on_rcpt(c, "u@x.eu.corp.test")).route == "[10.0.0.5]:2525"
    run(f.on_data(c))
    assert c.mail_from == "x@vendor.test" and c.rcpts == ["u@x.eu.corp.test"]
    assert run(c.message()) == MESSAGE
    v = run(f.on_data(c))
    assert v.headers == ()


def test_huge_header_value_is_bounded():
    msg = b"Subject: " + b"a" * 1_000_000 + b"Rechnung\r\n\r\n"
    f = make([{"header": "Subject", "regex": "Rechnung", "quarantine": "Q"}])
    assert run(f.on_data(ctx(message=msg))).action is Action.CONTINUE


@pytest.mark.parametrize("rules,key", [
    ([{"recipient": ["a.test"]}], "filters.routing.rules[0].route"),
    ([{"recipient": ["a.test"], "route": "x:1", "quarantine": "Q"}],
     "filters.routing.rules[0].route"),
    ([{"recipient": ["a.test"], "route": "bad host:25"}], "filters.routing.rules[0].route"),
    ([{"recipient": ["a.test"], "route": "[10.0.0.1]:99999"}],
     "filters.routing.rules[0].route"),
    ([{"route": "[10.0.0.1]:25"}], "filters.routing.rules[0]"),
    ([{"recipient": ["a.test"], "route": "x:25"}, {"recipient": ["bad..domain"],
                                                   "route": "x:25"}],
     "filters.routing.rules[1].recipient[0]"),
    ([{"sender": ["@"], "route": "x:25"}], "filters.routing.rules[0].sender[0]"),
    ([{"header": "Subject", "regex": "([", "quarantine": "Q"}],
     "filters.routing.rules[0].regex"),
    ([{"header": "Subject", "quarantine": "Q"}], "filters.routing.rules[0].regex"),
    ([{"regex": "x", "quarantine": "Q"}], "filters.routing.rules[0].header"),
    ([{"header": "Bad Name", "regex": "x", "quarantine": "Q"}],
     "filters.routing.rules[0].header"),
    ([{"recipient": ["a.test"], "route": "x:25", "rout": "typo"}],
     "filters.routing.rules[0].rout"),
    ([{"recipient": "a.test", "route": "x:25"}], "filters.routing.rules[0].recipient"),
])
def test_config_errors_name_the_key(rules, key):
    with pytest.raises(ConfigError) as e:
        make(rules)
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_through_the_loader_and_chain():
    chain = loader.load((FilterConfig(name="routing", options={"rules": RULES}),), ENV)
    c = ctx(sender="x@vendor.test", rcpts=["u@corp.test"])
    v = run(chain.run(Stage.RCPT, c, "u@corp.test"))
    assert v.action is Action.CONTINUE and v.route == "[192.0.2.9]"
    v = run(chain.run(Stage.DATA, c))
    assert v.action is Action.QUARANTINE and v.filter == "routing"
    with pytest.raises(ConfigError) as e:
        loader.load((FilterConfig(name="routing", options={"rules": [{"route": "x:1"}]}),),
                    ENV)
    assert str(e.value).startswith("filters[0].options: rules[0]")
