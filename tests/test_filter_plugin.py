"""Third-party filters end to end: installed as packages, loaded by entry point, run by
the real relay process over SMTP.

examples/relay-filter-example is built and installed with pip (offline, into a
directory put on the relay's PYTHONPATH) exactly as an operator would install a plugin;
a second package made here holds filters that misbehave on purpose (raise, hang), to
show the chain turns them into 451 4.3.0 (or lets mail pass with on_error: continue)
without harming the session.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests._relay import ROOT, RelayProcess

EXAMPLE = ROOT / "examples" / "relay-filter-example"

# Test-only filters: `raiser` raises at MAIL for senders starting with "boom", `sleeper`
# hangs at RCPT for recipients starting with "slow" (the chain's timeout must cut it).
MISBEHAVING_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "relay-filter-misbehaving"
version = "0.0.1"

[project.entry-points."relay.filters"]
raiser = "relay_filter_misbehaving:Raiser"
sleeper = "relay_filter_misbehaving:Sleeper"
needsdep = "relay_filter_needsdep:Filter"
notafilter = "relay_filter_misbehaving:NotAFilter"
badinit = "relay_filter_misbehaving:BadInit"

[tool.setuptools]
py-modules = ["relay_filter_misbehaving", "relay_filter_needsdep"]
"""

MISBEHAVING_MODULE = '''\
"""Filters that fail on purpose, for the chain's error handling."""
import asyncio

from relay.pipeline.protocol import CONTINUE, Filter, Stage


class Raiser(Filter):
    name = "raiser"
    stages = frozenset({Stage.MAIL})

    async def on_mail(self, ctx):
        if ctx.mail_from.startswith("boom"):
            raise RuntimeError("raiser exploded on purpose")
        return CONTINUE


class Sleeper(Filter):
    name = "sleeper"
    stages = frozenset({Stage.RCPT})

    async def on_rcpt(self, ctx, rcpt):
        if rcpt.startswith("slow"):
            await asyncio.sleep(3600)
        return CONTINUE


class NotAFilter:
    def __init__(self, options, env):
        pass


class BadInit(Filter):
    name = "badinit"

    def __init__(self, options, env):
        raise ValueError("threshold must be positive")
'''

# A plugin whose own dependency is not installed.
NEEDSDEP_MODULE = "import no_such_library_for_relay_tests  # noqa: F401\n"


def pip_install(src: Path, target: Path) -> None:
    """Build and install a filter package offline, as the README tells operators to."""
    # Build from a copy: setuptools leaves build/ and *.egg-info beside the sources.
    work = target.parent / f"src-{src.name}"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                             "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
         "--no-index", "--target", str(target), str(work)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install {src.name} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("plugins")
    bad = base / "relay-filter-misbehaving"
    bad.mkdir()
    (bad / "pyproject.toml").write_text(MISBEHAVING_PYPROJECT)
    (bad / "relay_filter_misbehaving.py").write_text(MISBEHAVING_MODULE)
    (bad / "relay_filter_needsdep.py").write_text(NEEDSDEP_MODULE)
    target = base / "site"
    pip_install(EXAMPLE, target)
    pip_install(bad, target)
    # What pip wrote is a real distribution: metadata with the entry points.
    eps = (next(target.glob("relay_filter_example-*.dist-info")) / "entry_points.txt").read_text()
    assert "[relay.filters]" in eps and "example = relay_filter_example:SubjectFilter" in eps
    return target


class PluginRelay(RelayProcess):
    """The relay process with the plugin directory on its import path."""

    def __init__(self, tmp_path: Path, config: dict, site: Path | None, start: bool = True):
        self.site = site
        super().__init__(tmp_path, config, start=start)

    def python_path(self) -> list[str]:
        # The plugin directory after the source tree.
        return super().python_path() + ([str(self.site)] if self.site else [])


def conf(*filters: dict) -> dict:
    return {"delivery": {"enabled": False}, "filters": list(filters)}


MSG = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: %s\r\nMessage-ID: <%d@x.test>\r\n\r\nbody\r\n"


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- the example filter -----------------------------------------------------------------

def test_example_filter_loaded_by_entry_point_tags_and_rejects(tmp_path, plugins):
    example = {"name": "example",
               "options": {"reject_subject": r"buy\s+now", "tag": "seen by example"}}
    with PluginRelay(tmp_path, conf({"name": "size"}, example), plugins) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("client.test")
            s.mail("a@x.test")
            s.rcpt("b@y.test")
            code, msg = s.data(MSG % (b"hello", 1))
            assert code == 250, msg
            qid = msg.split()[-1].decode()
            s.mail("a@x.test")
            s.rcpt("b@y.test")
            code, msg = s.data(MSG % (b"Please BUY   now!", 2))
            # The generic text: the sender does not learn the pattern.
            assert (code, msg) == (550, b"5.7.1 Message content rejected")
            assert s.noop()[0] == 250      # the session goes on
        assert r.stop() == 0
        queued = r.queued()
        assert list(queued) == [qid]
        head = queued[qid][1].split(b"\r\n\r\n")[0]
        assert b"\r\nX-Example-Filter: seen by example\r\n" in b"\r\n" + head + b"\r\n"
        assert "filter example: reject at data" in r.log()


