"""`relay queue drain --to HOST:PORT` and the CLI's enqueue, end to end: the real relay
as a process, aiosmtpd (or a second relay) as the peer that takes the queue, the CLI
as the operator runs it."""

from __future__ import annotations

import json
import re
import socket

import pytest
from _delivery import Sink
from _ops import OpsRelay, Peers, get, message, send

from tests._relay import free_port, strip_trace, wait_for


def config(nexthop_port: int, **extra) -> dict:
    """Mail for dst.test goes to [127.0.0.1]:nexthop_port (nothing listening there =
    every attempt defers, and the next one is an hour away)."""
    cfg = {"delivery": {"transport": [{"domain": "dst.test",
                                       "nexthop": f"[127.0.0.1]:{nexthop_port}"}],
                        "retry_schedule": ["1h"], "retry_jitter": 0, "mta_sts": False,
                        "connect_timeout": 3, "tls_policy": "none"}}
    cfg.update(extra)
    return cfg


def fill(r: OpsRelay) -> dict[str, tuple[str, list[str], bytes]]:
    """Three messages (one with two recipients): {qid: (sender, rcpts, body)}."""
    out = {}
    for i, rcpts in enumerate((["b@dst.test"], ["c@dst.test", "d@dst.test"], ["e@dst.test"])):
        body = message(f"drain {i}", size=100 * i)
        out[send(r.smtp_port, f"s{i}@src.test", rcpts, body)] = (f"s{i}@src.test", rcpts, body)
    return out


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False




def test_drain_with_relay_stopped_hands_over_everything_but_held_mail(tmp_path):
    with OpsRelay(tmp_path, config(free_port())) as r, Peers() as peers:
        sent = fill(r)
        held = send(r.smtp_port, "h@src.test", ["h@dst.test"], message("held"))
        assert r.stop() == 0
        assert r.cli("queue", "hold", held).returncode == 0
        queued = r.queued()
        assert set(queued) == set(sent) | {held}

        sink = Sink()
        port = peers.add(sink)
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{port}")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"drained 3 messages to 127.0.0.1:{port}"
        # Each message once, with its envelope and the exact bytes we had queued.
        assert len(sink.messages) == 3
        got = {m.sender: m for m in sink.messages}
        for qid, (sender, rcpts, body) in sent.items():
            m = got[sender]
            assert m.rcpts == rcpts
            assert m.content == queued[qid][1]
            assert strip_trace(m.content) == body
        # Only the held message stays; the operator kept it.
        left = r.queued()
        assert list(left) == [held] and left[held][0].held
        assert f"{held}: on hold, not drained" in p.stderr


def test_drain_with_relay_running_goes_through_the_worker(tmp_path):
    with OpsRelay(tmp_path, config(free_port())) as r, Peers() as peers:
        sent = fill(r)
        assert get(r.http_port, "/readyz")[0] == 200
        sink = Sink()
        port = peers.add(sink)
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{port}")
        assert p.returncode == 0, p.stderr + r.log()
        assert p.stdout.strip() == f"drained 3 messages to 127.0.0.1:{port}"
        assert sorted(m.sender for m in sink.messages) == sorted(s for s, _, _ in sent.values())
        # The worker did it (it owns the spool writer), and took no more mail first:
        # not ready, the SMTP port closed, still running until told to stop.
        assert "drained to 127.0.0.1:" in r.log()
        status, body = get(r.http_port, "/readyz")
        assert status == 503 and "not accepting" in body
        assert refused(r.smtp_port)
        assert r.running()
        assert r.stop() == 0
        assert r.queued() == {}


def test_peer_that_defers_keeps_the_message(tmp_path):
    with OpsRelay(tmp_path, config(free_port())) as r, Peers() as peers:
        both = send(r.smtp_port, "s@src.test", ["b@dst.test", "c@dst.test"], message("two"))
        one = send(r.smtp_port, "s@src.test", ["c@dst.test"], message("one"))
        assert r.stop() == 0

        # Nobody listens: the drain fails and keeps everything.
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{free_port()}")
        assert p.returncode == 1
        assert "drained 0 messages" in p.stderr and "2 stay queued" in p.stderr
        assert set(r.queued()) == {both, one}

        # The peer takes c@ but says 451 for b@.
        sink = Sink(rcpt_replies={"b@dst.test": "451 4.3.0 try again later"})
        port = peers.add(sink)
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{port}")
        assert p.returncode == 1
        assert "drained 1 messages" in p.stderr and "1 stay queued" in p.stderr
        assert "451" in p.stderr
        left = r.queued()
        assert list(left) == [both]
        state = {x.address: x for x in left[both][0].recipients}
        assert state["c@dst.test"].state.value == "done"
        assert state["b@dst.test"].state.value == "pending"
        assert "451 4.3.0" in state["b@dst.test"].last_error
        assert sorted(m.rcpts for m in sink.messages) == [["c@dst.test"], ["c@dst.test"]]

        # The next drain sends only b@: the peer already has c@.
        good = Sink()
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{peers.add(good)}")
        assert p.returncode == 0, p.stderr
        assert [m.rcpts for m in good.messages] == [["b@dst.test"]]
        assert r.queued() == {}


