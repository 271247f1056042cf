"""``topk``: f = ReLU(TopK_k(pre)) per token; trained with MSE + α·AuxK (Gao et al. 2024)."""

from __future__ import annotations

import torch

from ..functions import TrainOutput, _SparseDecode
from .base import AuxK


def topk_decode(sae, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, dense activations) of each token's k largest pre-activations: the decode gathers the
    k decoder rows of each token instead of a dense [N, F] matmul."""
    vals, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    vals = vals.relu()
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    return _SparseDecode.apply(vals, idx, sae.W_dec) + sae.b_dec, acts


class TopK(AuxK):
    name = "topk"
    sweep_knob = ("k", "k")

    def saelens_fields(self, cfg) -> dict:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

    def activation(self, sae, pre, x):
        vals, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, sae, x, pre):
        if x.dim() == 2:
            return topk_decode(sae, pre)
        return super().forward(sae, x, pre)

    def sparse_select(self, sae, pre: torch.Tensor):
        """(rows, cols, values) of the activations a sparse training step keeps: each token's k largest."""
        N = pre.shape[0]
        pv, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        rows = torch.arange(N, device=pre.device).repeat_interleave(sae.cfg.k)
        return rows, idx.reshape(-1), pv.reshape(-1)

    def train_forward(self, sae, x, sparse=True) -> TrainOutput:
        if sparse and x.dim() == 2:
            return sae._sparse_train_forward(x)
        pre = sae.pre_acts(x)
        recon, acts = topk_decode(sae, pre)
        return TrainOutput(recon, pre, acts=acts)
