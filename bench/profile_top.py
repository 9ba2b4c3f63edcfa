"""Top items of a py-spy raw (collapsed stacks) profile: self and inclusive time.

    python bench/profile_top.py PROFILE.txt [-n 25] [--filter relay/]

Takes the file `py-spy record --format raw` writes (one `frame;frame;... count` line per
distinct stack; run.py --profile makes them) and prints the functions with the most
samples on-CPU at the top of the stack (self) and anywhere in the stack (inclusive),
as a share of all samples. Plain text in, text out.
"""

from __future__ import annotations

import argparse
import collections
import re

_LINE = re.compile(r"\s*\(([^)]*?)(?::\d+)?\)$")


def _name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; line numbers merged.
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({short})"


def top(path: str, n: int = 25, only: str = "") -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            c = int(count)
            frames = [_name(x) for x in stack.split(";") if x and not x.startswith("process ")]
            frames = [x for x in frames if not x.startswith("thread ")]
            if not frames:
                continue
            total += c
            self_t[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    out = [f"{total} samples", "", "self:"]
    for name, c in self_t.most_common():
        if only in name:
            out.append(f"  {100 * c / total:5.1f}%  {name}")
            if len(out) > n + 3:
                break
    out += ["", "inclusive:"]
    k = 0
    for name, c in incl.most_common():
        if only in name:
            out.append(f"  {100 * c / total:5.1f}%  {name}")
            k += 1
            if k >= n:
                break
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("-n", type=int, default=25)
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    print(top(a.profile, a.n, a.filter))


if __name__ == "__main__":
    main()
