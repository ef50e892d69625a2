"""Whether two ``summary.json`` files hold bitwise the same numbers (a refactor that must not move any result).

    critsample detect --model dit-digits --preset fast --out /tmp/before      # on the old commit
    critsample detect --model dit-digits --preset fast --out /tmp/after       # on the new one
    python bench/same_numbers.py /tmp/before/summary.json /tmp/after/summary.json

Every numeric leaf (ints, floats, booleans; NaN equals NaN) is compared by its exact bits, path by path; a number
present in only one file is a difference. The run's own facts (wall time, units computed or loaded this run) are
skipped: they say how the numbers were obtained, not what they are. Strings (paths, the model id) are not compared.
Prints each difference, then one JSON line; exits 1 when any number differs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from pathlib import Path

RUN_FACTS = re.compile(r"^/cost/(wall_seconds.*|units_computed_this_run|units_loaded)$")


def numeric_leaves(obj, path: str = "") -> dict[str, object]:
    """``{json path: number}`` of every int, float or bool leaf, lists indexed as ``[i]``."""
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{path}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numeric_leaves(v, f"{path}[{i}]"))
    elif isinstance(obj, (bool, int, float)):
        out[path] = obj
    return out


def _bits(v) -> tuple:
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else struct.pack("<d", v))
    return (type(v).__name__, v)


def compare(a: dict, b: dict, skip: re.Pattern = RUN_FACTS) -> tuple[int, list[str]]:
    """(numbers compared, differences as readable lines) between two parsed summaries."""
    la = {k: v for k, v in numeric_leaves(a).items() if not skip.match(k)}
    lb = {k: v for k, v in numeric_leaves(b).items() if not skip.match(k)}
    diffs = [f"{k}: only in the first ({la[k]!r})" for k in sorted(la.keys() - lb.keys())]
    diffs += [f"{k}: only in the second ({lb[k]!r})" for k in sorted(lb.keys() - la.keys())]
    diffs += [f"{k}: {la[k]!r} != {lb[k]!r}" for k in sorted(la.keys() & lb.keys()) if _bits(la[k]) != _bits(lb[k])]
    return len(la.keys() | lb.keys()), diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    n, diffs = compare(json.loads(args.first.read_text()), json.loads(args.second.read_text()))
    for line in diffs:
        print(line)
    print(json.dumps({"equal": not diffs, "numbers": n, "differ": len(diffs), "first": str(args.first),
                      "second": str(args.second)}))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
