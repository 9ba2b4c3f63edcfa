"""DKIM: verify every signature of incoming mail, sign mail of our own domains.

Takes the message at the data stage. Verification fetches each signature's key
(`selector._domainkey.domain` TXT) through the context's async resolver, then lets
dkimpy do the cryptography with a lookup function that answers only from what was
fetched (so dkimpy never touches the network; big messages are hashed in a thread).
Every signature gives one AuthResult("dkim", ...) in ctx.auth_results, for the
Authentication-Results header and for DMARC; a message without signatures gives
dkim=none. Signing (trusted clients only, From domain configured) hands on
DKIM-Signature fields as Verdict headers, to be prepended unchanged (their values
contain CRLF+WSP folds).

Trusts: nothing in the message; keys only as published in DNS; its own key files.
Choices: relaxed/relaxed canonicalization when signing (RFC 6376 3.4: survives the
re-folding and white-space changes relays make; simple/simple breaks on any of them);
From is oversigned so a second From cannot be added; l= is never set, and a received
signature whose l= leaves part of the body unsigned is never a pass (the appended-
content attack); rsa-sha1 is refused unless allowed (RFC 8301 3.1); RSA keys under
1024 bits are refused (RFC 8301 3.2).
RFCs: 6376 (DKIM), 8301 (algorithm and key size update), 8463 (Ed25519), 8601 (results),
7372 (enhanced status codes for DKIM).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value

from relay.config import ConfigError, Domain, Size, parse_section
from relay.pipeline.protocol import (
    CONTINUE,
    Action,
    AuthResult,
    Context,
    Filter,
    FilterEnv,
    Stage,
    Verdict,
    header_text,
)

log = logging.getLogger("relay.dkim")

# dkimpy logs its own view of each failure; we log one line per message instead.
_libog = logging.getLogger("relay.dkim.dkimpy")
_libog.addHandler(logging.NullHandler())
_libog.propagate = False

# RFC 6376 5.4.1's list of fields worth signing (those present are signed).
DEFAULT_SIGN_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
)
# Fields a signature must not cover: relays add or change them (RFC 6376 5.4).
_NEVER_SIGN = frozenset({"return-path", "received", "comments", "keywords", "bcc",
                         "resent-bcc", "dkim-signature", "authentication-results"})

OnResult = Literal["continue", "reject", "tempfail", "quarantine"]


@dataclass(frozen=True)
class SigningKey:
    domain: Domain
    selector: str
    key_file: str             # RSA: PEM (PKCS#1 or #8); Ed25519: PEM or base64 seed
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    headers: tuple[str, ...] = DEFAULT_SIGN_HEADERS
    # Listed once more than present, so no further instance can be added unnoticed.
    oversign: tuple[str, ...] = ("from",)
    # Also sign mail whose From is in a subdomain of `domain`.
    subdomains: bool = False


@dataclass(frozen=True)
class DKIMOptions:
    verify: bool = True
    # Mail from trusted clients (mynetworks, AUTH) is ours: by default not verified.
    verify_trusted: bool = False
    # What to do when no signature passed and one failed / was broken / hit DNS trouble.
    on_fail: OnResult = "continue"
    on_permerror: OnResult = "continue"
    on_temperror: OnResult = "continue"
    quarantine_mailbox: str = "dkim"
    # Each signature costs a DNS query and a body hash: a bound stops a CPU/DNS flood.
    max_signatures: int = 8
    allow_rsa_sha1: bool = False
    min_key_bits: int = 1024
    # Messages larger than this are hashed in a worker thread, off the event loop.
    thread_threshold: Size = Size(256 * 1024)
    sign: tuple[SigningKey, ...] = field(default_factory=tuple)


# --- verification -------------------------------------------------------------------

@dataclass
class _Sig:
    """One DKIM-Signature as found, and what became of it."""

    index: int
    tags: dict[bytes, bytes]
    result: str = ""
    comment: str = ""
    keyname: bytes = b""

    def auth_result(self) -> AuthResult:
        props = []
        for tag, prop in ((b"d", "header.d"), (b"s", "header.s")):
            if tag in self.tags:
                props.append((prop, self.tags[tag].decode("ascii", "replace")))
        if b"b" in self.tags:
            # RFC 6008: the first 8 characters tell two signatures of one d= apart.
            b = re.sub(rb"\s+", b"", self.tags[b"b"])[:8]
            props.append(("header.b", b.decode("ascii", "replace")))
        return AuthResult("dkim", self.result, tuple(props), self.comment)


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 4]


def _find_signatures(message: bytes) -> list[_Sig] | None:
    """Every DKIM-Signature, top first (dkimpy's index order); None if the header
    section cannot be parsed at all."""
    try:
        headers, _ = dkim.rfc822_parse(_header_block(message))
    except (dkim.MessageFormatError, IndexError):
        return None
    out = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        idx = len(out)
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            out.append(_Sig(idx, {}, "permerror", "unparsable signature"))
            continue
        out.append(_Sig(idx, tags))
    return out


def _precheck(sig: _Sig, allow_rsa_sha1: bool) -> None:
    """Tag checks that need no key (RFC 6376 6.1.1); sets a permerror result."""
    try:
        dkim.validate_signature_fields(sig.tags)
    except dkim.ValidationError as e:
        sig.result, sig.comment = "permerror", _short(e)
        return
    if sig.tags[b"a"] == b"rsa-sha1" and not allow_rsa_sha1:
        sig.result, sig.comment = "permerror", "rsa-sha1 not accepted (RFC 8301)"
        return
    d = sig.tags[b"d"].strip().lower().rstrip(b".")
    s = sig.tags[b"s"].strip().lower()
    sig.keyname = s + b"._domainkey." + d


def _short(e: BaseException) -> str:
    return str(e).split(" (", 1)[0][:80]


def _pick_key(name: bytes, records: list[str], min_bits: int) -> tuple[bytes | None, str]:
    """The first usable key record; else (None, why). RFC 6376 3.6.2.2 leaves multiple
    records undefined: taking the first that parses is what verifiers do."""
    why = "no key record"
    for rec in records:
        raw = rec.encode("utf-8", "replace")
        try:
            _, bits, ktag, _ = dkim.evaluate_pk(name, raw)
        except (dkim.DKIMException, ValueError, TypeError) as e:
            # p= empty is a revoked key (RFC 6376 3.6.1); anything else a bad record.
            why = "key revoked" if re.search(rb"(^|;)\s*p\s*=\s*(;|$)", raw) else _short(e)
            continue
        if ktag == b"rsa" and bits is not None and bits < min_bits:
            why = f"key too small ({bits} bits)"
            continue
        return raw, ""
    return None, why


def _crypto(message: bytes, sigs: list[_Sig], keys: dict[bytes, bytes], min_bits: int) -> None:
    """dkimpy's verification of the signatures that got this far (blocking)."""
    try:
        d = dkim.DKIM(message, logger=_libog, minkey=min_bits)
    except dkim.DKIMException as e:
        for sig in sigs:
            sig.result, sig.comment = "permerror", _short(e)
        return

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return keys.get(name.lower().rstrip(b"."), b"")

    for sig in sigs:
        try:
            ok = d.verify(sig.index, dnsfunc=dnsfunc)
        except dkim.ValidationError as e:     # after the precheck: body hash mismatch
            sig.result, sig.comment = "fail", _short(e)
            continue
        except dkim.DKIMException as e:
            sig.result, sig.comment = "permerror", _short(e)
            continue
        except Exception as e:  # noqa: BLE001 - dkimpy on hostile input: no pass, no crash
            log.warning("dkim verification error on signature %d: %r", sig.index, e)
            sig.result, sig.comment = "permerror", "unverifiable signature"
            continue
        if not ok:
            sig.result, sig.comment = "fail", "bad signature"
            continue
        sig.result = "pass"
        if b"l" in sig.tags:
            # RFC 6376 8.2: anything after l= octets is unsigned and may be an
            # attacker's; the message as a whole is not what the signer sent.
            canon = CanonicalizationPolicy.from_c_value(sig.tags.get(b"c", b"simple/simple"))
            body_len = len(canon.canonicalize_body(d.body))
            signed = int(sig.tags[b"l"])
            if signed < body_len:
                sig.result = "neutral"
                sig.comment = f"l= signs {signed} of {body_len} body octets"
            elif signed > body_len:
                sig.result, sig.comment = "permerror", "l= longer than the body"


async def verify(message: bytes, resolver: Any, *, allow_rsa_sha1: bool = False,
                 min_key_bits: int = 1024, max_signatures: int = 8,
                 thread_threshold: int = 256 * 1024) -> list[AuthResult]:
    """One AuthResult per DKIM-Signature (top first); [dkim=none] without any."""
    sigs = _find_signatures(message)
    if sigs is None:
        return [AuthResult("dkim", "permerror", (), "malformed header section")]
    if not sigs:
        return [AuthResult("dkim", "none")]
    sigs = sigs[:max_signatures]
    for sig in sigs:
        if not sig.result:
            _precheck(sig, allow_rsa_sha1)

    names = sorted({s.keyname for s in sigs if not s.result})
    answers = await asyncio.gather(
        *(resolver.query(n.decode("ascii", "replace"), "TXT") for n in names),
        return_exceptions=True)
    keys: dict[bytes, bytes] = {}
    trouble: dict[bytes, tuple[str, str]] = {}
    for name, ans in zip(names, answers, strict=True):
        if isinstance(ans, BaseException):
            # DNSError (timeout, SERVFAIL) or anything unexpected: try again later.
            trouble[name] = ("temperror", "key lookup failed")
            continue
        key, why = _pick_key(name, ans, min_key_bits)
        if key is None:
            trouble[name] = ("permerror", why)
        else:
            keys[name] = key
    todo = []
    for sig in sigs:
        if sig.result:
            continue
        if sig.keyname in trouble:
            sig.result, sig.comment = trouble[sig.keyname]
        else:
            todo.append(sig)
    if todo:
        if len(message) > thread_threshold:
            await asyncio.to_thread(_crypto, message, todo, keys, min_key_bits)
        else:
            _crypto(message, todo, keys, min_key_bits)
    return [s.auth_result() for s in sigs]


# --- signing ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Signer:
    domain: str
    selector: bytes
    algorithm: bytes
    key: bytes                # what dkimpy wants: PKCS#1 PEM, or the base64 Ed25519 seed
    headers: tuple[str, ...]
    oversign: tuple[str, ...]
    subdomains: bool

    def covers(self, from_domain: str) -> bool:
        return from_domain == self.domain or (
            self.subdomains and from_domain.endswith("." + self.domain))


def _load_key(cfg: SigningKey, key: str) -> bytes:
    try:
        data = Path(cfg.key_file).read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}.key_file: cannot read {cfg.key_file} ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        if cfg.algorithm != "ed25519-sha256":
            raise ConfigError(f"{key}.key_file: expected a PEM private key")
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ConfigError(f"{key}.key_file: expected a PEM key or a base64 Ed25519 seed")
        return base64.b64encode(seed)
    try:
        pk = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}.key_file: not a usable private key ({e})") from None
    if cfg.algorithm == "ed25519-sha256":
        if not isinstance(pk, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{key}.key_file: algorithm ed25519-sha256 needs an Ed25519 key")
        raw = pk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
        return base64.b64encode(raw)
    if not isinstance(pk, rsa.RSAPrivateKey):
        raise ConfigError(f"{key}.key_file: algorithm rsa-sha256 needs an RSA key")
    if pk.key_size < 1024:
        raise ConfigError(f"{key}.key_file: RSA keys under 1024 bits are refused (RFC 8301)")
    # dkimpy reads PKCS#1 only; re-encode whatever PEM form we were given.
    return pk.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())


