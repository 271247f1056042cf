"""Seconds per look-up stage on the embedded model, for two prompt budgets, as the demo runs them.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/lookups_timing.py OUT --top-k 50 --top-k-test 40 --max-tokens 32768

Runs the demo's neurons.find (last 3 layers, 4 per layer) → neurons.mine (trim tolerance 0.5) →
neurons.attribute → explain.run → explain.score → explain.baseline (2 random neurons per layer) →
neurons.ablate (12 pairs), printing each stage's seconds and the look-up readings (E per neuron vs the
shuffled, same-head, ‖z‖ and probe baselines); writes ``OUT/timing.json``. CPU seconds (the process's, all
threads) are recorded beside wall seconds: on a shared machine they are the comparable figure.
"""

from __future__ import annotations

import argparse
import json
import time

from headscope.explain import stages as ex
from headscope.explain.options import BaselineOptions, RunOptions, ScoreOptions
from headscope.models.load import load_model
from headscope.neurons import stages as ns
from headscope.neurons.options import AblateOptions, AttributeOptions, FindOptions, MineOptions
from headscope.runs import RunDir, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--top-k-test", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--trim-tolerance", type=float, default=0.5)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    model = load_model("default")
    run = RunDir(args.out, model.identity())
    out: dict = {"options": vars(args), "seconds": {}}

    out["cpu_seconds"] = {}

    def step(name, fn, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        res = fn(*a, **k)
        res = res.to_json() if hasattr(res, "to_json") else res          # typed stage results
        out["seconds"][name] = round(time.perf_counter() - t, 1)
        out["cpu_seconds"][name] = round(time.process_time() - c, 1)
        print(f"{name}: {out['seconds'][name]} s wall, {out['cpu_seconds'][name]} s CPU  "
              f"{json.dumps(res, default=str)[:1500]}", flush=True)
        return res

    step("neurons.find", ns.run_find, model, run, FindOptions(last_k=3, per_layer=4))
    out["mine"] = step("neurons.mine", ns.run_mine, model, run,
                       MineOptions(top_k=args.top_k, top_k_test=args.top_k_test, max_tokens=args.max_tokens,
                                   trim_tolerance=args.trim_tolerance), progress=False)
    out["attribute"] = step("neurons.attribute", ns.run_attribute, model, run, AttributeOptions(), progress=False)
    step("explain.run", ex.run_explain, model, run, RunOptions(), progress=False)
    out["score"] = step("explain.score", ex.run_score, model, run, ScoreOptions(), progress=False)
    step("neurons.ablate", ns.run_ablate, model, run, AblateOptions(which="top", max_pairs=12), progress=False)
    if not args.skip_baseline:
        out["baseline"] = step("explain.baseline", ex.run_random_baseline, model, run, BaselineOptions(per_layer=2),
                               progress=False)
    write_json(run / "timing.json", out)


if __name__ == "__main__":
    main()
