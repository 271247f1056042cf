"""``headscope lens show|scan|steer``: commands ``fn(model, run, opts)`` (declared in lens/instrument.py, their
options in lens/options.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import HeadscopeError


def _bank(run, model):
    from .lenses import load_bank
    from .train import load_null
    bank, _ = load_bank(model, _lens_dir(run))
    return bank, load_null(_lens_dir(run))


def _lens_dir(run) -> Path:
    p = Path(run.path)
    return p / "lens" if (p / "lens").is_dir() else p


def show_cmd(model, run, opts) -> int:
    from .apply import format_show, load_gains, show
    from ..sites import parse_sites
    bank, null = _bank(run, model)
    sites = None
    if opts.heads:  # 'L.*' means the trained heads of layer L; an explicit 'L.H' must have a lens
        sites = []
        for part in opts.heads.split(","):
            got = parse_sites(part, model)
            sites += [s for s in got if s in bank.sites] if part.strip().endswith("*") else got
        if not sites:
            raise HeadscopeError(f"no trained lens matches --heads {opts.heads}")
    res = show(model, bank, opts.prompt, sites, k=opts.k, gains=load_gains(_lens_dir(run)), null=null, by=opts.by)
    print(json.dumps(res, indent=1) if opts.json else format_show(res, opts.show_uninformative))
    return 0


def scan_cmd(model, run, opts) -> int:
    from ..runs import read_json, write_json
    from .apply import load_gains, scan
    from .classifier import format_contrast, read_prompt_file
    from .localise import token_frequencies
    words, _ = read_prompt_file(opts.token_list, "token list")
    prompts, sources = read_prompt_file(opts.prompts, "prompts")
    contrast, csources = read_prompt_file(opts.contrast, "contrast prompts") if opts.contrast else (None, None)
    bank, null = _bank(run, model)
    info = read_json(_lens_dir(run) / "lenses.json")
    freq = token_frequencies(model, info.get("train", {}).get("corpus", "default"))
    res = scan(model, bank, words, prompts, k=opts.k, multi=opts.multi_token, contrast=contrast,
               gains=load_gains(_lens_dir(run)), null=null, freq=freq, sources=sources, contrast_sources=csources)
    write_json(_lens_dir(run) / "scan.json", res)
    rep = res["token_report"]
    if rep["multi_token"]:
        print(f"not single tokens: {', '.join(rep['multi_token'])} → "
              + ("first token used" if opts.multi_token == "first" else "skipped"), file=sys.stderr)
    loc = res["localisation"]
    uninf = set(res.get("uninformative_heads", []))
    print(f"{len(res['token_ids'])} tokens, {res['n_prompts']} prompts, top-{opts.k}; control list of the same corpus "
          f"frequency (median {loc['frequency']['list_median']:.0f} vs {loc['frequency']['control_median']:.0f}): "
          + ", ".join(loc["control_tokens"][:8]) + (" …" if len(loc["control_tokens"]) > 8 else ""))
    print(f"{'head':>7} {'rate':>6} {'control':>7} {'diff':>7} {'±se':>6} {'p':>8}")
    top = sorted(loc["per_head"].items(), key=lambda kv: -kv[1]["diff"])[:10]
    for name, v in top:
        se = v["se"] if v["se"] is not None else float("nan")
        p = v["p_value"] if v["p_value"] is not None else float("nan")
        note = "  localised" if v["localised"] else ""
        if name in uninf:
            note += "  (lens not informative: not meaningful)"
        print(f"{name:>7} {v['rate']:6.3f} {v['control_rate']:7.3f} {v['diff']:+7.3f} {se:6.3f} {p:8.2g}{note}")
    print(f"{loc['n_localised']}/{len(loc['per_head'])} heads localised: list rate above the control's "
          f"(one-sided, SE over prompts, Benjamini-Hochberg q = {loc['q']})")
    if "classifier" in res:
        print(format_contrast(res["classifier"]))
    print(f"→ {_lens_dir(run) / 'scan.json'}")
    return 0


def _site(text: str) -> tuple[int, int]:
    try:
        l, h = text.split(".")
        return int(l), int(h)
    except ValueError:
        raise HeadscopeError(f"cannot parse head '{text}' (use LAYER.HEAD, e.g. 20.3)") from None


def steer_cmd(model, run, opts) -> int:
    from .apply import Steer, steer
    edits = []
    for a in opts.add:
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
        edits.append(Steer(l, h, "add", ":".join(parts[1:]), alpha, opts.from_lens))
    for a in opts.scale:
        try:
            site, alpha = a.split(":")
            if not math.isfinite(float(alpha)):
                raise ValueError(alpha)
            edits.append(Steer(*_site(site), "scale", None, float(alpha)))
        except ValueError:
            raise HeadscopeError(f"cannot parse --scale '{a}' (use L.H:ALPHA)") from None
    for a in opts.ablate:
        edits.append(Steer(*_site(a), "scale", None, 0.0))
    bank = _bank(run, model)[0] if opts.from_lens else None
    res = steer(model, opts.prompt, edits, n_tokens=opts.new_tokens, bank=bank)
    print(f"prompt: {res['prompt']!r}")
    for e in res["edits"]:
        print(f"edit:   {e}")
    print(f"before: {res['before']!r}")
    print(f"after:  {res['after']!r}")
    return 0
