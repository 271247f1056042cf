"""The look-ups' readings on a model, as the demo study computes them (congruent vs random neurons).

    python bench/neurons_readings.py --out runs/neurons-readings [--model default] [--per-layer 4]
        [--top-k 12] [--top-k-test 40] [--max-tokens 20000] [--max-pairs 30] [--local-pairs 0]

Runs find (centred W_U) → mine → attribute → explain (statistical) → score (balanced, Wilson CI, BH,
shuffled-explanation control) → random-neuron baseline → comparison per neuron → ablation (per pair,
per neuron, vs random), prints each stage's seconds and summary, the top-set overlap of the centred
and raw W_U conventions, and with ``--local-pairs N`` explains and scores N pairs with the local chat
model (the embedded SmolLM2-135M-Instruct) end to end. Writes everything under ``--out`` and one JSON
line (``readings.json``) with the figures docs/neurons.md quotes.
"""

from __future__ import annotations

import argparse
import json
import time

from headscope.explain import stages as ex
from headscope.explain.options import BaselineOptions, RunOptions, ScoreOptions
from headscope.models.load import load_model
from headscope.neurons import congruence
from headscope.neurons import stages as ns
from headscope.neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
from headscope.runs import RunDir, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--last-k", type=int, default=3)
    ap.add_argument("--per-layer", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=12)
    ap.add_argument("--top-k-test", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--max-pairs", type=int, default=30)
    ap.add_argument("--local-pairs", type=int, default=0, help="also explain+score this many pairs with the local chat model")
    args = ap.parse_args()
    model = load_model(args.model, device=args.device)
    run = RunDir(args.out, model.identity())
    out: dict = {"model": model.name}
    t0 = time.perf_counter()

    def step(name, fn, *a, **k):
        t = time.perf_counter()
        res = fn(*a, **k)
        res = res.to_json() if hasattr(res, "to_json") else res          # typed stage results
        out.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        print(f"[{time.perf_counter() - t0:7.1f}s] {name}: {json.dumps(res, default=str)[:1500]}", flush=True)
        return res

    layers = list(range(model.n_layers - args.last_k, model.n_layers))
    out["unembed_overlap"] = step("overlap", congruence.top_set_overlap, model, layers, per_layer=20)
    step("find", ns.run_find, model, run, FindOptions(last_k=args.last_k, per_layer=args.per_layer))
    step("mine", ns.run_mine, model, run, MineOptions(top_k=args.top_k, top_k_test=args.top_k_test, max_tokens=args.max_tokens))
    step("attribute", ns.run_attribute, model, run, AttributeOptions())
    step("explain", ex.run_explain, model, run, RunOptions())
    out["score"] = step("score", ex.run_score, model, run, ScoreOptions())
    out["compare"] = step("baseline", ex.run_random_baseline, model, run, BaselineOptions())
    out["random_score"] = json.loads((run / "explain/random/scores_statistical.json").read_text())["summary"]
    out["ablate"] = step("ablate", ns.run_ablate, model, run, AblateOptions(max_pairs=args.max_pairs))
    if args.local_pairs:
        from headscope.explain.hf_local import LocalHFExplainer
        be = LocalHFExplainer(model)     # the studied model is itself the chat model (SmolLM2-135M-Instruct)
        step("local.explain", ex.run_explain, model, run, RunOptions(backend="local", max_pairs=args.local_pairs),
             backend=be)
        out["local_score"] = step("local.score", ex.run_score, model, run, ScoreOptions(backend="local"), backend=be)
    write_json(run / "readings.json", out)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
