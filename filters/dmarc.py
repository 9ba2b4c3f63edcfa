"""DMARC: check the From domain against SPF and DKIM results, apply its policy.

Takes, at the data stage, the message's From field and the SPF and DKIM outcomes
other filters left in ctx.auth_results (spf: smtp.mailfrom; dkim: header.d of each
passing signature), so it must run after them. Looks up the policy record at
`_dmarc.<From domain>`, then at the organizational domain; decides alignment
(relaxed or strict, RFC 7489 3.1), samples with pct=, and hands on
AuthResult("dmarc", ...) plus a verdict: p=reject -> 550 5.7.1, p=quarantine -> the
quarantine mailbox, p=none -> continue (each mapping configurable).

Trusts: the SPF and DKIM results in the context (our own filters wrote them), DNS
answers, and the Public Suffix List installed on this host (Debian's
/usr/share/publicsuffix, else the copy bundled with publicsuffix2; never fetched at
run time). A message with no From, several From fields or several authors fails
DMARC with an implied p=reject (RFC 7489 6.6.1: such mail cannot be evaluated and is
the classic way round it).
RFCs: 7489 (DMARC), 5322 3.6.2 (From), 8601 (results).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from publicsuffix2 import PublicSuffixList

from relay.config import parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    AuthResult,
    Context,
    DNSError,
    Filter,
    FilterEnv,
    Stage,
    Verdict,
    header_text,
)

log = logging.getLogger("relay.dmarc")

DEBIAN_PSL = Path("/usr/share/publicsuffix/public_suffix_list.dat")
_POLICIES = ("none", "quarantine", "reject")
# RFC 7489 6.4: dmarc-version = "v" *WSP "=" *WSP "DMARC1" (case as written), first.
_VERSION = re.compile(r"[ \t]*v[ \t]*=[ \t]*DMARC1[ \t]*(;|$)")


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # Read once per process (about 40 ms); the file is a Debian package's, updated with
    # the system, so the relay never fetches it itself.
    return PublicSuffixList(psl_file=str(DEBIAN_PSL) if DEBIAN_PSL.is_file() else None)


@lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (the domain itself if shorter).
    A name under a suffix the list does not know is treated as under a one-label
    suffix (the PSL's implicit `*` rule)."""
    domain = domain.lower().rstrip(".")
    suffix = _psl().get_tld(domain) or domain.rsplit(".", 1)[-1]
    if domain == suffix or not domain.endswith("." + suffix):
        return domain
    labels = domain[: -len(suffix) - 1].split(".")
    return f"{labels[-1]}.{suffix}"


# --- the record ---------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


def parse_record(text: str) -> Record | None:
    """A DMARC record, or None if it is not one to apply (RFC 7489 6.3, 6.6.3).

    v=DMARC1 must come first. Unknown tags are ignored; a bad optional value falls
    back to its default (6.3: "syntax errors in the remainder of the record SHOULD be
    discarded in favor of default values"); the first of a repeated tag counts.
    A missing or bad p= makes the record p=none when rua= is present, else no record.
    """
    if not _VERSION.match(text):
        return None
    parts = [t.strip() for t in text.split(";")]
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if eq and name and name not in tags:
            tags[name] = value.strip()
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags or "mailto:" not in tags["rua"].lower():
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in _POLICIES:
        sp = p
    pct = 100
    raw = tags.get("pct", "")
    if raw.isdigit() and 0 <= int(raw) <= 100:
        pct = int(raw)
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Record(p, sp, pct, adkim if adkim in ("r", "s") else "r",
                  aspf if aspf in ("r", "s") else "r")


def _one_record(answers: list[str]) -> tuple[Record | None, int]:
    """(record, how many DMARC records there were): exactly one, or none applies."""
    recs = [a for a in answers if _VERSION.match(a)]
    if len(recs) != 1:
        return None, len(recs)
    return parse_record(recs[0]), 1


async def discover(resolver: Any, domain: str) -> tuple[Record | None, bool]:
    """(record, found at the organizational domain), RFC 7489 6.6.3. DNSError passes."""
    rec, _ = _one_record(await resolver.query(f"_dmarc.{domain}", "TXT"))
    if rec is not None:
        return rec, False
    org = org_domain(domain)
    if org == domain:
        return None, False
    rec, _ = _one_record(await resolver.query(f"_dmarc.{org}", "TXT"))
    return rec, rec is not None


