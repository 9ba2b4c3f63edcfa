"""SMTP AUTH primitives: hashes, users file, Authenticator throttle, SASL decoders."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import smtplib
import socket
import threading

import pytest
from aiosmtpd.handlers import Sink
from aiosmtpd.smtp import SMTP, AuthResult
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp import auth
from relay.smtp.auth import (
    AuthCancelled,
    Authenticator,
    AuthSyntaxError,
    LoginSASL,
    LoginState,
    decode_plain,
    hash_password,
    load_users,
    parse_login_password,
    parse_login_user,
    parse_plain,
    sanitize_for_header,
    verify_password,
)

# One real hash for the whole module: scrypt is deliberately slow.
PW = "correct horse battery staple"
HASH = hash_password(PW)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


# --- hashes ------------------------------------------------------------------------------

def test_hash_format_and_verify():
    parts = HASH.split("$")
    assert parts[:3] == ["", "scrypt", "n=16384,r=8,p=1"]
    assert len(base64.b64decode(parts[3])) == 16
    assert len(base64.b64decode(parts[4])) == 32
    assert verify_password(PW, HASH)
    assert not verify_password(PW + " ", HASH)
    assert not verify_password("", HASH)


def test_hash_is_plain_scrypt_of_the_salt():
    # Interoperable: anyone with hashlib can make or check these.
    _, _, _, salt, dk = HASH.split("$")
    want = hashlib.scrypt(PW.encode(), salt=base64.b64decode(salt), n=16384, r=8, p=1,
                          dklen=32)
    assert base64.b64decode(dk) == want


def test_salts_differ():
    assert hash_password("x") != hash_password("x")


def test_unpadded_base64_is_accepted():
    _, _, params, salt, dk = HASH.split("$")
    assert verify_password(PW, f"${'scrypt'}${params}${salt.rstrip('=')}${dk.rstrip('=')}")


def test_non_ascii_password():
    h = hash_password("pässwörd✓")
    assert verify_password("pässwörd✓", h) and not verify_password("passwörd✓", h)


@pytest.mark.parametrize("stored", [
    "", "plaintext", "$2b$12$abcdefghijklmnopqrstuv", "$scrypt$", "$scrypt$n=16384,r=8,p=1$",
    HASH.replace("$scrypt$", "$SCRYPT$"),
    HASH.replace("n=16384", "n=16383"),            # not a power of two
    HASH.replace("n=16384", "n=1048576"),           # 1 GiB: refused, not attempted
    HASH.replace("r=8,p=1", "r=8,p=0"),
    HASH.replace("r=8,p=1", "r=8"),
    HASH.replace("r=8,p=1", "r=8,p=1,p=1"),
    HASH.replace("r=8,p=1", "r=8,q=1"),
    HASH.replace("n=16384", "n=+16384"),
    HASH + "$extra",
    HASH[:-6] + "!!!!==",                           # not base64
    HASH.rsplit("$", 1)[0] + "$" + b64(b"short"),  # derived key too short
    None, 42,
])
def test_unknown_or_broken_formats_are_false(stored):
    assert verify_password(PW, stored) is False
    assert not auth.is_valid_hash(stored)


# --- users file ---------------------------------------------------------------------------

def test_load_users(tmp_path):
    f = tmp_path / "users"
    f.write_text(f"# submission users\n\nalice:{HASH}\n  bob : {HASH}  \n", encoding="utf-8")
    assert load_users(f) == {"alice": HASH, "bob": HASH}


@pytest.mark.parametrize("line", [
    "alice", f":{HASH}", "alice:plaintext", f"al ice:{HASH}", f"al\tice:{HASH}",
])
def test_load_users_bad_line_names_line_number(tmp_path, line):
    f = tmp_path / "users"
    f.write_text(f"# header\nok:{HASH}\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":3: "):
        load_users(f)


def test_load_users_duplicate(tmp_path):
    f = tmp_path / "users"
    f.write_text(f"a:{HASH}\na:{HASH}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r":2: duplicate"):
        load_users(f)


# --- Authenticator --------------------------------------------------------------------------

def test_check_runs_in_a_thread_and_answers(monkeypatch):
    a = Authenticator({"alice": HASH})
    seen = []
    real = auth.verify_password

    def spy(pw, stored):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(pw, stored)

    monkeypatch.setattr(auth, "verify_password", spy)

    async def main():
        return [await a.check("alice", PW), await a.check("alice", "nope"),
                await a.check("mallory", PW)]

    assert asyncio.run(main()) == [True, False, False]
    # All three ran scrypt, and none on the event loop's thread; the unknown user too
    # (so its timing matches a known one).
    assert seen == [False, False, False]


def test_check_does_not_block_the_loop():
    a = Authenticator({"alice": HASH})

    async def main():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        ok = await a.check("alice", PW)
        done = True
        await t
        return ok, ticks

    ok, ticks = asyncio.run(main())
    assert ok and ticks > 1  # the loop kept running other tasks during the hash


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_grows_caps_and_clears():
    clock = Clock()
    a = Authenticator({}, base_delay=1, max_delay=8, window=60, clock=clock)
    assert a.delay_for("192.0.2.1") == 0
    delays = []
    for _ in range(6):
        a.record_failure("192.0.2.1")
        delays.append(a.delay_for("192.0.2.1"))
    assert delays == [1, 2, 4, 8, 8, 8]
    assert a.delay_for("192.0.2.2") == 0  # other clients are unaffected
    a.record_success("192.0.2.1")
    assert a.delay_for("192.0.2.1") == 0


def test_throttle_forgets_after_quiet_window():
    clock = Clock()
    a = Authenticator({}, base_delay=1, window=60, clock=clock)
    for _ in range(3):
        a.record_failure("192.0.2.1")
    clock.now += 59
    assert a.delay_for("192.0.2.1") == 4
    clock.now += 61
    assert a.delay_for("192.0.2.1") == 0
    a.record_failure("192.0.2.1")
    assert a.delay_for("192.0.2.1") == 1


def test_throttle_groups_ipv6_by_64():
    a = Authenticator({}, base_delay=1, clock=Clock())
    a.record_failure("2001:db8:1:2::1")
    a.record_failure("2001:db8:1:2:ffff::9")
    assert a.delay_for("2001:db8:1:2::abcd") == 2
    assert a.delay_for("2001:db8:1:3::1") == 0
    a.record_failure("::ffff:192.0.2.7")
    assert a.delay_for("192.0.2.7") == 1


def test_throttle_memory_is_bounded():
    a = Authenticator({}, base_delay=1, max_tracked=100, clock=Clock())
    a.record_failure("198.51.100.1")
    for i in range(1000):
        a.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert len(a.throttle._failures) == 100
    assert a.delay_for("198.51.100.1") == 0  # the oldest was evicted
    assert a.delay_for("10.0.3.231") == 1     # the newest is remembered


def test_attempt_records_and_waits_only_on_failure(monkeypatch):
    clock = Clock()
    a = Authenticator({"alice": HASH}, base_delay=0.01, clock=clock)
    slept = []
    real_sleep = asyncio.sleep

    async def fake_sleep(d):
        slept.append(d)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)

    async def main():
        return (await a.attempt("192.0.2.9", "alice", "bad"),
                await a.attempt("192.0.2.9", "alice", "bad"),
                await a.attempt("192.0.2.9", "alice", PW))

    assert asyncio.run(main()) == (False, False, True)
    assert slept == [0.01, 0.02]
    assert a.delay_for("192.0.2.9") == 0


def test_from_file(tmp_path):
    f = tmp_path / "u"
    f.write_text(f"alice:{HASH}\n", encoding="utf-8")
    assert Authenticator.from_file(f)
    assert not Authenticator({})


# --- SASL PLAIN ---------------------------------------------------------------------------

def test_plain():
    assert decode_plain(b64(b"\0alice\0s3cret")) == ("", "alice", "s3cret")
    assert decode_plain(b64(b"admin\0alice\0s3cret")) == ("admin", "alice", "s3cret")
    assert decode_plain(b64("\0jörg\0pä ss".encode())) == ("", "jörg", "pä ss")


@pytest.mark.parametrize("text", [
    "", "=", "!!!!", "AGFsaWNlAHMzY3JldA",      # missing padding
    "AGFs aWNlAHMzY3JldA==",                    # space inside
    b64(b"alice\0s3cret"), b64(b"\0alice\0s3cret\0x"), b64(b"\0\0s3cret"),
    b64(b"\0alice\0"), b64(b"\0al\r\nice\0pw"), b64(b"x\nMAIL\0alice\0pw"),
    b64(b"\0\xff\xfe\0pw"), b64(b"\0" + b"a" * 256 + b"\0pw"), "A" * 20000,
])
def test_plain_malformed(text):
    with pytest.raises(AuthSyntaxError):
        decode_plain(text)


def test_decoded_forms_for_aiosmtpd_challenge_auth():
    assert parse_plain(b"\0alice\0pw") == ("", "alice", "pw")
    assert parse_login_user("jörg".encode()) == "jörg"
    assert parse_login_password(b"") == ""
    for bad in (b"\0al\rice\0pw", b"alice\0pw"):
        with pytest.raises(AuthSyntaxError):
            parse_plain(bad)
    for bad in (b"", b"a\nb", b"\xff", b"a" * 256):
        with pytest.raises(AuthSyntaxError):
            parse_login_user(bad)


def test_plain_cancel():
    with pytest.raises(AuthCancelled):
        decode_plain("*")


@given(st.text(max_size=80))
@settings(max_examples=300)
def test_plain_any_text_only_auth_syntax_error(text):
    try:
        authzid, user, pw = decode_plain(text)
    except AuthSyntaxError:
        return
    assert user and pw and not set("\r\n\0") & set(user + authzid)


@given(st.binary(max_size=80))
@settings(max_examples=300)
def test_plain_any_bytes_only_auth_syntax_error(raw):
    try:
        decode_plain(b64(raw))
    except AuthSyntaxError:
        pass


# --- SASL LOGIN -----------------------------------------------------------------------------

def test_login_exchange():
    s = LoginSASL()
    assert s.challenge == "VXNlcm5hbWU6"
    assert base64.b64decode(s.challenge) == b"Username:"
    assert s.feed(b64(b"alice")) == "UGFzc3dvcmQ6"
    assert base64.b64decode(s.challenge) == b"Password:"
    assert s.feed(b64(b"s3cret")) is None
    assert s.state is LoginState.DONE and s.credentials == ("alice", "s3cret")
    with pytest.raises(AuthSyntaxError):
        s.feed(b64(b"more"))


def test_login_with_initial_response():
    s = LoginSASL(b64(b"alice"))
    assert s.challenge == "UGFzc3dvcmQ6"
    s.feed(b64(b"pw"))
    assert s.credentials == ("alice", "pw")


def test_login_incomplete_has_no_credentials():
    with pytest.raises(RuntimeError):
        LoginSASL().credentials  # noqa: B018


@pytest.mark.parametrize("user", ["=", "%%%", b64(b"al\nice"), b64(b"a\0b"), b64(b"\xc3")])
def test_login_bad_user(user):
    with pytest.raises(AuthSyntaxError):
        LoginSASL().feed(user)
    with pytest.raises(AuthSyntaxError):
        LoginSASL(user)


def test_login_cancel_at_password():
    s = LoginSASL(b64(b"alice"))
    with pytest.raises(AuthCancelled):
        s.feed("*")


# --- header sanitising -------------------------------------------------------------------

def test_sanitize_for_header():
    assert sanitize_for_header("alice@example.com") == "alice@example.com"
    assert sanitize_for_header("a) (b\\c\r\nX-Evil: 1\0") == "abcX-Evil:1"
    assert sanitize_for_header("jörg") == "jrg"
    assert sanitize_for_header("x" * 100) == "x" * 64
    assert sanitize_for_header("x" * 100, max_len=8) == "x" * 8


@given(st.text())
def test_sanitize_never_lets_a_comment_break(s):
    out = sanitize_for_header(s)
    assert len(out) <= 64
    assert all(0x21 <= ord(c) < 0x7F and c not in "()\\" for c in out)


# --- end to end: aiosmtpd speaking AUTH through these primitives, real clients -----------

class AuthSMTP(SMTP):
    """The wiring the listener needs: aiosmtpd's verbs, our decoding and checking."""

    def __init__(self, handler, authn: Authenticator, **kw):
        super().__init__(handler, auth_require_tls=False, hostname="mx.relay.test",
                         authenticator=lambda *a: AuthResult(success=False, handled=False),
                         **kw)
        self.authn = authn

    async def _response(self, args, first_challenge: str) -> str:
        if len(args) > 1:
            return args[1]
        await self.push(f"334 {first_challenge}")
        return (await self._reader.readline()).decode("ascii", "replace")

    async def _finish(self, authzid: str, user: str, password: str) -> AuthResult:
        if authzid and authzid != user:
            return AuthResult(success=False, handled=False)
        ok = await self.authn.attempt(self.session.peer[0], user, password)
        # success=False must not be handled=True (aiosmtpd would send nothing: TESTING.md).
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    async def _syntax(self, e: AuthSyntaxError) -> AuthResult:
        if isinstance(e, AuthCancelled):
            await self.push("501 5.0.0 Authentication cancelled")
        else:
            await self.push("501 5.5.2 Cannot decode response")
        return AuthResult(success=False, handled=True)

    async def auth_PLAIN(self, _, args):
        try:
            authzid, user, password = decode_plain(await self._response(args, ""))
        except AuthSyntaxError as e:
            return await self._syntax(e)
        return await self._finish(authzid, user, password)

    async def auth_LOGIN(self, _, args):
        try:
            sasl = LoginSASL(args[1] if len(args) > 1 else None)
            challenge = sasl.challenge
            while challenge is not None:
                await self.push(f"334 {challenge}")
                challenge = sasl.feed((await self._reader.readline()).decode("ascii", "replace"))
        except AuthSyntaxError as e:
            return await self._syntax(e)
        user, password = sasl.credentials
        return await self._finish("", user, password)


