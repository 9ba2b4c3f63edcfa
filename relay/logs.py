"""Log setup: one line per event, text (Postfix-like) or JSON, level from config.

Lines about a message start with its queue id ("QUEUEID: ..."), so `grep QUEUEID`
tells a message's whole story from receipt to delivery, as with Postfix. The JSON
format lifts that id into a "queue_id" field for log pipelines.
"""

from __future__ import annotations

import asyncio
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

    def format(self, record: logging.LogRecord) -> str:
        # The format string above, built directly: logging's generic path (a dict
        # %-format, usesTime, stack checks) cost more than the line is worth.
        line = (f"{self.formatTime(record)} {record.name}[{record.process}]: "
                f"{record.levelname} {record.getMessage()}")
        if record.exc_info or record.stack_info:
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                line += "\n" + record.exc_text
            if record.stack_info:
                line += "\n" + self.formatStack(record.stack_info)
        return line


class LoopBatchedHandler(logging.StreamHandler):
    """Lines logged on the event loop are written together once the loop has run what
    is ready now (within the same turn of the loop, well under a millisecond), one
    write per turn instead of one per line. A write per line cost a tenth of the
    relay's CPU: each is a system call that hands the GIL to the spool's fsync thread
    and, on a pipe (Kubernetes), wakes the log reader. Lines from other threads, and
    any line logged with no loop running, are written at once. A SIGKILL loses at
    most the current turn's lines; nothing is buffered across a fork."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        loop = asyncio._get_running_loop()
        if loop is None:
            self.flush()
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
            return
        if not self._lines:
            loop.call_soon(self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        self.acquire()
        try:
            if self._lines:
                self._lines.append("")
                text, self._lines = "\n".join(self._lines), []
                self.stream.write(text)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self._lines = []
        finally:
            self.release()


class _Record(logging.LogRecord):
    """LogRecord without the work our lines never use: no caller's file (we log with
    _srcfile off, so it is always "(unknown file)"), no thread or process names, no
    single-mapping argument check. Every attribute logging's formatters may ask for
    is still there."""

    def __init__(self, name, level, pathname, lineno, msg, args, exc_info,  # noqa: PLR0913
                 func=None, sinfo=None, **_kw):
        ct = time.time()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]          # logging's "%(key)s" form, as LogRecord allows
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = pathname
        self.filename = pathname
        self.module = "Unknown module"
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func
        self.created = ct
        self.msecs = int((ct - int(ct)) * 1000) + 0.0
        self.relativeCreated = (ct - _START) * 1000
        self.thread = None
        self.threadName = None
        self.processName = None
        self.process = _PID[0]
        self.taskName = None


_START = time.time()
_PID = [os.getpid()]


def _after_fork() -> None:
    _PID[0] = os.getpid()


def _flush_before_fork() -> None:
    for h in logging.getLogger().handlers:
        if isinstance(h, LoopBatchedHandler):
            h.flush()


os.register_at_fork(before=_flush_before_fork, after_in_child=_after_fork)


def setup(level: str = "info", fmt: str = "text") -> None:
    # Per-record work we never print: the caller's file and line (a stack walk), the
    # thread and the multiprocessing names. A few log lines per message made this a
    # tenth of the relay's CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(_Record)
    handler = LoopBatchedHandler(sys.stderr)
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
