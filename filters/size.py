"""Size filter: message size limits per listener and per sender, below the global
smtp.max_message_size.

Checks the declared SIZE= at MAIL (RFC 1870: refuse early, before the bytes flow) and
the real size at end of DATA. Replies 552 5.3.4.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Size, parse_section
from relay.pipeline.protocol import CONTINUE, Context, Filter, FilterEnv, Stage, Verdict


@dataclass(frozen=True)
class SenderLimit:
    # An address, '@domain' or a domain suffix '.example.com'.
    sender: str
    max_size: Size


@dataclass(frozen=True)
class SizeOptions:
    # Listener name -> limit in bytes.
    listeners: dict[str, Size] | None = None
    senders: tuple[SenderLimit, ...] = ()


class SizeFilter(Filter):
    name = "size"
    stages = frozenset({Stage.MAIL, Stage.DATA})

    def __init__(self, options, env: FilterEnv):
        super().__init__(options, env)
        o = parse_section(SizeOptions, options, "filters.size")
        self.listeners = {k: Size.parse(v) for k, v in (o.listeners or {}).items()}
        self.senders = o.senders
        if not self.listeners and not self.senders:
            # Nothing below smtp.max_message_size, which the SMTP session enforces
            # itself: stay out of the per-message path.
            self.stages = frozenset()

    def limit(self, ctx: Context) -> int:
        limits = [self.listeners[ctx.listener]] if ctx.listener in self.listeners else []
        s = ctx.mail_from.lower()
        dom = s.rpartition("@")[2]
        for sl in self.senders:
            k = sl.sender.lower()
            if s == k or (k.startswith("@") and dom == k[1:]) or \
                    (k.startswith(".") and (dom.endswith(k) or dom == k[1:])):
                limits.append(sl.max_size)
        return min(limits) if limits else 0

    def _check(self, ctx: Context, size: int) -> Verdict:
        lim = self.limit(ctx)
        if lim and size > lim:
            return Verdict.reject("Message size exceeds the limit for this sender", 552, "5.3.4",
                                  reason="size limit")
        return CONTINUE

    async def on_mail(self, ctx: Context) -> Verdict:
        declared = ctx.mail_params.get("SIZE")
        return self._check(ctx, int(declared)) if declared else CONTINUE

    async def on_data(self, ctx: Context) -> Verdict:
        return self._check(ctx, ctx.size)
