"""TLS contexts: real handshakes on loopback with trustme certificates and the
self-signed default, plus STARTTLS through aiosmtpd and smtplib."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import smtplib
import ssl
import stat
import warnings
from pathlib import Path

import pytest
import trustme
from aiosmtpd.handlers import Sink
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.x509.oid import NameOID

from relay import tls
from relay.config import TLSConfig


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def files(ca, tmp_path):
    """A trustme CA file, and cert/key files for localhost and 127.0.0.1."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return str(cert), str(key), str(ca_file)


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                     server_hostname: str) -> str:
    """TLS over a real loopback socket; returns the negotiated version."""

    async def handle(reader, writer):
        data = await reader.readline()
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname)
        try:
            writer.write(b"ehlo\n")
            assert await reader.readline() == b"EHLO\n"
            return writer.get_extra_info("ssl_object").version()
        finally:
            writer.close()


def handshake(server_ctx, client_ctx, server_hostname="localhost") -> str:
    return asyncio.run(_handshake(server_ctx, client_ctx, server_hostname))


# --- configured certificate -------------------------------------------------------------

def test_configured_cert_verifies(files, tmp_path):
    cert, key, ca_file = files
    sctx = tls.server_context(TLSConfig(cert_file=cert, key_file=key), str(tmp_path))
    assert handshake(sctx, tls.client_context(True, ca_file)) in ("TLSv1.2", "TLSv1.3")
    assert not (tmp_path / "tls").exists()  # nothing generated when files are given


def test_verify_fails_for_unknown_ca_and_wrong_name(files, tmp_path):
    cert, key, ca_file = files
    sctx = tls.server_context(TLSConfig(cert_file=cert, key_file=key), str(tmp_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(sctx, tls.client_context(True))          # system store only
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(sctx, tls.client_context(True, ca_file), "mx.example.net")


def test_unverified_client_still_encrypts(files, tmp_path):
    cert, key, _ = files
    sctx = tls.server_context(TLSConfig(cert_file=cert, key_file=key), str(tmp_path))
    cctx = tls.client_context(False)
    assert cctx.verify_mode == ssl.CERT_NONE and not cctx.check_hostname
    assert handshake(sctx, cctx, "anything.example") in ("TLSv1.2", "TLSv1.3")


def test_client_refuses_below_tls12():
    for verify in (True, False):
        assert tls.client_context(verify).minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_will_not_speak_tls11(files, tmp_path):
    cert, key, _ = files
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    # A server that would speak TLS 1.0/1.1 (SECLEVEL=0 lifts OpenSSL's own floor), so
    # the refusal can only come from the client context.
    sctx.set_ciphers("ALL:@SECLEVEL=0")
    sctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(sctx, tls.client_context(False))


def test_min_version_tls13(files, tmp_path):
    cert, key, ca_file = files
    sctx = tls.server_context(TLSConfig(cert_file=cert, key_file=key, min_version="TLSv1.3"),
                              str(tmp_path))
    assert handshake(sctx, tls.client_context(True, ca_file)) == "TLSv1.3"
    old = tls.client_context(True, ca_file)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(sctx, old)


def test_server_tls12_offers_only_forward_secret_aead_or_cbc(files, tmp_path):
    cert, key, _ = files
    sctx = tls.server_context(TLSConfig(cert_file=cert, key_file=key), str(tmp_path))
    names = [c["name"] for c in sctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert names and all(n.startswith(("ECDHE-", "DHE-")) for n in names)
    assert not any("RC4" in n or "3DES" in n or "NULL" in n for n in names)


# --- the self-signed default ---------------------------------------------------------------

def test_self_signed_made_once_and_reused(tmp_path):
    spool = tmp_path / "spool"
    sctx = tls.server_context(TLSConfig(), str(spool), hostname="mx.relay.test")
    cert = spool / "tls" / tls.SELF_SIGNED_CERT
    key = spool / "tls" / tls.SELF_SIGNED_KEY
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    crt = x509.load_pem_x509_certificate(cert.read_bytes())
    assert crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mx.relay.test"
    san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.relay.test"]

    # The generated pair really serves: a client trusting exactly it verifies the name.
    assert handshake(sctx, tls.client_context(True, str(cert)), "mx.relay.test")

    before = (cert.read_bytes(), key.read_bytes())
    tls.server_context(TLSConfig(), str(spool), hostname="mx.relay.test")
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_self_signed_replaced_for_new_hostname_or_broken_key(tmp_path):
    tls.server_context(TLSConfig(), str(tmp_path), hostname="a.test")
    cert = tmp_path / "tls" / tls.SELF_SIGNED_CERT
    key = tmp_path / "tls" / tls.SELF_SIGNED_KEY
    first = cert.read_bytes()
    tls.server_context(TLSConfig(), str(tmp_path), hostname="b.test")
    second = cert.read_bytes()
    assert second != first
    key.write_text("garbage")
    sctx = tls.server_context(TLSConfig(), str(tmp_path), hostname="b.test")
    assert cert.read_bytes() != second
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert handshake(sctx, tls.client_context(True, str(cert)), "b.test")


def test_self_signed_for_an_ip_literal(tmp_path):
    sctx = tls.server_context(TLSConfig(), str(tmp_path), hostname="127.0.0.1")
    cert = tmp_path / "tls" / tls.SELF_SIGNED_CERT
    assert handshake(sctx, tls.client_context(True, str(cert)), "127.0.0.1")


# --- STARTTLS end to end: aiosmtpd serving our context, smtplib as the client ------------

def test_starttls_out_of_the_box(tmp_path):
    sctx = tls.server_context(TLSConfig(), str(tmp_path), hostname="mx.relay.test")

    def client(port: int) -> tuple[str, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.has_extn("starttls")
            s.starttls(context=tls.client_context(False))
            code, _ = s.ehlo("client.test")
            version = s.sock.version()
            s.sendmail("a@client.test", ["b@relay.test"], b"Subject: t\r\n\r\nhi\r\n")
            return version, code

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Sink(), hostname="mx.relay.test", tls_context=sctx),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await asyncio.to_thread(client, port)

    version, code = asyncio.run(main())
    assert code == 250 and version in ("TLSv1.2", "TLSv1.3")


def _make_in_worker(spool: str) -> bytes:
    tls.server_context(TLSConfig(), spool, hostname="mx.relay.test")
    return (Path(spool) / "tls" / tls.SELF_SIGNED_CERT).read_bytes()


def test_workers_starting_together_agree_on_one_pair(tmp_path):
    # Worker processes share the spool: each must end up serving the same certificate.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        certs = list(pool.map(_make_in_worker, [str(tmp_path)] * 3))
    assert certs[0] == certs[1] == certs[2]
    assert certs[0] == (tmp_path / "tls" / tls.SELF_SIGNED_CERT).read_bytes()
