"""Test helpers: which metrics the relay exports, and which ones a PromQL expression uses.

Shared by test_grafana.py and test_alerts.py, so a dashboard panel or an alert rule that
queries a metric (or a label) the relay does not export fails a test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

import relay.metrics as relay_metrics

# Series Prometheus makes itself for every target; not ours to export.
SYNTHETIC = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}

_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created")}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name /metrics can show -> its label names (target labels not included).

    Names come from the real exposition's `# TYPE` lines (labelled metrics that nothing
    has moved yet still have one), with the sample suffixes each type adds.
    """
    labels_of: dict[str, set[str]] = {}
    for obj in vars(relay_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for fam in obj.describe():
                labels_of[fam.name] = set(obj._labelnames)
    out: dict[str, set[str]] = {}
    for line in generate_latest(REGISTRY).decode().splitlines():
        m = re.fullmatch(r"# TYPE (\S+) (\S+)", line)
        if not m:
            continue
        name, kind = m.groups()
        base = name[:-len("_total")] if kind == "counter" and name.endswith("_total") else name
        labels = labels_of.get(base, labels_of.get(name, set()))
        for suffix in _SUFFIXES.get(kind, ("",)):
            series = (base if kind == "counter" else name) + suffix
            out[series] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    return out


@dataclass
class Usage:
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # name, matcher labels
    grouping: set[str] = field(default_factory=set)


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}
_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def usage(expr: str) -> Usage:
    """The metric selectors and grouping labels in a PromQL expression (enough of the
    grammar for dashboards and alert rules: strings, selectors, ranges, by/on clauses)."""
    u = Usage()
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        u.grouping |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    for m in re.finditer(rf"({_IDENT})?\s*\{{([^}}]*)\}}", s):
        name, body = m.group(1), m.group(2)
        labels = set(re.findall(rf"({_IDENT})\s*(?:=~|!~|!=|=)", body))
        if name and name not in _KEYWORDS:
            u.selectors.append((name, labels))
        elif "__name__" not in labels:
            raise ValueError(f"selector without a metric name in {expr!r}")
    s = re.sub(rf"({_IDENT})?\s*\{{[^}}]*\}}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    for m in re.finditer(rf"(?<![\w.$])({_IDENT})(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name in _KEYWORDS or re.fullmatch(r"\d.*", name):
            continue
        u.selectors.append((name, set()))
    return u


def problems(expr: str, exported: dict[str, set[str]], legend: str = "") -> list[str]:
    """What in `expr` (and its legend) refers to something the relay does not export."""
    out = []
    known = {**{k: set(v) for k, v in SYNTHETIC.items()}, **exported}
    u = usage(expr)
    if not u.selectors:
        out.append(f"no metric queried in {expr!r}")
    labels_here: set[str] = set(TARGET_LABELS)
    for name, labels in u.selectors:
        if name not in known:
            out.append(f"unknown metric {name!r} in {expr!r}")
            continue
        labels_here |= known[name]
        for lab in labels - known[name] - TARGET_LABELS:
            out.append(f"{name} has no label {lab!r} (in {expr!r})")
    for lab in u.grouping - labels_here:
        out.append(f"grouping by unknown label {lab!r} in {expr!r}")
    if u.grouping:
        visible = u.grouping
    elif re.match(r"\s*(sum|min|max|avg|count|stddev|stdvar|group)\s*\(", expr):
        visible = set()  # aggregated away entirely
    else:
        visible = labels_here
    for lab in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        if lab not in visible:
            out.append(f"legend uses {{{{{lab}}}}}, which {expr!r} does not keep")
    return out


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_check_exprs(exprs: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """Let promtool parse every expression (as recording rules): real PromQL syntax check."""
    import yaml
    rules = [{"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs)]
    f = tmp / "exprs.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    return subprocess.run([promtool() or "promtool", "check", "rules", str(f)],
                          capture_output=True, text=True, timeout=120)