def aligned(a: str, b: str, mode: str) -> bool:
    """RFC 7489 3.1.1/3.1.2: strict = same name; relaxed = same organizational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)



def _spf_domain(props: dict[str, str], null_sender: bool) -> str:
    # RFC 8601 allows smtp.mailfrom to be the whole address; alignment needs the domain.
    if "smtp.mailfrom" in props:
        return props["smtp.mailfrom"].rpartition("@")[2]
    return props.get("smtp.helo", "") if null_sender else ""


def author_domain(headers: Any) -> tuple[str | None, str]:
    """(the From domain, '') or (None, why): exactly one From with one address."""
    fields = headers.get_all("From") or []
    if len(fields) != 1:
        return None, f"{len(fields)} From fields"
    addrs = [a for _, a in getaddresses([header_text(fields[0])]) if a]
    if len(addrs) != 1:
        return None, f"{len(addrs)} From addresses"
    local, at, dom = addrs[0].rpartition("@")
    dom = dom.strip().lower().rstrip(".")
    if not at or not local or not dom or "." not in dom:
        return None, "From address without a domain"
    try:
        # DNS names, DKIM d= and the PSL are in A-labels (RFC 5890).
        dom = dom.encode("idna").decode("ascii")
    except UnicodeError:
        return None, "From domain is not a valid IDN"
    return dom, ""


# --- the filter ---------------------------------------------------------------------

@dataclass(frozen=True)
class DMARCOptions:
    # What each published policy does to a failing message (after pct sampling).
    reject: Literal["reject", "quarantine", "continue"] = "reject"
    quarantine: Literal["quarantine", "reject", "continue"] = "quarantine"
    quarantine_mailbox: str = "dmarc"
    # DNS trouble: let mail pass (RFC 7489 6.6.3 allows either) or answer 451.
    on_temperror: Literal["continue", "tempfail"] = "continue"
    # Trusted clients send our own mail: by default not checked.
    check_trusted: bool = False


class DMARCFilter(Filter):
    name = "dmarc"
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        self.opts: DMARCOptions = parse_section(DMARCOptions, options, f"filters.{self.name}")
        self.random = random.Random()   # pct sampling; tests replace it
        _psl()

    async def on_data(self, ctx: Context) -> Verdict:
        if ctx.trusted and not self.opts.check_trusted:
            return CONTINUE
        qid = ctx.queue_id or "-"
        domain, why = author_domain(await ctx.headers())
        if domain is None:
            ctx.auth_results.append(AuthResult("dmarc", "permerror", (), f"p=reject: {why}"))
            log.info("%s: dmarc=permerror (%s)", qid, why)
            return self._apply("reject", f"dmarc permerror: {why}")
        props = (("header.from", domain),)
        try:
            rec, at_org = await discover(ctx.resolver, domain)
        except DNSError:
            ctx.auth_results.append(AuthResult("dmarc", "temperror", props, "policy lookup failed"))
            log.info("%s: dmarc=temperror header.from=%s", qid, domain)
            if self.opts.on_temperror == "tempfail":
                return Verdict.tempfail("DMARC policy lookup failed, try again later", 451,
                                        "4.4.3", "dmarc temperror")
            return CONTINUE
        if rec is None:
            ctx.auth_results.append(AuthResult("dmarc", "none", props))
            return CONTINUE

        # RFC 7489 3.1.2 / RFC 7208 2.4: with a null reverse-path SPF checked the
        # HELO name, and that is the SPF-authenticated identity.
        null_sender = not ctx.mail_from.strip("<>")
        spf_ok = any(r.method == "spf" and r.result == "pass"
                     and aligned(_spf_domain(dict(r.props), null_sender), domain, rec.aspf)
                     for r in ctx.auth_results)
        dkim_ok = any(r.method == "dkim" and r.result == "pass"
                      and aligned(dict(r.props).get("header.d", ""), domain, rec.adkim)
                      for r in ctx.auth_results)
        # RFC 7489 6.6.3 step 5: sp= governs subdomains when found at the org domain.
        policy = rec.sp if at_org else rec.p
        if spf_ok or dkim_ok:
            result, disposition = "pass", "none"
        else:
            result, disposition = "fail", policy
            # RFC 7489 6.6.4: mail outside the pct= sample gets the next milder policy.
            if policy != "none" and self.random.random() * 100 >= rec.pct:
                disposition = "quarantine" if policy == "reject" else "none"
        comment = f"p={rec.p} sp={rec.sp} dis={disposition}"
        ctx.auth_results.append(AuthResult("dmarc", result, props, comment))
        log.info("%s: dmarc=%s header.from=%s %s", qid, result, domain, comment)
        return self._apply(disposition, f"dmarc {result} {domain} {comment}")

    def _apply(self, disposition: str, reason: str) -> Verdict:
        action = {"reject": self.opts.reject, "quarantine": self.opts.quarantine}.get(
            disposition, "continue")
        if action == "reject":
            return Verdict.reject("Rejected by the sender domain's DMARC policy", 550, "5.7.1",
                                  reason)
        if action == "quarantine":
            return Verdict.quarantine(self.opts.quarantine_mailbox, reason)
        return CONTINUE
