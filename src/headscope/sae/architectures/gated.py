"""``gated`` (loaded, not trained): f = [(x−b_dec)·W_enc + b_gate > 0] · ReLU((x−b_dec)·(W_enc ⊙ exp(r_mag))
+ b_mag) (Rajamanoharan et al. 2024a); ``b_enc`` holds b_gate."""

from __future__ import annotations

import torch
from torch import nn

from .base import Architecture


class Gated(Architecture):
    name = "gated"
    trainable = False
    extra_params = ("r_mag", "b_mag")
    saelens_renames = {"b_enc": "b_gate"}

    def init_extra(self, sae, F):
        sae.r_mag = nn.Parameter(torch.zeros(F))
        sae.b_mag = nn.Parameter(torch.zeros(F))

    def fold_input_bias(self, w):
        """Both paths: the gate's b_enc and the magnitude path's b_mag."""
        return {**super().fold_input_bias(w), "b_mag": w["b_mag"] + w["b_dec"] @ (w["W_enc"] * w["r_mag"].exp())}

    def encoder_weight(self, sae):
        """The magnitude path's encoder."""
        return sae.W_enc * sae.r_mag.exp()

    def pre_acts(self, sae, x):
        """The magnitude path's pre-activations."""
        return (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag

    def activation(self, sae, pre, x):
        gate = (sae._flat(x) - sae.b_dec) @ sae.W_enc + sae.b_enc
        return (gate > 0) * pre.relu()
