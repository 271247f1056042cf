"""Which lens parameterization, objective and budget makes a head's lens beat the null lens? One run.

Trains the lenses of one layer's heads in several ways on the same tokens and evaluates each on the
same held-out windows (exact forward KL, bits/token; position 0 left out, windows over all held-out
documents). Prints per variant: training tokens (statistics
+ refinement), wall time of training, heads with gain > 0, median gain, mean held-out KL, and the
per-head gains. Nothing is asserted; the figures go in docs/lens.md.

Usage: ``python bench/lens_variants.py [--layer 18] [--eval-tokens 8192] [--device cuda] [--only NAME,...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# name -> (LensConfig kwargs, LensTrainConfig kwargs)
VARIANTS = {
    "closed form (affine)": ({}, dict(tokens=0)),
    "closed form + fKL 4096 (default)": ({}, dict(tokens=4096)),
    "closed form + shortlist fKL 4096": ({}, dict(tokens=4096, objective="fkl_shortlist")),
    "closed form + reverse KL 4096": ({}, dict(tokens=4096, objective="rkl")),
    "closed form + next-token CE 4096": ({}, dict(tokens=4096, objective="ce")),
    "closed form + fKL 16384": ({}, dict(tokens=16384)),
    "low rank 64, closed form": (dict(kind="lowrank", rank=64), dict(tokens=0)),
    "low rank 16, closed form": (dict(kind="lowrank", rank=16), dict(tokens=0)),
    "shared per layer, closed form": (dict(shared="layer"), dict(tokens=0)),
    "with final norm, closed form + fKL 4096": (dict(norm=True), dict(tokens=4096)),
    "full d×V, closed form": (dict(kind="full"), dict(tokens=0)),
    "gradient only (base-rate start), fKL 4096, lr 1e-3": ({}, dict(tokens=4096, init="base", lr=1e-3)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", default=None, help="comma-separated variant names (substrings)")
    ap.add_argument("--out", default="runs/lens-variants", help="run directories, one per variant (kept)")
    args = ap.parse_args()

    from headscope.lens.evaluate import run_eval
    from headscope.lens.options import EvalOptions
    from headscope.lens.lenses import LensConfig
    from headscope.sites import parse_sites
    from headscope.lens.options import LensTrainConfig
    from headscope.lens.train import run_train
    from headscope.models.load import load_model
    from headscope.runs import RunDir

    model = load_model(args.model, device=args.device)
    sites = parse_sites("all", model, layers=[args.layer])
    names = list(VARIANTS)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        names = [n for n in names if any(k in n for k in keys)]
    rows = []
    for i, name in enumerate(names):
        lens_kw, train_kw = VARIANTS[name]
        run = RunDir(Path(args.out) / f"v{i:02d}", model.identity())
        cfg = LensTrainConfig(**train_kw, corpus=args.corpus)
        t0 = time.time()
        run_train(model, run, sites, LensConfig(**lens_kw), cfg, fresh=True, progress=False)
        t_train = time.time() - t0
        ev = run_eval(model, run, EvalOptions(tokens=args.eval_tokens), progress=False)
        gains = [ev["per_head"][f"{l}.{h}"]["gain"] for l, h in sites]
        kl = sum(ev["per_head"][f"{l}.{h}"]["kl_lens"] for l, h in sites) / len(sites)
        row = {"variant": name, "stat_tokens": cfg.init_tokens if cfg.init != "identity" else 0,
               "refine_tokens": cfg.tokens, "train_s": round(t_train, 1), "n_positive": ev["n_positive_gain"],
               "n_informative": ev["n_informative"], "n_heads": len(sites), "median_gain": ev["median_gain"],
               "median_gain_se": ev["median_gain_se"], "control_gain": ev["control"]["control0"]["gain"],
               "control_gain_se": ev["control"]["control0"]["gain_se"], "tokens": ev["tokens"], "documents": ev["documents"],
               "mean_kl_lens": kl, "kl_null": ev["kl_null"], "gains": [round(g, 3) for g in gains]}
        rows.append(row)
        print(f"{name:<52} {row['stat_tokens']:>5}+{row['refine_tokens']:<6} {t_train:7.0f} s  "
              f"gain>0 {row['n_positive']}/{len(sites)}  BH {row['n_informative']}  median {row['median_gain']:+.3f} ± "
              f"{row['median_gain_se'] or float('nan'):.3f}  control {row['control_gain']:+.3f}  mean KL {kl:.3f} "
              f"(null {ev['kl_null']:.3f})  {' '.join(f'{g:+.2f}' for g in gains)}", flush=True)
        del run
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    (Path(args.out) / "variants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
