"""``jumprelu``: f = ReLU(pre)·[pre > θ_F] with a learned threshold per feature; trained with MSE + λ·L0, the
L0 and the threshold's gradient through a straight-through estimator with a rectangle kernel of width
``bandwidth`` (Rajamanoharan et al. 2024, SAELens' "step")."""

from __future__ import annotations

import torch
from torch import nn

from ..functions import TrainOutput, _JumpReLU, _Step
from .base import Architecture


class JumpReLU(Architecture):
    name = "jumprelu"
    thresholded = True
    encoder_from_decoder = True
    extra_params = ("threshold",)
    sweep_knob = ("l0_coeff", "l0_")

    def init_extra(self, sae, F):
        sae.threshold = nn.Parameter(torch.full((F,), 0.01))   # SAELens' jumprelu_init_threshold

    def activation(self, sae, pre, x):
        return pre.relu() * (pre > sae.threshold)

    def train_forward(self, sae, x, sparse=True) -> TrainOutput:
        pre = sae.pre_acts(x)
        acts = _JumpReLU.apply(pre, sae.threshold, sae.cfg.bandwidth)  # θ ≥ 0: = ReLU(pre)·[pre > θ]
        return TrainOutput(sae.decode(acts), pre, acts=acts)

    def loss(self, sae, x, out, mse, losses, *, l1_coeff, dead, k_aux, aux_coeff, l0_coeff):
        losses["l0"] = _Step.apply(out.pre, sae.threshold, sae.cfg.bandwidth).sum(-1).mean()
        losses["loss"] = mse + l0_coeff * losses["l0"]
        return losses

    @torch.no_grad()
    def after_step(self, sae, out, threshold_lr):
        sae.threshold.clamp_(min=0.0)
