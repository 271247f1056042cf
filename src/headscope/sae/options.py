"""The SAE options, declared once: ``headscope sae train``'s options (:class:`TrainOptions`: its flags, the
study's ``[sae.train]`` keys and the trainer's configuration, one class) and every other ``headscope sae``
step's options. A leaf module: it imports nothing of headscope but :mod:`headscope.options` and
:mod:`headscope.errors` (no torch import, so the CLI starts fast)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional, get_args

from simple_parsing import field

from ..errors import HeadscopeError
from ..options import check, check_name

Architecture = Literal["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"]
"""Architectures headscope trains: the type of ``sae train --arch`` and of the sweep's ``--architecture``
(declared once; a new trainable architecture adds its name here and its module to ``sae/architectures``)."""
TRAINABLE = get_args(Architecture)
"""The same names as a tuple (the choices of ``sae train --arch``)."""


@dataclass(frozen=True)
class TrainOptions:
    """Trains an SAE on z (the concatenated head outputs before W_O) of one layer; resumes; torchrun for
    several processes. Writes RUN/sae/<name>/ in SAELens' format plus train.json."""

    layer: int
    """layer whose z is encoded"""
    name: Optional[str] = None
    """SAE name in the run directory (default L<layer>)"""
    architecture: Architecture = field(
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


@dataclass(frozen=True)
class EvalOptions:
    """L0, FVE, KL/CE recovered against zero- and mean-ablation with bootstrap CIs (clustered by
    document), feature density, on held-out sequences spread over the documents."""

    name: str
    """the SAE's name in the run directory"""
    n_tokens: int = field(default=8192, alias=["--tokens"])
    """held-out tokens (n_tokens // seq_len sequences, spread over the held-out split)"""
    batch_size: int = 4
    """sequences per forward pass"""
    corpus: Optional[str] = None
    """corpus (default: the SAE's)"""
    mean_tokens: int = 16384
    """train tokens (spread over the split) for the mean-ablation baseline"""
    n_boot: int = 2000
    """bootstrap resamples for the confidence intervals"""
    min_effect: float = 0.05
    """a recovered score is meaningful only if its ablation effect's lower 95 % bound is at least this (nats/token)"""
    seed: int = 0
    """bootstrap seed"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.n_tokens >= 1 and self.batch_size >= 1, "--n-tokens (--tokens) and --batch-size must be at least 1")
        check(self.mean_tokens >= 1 and self.n_boot >= 1, "--mean-tokens and --n-boot must be at least 1")
        check(self.min_effect >= 0, f"--min-effect must be 0 or more, got {self.min_effect}")


def eval_outputs(name: str) -> list[str]:
    """Run-dir-relative files the ``sae.eval`` stage writes (eval.json last)."""
    return [f"sae/{name}/{f}" for f in ("sparsity.safetensors", "feature_counts.safetensors",
                                        "per_sequence.safetensors", "eval_density.png", "eval.json")]


@dataclass(frozen=True)
class AnalysisOptions:
    """Weight attribution of every feature to heads; per-head top features; polysemanticity tested
    against an untrained-SAE null and a head-permuted null (BH over heads), with the test's power
    (planted groups detected)."""

    name: str
    """the SAE's name in the run directory"""
    top_n: int = 10
    """top features per head"""
    top_tokens: int = 10
    """output tokens per feature compared between features"""
    pair_alpha: float = 0.01
    """two features are related when their cosine or token overlap is in the top pair_alpha/2 of null pairs"""
    q: float = 0.05
    """Benjamini-Hochberg false-discovery rate over heads"""
    n_null: int = 256
    """draws of each null"""
    seed: int = 0
    """seed of the nulls and of the planted groups"""
    n_planted: int = 32
    """the test's power: plantings of two groups of 2, 3 and 5 features per head and group size (0: not measured)"""
    planted_cos: float = 0.5
    """pairwise cosine of the decoder blocks within a planted group"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.top_n >= 2 and self.top_tokens >= 1, "--top-n must be at least 2 and --top-tokens at least 1")
        check(self.n_null >= 20, f"--n-null must be at least 20, got {self.n_null}")
        check(0 < self.pair_alpha < 1 and 0 < self.q < 1, "--pair-alpha and --q must lie in (0, 1)")
        check(0 <= self.n_planted <= 10_000, f"--n-planted must lie in [0, 10000], got {self.n_planted}")
        check(0 <= self.planted_cos <= 1, f"--planted-cos must lie in [0, 1], got {self.planted_cos}")


@dataclass(frozen=True)
class DashboardOptions:
    """Feature pages: max-activating examples, DFA, logits, density."""

    name: str
    """the SAE's name in the run directory"""
    n_tokens: int = field(default=16384, alias=["--tokens"])
    """held-out tokens scanned"""
    batch_size: int = 8
    """sequences per forward pass"""
    n_examples: int = 10
    """max-activating examples per feature"""
    corpus: Optional[str] = None
    """corpus (default: the SAE's)"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.n_tokens >= 1 and self.n_examples >= 1, "--n-tokens (--tokens) and --n-examples must be at least 1")


@dataclass(frozen=True)
class IoiOptions:
    """IOI worked example: features at S2 that matter for the logit difference."""

    name: str
    """the SAE's name in the run directory"""
    n_prompts: int = field(default=100, alias=["--prompts"])
    """IOI prompts"""
    max_features: Optional[int] = None
    """ablate at most this many live features"""
    seed: int = 0
    """prompt seed"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.max_features is None or self.max_features >= 1, "--max-features must be at least 1")
        check(self.n_prompts >= 1, "--n-prompts (--prompts) must be at least 1")


@dataclass(frozen=True)
class CacheOptions:
    """Runs the model once and caches z of several layers to disk shards (the fast path for sweeps)."""

    layers: str
    """e.g. '3', '1,4', '2-5'"""
    dir: str
    """cache folder"""
    tokens: Optional[int] = None
    """tokens to cache (default: the whole train split)"""
    shard_tokens: int = 65536
    """tokens per shard"""
    corpus: str = "default"
    """corpus spec"""
    seq_len: int = 128
    """tokens per sequence"""

    def __post_init__(self):
        from pathlib import Path
        check(not Path(self.dir).exists() or Path(self.dir).is_dir(), f"--dir {self.dir} is a file, not a directory")
        check(self.shard_tokens >= 1 and (self.tokens is None or self.tokens >= 1),
              "--tokens and --shard-tokens must be at least 1")


@dataclass(frozen=True)
class SweepOptions:
    """Trains SAEs of several architectures / sparsities from ONE activation cache and plots L0 against
    CE loss recovered (vs zero- and mean-ablation), one curve per architecture."""

    layer: int
    """layer whose z is encoded"""
    values: list[float] = field(default_factory=list)
    """values of --arch's sparsity knob: k (topk, batchtopk, matryoshka_batchtopk), L0 coefficient
    (jumprelu) or L1 coefficient (standard)"""
    grid: Optional[str] = None
    """several architectures instead of --arch/--values: 'topk:16,32 batchtopk:16,32 jumprelu:0.3,1'"""
    eval_tokens: int = 4096
    """held-out tokens per evaluation"""
    architecture: Architecture = field(
        default="topk", alias=["--arch"])
    """SAE architecture (with --values)"""
    lr: float = 1e-3
    """Adam learning rate"""
    seq_len: int = 128
    """tokens per sequence"""
    n_tokens: int = field(default=2_000_000, alias=["--tokens"])
    """training tokens per SAE"""
    batch_size: int = 1024
    """token rows per step"""
    expansion: int = 4
    """d_sae = expansion · H·Dh"""
    corpus: str = "default"
    """corpus spec"""
    cache: Optional[str] = None
    """activation cache to train from"""
    warmup_steps: int = 100
    """linear lr warm-up steps of every SAE"""
    buffer_tokens: int = 65536
    """tokens per shard of the cache the sweep writes (the shuffling block)"""

    def __post_init__(self):
        check((len(self.values) >= 1) != bool(self.grid), "give either --values (with --arch) or --grid")
        check(self.warmup_steps >= 0, "--warmup-steps must be 0 or more")
        for n in ("n_tokens", "batch_size", "expansion", "seq_len", "buffer_tokens", "eval_tokens"):
            check(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be at least 1")
        check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        if self.grid:
            parse_grid(self.grid)


@dataclass(frozen=True)
class DfaOptions:
    """Direct feature attribution of one feature on a prompt (and one recursive step)."""

    name: str
    """the SAE's name in the run directory"""
    feature: int
    """feature index"""
    prompt: str
    """the prompt"""
    dest: int = -1
    """destination position (negative: from the end)"""
    recursive: bool = False
    """also one step upstream through the value path"""
    top: int = 10
    """components shown by --recursive"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.feature >= 0, f"--feature {self.feature}: feature indices start at 0")
        check(self.top >= 1, f"--top must be at least 1, got {self.top}")


@dataclass(frozen=True)
class ImportOptions:
    """Imports a pretrained attention SAE on z into the run directory: a SAELens folder (standard, gated,
    topk, jumprelu, batchtopk, matryoshka_batchtopk; whole-layer or one head via hook_head_index) or a
    Gemma Scope params.npz. It is checked against the model, then written as RUN/sae/<name>/ so that
    sae eval / analysis / dashboards / ioi / dfa read it like a trained one."""

    path: str
    """SAELens SAE folder (cfg.json + sae_weights.safetensors) or a Gemma Scope params.npz"""
    name: str
    """name of the SAE in the run directory"""
    layer: Optional[int] = None
    """layer (needed for a params.npz whose path has no layer_<L> part)"""

    def __post_init__(self):
        check_name(self.name, "--name")
        check(self.layer is None or self.layer >= 0, f"--layer {self.layer} must be 0 or more")


def parse_grid(spec: str) -> dict[str, list[float]]:
    """``"topk:16,32 jumprelu:0.3,1"`` -> {"topk": [16, 32], "jumprelu": [0.3, 1.0]}."""
    grid: dict[str, list[float]] = {}
    for part in spec.replace(";", " ").split():
        arch, _, vals = part.partition(":")
        if arch not in TRAINABLE or not vals:
            raise HeadscopeError(f"sweep grid entry '{part}' is not ARCH:V1,V2 with ARCH one of {', '.join(TRAINABLE)}")
        try:
            grid[arch] = [float(v) for v in vals.split(",") if v]
        except ValueError:
            raise HeadscopeError(f"sweep grid entry '{part}' has a value that is not a number") from None
    if not grid:
        raise HeadscopeError("sweep needs at least one ARCH:VALUES entry")
    return grid
