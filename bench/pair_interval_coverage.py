"""Coverage of a pair's E interval and size of its test when prompts share documents (simulated).

    PYTHONPATH=src python bench/pair_interval_coverage.py [--reps 1000] [--out bench/pair_interval_coverage.json]

Each case: G documents of m prompts each (half active, half inactive); a document's chance of a right
answer is drawn from a Beta with mean E and intra-document correlation ρ (ρ = 0: independent prompts).
Per case, over ``reps`` simulated pairs: how often the 95 % interval contains the true E and its mean width,
for the interval ``explain score`` reports (:func:`headscope.explain.scoring.document_interval`: Wilson on the
design-effect sample size with the t_{G−1} adjustment), Wilson's on all prompts as if independent, and a
percentile bootstrap over documents; and, at E = ½, how often the one-sided p < 0.05 for the sign-flip test
over documents (:func:`headscope.explain.scoring.sign_flip_p`) and the binomial test on all prompts.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

CASES = [(4, 8, 0.3), (6, 6, 0.3), (8, 5, 0.2), (6, 6, 0.0), (20, 2, 0.1), (3, 10, 0.0)]


def _draw(rng, G: int, m: int, rho: float, E: float):
    """(correct [G·m], truth [G·m], docs [G·m]) for one simulated pair."""
    if rho > 0:
        a = E * (1 / rho - 1)
        pg = rng.beta(a, (1 - E) / E * a, G)
    else:
        pg = np.full(G, E)
    docs = np.repeat(np.arange(G), m)
    correct = rng.random(G * m) < pg[docs]
    truth = np.tile(np.arange(m) % 2 == 0, G)
    return correct, truth, docs


def main(argv=None) -> int:
    from scipy.stats import binomtest
    from headscope.explain.scoring import document_interval, sign_flip_p, wilson
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--E", type=float, default=0.7)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for G, m, rho in CASES:
        cov = {"document": 0, "wilson": 0, "bootstrap": 0}
        width = dict.fromkeys(cov, 0.0)
        for _ in range(a.reps):
            c, t, d = _draw(rng, G, m, rho, a.E)
            w = rng.multinomial(G, np.full(G, 1 / G), size=1000)[:, d].astype(float)
            boot = np.quantile((w @ c) / w.sum(1), [0.025, 0.975])
            for name, (lo, hi) in (("document", document_interval(c, list(d))[:2]),
                                   ("wilson", wilson(float(c.mean()), len(c))), ("bootstrap", tuple(boot))):
                cov[name] += lo <= a.E <= hi
                width[name] += hi - lo
        size = {"sign_flip": 0, "binomial": 0}
        for _ in range(a.reps):
            c, t, d = _draw(rng, G, m, rho, 0.5)
            size["sign_flip"] += sign_flip_p(c, t, list(d)) < 0.05
            size["binomial"] += binomtest(int(c.sum()), len(c), alternative="greater").pvalue < 0.05
        rows.append({"documents": G, "prompts_per_document": m, "icc": rho,
                     "coverage": {k: v / a.reps for k, v in cov.items()},
                     "mean_width": {k: round(v / a.reps, 4) for k, v in width.items()},
                     "rejection_rate_at_chance": {k: v / a.reps for k, v in size.items()}})
        print(json.dumps(rows[-1]), flush=True)
    out = {"E": a.E, "reps": a.reps, "level": 0.95, "alpha": 0.05, "cases": rows}
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
