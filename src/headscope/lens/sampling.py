"""Which positions and which sequences the lens statistics read.

* **Positions.** Every packed sequence starts with BOS: at position 0 the head output and the model's
  prediction are the same in every sequence, so a lens that memorises them "gains" over the null for
  free, with no variance to flag it. ``fixed_prefix(ids)`` is the number of leading positions whose
  context is identical across the sequences of a batch (at least 1: position 0); those positions are
  left out of every lens statistic — the null, the closed form, the scale calibration, refinement and
  evaluation (``select_positions``).
* **Sequences.** ``Windows(corpus, split, seed)`` cuts the split's token stream into disjoint windows of
  S − 1 tokens (each read as ``[BOS] + window``) and orders them by a seeded permutation, so any prefix
  of the plan is spread over all documents of the split instead of the first few; ``docs`` gives the
  document each window starts in, for standard errors clustered by document.
* **Control lens.** ``select_positions`` also builds the input of the control lens: the last ``n_control``
  rows of R are replaced by a head's output taken from another sequence of the batch at a random
  position (sequence b reads sequence (b + 1) mod B, positions shuffled), so the control lens is trained
  and evaluated exactly like a real one on an input that carries no information about the prediction.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import TokenCorpus
from ..errors import HeadscopeError


def fixed_prefix(ids: torch.Tensor) -> int:
    """Leading positions of ids [B, S] whose context is identical in every sequence (≥ 1: position 0
    always is, since every sequence starts with BOS; with one sequence only position 0 is left out)."""
    B, S = ids.shape
    if B == 1:
        return 1
    same = (ids == ids[:1]).all(0).long()
    return max(1, int(same.cumprod(0).sum()))


def kept_positions(ids: torch.Tensor) -> torch.Tensor:
    """Flat indices [n] (into the B·S positions of ids [B, S]) of the positions the statistics read."""
    B, S = ids.shape
    c = min(fixed_prefix(ids), S)
    return (torch.arange(B)[:, None] * S + torch.arange(c, S)[None]).reshape(-1)


def select_positions(R: torch.Tensor, logp: torch.Tensor | None, ids: torch.Tensor, n_control: int = 0,
                     generator: torch.Generator | None = None):
    """Drop the fixed positions and scramble the control rows.

    R [K + C, B·S, d] (the last C = ``n_control`` rows are the control lenses' source heads), logp [B·S, V]
    or None, ids [B, S]. Returns (R [K + C, n, d], logp [n, V] | None, keep [n]) with n the kept
    positions; control row c at kept position (b, t) holds its source head's output at (b + 1 mod B, t'),
    t' a random kept position (``generator``)."""
    B, S = ids.shape
    c = min(fixed_prefix(ids), S)
    keep = kept_positions(ids).to(R.device)
    if n_control:
        g = generator or torch.Generator().manual_seed(0)
        donor = torch.cat([((b + 1) % B) * S + c + torch.randperm(S - c, generator=g) for b in range(B)]).to(R.device)
        K = R.shape[0] - n_control
        R = torch.cat([R[:K, keep], R[K:, donor]])
    else:
        R = R[:, keep]
    return R, (logp[keep] if logp is not None else None), keep


class Windows:
    """Disjoint windows of a split in a seeded random order (see the module docstring).

    ``offsets`` [n] stream offsets; ``docs`` [n] the document index of each window's first token;
    ``ids(i, j)`` → [j − i, S] the sequences of windows i … j − 1 of the plan."""

    def __init__(self, corpus: TokenCorpus, split: str, seed: int = 0):
        self.corpus, self.split = corpus, split
        w = corpus.seq_len - 1
        n = corpus.n_tokens(split) // w
        if n == 0:
            raise HeadscopeError(
                f"corpus '{corpus.spec}' is too small: its {split} split has {corpus.n_tokens(split)} tokens, "
                f"fewer than one sequence of {corpus.seq_len}; use a larger corpus or a smaller --seq-len")
        rng = np.random.default_rng(seed)
        self.offsets = rng.permutation(n) * w
        self.docs = corpus.document_of(split, self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def need(self, n: int, what: str) -> None:
        """One-line error when the split has fewer than ``n`` windows."""
        if n > len(self):
            S = self.corpus.seq_len
            raise HeadscopeError(
                f"the {self.split} split of corpus '{self.corpus.spec}' has {len(self)} sequences of {S} tokens, "
                f"too few for {what} ({n} sequences); lower the token count or use a larger corpus")

    def ids(self, i: int, j: int) -> torch.Tensor:
        j = min(j, len(self))
        return torch.stack([self.corpus.window(self.split, int(o)) for o in self.offsets[i:j]])

    def batches(self, batch_size: int, n: int, start: int = 0):
        """Yield (ids [B, S], docs [B]) for windows start … start + n − 1."""
        end = min(len(self), start + n)
        for a in range(start, end, batch_size):
            b = min(end, a + batch_size)
            yield self.ids(a, b), self.docs[a:b]
