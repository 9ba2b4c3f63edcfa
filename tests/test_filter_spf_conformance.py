"""RFC 7208 conformance: every case of the openspf test suite against SPFChecker.

The suite's zonedata is served by tests._dns.ZoneResolver (no network); the default
explanation is 'DEFAULT' as the suite's README asks. One test per case.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from _dns import ZoneResolver

from filters.spf import SPFChecker

SUITE = Path(__file__).parents[1] / ".." / "shared" / "conformance" / "spf" / "rfc7208-tests.yml"


def _cases() -> list:
    if not SUITE.is_file():
        return [pytest.param(None, None, id="suite-missing",
                             marks=pytest.mark.skip(reason=f"conformance data not found at {SUITE}"))]
    out = []
    with SUITE.open(encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            for name, case in scenario["tests"].items():
                out.append(pytest.param(scenario["zonedata"], case, id=name))
    return out


CASES = _cases()


def test_suite_has_every_case() -> None:
    if not SUITE.is_file():
        pytest.skip(f"conformance data not found at {SUITE}")
    assert len(CASES) == 203


@pytest.mark.parametrize("zonedata,case", CASES)
def test_rfc7208(zonedata: dict, case: dict) -> None:
    checker = SPFChecker(ZoneResolver(zonedata), hostname="receiver.example.net",
                         default_explanation="DEFAULT")
    r = asyncio.run(checker.check_host(case["host"], case["mailfrom"], case["helo"]))
    want = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert r.result in want, f"got {r.result} ({r.problem}), want {want}"
    if "explanation" in case:
        assert r.explanation == case["explanation"]
