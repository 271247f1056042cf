"""The options of one SAE training run: ``headscope sae train`` flags, the study's ``[sae.train]`` keys and
the trainer's configuration, declared once (no torch import, so the CLI starts fast)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional

from simple_parsing import field

from ..options import check, check_name

TRAINABLE = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
"""Architectures headscope trains (the choices of ``sae train --arch``)."""


@dataclass(frozen=True)
class TrainConfig:
    """Trains an SAE on z (the concatenated head outputs before W_O) of one layer; resumes; torchrun for
    several processes. Writes RUN/sae/<name>/ in SAELens' format plus train.json."""

    layer: int
    """layer whose z is encoded"""
    name: Optional[str] = None
    """SAE name in the run directory (default L<layer>)"""
    architecture: Literal["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"] = field(
        default="topk", alias=["--arch"])
    """standard: ReLU + L1 (the paper); topk: TopK with the AuxK dead-feature loss; jumprelu: learned
    per-feature thresholds + L0 penalty; batchtopk: top k·batch while training, a threshold at inference;
    matryoshka_batchtopk: BatchTopK whose nested prefixes each reconstruct"""
    expansion: int = 4
    """d_sae = expansion · H·Dh (ignored when --d-sae is set)"""
    d_sae: Optional[int] = None
    """number of features (overrides --expansion)"""
    k: int = 32
    """TopK: active features per token; BatchTopK / Matryoshka: on average over the batch"""
    l1_coeff: float = field(default=5.0, alias=["--l1"])
    """standard: L1 coefficient (in units of the normalised input, where E‖x‖ = sqrt(d_in))"""
    l0_coeff: float = field(default=1.0, alias=["--l0"])
    """jumprelu: L0 coefficient λ in MSE + λ·L0 (MSE of the normalised input)"""
    bandwidth: float = 0.05
    """jumprelu: width of the straight-through estimator's kernel"""
    matryoshka_widths: str = ""
    """matryoshka_batchtopk: comma-separated nested prefix widths (default d_sae/16, /8, /4, /2, d_sae)"""
    threshold_lr: float = 0.01
    """batchtopk / matryoshka: rate of the running mean that sets the inference threshold"""
    lr: float = 1e-3
    """Adam learning rate (β = 0.9, 0.99)"""
    batch_size: int = 1024
    """token rows per step and process"""
    n_tokens: int = field(default=2_000_000, alias=["--tokens"])
    """training tokens (all processes together)"""
    warmup_steps: int = 100
    """linear lr warm-up steps"""
    decay_frac: float = 0.2
    """fraction of steps at the end over which lr decays linearly to zero"""
    l1_warmup_frac: float = 0.05
    """fraction of steps over which the L1 coefficient ramps up from 0"""
    k_aux: int = 256
    """TopK: dead features used by the auxiliary loss"""
    aux_coeff: float = 1 / 32
    """TopK: weight of the auxiliary loss"""
    dead_tokens: Optional[int] = None
    """a feature is dead after this many tokens without firing (default: n_tokens / 10, at most 10M)"""
    resample_every: int = 0
    """standard: resample dead features every this many steps (0: never)"""
    resample_max: int = 4
    """standard: resample at most this many times"""
    init_b_dec: Literal["mean", "zero"] = "mean"
    """b_dec starts at the mean input or at zero (the reference code)"""
    seed: int = 0
    """seed"""
    corpus: str = "default"
    """corpus spec (see headscope.data)"""
    seq_len: int = 128
    """tokens per sequence"""
    buffer_tokens: int = 65536
    """tokens per shuffling block (bounds memory: buffer_tokens · d_in · 4 bytes)"""
    model_batch: int = 16
    """sequences per model forward pass while streaming"""
    cache: Optional[str] = None
    """train from an activation cache written by `headscope sae cache` instead of running the model"""
    checkpoint_every: int = 200
    """steps between checkpoints"""

    def __post_init__(self):
        check(self.layer >= 0, f"--layer {self.layer} must be 0 or more")
        check_name(self.name, "--name")
        for n in ("l1_coeff", "l0_coeff", "bandwidth", "threshold_lr", "aux_coeff", "decay_frac", "l1_warmup_frac"):
            check(math.isfinite(getattr(self, n)), f"--{n.replace('_', '-')} must be a finite number")
        check(0 <= self.decay_frac <= 1 and 0 <= self.l1_warmup_frac <= 1,
              "--decay-frac and --l1-warmup-frac must lie in [0, 1]")
        check(self.warmup_steps >= 0 and self.k_aux >= 0 and self.aux_coeff >= 0 and self.resample_every >= 0
              and self.resample_max >= 0 and self.l1_coeff >= 0 and 0 <= self.threshold_lr <= 1,
              "--warmup-steps, --k-aux, --aux-coeff, --resample-every, --resample-max and --l1 must be 0 or more, "
              "--threshold-lr in [0, 1]")
        check(self.dead_tokens is None or self.dead_tokens >= 1, "--dead-tokens must be at least 1")
        for n in ("expansion", "k", "batch_size", "n_tokens", "seq_len", "buffer_tokens", "checkpoint_every",
                  "model_batch"):
            check(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
        check(self.d_sae is None or self.d_sae >= 1, "--d-sae must be at least 1")
        check(self.bandwidth > 0 and self.l0_coeff >= 0, "--bandwidth must be positive and --l0 at least 0")
        check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        check(self.architecture in TRAINABLE,
              f"cannot train SAE architecture '{self.architecture}' (choose from {', '.join(TRAINABLE)})")
        check(self.init_b_dec in ("mean", "zero"), f"--init-b-dec must be 'mean' or 'zero', got '{self.init_b_dec}'")

    @property
    def sae_name(self) -> str:
        return self.name or f"L{self.layer}"

    def resolved_d_sae(self, d_in: int) -> int:
        return int(self.d_sae or self.expansion * d_in)

    def n_steps(self, world_size: int = 1) -> int:
        return max(1, self.n_tokens // (self.batch_size * world_size))

    def result_keys(self) -> dict:
        """Options that change the result (compared on resume)."""
        d = asdict(self)
        for k in ("checkpoint_every", "model_batch", "name"):
            d.pop(k)
        return d
