"""Long hypothesis runs of the network-facing parsers' properties (not run in CI).

Takes the property tests of tests/test_security_fuzz.py and runs them with many more
examples than CI can afford; `--examples N` sets how many, positional arguments pick
targets (default: all). Exits non-zero with the falsifying input on the first failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import os  # noqa: E402

TARGET_NAMES = {
    "smtp_command": "test_smtp_command_line_only_syntax_errors",
    "smtp_path": "test_smtp_paths_and_params",
    "data": "test_data_any_split_gives_the_same_message",
    "sasl_login": "test_sasl_login_only_auth_syntax_error",
    "pop3": "test_pop3_engine_any_input",
    "imap": "test_imap_parser_any_input",
    "http": "test_http_parser_only_http_error",
    "config": "test_config_random_text_only_config_error",
    "spool": "test_spool_open_survives_torn_and_flipped_segments",
    # In tests/test_smtp_data.py: the C fast path against the Python reference.
    "data_fast_path": "test_fast_path_agrees_with_the_reference",
}


class _TmpFactory:
    """Enough of pytest's tmp_path_factory for the properties that write files."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relay-fuzz-"))
        self.n = 0

    def mktemp(self, name: str) -> Path:
        self.n += 1
        p = self.base / f"{name}{self.n}"
        p.mkdir()
        return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=[])
    ap.add_argument("--examples", type=int, default=20000)
    args = ap.parse_args()
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGET_NAMES)}")
    # The property module reads this when it is imported: set it first.
    os.environ["RELAY_FUZZ_EXAMPLES"] = str(args.examples)
    from tests import test_security_fuzz as props
    from tests import test_smtp_data
    factory = _TmpFactory()
    for name in args.targets or list(TARGET_NAMES):
        test = getattr(test_smtp_data if name == "data_fast_path" else props, TARGET_NAMES[name])
        print(f"fuzzing {name} with {args.examples} examples", flush=True)
        if name == "config":
            test(factory)
        elif name == "spool":
            import asyncio
            root = factory.mktemp("pristine")
            msgs = asyncio.run(props._fill(root, 6))
            seg = next((root / "segments").glob("w0-*.log"))
            test((root, seg.name, seg.read_bytes(), msgs), factory)
        else:
            test()
    return 0


if __name__ == "__main__":
    sys.exit(main())
