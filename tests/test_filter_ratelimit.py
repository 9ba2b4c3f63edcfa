"""Rate-limit filter: limits per key kind, the sliding window on a fake clock, what is
counted, bounded memory, config errors."""

from __future__ import annotations

import asyncio

import pytest

from filters.ratelimit import RateLimitFilter, SlidingWindow
from relay.config import ConfigError
from relay.pipeline.protocol import Action, Context, FilterEnv, Resolver, Stage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0 * 60      # the start of a 60 s window

    def __call__(self) -> float:
        return self.now


def make(options: dict, clock: Clock | None = None) -> RateLimitFilter:
    return RateLimitFilter(options, FilterEnv("mx.test", Resolver()), clock=clock or Clock())


def ctx(ip: str = "192.0.2.1", mail_from: str = "a@example.org", auth_user: str = "",
        trusted: bool = False) -> Context:
    return Context(ip, 1, "mta", Resolver(), mail_from=mail_from, auth_user=auth_user,
                   trusted=trusted)


def mail(f: RateLimitFilter, c: Context) -> Action:
    return asyncio.run(f.on_mail(c)).action


def test_messages_per_client_over_a_sliding_window() -> None:
    clock = Clock()
    f = make({"limits": [{"key": "client_ip", "limit": 3, "window": "60s"}]}, clock)
    assert f.stages == frozenset({Stage.MAIL})
    assert [mail(f, ctx()) for _ in range(3)] == [Action.CONTINUE] * 3
    v = asyncio.run(f.on_mail(ctx()))
    assert (v.action, v.code, v.enhanced) == (Action.TEMPFAIL, 450, "4.7.1")
    assert mail(f, ctx("192.0.2.2")) is Action.CONTINUE          # another client
    assert mail(f, ctx("::ffff:192.0.2.1")) is Action.TEMPFAIL   # the same one, mapped
    clock.now += 30                  # same window: still over
    assert mail(f, ctx()) is Action.TEMPFAIL
    clock.now += 60                  # half way into the next: 3 * 0.5 = 1.5 counted
    assert mail(f, ctx()) is Action.CONTINUE
    assert mail(f, ctx()) is Action.TEMPFAIL
    clock.now += 120                 # two windows on: forgotten
    assert [mail(f, ctx()) for _ in range(4)] == [Action.CONTINUE] * 3 + [Action.TEMPFAIL]


def test_refused_attempts_are_not_counted() -> None:
    clock = Clock()
    f = make({"limits": [{"key": "client_ip", "limit": 2, "window": 60}]}, clock)
    for _ in range(2):
        mail(f, ctx())
    for _ in range(50):
        assert mail(f, ctx()) is Action.TEMPFAIL
    clock.now += 60 + 59             # 2 * (1/60) ~ 0.03 counted
    assert mail(f, ctx()) is Action.CONTINUE


def test_recipients_per_sender_domain_and_auth_user() -> None:
    f = make({"limits": [{"key": "sender_domain", "count": "recipients", "limit": 2},
                         {"key": "auth_user", "count": "recipients", "limit": 3}]})
    assert f.stages == frozenset({Stage.RCPT})

    def rcpt(c: Context) -> Action:
        return asyncio.run(f.on_rcpt(c, "x@dest.test")).action

    assert rcpt(ctx(mail_from="a@example.org")) is Action.CONTINUE
    assert rcpt(ctx(mail_from="b@EXAMPLE.org")) is Action.CONTINUE
    assert rcpt(ctx(mail_from="c@example.org")) is Action.TEMPFAIL
    assert rcpt(ctx(mail_from="", auth_user="u1")) is Action.CONTINUE   # null: no key
    assert rcpt(ctx(mail_from="", auth_user="u1")) is Action.CONTINUE
    assert rcpt(ctx(mail_from="", auth_user="u1")) is Action.CONTINUE
    assert rcpt(ctx(mail_from="", auth_user="u1")) is Action.TEMPFAIL
    assert rcpt(ctx(mail_from="", auth_user="")) is Action.CONTINUE     # no user: no key


def test_a_refusal_counts_in_no_limit() -> None:
    f = make({"limits": [{"key": "sender", "limit": 1}, {"key": "client_ip", "limit": 5}]})
    assert mail(f, ctx(mail_from="a@example.org")) is Action.CONTINUE
    for _ in range(10):
        assert mail(f, ctx(mail_from="a@example.org")) is Action.TEMPFAIL
    # The client's limit only saw the one message let through.
    assert [mail(f, ctx(mail_from=f"s{i}@example.org")) for i in range(5)] == \
        [Action.CONTINUE] * 4 + [Action.TEMPFAIL]


def test_ipv6_clients_are_counted_per_network() -> None:
    f = make({"limits": [{"key": "client_ip", "limit": 2}]})
    assert mail(f, ctx("2001:db8:1:2::1")) is Action.CONTINUE
    assert mail(f, ctx("2001:db8:1:2::ffff")) is Action.CONTINUE
    assert mail(f, ctx("2001:db8:1:2:3::9")) is Action.TEMPFAIL
    assert mail(f, ctx("2001:db8:1:3::1")) is Action.CONTINUE
    f = make({"limits": [{"key": "client_ip", "limit": 1}], "ipv6_prefix": 128})
    assert mail(f, ctx("2001:db8::1")) is Action.CONTINUE
    assert mail(f, ctx("2001:db8::2")) is Action.CONTINUE


