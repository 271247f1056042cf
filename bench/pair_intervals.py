"""Per-pair intervals and p-values clustered by document vs the independent-prompt (Wilson, binomial) form,
on a run whose neurons are attributed and explained (e.g. a demo run or bench/neurons_readings.py's).

    PYTHONPATH=src python bench/pair_intervals.py RUN [--set top|random] [--out pair_intervals.json]

Rescores RUN's pairs with ``explain score`` (statistical scorer, the options of RUN's scores file; rewrites
explain/[random/]scores_statistical.json, so run it on a copy) and reports, over the scored pairs: the
documents per pair, the median interval width and the pairs above chance after BH — with the intervals and
p-values clustered by document (what ``explain score`` reports) and, on the same predictions, with the
Wilson interval and exact binomial p that treat every prompt as independent.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> int:
    from headscope.explain.options import ScoreOptions
    from headscope.explain.stages import explain_dir, run_score
    from headscope.neurons.stats import bh, binom_above, wilson_interval
    from headscope.runs import RunDir, read_json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--set", dest="which", default="top", choices=("top", "random"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    run = RunDir(a.run)
    path = explain_dir(run, a.which) / "scores_statistical.json"
    old = read_json(path).get("options", {}) if path.is_file() else {}
    opts = ScoreOptions(which=a.which, **{k: old[k] for k in ("max_per_class", "min_per_class", "control") if k in old})
    res = run_score(None, run, opts, progress=False)
    rows = [r for r in read_json(path)["pairs"] if r["E"] is not None]
    k = [sum((p is not None and p >= 0.5) == t for p, t in zip(r["predictions"], r["truth"])) for r in rows]
    n = [len(r["truth"]) for r in rows]
    wil = [wilson_interval(kk, nn) for kk, nn in zip(k, n)]
    p_ind = [binom_above(kk, nn) for kk, nn in zip(k, n)]
    q_ind = bh(p_ind)
    width = lambda lo_hi: float(np.median([h - lo for lo, h in lo_hi if lo is not None])) if lo_hi else None
    out = {"run": a.run, "set": a.which, "options": {"max_per_class": opts.max_per_class,
                                                     "min_per_class": opts.min_per_class},
           "pairs_scored": len(rows), "neurons": len({r["neuron"] for r in rows}),
           "documents_per_pair": {"median": float(np.median([r["documents"] for r in rows])) if rows else None,
                                  "min": min((r["documents"] for r in rows), default=None),
                                  "max": max((r["documents"] for r in rows), default=None)},
           "prompts_per_pair_median": float(np.median(n)) if rows else None,
           "pairs_with_every_prompt_its_own_document": sum(r["interval"] == "wilson" for r in rows),
           "clustered": {"median_width": width([(r["E_low"], r["E_high"]) for r in rows]),
                         "median_design_effect": float(np.median([r.get("design_effect", 1.0) for r in rows]))
                         if rows else None,
                         "significant_bh": res.significant_bh, "lookups": res.lookups,
                         "pairs_with_p": sum(r["p"] is not None for r in rows)},
           "independent": {"median_width": width(wil),
                           "significant_bh": sum(q is not None and q < 0.05 for q in q_ind),
                           "lookups": sum(q is not None and q < 0.05 and r["E_norm"] is not None and r["E"] > r["E_norm"]
                                          for q, r in zip(q_ind, rows))}}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
