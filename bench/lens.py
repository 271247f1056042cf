"""Benchmark the lens trainer, in one run (prints a table; nothing is asserted):

* the model's bare forward pass (tokens/s, and token·heads/s for the heads of the layer);
* the batched trainer step (all heads' lens logits and backward in one batched computation);
* a per-head loop in the style of the reference code (msakarvadia/AttentionLens): one
  ``nn.Linear(d, V)`` lens per head initialised from W_U, called head by head and, with
  ``--reference-positions``, position by position as the reference forward does;
* peak memory (resident set size of this process; CUDA peak when run on a GPU).

Usage: ``python bench/lens.py [--model default] [--layer 18] [--tokens 1024] [--kind affine]``
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per measured step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kind", default="affine", choices=("affine", "lowrank", "full"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--reference-positions", action="store_true",
                    help="reference loop also iterates over positions (as msakarvadia/AttentionLens does)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from headscope.data import TokenCorpus
    from headscope.lens.collect import site_batch
    from headscope.lens.lenses import LensBank, LensConfig
    from headscope.lens.objectives import forward_kl, next_tokens
    from headscope.lens.options import LensTrainConfig
    from headscope.lens.train import train_step
    from headscope.models.load import load_model

    m = load_model(args.model, device=args.device)
    sites = [(args.layer, h) for h in range(m.n_heads)]
    K = len(sites)
    corpus = TokenCorpus(m, seq_len=args.seq_len)
    B = max(1, args.tokens // args.seq_len)
    ids = next(corpus.batches("train", B)).to(m.device)
    N = ids.numel()
    rows = []

    def timed(fn):
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(args.reps):
            fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.reps

    with torch.no_grad():
        t_fwd = timed(lambda: m.hf(input_ids=ids, use_cache=False))
    rows.append(("model forward (bare)", N / t_fwd, N * K / t_fwd))
    t_cap = timed(lambda: site_batch(m, ids, sites))
    rows.append(("model forward + capture of the layer's results", N / t_cap, N * K / t_cap))

    R, logp = site_batch(m, ids, sites)
    nxt = next_tokens(ids.cpu()).to(m.device)
    bank = LensBank(m, sites, LensConfig(kind=args.kind)).to(m.device)
    gen = torch.Generator().manual_seed(0)

    def step_time(lens_bank, **opts) -> float:
        """Seconds per batched trainer step of ``lens_bank`` with LensTrainConfig options ``opts``."""
        c = LensTrainConfig(chunk_tokens=256, **opts)

        def step():
            lens_bank.zero_grad(set_to_none=True)
            train_step(lens_bank, R, logp, nxt, c, gen)
        return timed(step)

    t_b = step_time(bank)
    rows.append((f"batched trainer step ({args.kind}, {K} heads)", N / t_b, N * K / t_b))
    t_bb = step_time(bank, compute_dtype="bfloat16")
    rows.append((f"batched trainer step, bf16 logits ({args.kind})", N / t_bb, N * K / t_bb))
    t_sl = step_time(bank, objective="fkl_shortlist")
    rows.append((f"batched trainer step, shortlist fKL ({args.kind})", N / t_sl, N * K / t_sl))

    # reference style: a full Linear(d, V) per head, heads in a Python loop (and positions, optionally)
    W_U = m.W_U.detach().float()
    lenses = []
    for _ in range(K):
        lin = torch.nn.Linear(m.d_model, m.d_vocab).to(m.device)
        with torch.no_grad():
            lin.weight.copy_(W_U)
            lin.bias.copy_(m.b_U.detach().float() if m.b_U is not None else torch.zeros(m.d_vocab))
        lenses.append(lin)
    n_ref = N if not args.reference_positions else min(N, 64)

    def reference():
        for k, lin in enumerate(lenses):
            lin.zero_grad(set_to_none=True)
            if args.reference_positions:
                for t in range(n_ref):
                    loss = forward_kl(lin(R[k, t:t + 1]).unsqueeze(0), logp[t:t + 1])[0] / n_ref
                    loss.backward()
            else:
                for a in range(0, n_ref, 256):
                    b = min(n_ref, a + 256)
                    loss = forward_kl(lin(R[k, a:b]).unsqueeze(0), logp[a:b])[0] * (b - a) / n_ref
                    loss.backward()

    t_r = timed(reference)
    label = "reference-style loop (full Linear per head" + (", per position)" if args.reference_positions else ")")
    rows.append((label, n_ref / t_r, n_ref * K / t_r))
    full = LensBank(m, sites, LensConfig(kind="full")).to(m.device)
    t_f = step_time(full)
    rows.append((f"batched trainer step (full, {K} heads)", N / t_f, N * K / t_f))

    print(f"model {m.name}, layer {args.layer}, {K} heads, {N} tokens per step, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'what':<58} {'tokens/s':>10} {'token·heads/s':>14}")
    for name, tps, thps in rows:
        print(f"{name:<58} {tps:10.1f} {thps:14.1f}")
    print(f"batched {args.kind} vs reference-style loop: {(N * K / t_b) / (n_ref * K / t_r):.1f}x; "
          f"batched full vs reference-style loop: {(N * K / t_f) / (n_ref * K / t_r):.1f}x; "
          f"lens step / bare forward time: {t_b / t_fwd:.2f}; shortlist vs exact fKL step: {t_b / t_sl:.1f}x")
    print(f"peak memory: {_peak_mb(args.device):.0f} MiB")


if __name__ == "__main__":
    main()
