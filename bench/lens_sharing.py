"""Can one lens read heads of several layers? And does reading through the final norm help, given a fair
(closed-form) start? Trains several banks on the same tokens and evaluates all on the same held-out
windows (position 0 left out, SEs clustered by document, BH at q = 0.05).

* sharing (issue 10, 6a), on the heads of ``--layers``: one lens per head, one lens per layer (shared by
  its heads), one lens for all heads of all those layers (joint). The question of the Attention Lens
  paper ("can one lens serve several layers?") is answered by the held-out gains of the joint lens vs
  the per-head lenses on the same heads — not by applying a closed-form lens to another head's output,
  which loses by construction (a closed-form lens lives in its own head's output subspace).
* norm (6b), on the heads of ``--norm-layer``: the ``full`` lens (W [d, V]) fitted in closed form on r
  and on N(r) (the final norm applied first: the closed form of a norm lens, a fair start), next to the
  affine lens without and with the norm (the affine norm lens can only start from the base rates: the
  norm is not linear).

Prints one line per variant and per-head paired differences against the per-head lenses; writes
``OUT/sharing.json``. Usage: ``python bench/lens_sharing.py --out runs/sharing [--layers 3,10,17,24]
[--norm-layer 18] [--tokens 4096] [--eval-tokens 8192] [--device cuda] [--only sharing|norm]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--layers", default="3,10,17,24")
    ap.add_argument("--norm-layer", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=4096, help="refinement tokens after the closed form")
    ap.add_argument("--init-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", default=None, choices=(None, "sharing", "norm"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from headscope.sites import parse_layers
    from headscope.lens.evaluate import run_eval
    from headscope.lens.options import EvalOptions
    from headscope.lens.lenses import LensConfig
    from headscope.sites import parse_sites
    from headscope.lens.options import LensTrainConfig
    from headscope.lens.train import run_train
    from headscope.models.load import load_model
    from headscope.runs import RunDir

    model = load_model(args.model, device=args.device)
    cfg = dict(init_tokens=args.init_tokens, corpus=args.corpus)
    share_sites = parse_sites("all", model, layers=parse_layers(args.layers, model.n_layers))
    norm_sites = parse_sites("all", model, layers=[args.norm_layer])
    variants = []
    if args.only in (None, "sharing"):
        variants += [("per head", share_sites, dict(), dict(tokens=args.tokens)),
                     ("one lens per layer", share_sites, dict(shared="layer"), dict(tokens=args.tokens)),
                     (f"one lens for layers {args.layers}", share_sites, dict(shared="all"), dict(tokens=args.tokens))]
    if args.only in (None, "norm"):
        variants += [("affine, no norm, closed form", norm_sites, dict(), dict(tokens=0)),
                     ("affine, norm (base-rate start) + refinement", norm_sites, dict(norm=True), dict(tokens=args.tokens)),
                     ("full d×V, no norm, closed form", norm_sites, dict(kind="full"), dict(tokens=0)),
                     ("full d×V, norm, closed form on N(r)", norm_sites, dict(kind="full", norm=True), dict(tokens=0)),
                     ("full d×V, norm, closed form on N(r) + refinement", norm_sites, dict(kind="full", norm=True),
                      dict(tokens=args.tokens))]
    rows, base = [], {}
    for i, (name, sites, lens_kw, train_kw) in enumerate(variants):
        run = RunDir(Path(args.out) / f"v{i:02d}", model.identity())
        t0 = time.time()
        run_train(model, run, sites, LensConfig(**lens_kw), LensTrainConfig(**cfg, **train_kw), fresh=True, progress=False)
        t_train = time.time() - t0
        ev = run_eval(model, run, EvalOptions(tokens=args.eval_tokens), progress=False)
        ph = ev["per_head"]
        gains = {k: v["gain"] for k, v in ph.items()}
        c = next(iter(ev["control"].values()))
        row = {"variant": name, "heads": len(sites), "lens": lens_kw, "refine_tokens": train_kw["tokens"],
               "train_s": round(t_train, 1), "n_informative_bh": ev["n_informative"],
               "n_informative_2se": ev["n_informative_2se"], "median_gain": ev["median_gain"],
               "median_gain_se": ev["median_gain_se"], "mean_kl_lens": float(np.mean([v["kl_lens"] for v in ph.values()])),
               "kl_null": ev["kl_null"], "control_gain": c["gain"], "control_gain_se": c["gain_se"],
               "tokens": ev["tokens"], "documents": ev["documents"], "gains": {k: round(g, 4) for k, g in gains.items()},
               "gain_se": {k: round(v["gain_se"], 4) for k, v in ph.items()}}
        key = "sharing" if sites is share_sites else "norm"
        if key not in base:
            base[key] = gains
        else:  # paired with the first variant of the group, head by head
            d = np.array([gains[k] - base[key][k] for k in gains])
            row["paired_vs_first"] = {"median_diff": float(np.median(d)), "heads_better": int((d > 0).sum()),
                                      "heads": len(d)}
        rows.append(row)
        print(f"{name:<50} heads {len(sites):>3}  BH {ev['n_informative']:>3}  2SE {ev['n_informative_2se']:>3}  "
              f"median {ev['median_gain']:+.3f} ± {ev['median_gain_se'] or float('nan'):.3f}  control {c['gain']:+.4f} ± "
              f"{c['gain_se'] or float('nan'):.4f}  train {t_train:.0f} s"
              + (f"  vs first: median Δ {row['paired_vs_first']['median_diff']:+.3f}, better on "
                 f"{row['paired_vs_first']['heads_better']}/{len(sites)}" if "paired_vs_first" in row else ""), flush=True)
        (Path(args.out) / "sharing.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
