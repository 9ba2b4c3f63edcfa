"""Log setup: one line per event, text (Postfix-like) or JSON, level from config.

Lines about a message start with its queue id ("QUEUEID: ..."), so `grep QUEUEID`
tells a message's whole story from receipt to delivery, as with Postfix. The JSON
format lifts that id into a "queue_id" field for log pipelines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_QID = re.compile(r"^([0-9B-DF-HJ-NP-TV-XZ]{18}): ")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "pid": os.getpid()}
        m = _QID.match(msg)
        if m:
            out["queue_id"] = m.group(1)
        out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """'2026-11-26 22:59:05,700 relay.smtp[15468]: INFO message', with the date part
    formatted once a second instead of once a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s[%(process)d]: %(levelname)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"


def setup(level: str = "info", fmt: str = "text") -> None:
    # Per-record work we never print: the caller's file and line (a stack walk), the
    # thread and the multiprocessing names. A few log lines per message made this a
    # tenth of the relay's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter at info level would drown the per-message lines.
    for noisy in ("asyncio", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
