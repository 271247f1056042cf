"""The bodies of ``headscope lens show|scan|steer`` (declared, with their options, in lens/instrument.py)."""

from __future__ import annotations

import math

import json
import sys
from pathlib import Path

from ..errors import HeadscopeError


def _bank(args, model):
    from .lenses import load_bank
    from .train import load_null
    if not args.out:
        raise HeadscopeError("give the run directory that holds the lenses with --out")
    bank, _ = load_bank(model, Path(args.out) / "lens" if (Path(args.out) / "lens").is_dir() else Path(args.out))
    return bank, load_null(Path(args.out) / "lens" if (Path(args.out) / "lens").is_dir() else Path(args.out))


def _lens_dir(args) -> Path:
    p = Path(args.out)
    return p / "lens" if (p / "lens").is_dir() else p


def show_cmd(model, args) -> int:
    from .apply import format_show, load_gains, show
    from .lenses import parse_sites
    bank, null = _bank(args, model)
    sites = None
    if args.heads:  # 'L.*' means the trained heads of layer L; an explicit 'L.H' must have a lens
        sites = []
        for part in args.heads.split(","):
            got = parse_sites(part, model)
            sites += [s for s in got if s in bank.sites] if part.strip().endswith("*") else got
        if not sites:
            raise HeadscopeError(f"no trained lens matches --heads {args.heads}")
    res = show(model, bank, args.prompt, sites, k=args.k, gains=load_gains(_lens_dir(args)), null=null, by=args.by)
    print(json.dumps(res, indent=1) if args.json else format_show(res, args.show_uninformative))
    return 0


def _read_lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise HeadscopeError(f"{what} file not found: {path}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if "\0" in text:
        raise HeadscopeError(f"{what} file {path} contains NUL bytes: not a text file")
    lines = [l.rstrip("\n") for l in text.splitlines() if l.strip()]
    if not lines:
        raise HeadscopeError(f"{what} file {path} is empty")
    return lines


def scan_cmd(model, args) -> int:
    from ..runs import write_json
    from .apply import load_gains, scan
    words = _read_lines(args.token_list, "token list")
    prompts = _read_lines(args.prompts, "prompts")
    contrast = _read_lines(args.contrast, "contrast prompts") if args.contrast else None
    bank, null = _bank(args, model)
    res = scan(model, bank, words, prompts, k=args.k, multi=args.multi_token, contrast=contrast,
               gains=load_gains(_lens_dir(args)), null=null)
    write_json(_lens_dir(args) / "scan.json", res)
    rep = res["token_report"]
    if rep["multi_token"]:
        print(f"not single tokens: {', '.join(rep['multi_token'])} → "
              + ("first token used" if args.multi_token == "first" else "skipped"), file=sys.stderr)
    top = sorted(res["hit_rate"].items(), key=lambda kv: -kv[1])[:10]
    uninf = set(res.get("uninformative_heads", []))
    print(f"{len(res['token_ids'])} tokens, {res['n_prompts']} prompts, top-{args.k}; heads most often reading them:")
    for name, r in top:
        print(f"  {name:>7} {r:6.3f}" + ("  (lens not informative: not meaningful)" if name in uninf else ""))
    if "classifier" in res:
        c = res["classifier"]
        print(f"classifier: held-out accuracy {c['heldout_accuracy']:.2f} (chance {c['chance']:.2f}, "
              f"{c['n_test']} held out); strongest: " + ", ".join(f["feature"] for f in c["top_features"][:5]))
    print(f"→ {_lens_dir(args) / 'scan.json'}")
    return 0


def _site(text: str) -> tuple[int, int]:
    try:
        l, h = text.split(".")
        return int(l), int(h)
    except ValueError:
        raise HeadscopeError(f"cannot parse head '{text}' (use LAYER.HEAD, e.g. 20.3)") from None


def steer_cmd(model, args) -> int:
    from .apply import Steer, steer
    edits = []
    for a in args.add:
        parts = a.split(":")
        if len(parts) < 2:
            raise HeadscopeError(f"cannot parse --add '{a}' (use L.H:TOKEN[:ALPHA])")
        alpha = 4.0
        if len(parts) >= 3:
            try:
                alpha = float(parts[-1])
                parts = parts[:-1]
            except ValueError:
                pass
        l, h = _site(parts[0])
        if not ":".join(parts[1:]) or not math.isfinite(alpha):
            raise HeadscopeError(f"cannot parse --add '{a}': give a token (and a finite ALPHA): L.H:TOKEN[:ALPHA]")
        edits.append(Steer(l, h, "add", ":".join(parts[1:]), alpha, args.from_lens))
    for a in args.scale:
        try:
            site, alpha = a.split(":")
            if not math.isfinite(float(alpha)):
                raise ValueError(alpha)
            edits.append(Steer(*_site(site), "scale", None, float(alpha)))
        except ValueError:
            raise HeadscopeError(f"cannot parse --scale '{a}' (use L.H:ALPHA)") from None
    for a in args.ablate:
        edits.append(Steer(*_site(a), "scale", None, 0.0))
    bank = _bank(args, model)[0] if args.from_lens else None
    res = steer(model, args.prompt, edits, n_tokens=args.new_tokens, bank=bank)
    print(f"prompt: {res['prompt']!r}")
    for e in res["edits"]:
        print(f"edit:   {e}")
    print(f"before: {res['before']!r}")
    print(f"after:  {res['after']!r}")
    return 0
