"""TLS contexts: the server side for STARTTLS/SMTPS, the client side for delivery.

Takes the `tls` config section (PEM cert_file/key_file, min_version) and the spool
directory; hands on ssl.SSLContext objects for the listeners and the SMTP client.
With no certificate configured, a self-signed one for the relay's hostname is made
once under `<spool>/tls/` (key mode 0600) and reused, so STARTTLS works out of the
box; clients will not verify it, which opportunistic SMTP TLS accepts (RFC 7435).

Trusts the configured files (they are the operator's); a generated pair that no longer
loads, has expired or names another host is replaced. Generation is locked with flock
so worker processes starting together agree on one pair.

RFCs: 3207 (STARTTLS), 8314 (implicit TLS for submission), 8996 (no TLS < 1.2),
7435 (opportunistic security), 5280 (the certificate profile).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.config import TLSConfig
from relay.durable import write_atomic

log = logging.getLogger("relay.tls")

# Forward secrecy and AEAD first; CBC-SHA suites stay for old MTAs because on port 25
# a weaker cipher is still better than the plain text the peer would fall back to.
# TLS 1.3 suites are not governed by this string (OpenSSL keeps its safe defaults).
SERVER_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:"
                  "!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1+DHE")

SELF_SIGNED_CERT = "selfsigned-cert.pem"
SELF_SIGNED_KEY = "selfsigned-key.pem"
_VALID_DAYS = 3650
_RENEW_BEFORE = datetime.timedelta(days=30)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(cfg: TLSConfig, spool_dir: str | os.PathLike,
                   hostname: str = "localhost") -> ssl.SSLContext:
    """A server context from cfg's files, or from a self-signed pair for `hostname`."""
    if cfg.cert_file or cfg.key_file:
        cert, key = Path(cfg.cert_file), Path(cfg.key_file)
    else:
        cert, key = ensure_self_signed(Path(spool_dir) / "tls", hostname)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.set_ciphers(SERVER_CIPHERS)
    # No compression (CRIME), no renegotiation (a cheap CPU DoS), our cipher order.
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    ctx.verify_mode = ssl.CERT_NONE  # client certificates are not used for relaying
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """A context for outbound SMTP; TLS >= 1.2 always.

    verify=True checks the chain (against ca_file alone when given, else the system
    store) and the host name passed as server_hostname; verify=False encrypts without
    checking, as opportunistic STARTTLS does (RFC 7435).
    """
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


# --- the self-signed default ------------------------------------------------------------

def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) under `directory`, making them if missing, stale or broken."""
    hostname = hostname.strip().rstrip(".") or "localhost"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = directory / SELF_SIGNED_CERT, directory / SELF_SIGNED_KEY
    with open(directory / ".lock", "a") as lock:
        # Several workers may start at once: one generates, the others then reuse.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _usable(cert, key, hostname):
                _generate(cert, key, hostname)
                log.info("made a self-signed certificate for %s in %s", hostname, directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cert, key


def _usable(cert: Path, key: Path, hostname: str) -> bool:
    if not (cert.is_file() and key.is_file()):
        return False
    try:
        crt = x509.load_pem_x509_certificate(cert.read_bytes())
        names = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (ValueError, OSError, ssl.SSLError, x509.ExtensionNotFound):
        return False
    now = datetime.datetime.now(datetime.UTC)
    if crt.not_valid_after_utc - _RENEW_BEFORE < now:
        return False
    wanted = _san(hostname)
    return wanted in list(names)


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _generate(cert: Path, key: Path, hostname: str) -> None:
    # RSA 2048 rather than ECDSA: every SMTP peer, however old, can use it.
    pkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # A CN is at most 64 characters (RFC 5280 ub-common-name); the SAN has the full name.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(pkey, hashes.SHA256())
    )
    key_pem = pkey.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    # Key first: a crash between the two leaves a new key with an old cert, which
    # _usable() refuses (they no longer match), so the next start regenerates both.
    write_atomic(key, key_pem, 0o600)
    write_atomic(cert, crt.public_bytes(serialization.Encoding.PEM), 0o644)