def _make_signer(cfg: SigningKey, key: str) -> _Signer:
    headers = tuple(h.strip().lower() for h in cfg.headers)
    oversign = tuple(h.strip().lower() for h in cfg.oversign)
    if "from" not in headers:
        raise ConfigError(f"{key}.headers: must include from (RFC 6376 5.4)")
    bad = sorted((set(headers) | set(oversign)) & _NEVER_SIGN)
    if bad:
        raise ConfigError(f"{key}.headers: {bad[0]} must not be signed (relays change it)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", cfg.selector):
        raise ConfigError(f"{key}.selector: not a valid selector: {cfg.selector!r}")
    return _Signer(str(cfg.domain).lstrip("*."), cfg.selector.encode(), cfg.algorithm.encode(),
                   _load_key(cfg, key), headers, oversign, cfg.subdomains)



def from_domain(headers: Any) -> str | None:
    """The domain of the one author address, or None when there is not exactly one
    From field with exactly one address (RFC 5322 3.6.2, RFC 7489 6.6.1)."""
    fields = headers.get_all("From") or []
    if len(fields) != 1:
        return None
    addrs = [a for _, a in getaddresses([header_text(fields[0])]) if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    dom = addrs[0].rsplit("@", 1)[1].strip().strip("<>").lower().rstrip(".")
    try:
        return dom.encode("idna").decode("ascii") or None   # config domains are A-labels
    except UnicodeError:
        return None


def sign(message: bytes, signers: list[_Signer]) -> list[str]:
    """A DKIM-Signature value per signer (blocking: hashes the body)."""
    d = dkim.DKIM(message, logger=_libog)
    present = [name.decode("ascii", "replace").lower() for name, _ in d.headers]
    out = []
    for sg in signers:
        include = [h for h in sg.headers for _ in range(present.count(h))]
        include += list(sg.oversign)
        raw = d.sign(sg.selector, sg.domain.encode(), sg.key, signature_algorithm=sg.algorithm,
                     canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
                     length=False)
        value = raw.split(b":", 1)[1].strip()
        out.append(value.decode("ascii"))
    return out


# --- the filter ---------------------------------------------------------------------

class DKIMFilter(Filter):
    name = "dkim"
    stages = frozenset({Stage.DATA})

    def __init__(self, options: Mapping[str, Any], env: FilterEnv) -> None:
        super().__init__(options, env)
        key = f"filters.{self.name}"
        self.opts: DKIMOptions = parse_section(DKIMOptions, options, key)
        self.signers = [_make_signer(s, f"{key}.sign[{i}]") for i, s in enumerate(self.opts.sign)]

    async def on_data(self, ctx: Context) -> Verdict:
        message = await ctx.message()
        results: list[AuthResult] = []
        if self.opts.verify and (self.opts.verify_trusted or not ctx.trusted):
            results = await verify(
                message, ctx.resolver, allow_rsa_sha1=self.opts.allow_rsa_sha1,
                min_key_bits=self.opts.min_key_bits, max_signatures=self.opts.max_signatures,
                thread_threshold=self.opts.thread_threshold)
            ctx.auth_results.extend(results)
            log.info("%s: dkim %s", ctx.queue_id or "-", " ".join(
                f"{r.result}:{dict(r.props).get('header.d', '?')}" for r in results))

        headers: tuple[tuple[str, str], ...] = ()
        if self.signers and ctx.trusted:
            try:
                headers = await self._sign(ctx, message)
            except dkim.MessageFormatError as e:
                # Our own client's mail we cannot parse: unsigned it would fail at
                # the receiver's DMARC, so say why now.
                log.warning("%s: dkim cannot sign: %s", ctx.queue_id or "-", _short(e))
                return Verdict.reject("Message header is malformed", 550, "5.6.0",
                                      "dkim sign: malformed header")
            except dkim.DKIMException as e:
                log.error("%s: dkim signing failed: %s", ctx.queue_id or "-", _short(e))
                return Verdict.tempfail("Local error in processing", 451, "4.3.0",
                                        "dkim sign failed")

        verdict = self._act(results)
        if verdict.action is Action.QUARANTINE:
            return Verdict.quarantine(verdict.mailbox, verdict.reason, headers)
        if verdict is CONTINUE:
            return Verdict.cont(headers) if headers else CONTINUE
        return verdict

    async def _sign(self, ctx: Context, message: bytes) -> tuple[tuple[str, str], ...]:
        dom = from_domain(await ctx.headers())
        signers = [s for s in self.signers if dom and s.covers(dom)]
        if not signers:
            log.info("%s: dkim not signing: From domain %s not configured",
                     ctx.queue_id or "-", dom or "(none or several)")
            return ()
        if len(message) > self.opts.thread_threshold:
            values = await asyncio.to_thread(sign, message, signers)
        else:
            values = sign(message, signers)
        log.info("%s: dkim signed d=%s s=%s", ctx.queue_id or "-", signers[0].domain,
                 ",".join(s.selector.decode() for s in signers))
        return tuple(("DKIM-Signature", v) for v in values)

    def _act(self, results: list[AuthResult]) -> Verdict:
        got = {r.result for r in results}
        if not results or "pass" in got:
            return CONTINUE
        # One passing signature is enough (RFC 6376 6.1); otherwise the most
        # retryable problem decides: DNS trouble may clear, a bad signature will not.
        for result, action in (("temperror", self.opts.on_temperror),
                               ("fail", self.opts.on_fail),
                               ("permerror", self.opts.on_permerror)):
            if result in got:
                return self._verdict(action, result)
        return CONTINUE

    def _verdict(self, action: str, result: str) -> Verdict:
        reason = f"dkim={result}"
        if action == "reject":
            return Verdict.reject("No valid DKIM signature found", 550, "5.7.20", reason)
        if action == "tempfail":
            enhanced = "4.4.3" if result == "temperror" else "4.7.20"
            return Verdict.tempfail("DKIM verification failed, try again later", 451,
                                    enhanced, reason)
        if action == "quarantine":
            return Verdict.quarantine(self.opts.quarantine_mailbox, reason)
        return CONTINUE
