"""Mining throughput vs the bare forward pass.

    python bench/neurons.py [--model default] [--tokens 16384] [--neurons 60] [--batch-size 16]

Runs the same corpus batches (a) through the bare Hugging Face forward pass (no hooks, no logits kept)
and (b) through ``mining.top_sequences`` for N neurons spread over the last three layers (one pass
serves all neurons; running top-k), and prints tokens/s for each and their ratio. Also times the
trimming of the mined prompts (binary search, batched). Prints one JSON line at the end.

    python bench/neurons.py --ablation [--pairs 24] [--prompts 20]

times the ablations instead: the same drops computed batched over pairs and prompts
(``ablation.ablation_drops``) and by the per-pair loop (``ablation_drops_per_pair``), on random prompts
of 8–40 tokens, and checks that they agree.

    python bench/neurons.py --stages RUN [--work DIR]

times the neuron stages of a finished run (e.g. a demo run) on a copy of it (``--work``, default a
temporary folder; RUN is never written): ``mine`` (top, then random: it reads the top set's mining
cache), ``attribute`` and ``ablate`` for both sets with RUN's options, the forward tokens of trimming,
and how many prompts / pairs equal RUN's (what changed, if anything).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from headscope.data import TokenCorpus
from headscope.models.load import load_model
from headscope.neurons import mining


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--neurons", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--ablation", action="store_true", help="time batched vs per-pair ablations instead")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per neuron (ablation bench)")
    ap.add_argument("--stages", default=None, help="time the neuron stages on a copy of this run")
    ap.add_argument("--work", default=None, help="where --stages copies the run (default: a temp folder)")
    args = ap.parse_args()
    model = load_model(args.model, device=args.device)
    if args.ablation:
        return bench_ablation(model, args)
    if args.stages:
        return bench_stages(model, args)
    corpus = TokenCorpus(model, "default", seq_len=args.seq_len)
    layers = list(range(model.n_layers - 3, model.n_layers))
    g = torch.Generator().manual_seed(0)
    neurons = [{"layer": layers[i % 3], "neuron": int(torch.randint(model.d_mlp, (1,), generator=g))}
               for i in range(args.neurons)]
    batches = list(corpus.batches("train", args.batch_size, max_tokens=args.tokens))
    n_tok = sum(b.numel() for b in batches)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():                       # warm-up
        model.hf(input_ids=batches[0].to(model.device), use_cache=False)
    sync(); t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model.hf(input_ids=b.to(model.device), use_cache=False)
    sync(); bare = time.perf_counter() - t
    t = time.perf_counter()
    state = mining.top_sequences(model, corpus, neurons, "train", args.top_k, args.batch_size, args.tokens,
                                 progress=False)
    sync(); mine = time.perf_counter() - t
    t = time.perf_counter()
    prompts = mining.trim_prompts(model, corpus, "train", neurons, state, progress=False)
    sync(); trim = time.perf_counter() - t
    n_prompts = sum(len(p) for p in prompts)
    res = {"model": model.name, "device": str(model.device), "tokens": n_tok, "neurons": len(neurons),
           "bare_tok_s": round(n_tok / bare, 1), "mining_tok_s": round(n_tok / mine, 1),
           "mining_over_bare": round(mine / bare, 3), "trim_prompts": n_prompts, "trim_s": round(trim, 2),
           "torch_threads": torch.get_num_threads()}
    print(f"bare forward: {res['bare_tok_s']} tok/s; mining {len(neurons)} neurons: {res['mining_tok_s']} tok/s "
          f"({res['mining_over_bare']}× the bare time); trimming {n_prompts} prompts: {res['trim_s']} s")
    print(json.dumps(res))


def bench_ablation(model, args) -> None:
    from headscope.neurons import ablation
    g = torch.Generator().manual_seed(0)
    n_neurons = max(1, args.pairs // 4)
    V = model.W_U.shape[0]
    prompts = [[[model.bos_id] + torch.randint(1, V, (int(torch.randint(8, 41, (1,), generator=g)),),
                                              generator=g).tolist() for _ in range(args.prompts)]
               for _ in range(n_neurons)]
    tokens = torch.randint(1, V, (n_neurons,), generator=g).tolist()
    pairs = [{"neuron": i % n_neurons, "layer": int(torch.randint(max(0, model.n_layers - 3), model.n_layers, (1,), generator=g)),
              "head": int(torch.randint(model.n_heads, (1,), generator=g))} for i in range(args.pairs)]
    times = {}
    for name, fn in (("batched", ablation.ablation_drops), ("per_pair", ablation.ablation_drops_per_pair)):
        t = time.perf_counter()
        res = fn(model, pairs, prompts, tokens, batch_size=32, progress=False)
        times[name] = time.perf_counter() - t
        times[name + "_drops"] = res
    diff = max(float((a - b).abs().max()) for a, b in zip(times.pop("batched_drops"), times.pop("per_pair_drops")))
    out = {"model": model.name, "device": str(model.device), "pairs": len(pairs), "prompts_per_neuron": args.prompts,
           "batched_s": round(times["batched"], 2), "per_pair_s": round(times["per_pair"], 2),
           "speedup": round(times["per_pair"] / times["batched"], 2), "max_abs_diff": diff}
    print(f"ablating {len(pairs)} pairs × {args.prompts} prompts: batched {out['batched_s']} s, per-pair loop "
          f"{out['per_pair_s']} s ({out['speedup']}×), max |difference| {diff:.2e}")
    print(json.dumps(out))


def bench_stages(model, args) -> None:
    import shutil
    import tempfile
    from pathlib import Path
    from headscope.neurons import stages as ns
    from headscope.neurons.options import AblateOptions, AttributeOptions, MineOptions
    from headscope.runs import RunDir
    ref = Path(args.stages)
    need = [ref / "run.json"] + [ref / sub / f for sub in ("neurons", "neurons/random")
                                 for f in ("find.json", "mine.json", "attribution.json", "ablation.json")]
    missing = [str(p.relative_to(ref)) for p in need if not p.is_file()]
    if missing:  # e.g. a run whose random set was never ablated (the demo ablates both sets)
        raise SystemExit(f"--stages {ref}: not a finished neuron run, missing {', '.join(missing)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_neurons_")) / "run"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(ref / "run.json", work / "run.json")
    for sub in ("neurons", "neurons/random"):  # only the find results: everything after is recomputed
        (work / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(ref / sub / "find.json", work / sub / "find.json")
    run, refrun = RunDir(work, model.identity()), RunDir(ref, model.identity())
    opt = {f: json.loads((ref / "neurons" / f"{f}.json").read_text())["options"] for f in ("mine", "attribution", "ablation")}
    tokens = {"trim": 0}
    real = mining.capture

    def counting(m, ids, **kw):
        tokens["trim"] += ids.numel()
        return real(m, ids, **kw)
    out = {"model": model.name, "torch_threads": torch.get_num_threads(), "stages": {}}
    key = lambda p: (p["seq"], p["pos"], p["start"])
    for which in ("top", "random"):
        tokens["trim"] = 0
        mining.capture = counting
        t = time.perf_counter()
        ns.run_mine(model, run, MineOptions(which=which, **opt["mine"]), progress=False)
        mining.capture = real
        old = json.loads((ns.set_dir(refrun, which) / "mine.json").read_text())["neurons"]
        new = json.loads((ns.set_dir(run, which) / "mine.json").read_text())["neurons"]
        out["stages"][f"mine.{which}"] = {
            "s": round(time.perf_counter() - t, 1), "forward_tokens_excl_corpus_pass": tokens["trim"],
            "prompts": sum(len(n[k]) for n in new for k in ("train", "test")),
            "same_as_ref": sum(key(a) == key(b) for o, n in zip(old, new) for k in ("train", "test")
                               for a, b in zip(o[k], n[k]))}
    for which in ("top", "random"):
        t = time.perf_counter()
        ns.run_attribute(model, run, AttributeOptions(which=which, **opt["attribution"]), progress=False)
        same = json.loads((ns.set_dir(refrun, which) / "attribution.json").read_text())["pairs"] == \
            json.loads((ns.set_dir(run, which) / "attribution.json").read_text())["pairs"]
        out["stages"][f"attribute.{which}"] = {"s": round(time.perf_counter() - t, 1), "same_pairs_as_ref": same}
    for which in ("top", "random"):
        t = time.perf_counter()
        ns.run_ablate(model, run, AblateOptions(which=which, **opt["ablation"]), progress=False)
        eff = [json.loads((ns.set_dir(r, which) / "ablation.json").read_text())["summary"]["effect"]["mean"]
               for r in (refrun, run)]
        out["stages"][f"ablate.{which}"] = {"s": round(time.perf_counter() - t, 1), "effect_ref": eff[0],
                                            "effect": eff[1]}
    out["total_s"] = round(sum(v["s"] for v in out["stages"].values()), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
