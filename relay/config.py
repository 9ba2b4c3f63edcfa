"""Configuration: one YAML file -> frozen, typed settings; errors name the key.

Takes the YAML file named on the command line (or nothing: the embedded defaults run
safely on loopback), applies `RELAY_<SECTION>__<KEY>=value` environment overrides
(values parsed as YAML, `__` separates levels), and validates everything before any
listener starts. A mistake raises ConfigError("listeners[1].address: ...") and nothing
starts. Each section is a frozen dataclass; the loader walks the type hints, so adding
a key is adding a field (and documenting it in deploy/relay.example.yaml).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A configuration mistake; the message starts with the dotted key."""


# --- value types with their own parsing -------------------------------------------

class Size(int):
    """A byte count: an integer or '10MiB', '512k', '1G'."""

    _UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
              "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}

    @classmethod
    def parse(cls, value: Any) -> Size:
        if isinstance(value, bool):
            raise ValueError("expected a size such as 10485760 or '10MiB'")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must not be negative")
            return cls(value)
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in cls._UNITS:
            raise ValueError(f"expected a size such as 10485760 or '10MiB', got {value!r}")
        return cls(int(m.group(1)) * cls._UNITS[m.group(2).lower()])


class Duration(float):
    """Seconds: a number or '30s', '5m', '4h', '5d'."""

    _UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, bool):
            raise ValueError("expected a duration such as 30, '5m' or '4h'")
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError("must not be negative")
            return cls(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*", str(value))
        if not m:
            raise ValueError(f"expected a duration such as 30, '5m' or '4h', got {value!r}")
        return cls(float(m.group(1)) * cls._UNITS[m.group(2)])


class Network(str):
    """A CIDR (or single address) as written; `.net` is the ipaddress network."""

    net: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, value: Any) -> Network:
        if not isinstance(value, str):
            raise ValueError(f"expected a CIDR such as 10.0.0.0/8, got {value!r}")
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as e:
            raise ValueError(f"not a valid address or CIDR: {value!r} ({e})") from None
        out = cls(value.strip())
        out.net = net
        return out


