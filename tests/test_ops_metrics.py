"""/metrics after real traffic: the relay as a process, aiosmtpd next hops that take,
defer and refuse mail, a routing rule that quarantines, a recipient the relay refuses.
Each counter must move by exactly what happened (issue 6, "done when"), and no label
value may carry an address, a queue id or a client address."""

from __future__ import annotations

import re
import smtplib

import pytest
from _delivery import Sink
from _ops import OpsRelay, Peers, message, scrape, send, total, value

from tests._relay import wait_for


def delta(before, after, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """Start the relay, send one of each kind, wait until delivery settled; hands the
    tests the scrapes before and after and what was sent."""
    tmp = tmp_path_factory.mktemp("metrics")
    with Peers() as peers:
        ok, defer, bounce = Sink(), Sink(), Sink()
        defer.rcpt_replies["d@defer.test"] = "451 4.2.0 mailbox busy, try later"
        bounce.rcpt_replies["x@bounce.test"] = "550 5.1.1 no such user"
        ports = {name: peers.add(s) for name, s in
                 (("ok", ok), ("defer", defer), ("bounce", bounce))}
        cfg = {
            # Loopback is not trusted here, so a recipient outside our domains is refused.
            "access": {"mynetworks": ["10.255.0.0/16"],
                       "relay_domains": ["ok.test", "defer.test", "bounce.test"]},
            "delivery": {"transport": [{"domain": f"{n}.test", "nexthop": f"[127.0.0.1]:{p}"}
                                       for n, p in ports.items()],
                         "retry_schedule": ["1h"], "retry_jitter": 0, "mta_sts": False,
                         "tls_policy": "none", "connect_timeout": 5},
            "filters": [{"name": "size"},
                        {"name": "routing", "options": {"rules": [
                            {"name": "review", "recipient": ["q@ok.test"],
                             "quarantine": "quarantine", "reason": "review"}]}}],
        }
        with OpsRelay(tmp, cfg) as r:
            before = scrape(r.http_port)
            qids = [send(r.smtp_port, "s@ok.test", ["a@ok.test"], message("relayed 1")),
                    send(r.smtp_port, "s@ok.test", ["a@ok.test"], message("relayed 2")),
                    send(r.smtp_port, "s@ok.test", ["d@defer.test"], message("deferred")),
                    send(r.smtp_port, "s@ok.test", ["x@bounce.test"], message("bounced")),
                    send(r.smtp_port, "s@ok.test", ["q@ok.test"], message("quarantined"))]
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                send(r.smtp_port, "s@ok.test", ["r@other.test"], message("refused"))
            # Two relayed, and the DSN for the bounce goes to s@ok.test.
            wait_for(lambda: len(ok.messages) == 3, what="deliveries")
            wait_for(lambda: "d@defer.test" in defer.rcpt_seen
                     and "x@bounce.test" in bounce.rcpt_seen, what="attempts")

            def settled() -> bool:
                s = scrape(r.http_port)
                return (total(s, "relay_messages_deferred_total") > 0
                        and total(s, "relay_messages_relayed_total") >= 3
                        and value(s, "relay_queue_messages", queue="deferred") == 1)
            wait_for(settled, what="delivery results in /metrics")
            after = scrape(r.http_port)
            yield before, after, qids, ok
            assert r.stop() == 0


def test_inbound_counters_moved_by_exactly_what_happened(traffic):
    before, after, _, _ = traffic
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    assert d("relay_smtp_connections_total", listener="mta", result="accepted") == 6
    # Per session: 220, EHLO 250, MAIL 250, RCPT 250, 354, 250 after DATA, QUIT 221; the
    # refused one: 220, 250, 250, RCPT 554, 221.
    replies = {c: sum(v - value(before, n, **dict(lb)) for (n, lb), v in after.items()
                      if n == "relay_smtp_replies_total" and dict(lb)["class"] == c)
               for c in ("2xx", "3xx", "4xx", "5xx")}
    assert replies == {"2xx": 5 * 6 + 4, "3xx": 5, "4xx": 0, "5xx": 1}
    assert d("relay_smtp_replies_total", stage="rcpt", **{"class": "5xx"}) == 1
    assert d("relay_messages_rejected_total", reason="relay_denied") == 1
    assert total(after, "relay_messages_rejected_total") - \
        total(before, "relay_messages_rejected_total") == 1
    assert d("relay_messages_quarantined_total", filter="routing") == 1
    assert d("relay_filter_verdicts_total", filter="routing", verdict="quarantine") == 1


def test_received_counts_every_250_after_data(traffic):
    before, after, _, _ = traffic
    assert delta(before, after, "relay_messages_received_total", listener="mta") == 5


def test_delivery_counters_moved_by_exactly_what_happened(traffic):
    before, after, _, ok = traffic
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    # Two messages and the DSN about the bounce.
    assert d("relay_messages_relayed_total") == 3
    assert d("relay_delivery_attempts_total", result="sent", destination="transport") == 3
    assert d("relay_delivery_attempts_total", result="deferred", destination="transport") == 1
    assert d("relay_delivery_attempts_total", result="bounced", destination="transport") == 1
    assert d("relay_messages_deferred_total", reason="tempfail") == 1
    assert total(after, "relay_messages_deferred_total") - \
        total(before, "relay_messages_deferred_total") == 1
    assert d("relay_messages_bounced_total", reason="permanent") == 1
    assert total(after, "relay_messages_bounced_total") - \
        total(before, "relay_messages_bounced_total") == 1
    assert d("relay_dsn_generated_total", action="failed") == 1
    assert d("relay_delivery_latency_seconds_count") == 3
    # What is left: the deferred message waits for its next attempt.
    assert value(after, "relay_queue_messages", queue="deferred") == 1
    assert value(after, "relay_queue_messages", queue="active") == 0
    assert [m.rcpts for m in ok.messages].count(["s@ok.test"]) == 1   # the DSN


def test_label_values_are_bounded(traffic):
    _, after, qids, _ = traffic
    values = {v for (n, labels) in after if n.startswith("relay_") for _, v in labels}
    assert values, "no labelled relay_ samples"
    for v in values:
        assert "@" not in v, v
        assert "127.0.0.1" not in v, v
        assert not any(q in v for q in qids), v
        # Short machine words (stage, class, listener, filter, reason, le), nothing else.
        assert re.fullmatch(r"[A-Za-z0-9_.+\-:]{1,40}", v), v
