"""Mining throughput vs the bare forward pass.

    python bench/neurons.py [--model default] [--tokens 16384] [--neurons 60] [--batch-size 16]

Runs the same corpus batches (a) through the bare Hugging Face forward pass (no hooks, no logits kept)
and (b) through ``mining.top_sequences`` for N neurons spread over the last three layers (one pass
serves all neurons; running top-k), and prints tokens/s for each and their ratio. Also times the
trimming of the mined prompts (binary search, batched). Prints one JSON line at the end.
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
    args = ap.parse_args()
    model = load_model(args.model, device=args.device)
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


if __name__ == "__main__":
    main()
