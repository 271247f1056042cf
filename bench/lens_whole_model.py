"""Every head of a model: train lenses (closed form + default refinement), evaluate at several held-out
token counts, and write the headline figures (docs/lens.md).

For each ``--eval-tokens`` N: held-out windows spread over all held-out documents, position 0 left out;
prints heads informative under Benjamini–Hochberg (q = 0.05) and under the 2·SE rule, heads with gain
> 0, the median gain ± its cluster-bootstrap SE, the control lens' gain ± SE, tokens and documents.
The last N's eval.json and plots stay in ``OUT/lens``; each N's eval is copied to ``OUT/eval-N.json``;
``OUT/summary.json`` holds the table.

Usage: ``python bench/lens_whole_model.py --out runs/all [--layers all] [--eval-tokens 1024 8192 32768]
[--tokens 4096] [--init-tokens 8192] [--device cuda] [--model default] [--corpus default]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--tokens", type=int, default=4096, help="refinement tokens")
    ap.add_argument("--init-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--batch-size", type=int, default=8)
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
    sites = parse_sites("all", model, layers=parse_layers(args.layers, model.n_layers))
    run = RunDir(Path(args.out), model.identity())
    cfg = LensTrainConfig(tokens=args.tokens, init_tokens=args.init_tokens, corpus=args.corpus, batch_size=args.batch_size)
    t0 = time.time()
    s = run_train(model, run, sites, LensConfig(), cfg, progress=True)
    t_train = time.time() - t0
    print(f"trained {len(sites)} lenses + {len(s['controls'])} control in {t_train:.0f} s on "
          f"{s['null_positions']} positions ({s['documents']} train documents)", flush=True)
    rows = []
    for n in args.eval_tokens:
        t0 = time.time()
        ev = run_eval(model, run, EvalOptions(tokens=n, batch_size=args.batch_size), progress=False)
        c = next(iter(ev["control"].values()))
        row = {"eval_tokens": ev["tokens"], "windows": ev["windows"], "documents": ev["documents"],
               "kl_null": ev["kl_null"], "n_heads": ev["n_heads"], "n_informative_bh": ev["n_informative"],
               "n_informative_2se": ev["n_informative_2se"], "n_positive_gain": ev["n_positive_gain"],
               "median_gain": ev["median_gain"], "median_gain_se": ev["median_gain_se"],
               "control_gain": c["gain"], "control_gain_se": c["gain_se"], "control_source": c["source"],
               "eval_s": round(time.time() - t0, 1)}
        rows.append(row)
        shutil.copy(Path(args.out) / "lens" / "eval.json", Path(args.out) / f"eval-{n}.json")
        print(json.dumps(row), flush=True)
    summary = {"model": model.name, "device": args.device, "sites": len(sites), "train": s["train"],
               "train_s": round(t_train, 1), "null_positions": s["null_positions"],
               "train_documents": s["documents"], "evals": rows}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
