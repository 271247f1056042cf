"""Cost of reading every head in context at atlas build (:func:`headscope.atlas.build.example_readings`)
on the real default model, next to what it replaces (the lens ``show`` of every head on each example
prompt, which also formed the unembedding baseline), and what head 18.6 writes on the first example prompt.

    PYTHONPATH=src python bench/in_context_timing.py [RUN_DIR with lens/ for the default model]
"""

from __future__ import annotations

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
    print(f"torch threads {torch.get_num_threads()}")
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    t0 = time.perf_counter()
    res = [read_in_context(model, model.to_tokens(t)[:, :MAX_EXAMPLE_TOKENS]) for t in DEFAULT_EXAMPLES]
    print(f"read_in_context, all {model.n_layers * model.n_heads} heads, {len(DEFAULT_EXAMPLES)} prompts, "
          f"no lens: {time.perf_counter() - t0:.1f} s")
    if run is not None:
        t0 = time.perf_counter()
        example_readings(model, run, DEFAULT_EXAMPLES)
        print(f"example_readings with the run's lenses (new atlas build step): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        old_example_lens(model, run, DEFAULT_EXAMPLES)
        print(f"old example_lens (show by probability, with baselines): {time.perf_counter() - t0:.1f} s")
    ids = model.to_tokens(DEFAULT_EXAMPLES[0])
    toks = model.token_str(ids[0])
    rec = res[0]["18.6"]
    print("head 18.6 on the first example prompt: t token -> attended source (weight) | rank in its direct "
          "logits of the attended token, of the token after it")
    for t in range(1, len(toks)):
        s = rec["src"][t]
        print(f"  {t:2d} {toks[t]!r:10} -> {s:2d} {toks[s]!r:10} ({rec['weight'][t]:.2f})  "
              f"attended {rec['dla_rank_src'][t]:>6}  next {rec['dla_rank_next'][t]}")


if __name__ == "__main__":
    main()