def test_drain_to_another_relay_passes_dsn_parameters_on(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with OpsRelay(tmp_path / "a", config(free_port())) as a, \
            OpsRelay(tmp_path / "b", {"delivery": {"enabled": False}}) as b:
        qid = send(a.smtp_port, "s@src.test", ["b@dst.test", "c@dst.test"], message("dsn"),
                   mail_options=("RET=HDRS", "ENVID=env+2Did"),
                   rcpt_options=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@dst.test"))
        assert a.stop() == 0
        before = a.queued()[qid]
        p = a.cli("queue", "drain", "--to", f"127.0.0.1:{b.smtp_port}")
        assert p.returncode == 0, p.stderr
        assert b.stop() == 0
        [(env, data)] = b.queued().values()
        assert (env.sender, env.ret, env.envid) == ("s@src.test", "HDRS", "env+2Did")
        assert [(x.address, x.notify, x.orcpt) for x in env.recipients] == [
            ("b@dst.test", "SUCCESS,FAILURE", "rfc822;orig@dst.test"),
            ("c@dst.test", "SUCCESS,FAILURE", "rfc822;orig@dst.test")]
        assert strip_trace(data) == strip_trace(before[1])
        assert a.queued() == {}


def test_drain_needs_a_target(tmp_path):
    r = OpsRelay(tmp_path, config(free_port()), start=False)
    p = r.cli("queue", "drain")
    assert p.returncode == 2 and "--to HOST:PORT is required" in p.stderr
    p = r.cli("queue", "drain", "--to", "nowhere")
    assert p.returncode == 2 and "--to" in p.stderr


# --- enqueue from the CLI (quarantine release) ---------------------------------------

QUARANTINE = {"name": "routing", "options": {"rules": [
    {"name": "hold-q", "recipient": ["q@dst.test"], "quarantine": "quarantine",
     "reason": "test rule"}]}}


def quarantined(r: OpsRelay) -> list[str]:
    p = r.cli("quarantine", "list", "--json")
    assert p.returncode == 0, p.stderr
    return [m["qid"] for m in json.loads(p.stdout)]


@pytest.mark.parametrize("running", [True, False], ids=["relay-running", "relay-stopped"])
def test_quarantine_release_from_the_cli_enqueues(tmp_path, running):
    with Peers() as peers:
        sink = Sink()
        port = peers.add(sink)
        with OpsRelay(tmp_path, config(port, filters=[{"name": "size"}, QUARANTINE])) as r:
            body = message("held for review")
            send(r.smtp_port, "s@src.test", ["q@dst.test"], body)
            [qq] = quarantined(r)
            assert sink.messages == []
            if not running:
                assert r.stop() == 0
            p = r.cli("quarantine", "release", qq)
            assert p.returncode == 0, p.stderr + r.log()
            assert quarantined(r) == []
            if not running:
                # Straight into the spool; the relay delivers it when it starts.
                [(env, data)] = r.queued().values()
                assert env.skip_filter == "routing"
                assert strip_trace(data) == body
                r.start()
            # Delivered, not quarantined again (release skips the filter that held it).
            wait_for(lambda: len(sink.messages) == 1, what="delivery of the release")
            assert sink.messages[0].rcpts == ["q@dst.test"]
            assert strip_trace(sink.messages[0].content) == body
            assert r.stop() == 0
            assert r.queued() == {}


def test_drain_with_two_workers_empties_both_writers(tmp_path):
    with OpsRelay(tmp_path, config(free_port(), workers=2)) as r, Peers() as peers:
        qids = {send(r.smtp_port, "s@src.test", ["b@dst.test"], message(f"w {i}"))
                for i in range(16)}
        sink = Sink()
        port = peers.add(sink)
        p = r.cli("queue", "drain", "--to", f"127.0.0.1:{port}")
        assert p.returncode == 0, p.stderr + r.log()
        assert p.stdout.strip() == f"drained 16 messages to 127.0.0.1:{port}"
        assert len(sink.messages) == 16
        assert r.stop() == 0
        # Each worker handed over its own writer's mail (the kernel spread the 16
        # connections over both; all on one has odds of 2**-15).
        pids = set(re.findall(r"relay\.queue\[(\d+)\]: INFO \w+: drained to", r.log()))
        assert len(pids) == 2, r.log()
        assert r.queued() == {} and len(qids) == 16


def test_queue_ops_still_reach_a_running_relay(tmp_path):
    """The control request grew fields (expiry, drain and enqueue ops): the plain ops
    still go through the running worker."""
    with OpsRelay(tmp_path, config(free_port())) as r:
        qid = send(r.smtp_port, "s@src.test", ["b@dst.test"], message("op"))
        p = r.cli("queue", "hold", qid)
        assert (p.returncode, p.stdout.strip()) == (0, f"hold: 1 message(s): {qid}"), p.stderr
        p = r.cli("queue", "list", "--json")
        assert [(m["queue_id"], m["queue"]) for m in json.loads(p.stdout)] == [(qid, "hold")]
        p = r.cli("queue", "delete", qid)
        assert p.returncode == 0, p.stderr
        assert r.stop() == 0
        assert r.queued() == {}
