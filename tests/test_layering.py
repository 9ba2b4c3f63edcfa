"""Layering: a filter sees the filter protocol and the config helpers, nothing else of ours.

DESIGN.md: filters import relay.pipeline.protocol, relay.config and libraries, never
relay.smtp, relay.queue, relay.delivery, relay.quarantine or another filter; the relay
depends on the protocol, never on a filter module. The checks walk each module's
imports with ast (static `import`/`from` statements at any depth, relative imports,
and importlib.import_module / __import__ with a constant name), then import each filter
alone in a fresh interpreter to catch what comes in indirectly.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILTERS = sorted(p for p in (ROOT / "filters").glob("*.py") if p.name != "__init__.py")
EXAMPLE = ROOT / "examples" / "relay-filter-example" / "relay_filter_example.py"

# What of ours a filter may import (the modules themselves, and names inside them).
ALLOWED = ("relay.config", "relay.pipeline.protocol")


def imported_modules(source: str, package: str = "filters") -> list[tuple[int, str]]:
    """(line, module) for every import in `source`, resolved to absolute dotted names.

    `from a.b import c` gives a.b.c, since c may be a submodule (`from relay import smtp`
    is an import of relay.smtp); a relative import is resolved against `package`.
    """
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if a.name != "*" else base)
                    for a in node.names]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def _ours(module: str) -> bool:
    return module.split(".")[0] in ("relay", "filters")


def _allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED)


def violations(source: str, package: str = "filters") -> list[str]:
    return [f"line {line}: {mod}" for line, mod in imported_modules(source, package)
            if _ours(mod) and not _allowed(mod)]


# --- the checker itself: it must catch what it is for -------------------------------

@pytest.mark.parametrize("snippet", [
    "from relay.smtp import session",
    "from relay.smtp.session import Session",
    "import relay.queue.spool",
    "from relay import delivery",
    "from relay import quarantine as q",
    "from relay.pipeline import chain",
    "from relay.metrics import FILTER_VERDICTS",
    "import relay",
    "import filters.dkim",
    "from filters import spf",
    "from . import spf",
    "from .dmarc import org_domain",
    "def f():\n    from relay.queue.model import Envelope\n",
    "import importlib\nimportlib.import_module('relay.quarantine.store')",
    "__import__('filters.spf')",
])
def test_checker_catches_forbidden_imports(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "from relay.pipeline.protocol import Filter, Verdict",
    "from relay.pipeline import protocol",
    "import relay.pipeline.protocol",
    "from relay.config import ConfigError, parse_section",
    "from relay import config",
    "import dkim\nimport dns.asyncresolver\nfrom publicsuffix2 import PublicSuffixList",
    "from __future__ import annotations\nimport re, asyncio",
])
def test_checker_allows_protocol_config_and_libraries(snippet):
    assert violations(snippet) == []


def test_relative_imports_resolve_against_the_package():
    assert imported_modules("from .x import y", "filters") == [(1, "filters.x.y")]
    assert imported_modules("from .. import z", "relay.pipeline") == [(1, "relay.z")]


# --- the real modules -----------------------------------------------------------------

def test_there_are_filters_to_check():
    names = {p.stem for p in FILTERS}
    assert {"size", "spf", "dkim", "dmarc", "routing", "access"} <= names


@pytest.mark.parametrize("path", FILTERS + [EXAMPLE], ids=lambda p: p.stem)
def test_filter_imports_only_protocol_config_and_libraries(path):
    assert violations(path.read_text(encoding="utf-8")) == [], path


@pytest.mark.parametrize("path", FILTERS, ids=lambda p: p.stem)
def test_filter_alone_pulls_in_nothing_else_of_ours(path):
    # Indirect imports too: what relay.config or the protocol import counts as well.
    code = (f"import sys, json; import filters.{path.stem}; "
            "print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('relay', 'filters'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    extra = {m for m in loaded if not _allowed(m)} - {
        "relay", "relay.pipeline", "filters", f"filters.{path.stem}"}
    assert extra == set()


def test_the_relay_never_imports_a_filter_module():
    # The loader finds filters by entry point (or by a computed module name), so no
    # module of the relay names one statically.
    bad = []
    for path in sorted((ROOT / "relay").rglob("*.py")):
        pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        bad += [f"{path.relative_to(ROOT)} {v}" for v in (
            f"line {line}: {mod}" for line, mod in imported_modules(path.read_text(), pkg)
            if mod.split(".")[0] == "filters")]
    assert bad == []


def test_the_protocol_depends_on_nothing_of_ours():
    src = (ROOT / "relay" / "pipeline" / "protocol.py").read_text()
    assert [m for _, m in imported_modules(src, "relay.pipeline") if _ours(m)] == []
