"""Capture cost: z and per-head results of every layer, vs the bare forward pass, vs TransformerLens.

    python bench/capture.py [--batch 8 --seq 128 --repeats 5 --threads 2]

All three run the same model (the embedded default, SmolLM2-135M) on the same batch in one process:
  * bare     — the Hugging Face model's forward pass;
  * headscope — `capture(model, ids, what=("z", "result"))` for all 30 layers;
  * TransformerLens — a HookedTransformer built from the same weights (convert_llama_weights), with
    `run_with_cache(names_filter=hook_z|hook_result)`, use_attn_result=True.
Prints the median wall time of each and the ratios; peak RSS growth is printed too. Checks first that the
three agree (logits, z), so the timings compare like with like.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def tl_from(model):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    c = model.hf.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=model.d_head, n_layers=c.num_hidden_layers, n_ctx=2048, n_heads=model.n_heads,
        n_key_value_heads=model.n_kv_heads, d_mlp=c.intermediate_size, d_vocab=c.vocab_size, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=model.d_head, rotary_base=rope,
        gated_mlp=True, final_rms=True, eps=c.rms_norm_eps, use_attn_result=True, default_prepend_bos=False,
        original_architecture="LlamaForCausalLM", device="cpu", dtype=torch.float32)
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_llama_weights(model.hf, cfg), strict=False)
    return tl.eval()


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from headscope.capture import capture
    from headscope.data import TokenCorpus
    from headscope.models import load_model
    model = load_model("default")
    ids = next(TokenCorpus(model, seq_len=args.seq, progress=False).batches("heldout", batch_size=args.batch))
    tl = tl_from(model)

    with torch.no_grad():
        bare_logits = model.hf(ids).logits
        tl_logits, cache = tl.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_z", "hook_result")))
    got = capture(model, ids, what=("z", "result"))
    dz = max((got["z"][l] - cache[f"blocks.{l}.attn.hook_z"]).abs().max().item() for l in range(model.n_layers))
    dr = max((got["result"][l] - cache[f"blocks.{l}.attn.hook_result"]).abs().max().item()
             for l in range(model.n_layers))
    dl = (bare_logits - tl_logits).abs().max().item()
    print(f"agreement: max|Δlogits| HF vs TL = {dl:.2e}, max|Δz| = {dz:.2e}, max|Δresult| = {dr:.2e}")
    del cache, got

    def bare():
        with torch.no_grad():
            model.hf(ids)

    def ours():
        capture(model, ids, what=("z", "result"))

    def ours_z():
        capture(model, ids, what=("z",))

    def theirs():
        with torch.no_grad():
            tl.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_z", "hook_result")))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_bare = timeit(bare, args.repeats)
    t_z = timeit(ours_z, args.repeats)
    t_ours = timeit(ours, args.repeats)
    t_tl = timeit(theirs, args.repeats)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    toks = args.batch * args.seq
    print(f"model {model.name}, batch {args.batch}×{args.seq} = {toks} tokens, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"  bare HF forward                 {t_bare * 1e3:8.1f} ms   1.00×")
    print(f"  headscope capture z             {t_z * 1e3:8.1f} ms   {t_z / t_bare:.2f}×")
    print(f"  headscope capture z + result    {t_ours * 1e3:8.1f} ms   {t_ours / t_bare:.2f}×")
    print(f"  TransformerLens z + result      {t_tl * 1e3:8.1f} ms   {t_tl / t_bare:.2f}×")
    print(f"  headscope vs TransformerLens: {t_tl / t_ours:.2f}× faster; peak RSS {rss1 / 1024:.0f} MiB "
          f"(grew {max(0, rss1 - rss0) / 1024:.0f} MiB during timing)")


if __name__ == "__main__":
    main()
