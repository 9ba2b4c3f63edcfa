"""Access filter: client CIDRs, HELO checks, sender/recipient lists, recipient
verification from a list and a file that changes under it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from filters.access import AccessFilter, UserList
from relay.config import ConfigError
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage


def make(options: dict) -> AccessFilter:
    return AccessFilter(options, FilterEnv("relay.example.com", Resolver()))


def ctx(ip: str = "192.0.2.10", helo: str = "mail.client.test", mail_from: str = "",
        trusted: bool = False) -> Context:
    return Context(ip, 1, "mta", Resolver(), helo=helo, mail_from=mail_from, trusted=trusted,
                   queue_id="Q9")


def run(coro):
    return asyncio.run(coro)


# --- client -------------------------------------------------------------------------

def test_client_lists_longest_prefix_wins() -> None:
    f = make({"client": {"deny": ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"],
                         "allow": ["192.0.2.128/25", "198.51.100.7/32"]}})
    assert Stage.CONNECT in f.stages

    def act(ip: str) -> Action:
        return run(f.on_connect(ctx(ip))).action

    assert act("192.0.2.10") is Action.REJECT
    v = run(f.on_connect(ctx("192.0.2.10")))
    assert (v.code, v.enhanced) == (554, "5.7.1")
    assert act("192.0.2.200") is Action.ACCEPT
    assert act("::ffff:192.0.2.10") is Action.REJECT       # mapped v4 is v4
    assert act("2001:db8::1") is Action.REJECT
    assert act("203.0.113.1") is Action.CONTINUE
    assert act("198.51.100.7") is Action.REJECT            # tie: deny


# --- HELO ---------------------------------------------------------------------------

@pytest.mark.parametrize("helo,ip,expect", [
    ("mail.client.test", "192.0.2.10", None),
    ("[192.0.2.10]", "192.0.2.10", None),
    ("[IPv6:2001:db8::5]", "2001:db8::5", None),
    ("[192.0.2.10]", "::ffff:192.0.2.10", None),
    ("[192.0.2.11]", "192.0.2.10", (550, "5.7.1")),
    ("[IPv6:2001:db8::6]", "2001:db8::5", (550, "5.7.1")),
    ("[2001:db8::5]", "2001:db8::5", (501, "5.5.2")),      # v6 literal needs the tag
    ("[999.1.1.1]", "192.0.2.10", (501, "5.5.2")),
    ("192.0.2.10", "192.0.2.10", (501, "5.5.2")),
    ("2001:db8::5", "2001:db8::5", (501, "5.5.2")),
    ("bad_host..name", "192.0.2.10", (501, "5.5.2")),
    ("-dash.test", "192.0.2.10", (501, "5.5.2")),
    ("spaces are bad", "192.0.2.10", (501, "5.5.2")),
    ("win_pc", "192.0.2.10", None),
    ("relay.example.com", "192.0.2.10", (550, "5.7.1")),
    ("RELAY.Example.COM.", "192.0.2.10", (550, "5.7.1")),
    ("mx2.example.com", "192.0.2.10", (550, "5.7.1")),
    ("bücher.test", "192.0.2.10", None),
])
def test_helo_checks(helo: str, ip: str, expect: tuple[int, str] | None) -> None:
    f = make({"helo": {"own_names": ["mx2.example.com"]}})
    v = run(f.on_helo(ctx(ip, helo)))
    if expect is None:
        assert v.action is Action.CONTINUE
    else:
        assert (v.action, v.code, v.enhanced) == (Action.REJECT, *expect)


def test_helo_checks_are_configurable() -> None:
    f = make({"helo": {"reject_bare_ip": False, "reject_own_name": False,
                       "reject_literal_mismatch": False, "require_fqdn": True}})
    assert run(f.on_helo(ctx(helo="192.0.2.10"))).action is Action.CONTINUE
    assert run(f.on_helo(ctx(helo="relay.example.com"))).action is Action.CONTINUE
    assert run(f.on_helo(ctx(helo="[192.0.2.99]"))).action is Action.CONTINUE
    v = run(f.on_helo(ctx(helo="localhost")))
    assert (v.code, v.enhanced) == (504, "5.5.2")
    f = make({"helo": {"reject_own_name": False, "reject_literal_mismatch": False,
                       "reject_bare_ip": False, "reject_invalid": False}})
    assert Stage.HELO not in f.stages


def test_trusted_clients_skip_helo_checks() -> None:
    f = make({})
    assert run(f.on_helo(ctx(helo="relay.example.com", trusted=True))).action is Action.CONTINUE
    f = make({"helo": {"skip_trusted": False}})
    assert run(f.on_helo(ctx(helo="relay.example.com", trusted=True))).action is Action.REJECT


# --- senders and recipients ------------------------------------------------------------

def test_sender_lists_most_specific_wins() -> None:
    f = make({"senders": {"deny": ["@spam.test", ".bulk.test", "ceo@corp.test", "<>"],
                          "allow": ["friend@spam.test", ".ok.bulk.test", "corp.test"]}})
    assert Stage.MAIL in f.stages

    def act(sender: str) -> Action:
        return run(f.on_mail(ctx(mail_from=sender))).action

    assert act("x@spam.test") is Action.REJECT
    assert act("Friend@SPAM.test") is Action.ACCEPT
    assert act("a@mx.bulk.test") is Action.REJECT
    assert act("a@bulk.test") is Action.CONTINUE            # '.x' is subdomains only
    assert act("a@a.ok.bulk.test") is Action.ACCEPT
    assert act("ceo@corp.test") is Action.REJECT
    assert act("cfo@corp.test") is Action.ACCEPT
    assert act("") is Action.REJECT                          # '<>' is the null sender
    assert act("a@elsewhere.test") is Action.CONTINUE
    v = run(f.on_mail(ctx(mail_from="x@spam.test")))
    assert (v.code, v.enhanced) == (550, "5.7.1")


def test_recipient_lists() -> None:
    f = make({"recipients": {"deny": ["@closed.test"], "allow": ["postmaster@closed.test"]}})
    assert run(f.on_rcpt(ctx(), "a@closed.test")).action is Action.REJECT
    assert run(f.on_rcpt(ctx(), "<postmaster@closed.test>")).action is Action.ACCEPT
    assert run(f.on_rcpt(ctx(), "a@open.test")).action is Action.CONTINUE


# --- verification ---------------------------------------------------------------------

def test_recipient_verification_from_list() -> None:
    f = make({"verify": {"addresses": ["Alice@Example.org", "@catchall.test"],
                         "recipient_delimiter": "+"}})
    assert Stage.RCPT in f.stages

    def act(rcpt: str):
        return run(f.on_rcpt(ctx(), rcpt))

    assert act("alice@example.org").action is Action.CONTINUE
    assert act("alice+news@example.org").action is Action.CONTINUE
    v = act("bob@example.org")
    assert (v.action, v.code, v.enhanced) == (Action.REJECT, 550, "5.1.1")
    assert act("anyone@catchall.test").action is Action.CONTINUE
    assert act("bob@not-ours.test").action is Action.CONTINUE   # not a verified domain


def test_recipient_verification_from_a_file_that_changes(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users"
    users.write_text("# valid users\nalice@example.org\n\nnot-an-address\n")
    monkeypatch.setattr(UserList, "RECHECK", 0.0)
    f = make({"verify": {"file": str(users), "domains": ["example.org", ".sub.example.org"]}})
    assert run(f.on_rcpt(ctx(), "alice@example.org")).action is Action.CONTINUE
    assert run(f.on_rcpt(ctx(), "bob@example.org")).action is Action.REJECT
    assert run(f.on_rcpt(ctx(), "x@a.sub.example.org")).action is Action.REJECT
    users.write_text("alice@example.org\nbob@example.org\n")
    st = users.stat()
    os.utime(users, (st.st_atime, st.st_mtime + 5))    # a coarse-mtime filesystem
    assert run(f.on_rcpt(ctx(), "bob@example.org")).action is Action.CONTINUE
    users.unlink()                                      # gone: keep the last good list
    assert run(f.on_rcpt(ctx(), "bob@example.org")).action is Action.CONTINUE


@pytest.mark.parametrize("options,key", [
    ({"client": {"deny": ["10.0.0.300/8"]}}, r"filters.access.client.deny\[0\]"),
    ({"senders": {"deny": ["@bad..domain"]}}, r"filters.access.senders.deny\[0\]"),
    ({"recipients": {"allow": ["@x.test", "@"]}}, r"filters.access.recipients.allow\[1\]"),
    ({"verify": {"addresses": ["nodomain"]}}, r"filters.access.verify.addresses\[0\]"),
    ({"verify": {"file": "/nonexistent/users"}}, "filters.access.verify.file"),
    ({"verify": {"domains": ["example.org"]}}, "filters.access.verify.domains"),
    ({"helo": {"reject_bare_ip": "yes"}}, "filters.access.helo.reject_bare_ip"),
    ({"clients": {}}, "filters.access.clients"),
])
def test_config_errors_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        make(options)
