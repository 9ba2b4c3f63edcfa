"""Builds grafana/relay-dashboard.json: the relay's Grafana 10+ dashboard, from our metrics.

Takes nothing but this file; writes the JSON that operators import (Dashboards ->
Import, pick a Prometheus data source for ${DS_PROMETHEUS}). The panels follow the ones
operators know from the Postfix dashboard on grafana.com (id 10013: throughput, rejects,
queue size and age, delivery delay, TLS, SASL failures, connections), mapped to the
names in relay/metrics.py, plus what a gateway adds (filters, quarantine, spool).

Run `python grafana/dashboard.py` after changing a panel and commit both files;
tests/test_grafana.py fails when the JSON is stale or a panel queries a metric the
relay does not export.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("relay-dashboard.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Every selector carries these, so one dashboard serves several relays or clusters.
SEL = 'job=~"$job", instance=~"$instance"'
RI = "$__rate_interval"


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping into rows."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = self.row_h = 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def targets(*exprs: tuple[str, str]) -> list[dict]:
    return [{"datasource": DS, "expr": e, "legendFormat": legend, "refId": chr(ord("A") + i),
             "range": True, "instant": False}
            for i, (e, legend) in enumerate(exprs)]


def timeseries(title: str, desc: str, unit: str, *exprs: tuple[str, str],
               stack: bool = False, percent: bool = False) -> dict:
    custom: dict = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
                    "showPoints": "never", "spanNulls": False,
                    "stacking": {"mode": "percent" if percent else
                                 ("normal" if stack else "none"), "group": "A"}}
    return {"type": "timeseries", "title": title, "description": desc, "datasource": DS,
            "targets": targets(*exprs),
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom, "min": 0},
                            "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["mean", "max", "lastNotNull"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, desc: str, unit: str, expr: str,
         thresholds: list[tuple[float | None, str]] | None = None) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": desc, "datasource": DS,
            "targets": [{"datasource": DS, "expr": expr, "refId": "A", "instant": True,
                         "range": False, "legendFormat": ""}],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute",
                                                                       "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto"}}


def rate(metric: str, by: str = "", extra: str = "") -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    inner = f"rate({metric}{{{sel}}}[{RI}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    keep = f"le, {by}" if by else "le"
    out = []
    for q in ("0.5", "0.9", "0.99"):
        expr = (f"histogram_quantile({q}, sum by ({keep}) "
                f"(rate({metric}_bucket{{{SEL}}}[{RI}])))")
        legend = f"p{int(float(q) * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append((expr, legend))
    return out


def build() -> dict:
    L = Layout()

    L.row("Overview")
    L.add(stat("Relays up", "Scrape targets answering /metrics (Prometheus' own `up`).",
               "none", f"sum(up{{{SEL}}})", [(None, "red"), (1, "green")]), 4, 4)
    L.add(stat("Received / s", "Messages accepted (250 after DATA).", "reqps",
               rate("relay_messages_received_total")), 4, 4)
    L.add(stat("Relayed / s", "Messages whose every recipient a next hop accepted.", "reqps",
               rate("relay_messages_relayed_total")), 4, 4)
    L.add(stat("Queued", "Messages in all queues.", "none",
               f"sum(relay_queue_messages{{{SEL}}})",
               [(None, "green"), (1000, "orange"), (10000, "red")]), 4, 4)
    L.add(stat("Oldest queued", "Age of the oldest queued message.", "s",
               f"max(relay_queue_oldest_message_age_seconds{{{SEL}}})",
               [(None, "green"), (3600, "orange"), (14400, "red")]), 4, 4)
    L.add(stat("Quarantined", "Messages held in quarantine.", "none",
               f"max(relay_quarantine_messages{{{SEL}}})"), 2, 4)
    L.add(stat("Draining", "Relays draining (not taking mail).", "none",
               f"sum(relay_draining{{{SEL}}})", [(None, "green"), (1, "orange")]), 2, 4)

    L.row("Throughput")
    L.add(timeseries(
        "Message throughput", "Postfix: received (cleanup), sent, bounced, deferred, rejected.",
        "reqps",
        (rate("relay_messages_received_total"), "received"),
        (rate("relay_messages_relayed_total"), "relayed"),
        (rate("relay_messages_bounced_total"), "bounced (rcpt)"),
        (rate("relay_messages_deferred_total"), "deferred (rcpt)"),
        (rate("relay_messages_rejected_total"), "rejected"),
        (rate("relay_messages_quarantined_total"), "quarantined"),
        (rate("relay_messages_discarded_total"), "discarded")), 16, 8)
    L.add(timeseries("Received bytes", "Message bytes accepted.", "Bps",
                     (rate("relay_received_bytes_total"), "received")), 8, 8)

    L.row("Rejections")
    L.add(timeseries("Rejections by reason", "Postfix: NOQUEUE rejects, by our reason label.",
                     "reqps", (rate("relay_messages_rejected_total", "reason"), "{{reason}}"),
                     stack=True), 8, 8)
    L.add(timeseries("Filter verdicts (other than continue)", "Which filter said what.",
                     "reqps", (rate("relay_filter_verdicts_total", "filter, verdict",
                                    'verdict!="continue"'), "{{filter}} {{verdict}}"),
                     stack=True), 8, 8)
    L.add(timeseries("SMTP replies by class", "Replies sent to clients, by stage and class.",
                     "reqps", (rate("relay_smtp_replies_total", "stage, class",
                                    'class!="2xx"'), "{{stage}} {{class}}")), 8, 8)

    L.row("Queue")
    L.add(timeseries("Queue depth", "Postfix: showq message count, by queue.", "none",
                     (f"sum by (queue) (relay_queue_messages{{{SEL}}})", "{{queue}}")), 8, 8)
    L.add(timeseries("Oldest message age", "Postfix: showq message age, by queue.", "s",
                     (f"max by (queue) (relay_queue_oldest_message_age_seconds{{{SEL}}})",
                      "{{queue}}")), 8, 8)
    L.add(timeseries("Queue size", "Postfix: showq message size.", "bytes",
                     (f"sum(relay_queue_bytes{{{SEL}}})", "bytes")), 8, 8)
    L.add(timeseries("Spool commit latency", "Write to durable (group commit), and fsyncs/s.",
                     "s", *quantiles("relay_spool_commit_duration_seconds")), 8, 8)
    L.add(timeseries("Spool commits", "fdatasync calls per second.", "ops",
                     (rate("relay_spool_commits_total"), "commits")), 8, 8)
    L.add(timeseries("Spool errors", "Local storage failures and corrupt records.", "ops",
                     (rate("relay_spool_errors_total", "op"), "{{op}}"),
                     (rate("relay_spool_corrupt_records_total"), "corrupt")), 8, 8)

    L.row("Delivery")
    L.add(timeseries("Delivery latency", "Receipt (250) to the next hop's 2xx. Postfix: "
                     "delivery delay.", "s", *quantiles("relay_delivery_latency_seconds")),
          8, 8)
    L.add(timeseries("Delivery attempts", "Per-recipient results, by result.", "reqps",
                     (rate("relay_delivery_attempts_total", "result"), "{{result}}"),
                     stack=True), 8, 8)
    L.add(timeseries("Attempts by destination class", "Per-recipient results by destination.",
                     "reqps", (rate("relay_delivery_attempts_total", "destination, result"),
                               "{{destination}} {{result}}")), 8, 8)
    L.add(timeseries("Deferrals by reason", "Postfix: status=deferred.", "reqps",
                     (rate("relay_messages_deferred_total", "reason"), "{{reason}}"),
                     stack=True), 8, 8)
    L.add(timeseries("Bounces by reason", "Postfix: status=bounced.", "reqps",
                     (rate("relay_messages_bounced_total", "reason"), "{{reason}}"),
                     stack=True), 8, 8)
    L.add(timeseries("Outbound connections and DSNs", "Open SMTP client connections; DSNs/s.",
                     "none", (f"sum(relay_delivery_connections{{{SEL}}})", "connections"),
                     (rate("relay_dsn_generated_total", "action"), "DSN {{action}} /s")), 8, 8)

    L.row("TLS")
    L.add(timeseries(
        "Inbound TLS share",
        "Share of accepted SMTP connections that used TLS. Postfix: smtpd TLS.",
        "percentunit",
        (rate("relay_tls_inbound_total") + " / "
         + rate("relay_smtp_connections_total", extra='result="accepted"'),
         "TLS share")), 8, 8)
    L.add(timeseries("Inbound TLS versions", "Inbound TLS sessions by protocol version.",
                     "reqps", (rate("relay_tls_inbound_total", "version"), "{{version}}"),
                     stack=True, percent=True), 8, 8)
    L.add(timeseries("Outbound TLS", "Outbound SMTP sessions by TLS outcome (share).",
                     "reqps", (rate("relay_tls_outbound_total", "result"), "{{result}}"),
                     stack=True, percent=True), 8, 8)

    L.row("Quarantine")
    L.add(timeseries("Quarantine size", "Messages held in quarantine.", "none",
                     (f"max(relay_quarantine_messages{{{SEL}}})", "held")), 8, 8)
    L.add(timeseries("Quarantine in and out", "Put in (by filter), released, deleted, expired.",
                     "ops",
                     (rate("relay_messages_quarantined_total", "filter"), "in: {{filter}}"),
                     (rate("relay_quarantine_released_total", "via"), "released via {{via}}"),
                     (rate("relay_quarantine_deleted_total", "via"), "deleted via {{via}}"),
                     (rate("relay_quarantine_expired_total"), "expired")), 8, 8)
    L.add(timeseries("Mailbox logins", "IMAP/POP3 logins by protocol and result.", "ops",
                     (rate("relay_mailbox_logins_total", "protocol, result"),
                      "{{protocol}} {{result}}")), 8, 8)

    L.row("Connections and authentication")
    L.add(timeseries("SMTP connections", "Postfix: smtpd connects, by listener and result.",
                     "ops", (rate("relay_smtp_connections_total", "listener, result"),
                             "{{listener}} {{result}}")), 8, 8)
    L.add(timeseries("Open SMTP sessions", "Sessions open now, by listener.", "none",
                     (f"sum by (listener) (relay_smtp_sessions{{{SEL}}})", "{{listener}}")),
          8, 8)
    L.add(timeseries("AUTH failures", "Postfix: SASL authentication failures.", "ops",
                     (rate("relay_auth_attempts_total", "mechanism",
                           'result!="success"'), "{{mechanism}}")), 8, 8)

    L.row("Filters")
    L.add(timeseries("Filter latency p99", "Time spent in each filter (99th percentile).", "s",
                     (f"histogram_quantile(0.99, sum by (le, filter) "
                      f"(rate(relay_filter_duration_seconds_bucket{{{SEL}}}[{RI}])))",
                      "{{filter}}")), 8, 8)
    L.add(timeseries("Filter latency p50", "Time spent in each filter (median).", "s",
                     (f"histogram_quantile(0.5, sum by (le, filter) "
                      f"(rate(relay_filter_duration_seconds_bucket{{{SEL}}}[{RI}])))",
                      "{{filter}}")), 8, 8)
    L.add(timeseries("Filter errors", "Filters that raised or timed out.", "ops",
                     (rate("relay_filter_errors_total", "filter, kind"),
                      "{{filter}} {{kind}}")), 8, 8)

    L.row("Process")
    L.add(timeseries("Config reloads", "Reloads by result (a refused config keeps the old).",
                     "ops", (rate("relay_config_reloads_total", "result"), "{{result}}")),
          8, 8)
    L.add(timeseries("Resident memory", "Per process (single-process mode only).", "bytes",
                     (f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")), 8, 8)
    L.add(timeseries("CPU", "Per process (single-process mode only).", "percentunit",
                     (f"rate(process_cpu_seconds_total{{{SEL}}}[{RI}])", "{{instance}}")),
          8, 8)

    variables = [
        {"name": "job", "label": "Job", "type": "query", "datasource": DS,
         "query": {"query": "label_values(relay_smtp_connections_total, job)",
                   "refId": "job"},
         "definition": "label_values(relay_smtp_connections_total, job)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(relay_smtp_connections_total{job=~"$job"}, instance)',
                   "refId": "instance"},
         "definition": 'label_values(relay_smtp_connections_total{job=~"$job"}, instance)',
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}},
    ]

    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus",
                      "description": "Prometheus that scrapes the relay's /metrics",
                      "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""}],
        "title": "SMTP relay",
        "uid": "smtp-relay",
        "description": "Throughput, rejections, queue, delivery, TLS, quarantine and filters "
                       "of the SMTP relay (metrics: relay_*).",
        "tags": ["smtp", "mail", "relay"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 38,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana",
                                                               "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, "
                                  "255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [],
        "templating": {"list": variables},
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUT}\n")
