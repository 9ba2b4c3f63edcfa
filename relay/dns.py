"""DNS for filters and delivery: dnspython's async resolver behind relay.pipeline's
Resolver protocol.

Takes the configured resolvers ('host:port', so tests use a real DNS server on
loopback) and a timeout. Answers are plain text lists; NXDOMAIN and NODATA are empty
answers, a timeout or SERVFAIL raises DNSError (callers map it to temperror or 4xx).
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from relay.pipeline.protocol import DNSError, Resolver


class NXDomain(DNSError):
    """Raised only by `lookup(..., nxdomain=True)`: the name does not exist."""


class DNSResolver(Resolver):
    def __init__(self, nameservers: Sequence[tuple[str, int]] = (), timeout: float = 10.0):
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [h for h, _ in nameservers]
            # dnspython has one port for all nameservers; configs name one per entry.
            r.port = nameservers[0][1]
        else:
            r = dns.asyncresolver.Resolver()
        r.timeout = min(timeout, 5.0)
        r.lifetime = timeout
        r.cache = dns.resolver.LRUCache(10000)
        self._r = r

    async def lookup(self, name: str, rdtype: str, nxdomain: bool = False) -> list[str]:
        """Text of each record. NODATA gives []; NXDOMAIN gives [] or raises NXDomain."""
        try:
            answer = await self._r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            if nxdomain:
                raise NXDomain(name) from None
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as e:
            raise DNSError(f"{rdtype} {name}: {e.__class__.__name__}") from None
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
                dns.exception.SyntaxError) as e:
            raise NXDomain(name) if nxdomain else DNSError(f"bad name {name!r}: {e}") from None
        if answer.rrset is None:
            return []
        out = []
        for rd in answer.rrset:
            if rd.rdtype == dns.rdatatype.TXT:
                out.append(b"".join(rd.strings).decode("utf-8", "replace"))
            elif rd.rdtype == dns.rdatatype.MX:
                out.append(f"{rd.preference} {rd.exchange.to_text(omit_final_dot=True)}")
            else:
                out.append(rd.to_text().rstrip(".") if rd.rdtype in (
                    dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS) else rd.to_text())
        return out

    async def query(self, name: str, rdtype: str) -> list[str]:
        return await self.lookup(name, rdtype)

    async def exists(self, name: str) -> bool:
        try:
            await self.lookup(name, "A", nxdomain=True)
        except NXDomain:
            return False
        return True