class HostPort(str):
    """'host:port', '[v6]:port' or ':port'; `.host` and `.port`."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: Any) -> HostPort:
        if not isinstance(value, str):
            raise ValueError(f"expected 'host:port', got {value!r}")
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
        if not m:
            raise ValueError(f"expected 'host:port' or '[ipv6]:port', got {value!r}")
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range in {value!r}")
        if m.group(1) is not None:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not an IPv6 address in {value!r}") from None
        out = cls(value.strip())
        out.host, out.port = host, port
        return out


class Domain(str):
    """A DNS domain name (lower-cased), optionally with a leading '.' or '*.' wildcard."""

    @classmethod
    def parse(cls, value: Any) -> Domain:
        if not isinstance(value, str):
            raise ValueError(f"expected a domain name, got {value!r}")
        v = value.strip().lower().rstrip(".")
        bare = v[2:] if v.startswith("*.") else v[1:] if v.startswith(".") else v
        label = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
        if not re.fullmatch(rf"{label}(\.{label})*", bare) or len(bare) > 253:
            raise ValueError(f"not a valid domain name: {value!r}")
        return cls(v)


_PARSERS = {Size: Size.parse, Duration: Duration.parse, Network: Network.parse,
            HostPort: HostPort.parse, Domain: Domain.parse}


# --- sections -----------------------------------------------------------------------

@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class TLSConfig:
    # PEM files. Empty: a self-signed certificate is made once under the spool, so
    # STARTTLS works out of the box (clients will not verify it: configure a real one).
    cert_file: str = ""
    key_file: str = ""
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    address: HostPort
    # mta: port 25 style; submission: AUTH required to relay; smtps: submission over
    # implicit TLS (port 465, RFC 8314).
    role: Literal["mta", "submission", "smtps"] = "mta"
    proxy_protocol: bool = False
    starttls: bool = True


@dataclass(frozen=True)
class ProxyProtocolConfig:
    # Only these peers may send a PROXY header; anyone else is disconnected.
    trusted: tuple[Network, ...] = ()
    timeout: Duration = Duration(5)
    max_header: Size = Size(536)   # v1 is at most 107 bytes; v2 16 + TLVs


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: Size = Size(50 * 1024 * 1024)
    max_recipients: int = 1000
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # RFC 5321 4.5.3.2: 5 minutes for commands, 10 for DATA blocks.
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(600)
    # A TLS handshake (STARTTLS or implicit) must finish within this, or the slot is freed.
    tls_handshake_timeout: Duration = Duration(10)
    # Smuggling defence (as Postfix's smtpd_forbid_bare_newline): reject a bare CR
    # or LF in DATA; 'normalize' turns them into CRLF instead.
    bare_newline: Literal["reject", "normalize"] = "reject"
    max_errors: int = 20
    banner: str = "ESMTP relay"
    # Commands sent before our greeting (RFC 5321 4.3.1; spambots) are refused.
    reject_early_talkers: bool = True


@dataclass(frozen=True)
class AccessConfig:
    # Postfix's mynetworks: clients here may relay anywhere. Loopback by default.
    mynetworks: tuple[Network, ...] = (Network.parse("127.0.0.0/8"), Network.parse("::1/128"))
    # Recipient domains we accept mail for from anyone ('.example.com' = subdomains).
    relay_domains: tuple[Domain, ...] = ()


@dataclass(frozen=True)
class AuthConfig:
    # Lines 'user:$scrypt$...' made with `relay passwd`. Empty: no AUTH offered.
    users_file: str = ""


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "./var/spool"
    # Messages are buffered in memory up to this size, then spilled to a file.
    spill_threshold: Size = Size(256 * 1024)
    # Sum of all in-memory DATA buffers; beyond it new data spills to files.
    memory_budget: Size = Size(64 * 1024 * 1024)
    segment_size: Size = Size(64 * 1024 * 1024)
    # Refuse mail (452 4.3.1) when the spool's filesystem has less free space.
    min_free_space: Size = Size(100 * 1024 * 1024)
    # Max time a 250 waits to share an fdatasync with other sessions (group commit).
    commit_delay: Duration = Duration(0.0)


@dataclass(frozen=True)
class TransportRoute:
    # Recipient domain ('example.com', '.example.com' or '*.example.com' for subdomains)
    domain: Domain
    # 'host:port' (MX lookup on host) or '[host]:port' (no MX lookup).
    nexthop: str


@dataclass(frozen=True)
class DomainTLSPolicy:
    domain: Domain
    policy: Literal["none", "may", "encrypt", "verify"]


@dataclass(frozen=True)
class DeliveryConfig:
    enabled: bool = True
    # Smarthosts tried in order ('[host]:port' = no MX lookup).
    relayhost: tuple[str, ...] = ()
    relayhost_username: str = ""
    relayhost_password: str = ""
    transport: tuple[TransportRoute, ...] = ()
    # DNS resolvers for MX lookups ('host:port'); empty = the system's.
    resolvers: tuple[HostPort, ...] = ()
    dns_timeout: Duration = Duration(10)
    tls_policy: Literal["none", "may", "encrypt", "verify"] = "may"
    tls_policies: tuple[DomainTLSPolicy, ...] = ()
    mta_sts: bool = True
    ca_file: str = ""
    helo_name: str = ""
    max_connections: int = 100
    max_connections_per_destination: int = 10
    # Messages per second to one destination; 0 = no limit.
    rate_per_destination: float = 0.0
    connect_timeout: Duration = Duration(30)
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(600)
    # Seconds between attempts; the last value repeats. Each wait gets +-jitter.
    retry_schedule: tuple[Duration, ...] = (Duration(60), Duration(300), Duration(900),
                                            Duration(1800), Duration(3600))
    retry_jitter: float = 0.1
    max_queue_lifetime: Duration = Duration(5 * 86400)
    delay_warning: Duration = Duration(4 * 3600)
    max_received_headers: int = 50
    # Port used for MX hosts (25 in production; tests point it at a loopback sink).
    smtp_port: int = 25
    bounce_sender: str = "MAILER-DAEMON"
    # Reuse a connection for this many messages to the same next hop.
    max_messages_per_connection: int = 100


@dataclass(frozen=True)
class FilterConfig:
    # Built-in name (size, spf, dkim, ...) or a `relay.filters` entry point.
    name: str
    # When the filter raises or times out: tempfail (451 4.3.0), or let mail pass.
    on_error: Literal["tempfail", "continue"] = "tempfail"
    timeout: Duration = Duration(30)
    # Everything else is the filter's own settings, validated by the filter.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HTTPConfig:
    address: HostPort = HostPort.parse("127.0.0.1:9325")
    # /readyz fails when the spool's filesystem has less free space than this.
    min_free_space: Size = Size(200 * 1024 * 1024)


@dataclass(frozen=True)
class QuarantineUser:
    name: str
    # '$scrypt$...' hash from `relay passwd`.
    password_hash: str
    # Addresses whose quarantined mail this user sees; admins see everything.
    addresses: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class QuarantineConfig:
    path: str = "./var/quarantine"
    retention: Duration = Duration(30 * 86400)
    imap_address: HostPort | None = HostPort.parse("127.0.0.1:1143")
    imaps_address: HostPort | None = None
    pop3_address: HostPort | None = HostPort.parse("127.0.0.1:1110")
    pop3s_address: HostPort | None = None
    users: tuple[QuarantineUser, ...] = ()
    users_file: str = ""
    # POP3 DELE: 'discard' deletes the message; 'hide' only hides it from POP3.
    pop3_delete: Literal["discard", "hide"] = "discard"
    # Passwords before TLS (IMAP LOGIN, POP3 USER/PASS) are refused except from
    # loopback; true allows them from anywhere (behind a TLS-terminating proxy only).
    cleartext_login: bool = False
    digest_interval: Duration = Duration(0)
    digest_from: str = ""
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class Config:
    hostname: str = ""
    log: LogConfig = LogConfig()
    tls: TLSConfig = TLSConfig()
    listeners: tuple[ListenerConfig, ...] = (
        ListenerConfig(name="mta", address=HostPort.parse("127.0.0.1:2525"), role="mta"),
        ListenerConfig(name="submission", address=HostPort.parse("127.0.0.1:2587"),
                       role="submission"),
    )
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    smtp: SMTPConfig = SMTPConfig()
    access: AccessConfig = AccessConfig()
    auth: AuthConfig = AuthConfig()
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    filters: tuple[FilterConfig, ...] = (FilterConfig(name="size"),)
    http: HTTPConfig = HTTPConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    # Worker processes sharing the listening sockets; 0 = one per CPU this process may
    # use (affinity, cgroup quota: relay.workers.available_cpus).
    workers: int = 1

    @property
    def fqdn(self) -> str:
        return self.hostname or socket.getfqdn() or "localhost"


# --- the loader -----------------------------------------------------------------------

def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp in _PARSERS:
        try:
            return _PARSERS[tp](value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**kwargs)


def _apply_env(data: dict, environ: Mapping[str, str]) -> dict:
    for var, raw in sorted(environ.items()):
        if not var.startswith("RELAY_") or var in ("RELAY_CONFIG",):
            continue
        path = [p.lower() for p in var[len("RELAY_"):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{var}: not a valid YAML value ({e})") from None
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def _check(cfg: Config) -> None:
    """Rules across keys, each named by the key that breaks it."""
    for i, n in enumerate(cfg.access.mynetworks):
        if n.net.prefixlen == 0:
            raise ConfigError(f"access.mynetworks[{i}]: {n} would make an open relay")
    for i, n in enumerate(cfg.proxy_protocol.trusted):
        if n.net.prefixlen == 0:
            raise ConfigError(f"proxy_protocol.trusted[{i}]: {n} trusts every peer")
    names, addrs = set(), set()
    for i, lst in enumerate(cfg.listeners):
        if lst.name in names:
            raise ConfigError(f"listeners[{i}].name: duplicate listener name {lst.name!r}")
        if lst.address in addrs:
            raise ConfigError(f"listeners[{i}].address: {lst.address} is used twice")
        names.add(lst.name)
        addrs.add(lst.address)
        if lst.proxy_protocol and not cfg.proxy_protocol.trusted:
            raise ConfigError(f"listeners[{i}].proxy_protocol: no proxy_protocol.trusted "
                              "networks are configured, so no client could connect")
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        raise ConfigError("tls.key_file: cert_file and key_file must be set together")
    for key in ("cert_file", "key_file"):
        p = getattr(cfg.tls, key)
        if p and not Path(p).is_file():
            raise ConfigError(f"tls.{key}: no such file: {p}")
    if cfg.auth.users_file and not Path(cfg.auth.users_file).is_file():
        raise ConfigError(f"auth.users_file: no such file: {cfg.auth.users_file}")
    if cfg.smtp.max_recipients < 1:
        raise ConfigError("smtp.max_recipients: must be at least 1")
    if not cfg.delivery.retry_schedule:
        raise ConfigError("delivery.retry_schedule: needs at least one interval")
    from relay.smtp.auth import is_valid_hash  # the one place that knows hash formats
    for i, u in enumerate(cfg.quarantine.users):
        if not is_valid_hash(u.password_hash):
            raise ConfigError(f"quarantine.users[{i}].password_hash: not a hash made by "
                              "`relay passwd` ($scrypt$...)")
    for i, f in enumerate(cfg.filters):
        if not f.name:
            raise ConfigError(f"filters[{i}].name: must not be empty")


def load(path: str | os.PathLike | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate. Raises ConfigError."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _apply_env(data, os.environ if environ is None else environ)
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


def parse_section(cls: type, data: Any, key: str) -> Any:
    """Validate a filter's own options block with the same rules as the main config."""
    return _build(cls, data if data is not None else {}, key)
