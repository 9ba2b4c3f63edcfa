"""Log output: one line per event, lines logged on the loop written once per turn."""

import asyncio
import io
import logging
import os
import threading

from relay.logs import LoopBatchedHandler, TextFormatter


def _logger(stream: io.StringIO) -> tuple[logging.Logger, LoopBatchedHandler]:
    h = LoopBatchedHandler(stream)
    h.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.propagate = False
    log.handlers = [h]
    log.setLevel(logging.INFO)
    return log, h


def test_loop_lines_are_written_together_at_the_end_of_the_turn():
    out = io.StringIO()
    log, _ = _logger(out)
    seen: list[str] = []

    async def main() -> None:
        log.info("one")
        log.info("two")
        seen.append(out.getvalue())      # still this turn: nothing written yet
        await asyncio.sleep(0)           # the turn ends; the flush was scheduled first
        await asyncio.sleep(0)
        seen.append(out.getvalue())

    asyncio.run(main())
    assert seen == ["", "one\ntwo\n"]


def test_lines_without_a_loop_or_from_a_thread_are_written_at_once():
    out = io.StringIO()
    log, _ = _logger(out)
    log.info("no loop")
    assert out.getvalue() == "no loop\n"

    async def main() -> None:
        log.info("loop")
        t = threading.Thread(target=log.info, args=("thread",))
        t.start()
        t.join()
        # The thread's line went out at once, after what the loop had buffered.
        assert out.getvalue() == "no loop\nloop\nthread\n"

    asyncio.run(main())


def test_nothing_buffered_is_lost_or_doubled_across_fork():
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    log, h = _logger(stream)
    logging.getLogger().addHandler(h)    # the at-fork flush looks at root's handlers
    try:
        async def main() -> int:
            log.info("before fork")
            pid = os.fork()
            if pid == 0:
                h.flush()                # as a worker does at exit (logging.shutdown)
                os._exit(0)
            return pid

        pid = asyncio.run(main())
        os.waitpid(pid, 0)
        h.flush()
        stream.close()
        with os.fdopen(r) as f:
            assert f.read() == "before fork\n"
    finally:
        logging.getLogger().removeHandler(h)


def test_text_format_is_postfix_like():
    rec = logging.LogRecord("relay.smtp", logging.INFO, "", 0, "%s: from=<%s>",
                            ("0316ZRLS8BXRTKH0Z8", "a@b.test"), None)
    line = TextFormatter().format(rec)
    assert line.endswith(f" relay.smtp[{rec.process}]: INFO 0316ZRLS8BXRTKH0Z8: from=<a@b.test>")
