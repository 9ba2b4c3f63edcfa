"""Routing filter: choose a message's next hop, or a quarantine, by rules.

Takes ordered rules from its options; each names conditions (recipient and sender
patterns, a header regex) that must all hold, and one outcome: `route` (a next hop,
'host:port' = MX lookup on host, '[host]:port' = no MX lookup) or `quarantine` (a
mailbox). Hands the chain Verdict.cont(route=...) or Verdict.quarantine(...).

When each rule is decided: a route rule that looks only at the envelope is decided at
RCPT, per recipient (so recipients of one message may take different next hops); a
rule with a header condition, and every quarantine rule, is decided at end of DATA for
the whole message (recipient patterns then match if any recipient matches). At each
stage the first matching rule wins. The filter rewrites nothing: no address or header
is changed, every decision is logged with the queue id.

Trusts its configuration (validated at load, mistakes name the key); header values are
the sender's and are matched only up to MAX_VALUE characters each. RFCs: 5321 (paths),
5322 (header fields), 2047 (encoded words are decoded before matching).
"""

from __future__ import annotations

import email.header
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config import ConfigError, Domain, parse_section
from relay.pipeline.protocol import CONTINUE, Context, Filter, FilterEnv, Stage, Verdict

log = logging.getLogger("relay.filter.routing")

KEY = "filters.routing"
# Header values are attacker-sized; regexes see at most this much of each.
MAX_VALUE = 8192


@dataclass(frozen=True)
class RoutingRule:
    # Optional label for logs and quarantine reasons.
    name: str = ""
    # Address patterns: 'user@example.com', '@example.com' or 'example.com' (the
    # domain), '.example.com' or '*.example.com' (its subdomains), '<>' (null sender).
    recipient: tuple[str, ...] = ()
    sender: tuple[str, ...] = ()
    # A header field name and a regex searched in each of its (decoded) values.
    header: str = ""
    regex: str = ""
    # Exactly one outcome.
    route: str = ""
    quarantine: str = ""
    reason: str = ""


@dataclass(frozen=True)
class RoutingOptions:
    rules: tuple[RoutingRule, ...] = ()


_ROUTE = re.compile(r"\[([^\[\]\s]+)\](?::(\d{1,5}))?|([A-Za-z0-9_.-]+)(?::(\d{1,5}))?")


def check_route(value: str) -> str:
    """'host', 'host:port', '[host]' or '[host]:port' (Postfix transport syntax)."""
    m = _ROUTE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"expected 'host:port' or '[host]:port', got {value!r}")
    port = m.group(2) or m.group(4)
    if port is not None and not 0 < int(port) <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    host = m.group(1) or m.group(3)
    if m.group(3) is not None:
        Domain.parse(host)
    return value.strip()


class _Pattern:
    """One address pattern, compiled to a cheap test."""

    def __init__(self, text: str, key: str):
        t = text.strip().lower()
        self.null = t == "<>"
        self.address = self.domain = self.suffix = ""
        if self.null:
            return
        local, at, dom = t.rpartition("@")
        if at and local:
            self.address = t
        try:
            d = Domain.parse(dom)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        if self.address:
            return
        if d.startswith("*.") or d.startswith("."):
            self.suffix = "." + d.lstrip("*.")
        else:
            self.domain = d

    def match(self, addr: str) -> bool:
        a = addr.lower()
        if self.null:
            return a == ""
        if self.address:
            return a == self.address
        dom = a.rpartition("@")[2]
        if self.domain:
            return bool(a) and dom == self.domain
        return dom.endswith(self.suffix)


class _Rule:
    def __init__(self, r: RoutingRule, key: str):
        self.label = r.name or key.rpartition(".")[2]
        self.recipient = [_Pattern(p, f"{key}.recipient[{i}]") for i, p in enumerate(r.recipient)]
        self.sender = [_Pattern(p, f"{key}.sender[{i}]") for i, p in enumerate(r.sender)]
        if bool(r.header) != bool(r.regex):
            raise ConfigError(f"{key}.{'regex' if r.header else 'header'}: "
                              "header and regex go together")
        if r.header and not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", r.header):
            raise ConfigError(f"{key}.header: not a header field name: {r.header!r}")
        self.header = r.header
        try:
            self.regex = re.compile(r.regex) if r.regex else None
        except re.error as e:
            raise ConfigError(f"{key}.regex: bad regular expression ({e})") from None
        if bool(r.route) == bool(r.quarantine):
            raise ConfigError(f"{key}.route: give exactly one of route or quarantine")
        if r.route:
            try:
                self.route = check_route(r.route)
            except ValueError as e:
                raise ConfigError(f"{key}.route: {e}") from None
        else:
            self.route = ""
        self.quarantine = r.quarantine
        if not (self.recipient or self.sender or self.header):
            raise ConfigError(f"{key}: a rule needs a recipient, sender or header condition")
        self.reason = r.reason or f"routing rule {self.label}"
        # Decided per recipient at RCPT, or for the message at end of DATA.
        self.at_rcpt = bool(self.route) and not self.header

    def envelope_matches(self, sender: str, rcpts: list[str]) -> bool:
        if self.sender and not any(p.match(sender) for p in self.sender):
            return False
        if self.recipient and not any(p.match(r) for p in self.recipient for r in rcpts):
            return False
        return True


def _decoded(value: str) -> str:
    """RFC 2047 encoded words decoded, folding removed; the raw text if undecodable."""
    value = value[:MAX_VALUE]
    if "=?" in value:
        try:
            value = str(email.header.make_header(email.header.decode_header(value)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return re.sub(r"\r?\n[ \t]", " ", value)


class RoutingFilter(Filter):
    name = "routing"
    # Narrowed per instance to the stages its rules need.
    stages = frozenset({Stage.RCPT, Stage.DATA})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        opts = parse_section(RoutingOptions, options, KEY)
        self.rules = [_Rule(r, f"{KEY}.rules[{i}]") for i, r in enumerate(opts.rules)]
        self._rcpt_rules = [r for r in self.rules if r.at_rcpt]
        self._data_rules = [r for r in self.rules if not r.at_rcpt]
        stages = set()
        if self._rcpt_rules:
            stages.add(Stage.RCPT)
        if self._data_rules:
            stages.add(Stage.DATA)
        self.stages = frozenset(stages)

    async def on_rcpt(self, ctx: Context, rcpt: str) -> Verdict:
        for rule in self._rcpt_rules:
            if rule.envelope_matches(ctx.mail_from, [rcpt]):
                log.info("%s: to=<%s> route=%s (rule %s)", ctx.queue_id or "NOQUEUE",
                         rcpt, rule.route, rule.label)
                return Verdict.cont(route=rule.route)
        return CONTINUE

    async def on_data(self, ctx: Context) -> Verdict:
        headers = None
        for rule in self._data_rules:
            if not rule.envelope_matches(ctx.mail_from, ctx.rcpts):
                continue
            if rule.regex is not None:
                if headers is None:
                    headers = await ctx.headers()
                values = headers.get_all(rule.header) or []
                if not any(rule.regex.search(_decoded(str(v))) for v in values):
                    continue
            qid = ctx.queue_id or "NOQUEUE"
            if rule.quarantine:
                log.info("%s: quarantine=%s (rule %s)", qid, rule.quarantine, rule.label)
                return Verdict.quarantine(rule.quarantine, rule.reason)
            log.info("%s: route=%s for the message (rule %s)", qid, rule.route, rule.label)
            return Verdict.cont(route=rule.route)
        return CONTINUE
