"""Training objectives and evaluation metrics for lens logits.

Shapes: lens logits [K, N, V] for K sites and N positions; the model's log-probs logp [N, V]; next
tokens [N] (-1 where there is none, e.g. the last position of a sequence). Every loss returns a
per-site mean over positions [K], in nats; summing it over sites gives each site exactly its own
gradient, so many heads train in one batched step.

Objectives:

* ``fkl``: forward KL(p_model ‖ q_lens) (the paper's, and tuned-lens').
* ``rkl``: reverse KL(q_lens ‖ p_model) (mode-seeking).
* ``ce``: cross-entropy of the lens to the actual next token.
* ``fkl_shortlist``: forward KL restricted to a token shortlist — the union of each position's top-k
  target tokens and ``negatives`` uniformly sampled tokens, shared by the batch; both distributions
  renormalised on the shortlist. Cheaper (|shortlist| ≪ V logits per head) and a biased estimate of
  ``fkl``; its held-out exact KL is reported against ``fkl`` in docs/lens.md.
"""

from __future__ import annotations

import torch

from ..errors import HeadscopeError
from .options import OBJECTIVES

LN2 = 0.6931471805599453


def forward_kl(logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per site, mean over positions: [K] nats. logits [K, N, V], logp [N, V]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return (p * (logp - logq)).sum(-1).mean(-1)


def reverse_kl(logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) ‖ p) per site: [K] nats."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1).mean(-1)


def next_token_ce(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """−log q(next token) per site over positions with a next token: [K] nats."""
    keep = next_ids >= 0
    logq = torch.log_softmax(logits[:, keep].float(), dim=-1)
    idx = next_ids[keep].view(1, -1, 1).expand(logq.shape[0], -1, 1)
    return -logq.gather(-1, idx).squeeze(-1).mean(-1)


def shortlist(logp: torch.Tensor, top_k: int, negatives: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids of the shortlist: union of every position's top-k under p and sampled negatives."""
    V = logp.shape[-1]
    top = logp.topk(min(top_k, V), dim=-1).indices.reshape(-1)
    neg = torch.randint(0, V, (negatives,), generator=generator)
    return torch.unique(torch.cat([top.cpu(), neg])).to(logp.device)


def loss(objective: str, logits: torch.Tensor, logp: torch.Tensor, next_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-site loss [K] for ``objective`` (for ``fkl_shortlist`` pass logits and logp already
    restricted to the shortlist; renormalisation happens here)."""
    if objective in ("fkl", "fkl_shortlist"):
        if objective == "fkl_shortlist":
            logp = torch.log_softmax(logp, dim=-1)
        return forward_kl(logits, logp)
    if objective == "rkl":
        return reverse_kl(logits, logp)
    if objective == "ce":
        if next_ids is None:
            raise HeadscopeError("the 'ce' objective needs next tokens")
        return next_token_ce(logits, next_ids)
    raise HeadscopeError(f"unknown objective '{objective}' (choose from {', '.join(OBJECTIVES)})")


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Next token at every position of ids [B, S], flattened to [B·S]; -1 at the last position."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    return nxt.reshape(-1)