def test_without_the_package_the_name_is_unknown(tmp_path):
    r = PluginRelay(tmp_path, conf({"name": "example"}), None, start=False)
    proc = subprocess.run([sys.executable, "-m", "relay", "check-config", str(r.config_path)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "filters[0].name" in proc.stderr and "'example'" in proc.stderr


def test_example_options_are_validated_naming_the_key(tmp_path, plugins):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugins)])}
    for i, (options, expect) in enumerate([
            ({"colour": "red"}, "filters[1].options: colour: unknown key"),
            ({"reject_subject": "(unclosed"}, "filters[1].options: reject_subject: bad pattern"),
            ({"header": "Bad Name:"}, "filters[1].options: header: not a header field name"),
            ({"tag": 5}, "filters[1].options: tag: expected a string")]):
        d = tmp_path / str(i)
        d.mkdir()
        r = PluginRelay(d, conf({"name": "size"}, {"name": "example", "options": options}),
                        plugins, start=False)
        proc = subprocess.run([sys.executable, "-m", "relay", "check-config",
                               str(r.config_path)],
                              cwd=d, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout
        assert expect in proc.stderr, proc.stderr


# --- unknown names, raising and hanging filters ----------------------------------------

def test_unknown_filter_name_stops_serve_before_listening(tmp_path, plugins):
    r = PluginRelay(tmp_path, conf({"name": "size"}, {"name": "nosuch"}), plugins, start=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugins)])}
    for args in (["check-config", str(r.config_path)], ["serve", "-c", str(r.config_path)]):
        proc = subprocess.run([sys.executable, "-m", "relay", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "config error: filters[1].name: no filter called 'nosuch'" in proc.stderr
    # Refused before the spool was opened (serve only makes its directory).
    spool = tmp_path / "spool"
    assert not spool.exists() or not any(spool.iterdir())


@pytest.mark.parametrize("name", ["needsdep", "notafilter", "badinit"])
def test_broken_plugin_is_a_config_error_naming_the_entry(tmp_path, plugins, name):
    r = PluginRelay(tmp_path, conf({"name": "size"}, {"name": name}), plugins, start=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugins)])}
    proc = subprocess.run([sys.executable, "-m", "relay", "check-config", str(r.config_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2 and "config error: filters[1]" in proc.stderr, proc.stderr


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
def test_raising_filter_tempfails_or_passes_and_the_session_survives(tmp_path, plugins,
                                                                     on_error):
    with PluginRelay(tmp_path, conf({"name": "raiser", "on_error": on_error}), plugins) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port) as s:
            s.ehlo("client.test")
            code, msg = s.mail("boom@x.test")
            if on_error == "tempfail":
                assert (code, msg) == (451, b"4.3.0 Error: local error in processing, "
                                            b"try again later")
                # Same connection, a sender the filter does not choke on.
                assert s.mail("fine@x.test")[0] == 250
            else:
                assert code == 250, msg
            s.rcpt("b@y.test")
            code, msg = s.data(MSG % (b"after the crash", 3))
            assert code == 250, msg
        assert metric(r.http_port, 'relay_filter_errors_total{filter="raiser",kind="error"}') == 1
        assert r.stop() == 0
        log = r.log()
        assert "filter raiser failed at mail (error: raiser exploded on purpose)" in log
        assert len(r.queued()) == 1


@pytest.mark.parametrize("on_error", ["tempfail", "continue"])
def test_hanging_filter_times_out_to_tempfail_or_pass(tmp_path, plugins, on_error):
    cfg = conf({"name": "sleeper", "timeout": 0.3, "on_error": on_error})
    with PluginRelay(tmp_path, cfg, plugins) as r:
        with smtplib.SMTP("127.0.0.1", r.smtp_port, timeout=60) as s:
            s.ehlo("client.test")
            s.mail("a@x.test")
            code, msg = s.rcpt("slow@y.test")
            if on_error == "tempfail":
                assert (code, msg) == (451, b"4.3.0 Error: local error in processing, "
                                            b"try again later")
                assert s.rcpt("quick@y.test")[0] == 250
            else:
                assert code == 250, msg
            code, msg = s.data(MSG % (b"patience", 4))
            assert code == 250, msg
        assert metric(r.http_port,
                      'relay_filter_errors_total{filter="sleeper",kind="timeout"}') == 1
        assert r.stop() == 0
        assert "filter sleeper failed at rcpt (timeout" in r.log()
        (env, _), = r.queued().values()
        want = ["slow@y.test"] if on_error == "continue" else ["quick@y.test"]
        assert [x.address for x in env.recipients] == want


def test_readme_section_names_the_real_commands():
    """The docs the lead pastes into the README must match what the tests do."""
    text = (EXAMPLE / "README.md").read_text()
    for needle in ('[project.entry-points."relay.filters"]', "relay.pipeline.protocol",
                   "Verdict.reject", "pip install", "on_error", "timeout"):
        assert needle in text, needle
