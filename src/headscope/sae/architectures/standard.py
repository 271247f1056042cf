"""``standard``: f = ReLU(pre); trained with Σ_d (x̂ − x)² + λ·Σ_F |f| (Kissane et al.)."""

from __future__ import annotations

from .base import Architecture


class Standard(Architecture):
    name = "standard"
    resamples_dead = True
    sweep_knob = ("l1_coeff", "l1_")

    def loss(self, sae, x, out, mse, losses, *, l1_coeff, dead, k_aux, aux_coeff, l0_coeff):
        losses["l1"] = out.acts.abs().sum(-1).mean()
        losses["loss"] = mse + l1_coeff * losses["l1"]
        return losses