def test_exempt_and_trusted_clients() -> None:
    f = make({"limits": [{"key": "client_ip", "limit": 1}], "exempt": ["192.0.2.0/24"],
              "skip_trusted": True})
    assert [mail(f, ctx("192.0.2.9")) for _ in range(3)] == [Action.CONTINUE] * 3
    assert [mail(f, ctx("203.0.113.9", trusted=True)) for _ in range(3)] == [Action.CONTINUE] * 3
    assert mail(f, ctx("203.0.113.9")) is Action.CONTINUE
    assert mail(f, ctx("203.0.113.9")) is Action.TEMPFAIL


def test_memory_is_bounded() -> None:
    clock = Clock()
    w = SlidingWindow(limit=1, window=60, max_keys=100, clock=clock)
    for i in range(10_000):
        key = f"10.0.{i // 256}.{i % 256}"
        assert w.allows(key)
        w.add(key)
    assert len(w) == 100
    assert not w.allows("10.0.39.15")        # among the most recent: remembered
    assert w.allows("10.0.0.0")              # long evicted


@pytest.mark.parametrize("options,key", [
    ({}, "filters.ratelimit.limits"),
    ({"limits": [{"key": "ip", "limit": 1}]}, r"filters.ratelimit.limits\[0\].key"),
    ({"limits": [{"key": "sender"}]}, r"filters.ratelimit.limits\[0\].limit"),
    ({"limits": [{"key": "sender", "limit": 0}]}, r"filters.ratelimit.limits\[0\].limit"),
    ({"limits": [{"key": "sender", "limit": 5, "window": 0}]},
     r"filters.ratelimit.limits\[0\].window"),
    ({"limits": [{"key": "sender", "limit": 5, "count": "bytes"}]},
     r"filters.ratelimit.limits\[0\].count"),
    ({"limits": [{"key": "sender", "limit": 5}], "max_keys": 0}, "filters.ratelimit.max_keys"),
    ({"limits": [{"key": "sender", "limit": 5}], "ipv6_prefix": 129},
     "filters.ratelimit.ipv6_prefix"),
])
def test_config_errors_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}:"):
        make(options)


# --- across workers ----------------------------------------------------------------------

def _workers(tmp_path, n: int, options: dict, clock: Clock) -> list[RateLimitFilter]:
    return [RateLimitFilter(options, FilterEnv("mx.test", Resolver(), worker=w, workers=n,
                                               shared_dir=str(tmp_path)), clock=clock)
            for w in range(n)]


LIMIT3 = {"limits": [{"key": "client_ip", "limit": 3, "window": "60s"}]}


def test_a_limit_holds_for_all_workers_together(tmp_path) -> None:
    clock = Clock()
    a, b, c = _workers(tmp_path, 3, LIMIT3, clock)
    assert mail(a, ctx()) == Action.CONTINUE
    assert mail(b, ctx()) == Action.CONTINUE
    assert mail(c, ctx()) == Action.CONTINUE
    for f in (a, b, c):
        assert mail(f, ctx()) == Action.TEMPFAIL        # three for the box, not each
    assert mail(b, ctx("192.0.2.2")) == Action.CONTINUE  # another client is not held
    # The window slides for every worker's share alike.
    clock.now += 60 + 30                # half of the previous window still counts: 1.5
    assert mail(a, ctx()) == Action.CONTINUE
    assert mail(b, ctx()) == Action.TEMPFAIL            # 2.5 counted, + 1 > 3
    clock.now += 60 * 5                 # long after: all counts are stale
    assert [mail(f, ctx()) for f in (c, a, b)] == [Action.CONTINUE] * 3


def test_a_reloaded_filter_keeps_the_other_workers_counts(tmp_path) -> None:
    clock = Clock()
    a, b = _workers(tmp_path, 2, LIMIT3, clock)
    for _ in range(3):
        assert mail(a, ctx()) == Action.CONTINUE
    b2 = _workers(tmp_path, 2, LIMIT3, clock)[1]        # worker 1's filter after a reload
    assert mail(b2, ctx()) == Action.TEMPFAIL


def test_counts_from_before_a_reboot_are_dropped(tmp_path) -> None:
    clock = Clock()
    a, _ = _workers(tmp_path, 2, LIMIT3, clock)
    for _ in range(3):
        assert mail(a, ctx()) == Action.CONTINUE
    clock.now = 120.0                   # the monotonic clock started again
    a2, b2 = _workers(tmp_path, 2, LIMIT3, clock)
    assert mail(b2, ctx()) == Action.CONTINUE


def test_the_sketch_only_overcounts_and_rarely(tmp_path) -> None:
    """Thousands of other keys on one worker do not hold back a new key on another."""
    clock = Clock()
    opts = {"limits": [{"key": "sender", "limit": 2, "window": "60s"}]}
    a, b = _workers(tmp_path, 2, opts, clock)
    for i in range(5000):
        assert mail(a, ctx(mail_from=f"s{i}@example.org")) == Action.CONTINUE
    held = sum(mail(b, ctx(mail_from=f"new{i}@example.org")) != Action.CONTINUE
               for i in range(500))
    assert held == 0
    assert mail(b, ctx(mail_from="s7@example.org")) == Action.CONTINUE   # 1 + 1 = 2
    assert mail(b, ctx(mail_from="s7@example.org")) == Action.TEMPFAIL
