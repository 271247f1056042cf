"""``batchtopk``: training keeps the k·N largest ReLU(pre) over the whole batch (Bussmann et al. 2024) +
AuxK; inference is a JumpReLU whose threshold (the same for all features) is the running mean of the
smallest kept activation, as SAELens saves it."""

from __future__ import annotations

import torch

from ..functions import TrainOutput, _batch_topk_flat
from .base import AuxK


class BatchTopK(AuxK):
    name = "batchtopk"
    sweep_knob = ("k", "btk")
    thresholded = True
    extra_params = ("threshold",)

    def init_extra(self, sae, F):
        sae.register_buffer("threshold", torch.zeros(F))        # set by after_step

    def activation(self, sae, pre, x):
        return pre.relu() * (pre > sae.threshold)

    sparse_training = True
    """Train through the sparse kernels (:mod:`headscope.sae.sparse`) by default."""

    def sparse_select(self, sae, pre: torch.Tensor):
        """(rows, cols, values) of the activations a sparse training step keeps: the k·N largest of the batch."""
        N, F = pre.shape
        # the guess: below the previous step's cut (it moves by a few % a step)
        flat = _batch_topk_flat(pre, sae.cfg.k * N, 0.8 * sae._last_cut)
        rows, cols = flat // F, flat % F
        pv = pre.flatten()[flat]
        sae._last_cut = max(0.0, float(pv.min())) if pv.numel() else 0.0
        return rows, cols, pv

    def train_forward(self, sae, x, sparse=True) -> TrainOutput:
        if sparse and self.sparse_training and x.dim() == 2:
            return sae._sparse_train_forward(x)
        pre = sae.pre_acts(x)
        r = pre.relu()
        vals, flat = r.flatten().topk(sae.cfg.k * x.shape[0], sorted=False)
        acts = torch.zeros_like(r).flatten().scatter(0, flat, vals).reshape(r.shape)
        return TrainOutput(sae.decode(acts), pre, acts=acts)

    @torch.no_grad()
    def after_step(self, sae, out, threshold_lr):
        """The threshold ← running mean of the smallest activation kept in the batch (as SAELens)."""
        m = out.min_positive()
        if m is not None:
            if not bool(sae.threshold.any()):   # first update: start at the value, not at 0 (SAELens
                sae.threshold.fill_(m)          # starts at 0, which biases short runs' threshold low)
            else:
                sae.threshold.mul_(1 - threshold_lr).add_(threshold_lr * m)
