"""Bias localisation with ``lens scan --token-list``, measured against a frequency-matched control list.

A head's hit rate for a token list (the fraction of prompt positions ≥ 1 where a listed token is among
the lens' top-k) says little alone: frequent tokens sit in many lenses' top-k whatever the head does.
Each listed token gets a control token of nearly the same frequency in the run's training corpus
(the nearest in log-frequency among word-like tokens not in the list, drawn at random among the 5
nearest, seeded). Per head, the difference (list − control) of hit rates is averaged over prompts with
an SE over prompts (the independent unit), tested one-sided, and Benjamini–Hochberg (q = 0.05) is applied
over heads: a head is *localised* only when it beats its control.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models.load import Model
from ..stats import benjamini_hochberg, clustered_mean_se, one_sided_p

Q = 0.05
NEAREST = 5


def token_frequencies(model: Model, corpus: str = "default", max_tokens: int = 5_000_000) -> np.ndarray:
    """Counts [V] of every token id in (up to ``max_tokens`` of) the train split of ``corpus``."""
    from ..data import TokenCorpus
    data = TokenCorpus(model, corpus, progress=False)
    stream = np.asarray(data._stream("train")[:max_tokens], dtype=np.int64)
    return np.bincount(stream, minlength=model.d_vocab)[:model.d_vocab]


def _word_like(text: str) -> bool:
    w = text.strip()
    return len(w) >= 2 and w.isalpha()


def matched_controls(model: Model, token_ids: list[int], freq: np.ndarray, seed: int = 0) -> list[int]:
    """One control token per listed token, of nearly the same corpus frequency and the same form (a word
    with a leading space gets one with a leading space), none in the list and no two the same; word-like
    tokens (alphabetic, ≥ 2 letters) preferred, any other token when too few. Returned in the order of
    the listed tokens by decreasing frequency."""
    listed = set(token_ids)
    texts = model.token_str(list(range(model.d_vocab)))
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    pool = [t for t in range(model.d_vocab) if t not in listed and t not in special and _word_like(texts[t])]
    if len(pool) < NEAREST * len(token_ids):
        pool = [t for t in range(model.d_vocab) if t not in listed and t not in special]
    rng = np.random.default_rng(seed)
    logf = np.log1p(freq.astype(np.float64))
    avail = np.array(pool)
    spaced = np.array([texts[t][:1].isspace() for t in pool])
    used = np.zeros(len(avail), dtype=bool)
    out = []
    for t in sorted(token_ids, key=lambda t: -freq[t]):
        dist = np.abs(logf[avail] - logf[t])
        same = spaced == texts[t][:1].isspace()
        if (same & ~used).sum() >= NEAREST:
            dist[~same] = np.inf
        dist[used] = np.inf
        near = np.argsort(dist, kind="stable")[:NEAREST]
        near = near[np.isfinite(dist[near])]
        pick = int(rng.choice(near))
        used[pick] = True
        out.append(int(avail[pick]))
    return out


def localise(hits: torch.Tensor, control_hits: torch.Tensor, names: list[str], q: float = Q) -> dict:
    """Per head: hit rate of the list and of the control list [P, K] → {"L.H": {"rate", "control_rate",
    "diff", "se", "p_value", "localised"}} (SE over prompts, one-sided, BH over heads), plus
    "n_localised"."""
    d = (hits - control_hits).double().numpy().T                  # [K, P]
    mean, se, G = clustered_mean_se(d)
    p = one_sided_p(mean, se, G - 1)
    bh = benjamini_hochberg(p, q)
    per = {}
    for i, n in enumerate(names):
        per[n] = {"rate": float(hits[:, i].mean()), "control_rate": float(control_hits[:, i].mean()),
                  "diff": float(mean[i]), "se": None if not math.isfinite(se[i]) else float(se[i]),
                  "p_value": None if not math.isfinite(p[i]) else float(p[i]), "localised": bool(bh[i])}
    return {"per_head": per, "n_localised": int(bh.sum()), "q": q, "n_prompts": int(hits.shape[0])}
