"""Head scores on synthetic sequences: induction, previous-token, duplicate-token, prefix induction.

Repeated random tokens (the standard construction): ``[BOS, r_1..r_L, r_1..r_L]``, r uniform over
ordinary (non-special) token ids. With positions 0 = BOS, 1..L the first copy, L+1..2L the second:

* induction score of head h: mean over sequences and second-copy destinations t of
  pattern_h[t, t − L + 1] (attention to the token *after* the previous occurrence of the current one);
* duplicate-token score: mean of pattern_h[t, t − L] (attention to the previous occurrence itself);
* previous-token score: mean over t = 1..2L of pattern_h[t, t − 1].

Prefix induction (Kissane et al., arXiv 2406.17759): random sequences of 128 tokens in which a prefix
of length p (1..9) starting at position i is copied to position j; the score is the attention from
the last token of the copy (j + p − 1) to the token after the first occurrence (i + p), averaged over
examples. Long-prefix induction heads rise with p; ordinary induction heads are high from p = 1.

Every score is reduced inside the capture hook, so memory is [B, H] per layer, not [B, H, S, S].
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from ..capture import capture
from ..errors import HeadscopeError
from ..models.load import Model
from ..runs import RunDir, save_figure, write_json, write_tensors
from .options import ScoreOptions

SCORES = ("induction", "prev_token", "duplicate_token")


def ordinary_token_ids(model: Model) -> torch.Tensor:
    """Ids of ordinary tokens (special tokens removed), [K]."""
    special = set(model.tokenizer.all_special_ids or [])
    ids = [i for i in range(min(model.d_vocab, len(model.tokenizer))) if i not in special]
    if len(ids) < 4:
        raise HeadscopeError(f"{model.name}'s vocabulary has too few ordinary tokens for random sequences")
    return torch.tensor(ids)


def repeated_random_tokens(model: Model, n: int, half_len: int, seed: int = 0) -> torch.Tensor:
    """[n, 2·half_len + 1] sequences ``[BOS, r, r]`` of random ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    pool = ordinary_token_ids(model)
    r = pool[torch.randint(len(pool), (n, half_len), generator=g)]
    bos = torch.full((n, 1), model.bos_id)
    return torch.cat([bos, r, r], dim=1)


