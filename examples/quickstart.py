"""headscope from Python: head scores, lenses and an attention SAE for one model, as a notebook would.

    python examples/quickstart.py [RUN_DIR]            # the embedded SmolLM2-135M (a few minutes on a CPU)
    HEADSCOPE_EXAMPLE_TINY=1 python examples/quickstart.py /tmp/x   # a tiny random model (seconds; CI)

Each call goes through the stage contract: run it twice and the second run reuses every finished step.
"""

import os
import sys

import torch

from headscope import open_run

TINY = os.environ.get("HEADSCOPE_EXAMPLE_TINY") == "1"
out = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"

if TINY:
    from headscope.testing import tiny_model
    model = tiny_model("llama_gqa")            # any headscope Model or transformers causal LM works here
    layer, heads = 2, dict(n_seqs=4, half_len=8, prefix_examples=0)
    lens = dict(tokens=512, init_tokens=512, batch_size=4)
    lens_eval = dict(tokens=128, batch_size=4)
    sae = dict(n_tokens=2048, batch_size=256, buffer_tokens=512, expansion=2, k=4, seq_len=32)
    sae_eval = dict(n_tokens=256, mean_tokens=512, n_boot=100)
else:
    model = "default"                          # the embedded SmolLM2-135M-Instruct
    layer, heads = 18, dict()
    lens = dict(tokens=4096, init_tokens=2048)
    lens_eval = dict(tokens=512, stride=11)
    sae = dict(n_tokens=40_000, batch_size=512, k=32)
    sae_eval = dict(n_tokens=4096)

run = open_run(out, model=model)

# 1. head scores: a typed result (the top heads), and the scores as [n_layers, n_heads] tensors
res = run.heads.score(**heads)
print("top previous-token heads:", res.top["prev_token"][:3])
scores = run.heads.load()
ind = torch.nan_to_num(scores["induction"], nan=-1.0)
top = ind.flatten().topk(3).indices
print("top induction heads:", ", ".join(f"{i // ind.shape[1]}.{i % ind.shape[1]}={ind.flatten()[i]:.2f}"
                                        for i in top.tolist()))

# 2. one lens per head of one layer, judged on held-out text against a null lens
run.lens.train(layers=str(layer), **lens)
res = run.lens.eval(**lens_eval)
print(f"lenses: {res.n_informative}/{res.n_heads} informative (BH q = 0.05), "
      f"median gain {res.median_gain:+.3f} bits/token; control lens {res.control_gain}")
bank = run.lens.load()
print(f"lens bank: {len(bank.sites)} heads, e.g. {bank.sites[0]}")

# 3. an attention-output SAE on that layer, evaluated with CIs, and loaded as a module
run.sae.train(layer=layer, name=f"L{layer}", **sae)
ev = run.sae.eval(name=f"L{layer}", **sae_eval)
sae_module = run.sae.load(f"L{layer}")
print(f"SAE L{layer}: d_sae = {sae_module.cfg.d_sae}, L0 {ev.l0:.1f}, FVE {ev.fve}, "
      f"headline {ev.headline['score']} = {ev.headline['value']}")
