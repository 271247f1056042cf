"""Cost of reading every head in context at atlas build (:func:`headscope.atlas.build.example_readings`)
on the real default model, next to what it replaces (the lens ``show`` of every head on each example
prompt, which also formed the unembedding baseline), and what head 18.6 writes on the first example prompt.

    PYTHONPATH=src python bench/in_context_timing.py [RUN_DIR with lens/ for the default model]

Writes what it printed to bench/in_context_timing.json (the figures docs/atlas.md quotes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from headscope.atlas.build import DEFAULT_EXAMPLES, MAX_EXAMPLE_TOKENS, example_readings
from headscope.heads.in_context import read_in_context
from headscope.models import load_model


def old_example_lens(model, run_dir: Path, prompts, k: int = 5) -> None:
    """What the atlas build ran before (by probability, the unembedding baseline of every head)."""
    from headscope.lens.apply import load_gains, show
    from headscope.lens.lenses import load_bank
    bank = load_bank(model, run_dir / "lens")[0]
    gains = load_gains(run_dir / "lens")
    for text in prompts:
        ids = model.to_tokens(text)[:, :MAX_EXAMPLE_TOKENS]
        show(model, bank, model.tokenizer.decode(ids[0, 1:].tolist()), k=k, gains=gains, by="prob")


def main() -> None:
    model = load_model("default")
    out = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "seconds": {}}
    print(f"torch threads {out['threads']}, load average {out['load_average']:.1f}")
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    t0 = time.perf_counter()
    res = [read_in_context(model, model.to_tokens(t)[:, :MAX_EXAMPLE_TOKENS]) for t in DEFAULT_EXAMPLES]
    out["seconds"]["read_in_context_no_lens"] = round(time.perf_counter() - t0, 1)
    print(f"read_in_context, all {model.n_layers * model.n_heads} heads, {len(DEFAULT_EXAMPLES)} prompts, "
          f"no lens: {out['seconds']['read_in_context_no_lens']} s")
    if run is not None:
        from headscope.lens.lenses import load_bank
        out["lensed_heads"] = len(load_bank(model, run / "lens")[0].sites)
        t0 = time.perf_counter()
        example_readings(model, run, DEFAULT_EXAMPLES)
        out["seconds"]["example_readings_new"] = round(time.perf_counter() - t0, 1)
        print(f"example_readings with the run's {out['lensed_heads']} lenses (new atlas build step): "
              f"{out['seconds']['example_readings_new']} s")
        t0 = time.perf_counter()
        old_example_lens(model, run, DEFAULT_EXAMPLES)
        out["seconds"]["example_lens_old"] = round(time.perf_counter() - t0, 1)
        print(f"old example_lens (show by probability, with baselines): {out['seconds']['example_lens_old']} s")
    ids = model.to_tokens(DEFAULT_EXAMPLES[0])
    toks = model.token_str(ids[0])
    rec = res[0]["18.6"]
    print("head 18.6 on the first example prompt: t token -> attended source (weight) | rank in its direct "
          "logits of the attended token, of the token after it")
    out["head_18_6"] = []
    for t in range(1, len(toks)):
        s = rec["src"][t]
        out["head_18_6"].append({"t": t, "token": toks[t], "src": s, "src_token": toks[s], "weight": rec["weight"][t],
                                 "dla_rank_src": rec["dla_rank_src"][t], "dla_rank_next": rec["dla_rank_next"][t]})
        print(f"  {t:2d} {toks[t]!r:10} -> {s:2d} {toks[s]!r:10} ({rec['weight'][t]:.2f})  "
              f"attended {rec['dla_rank_src'][t]:>6}  next {rec['dla_rank_next'][t]}")
    (Path(__file__).parent / "in_context_timing.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
