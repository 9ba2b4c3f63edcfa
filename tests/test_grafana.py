"""grafana/relay-dashboard.json: importable, current, and querying only what the relay exports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from _observability import (
    exported_metrics,
    problems,
    promtool,
    promtool_check_exprs,
    usage,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "relay-dashboard.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def all_queries(d: dict) -> list[tuple[str, str, str]]:
    """(panel or variable title, expr, legend) for every query in the dashboard."""
    out = [(p["title"], t["expr"], t.get("legendFormat", ""))
           for p in all_panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, q
            out.append((f"${v['name']}", m.group(1), ""))
    return out


def test_committed_json_is_what_the_generator_makes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "grafana" / "dashboard.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert DASHBOARD.read_text(encoding="utf-8") == mod.render(), \
        "run `python grafana/dashboard.py` and commit the JSON"


def test_every_panel_queries_only_exported_metrics_and_labels() -> None:
    exported = exported_metrics()
    found = []
    for title, expr, legend in all_queries(load()):
        found += [f"{title}: {p}" for p in problems(expr, exported, legend)]
    assert found == []


def test_checker_catches_unknown_metrics_and_labels() -> None:
    # The check above must be able to fail: feed it the mistakes a panel could make.
    exported = exported_metrics()
    assert problems('sum(rate(relay_no_such_metric_total{job="x"}[5m]))', exported)
    assert problems("rate(relay_messages_relayed[5m])", exported)  # missing _total
    assert problems('relay_queue_messages{queu="active"}', exported)  # label typo
    assert problems("sum by (reasn) (rate(relay_messages_rejected_total[5m]))", exported)
    assert problems("sum(rate(relay_messages_rejected_total[5m]))", exported, "{{reason}}")
    assert problems("histogram_quantile(0.9, rate(relay_delivery_latency_seconds[5m]))",
                    exported)
    assert not problems(
        "histogram_quantile(0.9, sum by (le) (rate(relay_delivery_latency_seconds_bucket[5m])))",
        exported)
    assert not problems('relay_queue_messages{queue="active", job=~"$job"} > 0', exported)


def test_usage_parser() -> None:
    u = usage('sum by (queue) (rate(a_total{x="}{", y!~"z"}[5m] offset 1h)) / on(queue) b')
    assert u.selectors == [("a_total", {"x", "y"}), ("b", set())]
    assert u.grouping == {"queue"}


def test_importable_shape() -> None:
    d = load()
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    grafana = [r for r in d["__requires"] if r["id"] == "grafana"]
    assert grafana and int(grafana[0]["version"].split(".")[0]) >= 10
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))


# What operators know from the Postfix dashboard (grafana.com 10013) and the issue asks for:
# a title word and a metric that must appear in the same panel.
EXPECTED = [
    ("throughput", "relay_messages_received_total"),
    ("throughput", "relay_messages_relayed_total"),
    ("throughput", "relay_messages_bounced_total"),
    ("throughput", "relay_messages_deferred_total"),
    ("throughput", "relay_messages_rejected_total"),
    ("rejections", "relay_messages_rejected_total"),
    ("filter verdicts", "relay_filter_verdicts_total"),
    ("queue depth", "relay_queue_messages"),
    ("oldest", "relay_queue_oldest_message_age_seconds"),
    ("delivery latency", "relay_delivery_latency_seconds_bucket"),
    ("deferrals", "relay_messages_deferred_total"),
    ("inbound tls", "relay_tls_inbound_total"),
    ("outbound tls", "relay_tls_outbound_total"),
    ("quarantine size", "relay_quarantine_messages"),
    ("quarantine in and out", "relay_quarantine_released_total"),
    ("connections", "relay_smtp_connections_total"),
    ("filter latency", "relay_filter_duration_seconds_bucket"),
    ("auth failures", "relay_auth_attempts_total"),
]


@pytest.mark.parametrize("word,metric", EXPECTED)
def test_expected_panels_exist(word: str, metric: str) -> None:
    hits = [p for p in all_panels(load()) if word in p["title"].lower()
            and any(metric in {n for n, _ in usage(t["expr"]).selectors}
                    for t in p.get("targets", []))]
    assert hits, f"no panel titled like {word!r} querying {metric}"


def test_delivery_latency_has_p50_p90_p99() -> None:
    [panel] = [p for p in all_panels(load()) if p["title"] == "Delivery latency"]
    exprs = [t["expr"] for t in panel["targets"]]
    for q in ("0.5", "0.9", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") for e in exprs), q


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    if not promtool():
        pytest.skip("promtool not installed (apt-get install prometheus)")
    exprs = []
    for _, expr, _ in all_queries(load()):
        # Grafana's variables, as Grafana would interpolate them.
        expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*")
        exprs.append(expr.replace("$instance", ".*"))
    res = promtool_check_exprs(exprs, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # and promtool does refuse a broken one, so the check above means something
    bad = promtool_check_exprs(["sum(rate(relay_messages_relayed_total[5m])"], tmp_path)
    assert bad.returncode != 0
