"""Hot reload, end to end: SIGHUP and a Kubernetes-style ConfigMap swap (the mounted
file is a symlink through `..data`, replaced atomically). A broken config is refused,
logged and counted (relay_config_reloads_total{result="error"}) and the old one keeps
working; a good one is applied (a filter added takes effect)."""

from __future__ import annotations

import json
import os
import signal

import yaml
from _ops import OpsRelay, message, scrape, send, value

from tests._relay import free_port, wait_for

ROUTING = {"name": "routing", "options": {"rules": [
    {"name": "review", "recipient": ["q@dst.test"], "quarantine": "quarantine",
     "reason": "review"}]}}




def reloads(r: OpsRelay, result: str) -> float:
    return value(scrape(r.http_port), "relay_config_reloads_total", result=result)


def quarantined(r: OpsRelay) -> int:
    # The relay's own file may be broken on purpose: the CLI reads a copy of the first.
    copy = r.dir / "cli.yaml"
    if not copy.exists():
        copy.write_text(yaml.safe_dump(r.config))
    p = r.cli("quarantine", "list", "--json", config=copy)
    assert p.returncode == 0, p.stderr
    return len(json.loads(p.stdout))


def base() -> dict:
    return {"delivery": {"enabled": False}, "filters": [{"name": "size"}]}


def with_routing(r: OpsRelay) -> str:
    return yaml.safe_dump({**r.config, "filters": [{"name": "size"}, ROUTING]})


def test_sighup_refuses_a_broken_config_and_applies_a_good_one(tmp_path):
    with OpsRelay(tmp_path, base()) as r:
        send(r.smtp_port, "s@src.test", ["q@dst.test"], message("before"))
        assert quarantined(r) == 0
        errors, ok = reloads(r, "error"), reloads(r, "success")

        broken = {
            "yaml": "filters: [ {name: size\n",
            "value": yaml.safe_dump({**r.config, "smtp": {"max_recipients": "lots"}}),
            "filter": yaml.safe_dump({**r.config, "filters": [{"name": "no-such-filter"}]}),
            "options": yaml.safe_dump({**r.config, "filters": [
                {"name": "routing", "options": {"rules": [{"recipient": ["x.test"]}]}}]}),
        }
        for n, text in enumerate(broken.values(), 1):
            r.config_path.write_text(text)
            r.proc.send_signal(signal.SIGHUP)
            wait_for(lambda n=n: reloads(r, "error") == errors + n, what=f"refusal {n}")
            # The old config still works: no routing filter, so this is queued.
            send(r.smtp_port, "s@src.test", ["q@dst.test"], message(f"still old {n}"))
            assert quarantined(r) == 0
        assert r.log().count("reload refused, keeping the running config") == len(broken)
        assert reloads(r, "success") == ok

        r.config_path.write_text(with_routing(r))
        r.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(r, "success") == ok + 1, what="reload")
        send(r.smtp_port, "s@src.test", ["q@dst.test"], message("after"))
        assert quarantined(r) == 1
        assert reloads(r, "error") == errors + len(broken)
        assert r.stop() == 0
        # Everything that arrived before the good reload is queued, none was lost.
        assert len(r.queued()) == 1 + len(broken)


def test_configmap_symlink_swap_is_reloaded(tmp_path):
    r = OpsRelay(tmp_path, base(), start=False)
    # The kubelet's layout: relay.yaml -> ..data/relay.yaml, ..data -> ..<timestamp>/.
    mount = tmp_path / "config"
    first = mount / "..2024_01_01_00_00_00.1"
    first.mkdir(parents=True)
    (first / "relay.yaml").write_text(r.config_path.read_text())
    os.symlink(first.name, mount / "..data")
    os.symlink("..data/relay.yaml", mount / "relay.yaml")
    r.config_path.unlink()
    os.symlink(mount / "relay.yaml", r.config_path)
    r.start()
    try:
        ok, errors = reloads(r, "success"), reloads(r, "error")

        def swap(name: str, text: str) -> None:
            new = mount / name
            new.mkdir()
            (new / "relay.yaml").write_text(text)
            os.symlink(new.name, mount / "..data_tmp")
            os.replace(mount / "..data_tmp", mount / "..data")

        swap("..2024_01_01_00_00_00.2", "filters: [ {name: size\n")
        wait_for(lambda: reloads(r, "error") == errors + 1, what="refused swap")
        send(r.smtp_port, "s@src.test", ["q@dst.test"], message("old"))
        assert quarantined(r) == 0

        swap("..2024_01_01_00_00_00.3", with_routing(r))
        wait_for(lambda: reloads(r, "success") == ok + 1, what="applied swap")
        send(r.smtp_port, "s@src.test", ["q@dst.test"], message("new"))
        assert quarantined(r) == 1
        assert r.stop() == 0
    finally:
        r.kill()


def test_listener_change_does_not_half_apply(tmp_path):
    """What cannot change live (listeners) does not half-apply: the old port keeps
    serving after a reload."""
    with OpsRelay(tmp_path, base()) as r:
        cfg = dict(r.config)
        cfg["listeners"] = [{"name": "mta", "address": f"127.0.0.1:{free_port()}"}]
        r.config_path.write_text(yaml.safe_dump(cfg))
        before = reloads(r, "success") + reloads(r, "error")
        r.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(r, "success") + reloads(r, "error") == before + 1,
                 what="reload")
        send(r.smtp_port, "s@src.test", ["a@dst.test"], message("same port"))
        assert r.stop() == 0


def test_connection_limits_are_reloaded(tmp_path):
    """README: a reload applies limits. A lower max_connections_per_ip refuses the
    connection that the old one let in."""
    import socket
    with OpsRelay(tmp_path, base()) as r:
        held = [socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10)
                for _ in range(2)]
        for s in held:
            assert s.recv(512).startswith(b"220")
        r.config_path.write_text(yaml.safe_dump({**r.config,
                                                 "smtp": {"max_connections_per_ip": 2}}))
        ok = reloads(r, "success")
        r.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(r, "success") == ok + 1, what="reload")
        with socket.create_connection(("127.0.0.1", r.smtp_port), timeout=10) as s:
            assert s.recv(512).startswith(b"421 4.7.0")
        for s in held:
            s.close()
        assert r.stop() == 0
