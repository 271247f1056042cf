"""Head results and the model's final distribution for a batch, arranged per site.

``site_batch(model, ids, sites)`` runs one forward pass through :func:`headscope.capture.capture`
and returns R [K, N, d] (the result r_h of each site (layer, head) at every one of the N = B·S
positions, no b_O) and logp [N, V] (float32 log-softmax of the final logits at the same positions).
With ``space="z"`` it returns the heads' z [K, N, Dh] instead (r_h = z_h·W_O[h]): the lenses that are
affine in r are affine in z, and z is d/Dh times smaller (:meth:`LensBank.z_maps`).
"""

from __future__ import annotations

import torch

from ..capture import capture
from ..models.load import Model


def site_batch(model: Model, ids: torch.Tensor, sites: list[tuple[int, int]], logprobs: bool = True,
               interventions=(), space: str = "result") -> tuple[torch.Tensor, torch.Tensor | None]:
    """R [K, N, d] (``space="z"``: Z [K, N, Dh]) (float32) and logp [N, V] (or None) for ``ids`` [B, S]."""
    layers = sorted({l for l, _ in sites})
    heads = {l: sorted({h for ll, h in sites if ll == l}) for l in layers}
    what = (space, "logprobs") if logprobs else (space,)
    cap = capture(model, ids, layers=layers, what=what, interventions=interventions,
                  reduce={space: lambda l, r: r[:, :, heads[l]].float()},
                  stop_after=None if logprobs else max(layers))
    rows = []
    for l, h in sites:
        r = cap[space][l][:, :, heads[l].index(h)]  # [B, S, d | Dh]
        rows.append(r.reshape(-1, r.shape[-1]))
    R = torch.stack(rows)
    lp = cap.logprobs.reshape(-1, cap.logprobs.shape[-1]) if logprobs else None
    return R, lp
