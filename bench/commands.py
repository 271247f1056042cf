"""What each pipeline command costs on the default model, next to a bare forward pass over the same tokens.

    python bench/commands.py [--only heads.score,lens.train] [--out runs/bench-commands] [--json FILE]

Runs every stage of the registry in pipeline order, each with its CLI defaults (the few overrides — where a
default would run for an hour on a 2-core CPU — are listed in OVERRIDES and printed in the table), through the
same stage contract as the CLI (forced, so each really runs), in one process on one loaded model. For each it
prints the wall time, the model-forward tokens it processes (from its options: FORWARD_TOKENS), tokens/s,
and the ratio of its time to a bare forward pass over that many tokens (the bare pass's rate is measured in
the same run: batch 8 × 128 tokens of the default corpus). A ratio near 1 means the stage costs about one
forward pass per token; above that is the instrument's own work (training, vocabulary-sized logits, …).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

OVERRIDES = {
    "lens.train": {"layers": "18"},                 # default: all 270 heads (~30 min here)
    "sae.train": {"layer": 18, "n_tokens": 65536},   # default: 2M tokens
    "sae.eval": {"name": "L18"}, "sae.analysis": {"name": "L18"}, "sae.dashboards": {"name": "L18"},
    "sae.ioi": {"name": "L18", "max_features": 10},  # default: every live feature (over 7 min here, not finished)
    "neurons.find": {"per_layer": 4},                 # default: 20 per layer (60 neurons: mining for an hour here)
    "neurons.mine": {"max_tokens": 16384},            # default: the whole corpus
    "neurons.ablate": {"max_pairs": 15},              # default: every pair (~120 here)
    "explain.baseline": {"per_layer": 2},             # default: as many random neurons as congruent ones
    "explain.features": {"sae": "L18"}, "explain.score-features": {"sae": "L18"},   # required: which SAE
}


def forward_tokens(name: str, o) -> int | None:
    """Model-forward tokens a stage processes with options ``o`` (None where it is not a token count)."""
    g = lambda k, d=0: getattr(o, k, d) or d  # noqa: E731
    table = {
        "heads.score": lambda: g("n_seqs") * (2 * g("half_len") + 1) + g("prefix_examples") * len(g("prefix_lengths", [1])) * 128,
        "lens.train": lambda: g("init_tokens") + g("tokens"),
        "lens.eval": lambda: g("tokens"),
        "sae.train": lambda: g("n_tokens"),
        "sae.eval": lambda: 4 * g("n_tokens"),     # clean, SAE-spliced, zero- and mean-ablated passes
        "sae.dashboards": lambda: g("n_tokens"),
        "neurons.mine": lambda: 2 * g("max_tokens"),
    }
    return table[name]() if name in table else None


def bare_rate(model, corpus: str = "default", tokens: int = 16384) -> float:
    """Tokens/s of the bare HF forward pass (no hooks), batch 8 × 128."""
    from headscope.data import TokenCorpus
    tc = TokenCorpus(model, corpus, seq_len=128)
    batches = list(tc.batches("train", batch_size=8, max_tokens=tokens))
    with torch.no_grad():
        model.hf(input_ids=batches[0].to(model.device), use_cache=False)  # warm-up
        t, n = time.perf_counter(), 0
        for b in batches:
            model.hf(input_ids=b.to(model.device), use_cache=False)
            n += b.numel()
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated stage names")
    ap.add_argument("--out", default="runs/bench-commands")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from headscope.errors import HeadscopeError
    from headscope.models.load import load_model
    from headscope.registry import stages
    from headscope.runs import RunDir, run_stage
    model = load_model("default")
    run = RunDir(a.out, model.identity())
    rate = bare_rate(model)
    print(f"bare forward: {rate:.0f} tokens/s ({torch.get_num_threads()} threads)", file=sys.stderr)
    only = set(a.only.split(",")) if a.only else None
    rows = []
    # the table is printed (and the JSON rewritten) row by row, so an interrupted run keeps what it measured
    print("| command | options changed from the defaults | wall s | forward tokens | tokens/s | × bare forward |")
    print("|---|---|---:|---:|---:|---:|", flush=True)
    for st in stages():
        if only and st.name not in only:
            continue
        over = OVERRIDES.get(st.name, {})
        try:
            opts = st.options(**over)
        except (TypeError, HeadscopeError) as e:
            print(f"{st.name}: skipped ({e})", file=sys.stderr)
            continue
        print(f"{st.name} …", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            run_stage(model, run, st, opts, force=True, progress=False)
        except Exception as e:  # noqa: BLE001 — a stage that needs what this machine lacks (an LLM endpoint) is named, not fatal
            print(f"| `{st.name.replace('.', ' ', 1)}` | not run: {str(e).splitlines()[0][:120]} | | | | |", flush=True)
            continue
        sec = time.perf_counter() - t
        n = forward_tokens(st.name, opts)
        rows.append({"stage": st.name, "overrides": over, "seconds": round(sec, 1), "tokens": n,
                     "tokens_per_s": round(n / sec) if n else None,
                     "ratio_to_forward": round(sec / (n / rate), 2) if n else None})
        r = rows[-1]
        over_s = ", ".join(f"{k}={v}" for k, v in over.items()) or "—"
        print(f"| `{r['stage'].replace('.', ' ', 1)}` | {over_s} | {r['seconds']} | {r['tokens'] or '—'} | "
              f"{r['tokens_per_s'] or '—'} | {r['ratio_to_forward'] or '—'} |", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"bare_tokens_per_s": rate, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
