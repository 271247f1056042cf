"""Which artifacts of two run directories differ: ``python scripts/compare_runs.py OLD NEW``.

For checking that a refactor leaves a run's outputs unchanged (issue 22: "demo outputs equal before and
after, timings aside"). Safetensors files are compared tensor by tensor (exact equality, NaN equal to NaN; the largest absolute
difference is printed otherwise); JSON files are compared after dropping keys that hold timings, dates, paths
and hashes of code or options (``IGNORED``); other files (PNG, HTML, the atlas' JS pages) are listed by sha1.
Prints one line per differing file and a summary; exit status 0 when nothing but ignored keys differs."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

IGNORED = {"seconds", "wall_seconds", "cpu_seconds", "started", "finished", "time", "date", "tokens_per_s",
           "elapsed", "path", "out", "run", "options_hash", "inputs", "outputs", "code", "created", "timings",
           "stage_seconds", "duration", "elapsed_s"}
"""JSON keys whose values are expected to differ between two runs of the same computation."""


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in IGNORED}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _sha1(p: Path) -> str:
    return hashlib.sha1(p.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> str | None:
    """None when equal (modulo IGNORED keys), else a one-line description of the difference."""
    if a.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file
        ta, tb = load_file(a), load_file(b)
        if ta.keys() != tb.keys():
            return f"keys differ: {sorted(ta.keys() ^ tb.keys())[:5]}"
        bad = []
        for k in ta:
            if ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype:
                bad.append(f"{k} shape/dtype")
            elif not torch.equal(ta[k], tb[k]) and not (ta[k].is_floating_point() and
                                                        ((ta[k] == tb[k]) | (ta[k].isnan() & tb[k].isnan())).all()):
                d = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].is_floating_point() else "int"
                bad.append(f"{k} max|Δ|={d}")
        return "; ".join(bad[:4]) + (" …" if len(bad) > 4 else "") if bad else None
    if a.suffix == ".json":
        try:
            ja, jb = _strip(json.loads(a.read_text())), _strip(json.loads(b.read_text()))
        except ValueError:
            return None if _sha1(a) == _sha1(b) else "bytes differ (not JSON)"
        if ja == jb:
            return None
        keys = sorted({k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)}) if isinstance(ja, dict) and \
            isinstance(jb, dict) else []
        return f"JSON differs in {keys[:8]}" + (" …" if len(keys) > 8 else "")
    return None if _sha1(a) == _sha1(b) else "bytes differ"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--skip", nargs="*", default=["atlas", "stages", "study.json", "logs"],
                    help="top-level entries not compared (default: the atlas, stage records, study.json, logs)")
    a = ap.parse_args(argv)
    files = lambda root: {p.relative_to(root) for p in root.rglob("*") if p.is_file()
                          and p.relative_to(root).parts[0] not in a.skip}
    fa, fb = files(a.old), files(a.new)
    diff = 0
    for rel in sorted(fa - fb):
        print(f"only in old: {rel}")
    for rel in sorted(fb - fa):
        print(f"only in new: {rel}")
    for rel in sorted(fa & fb):
        why = compare(a.old / rel, a.new / rel)
        if why:
            diff += 1
            print(f"differs: {rel}: {why}")
    same = len(fa & fb) - diff
    print(f"{same} files equal, {diff} differ, {len(fa - fb)} only in old, {len(fb - fa)} only in new")
    return 0 if diff == 0 and fa == fb else 1


if __name__ == "__main__":
    sys.exit(main())
