"""Explanation scores on a real run (the numbers in docs/explain.md): SAE feature explanations from the
offline statistical explainer and from the local chat model, each judged by detection and fuzzing beside
the shuffled-explanation baseline, with 95 % bootstrap CIs.

Usage: python bench/explain.py RUN_DIR [--features N] [--local-features M] [--sae NAME] [--model SPEC]
RUN_DIR must hold an SAE with dashboards (headscope sae train + sae dashboards, e.g. the demo study).
The local-model part (SmolLM2-135M-Instruct, the embedded default model, as explainer and judge, Yes/No
read from its logits) runs on the first M of the N features. Prints one line per (explanations, judge,
scorer) and writes the usual artifacts under RUN_DIR/explain/features/<sae>/.
"""

from __future__ import annotations

import argparse
import time

from headscope.explain.features import (FeatureExplainOptions, FeatureScoreOptions, run_explain_features,
                                        run_score_features, sae_name)
from headscope.models import load_model
from headscope.runs import RunDir


def fmt(m):
    if not m or m.get("mean") is None:
        return "n/a"
    ci = m.get("ci") or [float("nan")] * 2
    return f"{m['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def report(tag, s, secs):
    for kind in ("detection", "fuzzing"):
        k = getattr(s, kind)
        line = (f"{tag:34s} {kind:9s} BA {fmt(k['balanced_accuracy'])}  shuffled {fmt(k['shuffled_balanced_accuracy'])}"
                f"  diff {fmt(k['difference'])} p={k['difference'].get('p_wilcoxon')}  n={k['units']}")
        if k.get("auroc"):
            line += f"  AUROC {fmt(k['auroc'])} shuffled {fmt(k['shuffled_auroc'])}"
        print(line, flush=True)
    print(f"{'':34s} ({secs:.0f} s; judgements from {s.probabilities})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--local-features", type=int, default=16)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--model", default="default", help="the model RUN_DIR was made with")
    ap.add_argument("--sae", default="", help="the SAE under RUN_DIR/sae/ (default: the only one with dashboards)")
    a = ap.parse_args()
    model = load_model(a.model)
    run = RunDir(a.run, model.identity())
    sae = sae_name(run, a.sae)
    t = time.time()
    run_explain_features(model, run, FeatureExplainOptions(sae=sae, features=a.features, windows=a.windows),
                         progress=False)
    s = run_score_features(model, run, FeatureScoreOptions(sae=sae), progress=False)
    report("statistical expl., statistical judge", s, time.time() - t)
    if a.local_features:
        # the first M features (a subset of the N: the same contexts per feature), explained by the local model
        t = time.time()
        run_explain_features(model, run, FeatureExplainOptions(sae=sae, backend="local", features=a.local_features,
                                                               windows=a.windows), progress=False)
        print(f"local explanations of {a.local_features} features: {time.time() - t:.0f} s", flush=True)
        t = time.time()
        s = run_score_features(model, run, FeatureScoreOptions(sae=sae, backend="local", explanations="statistical"),
                               progress=False)
        report("statistical expl., local judge", s, time.time() - t)
        t = time.time()
        s = run_score_features(model, run, FeatureScoreOptions(sae=sae, backend="local"), progress=False)
        report("local expl., local judge", s, time.time() - t)


if __name__ == "__main__":
    main()
