"""Outbound TLS policy: which STARTTLS level a destination gets, and the SSL contexts.

Takes the delivery config (default level, per-domain levels, CA file) and, when enabled,
an MTA-STS source (relay.delivery.mta_sts.MTASTS: `await policy(domain)`); hands the
client a TLSDecision per route: level none | may | encrypt | verify, plus the MTA-STS
policy whose MX patterns a target must match. Trusts the config; MTA-STS policies are
already validated by their module.

Levels (Postfix's smtp_tls_security_level): none = never STARTTLS; may = STARTTLS when
offered, no certificate check, plaintext when it fails; encrypt = TLS required, no check;
verify = TLS required, chain and host name checked against the MX name. RFC 3207
STARTTLS; RFC 8461 MTA-STS: 'enforce' raises the level to verify and restricts MX names,
never the other way round; 'testing' only asks for may (reports are out of scope).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from relay.config import DeliveryConfig
from relay.delivery.route import Route

log = logging.getLogger("relay.delivery")

LEVELS = ("none", "may", "encrypt", "verify")


@dataclass(frozen=True)
class TLSDecision:
    level: str
    # An MTA-STS policy in enforce mode: only MX hosts it matches may be used.
    sts: Any = None
    source: str = "default"       # default | domain | mta-sts (for logs)

    def allows(self, mx_host: str) -> bool:
        return self.sts is None or bool(self.sts.matches(mx_host))


def _stronger(a: str, b: str) -> str:
    return a if LEVELS.index(a) >= LEVELS.index(b) else b


class TLSPolicies:
    def __init__(self, cfg: DeliveryConfig, mta_sts: Any = None,
                 verify_context: ssl.SSLContext | None = None):
        self._default = cfg.tls_policy
        self._exact: dict[str, str] = {}
        self._sub: list[tuple[str, str]] = []
        for p in cfg.tls_policies:
            d = str(p.domain)
            if d.startswith("*.") or d.startswith("."):
                self._sub.append(("." + d.lstrip("*."), p.policy))
            else:
                self._exact[d] = p.policy
        self._sub.sort(key=lambda x: -len(x[0]))
        self._sts = mta_sts if cfg.mta_sts else None
        self.verify_context = verify_context or self._make_verify(cfg.ca_file)
        self.opportunistic_context = self._make_opportunistic()

    @staticmethod
    def _make_verify(ca_file: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    @staticmethod
    def _make_opportunistic() -> ssl.SSLContext:
        # may/encrypt: any certificate (RFC 7435 opportunistic security: encryption
        # without authentication still beats plaintext). Old servers still run TLS 1.0.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def context(self, level: str) -> ssl.SSLContext | None:
        if level == "verify":
            return self.verify_context
        if level in ("may", "encrypt"):
            return self.opportunistic_context
        return None

    def _configured(self, name: str) -> tuple[str, str]:
        if name in self._exact:
            return self._exact[name], "domain"
        for suffix, level in self._sub:
            if name.endswith(suffix):
                return level, "domain"
        return self._default, "default"

    async def decide(self, route: Route) -> TLSDecision:
        # MX routes are keyed by the recipient domain; smarthosts by their host name.
        name = route.domain or route.hops[0].host
        level, source = self._configured(name)
        if not route.domain or self._sts is None:
            return TLSDecision(level, None, source)
        try:
            policy = await self._sts.policy(route.domain)
        except Exception as e:   # a broken MTA-STS fetch must not stop delivery
            log.warning("MTA-STS lookup for %s failed: %s", route.domain, e)
            policy = None
        mode = getattr(policy, "mode", "none") if policy is not None else "none"
        if mode == "enforce":
            return TLSDecision("verify", policy, "mta-sts")
        if mode == "testing":
            return TLSDecision(_stronger(level, "may"), None, source)
        return TLSDecision(level, None, source)
