#!/usr/bin/env python
"""Compare two sets of reproduction results (``results/*.json``) number by number.

    python scripts/compare_results.py OLD_DIR NEW_DIR [--rtol 0] [--atol 0]

Walks every ``<paper>.json`` present in OLD_DIR and reports, per file: numbers that differ
(path, old, new, difference), keys or list items that disappeared, and keys that are new in
NEW_DIR (added per-item data is expected; a removed or changed number must be explained).
Booleans and strings are compared exactly; ``--rtol``/``--atol`` loosen the number check.
Exit status 0 when nothing changed or was removed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same(a, b, rtol: float, atol: float) -> bool:
    if _is_number(a) and _is_number(b):
        return a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    return type(a) is type(b) and a == b


def compare(old, new, path: str, out: dict, rtol: float, atol: float) -> None:
    """Fill ``out`` ("changed", "removed", "added") with the differences below ``path``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            if k in new:
                compare(old[k], new[k], f"{path}.{k}", out, rtol, atol)
            else:
                out["removed"].append(f"{path}.{k}")
        out["added"].extend(f"{path}.{k}" for k in new if k not in old)
    elif isinstance(old, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(old, new)):
            compare(a, b, f"{path}[{i}]", out, rtol, atol)
        if len(old) != len(new):
            out["changed"].append((f"{path} (length)", len(old), len(new)))
    elif not _same(old, new, rtol, atol):
        out["changed"].append((path, old, new))


def _line(path: str, old, new) -> str:
    if _is_number(old) and _is_number(new):
        return f"  {path}: {old!r} -> {new!r} (diff {new - old:+.3g})"
    return f"  {path}: {old!r} -> {new!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0)
    ap.add_argument("--atol", type=float, default=0.0)
    args = ap.parse_args(argv)
    bad = False
    for old_path in sorted(args.old.glob("*.json")):
        new_path = args.new / old_path.name
        if not new_path.is_file():
            print(f"{old_path.name}: missing in {args.new}")
            bad = True
            continue
        out = {"changed": [], "removed": [], "added": []}
        compare(json.loads(old_path.read_text()), json.loads(new_path.read_text()), "$", out,
                args.rtol, args.atol)
        status = "CHANGED" if out["changed"] or out["removed"] else "same numbers"
        print(f"{old_path.name}: {status}; {len(out['changed'])} changed, {len(out['removed'])} removed, "
              f"{len(out['added'])} added keys")
        for row in out["changed"]:
            print(_line(*row))
        for path in out["removed"]:
            print(f"  removed: {path}")
        for path in out["added"]:
            print(f"  added: {path}")
        bad |= bool(out["changed"] or out["removed"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
