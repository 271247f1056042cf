"""What the attribution-patching screen of ``heads roles`` buys: every head's ablation effect on a role's task
from one forward + backward, against the naive loop (one real ablation pass per head and task).

    python bench/roles_screen.py [--task repeat|text] [--limit N] [--seqs 8] [--half-len 30]

Task ``repeat`` (the induction role's: loss on the second copy of [BOS, r, r]) or ``text`` (next-token loss
on held-out natural text). The naive loop runs a full forward pass per head (no resume: as a user without
headscope would) for ``--limit`` heads spread over all layers (all heads when 0) and extrapolates its time
linearly to every head. Prints both timings, their ratio and the Spearman / Pearson agreement of the screen
with the real ablations it ran, as one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import stats

from headscope.capture import HeadIntervention, capture
from headscope.data import TokenCorpus
from headscope.heads import causal as C
from headscope.heads.scores import repeated_random_tokens
from headscope.sampling import Windows
from headscope.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("repeat", "text"), default="repeat")
    ap.add_argument("--limit", type=int, default=0, help="heads in the naive loop (0: all)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--half-len", type=int, default=30)
    a = ap.parse_args()
    m = load_model("default")
    if a.task == "repeat":
        task = C.Task("repeat", repeated_random_tokens(m, a.seqs, a.half_len, seed=1), np.arange(a.seqs),
                      half_len=a.half_len)
        metric_lp = lambda lp: C.repeat_loss(lp, task.ids, a.half_len)  # noqa: E731
    else:
        win = Windows(TokenCorpus(m, "default", seq_len=128, progress=False), "heldout", seed=0)
        task = C.Task("text", win.ids(0, a.seqs), np.asarray(win.docs[:a.seqs]))
        metric_lp = lambda lp: C.next_token_loss(lp, task.ids)  # noqa: E731
    t0 = time.perf_counter()
    C.run_clean(m, task)
    t_clean = time.perf_counter() - t0
    t0 = time.perf_counter()
    screen = C.atp(m, task, lambda o: metric_lp(o.logprobs))
    t_screen = time.perf_counter() - t0
    heads = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]
    if a.limit:
        heads = [heads[i] for i in np.linspace(0, len(heads) - 1, a.limit).round().astype(int)]
    clean = metric_lp(task.clean["logprobs"]).mean().item()
    real = []
    t0 = time.perf_counter()
    for l, h in heads:
        kind, value = C.ablated_z(task, l, "mean")
        iv = HeadIntervention(l, [h], kind, value, positions=slice(1, None))
        out = capture(m, task.ids, what=("logprobs",), layers=[], interventions=[iv])
        real.append(metric_lp(out.logprobs).mean().item() - clean)
    t_naive = (time.perf_counter() - t0) * (m.n_layers * m.n_heads) / len(heads)
    est = [float(screen[l, h]) for l, h in heads]
    print(json.dumps({
        "task": a.task, "tokens": int(task.ids.numel()), "threads": torch.get_num_threads(),
        "clean_pass_s": round(t_clean, 2), "screen_s": round(t_screen, 2),
        "naive_loop_s_all_heads": round(t_naive, 1), "naive_heads_timed": len(heads),
        "ratio_naive_over_screen": round(t_naive / t_screen, 1),
        "spearman": round(float(stats.spearmanr(est, real).statistic), 3),
        "pearson": round(float(stats.pearsonr(est, real).statistic), 3)}))


if __name__ == "__main__":
    main()
