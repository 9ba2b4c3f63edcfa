"""deploy/prometheus/alerts.yml: promtool accepts it, its unit tests pass and bite,
and every rule queries only metrics the relay exports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _observability import exported_metrics, problems, promtool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

needs_promtool = pytest.mark.skipif(
    promtool() is None,
    reason="promtool not installed: `apt-get install -y prometheus` (Debian) gives it")


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool() or "promtool", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@needs_promtool
def test_promtool_check_rules() -> None:
    res = run("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    res = run("test", "rules", str(RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
@pytest.mark.parametrize("alert", [r["alert"] for r in rules()])
def test_unit_tests_notice_a_missing_or_blunted_alert(alert: str, tmp_path: Path) -> None:
    # The unit tests must be able to fail: drop one alert's firing condition (make its
    # expression never true) and promtool test rules must then report a failure.
    data = yaml.safe_load(RULES.read_text())
    for g in data["groups"]:
        for r in g["rules"]:
            if r["alert"] == alert:
                r["expr"] = f"({r['expr']}) and on() vector(0) > 1"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(data))
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")
    res = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert res.returncode != 0, f"no unit test notices {alert} never firing"
    assert alert in res.stdout + res.stderr


def test_rules_query_only_exported_metrics() -> None:
    exported = exported_metrics()
    found = [f"{r['alert']}: {p}" for r in rules() for p in problems(r["expr"], exported)]
    assert found == []


def test_the_issue_s_alerts_are_there_with_severity_and_summary() -> None:
    by_name = {r["alert"]: r for r in rules()}
    for name in ("RelayDown", "RelayQueueGrowing", "RelayOldestMessageTooOld",
                 "RelayDeliveriesFailing", "RelaySpoolDiskLow", "RelayNotReady"):
        assert name in by_name, name
    for r in by_name.values():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {c["alertname"] for t in tests for c in t.get("alert_rule_test", [])
              if c.get("exp_alerts")}
    assert {r["alert"] for r in rules()} <= firing
