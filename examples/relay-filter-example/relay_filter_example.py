"""An example third-party filter: tag mail with a header, reject it by Subject.

Takes, at the data stage, the message's Subject (parsed once by the Context, shared by
every filter); hands on a 550 5.7.1 reject when the Subject matches the configured
pattern, and otherwise a header stamped on the message. Trusts nothing in the message:
the Subject is only matched, never echoed into the reply or a header.
Options (the `options:` block of its `filters:` entry, validated at start):
    reject_subject: a regular expression (search, case-insensitive); '' = none
    header: the name of the field to add (default X-Example-Filter)
    tag: its value (default "checked")
RFCs: 5322 (header fields), 3463 (enhanced status codes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config import ConfigError, parse_section
from relay.pipeline.protocol import Context, Filter, FilterEnv, Stage, Verdict


@dataclass(frozen=True)
class Options:
    reject_subject: str = ""
    header: str = "X-Example-Filter"
    tag: str = "checked"


class SubjectFilter(Filter):
    name = "example"
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        # parse_section gives the same errors as the relay's own config: unknown keys
        # and wrong types are refused at start, naming the key.
        self.opts: Options = parse_section(Options, options, f"filters.{self.name}")
        try:
            self.pattern = re.compile(self.opts.reject_subject, re.I) \
                if self.opts.reject_subject else None
        except re.error as e:
            raise ConfigError(f"filters.{self.name}.reject_subject: bad pattern ({e})") from None
        # A header name is an RFC 5322 field name; a value must not break the header.
        if not re.fullmatch(r"[!-9;-~]+", self.opts.header):
            raise ConfigError(f"filters.{self.name}.header: not a header field name")
        if not re.fullmatch(r"[ -~]*", self.opts.tag):
            raise ConfigError(f"filters.{self.name}.tag: printable ASCII only")

    async def on_data(self, ctx: Context) -> Verdict:
        subject = (await ctx.headers()).get("Subject", "")
        if self.pattern is not None and self.pattern.search(str(subject)):
            # A generic text: the reply must not tell the sender what we look for.
            return Verdict.reject("Message content rejected", 550, "5.7.1",
                                  reason="subject matched reject_subject")
        return Verdict.cont(headers=((self.opts.header, self.opts.tag),))
