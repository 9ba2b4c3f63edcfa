"""Every metric the relay exports, in one place (Prometheus naming: one prefix, `_total`
counters, base units, bounded labels: never an address, a message id or free text).

Parts import the objects they move from here. With several worker processes,
relay.app sets PROMETHEUS_MULTIPROC_DIR before this module is imported, so the numbers
of all workers add up on /metrics.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram


@functools.lru_cache(maxsize=1024)
def child(metric, *labels: str):
    """metric.labels(*labels), looked up once: on the per-message path .labels() cost
    more than the .inc() it served. Labels are bounded (see above), so is this."""
    return metric.labels(*labels)


# --- inbound SMTP -------------------------------------------------------------------
CONNECTIONS = Counter("relay_smtp_connections_total",
                      "SMTP connections by listener and outcome", ["listener", "result"])
SMTP_REPLIES = Counter("relay_smtp_replies_total",
                       "SMTP replies sent, by stage and class (2xx, 4xx, 5xx)",
                       ["stage", "class"])
MESSAGES_RECEIVED = Counter("relay_messages_received_total",
                            "Messages accepted (250 after DATA), by listener", ["listener"])
MESSAGES_REJECTED = Counter("relay_messages_rejected_total",
                            "Transactions or recipients refused, by reason", ["reason"])
RECEIVED_BYTES = Counter("relay_received_bytes_total", "Message bytes accepted")
TLS_INBOUND = Counter("relay_tls_inbound_total",
                      "Inbound TLS sessions by version", ["version"])
AUTH_RESULTS = Counter("relay_auth_attempts_total",
                       "SMTP AUTH attempts by mechanism and result", ["mechanism", "result"])
SESSIONS_ACTIVE = Gauge("relay_smtp_sessions", "Open SMTP sessions", ["listener"],
                        multiprocess_mode="livesum")

# --- filters ------------------------------------------------------------------------
FILTER_VERDICTS = Counter("relay_filter_verdicts_total",
                          "Filter verdicts by filter and verdict", ["filter", "verdict"])
FILTER_ERRORS = Counter("relay_filter_errors_total",
                        "Filters that raised or timed out", ["filter", "kind"])
FILTER_SECONDS = Histogram("relay_filter_duration_seconds", "Time spent in each filter",
                           ["filter"], buckets=(.0005, .001, .005, .01, .05, .1, .5, 1, 5, 30))
MESSAGES_QUARANTINED = Counter("relay_messages_quarantined_total",
                               "Messages put in quarantine, by filter", ["filter"])
MESSAGES_DISCARDED = Counter("relay_messages_discarded_total",
                             "Messages accepted and dropped, by filter", ["filter"])

# --- queue --------------------------------------------------------------------------
QUEUE_MESSAGES = Gauge("relay_queue_messages", "Messages in the queue, by queue",
                       ["queue"], multiprocess_mode="livesum")
QUEUE_OLDEST = Gauge("relay_queue_oldest_message_age_seconds",
                     "Age of the oldest message, by queue", ["queue"],
                     multiprocess_mode="livemax")
QUEUE_BYTES = Gauge("relay_queue_bytes", "Bytes of queued messages",
                    multiprocess_mode="livesum")
SPOOL_COMMITS = Counter("relay_spool_commits_total",
                        "fdatasync calls of the spool (each commits a group of records)")
SPOOL_COMMIT_SECONDS = Histogram("relay_spool_commit_duration_seconds",
                                 "Time from write to durable (group commit)",
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5, 1))
SPOOL_ERRORS = Counter("relay_spool_errors_total", "Local storage failures", ["op"])
SPOOL_CORRUPT = Counter("relay_spool_corrupt_records_total",
                        "Queue records found corrupt and moved aside")

# --- delivery -----------------------------------------------------------------------
DELIVERY_ATTEMPTS = Counter("relay_delivery_attempts_total",
                            "Per-recipient delivery results, by result and destination class",
                            ["result", "destination"])
MESSAGES_RELAYED = Counter("relay_messages_relayed_total",
                           "Messages whose every recipient was accepted by a next hop")
MESSAGES_BOUNCED = Counter("relay_messages_bounced_total",
                           "Recipients bounced (5xx or expired), by reason", ["reason"])
MESSAGES_DEFERRED = Counter("relay_messages_deferred_total",
                            "Recipients deferred (4xx or network), by reason", ["reason"])
DSN_SENT = Counter("relay_dsn_generated_total", "DSNs generated, by action", ["action"])
DELIVERY_LATENCY = Histogram("relay_delivery_latency_seconds",
                             "From receipt (250) to a next hop's 2xx",
                             buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900,
                                      3600, 14400, 86400))
TLS_OUTBOUND = Counter("relay_tls_outbound_total",
                       "Outbound SMTP sessions by TLS outcome", ["result"])
OUTBOUND_CONNECTIONS = Gauge("relay_delivery_connections", "Open outbound SMTP connections",
                             multiprocess_mode="livesum")

# --- quarantine ---------------------------------------------------------------------
QUARANTINE_MESSAGES = Gauge("relay_quarantine_messages", "Messages held in quarantine",
                            multiprocess_mode="livemax")
QUARANTINE_RELEASES = Counter("relay_quarantine_released_total",
                              "Quarantined messages released back to delivery", ["via"])
QUARANTINE_DELETES = Counter("relay_quarantine_deleted_total",
                             "Quarantined messages deleted, by how", ["via"])
QUARANTINE_EXPIRED = Counter("relay_quarantine_expired_total",
                             "Quarantined messages removed by retention")
MAILBOX_LOGINS = Counter("relay_mailbox_logins_total",
                         "IMAP/POP3 logins by protocol and result", ["protocol", "result"])

# --- process ------------------------------------------------------------------------
CONFIG_RELOADS = Counter("relay_config_reloads_total", "Config reloads by result", ["result"])
DRAINING = Gauge("relay_draining", "1 while the relay is draining (not taking mail)",
                 multiprocess_mode="livemax")
# Set by relay.http (in the process serving HTTP) on every /readyz and /metrics, so
# alerts see readiness where no kubelet probes it. livemax: other processes only hold
# the import-time 0, so the maximum is the serving process's value.
READY = Gauge("relay_ready", "1 when the last readiness check found no problem, else 0",
              multiprocess_mode="livemax")
SPOOL_FREE = Gauge("relay_spool_free_bytes", "Free bytes on the spool's filesystem",
                   multiprocess_mode="livemax")


def reply_class(code: int) -> str:
    return f"{code // 100}xx"
