"""Which positions and which sequences the lens statistics read.

* **Positions.** Every packed sequence starts with BOS: at position 0 the head output and the model's
  prediction are the same in every sequence, so a lens that memorises them "gains" over the null for
  free, with no variance to flag it. ``fixed_prefix(ids)`` is the number of leading positions whose
  context is identical across the sequences of a batch (at least 1: position 0); those positions are
  left out of every lens statistic — the null, the closed form, the scale calibration, refinement and
  evaluation (``select_positions``).
* **Sequences.** ``Windows(corpus, split, seed)`` is the project's one sampler (:mod:`headscope.sampling`):
  the split's packed sequences in a seeded random order, so any prefix of the plan is spread over all
  documents of the split instead of the first few; ``docs`` gives the document each window starts in,
  for standard errors clustered by document.
* **Control lens.** ``select_positions`` also builds the input of the control lens: the last ``n_control``
  rows of R are replaced by a head's output taken from another sequence of the batch at a random
  position (sequence b reads sequence (b + 1) mod B, positions shuffled), so the control lens is trained
  and evaluated exactly like a real one on an input that carries no information about the prediction.
"""

from __future__ import annotations

import torch


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