def repeat_scores_per_seq(model: Model, seqs: torch.Tensor, half_len: int, batch_size: int = 8,
                          layers: list[int] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Induction, previous-token and duplicate-token scores of each sequence of ``seqs`` [n, 2·half_len + 1]
    (``[BOS, r, r]``), each [n, L, H] (rows of unasked layers are NaN)."""
    model.check_length(seqs.shape[1])
    layers = list(range(model.n_layers)) if layers is None else layers
    n, L, H = seqs.shape[0], model.n_layers, model.n_heads
    out = {k: torch.full((n, L, H), float("nan")) for k in SCORES}
    t2 = torch.arange(half_len + 1, 2 * half_len + 1)
    t_all = torch.arange(1, 2 * half_len + 1)

    def reduce(layer, p):  # p [B, H, S, S] -> [3, B, H]
        p = p.float()
        return torch.stack([
            p[:, :, t2, t2 - half_len + 1].mean(-1),
            p[:, :, t_all, t_all - 1].mean(-1),
            p[:, :, t2, t2 - half_len].mean(-1),
        ]).cpu()

    for b in tqdm(range(0, n, batch_size), desc="head scores (repeated tokens)", disable=not progress,
                  file=sys.stderr):
        got = capture(model, seqs[b:b + batch_size], layers=layers, what=("pattern",), reduce={"pattern": reduce},
                      stop_after=max(layers))
        for layer, s in got["pattern"].items():
            for k, name in enumerate(SCORES):
                out[name][b:b + batch_size, layer] = s[k]
    return out


def repeat_scores(model: Model, n_seqs: int = 32, half_len: int = 50, batch_size: int = 8, seed: int = 0,
                  layers: list[int] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Induction, previous-token and duplicate-token scores, each [L, H] (rows of unasked layers are NaN)."""
    model.check_length(2 * half_len + 1)
    seqs = repeated_random_tokens(model, n_seqs, half_len, seed)
    per = repeat_scores_per_seq(model, seqs, half_len, batch_size, layers, progress)
    return {name: per[name].double().mean(0).float() for name in SCORES}


def prefix_induction_examples(model: Model, prefix_len: int, n: int, seq_len: int = 128, seed: int = 0):
    """Sequences with one copied prefix: (tokens [n, S], dest [n], src [n]).

    The prefix starts at i ∈ [1, S/4) and its copy at j ∈ [i + p + 8, S − p]; dest = j + p − 1 (last
    token of the copy) and src = i + p (the token after the first occurrence).
    """
    if prefix_len < 1 or 2 * prefix_len + 12 > seq_len:
        raise HeadscopeError(f"prefix length {prefix_len} does not fit in sequences of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed * 1000 + prefix_len)
    pool = ordinary_token_ids(model)
    toks = pool[torch.randint(len(pool), (n, seq_len), generator=g)]
    toks[:, 0] = model.bos_id
    i = torch.randint(1, seq_len // 4, (n,), generator=g)
    lo = i + prefix_len + 8
    j = lo + (torch.rand(n, generator=g) * (seq_len - prefix_len - lo + 1).float()).long()
    for b in range(n):
        toks[b, j[b]:j[b] + prefix_len] = toks[b, i[b]:i[b] + prefix_len]
    return toks, j + prefix_len - 1, i + prefix_len


def prefix_induction_per_example(model: Model, toks: torch.Tensor, dest: torch.Tensor, src: torch.Tensor,
                                 batch_size: int = 16, layers: list[int] | None = None) -> torch.Tensor:
    """Attention from ``dest`` to ``src`` of each example (tokens [n, S], dest/src [n]), [n, L, H]
    (rows of unasked layers are NaN)."""
    layers = list(range(model.n_layers)) if layers is None else layers
    out = torch.full((toks.shape[0], model.n_layers, model.n_heads), float("nan"))
    for b in range(0, toks.shape[0], batch_size):
        d, s = dest[b:b + batch_size], src[b:b + batch_size]
        rows = torch.arange(len(d))

        def reduce(layer, pat, d=d, s=s, rows=rows):  # [B, H, S, S] -> [B, H]
            return pat[rows, :, d, s].float().cpu()

        got = capture(model, toks[b:b + batch_size], layers=layers, what=("pattern",), reduce={"pattern": reduce},
                      stop_after=max(layers))
        for layer, v in got["pattern"].items():
            out[b:b + batch_size, layer] = v
    return out


def prefix_induction_scores(model: Model, prefix_lengths=range(1, 10), n_examples: int = 100, seq_len: int = 128,
                            batch_size: int = 16, seed: int = 0, layers: list[int] | None = None,
                            progress: bool = True) -> torch.Tensor:
    """Prefix-induction score per prefix length, layer and head: [P, L, H]."""
    model.check_length(seq_len)
    prefix_lengths = list(prefix_lengths)
    layers = list(range(model.n_layers)) if layers is None else layers
    out = torch.full((len(prefix_lengths), model.n_layers, model.n_heads), float("nan"))
    bar = tqdm(total=len(prefix_lengths) * n_examples, desc="head scores (prefix induction)", disable=not progress,
               file=sys.stderr)
    for pi, p in enumerate(prefix_lengths):
        toks, dest, src = prefix_induction_examples(model, p, n_examples, seq_len, seed)
        per = prefix_induction_per_example(model, toks, dest, src, batch_size, layers)
        out[pi, layers] = per[:, layers].double().mean(0).float()
        bar.update(n_examples)
    bar.close()
    return out


def heatmap(values: np.ndarray, title: str, path, cmap: str = "viridis", vmin=0.0, vmax=1.0) -> None:
    """Save a layer × head heatmap PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * H + 2), max(3, 0.22 * L + 1.2)))
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def prefix_plot(scores: torch.Tensor, prefix_lengths: list[int], path, top: int = 6) -> None:
    """Line plot of the prefix-induction score vs prefix length for the top heads at the longest prefix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    last = torch.nan_to_num(scores[-1], nan=-1.0).flatten()
    H = scores.shape[2]
    fig, ax = plt.subplots(figsize=(6, 4))
    for idx in last.topk(min(top, last.numel())).indices.tolist():
        layer, head = divmod(idx, H)
        ax.plot(prefix_lengths, scores[:, layer, head].numpy(), marker="o", label=f"{layer}.{head}")
    ax.set_xlabel("prefix length")
    ax.set_ylabel("attention to token after first occurrence")
    ax.set_ylim(0, 1)
    ax.legend(title="layer.head")
    ax.set_title("Prefix induction")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _nan_to_none(t: torch.Tensor):
    return [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in t.tolist()] if t.dim() == 2 else \
        [_nan_to_none(s) for s in t]


def run_head_scores(model: Model, run: RunDir, opts: ScoreOptions, progress: bool = True) -> dict:
    """Compute every head score and write ``heads/scores.json``, ``heads/scores.safetensors`` and PNGs.

    Returns the JSON document (the stage contract decides whether to run at all)."""
    from ..sites import parse_layers
    out = run / "heads"
    layers = parse_layers(opts.layers, model.n_layers)
    n_seqs, half_len, prefix_examples, batch_size, seed = (opts.n_seqs, opts.half_len, opts.prefix_examples,
                                                           opts.batch_size, opts.seed)
    prefix_lengths = list(opts.prefix_lengths)
    rep = repeat_scores(model, n_seqs, half_len, batch_size, seed, layers, progress)
    pre = prefix_induction_scores(model, prefix_lengths, prefix_examples, 128, batch_size, seed, layers, progress) \
        if prefix_examples > 0 else None
    doc = {
        "model": model.identity(), "n_layers": model.n_layers, "n_heads": model.n_heads,
        "scores": {k: _nan_to_none(v) for k, v in rep.items()},
        "prefix_induction": None if pre is None else {"prefix_lengths": prefix_lengths, "scores": _nan_to_none(pre)},
        "config": {"n_seqs": n_seqs, "half_len": half_len, "prefix_examples": prefix_examples,
                   "prefix_seq_len": 128, "seed": seed, "layers": layers},
    }
    tensors = dict(rep)
    if pre is not None:
        tensors["prefix_induction"] = pre
    write_tensors(out / "scores.safetensors", tensors)
    for name, t in rep.items():
        heatmap(t.numpy(), f"{name.replace('_', '-')} score — {model.name}", out / f"{name}.png")
    if pre is not None:
        prefix_plot(pre, prefix_lengths, out / "prefix_induction.png")
    write_json(out / "scores.json", doc)
    return doc


def top_heads(scores: list[list[float | None]], k: int = 5) -> list[tuple[int, int, float]]:
    """The k highest (layer, head, score) triples of a [L][H] table (None entries ignored)."""
    flat = [(l, h, v) for l, row in enumerate(scores) for h, v in enumerate(row) if v is not None]
    return sorted(flat, key=lambda x: -x[2])[:k]