def run_against_server(authn: Authenticator, client):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: AuthSMTP(Sink(), authn), "127.0.0.1", 0)
        async with server:
            return await asyncio.to_thread(client, server.sockets[0].getsockname()[1])
    return asyncio.run(main())


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smtplib_login(mech):
    authn = Authenticator({"alice": HASH}, base_delay=0.01)

    def client(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("c.test")
            s.user, s.password = "alice", PW
            code, _ = s.auth(mech, getattr(s, f"auth_{mech.lower()}"))
            return code

    assert run_against_server(authn, client) == 235


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smtplib_wrong_password_is_535_and_throttled(mech):
    authn = Authenticator({"alice": HASH}, base_delay=0.01)

    def client(port):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("c.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.user, s.password = "alice", "wrong"
                s.auth(mech, getattr(s, f"auth_{mech.lower()}"))
            return e.value.smtp_code

    assert run_against_server(authn, client) == 535
    assert authn.delay_for("127.0.0.1") == 0.01


def test_raw_dialogue_login_without_initial_response_and_bad_input():
    authn = Authenticator({"alice": HASH}, base_delay=0.01)

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            f = sock.makefile("rwb")

            def say(line: str) -> str:
                f.write(line.encode() + b"\r\n")
                f.flush()
                return f.readline().decode()

            replies = []
            f.readline()
            say("EHLO c.test")
            while not f.readline().startswith(b"250 "):
                pass
            replies.append(say("AUTH PLAIN !!!notbase64"))
            replies.append(say("AUTH LOGIN"))
            replies.append(say("*"))
            replies.append(say("AUTH LOGIN " + b64(b"al\nice")))
            replies.append(say("AUTH LOGIN"))
            replies.append(say(b64(b"alice")))
            replies.append(say(b64(PW.encode())))
            return replies

    r = run_against_server(authn, client)
    assert [x[:3] for x in r] == ["501", "334", "501", "501", "334", "334", "235"]
    assert r[1].strip() == "334 VXNlcm5hbWU6" and r[5].strip() == "334 UGFzc3dvcmQ6"


def test_dummy_hash_costs_a_real_check():
    # A dummy that verify_password rejected at parse time would answer unknown users
    # faster than known ones; it must be a well-formed hash nobody knows the password to.
    assert auth.is_valid_hash(auth.dummy_hash())
    assert auth.dummy_hash() == auth.dummy_hash()
    assert not verify_password("", auth.dummy_hash())
