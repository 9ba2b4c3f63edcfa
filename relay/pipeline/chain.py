"""Runs the configured filters for one stage and merges what they decide.

Takes the loaded filters (in configured order) and a stage; hands the session one
merged Verdict. The first verdict other than continue ends the stage (accept skips the
rest, as Haraka's OK); headers from every filter that ran are kept in order; the last
route set wins. A filter that raises or exceeds its timeout is logged and counted and
becomes a 451 4.3.0 tempfail, or is skipped when its config says on_error: continue —
it never takes the session down. Every verdict is counted by filter and action.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

from relay import metrics
from relay.config import FilterConfig
from relay.pipeline.protocol import CONTINUE, Action, Context, Filter, Stage, Verdict

log = logging.getLogger("relay.pipeline")

_TEMPFAIL = Verdict(Action.TEMPFAIL, 451, "4.3.0", "Error: local error in processing, try again later")


@dataclass
class Loaded:
    filter: Filter
    config: FilterConfig

    def __post_init__(self) -> None:
        # Metric children bound once: a labels() lookup per call showed in the profile.
        name = self.filter.name or self.config.name
        self.seconds = metrics.FILTER_SECONDS.labels(name)
        self.verdicts = {a: metrics.FILTER_VERDICTS.labels(name, a.value) for a in Action}


class Chain:
    def __init__(self, filters: list[Loaded]):
        self.filters = filters
        # Only the filters that declare a stage are called for it.
        self._by_stage = {s: [f for f in filters if s in f.filter.stages] for s in Stage}

    def handles(self, stage: Stage) -> bool:
        return bool(self._by_stage[stage])

    async def run(self, stage: Stage, ctx: Context, rcpt: str | None = None,
                  skip: str = "") -> Verdict:
        headers: list[tuple[str, str]] = []
        route: str | None = None
        for lf in self._by_stage[stage]:
            f = lf.filter
            if skip and f.name == skip:
                continue
            v = await self._call(lf, stage, ctx, rcpt)
            lf.verdicts[v.action].inc()
            headers.extend(v.headers)
            if v.route is not None:
                route = v.route
            if v.action is not Action.CONTINUE:
                if v.action is not Action.ACCEPT:
                    log.info("%s: filter %s: %s at %s: %s", ctx.queue_id or "NOQUEUE", f.name,
                             v.action.value, stage.value, v.reason or v.text)
                return replace(v, headers=tuple(headers), route=route, filter=f.name)
        if headers or route:
            return Verdict(headers=tuple(headers), route=route)
        return CONTINUE

    async def _call(self, lf: Loaded, stage: Stage, ctx: Context, rcpt: str | None) -> Verdict:
        f, cfg = lf.filter, lf.config
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.timeout or None):
                if stage is Stage.RCPT:
                    v = await f.on_rcpt(ctx, rcpt or "")
                else:
                    v = await getattr(f, f"on_{stage.value}")(ctx)
            if not isinstance(v, Verdict):
                raise TypeError(f"returned {type(v).__name__}, not a Verdict")
        except Exception as e:  # noqa: BLE001 - a filter must never crash a session
            kind = "timeout" if isinstance(e, TimeoutError) else "error"
            metrics.FILTER_ERRORS.labels(f.name, kind).inc()
            log.error("%s: filter %s failed at %s (%s: %s); %s", ctx.queue_id or "NOQUEUE",
                      f.name, stage.value, kind, e, cfg.on_error)
            v = CONTINUE if cfg.on_error == "continue" else _TEMPFAIL
        finally:
            lf.seconds.observe(time.perf_counter() - t0)
        return v

    async def close(self) -> None:
        for lf in self.filters:
            try:
                await lf.filter.close()
            except Exception:  # noqa: BLE001
                log.exception("filter %s: close failed", lf.filter.name)
